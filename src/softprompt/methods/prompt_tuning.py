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
    supports_residual = True
    peft_types = ("PROMPT_TUNING", "P_TUNING")  # P-tuning saves its encoder's output: plain virtual embeddings
    default_lr = 0.01

    def __init__(self, config, shapes, embeddings: torch.Tensor):
        super().__init__(config, shapes)
        self.embeddings = nn.Parameter(embeddings.detach().clone().float())  # (num_tokens, hidden)
        if config.residual:
            hidden = shapes.hidden_size
            self.residual = nn.Sequential(nn.Linear(hidden, config.mlp_hidden), nn.ReLU(),
                                          nn.Linear(config.mlp_hidden, hidden), nn.LayerNorm(hidden))  # fmt: skip
            nn.init.zeros_(self.residual[3].weight)  # the prompt starts as its init exactly; gradients still flow

    def prompt(self) -> torch.Tensor:
        """P (num_tokens, hidden), through the residual MLP when there is one."""
        if self.config.residual:
            return self.embeddings + self.residual(self.embeddings)
        return self.embeddings

    def kv(self, backbone) -> torch.Tensor:
        return backbone.prefix_from_embeddings(self.prompt().to(backbone.dtype))

    def training_input(self, backbone) -> torch.Tensor:
        """P itself, (n, hidden): every backbone's `target_hidden` reads it in the batch's own pass where it can
        (a causal one puts it in front of the packed row), so its K/V need no separate pass at batch 1."""
        return self.prompt().to(backbone.dtype)

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {self.artifact_key: self.prompt().detach().float().cpu().clone()}

    @classmethod
    def token_vectors(cls, tensor):
        return tensor.float()  # (n, hidden)

    @classmethod
    def from_token_vectors(cls, vectors, shapes):
        return vectors

    @classmethod
    def peft_config(cls, shapes):
        return {
            "peft_type": cls.peft_types[0],
            "token_dim": shapes.hidden_size,
            "num_attention_heads": None,  # PEFT fills it from the model's config; prompt tuning does not use it
            "prompt_tuning_init": "RANDOM",  # how it started does not matter once trained
            "prompt_tuning_init_text": None,
            "tokenizer_name_or_path": None,
            "tokenizer_kwargs": None,
        }

    @classmethod
    def peft_problems(cls, config, vectors, shapes):
        if vectors.shape[1] != shapes.hidden_size:
            return [f"virtual tokens of width {vectors.shape[1]}, the model's hidden size is {shapes.hidden_size}"]
        return []

    @classmethod
    def create(cls, config, backbone, labels, generator, demo_ids=None):
        n, hidden = config.num_tokens, backbone.shapes.hidden_size
        if config.init == "random":
            embeddings = (torch.rand(n, hidden, generator=generator) * 2 - 1) * config.init_range
        else:
            ids = initial_token_ids(config, backbone.tokenizer, labels, generator, demo_ids)
            ids = torch.tensor(ids, device=backbone.device)
            embeddings = backbone.embed(ids).detach().cpu()
        return cls(config, backbone.shapes, embeddings).to(backbone.device)

    @classmethod
    def from_tensors(cls, config, backbone, tensors):
        if config.residual and "residual.0.weight" in tensors:  # a training checkpoint with its residual MLP
            method = cls(config, backbone.shapes, tensors["embeddings"])
            method.load_state_dict(tensors)
            return method.to(backbone.device)
        key = cls.artifact_key if cls.artifact_key in tensors else "embeddings"
        return cls(config.folded(), backbone.shapes, tensors[key]).to(backbone.device)  # plain embeddings
