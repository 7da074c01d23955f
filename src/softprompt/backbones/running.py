"""A running batch: rows decoding together, each behind its own prompt, in one cache that the batch owns.

`generate.generate` and the serving engine both decode through it, so there is one way to prefill (prompts
left-padded after their prefixes: every row's last token lands in the last column), one decode step, and one way
for rows to join and leave. Since positions count a row's real slots only, a row's tokens do not depend on who
shares its batch.
"""

from __future__ import annotations

import torch

from . import cache_rows
from .base import Backbone


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

    def __len__(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def join(self, prompts: list[list[int]], prefix: torch.Tensor | None = None,
             prefix_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        """Prefill new rows (one group: each prompt after its prefix) and add them after the running rows. prefix:
        shared or per row, with prefix_mask (G, n) as `Backbone.stack_prefixes` gives it. Returns the new rows'
        next-token logits (G, vocab). On a failure the running rows are left as they were."""
        backbone = self.backbone
        if prefix is not None:
            prefix = prefix.detach().to(backbone.device, backbone.dtype)
        if prefix_mask is not None:
            prefix_mask = prefix_mask.to(backbone.device, torch.long)
        ids, attention = left_pad(prompts, backbone.pad_id, backbone.device)  # (G, T) each
        cache = cache_rows.growing(backbone.new_cache(prefix, len(prompts)))
        hidden, mask = backbone.forward(ids, attention, cache, prefix_mask)
        logits = backbone.logits(hidden[:, -1])  # (G, vocab): left padding puts every row's last token last
        if len(self):
            self.mask = backbone.merge_rows(self.cache, self.mask, cache, mask)
        else:
            self.cache, self.mask = cache, mask
        return logits

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
