"""Prefix tuning: trainable key/value vectors prepended at the input of every attention layer.

Li & Liang (2021), "Prefix-Tuning: Optimizing Continuous Prompts for Generation"; deep prompts as in
Liu et al. (2022), "P-Tuning v2". Optionally trained through an MLP reparameterization P = MLP(P'), which
`artifact_tensors()` folds ("ejects") into plain key/values. Li & Liang advise, for little data, starting from
the frozen model's own activations on real words: the non-random inits do that. On an encoder-decoder (T5) the
layers are the encoder's self-attention then the decoder's (`Seq2SeqBackbone.shapes.num_layers` counts both).
"""

from __future__ import annotations

import torch
from torch import nn

from .base import PromptMethod, initial_token_ids


class Prefix(PromptMethod):
    name = "prefix"
    artifact_key = "prefix"
    token_axis = -2  # (layers, 2, kv_heads, num_tokens, head_dim)
    in_embedding_space = False
    supports_mlp = True
    peft_types = ("PREFIX_TUNING",)  # with prefix_projection PEFT saves the MLP's output: the same layout
    default_lr = 0.03  # at 300 steps it beat 0.01 by 3 and 21 points on two tasks of defaults.py, level on two

    @classmethod
    def token_vectors(cls, tensor):
        n = tensor.shape[-2]
        return tensor.float().permute(3, 0, 1, 2, 4).reshape(n, -1)  # (n, layers * 2 * kv_heads * head_dim)

    @classmethod
    def from_token_vectors(cls, vectors, shapes):
        s, n = shapes, vectors.shape[0]
        per_token = vectors.view(n, s.num_layers, 2, s.num_kv_heads, s.head_dim)  # per token, layer-major, K then V
        return per_token.permute(1, 2, 3, 0, 4).contiguous()  # (layers, 2, kv_heads, n, head_dim)

    @classmethod
    def peft_config(cls, shapes):
        token_dim = shapes.num_kv_heads * shapes.head_dim
        return {
            "peft_type": cls.peft_types[0],
            "token_dim": token_dim,
            "num_attention_heads": shapes.num_kv_heads,  # PEFT's view for grouped-query attention
            "encoder_hidden_size": token_dim,
            "prefix_projection": False,  # an artifact holds plain key/values, any MLP already folded
            "init_weights": None,
        }

    @classmethod
    def peft_problems(cls, config, vectors, shapes):
        s, problems = shapes, []
        expected = s.num_layers * 2 * s.num_kv_heads * s.head_dim
        layers, heads = config.get("num_layers"), config.get("num_attention_heads")
        if layers is not None and layers != s.num_layers:
            problems.append(f"num_layers {layers}, the model has {s.num_layers}")
        if heads is not None and heads != s.num_kv_heads:
            problems.append(f"num_attention_heads {heads}, the model has {s.num_kv_heads} key/value heads")
        if vectors.shape[1] != expected:
            problems.append(f"prefix rows of width {vectors.shape[1]}, the model needs num_layers x 2 x kv_heads x "
                            f"head_dim = {s.num_layers} x 2 x {s.num_kv_heads} x {s.head_dim} = {expected}")
        return problems

    def __init__(self, config, shapes, prefix: torch.Tensor | None = None):
        super().__init__(config, shapes)
        s = shapes
        kv_shape = (s.num_layers, 2, s.num_kv_heads, config.num_tokens, s.head_dim)
        if config.prefix_mlp:
            flat = s.num_layers * 2 * s.num_kv_heads * s.head_dim
            self.seed = nn.Parameter(torch.empty(config.num_tokens, s.hidden_size).uniform_(-1, 1))
            self.mlp = nn.Sequential(
                nn.Linear(s.hidden_size, config.mlp_hidden), nn.Tanh(), nn.Linear(config.mlp_hidden, flat)
            )
            if prefix is not None:
                self._fit_mlp(prefix)
        else:
            if prefix is None:
                prefix = torch.zeros(kv_shape)
            self.prefix = nn.Parameter(prefix.detach().clone().float())  # (layers, 2, kv_heads, n, head_dim)

    def _mlp_kv(self) -> torch.Tensor:
        s, n = self.shapes, self.config.num_tokens
        flat = self.mlp(self.seed)  # (n, layers * 2 * kv_heads * head_dim)
        return flat.view(n, s.num_layers, 2, s.num_kv_heads, s.head_dim).permute(1, 2, 3, 0, 4)

    def _fit_mlp(self, target: torch.Tensor, steps: int = 300) -> None:
        """Start the MLP at given key/values (an activation init): a short regression, seconds even on a CPU."""
        optimizer = torch.optim.Adam(self.parameters(), lr=1e-3)
        for _ in range(steps):
            optimizer.zero_grad()
            loss = torch.nn.functional.mse_loss(self._mlp_kv(), target)
            loss.backward()
            optimizer.step()

    def kv(self, backbone) -> torch.Tensor:
        kv = self._mlp_kv() if self.config.prefix_mlp else self.prefix
        return kv.to(backbone.dtype)  # (layers, 2, kv_heads, n, head_dim)

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            kv = self._mlp_kv() if self.config.prefix_mlp else self.prefix
            return {self.artifact_key: kv.float().contiguous().cpu().clone()}

    @classmethod
    def create(cls, config, backbone, labels, generator, demo_ids=None):
        s, n = backbone.shapes, config.num_tokens
        if config.init == "random" and config.prefix_mlp:
            return cls(config, s).to(backbone.device)  # the MLP's own initialization
        if config.init == "random":
            prefix = (torch.rand(s.num_layers, 2, s.num_kv_heads, n, s.head_dim, generator=generator) * 2 - 1)
            prefix = prefix * config.init_range
        else:
            ids = initial_token_ids(config, backbone.tokenizer, labels, generator, demo_ids)
            prefix = backbone.prefix_from_ids(ids).float().cpu()
        return cls(config, s, prefix).to(backbone.device)

    @classmethod
    def from_tensors(cls, config, backbone, tensors):
        if config.prefix_mlp and "mlp.0.weight" in tensors:  # a training checkpoint with its MLP
            method = cls(config, backbone.shapes)
            method.load_state_dict(tensors)
            return method.to(backbone.device)
        return cls(config.folded(), backbone.shapes, tensors[cls.artifact_key]).to(backbone.device)  # plain key/values
