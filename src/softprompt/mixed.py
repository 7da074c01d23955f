"""Mixed batches: one batch in which every row names its own prompt, or none.

A row's prompt is its per-layer K/V prefix (num_layers, 2, kv_heads, n_i, head_dim), computed once from the method
(`method.kv(backbone)`); rows without a prompt pass None. `Backbone.stack_prefixes` left-pads the shorter prefixes
with masked slots, and generation and scoring take that per-row prefix with its mask: positions count real slots
only, so a row gets the tokens it would get in a batch of its own prompt alone. Works the same for prompt tuning and
prefix tuning, since both are a K/V prefix by the time they reach the model.
"""

from __future__ import annotations

import torch

from .backbones import Backbone
from .data import Example
from .errors import SoftPromptError
from .evaluate import target_logprobs
from .generate import generate


def _check(backbone: Backbone, prefixes: list[torch.Tensor | None], rows: int) -> None:
    """One prefix (or None) per row, each one the backbone accepts as a shared prefix."""
    problems = []
    if len(prefixes) != rows:
        problems.append(f"{len(prefixes)} prefixes for {rows} rows: give one per row (None for no prompt)")
    for row, prefix in enumerate(prefixes):
        if prefix is not None:
            problems += [f"row {row}: {problem}" for problem in backbone.prefix_problems(prefix, None, 1)]
    if problems:
        raise SoftPromptError("Cannot build a mixed batch:\n  - " + "\n  - ".join(problems[:10]))


def stack(backbone: Backbone, prefixes: list[torch.Tensor | None]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The per-row prefix (B, num_layers, 2, kv_heads, n, head_dim) and its mask (B, n) for a mixed batch; (None,
    None) when no row has a prompt, so a prompt-free batch runs exactly as the bare model."""
    if all(p is None for p in prefixes):
        return None, None
    return backbone.stack_prefixes([None if p is None else p.to(backbone.device, backbone.dtype) for p in prefixes])


@torch.no_grad()
def generate_mixed(
    backbone: Backbone, prompts: list[list[int]], prefixes: list[torch.Tensor | None], **options
) -> list[list[int]]:
    """New token ids for each prompt, each after its own prefix (or none), all decoded in one batch.

    options: those of `generate.generate` (max_new_tokens, temperature, top_p, stop, seed).
    """
    _check(backbone, prefixes, len(prompts))
    prefix, mask = stack(backbone, prefixes)
    return generate(backbone, prompts, prefix, prefix_mask=mask, **options)


@torch.no_grad()
def label_scores_mixed(
    backbone: Backbone,
    inputs: list[list[int]],
    label_ids: list[list[list[int]]],
    prefixes: list[torch.Tensor | None],
    batch_size: int = 32,
) -> list[torch.Tensor]:
    """For each row, (num_labels_i,): the summed log-probability of each of its label words' tokens after its input,
    with its own prefix. Rows may come from different tasks, each with its own label words (token ids per word, as
    `Task.label_ids` gives them)."""
    _check(backbone, prefixes, len(inputs))
    if len(label_ids) != len(inputs):
        raise SoftPromptError(f"{len(label_ids)} label sets for {len(inputs)} inputs: give one per input")
    empty = [row for row, ids in enumerate(inputs) if not ids]
    if empty:
        raise SoftPromptError(f"inputs {empty[:5]} are empty: each needs at least one token")
    # One scoring row per (input, label word); its target is the label word's tokens.
    rows = [(i, Example(inputs[i], word)) for i in range(len(inputs)) for word in label_ids[i]]
    totals = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        prefix, mask = stack(backbone, [prefixes[i] for i, _ in chunk])
        totals.append(target_logprobs(backbone, [example for _, example in chunk], prefix, mask).cpu())
    flat = torch.cat(totals) if totals else torch.zeros(0)
    sizes = [len(words) for words in label_ids]
    return list(flat.split(sizes))
