"""A running batch: rows decoding together, each behind its own prompt, in one cache that the batch owns.

`generate.generate` and the serving engine both decode through it, so there is one way to prefill (prompts
left-padded after their prefixes: every row's last token lands in the last column; rows of very different lengths
in groups of similar length), one decode step, and one way for rows to join and leave. Since positions count a
row's real slots only, a row's tokens do not depend on who shares its batch.
"""

from __future__ import annotations

from collections import Counter
from itertools import accumulate

import torch

from ..errors import SoftPromptError
from . import cache_rows
from .base import Backbone


PREFILL_OVERHEAD = 48
"""What one more prefill forward costs beyond its tokens, in tokens (`length_groups`): on SmolLM2-135M on a 2-core
CPU a prefill of one token took 56 ms, a token of a 64-row prefill 1.1-1.5 ms."""


def length_groups(lengths: list[int], overhead: int = PREFILL_OVERHEAD) -> list[list[int]]:
    """Row indices in groups to prefill one after another, minimizing what the prefills cost: each group pays its
    rows times its longest row (left padding) plus `overhead`. A long prompt then no longer makes every short one
    beside it compute on pads. The best groups take the rows of a range of lengths (a row as long as its group's
    longest costs no more there than in a longer group): O(distinct lengths^2)."""
    counts = Counter(lengths)
    distinct = sorted(counts)
    upto = list(accumulate((counts[n] for n in distinct), initial=0))  # rows of the k shortest lengths
    cost, cut = [0] + [float("inf")] * len(distinct), [0] * (len(distinct) + 1)  # best of the k shortest, last cut
    for end in range(1, len(distinct) + 1):
        for start in range(end):
            c = cost[start] + overhead + (upto[end] - upto[start]) * distinct[end - 1]
            if c < cost[end]:
                cost[end], cut[end] = c, start
    ranges, end = [], len(distinct)
    while end:
        ranges.append((distinct[cut[end]], distinct[end - 1]))
        end = cut[end]
    return [[row for row, n in enumerate(lengths) if low <= n <= high] for low, high in reversed(ranges)]


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, T) left-padded with `pad_id`, and their mask (B, T), 1 on real tokens."""
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)  # (B, T)
    mask = torch.zeros(len(prompts), width, dtype=torch.long, device=device)  # (B, T)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt, dtype=torch.long, device=device)
        mask[row, width - len(prompt) :] = 1
    return ids, mask


class RunningBatch:
    """Rows being decoded: the cache (prefixes, prompts, generated tokens) and its mask (B, T) of real slots."""

    def __init__(self, backbone: Backbone):
        self.backbone = backbone
        self.cache = None
        self.mask: torch.Tensor | None = None
        try:  # whether caches can be merged row-wise, as rows joining a running batch need
            backbone.check_joinable()
            self.mergeable = True
        except SoftPromptError:
            self.mergeable = False

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def join(self, prompts: list[list[int]], prefix: torch.Tensor | None = None,
             prefix_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Prefill new rows (each prompt after its prefix) and add them after the running rows, in their order.
        prefix: shared or per row, with prefix_mask (G, n) as `Backbone.stack_prefixes` gives it. Rows of very
        different lengths prefill in groups (`length_groups`) where the backbone can merge caches. Returns the new
        rows' next-token logits (G, vocab). On a failure the running rows are left as they were."""
        backbone = self.backbone
        if prefix is not None:
            prefix = prefix.detach().to(backbone.device, backbone.dtype)
        if prefix_mask is not None:
            prefix_mask = prefix_mask.to(backbone.device, torch.long)
        groups = length_groups(list(map(len, prompts))) if self.mergeable else [list(range(len(prompts)))]
        cache, mask, logits = None, None, []
        per_row = prefix is not None and prefix.dim() == 6  # (G, layers, 2, kv_heads, n, head_dim), else shared
        for rows in groups:
            at = rows if len(groups) > 1 else slice(None)  # one group: views, no copy
            group_cache, group_mask, group_logits = self._prefill(
                [prompts[r] for r in rows], prefix[at] if per_row else prefix,
                None if prefix_mask is None else prefix_mask[at])  # fmt: skip
            logits.append(group_logits)
            if cache is None:
                cache, mask = group_cache, group_mask
            else:
                mask = backbone.merge_rows(cache, mask, group_cache, group_mask)
        order = [r for rows in groups for r in rows]
        if order != sorted(order):  # back to the given order
            where = sorted(range(len(order)), key=order.__getitem__)  # each given row's place among the prefilled
            mask = backbone.select_rows(cache, mask, where)
            logits = [torch.cat(logits)[where]]
        if len(self):
            self.mask = backbone.merge_rows(self.cache, self.mask, cache, mask)
        else:
            self.cache, self.mask = cache, mask
        return torch.cat(logits)

    def _prefill(self, prompts: list[list[int]], prefix: torch.Tensor | None, prefix_mask: torch.Tensor | None):
        """One prefill: the rows left-padded after their prefixes; their cache, its mask and their next-token
        logits."""
        backbone = self.backbone
        ids, attention = left_pad(prompts, backbone.pad_id, backbone.device)  # (G, T) each
        cache = cache_rows.growing(backbone.new_cache(prefix, len(prompts)))
        hidden, mask = backbone.forward(ids, attention, cache, prefix_mask)
        return cache, mask, backbone.logits(hidden[:, -1])  # (G, vocab): every row's last token is last

    def step(self, tokens: list[int]) -> torch.Tensor:
        """Feed each row its newest token; returns the next-token logits (B, vocab)."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.backbone.device)[:, None]  # (B, 1)
        hidden, self.mask = self.backbone.forward(ids, torch.ones_like(ids), self.cache, self.mask)
        return self.backbone.logits(hidden[:, -1])

    def keep(self, rows: list[int]) -> None:
        """Only `rows` go on, in that order; the others leave the cache."""
        if rows == list(range(len(self))):
            return
        if not rows:
            self.cache, self.mask = None, None
            return
        self.mask = self.backbone.select_rows(self.cache, self.mask, rows)
