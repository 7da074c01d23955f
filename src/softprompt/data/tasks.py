"""A task: a template and label words (or a target field) bound to a tokenizer, turning records into `Example`s."""

from __future__ import annotations

import warnings

from ..config import PLACEHOLDER, TOO_LONG, TaskConfig
from ..errors import SoftPromptError
from .batches import Example
from .records import Records


def fill(template: str, record: dict) -> str:
    return PLACEHOLDER.sub(lambda m: str(record[m.group(1)]), template)



class TaskEncoder:
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
