"""Records -> token ids with a loss mask: reading JSONL/CSV (Parquet and `datasets` folders: tables.py), templates,
the verbalizer, collation."""

from __future__ import annotations

import codecs
import csv
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PLACEHOLDER, TOO_LONG, TaskConfig
from .errors import SoftPromptError


class Records(list):
    """Rows read from one file (a list of dicts) that remember the file and the line each row starts on (`unit`
    "line"), or their row number in a table ("row", tables.py), so problems found later, while encoding, can name
    them. `class_labels`: a table's ClassLabel columns, each with its names in index order (tables.py), which
    `Task.encode` checks against the label words. Slices keep all of it."""

    def __init__(self, rows: list[dict], path: str | Path, lines: list[int], unit: str = "line",
                 class_labels: dict[str, list[str]] | None = None):  # fmt: skip
        super().__init__(rows)
        self.path, self.lines, self.unit = str(path), list(lines), unit
        self.class_labels = dict(class_labels or {})

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Records(list.__getitem__(self, index), self.path, self.lines[index], self.unit, self.class_labels)
        return list.__getitem__(self, index)

    def where(self, i: int) -> str:
        if self.unit == "row":  # a table's row number is its example number
            return f"{self.path}, row {self.lines[i]}"
        return f"{self.path}, line {self.lines[i]} (example {i + 1})"


def read_records(path: str | Path) -> Records:
    """Rows of a JSONL (.jsonl/.json, one object per line) or CSV/TSV file, as dicts of strings and values; or of a
    Parquet file or a folder written by `datasets`' save_to_disk (tables.py, with pyarrow).
    CSV/TSV: the first line names the fields; a row with more values than the header, or broken quoting (a quote
    never closed, text right after a closing quote), is refused with its line rather than read shifted."""
    path = Path(path)
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".parquet"):
        from .tables import read_table

        return read_table(path)
    if not path.is_file():
        raise SoftPromptError(f"Data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".json", ".ndjson"):
        raise SoftPromptError(f"{path}: unknown data format {suffix!r}; use .jsonl, .csv, .tsv or .parquet, or a "
                              "folder written by datasets' save_to_disk.")  # fmt: skip
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # tolerate a byte-order mark
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        # Decoded whole, so the offset is the file's own (a streaming reader gives it within its current chunk).
        at = bom + error.start
        line = raw[:at].count(b"\n") + 1
        raise SoftPromptError(
            f"{path}, line {line}: not UTF-8 text (byte {at}: {error.reason}); save the file as UTF-8."
        ) from None
    records, lines = [], []
    if suffix in (".csv", ".tsv"):
        # strict: broken quoting is an error, not a field that silently swallows the following lines
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",",
                                strict=True)  # fmt: skip
        end = 1  # the header's last line; a quoted field may span lines, so a row starts after the last
        try:
            for row in reader:
                if None in row:  # DictReader's key for values beyond the header
                    raise SoftPromptError(
                        f"{path}, line {end + 1}: {len(reader.fieldnames) + len(row[None])} values, but the header "
                        f"names {len(reader.fieldnames)} ({', '.join(reader.fieldnames)}); quote a value that "
                        f"holds the delimiter ({'a tab' if suffix == '.tsv' else 'a comma'})."
                    )
                records.append(row)
                lines.append(end + 1)
                end = reader.line_num
        except csv.Error as error:
            raise SoftPromptError(
                f"{path}, line {end + 1}: malformed {suffix[1:].upper()} ({error}); a quoted value must end with a "
                'quote, and a quote inside it is written twice ("").'
            ) from None
    else:
        for number, line in enumerate(io.StringIO(text, newline=""), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SoftPromptError(
                    f"{path}, line {number}, column {error.colno}: not valid JSON ({error.msg}). "
                    "Each line must hold one JSON object."
                ) from None
            if not isinstance(record, dict):
                raise SoftPromptError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
            records.append(record)
            lines.append(number)
    if not records:
        raise SoftPromptError(f"{path} holds no examples: the data set is empty.")
    return Records(records, path, lines)


def fill(template: str, record: dict) -> str:
    return PLACEHOLDER.sub(lambda m: str(record[m.group(1)]), template)


@dataclass
class Example:
    """One encoded record."""

    input_ids: list[int]
    """The formatted input, tokenized with the tokenizer's defaults."""
    target_ids: list[int]
    """Tokens that carry the loss: the gold label word, or the target text followed by EOS."""
    label: int | None = None
    """Gold label index (classification)."""
    target: str | None = None
    """Gold target text (generation)."""


class Task:
    """A TaskConfig bound to a tokenizer: formats, tokenizes and checks records."""

    def __init__(
        self, config: TaskConfig, tokenizer, max_length: int = 512, too_long: str = "truncate",
        context: int | None = None, virtual_tokens: int = 0,
    ):
        """`too_long`: an example longer than the limit has its input cut from the left with a warning
        ("truncate"), or the data is refused ("refuse"). `context`: positions the model attends over
        (max_position_embeddings); the virtual tokens take `virtual_tokens` of them, and max_length is capped
        to what is left."""
        if too_long not in TOO_LONG:
            raise SoftPromptError(f"too_long {too_long!r} is not one of {', '.join(TOO_LONG)}")
        self.config = config
        self.tokenizer = tokenizer
        self.too_long = too_long
        self.max_length, self.limit_reason = max_length, f"max_length {max_length}"
        if context is not None:
            room = context - virtual_tokens
            if room < 2:
                raise SoftPromptError(
                    f"{virtual_tokens} virtual tokens leave no room for an example in the model's context of "
                    f"{context} positions; use fewer (--num-tokens)."
                )
            if room < max_length:
                self.max_length = room
                self.limit_reason = (
                    f"max_length {max_length} capped by the model's context: {context} positions minus "
                    f"{virtual_tokens} virtual tokens"
                )
        # Each label word is tokenized on its own, with a leading space and no special tokens.
        self.label_ids = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in config.labels]

    @property
    def is_classification(self) -> bool:
        return self.config.task == "classification"

    def input_ids(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]

    def target_ids(self, target: str) -> list[int]:
        ids = self.tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]
        return ids + [self.tokenizer.eos_token_id]

    def label_index(self, value) -> int:
        """A record's label: one of the label words, or its index."""
        text = str(value).strip()
        if text in self.config.labels:
            return self.config.labels.index(text)
        if text.isdigit() and int(text) < len(self.config.labels):
            return int(text)
        raise KeyError(text)

    def _check_class_labels(self, records: list[dict], source: str) -> None:
        """A ClassLabel label column holds indices into its own names, which `label_index` reads as indices into the
        label words: unless both are the same words in the same order, every label would silently be another."""
        c = self.config
        names = getattr(records, "class_labels", {}).get(c.label_field)
        if names is None or names == c.labels:
            return
        differ = "the same words in another order" if sorted(names) == sorted(c.labels) else "other words"
        raise SoftPromptError(
            f"{source}: the label field {c.label_field!r} is a ClassLabel column whose names are {names}, "
            f"{differ} than the label words {c.labels}; its indices count in the column's order, so they would name "
            f"the wrong words. Give the column's names as the label words, in its order (--labels "
            f"{','.join(names)}), or rename or reorder the column's classes in the data (datasets: "
            "Dataset.cast_column or Dataset.align_labels_with_mapping)."
        )

    def _absent_fields(self, records: list[dict], source: str, require_targets: bool = True) -> list[str]:
        """A field that no record has is a mistake in the template or the options, not in the data: one line
        for it instead of one per example."""
        c = self.config
        present = {key for record in records for key in record if key is not None}
        seen = ", ".join(sorted(map(str, present)))
        problems = []
        for name in dict.fromkeys(c.fields):
            if name not in present:
                problems.append(
                    f"{source}: the template {c.template!r} names the field {{{name}}}, but no record has it "
                    f"(the records have: {seen})"
                )
        option = "--label-field" if self.is_classification else "--target-field"
        name = c.label_field if self.is_classification else c.target_field
        if require_targets and name not in present and name not in c.fields:
            problems.append(f"{source}: {option} {name!r} names a field no record has (the records have: {seen})")
        return problems

    def encode(self, records: list[dict], source: str = "data", require_targets: bool = True) -> list[Example]:
        """Encode all records, collecting every problem into one message. `records` from read_records know
        their file and lines, which the messages then name. Without `require_targets` a record may lack its label
        or target field (distillation's unlabelled data): its example then has no target_ids."""
        source = records.path if isinstance(records, Records) else source
        where = records.where if isinstance(records, Records) else lambda i: f"{source}, example {i + 1}"
        if not records:
            raise SoftPromptError(f"{source} holds no examples: the data set is empty.")
        if self.is_classification:
            self._check_class_labels(records, source)
        absent = self._absent_fields(records, source, require_targets)  # stated first, above the examples lacking them
        problems, examples, too_long = [], [], []
        c = self.config
        gold = c.label_field if self.is_classification else c.target_field
        needed = c.fields + ([gold] if require_targets else [])
        for i, record in enumerate(records):
            missing = list(dict.fromkeys(f for f in needed if f not in record or record[f] is None))
            if missing:
                problems.append(f"{where(i)}: missing field(s) {', '.join(missing)}")
                continue
            ids = self.input_ids(fill(c.template, record))
            if not ids:
                problems.append(f"{where(i)}: the template gives an empty input")
                continue
            if record.get(gold) is None:  # only where targets are optional
                example = Example(ids, [])
            elif self.is_classification:
                try:
                    label = self.label_index(record[c.label_field])
                except KeyError as error:
                    problems.append(
                        f"{where(i)}: label {error.args[0]!r} in field {c.label_field!r} "
                        f"is not among the label words {c.labels} (or their indices)"
                    )
                    continue
                example = Example(ids, self.label_ids[label], label=label)
            else:
                target = str(record[c.target_field])
                example = Example(ids, self.target_ids(target), target=target)
            room = self.max_length - len(example.target_ids)
            if room < 1:
                field = c.label_field if self.is_classification else c.target_field
                problems.append(
                    f"{where(i)}: the target of field {field!r} alone takes {len(example.target_ids)} "
                    f"tokens, leaving no room for the input within {self.limit_reason}"
                )
                continue
            if len(ids) > room:
                too_long.append(f"{where(i)}: {len(ids) + len(example.target_ids)} tokens")
                example.input_ids = ids[len(ids) - room :]  # keep the end, next to the answer
            examples.append(example)
        sections = absent + ([_listed(problems, "\n  - ")] if problems else [])
        if too_long and self.too_long == "refuse":
            sections.append(
                f"{len(too_long)} example(s) longer than {self.max_length} tokens ({self.limit_reason}); "
                "shorten them, raise --max-length, or pass --too-long truncate to cut their inputs:\n    "
                + _listed(too_long, "\n    ")
            )
        if sections:
            raise SoftPromptError("Problems in the data:\n  - " + "\n  - ".join(sections))
        if too_long:
            warnings.warn(
                f"{source}: {len(too_long)} example(s) longer than {self.max_length} tokens ({self.limit_reason}) "
                f"had their input cut from the left to fit: {_listed(too_long, '; ')}",
                stacklevel=2,
            )
        return examples


def _listed(items: list[str], sep: str, cap: int = 10) -> str:
    return sep.join(items[:cap] + ([f"... and {len(items) - cap} more"] if len(items) > cap else []))


@dataclass
class Batch:
    """Right-padded training rows plus where the loss is read."""

    input_ids: torch.Tensor
    """(B, T) input followed by target tokens, right-padded."""
    attention_mask: torch.Tensor
    """(B, T) 1 for real tokens."""
    loss_rows: torch.Tensor
    """(K,) row of each target token."""
    loss_positions: torch.Tensor
    """(K,) position whose hidden state predicts that token (the one before it)."""
    loss_tokens: torch.Tensor
    """(K,) the target token ids."""
    num_input_tokens: int
    """Real (non-pad) tokens in the batch, for throughput."""

    def to(self, device) -> "Batch":
        return Batch(*(t.to(device) if isinstance(t, torch.Tensor) else t for t in vars(self).values()))


def collate(examples: list[Example], pad_id: int) -> Batch:
    rows = [e.input_ids + e.target_ids for e in examples]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    loss_rows, loss_positions, loss_tokens = [], [], []
    for i, (row, example) in enumerate(zip(rows, examples)):
        input_ids[i, : len(row)] = torch.tensor(row)
        attention_mask[i, : len(row)] = 1
        start = len(example.input_ids)
        for j, token in enumerate(example.target_ids):
            loss_rows.append(i)
            loss_positions.append(start + j - 1)
            loss_tokens.append(token)
    as_tensor = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return Batch(
        input_ids, attention_mask, as_tensor(loss_rows), as_tensor(loss_positions), as_tensor(loss_tokens),
        int(attention_mask.sum()),
    )
