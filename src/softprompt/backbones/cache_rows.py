"""Reshaping a running batch's K/V cache: rows join (merged in, left-padded with masked slots), rows leave
(index-selected out), and columns masked in every row are dropped.

Used by `RunningBatch` through `CausalBackbone.select_rows/merge_rows`; it writes transformers' cache layers
(`cache.layers[i].keys/values`, as `DynamicLayer.crop` does itself). Every layer holds
(B, kv_heads, T, head_dim) keys and values; the batch's mask (B, T) says which slots are real. Positions come from
the mask's sums (`Backbone.forward`), so a masked slot anywhere changes nothing for its row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """(B, heads, T, d) -> (B, heads, width, d), zeros in front (the mask hides them)."""
    return F.pad(tensor, (0, 0, width - tensor.shape[-2], 0))


def merge(cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor) -> torch.Tensor:
    """Append `other`'s rows to `cache` in place (the shorter side left-padded with masked slots); returns the merged
    mask (B + B', max(T, T')). On a failure (out of memory) `cache` is put back as it was, so its rows can go on."""
    (rows, length), width = mask.shape, max(mask.shape[1], other_mask.shape[1])
    merged = 0
    try:
        for layer, extra in zip(cache.layers, other.layers):  # one layer at a time: no second copy of the cache
            layer.keys = torch.cat([_pad_left(layer.keys, width), _pad_left(extra.keys, width)])
            layer.values = torch.cat([_pad_left(layer.values, width), _pad_left(extra.values, width)])
            merged += 1
        pad = lambda m: F.pad(m, (width - m.shape[1], 0))  # noqa: E731  (B, T) -> (B, width), zeros in front
        return torch.cat([pad(mask), pad(other_mask)])
    except BaseException:
        # Views, so undoing allocates nothing: the first rows and last columns are the running rows' cache as it was.
        for layer in cache.layers[: merged + 1]:
            if layer.keys.shape[0] != rows:
                layer.keys = layer.keys[:rows, :, width - length :]  # (B, heads, T, d)
            if layer.values.shape[0] != rows:
                layer.values = layer.values[:rows, :, width - length :]
        raise


def select(cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """Keep only `rows` (in that order), in place; then drop leading columns no remaining row uses (unless a layer
    keeps a sliding window: its slots no longer line up with the mask's columns). Returns the new mask."""
    index = torch.tensor(rows, dtype=torch.long, device=mask.device)
    cache.batch_select_indices(index)
    mask = mask[index]
    used = mask.any(0).nonzero()
    start = int(used[0]) if len(used) else mask.shape[1]
    if start and not any(getattr(layer, "is_sliding", False) for layer in cache.layers):
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys[..., start:, :], layer.values[..., start:, :]
        mask = mask[:, start:]
    return mask
