"""A data set scored with a prompt input (a K/V prefix or soft tokens; None: the bare template) in length-sorted
chunks: label scores and metrics for classification, decoding and metrics for generation."""

from __future__ import annotations

from typing import Callable

import torch
from tqdm.auto import tqdm

from . import metrics
from ..backbones import Backbone
from ..data import Example, TaskEncoder, collate
from .generate import decode_new, generate
from .scorer import label_logprobs, rows_per_input, token_logprobs


def batches(items: list, size: int, progress: bool, desc: str):
    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=desc, disable=not progress, leave=False):
        yield items[start : start + size]


def length_sorted(examples: list[Example]) -> tuple[list[Example], list[int]]:
    """Examples ordered by length (less padding per batch) and the permutation that restores the input order."""
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    restore = [0] * len(order)
    for position, i in enumerate(order):
        restore[i] = position
    return [examples[i] for i in order], restore


def in_length_order(examples: list[Example], size: int, score: Callable[[list[Example]], torch.Tensor],
                    progress: bool = False, desc: str = "scoring") -> torch.Tensor:  # fmt: skip
    """`score(chunk)` over chunks of at most `size` examples taken in length order, its (chunk, ...) results on the
    CPU and back in the examples' order along the first dimension."""
    ordered, restore = length_sorted(examples)
    return torch.cat([score(chunk).cpu() for chunk in batches(ordered, size, progress, desc)])[restore]


def generate_in_order(backbone: Backbone, examples: list[Example], prompt_input: torch.Tensor | None,
                      max_new_tokens: int, batch_size: int = 32, progress: bool = False,
                      desc: str = "generating", stop: list[str] | None = None) -> list[list[int]]:  # fmt: skip
    """`generate`'s greedy new token ids after each example's input (each row ending at EOS, `max_new_tokens` or a
    `stop` string), decoded in length-sorted chunks, in the examples' order."""
    ordered, restore = length_sorted(examples)
    outputs = []
    for chunk in batches(ordered, batch_size, progress, desc):
        outputs += generate(backbone, [e.input_ids for e in chunk], prompt_input, max_new_tokens=max_new_tokens,
                            stop=stop)  # fmt: skip
    return [outputs[restore[i]] for i in range(len(examples))]


@torch.no_grad()
def label_scores(
    backbone: Backbone,
    task: TaskEncoder,
    examples: list[Example],
    prompt_input: torch.Tensor | None = None,
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """(N, num_labels): each label's summed token log-probability after each example's input (`label_logprobs`)."""
    def score(chunk: list[Example]) -> torch.Tensor:
        return label_logprobs(backbone, [e.input_ids for e in chunk], task.label_ids, prompt_input)

    size = max(1, batch_size // rows_per_input(task.label_ids))
    return in_length_order(examples, size, score, progress)  # (examples, labels)


@torch.no_grad()
def mean_loss(backbone: Backbone, examples: list[Example], prompt_input: torch.Tensor | None = None,
              batch_size: int = 16) -> float:  # fmt: skip
    """Teacher-forced cross-entropy per target token."""
    total, count = 0.0, 0
    for chunk in batches(examples, batch_size, False, ""):
        logprobs = token_logprobs(backbone, collate(chunk, backbone.pad_id), prompt_input)
        total, count = total - float(logprobs.sum()), count + logprobs.numel()
    return total / count


def label_metrics(golds: list[int], scores: torch.Tensor) -> dict:
    """Accuracy, macro-F1 and the gold label's mean log-probability from label scores (N, num_labels)."""
    result = metrics.classification(golds, scores.argmax(-1).tolist(), scores.shape[-1])
    # mean log-probability of the gold label: a smooth tie-breaker for model selection
    result["gold_logprob"] = float(scores[torch.arange(len(golds), device=scores.device), golds].mean())
    return result


def classification_result(examples: list[Example], scores: torch.Tensor) -> dict:
    """`label_metrics` of the examples' gold labels and their `label_scores` (N, num_labels)."""
    return label_metrics([e.label for e in examples], scores)


def evaluate(
    backbone: Backbone,
    task: TaskEncoder,
    examples: list[Example],
    prompt_input: torch.Tensor | None = None,
    batch_size: int = 32,
    progress: bool = False,
    max_new_tokens: int | None = None,
    outputs: list | None = None,
    stop: list[str] | None = None,
) -> dict:
    """The task's metrics on `examples` with an optional prompt input (None: the base model with the template
    alone). `outputs`, when given, gets what the metrics were computed from, one per example in their order: the
    predicted label index (classification) or the greedy decoded text (generation). A generation ends at EOS,
    `max_new_tokens` (default: the longest target's length and 8) or a `stop` string (cut before it)."""
    if task.is_classification:
        scores = label_scores(backbone, task, examples, prompt_input, batch_size, progress)
        if outputs is not None:
            outputs.extend(scores.argmax(-1).tolist())
        return classification_result(examples, scores)
    limit = max_new_tokens or max(len(e.target_ids) for e in examples) + 8
    generated = generate_in_order(backbone, examples, prompt_input, limit, batch_size, progress, stop=stop)
    hypotheses = [decode_new(backbone.tokenizer, ids, stop) for ids in generated]
    if outputs is not None:
        outputs.extend(hypotheses)
    result = metrics.generation([e.target for e in examples], hypotheses)
    result["loss"] = mean_loss(backbone, examples, prompt_input)
    return result
