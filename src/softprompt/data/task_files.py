"""The tasks file of a multi-task run (`softprompt train --tasks FILE`): one JSON object per task, keyed by its name.

    {"sentiment": {"train": "rt_train.jsonl", "valid": "rt_valid.jsonl", "template": "Review: {text}\\nSentiment:",
                   "labels": ["negative", "positive"], "label_field": "label"},
     "topic":     {"train": "topic.csv", "template": "{text}\\nTopic:", "target_field": "topic"}}

Paths are relative to the file. A task with `labels` is classification, one with only `target_field` generation.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..config import TaskConfig
from ..errors import SoftPromptError

KEYS = {"train", "valid", "template", "labels", "label_field", "target_field"}


@dataclass
class TaskFiles:
    config: TaskConfig
    train: Path
    valid: Path | None


def read_tasks_file(path: str | Path) -> dict[str, TaskFiles]:
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SoftPromptError(f"{path}: cannot read the tasks file ({error}).") from None
    if not isinstance(raw, dict) or not raw:
        raise SoftPromptError(f"{path}: expected a JSON object mapping task names to their settings.")
    specs, problems = {}, []
    for name, entry in raw.items():
        where = f"{path}, task {name!r}"
        if not isinstance(entry, dict):
            problems.append(f"{where}: expected an object with train, template and labels/target_field")
            continue
        unknown = sorted(set(entry) - KEYS)
        missing = sorted({"train", "template"} - set(entry))
        not_text = sorted(k for k in KEYS - {"labels"} if k in entry and not isinstance(entry[k], str))
        labels = entry.get("labels") or []
        if not isinstance(labels, (str, list)) or not all(isinstance(x, str) for x in labels):
            not_text.append("labels (a list of words, or one comma-separated string)")
        if unknown or missing or not_text:
            problems.append(f"{where}: " + "; ".join(
                ([f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(KEYS))})"] if unknown else [])
                + ([f"missing {', '.join(missing)}"] if missing else [])
                + ([f"not text: {', '.join(not_text)}"] if not_text else [])))  # fmt: skip
            continue
        try:
            config = TaskConfig.infer(entry["template"], labels, entry.get("label_field"), entry.get("target_field"))
        except SoftPromptError as error:
            problems.append(f"{where}: {error}")
            continue
        resolve = lambda p: p if Path(p).is_absolute() else path.parent / p  # noqa: E731
        specs[name] = TaskFiles(config, Path(resolve(entry["train"])),
                               Path(resolve(entry["valid"])) if entry.get("valid") else None)  # fmt: skip
    if problems:
        raise SoftPromptError("The tasks file has problems:\n  - " + "\n  - ".join(problems))
    return specs
