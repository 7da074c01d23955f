"""Prompt tuning: trainable input embeddings P prepended to the frozen token embeddings E, so the model reads [P; E].

Lester, Al-Rfou & Constant (2021), "The Power of Scale for Parameter-Efficient Prompt Tuning".
In a causal model P attends only to itself, so the frozen model run once over P (batch 1) yields the exact
per-layer keys/values every row sees: that is `kv()`, recomputed once per training step, not once per row.
In a bidirectional encoder (T5) P attends to the input, so there `kv()` is P itself and the encoder reads [P; E]:
the backbone decides (`prefix_from_embeddings`, seq2seq.py), nothing here changes.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import PromptMethod, initial_token_ids


class SoftPrompt(PromptMethod):
    name = "prompt"
    artifact_key = "prompt_embeddings"
    token_axis = 0  # (num_tokens, hidden)
    in_embedding_space = True

    def __init__(self, config, shapes, embeddings: torch.Tensor):
        super().__init__(config, shapes)
        self.embeddings = nn.Parameter(embeddings.detach().clone().float())  # (num_tokens, hidden)

    def kv(self, backbone) -> torch.Tensor:
        return backbone.prefix_from_embeddings(self.embeddings.to(backbone.dtype))

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        return {self.artifact_key: self.embeddings.detach().cpu().clone()}

    @classmethod
    def token_vectors(cls, tensor):
        return tensor.float()  # (n, hidden)

    @classmethod
    def create(cls, config, backbone, labels, generator):
        n, hidden = config.num_tokens, backbone.shapes.hidden_size
        if config.init == "random":
            embeddings = (torch.rand(n, hidden, generator=generator) * 2 - 1) * config.init_range
        else:
            ids = torch.tensor(initial_token_ids(config, backbone.tokenizer, labels, generator))
            embeddings = backbone.embed(ids.to(backbone.device)).detach().cpu()
        return cls(config, backbone.shapes, embeddings).to(backbone.device)

    @classmethod
    def from_tensors(cls, config, backbone, tensors):
        key = cls.artifact_key if cls.artifact_key in tensors else "embeddings"
        return cls(config, backbone.shapes, tensors[key]).to(backbone.device)
