"""Our calls into transformers use the names of the installed version: no deprecation warning (Python's FutureWarning
or DeprecationWarning, or transformers' own logged "deprecated" notice) comes out of our forward, scoring,
generation and training paths. `scripts/compat.sh` runs this file at both ends of the supported range."""

from __future__ import annotations

import logging
import warnings
from contextlib import contextmanager

import pytest
import transformers

from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import TaskEncoder
from softprompt.scoring.evaluate import label_scores
from softprompt.scoring.generate import generate
from softprompt.training.loop import train

from conftest import random_prompt, tiny_backbone
from test_backbones_seq2seq import tiny_seq2seq


@contextmanager
def no_deprecations():
    """Turns deprecation warnings into errors and fails on transformers' logged deprecation notices."""
    notices: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "deprecat" in record.getMessage().lower():
                notices.append(record.getMessage())

    logger = transformers.utils.logging.get_logger("transformers")
    handler = Collect(level=logging.WARNING)
    logging.Logger.warning_once.cache_clear()  # transformers logs each notice once per process: let it log again
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            yield
    finally:
        logger.removeHandler(handler)
    assert not notices, notices


RECORDS = [{"text": f"the movie was {word}", "label": label} for word, label in
           [("great", "positive"), ("bad", "negative"), ("fun", "positive"), ("awful", "negative")] * 2]  # fmt: skip


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("arch, checkpointing", [("llama", False), ("llama", True), ("gpt2", True), ("t5", False)])
def test_our_paths_raise_no_deprecation(tmp_path, arch, method, checkpointing):
    """T5 without checkpointing: encoder-decoder models refuse it (test_backbones_seq2seq checks the message)."""
    backbone = tiny_seq2seq() if arch == "t5" else tiny_backbone(arch)
    backbone.gradient_checkpointing(checkpointing)
    task = TaskEncoder(TaskConfig(template="review {text} sentiment", labels=["negative", "positive"], label_field="label"),
                backbone.tokenizer)  # fmt: skip
    examples = task.encode(RECORDS, "train")
    with no_deprecations():
        prompt = random_prompt(backbone, method)
        prefix = prompt.kv(backbone)
        label_scores(backbone, task, examples, prefix)
        generate(backbone, [e.input_ids for e in examples[:3]], prefix, max_new_tokens=3)
        config = PromptConfig(method=method, num_tokens=4, init="random")
        train(backbone, task, config, TrainConfig(steps=2, batch_size=4, lr=0.01, warmup_steps=0, eval_every=0),
              examples, tmp_path, progress=False)  # fmt: skip
