"""Mixed batches: one batch in which every row names its own prompt, or none.

A row's prompt input is what `method.kv(backbone)` gives, computed once: a per-layer K/V prefix (num_layers, 2,
kv_heads, n_i, head_dim), or an encoder-decoder's soft tokens (n_i, d_model); rows without a prompt pass None.
`Backbone.stack_prefixes` left-pads the shorter ones with masked slots, and generation and scoring take that per-row
prompt input with its mask: positions count real slots only, so a row gets the tokens it would get in a batch of its
own prompt alone. Works the same for prompt tuning and prefix tuning.
"""

from __future__ import annotations

import torch

from ..backbones import Backbone
from ..data import Example
from ..errors import SoftPromptError
from .evaluate import batches
from .generate import generate
from .scorer import target_logprobs


def _check(backbone: Backbone, prompt_inputs: list[torch.Tensor | None], rows: int) -> None:
    """One prompt input (or None) per row, each one the backbone accepts as a shared one."""
    problems = []
    if len(prompt_inputs) != rows:
        problems.append(f"{len(prompt_inputs)} prefixes for {rows} rows: give one per row (None for no prompt)")
    for row, prompt_input in enumerate(prompt_inputs):
        if prompt_input is not None:
            problems += [f"row {row}: {problem}" for problem in backbone.prefix_problems(prompt_input, None, 1)]
    if problems:
        raise SoftPromptError("Cannot build a mixed batch:\n  - " + "\n  - ".join(problems[:10]))


def stack(
    backbone: Backbone, prompt_inputs: list[torch.Tensor | None]
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The per-row prompt input (B, ..., n, ...) and its mask (B, n) for a mixed batch, as `Backbone.stack_prefixes`
    gives them; (None, None) when no row has a prompt slot, so a prompt-free batch runs exactly as the bare model."""
    if all(p is None or p.shape[-2] == 0 for p in prompt_inputs):
        return None, None
    return backbone.stack_prefixes([None if p is None else p.to(backbone.device, backbone.dtype)
                                    for p in prompt_inputs])  # fmt: skip


@torch.no_grad()
def generate_mixed(
    backbone: Backbone, prompts: list[list[int]], prompt_inputs: list[torch.Tensor | None], **options
) -> list[list[int]]:
    """New token ids for each prompt, each after its own prompt input (or none), all decoded in one batch.

    options: those of `generate.generate` (max_new_tokens, temperature, top_p, stop, seed).
    """
    _check(backbone, prompt_inputs, len(prompts))
    prompt_input, mask = stack(backbone, prompt_inputs)
    return generate(backbone, prompts, prompt_input, prefix_mask=mask, **options)


@torch.no_grad()
def label_scores_mixed(
    backbone: Backbone,
    inputs: list[list[int]],
    label_ids: list[list[list[int]]],
    prompt_inputs: list[torch.Tensor | None],
    batch_size: int = 32,
) -> list[torch.Tensor]:
    """For each row, (num_labels_i,): the summed log-probability of each of its label words' tokens after its input,
    with its own prompt input. Rows may come from different tasks, each with its own label words (token ids per
    word, as `TaskEncoder.label_ids` gives them), so every (input, label word) is a row of its own here: the general
    path of `scorer.label_logprobs`, whose one-token fast path needs label words shared by all inputs."""
    _check(backbone, prompt_inputs, len(inputs))
    if len(label_ids) != len(inputs):
        raise SoftPromptError(f"{len(label_ids)} label sets for {len(inputs)} inputs: give one per input")
    empty = [row for row, ids in enumerate(inputs) if not ids]
    if empty:
        raise SoftPromptError(f"inputs {empty[:5]} are empty: each needs at least one token")
    # One scoring row per (input, label word); its target is the label word's tokens.
    rows = [(i, Example(inputs[i], word)) for i in range(len(inputs)) for word in label_ids[i]]
    totals = []
    for chunk in batches(rows, batch_size, False, ""):
        prompt_input, mask = stack(backbone, [prompt_inputs[i] for i, _ in chunk])
        totals.append(target_logprobs(backbone, [example for _, example in chunk], prompt_input, mask).cpu())
    flat = torch.cat(totals) if totals else torch.zeros(0)
    sizes = [len(words) for words in label_ids]
    return list(flat.split(sizes))
