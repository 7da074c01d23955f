"""Prompt ensembles (Lester et al. 2021, section 7): several prompts for one task on one frozen model, scored in one
mixed batch (each example repeated once per member, each row carrying its member's prefix) and combined by majority
vote or by the mean of the label probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from . import metrics
from .backbones import Backbone
from .data import Example, Task, collate
from .errors import SoftPromptError
from .evaluate import batches, length_sorted, position_logprobs, target_logprobs

COMBINE = ("vote", "mean")


@dataclass
class EnsembleResult:
    members: list[dict]
    """Each member's metrics on its own, in the order given."""
    ensemble: dict
    """The combined prediction's metrics."""
    combine: str


@torch.no_grad()
def member_scores(
    backbone: Backbone,
    task: Task,
    examples: list[Example],
    prefixes: list[torch.Tensor | None],
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """(members, N, num_labels): each label's summed token log-probability after each example, under each member's
    prefix (None: the bare template). One forward per chunk covers every member: row = (example, member[, label])."""
    if not task.is_classification:
        raise SoftPromptError("an ensemble combines label choices: it needs a classification task (--labels).")
    if not prefixes:
        raise SoftPromptError("an ensemble needs at least one prompt")
    members, num_labels = len(prefixes), len(task.label_ids)
    stacked, stacked_mask = backbone.stack_prefixes(prefixes)  # (M, layers, 2, kv, n, head_dim), (M, n)
    if stacked.shape[-2] == 0:  # no member has a prompt: no prefix at all
        stacked = stacked_mask = None
    single = all(len(ids) == 1 for ids in task.label_ids)
    per_example = members * (1 if single else num_labels)  # rows each example takes
    pad = backbone.pad_id
    ordered, restore = length_sorted(examples)
    words = torch.tensor([ids[0] for ids in task.label_ids], device=backbone.device)  # first token of each label
    chunks = []
    for chunk in batches(ordered, max(1, batch_size // per_example), progress, "scoring ensemble"):
        if single:
            # One row per (example, member): every label is read from the same next-token distribution.
            rows = [Example(e.input_ids, [int(words[0])]) for e in chunk for _ in range(members)]
            owner = torch.arange(members, device=backbone.device).repeat(len(chunk))  # member of each row
            logprobs = position_logprobs(backbone, collate(rows, pad), *_rows_of(stacked, stacked_mask, owner))
            scores = logprobs[:, words].view(len(chunk), members, num_labels)
        else:
            # One row per (example, member, label word), summing the label's token log-probabilities.
            rows = [Example(e.input_ids, ids) for e in chunk for _ in range(members) for ids in task.label_ids]
            owner = torch.arange(members, device=backbone.device).repeat_interleave(num_labels).repeat(len(chunk))
            per_row = target_logprobs(backbone, rows, *_rows_of(stacked, stacked_mask, owner))  # (rows,)
            scores = per_row.view(len(chunk), members, num_labels)
        chunks.append(scores.cpu())
    return torch.cat(chunks)[restore].transpose(0, 1).contiguous()  # (members, N, labels)


def _rows_of(stacked, mask, owner):
    """Each row's prefix and prefix mask, picked from the members' by `owner` (None when there is no prefix)."""
    return (None, None) if stacked is None else (stacked[owner], mask[owner])


def label_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Label log-probabilities -> probabilities normalized over the label words, same shape."""
    return scores.softmax(-1)


def combine(scores: torch.Tensor, how: Literal["vote", "mean"]) -> torch.Tensor:
    """(members, N, labels) scores -> (N,) predicted label indices.

    mean: argmax of the members' mean label probability. vote: the label most members pick; a tie goes to the tied
    label with the highest mean probability."""
    if how not in COMBINE:
        raise SoftPromptError(f"combine {how!r} is not one of {', '.join(COMBINE)}")
    mean = label_probabilities(scores).mean(0)  # (N, labels)
    if how == "mean":
        return mean.argmax(-1)
    votes = torch.zeros_like(mean).scatter_add_(  # (N, labels) how many members chose each label
        -1, scores.argmax(-1).T, torch.ones(scores.shape[1], scores.shape[0], dtype=mean.dtype)
    )
    tied = votes == votes.max(-1, keepdim=True).values
    return mean.masked_fill(~tied, -1.0).argmax(-1)


def evaluate_ensemble(
    backbone: Backbone,
    task: Task,
    examples: list[Example],
    prefixes: list[torch.Tensor | None],
    how: Literal["vote", "mean"] = "vote",
    batch_size: int = 32,
    progress: bool = False,
) -> EnsembleResult:
    """Each member's metrics and the ensemble's, from one pass of mixed batches."""
    if how not in COMBINE:
        raise SoftPromptError(f"combine {how!r} is not one of {', '.join(COMBINE)}")
    scores = member_scores(backbone, task, examples, prefixes, batch_size, progress)
    return summarize(scores, [e.label for e in examples], how)


def summarize(scores: torch.Tensor, golds: list[int], how: Literal["vote", "mean"]) -> EnsembleResult:
    """Metrics of each member and of the ensemble from (members, N, labels) scores; one scoring pass can be
    summarized under several combination rules."""
    gold_index = torch.arange(len(golds)), torch.tensor(golds)
    num_labels = scores.shape[-1]
    members = []
    for member in scores:
        result = metrics.classification(golds, member.argmax(-1).tolist(), num_labels)
        result["gold_logprob"] = float(member[gold_index].mean())
        members.append(result)
    ensemble = metrics.classification(golds, combine(scores, how).tolist(), num_labels)
    ensemble["gold_prob"] = float(label_probabilities(scores).mean(0)[gold_index].mean())
    return EnsembleResult(members, ensemble, how)


def format_table(result: EnsembleResult, names: list[str]) -> str:
    """Members then the ensemble: accuracy and macro-F1."""
    rows = [(name, r) for name, r in zip(names, result.members)]
    rows.append((f"ensemble ({result.combine}, {len(names)} prompts)", result.ensemble))
    width = max(len(name) for name, _ in rows)
    lines = [f"{'prompt':<{width}}  accuracy  macro-F1"]
    lines += [f"{name:<{width}}  {r['accuracy']:8.4f}  {r['macro_f1']:8.4f}" for name, r in rows]
    return "\n".join(lines)
