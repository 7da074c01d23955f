"""The frozen model, seen as a stack of attention layers that accept a key/value prefix.

Every contact with transformers' moving parts (Cache classes, attention masks, position ids) lives here, so a
transformers upgrade touches one file. Both prompt methods hand this module a per-layer K/V prefix of shape
(num_layers, 2, kv_heads, n, head_dim), shared by all rows, or (B, num_layers, 2, kv_heads, n, head_dim), one per row.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase


@dataclass(frozen=True)
class Shapes:
    """Sizes of the frozen model that a prompt must match."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def of(cls, config) -> "Shapes":
        config = config.get_text_config(decoder=True)
        get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None) is not None)  # noqa: E731
        hidden = get("hidden_size", "n_embd", "d_model")
        heads = get("num_attention_heads", "n_head")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or hidden // heads  # Qwen3 states head_dim explicitly
        return cls(get("num_hidden_layers", "n_layer"), kv_heads, head_dim, hidden, config.vocab_size)


class Backbone:
    """A frozen causal LM plus the operations the prompt methods need from it."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        self.model = model.requires_grad_(False)  # the one freezing call: nothing of the base model ever trains
        self.tokenizer = tokenizer
        self.shapes = Shapes.of(model.config)
        self.decoder = model.base_model  # the transformer stack without the LM head
        self.head = model.get_output_embeddings()
        self.softcap = getattr(model.config.get_text_config(decoder=True), "final_logit_softcapping", None)

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def prefix_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Per-layer K/V of the frozen model run over `embeddings` (n, hidden) at batch 1: exactly what every row of
        `[P; E]` sees at those positions, since in a causal model P attends only to itself. Differentiable."""
        out = self.decoder(inputs_embeds=embeddings[None], use_cache=True)
        layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in out.past_key_values.layers]
        return torch.stack(layers)  # (num_layers, 2, kv_heads, n, head_dim)

    def prefix_from_ids(self, input_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            ids = torch.tensor(input_ids, device=self.device)
            return self.prefix_from_embeddings(self.embed(ids))

    def new_cache(self, prefix: torch.Tensor | None, batch_size: int) -> DynamicCache:
        """A transformers cache pre-filled with the prefix, expanded to the batch when it is shared."""
        if prefix is None:
            return DynamicCache(config=self.model.config)
        if prefix.dim() == 5:
            prefix = prefix.unsqueeze(0).expand(batch_size, *prefix.shape)  # (B, layers, 2, kv_heads, n, head_dim)
        layers = [(prefix[:, i, 0], prefix[:, i, 1]) for i in range(prefix.shape[1])]
        return DynamicCache(layers, config=self.model.config)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: DynamicCache,
        past_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Run new tokens after whatever `cache` holds (prefix, earlier tokens), updating the cache in place.

        input_ids, attention_mask: (B, T), 1 for real tokens (left or right padding both work).
        past_mask: (B, past_length), which cached slots are real; all real when None.
        Returns the final hidden states (B, T, hidden) and the full mask (B, past_length + T) for the next call.
        """
        batch, past_length = input_ids.shape[0], cache.get_seq_length()
        if past_mask is None:
            past_mask = attention_mask.new_ones(batch, past_length)
        # Each real token's position counts only the real slots before it; pads get a harmless clamp.
        positions = past_mask.sum(-1, keepdim=True) + attention_mask.cumsum(-1) - 1
        full_mask = torch.cat([past_mask, attention_mask], dim=-1)
        out = self.decoder(
            input_ids=input_ids,
            attention_mask=full_mask,
            position_ids=positions.clamp(min=0),
            past_key_values=cache,
            use_cache=True,
        )
        return out.last_hidden_state, full_mask

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over any (..., hidden) selection of hidden states: callers pass only the positions they need."""
        logits = self.head(hidden)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits.float()
