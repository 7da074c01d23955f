"""The classification and generation tasks of `defaults.py` (and `after_input.py`), built from real data in PyPI
packages: records, template, labels or target, and the model a task runs on."""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable

from softprompt.config import TaskConfig
from softprompt.data.corpora import (debate_party, english_chinese, moral_foundation, pinyin_tones, review_or_plot,
                                     rotten_tomatoes)


def balanced(records: list[dict], field: str, per_label: int, seed: int = 0) -> list[dict]:
    by_label: dict[str, list[dict]] = {}
    for r in records:
        by_label.setdefault(r[field], []).append(r)
    rng, picked = random.Random(seed), []
    for group in by_label.values():
        picked += rng.sample(group, min(per_label, len(group)))
    rng.shuffle(picked)
    return picked


def shuffled(records: list[dict], seed: int = 0) -> list[dict]:
    random.Random(seed).shuffle(records)
    return records


@dataclasses.dataclass(frozen=True)
class Task:
    """A benchmark task: its records, template and labels (or target), the model it runs on (None: --model), and
    how many tokens every column may decode when scored (generation: greedy, ending at the end of the line or EOS,
    the translation demo's rule)."""

    load: Callable[[], list[dict]]
    config: TaskConfig
    model: str | None = None
    max_new_tokens: int = 24


TASKS = {
    "sentiment": Task(lambda: balanced(rotten_tomatoes(), "label", 2000),
                      TaskConfig(template="Review: {text}\nSentiment:", labels=["negative", "positive"],
                                 label_field="label")),
    "review-or-plot": Task(lambda: balanced(review_or_plot(), "kind", 1083),
                           TaskConfig(template="Text: {text}\nIs this a review or a summary? Answer:",
                                      labels=["review", "summary"], label_field="kind")),
    "debate-party": Task(lambda: balanced(debate_party(), "party", 224),
                         TaskConfig(template="Debate statement: {text}\nParty of the speaker:",
                                    labels=["Democrat", "Republican"], label_field="party")),
    "moral-foundation": Task(lambda: shuffled(moral_foundation()),
                             TaskConfig(template="Word: {word}\nMoral foundation (care, fairness, loyalty, authority "
                                                 "or sanctity):", label_field="foundation",
                                        labels=["care", "fairness", "loyalty", "authority", "sanctity"])),
    "translation": Task(lambda: shuffled(english_chinese()),
                        TaskConfig(template="English: {en}\nChinese:", task="generation", target_field="zh"),
                        "gemma3-270m"),
    "pinyin-tones": Task(lambda: shuffled(pinyin_tones()),
                         TaskConfig(template="Pinyin: {marks}\nWith tone numbers:", task="generation",
                                    target_field="numbers"), max_new_tokens=48),  # its longest answer: 43 tokens
}  # fmt: skip


def splits(records: list[dict], test: int, valid: int) -> dict[str, list[dict]]:
    return {"test": records[:test], "valid": records[test : test + valid], "train": records[test + valid :]}
