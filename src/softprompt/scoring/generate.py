"""Batched decoding after a prompt input (a per-layer K/V prefix, or soft tokens where the backbone takes them), and
the rules every decoder here follows.

The prompt input (one shared by every row, or one per row, shorter ones left-padded with masked slots) and the
prompts go into a `RunningBatch`; each step feeds one token per running row, reusing the cache, and computes logits
at that one position only; finished rows leave the batch. Greedy at temperature 0, otherwise temperature and
nucleus (top-p) sampling from a seeded generator. `advance` is the one rule for how a row grows and ends, which the
serving engine follows too.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from ..backbones import Backbone, RunningBatch
from ..errors import SoftPromptError


def _stop_index(text: str, stop: list[str] | None) -> int:
    """Where the earliest stop string begins in `text`, or -1 when none occurs."""
    hits = [i for i in (text.find(s) for s in stop or () if s) if i >= 0]
    return min(hits, default=-1)


def decode_new(tokenizer, ids: list[int], stop: list[str] | None = None) -> str:
    """The text of generated token ids (special tokens dropped), cut before the first stop string."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = _stop_index(text, stop)
    return text if cut < 0 else text[:cut]


def trim_to_stop(tokenizer, ids: list[int], stop: list[str]) -> list[int] | None:
    """None while the text of `ids` holds no stop string; else the longest leading run of `ids` whose text ends
    before the stop string begins (a token straddling the boundary goes too: tokens cannot be split)."""
    text = tokenizer.decode(ids, skip_special_tokens=True)
    cut = _stop_index(text, stop)
    if cut < 0:
        return None
    # Only the last few tokens can reach past `cut`, since earlier steps found no stop: search backwards.
    for keep in range(len(ids) - 1, -1, -1):
        head = tokenizer.decode(ids[:keep], skip_special_tokens=True)
        if len(head) <= cut and _stop_index(head, stop) < 0:
            return ids[:keep]
    return []


def eos_ids(tokenizer, generation_config=None) -> set[int]:
    """Every id that ends a row: the tokenizer's EOS and the model's generation_config EOS (an int or a list)."""
    ids = set()
    for value in (tokenizer.eos_token_id, getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def advance(tokenizer, eos: set[int], tokens: list[int], token: int, *, max_tokens: int,
            stop: list[str] | None = None, ignore_eos: bool = False) -> str | None:  # fmt: skip
    """Add a decoded `token` to a row's `tokens` (in place). Returns why the row ends, or None: "stop" at an EOS id
    (not added, unless `ignore_eos`) or once the text holds a stop string (the tokens are then cut before it, as
    `trim_to_stop` says), "length" at `max_tokens`."""
    if token in eos and not ignore_eos:
        return "stop"
    tokens.append(token)
    trimmed = trim_to_stop(tokenizer, tokens, stop) if stop else None
    if trimmed is not None:
        tokens[:] = trimmed
        return "stop"
    return "length" if len(tokens) >= max_tokens else None


def _check(backbone, prompts, prompt_input, prefix_mask, max_new_tokens, temperature, top_p) -> None:
    problems = []
    empty = [i for i, p in enumerate(prompts) if len(p) == 0]
    if empty:
        # the next token is read from the last prompt position; an empty prompt has none
        problems.append(f"prompts {empty[:5]} are empty: each prompt needs at least one token")
    if max_new_tokens < 0:
        problems.append(f"max_new_tokens must not be negative, got {max_new_tokens}")
    if temperature < 0:
        problems.append(f"temperature must not be negative, got {temperature}")
    if not 0 < top_p <= 1:
        problems.append(f"top_p must be in (0, 1], got {top_p}")
    if prompt_input is not None:
        problems += backbone.prefix_problems(prompt_input, prefix_mask, len(prompts))
    elif prefix_mask is not None:
        problems.append("prefix_mask given without a prefix")
    if problems:
        raise SoftPromptError("Cannot generate:\n  - " + "\n  - ".join(problems))


def next_tokens(logits: torch.Tensor, temperature: float, top_p: float, generator) -> torch.Tensor:
    """One token per row from (B, vocab) logits."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)  # (B, vocab) each
        # Keep the smallest head whose mass reaches top_p: a token stays if the mass before it is still short.
        before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)


@torch.no_grad()
def generate(
    backbone: Backbone,
    prompts: list[list[int]],
    prompt_input: torch.Tensor | None = None,
    *,
    prefix_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt, decoded in one batch after the prompt input.

    prompts: token ids, any lengths (left-padded here).
    prompt_input: a K/V prefix (num_layers, 2, kv_heads, n, head_dim) shared by all rows, or (B, num_layers, 2,
        kv_heads, n, head_dim) one per row, with prefix_mask (B, n) marking the real slots of rows whose prefixes were
        left-padded; an encoder-decoder also takes soft tokens, (n, d_model) or (B, n, d_model).
    A row ends at an EOS id (not returned), at max_new_tokens, or once its text holds a stop string: its tokens are
    then cut to the longest run whose text ends before the stop string (`decode_new` cuts a text the same way).
    temperature 0 is greedy; otherwise sample with temperature and top-p, reproducibly when `seed` is given.
    """
    _check(backbone, prompts, prompt_input, prefix_mask, max_new_tokens, temperature, top_p)
    if max_new_tokens == 0 or not prompts:
        return [[] for _ in prompts]
    slots = (0 if prompt_input is None else prompt_input.shape[-2]) + max(map(len, prompts)) + max_new_tokens
    padded = len(set(map(len, prompts))) > 1 or (prefix_mask is not None and not bool(prefix_mask.all()))
    if len(prompts) > 1 and padded and slots > backbone.window:
        # Masked slots would take sliding-window places from real ones: decode each row alone, unpadded.
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
        rows = []
        for row, ids in enumerate(prompts):
            own = prompt_input
            if own is not None and own.dim() == 6:  # (B, layers, 2, kv_heads, n, head_dim): the row's real slots
                own = own[row] if prefix_mask is None else own[row][..., prefix_mask[row].bool(), :]
            rows += generate(backbone, [ids], own, **options)
        return rows
    rule = dict(max_tokens=max_new_tokens, stop=[s for s in stop or () if s])
    eos = eos_ids(backbone.tokenizer, getattr(backbone.model, "generation_config", None))
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=backbone.device).manual_seed(seed)

    batch = RunningBatch(backbone)
    logits = batch.join(prompts, prompt_input, prefix_mask)  # (B, vocab)
    outputs: list[list[int]] = [[] for _ in prompts]
    running = list(range(len(prompts)))  # the prompt each row of the batch decodes
    for _ in tqdm(range(max_new_tokens), desc="generating", disable=not progress, leave=False):
        tokens = next_tokens(logits, temperature, top_p, generator).tolist()  # one per running row
        going = [i for i, (row, token) in enumerate(zip(running, tokens))
                 if advance(backbone.tokenizer, eos, outputs[row], token, **rule) is None]  # fmt: skip
        if not going:
            break
        batch.keep(going)
        running = [running[i] for i in going]
        logits = batch.step([outputs[row][-1] for row in running])
    return outputs
