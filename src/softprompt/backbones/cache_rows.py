"""Reshaping a running batch's K/V cache: rows join (merged in, left-padded with masked slots), rows leave
(index-selected out), and columns masked in every row are dropped; and room to grow, so that a decoding step
writes its token in place instead of copying the whole cache (`growing`).

Used by `RunningBatch` through `CausalBackbone.select_rows/merge_rows`; it writes transformers' cache layers
(`cache.layers[i].keys/values`, as `DynamicLayer.crop` does itself). Every layer holds
(B, kv_heads, T, head_dim) keys and values; the batch's mask (B, T) says which slots are real. Positions come from
the mask's sums (`Backbone.forward`), so a masked slot anywhere changes nothing for its row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


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


ROOM = 64
"""Free slots a new buffer gets: one copy of the cache per 64 decoding steps instead of one per step, for at most 64
spare slots per row (measured against a quarter of the length: the same speed, more spare memory on long rows)."""


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into buffers with free slots after them. transformers' own
    layer concatenates at every step, copying the whole cache (16% of a decoding step at batch 64 on the embedded
    model 40 tokens in, and a cost that grows with the length). Whoever replaces `keys` (merge, select, crop) gets
    a new buffer at the next update; with gradients (training), it concatenates as transformers does."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if torch.is_grad_enabled() and (key_states.requires_grad or self.keys.requires_grad):
            return super().update(key_states, value_states, *args, **kwargs)
        length, new = (self.keys.shape[-2] if self.keys.dim() == 4 else 0), key_states.shape[-2]
        buffers = getattr(self, "_room", None)
        if buffers is None or self.keys is not self._view or length + new > buffers[0].shape[-2]:
            self._room = buffers = None  # a replaced cache's old buffer is freed before the new one is taken
            capacity = length + new + ROOM
            shape = (*key_states.shape[:2], capacity, key_states.shape[-1])  # (B, kv_heads, capacity, head_dim)
            buffers = self._room = (key_states.new_empty(shape), value_states.new_empty(shape))
            if length:
                buffers[0][..., :length, :] = self.keys
                buffers[1][..., :length, :] = self.values
        keys, values = buffers
        keys[..., length : length + new, :] = key_states
        values[..., length : length + new, :] = value_states
        self.keys, self.values = keys[..., : length + new, :], values[..., : length + new, :]
        self._view = self.keys
        return self.keys, self.values


def growing(cache):
    """`cache` with its plain layers growing in place (sliding-window and other kinds of layer keep their own
    update); a cache without transformers' layers is returned as it is."""
    for layer in getattr(cache, "layers", []):
        if type(layer) is DynamicLayer:
            layer.__class__ = GrowingLayer
    return cache
