"""Records -> token ids with a loss mask: reading JSONL/CSV, templates, the verbalizer, collation."""

from __future__ import annotations

import csv
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import PLACEHOLDER, TaskConfig
from .errors import SoftPromptError


def read_records(path: str | Path) -> list[dict]:
    """Rows of a JSONL (.jsonl/.json, one object per line) or CSV/TSV file, as dicts of strings and values."""
    path = Path(path)
    if not path.is_file():
        raise SoftPromptError(f"Data file {path} does not exist.")
    suffix = path.suffix.lower()
    with path.open(encoding="utf-8-sig", newline="") as f:  # -sig: tolerate a byte-order mark
        if suffix in (".csv", ".tsv"):
            records = list(csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ","))
        elif suffix in (".jsonl", ".json", ".ndjson"):
            records = []
            for number, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as error:
                    raise SoftPromptError(
                        f"{path}, line {number}: not valid JSON ({error.msg}). Each line must hold one JSON object."
                    ) from None
                if not isinstance(record, dict):
                    raise SoftPromptError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
                records.append(record)
        else:
            raise SoftPromptError(f"{path}: unknown data format {suffix!r}; use .jsonl, .csv or .tsv.")
    if not records:
        raise SoftPromptError(f"{path} holds no examples.")
    return records


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

    def __init__(self, config: TaskConfig, tokenizer, max_length: int = 512):
        self.config = config
        self.tokenizer = tokenizer
        self.max_length = max_length
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

    def encode(self, records: list[dict], source: str = "data") -> list[Example]:
        """Encode all records, collecting every problem into one message."""
        problems, examples, truncated = [], [], 0
        c = self.config
        needed = c.fields + [c.label_field if self.is_classification else c.target_field]
        for number, record in enumerate(records, start=1):
            missing = [f for f in needed if f not in record or record[f] is None]
            if missing:
                problems.append(f"{source}, example {number}: missing field(s) {', '.join(missing)}")
                continue
            ids = self.input_ids(fill(c.template, record))
            if not ids:
                problems.append(f"{source}, example {number}: the template gives an empty input")
                continue
            if self.is_classification:
                try:
                    label = self.label_index(record[c.label_field])
                except KeyError as error:
                    problems.append(
                        f"{source}, example {number}: label {error.args[0]!r} in field {c.label_field!r} "
                        f"is not among the label words {c.labels} (or their indices)"
                    )
                    continue
                example = Example(ids, self.label_ids[label], label=label)
            else:
                target = str(record[c.target_field])
                example = Example(ids, self.target_ids(target), target=target)
            room = self.max_length - len(example.target_ids)
            if room < 1:
                problems.append(
                    f"{source}, example {number}: the target alone takes {len(example.target_ids)} tokens, "
                    f"no room for the input within max_length {self.max_length}; raise --max-length"
                )
                continue
            if len(ids) > room:
                truncated += 1
                example.input_ids = ids[len(ids) - room :]  # keep the end, next to the answer
            examples.append(example)
        if problems:
            shown = problems[:10] + ([f"... and {len(problems) - 10} more"] if len(problems) > 10 else [])
            raise SoftPromptError("Problems in the data:\n  - " + "\n  - ".join(shown))
        if not examples:
            raise SoftPromptError(f"{source} holds no examples.")
        if truncated:
            warnings.warn(f"{source}: {truncated} example(s) longer than {self.max_length} tokens were truncated.")
        return examples


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
