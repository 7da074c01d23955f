"""Prompt ensembles (Lester et al. 2021, section 7): several prompts for one task on one frozen model, scored in one
mixed batch (each example repeated once per member, each row carrying its member's prompt input) and combined by
majority vote or by the mean of the label probabilities."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from . import metrics
from ..backbones import Backbone
from ..data import Example, TaskEncoder
from ..errors import SoftPromptError
from .evaluate import in_length_order, label_metrics
from .mixed import stack
from .scorer import label_logprobs, rows_per_input

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
    task: TaskEncoder,
    examples: list[Example],
    prompt_inputs: list[torch.Tensor | None],
    batch_size: int = 32,
    progress: bool = False,
) -> torch.Tensor:
    """(members, N, num_labels): each label's summed token log-probability after each example, under each member's
    prompt input (None: the bare template). One forward per chunk covers every member: a row per (example, member)
    for `label_logprobs`."""
    if not task.is_classification:
        raise SoftPromptError("an ensemble combines label choices: it needs a classification task (--labels).")
    if not prompt_inputs:
        raise SoftPromptError("an ensemble needs at least one prompt")
    members = len(prompt_inputs)
    stacked, stacked_mask = stack(backbone, prompt_inputs)  # one per member, left-padded; None without any prompt

    def score(chunk: list[Example]) -> torch.Tensor:
        inputs = [e.input_ids for e in chunk for _ in range(members)]
        owner = torch.arange(members, device=backbone.device).repeat(len(chunk))  # member of each input
        prompt = (None, None) if stacked is None else (stacked[owner], stacked_mask[owner])
        return label_logprobs(backbone, inputs, task.label_ids, *prompt).view(len(chunk), members, -1)

    size = max(1, batch_size // (members * rows_per_input(task.label_ids)))
    scores = in_length_order(examples, size, score, progress, "scoring ensemble")  # (N, members, labels)
    return scores.transpose(0, 1).contiguous()  # (members, N, labels)


def check_combine(how: str) -> None:
    if how not in COMBINE:
        raise SoftPromptError(f"combine {how!r} is not one of {', '.join(COMBINE)}")


def label_probabilities(scores: torch.Tensor) -> torch.Tensor:
    """Label log-probabilities -> probabilities normalized over the label words, same shape."""
    return scores.softmax(-1)


def combine(scores: torch.Tensor, how: Literal["vote", "mean"]) -> torch.Tensor:
    """(members, N, labels) scores -> (N,) predicted label indices.

    mean: argmax of the members' mean label probability. vote: the label most members pick; a tie goes to the tied
    label with the highest mean probability."""
    check_combine(how)
    mean = label_probabilities(scores).mean(0)  # (N, labels)
    if how == "mean":
        return mean.argmax(-1)
    votes = torch.zeros_like(mean).scatter_add_(  # (N, labels) how many members chose each label
        -1, scores.argmax(-1).T, torch.ones(scores.shape[1], scores.shape[0], dtype=mean.dtype, device=mean.device)
    )
    tied = votes == votes.max(-1, keepdim=True).values
    return mean.masked_fill(~tied, -1.0).argmax(-1)


def evaluate_ensemble(
    backbone: Backbone,
    task: TaskEncoder,
    examples: list[Example],
    prompt_inputs: list[torch.Tensor | None],
    how: Literal["vote", "mean"] = "vote",
    batch_size: int = 32,
    progress: bool = False,
) -> EnsembleResult:
    """Each member's metrics and the ensemble's, from one pass of mixed batches."""
    check_combine(how)  # before the scoring pass, not after it
    scores = member_scores(backbone, task, examples, prompt_inputs, batch_size, progress)
    return summarize(scores, [e.label for e in examples], how)


def summarize(scores: torch.Tensor, golds: list[int], how: Literal["vote", "mean"]) -> EnsembleResult:
    """Metrics of each member and of the ensemble from (members, N, labels) scores; one scoring pass can be
    summarized under several combination rules."""
    gold_index = torch.arange(len(golds), device=scores.device), torch.tensor(golds, device=scores.device)
    members = [label_metrics(golds, member) for member in scores]
    ensemble = metrics.classification(golds, combine(scores, how).tolist(), scores.shape[-1])
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
