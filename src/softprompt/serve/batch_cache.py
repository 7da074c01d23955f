"""Reshaping a running batch's K/V cache: rows join (merged in, left-padded with masked slots), rows leave
(index-selected out), and columns masked in every row are dropped.

The one place where serving touches transformers' cache layers (`cache.layers[i].keys/values`, as
`DynamicLayer.crop` does itself); it belongs beside `Backbone.new_cache` in backbone.py. Every layer holds
(B, kv_heads, T, head_dim) keys and values; the batch's mask (B, T) says which slots are real. Positions come from
the mask's sums (`Backbone.forward`), so a masked slot anywhere changes nothing for its row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache

from ..backbone import Backbone
from ..errors import SoftPromptError


def check_supported(backbone: Backbone) -> None:
    """Sliding-window layers keep only their last window of slots, which breaks the slot-for-slot mask."""
    layers = DynamicCache(config=backbone.model.config).layers
    if any(getattr(layer, "is_sliding", False) for layer in layers):
        raise SoftPromptError(
            f"{type(backbone.model).__name__} uses sliding-window attention; the serving engine cannot batch its "
            "cache yet. Serve a model without sliding windows."
        )


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(B, heads, T, d) -> (B, heads, width, d), zeros in front (the mask hides them)."""
    return F.pad(tensor, (0, 0, width - tensor.shape[-2], 0))


def merge(cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` in place (the shorter side left-padded with masked slots); returns the merged
    mask (B + B', max(T, T'))."""
    width = max(mask.shape[1], other_mask.shape[1])
    for layer, extra in zip(cache.layers, other.layers):
        layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(extra.keys, width)])
        layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(extra.values, width)])
    pad = lambda m: F.pad(m, (width - m.shape[1], 0))  # noqa: E731  (B, T) -> (B, width), zeros in front
    return torch.cat([pad(mask), pad(other_mask)])


def select(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep only `rows` (in that order), in place; then drop leading columns no remaining row uses. Returns the
    new mask."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    cache.batch_select_indices(index)
    mask = mask[index]
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    if start:
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
        mask = mask[:, start:]
    return mask
