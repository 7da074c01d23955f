"""Scoring with a prefix: verbalizer log-probabilities for classification, decoding for generation."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from . import metrics
from .backbones import Backbone
from .data import Batch, Example, Task, collate


def position_logprobs(
    backbone: Backbone, batch: Batch, prefix: torch.Tensor | None, prefix_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Full-vocabulary log-probabilities at the batch's loss positions, (K, vocab); the LM head runs only there.
    prefix: shared (5-D) or per row (6-D, with `prefix_mask` from `Backbone.stack_prefixes`)."""
    batch = batch.to(backbone.device)
    return backbone.logits(backbone.target_hidden(batch, prefix, prefix_mask)).log_softmax(-1)


def token_logprobs(
    backbone: Backbone, batch: Batch, prefix: torch.Tensor | None, prefix_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(token) of each of the batch's loss tokens, (K,)."""
    logprobs = position_logprobs(backbone, batch, prefix, prefix_mask)
    return logprobs.gather(-1, batch.loss_tokens.to(logprobs.device)[:, None]).squeeze(-1)


def target_logprobs(
    backbone: Backbone, rows: list[Example], prefix: torch.Tensor | None, prefix_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Each row's summed log-probability of its target tokens after its input, (rows,): the one label scorer that
    evaluation, mixed batches and ensembles share (a row per input and label word)."""
    batch = collate(rows, backbone.pad_id)
    logprobs = token_logprobs(backbone, batch, prefix, prefix_mask)  # (K,) one per target token
    return logprobs.new_zeros(len(rows)).index_add_(0, batch.loss_rows.to(logprobs.device), logprobs)


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


@torch.no_grad()
def label_scores(
    backbone: Backbone, task: Task, examples: list[Example], prefix=None, batch_size: int = 32, progress: bool = False
) -> torch.Tensor:
    """(N, num_labels): each label's summed token log-probability after each example's input."""
    pad = backbone.pad_id
    num_labels = len(task.label_ids)
    examples, restore = length_sorted(examples)
    if all(len(ids) == 1 for ids in task.label_ids):
        # Single-token label words: one row per example, every label read from the same next-token distribution.
        words = torch.tensor([ids[0] for ids in task.label_ids])
        scores = []
        for chunk in batches(examples, batch_size, progress, "scoring"):
            batch = collate([Example(e.input_ids, [int(words[0])]) for e in chunk], pad)
            scores.append(position_logprobs(backbone, batch, prefix)[:, words.to(backbone.device)].cpu())
        return torch.cat(scores)[restore]  # (examples, labels)
    scores = []
    for chunk in batches(examples, max(1, batch_size // num_labels), progress, "scoring"):
        # One row per (example, label word), summing the log-probabilities of the label's tokens.
        rows = [Example(e.input_ids, ids) for e in chunk for ids in task.label_ids]
        scores.append(target_logprobs(backbone, rows, prefix).view(len(chunk), num_labels).cpu())  # (examples, labels)
    return torch.cat(scores)[restore]


@torch.no_grad()
def mean_loss(backbone: Backbone, examples: list[Example], prefix=None, batch_size: int = 16) -> float:
    """Teacher-forced cross-entropy per target token."""
    total, count = 0.0, 0
    for chunk in batches(examples, batch_size, False, ""):
        logprobs = token_logprobs(backbone, collate(chunk, backbone.pad_id), prefix)
        total, count = total - float(logprobs.sum()), count + logprobs.numel()
    return total / count


def classification_result(examples: list[Example], scores: torch.Tensor) -> dict:
    """Accuracy, macro-F1 and the gold label's mean log-probability from `label_scores` (N, num_labels)."""
    golds = [e.label for e in examples]
    result = metrics.classification(golds, scores.argmax(-1).tolist(), scores.shape[-1])
    # mean log-probability of the gold label: a smooth tie-breaker for model selection
    result["gold_logprob"] = float(scores[torch.arange(len(golds)), golds].mean())
    return result


def evaluate(
    backbone: Backbone,
    task: Task,
    examples: list[Example],
    prefix=None,
    batch_size: int = 32,
    progress: bool = False,
    max_new_tokens: int | None = None,
) -> dict:
    """The task's metrics on `examples` with an optional prefix (None: the base model with the template alone)."""
    if task.is_classification:
        return classification_result(examples, label_scores(backbone, task, examples, prefix, batch_size, progress))
    from .generate import decode_new, generate

    limit = max_new_tokens or max(len(e.target_ids) for e in examples) + 8
    hypotheses = []
    ordered, restore = length_sorted(examples)
    for chunk in batches(ordered, batch_size, progress, "generating"):
        outputs = generate(backbone, [e.input_ids for e in chunk], prefix, max_new_tokens=limit)
        hypotheses += [decode_new(backbone.tokenizer, ids) for ids in outputs]
    hypotheses = [hypotheses[restore[i]] for i in range(len(examples))]
    result = metrics.generation([e.target for e in examples], hypotheses)
    result["loss"] = mean_loss(backbone, examples, prefix)
    return result
