"""Activation checkpointing of decoder layers that keeps the prefix in their cache (`CausalBackbone.gradient_checkpointing`
says why transformers' own switch cannot be used)."""

from __future__ import annotations

from contextlib import contextmanager
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint
from transformers import DynamicCache

from ..errors import SoftPromptError


@contextmanager
def replaying(layers: list[torch.nn.Module], cache: DynamicCache):
    """While active, layer i of `layers` runs under torch's non-reentrant checkpoint, and each run of it (the forward
    and the backward's replay) starts from `cache.layers[i]` as the forward found it."""
    own = [vars(layer).get("forward") for layer in layers]  # a hook's forward (accelerate's device_map) stays
    for i, layer in enumerate(layers):
        layer.forward = partial(_replayable, layer.forward, cache, i)  # instance attribute shadows the class's
    try:
        yield
    finally:
        for layer, forward in zip(layers, own):
            if forward is None:
                del layer.forward
            else:
                layer.forward = forward


def _replayable(forward, cache: DynamicCache, index: int, /, *args, **kwargs):
    """One decoder layer under activation checkpointing. The first three parameters are positional-only, so the
    layer's own arguments pass through whatever transformers names them (its cache is `past_key_values` or `cache`,
    by keyword or by position)."""
    if not any(value is cache for value in (*args, *kwargs.values())):
        # Restoring an entry of a cache the layer does not write to would replay on top of the first run's keys.
        raise SoftPromptError(
            f"decoder layer {index} was not handed the prefix cache (this transformers version passes it in a way "
            "softprompt does not know), so gradient checkpointing cannot replay it; train without it"
        )
    entry = cache.layers[index]
    state = dict(vars(entry))  # keys/values as this layer finds them (the prefix): the tensors, not copies

    def run(*args):
        vars(entry).clear()
        vars(entry).update(state)  # a replay appends to the prefix, not to the first run's result
        return forward(*args, **kwargs)

    return checkpoint(run, *args, use_reentrant=False)
