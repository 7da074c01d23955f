"""The one scorer: log-probabilities of target tokens after a prompt input, for one batch, differentiable.

Every caller that scores label words (evaluation, ensembles, the distillation teacher and student) goes through
`label_logprobs`, which picks its path itself: when every label word is one token, one row per input and every label
read from the same next-token distribution; otherwise one row per (input, label word), its tokens' log-probabilities
summed. A prompt input is what goes in front of the rows: a K/V prefix, or soft tokens where the backbone takes
them; shared by every row, or one per row with the `prefix_mask` of `Backbone.stack_prefixes`.
"""

from __future__ import annotations

import torch

from ..backbones import Backbone
from ..data import Batch, Example, collate


def position_logprobs(
    backbone: Backbone, batch: Batch, prompt_input: torch.Tensor | None, prefix_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Full-vocabulary log-probabilities at the batch's loss positions, (K, vocab); the LM head runs only there."""
    batch = batch.to(backbone.device)
    return backbone.logits(backbone.target_hidden(batch, prompt_input, prefix_mask)).log_softmax(-1)


def token_logprobs(
    backbone: Backbone, batch: Batch, prompt_input: torch.Tensor | None, prefix_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """log p(token) of each of the batch's loss tokens, (K,)."""
    logprobs = position_logprobs(backbone, batch, prompt_input, prefix_mask)
    return logprobs.gather(-1, batch.loss_tokens.to(logprobs.device)[:, None]).squeeze(-1)


def target_logprobs(
    backbone: Backbone, rows: list[Example], prompt_input: torch.Tensor | None, prefix_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Each row's summed log-probability of its target tokens after its input, (rows,)."""
    batch = collate(rows, backbone.pad_id)
    logprobs = token_logprobs(backbone, batch, prompt_input, prefix_mask)  # (K,) one per target token
    return logprobs.new_zeros(len(rows)).index_add_(0, batch.loss_rows.to(logprobs.device), logprobs)


def one_token_labels(label_ids: list[list[int]]) -> bool:
    """Whether `label_logprobs` takes its fast path: every label word is a single token."""
    return all(len(ids) == 1 for ids in label_ids)


def rows_per_input(label_ids: list[list[int]]) -> int:
    """How many batch rows `label_logprobs` spends on one input (for sizing chunks)."""
    return 1 if one_token_labels(label_ids) else len(label_ids)


def label_logprobs(
    backbone: Backbone,
    inputs: list[list[int]],
    label_ids: list[list[int]],
    prompt_input: torch.Tensor | None = None,
    prefix_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(inputs, num_labels): each label word's summed token log-probability after each input, in one forward.

    label_ids: each label word's token ids (as `TaskEncoder.label_ids` gives them), the same for every input.
    prompt_input: shared by every input, or one per input with its `prefix_mask`."""
    if one_token_labels(label_ids):  # one row per input: every label read at its last position
        words = [ids[0] for ids in label_ids]
        batch = collate([Example(ids, words[:1]) for ids in inputs], backbone.pad_id)
        return position_logprobs(backbone, batch, prompt_input, prefix_mask)[:, words]
    rows = [Example(ids, word) for ids in inputs for word in label_ids]  # one row per (input, label word)
    if prefix_mask is not None:  # one prompt input per input: repeated for each of its label rows
        prompt_input = prompt_input.repeat_interleave(len(label_ids), 0)
        prefix_mask = prefix_mask.repeat_interleave(len(label_ids), 0)
    return target_logprobs(backbone, rows, prompt_input, prefix_mask).view(len(inputs), len(label_ids))
