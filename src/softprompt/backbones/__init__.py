"""The frozen model behind the operations the library needs, one backbone per model kind.

Every call of ours into transformers' caches, masks and positions lives in this package (and model loading in
models.py), so a transformers release that renames something touches these files only.

- base.py: the contract (`Backbone`), `Shapes`, the cache keyword of the installed transformers.
- causal.py: decoder-only LMs (the K/V prefix in the model's own cache; packing; sharding; checkpointing).
- seq2seq.py: T5-style encoder-decoders (soft tokens into the encoder, or a K/V prefix in both stacks).
- running.py: `RunningBatch`, the rows decoding together, used by generation and the serving engine.
- cache_rows.py, head.py, replay.py, compiled.py: a causal cache's rows joining and leaving, and its room to grow;
  the LM head's transform and its check; activation checkpointing that keeps the prefix; torch.compile of the
  training pass.
"""

from __future__ import annotations

from transformers import PreTrainedModel, PreTrainedTokenizerBase

from .base import Backbone, Shapes, cache_keyword
from .causal import CausalBackbone
from .running import RunningBatch
from .seq2seq import Seq2SeqBackbone

__all__ = ["Backbone", "CausalBackbone", "RunningBatch", "Seq2SeqBackbone", "Shapes", "backbone_for", "cache_keyword"]


def backbone_for(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> Backbone:
    """The backbone for this model's kind: an encoder-decoder (T5) or a causal LM. Freezes the model."""
    if getattr(model.config, "is_encoder_decoder", False):
        return Seq2SeqBackbone(model, tokenizer)
    return CausalBackbone(model, tokenizer)
