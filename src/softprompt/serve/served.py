"""The served model: a loaded base model as the server sees it, whichever engine runs it.

The registry and the app ask it what differs between our engine and a front to vLLM, so neither branches on the
kind: what an artifact becomes in front of a request's tokens (its *prompt input*: the K/V prefix our engine runs
behind, or the soft tokens vLLM reads as `prompt_embeds`), the tokenizer, the vocabulary a prompt's details are read
against, and the context. `LocalModel` is our backbone; `vllm_embeds.InputEmbeddings` is the vLLM front.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from transformers import PreTrainedTokenizerBase

from .. import artifact
from ..backbones import Backbone, Shapes
from ..models import context_size


class ServedModel(ABC):
    """What the server needs of its base model."""

    tokenizer: PreTrainedTokenizerBase
    shapes: Shapes

    @abstractmethod
    def prompt_input(self, saved: artifact.Artifact, where: str) -> torch.Tensor:
        """What `saved` puts in front of every row, computed once when it loads (checked to belong to this model;
        refused with a SoftPromptError where the engine cannot run it)."""

    @abstractmethod
    def vocabulary(self) -> tuple[torch.Tensor, PreTrainedTokenizerBase]:
        """The input-embedding table (vocab, hidden) and the tokenizer, for a prompt's nearest tokens."""

    @property
    @abstractmethod
    def context(self) -> int | None:
        """Positions the model attends over (soft prompt, prompt and completion); None where its config says none."""

    @property
    def vocab_size(self) -> int:
        """Token ids a client may send: those both the tokenizer and the model know."""
        return min(len(self.tokenizer), self.shapes.vocab_size)


class LocalModel(ServedModel):
    """Our backbone, run by `engines.local.LocalEngine`: a prompt's input is its per-layer K/V prefix."""

    def __init__(self, backbone: Backbone):
        self.backbone, self.tokenizer, self.shapes = backbone, backbone.tokenizer, backbone.shapes

    def prompt_input(self, saved: artifact.Artifact, where: str) -> torch.Tensor:
        return artifact.prefix_of(saved, self.backbone, where)  # (num_layers, 2, kv_heads, n, head_dim)

    def vocabulary(self) -> tuple[torch.Tensor, PreTrainedTokenizerBase]:
        return self.backbone.model.get_input_embeddings().weight, self.tokenizer

    @property
    def context(self) -> int | None:
        return context_size(self.backbone.model)


def as_served(model: ServedModel | Backbone) -> ServedModel:
    """`model` as a served model: a bare backbone is the one our engine runs."""
    return model if isinstance(model, ServedModel) else LocalModel(model)
