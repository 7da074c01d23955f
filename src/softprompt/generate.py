"""Batched decoding after a per-layer key/value prefix.

The prefix (one shared by every row, or one per row, shorter ones left-padded with masked slots) goes into the
cache first; the prompts, left-padded into one batch, are prefilled after it; then each step feeds one token per
row, reusing the cache, and computes logits at that one position only. Greedy at temperature 0, otherwise
temperature and nucleus (top-p) sampling from a seeded generator.
"""

from __future__ import annotations

import torch
from tqdm import tqdm

from .backbone import Backbone
from .errors import SoftPromptError


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


def eos_ids(backbone: Backbone) -> set[int]:
    """Every id that ends a row: the tokenizer's EOS and the model's generation_config EOS (an int or a list)."""
    ids = set()
    config = getattr(backbone.model, "generation_config", None)
    for value in (backbone.tokenizer.eos_token_id, getattr(config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif value is not None:
            ids.update(int(v) for v in value)
    return ids


def _check(backbone, prompts, prefix, prefix_mask, max_new_tokens, temperature, top_p) -> None:
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
    if prefix is not None:
        problems += backbone.prefix_problems(prefix, prefix_mask, len(prompts))
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
    prefix: torch.Tensor | None = None,
    *,
    prefix_mask: torch.Tensor | None = None,
    max_new_tokens: int = 32,
    temperature: float = 0.0,
    top_p: float = 1.0,
    stop: list[str] | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> list[list[int]]:
    """New token ids for each prompt, decoded in one batch after the K/V prefix.

    prompts: token ids, any lengths (left-padded here).
    prefix: (num_layers, 2, kv_heads, n, head_dim) shared by all rows, or (B, num_layers, 2, kv_heads, n, head_dim)
        one per row, with prefix_mask (B, n) marking the real slots of rows whose prefixes were left-padded.
    A row ends at an EOS id (not returned), at max_new_tokens, or once its text holds a stop string: its tokens are
    then cut to the longest run whose text ends before the stop string (`decode_new` cuts a text the same way).
    temperature 0 is greedy; otherwise sample with temperature and top-p, reproducibly when `seed` is given.
    """
    _check(backbone, prompts, prefix, prefix_mask, max_new_tokens, temperature, top_p)
    batch, device = len(prompts), backbone.device
    if max_new_tokens == 0 or not prompts:
        return [[] for _ in prompts]
    slots = (0 if prefix is None else prefix.shape[-2]) + max(map(len, prompts)) + max_new_tokens
    padded = len(set(map(len, prompts))) > 1 or (prefix_mask is not None and not bool(prefix_mask.all()))
    if batch > 1 and padded and slots > backbone.window:
        # Masked slots would take sliding-window places from real ones: decode each row alone, unpadded.
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, stop=stop, seed=seed)
        rows = []
        for row, ids in enumerate(prompts):
            own = prefix
            if prefix is not None and prefix.dim() == 6:  # (B, layers, 2, kv_heads, n, head_dim): the row's real slots
                own = prefix[row] if prefix_mask is None else prefix[row][..., prefix_mask[row].bool(), :]
            rows += generate(backbone, [ids], own, **options)
        return rows
    tokenizer = backbone.tokenizer
    pad = backbone.pad_id
    eos = torch.tensor(sorted(eos_ids(backbone)), dtype=torch.long, device=device)
    stop = [s for s in stop or () if s]

    # Left padding puts every row's last real token in the last column, so one column gives all next-token logits.
    width = max(len(p) for p in prompts)
    input_ids = torch.full((batch, width), pad, dtype=torch.long, device=device)  # (B, T)
    attention_mask = torch.zeros(batch, width, dtype=torch.long, device=device)  # (B, T)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long, device=device)
        attention_mask[row, width - len(ids) :] = 1

    past_mask = None
    if prefix is not None:
        prefix = prefix.detach().to(device=device, dtype=backbone.dtype)
        if prefix_mask is not None:
            past_mask = prefix_mask.to(device=device, dtype=torch.long)  # (B, n)
        else:
            past_mask = torch.ones(batch, prefix.shape[-2], dtype=torch.long, device=device)  # (B, n)
    cache = backbone.new_cache(prefix, batch)

    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)

    hidden, past_mask = backbone.forward(input_ids, attention_mask, cache, past_mask)
    logits = backbone.logits(hidden[:, -1])  # (B, vocab)
    outputs: list[list[int]] = [[] for _ in prompts]
    done = [False] * batch
    bar = tqdm(total=max_new_tokens, desc="generating", disable=not progress, leave=False)
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, temperature, top_p, generator)  # (B,)
        is_eos = torch.isin(tokens, eos).tolist()
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if is_eos[row]:
                done[row] = True  # EOS ends the row and is not returned
                continue
            outputs[row].append(token)
            if stop:
                trimmed = trim_to_stop(tokenizer, outputs[row], stop)
                if trimmed is not None:
                    outputs[row], done[row] = trimmed, True
        bar.update(1)
        if all(done) or step == max_new_tokens - 1:
            break
        # Finished rows still ride along (the cache is one batch) but feed a masked pad that nothing attends to.
        live = torch.tensor([[not d] for d in done], dtype=torch.long, device=device)  # (B, 1)
        step_ids = torch.where(live.bool(), tokens[:, None], torch.full_like(tokens[:, None], pad))  # (B, 1)
        hidden, past_mask = backbone.forward(step_ids, live, cache, past_mask)
        logits = backbone.logits(hidden[:, -1])  # (B, vocab)
    bar.close()
    return outputs
