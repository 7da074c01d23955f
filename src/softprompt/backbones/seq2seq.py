"""Encoder-decoder models (T5, the model of Lester et al. 2021) behind the operations the library calls on `Backbone`.

Why a second backbone: in a causal LM the soft prompt P attends only to itself, so its per-layer keys/values are the
same for every input and both methods reduce to one K/V prefix. A T5 encoder is bidirectional: P attends to the
input, its states depend on it, so prompt tuning must run the encoder over the explicit `[P; E]`. That difference
lives here and nowhere else; `backbone_for(model, tokenizer)` returns this class for an encoder-decoder model.

What a prompt hands this backbone (the rest of the library passes it along without looking in):
- prompt tuning: *soft tokens*, not a prefix: `prefix_from_embeddings(P)` is P itself, (n, d_model), which the
  encoder reads in front of the input; the decoder gets nothing. One per row: (B, n, d_model).
- prefix tuning: a K/V prefix (L_enc + L_dec, 2, heads, n, d_kv); its first L_enc layers prefix the encoder's
  self-attention, the rest the decoder's self-attention (Li & Liang 2021; cross-attention is left as it is). One
  per row: (B, L_enc + L_dec, 2, heads, n, d_kv). `shapes.num_layers` counts both stacks, so `Prefix` sizes itself
  unchanged; `prefix_from_ids` gives such a prefix from the frozen model's activations (prefix tuning's word inits).
- `new_cache(prefix, B)` gives a `Seq2SeqCache`. The first `forward` on it reads the prompt: the token ids go to the
  encoder (behind the soft tokens or the encoder prefix) and the decoder is fed its start token; the hidden state
  returned, (B, 1, d_model), predicts the first output token. Later calls feed decoder tokens, as a causal LM's cache
  would, so `generate.generate` decodes an encoder-decoder unchanged.
- `target_hidden(batch, prefix, prefix_mask)`: teacher forcing over `data.collate`'s one layout (a row is the input
  followed by the target; the loss sits at the positions before the target tokens). Each row is split where its
  loss begins: the encoder reads the input, the decoder `[start] + target[:-1]`.
- Prompt slots may be left-padded with masked slots (`stack_prefixes`), one mask for both stacks. T5's relative
  position bias depends on index distances, so the encoder packs each row's real input tokens right after the
  prompt: padding on either side gives the numbers the row gets alone.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from transformers import DynamicCache, EncoderDecoderCache, PreTrainedModel, PreTrainedTokenizerBase

from ..errors import SoftPromptError
from .base import Backbone, Shapes, cache_keyword

SUPPORTED = ("t5", "mt5")
"""Model types whose stacks are T5's (blocks with one relative position bias, shared across layers)."""


@dataclass
class Seq2SeqCache:
    """What `Seq2SeqBackbone.new_cache` hands out: the prompt, and once it is read, the encoder's output."""

    soft_tokens: torch.Tensor | None
    """(B, n, d_model) soft tokens for the encoder (prompt tuning), or None."""
    encoder_prefix: torch.Tensor | None
    """(B, L_enc, 2, heads, n, d_kv) encoder self-attention prefix (prefix tuning), or None."""
    decoder: EncoderDecoderCache
    """Decoder self-attention (pre-filled with its prefix, if any) and cross-attention caches."""
    slots: int
    """n, the prompt's slots."""
    encoder_states: torch.Tensor | None = None
    """(B, S, d_model) once the prompt has been read."""
    encoder_mask: torch.Tensor | None = None
    """(B, S) which encoder states are real."""

    def get_seq_length(self) -> int:
        """Decoder positions held (prefix slots and fed tokens), as `DynamicCache.get_seq_length`."""
        return self.decoder.get_seq_length()


class Seq2SeqBackbone(Backbone):
    """A frozen T5-style encoder-decoder plus the operations the prompt methods, training, scoring and generation
    need from it (see the module docstring for what a prompt hands it)."""

    kind = "encoder-decoder"
    cannot = {
        "pack rows for training": "packing is for causal LMs; an encoder-decoder trains through target_hidden",
        "use gradient checkpointing": "T5 blocks are not checkpointed with their prefix yet; train without it",
        "shard its layers": "sharding (--shard-model, FSDP) is for causal LMs; train T5 unsharded",
        "compile its layers": "--compile is for causal LMs; train T5 without it",
        "batch continuously": "the serving engine batches decoder-only (causal LM) models only. Serve a causal LM, "
        "or use `softprompt generate` / `softprompt eval` with this model",
    }

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        config = model.config
        if config.model_type not in SUPPORTED:
            raise SoftPromptError(
                f"encoder-decoder model type {config.model_type!r} is not supported; supported: {', '.join(SUPPORTED)}"
            )
        if config._attn_implementation not in ("eager", "sdpa"):
            raise SoftPromptError(
                f"attention implementation {config._attn_implementation!r} is not supported for {config.model_type}; "
                "load the model with attn_implementation='sdpa' or 'eager'"
            )
        start = config.decoder_start_token_id
        if start is None:
            start = getattr(getattr(model, "generation_config", None), "decoder_start_token_id", None)
        if start is None:
            raise SoftPromptError(f"{config.model_type} model without decoder_start_token_id in its config")
        encoder, decoder = model.get_encoder(), model.get_decoder()
        layers = len(encoder.block) + len(decoder.block)
        super().__init__(model, tokenizer, Shapes(layers, config.num_heads, config.d_kv, config.d_model,
                                                  config.vocab_size))  # fmt: skip
        self.encoder, self.decoder = encoder, decoder
        self.start_id = int(start)
        self.encoder_layers = len(encoder.block)
        # Original T5 (tied embeddings) rescales the decoder output before the head; v1.1 does not.
        scaled = getattr(config, "scale_decoder_outputs", config.tie_word_embeddings)
        self.output_scale = config.d_model**-0.5 if scaled else None
        self._cache_keyword = cache_keyword(self.decoder)
        self._block_cache_keyword = cache_keyword(self.encoder.block[0])
        # before transformers 5.24 a block places its relative position bias by `cache_position`, later by its cache
        self._block_takes_positions = "cache_position" in inspect.signature(self.encoder.block[0].forward).parameters

    # --- prompts -----------------------------------------------------------------------------------------------

    def prefix_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Prompt tuning hands this backbone soft tokens, not a prefix: P itself, (n, d_model). The encoder reads
        `[P; E]`, since P's states depend on the input in a bidirectional encoder. Differentiable (it is the input)."""
        return embeddings

    def prefix_from_ids(self, input_ids: list[int]) -> torch.Tensor:
        """A K/V prefix (L_enc + L_dec, 2, heads, n, d_kv) from the frozen model's own activations over these tokens
        (prefix tuning's word inits): encoder self-attention over them, then decoder self-attention over them read
        as the decoder's text, attending to their encoding."""
        with torch.no_grad():
            ids = torch.tensor([input_ids], device=self.device)  # (1, n)
            mask = torch.ones_like(ids)
            encoder_cache = DynamicCache()  # collects each encoder layer's keys/values
            states = self._run_encoder(self.embed(ids), mask, encoder_cache)
            decoder_cache = EncoderDecoderCache(DynamicCache(), DynamicCache())
            self.decoder(input_ids=ids, encoder_hidden_states=states, encoder_attention_mask=mask, use_cache=True,
                         **{self._cache_keyword: decoder_cache})  # fmt: skip
            layers = [*encoder_cache.layers, *decoder_cache.self_attention_cache.layers]
            return torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in layers])

    def prefix_problems(self, prefix: torch.Tensor, prefix_mask: torch.Tensor | None, rows: int) -> list[str]:
        """What is wrong with a prefix for `rows` rows (empty when nothing): the checks generation runs first."""
        s = self.shapes
        kv_layout = f"(..., {s.num_layers}, 2, {s.num_kv_heads}, n, {s.head_dim})"
        if prefix.dim() in (2, 3):
            shared = prefix.dim() == 2
            if prefix.shape[-1] != s.hidden_size:
                return [f"soft prompt shape {tuple(prefix.shape)} does not match the model: expected (..., n, "
                        f"{s.hidden_size})"]  # fmt: skip
        elif prefix.dim() in (5, 6):
            shared = prefix.dim() == 5
            if tuple(prefix.shape[-5:-2]) + (prefix.shape[-1],) != (s.num_layers, 2, s.num_kv_heads, s.head_dim):
                return [f"prefix shape {tuple(prefix.shape)} does not match the model: expected {kv_layout}"]
        else:
            return [
                f"prefix shape {tuple(prefix.shape)}: expected soft tokens (n, {s.hidden_size}) or a K/V prefix "
                f"{kv_layout}, shared (no batch dimension) or one per row"
            ]
        problems = []
        if not shared and prefix.shape[0] != rows:
            problems.append(f"per-row prefix has {prefix.shape[0]} rows for {rows} prompts")
        if prefix_mask is not None and tuple(prefix_mask.shape) != (rows, prefix.shape[-2]):
            problems.append(f"prefix_mask shape {tuple(prefix_mask.shape)} should be (rows, prefix slots) = "
                            f"({rows}, {prefix.shape[-2]})")  # fmt: skip
        return problems

    def stack_prefixes(self, prefixes: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """One per-row prefix for a mixed batch, shorter ones left-padded with masked slots: (B, n, d_model) soft
        tokens or (B, L_enc + L_dec, 2, heads, n, d_kv) K/V, and the mask (B, n). Rows without a prompt pass None.
        Soft tokens and K/V prefixes go to different places here, so one batch takes one kind."""
        kinds = {p.dim() for p in prefixes if p is not None}
        if kinds - {2, 5}:
            raise SoftPromptError(
                f"each row's prompt must be soft tokens (n, d_model) or a K/V prefix (layers, 2, heads, n, d_kv); got "
                f"{sorted(kinds)}-dimensional tensors"
            )
        if len(kinds) > 1:
            raise SoftPromptError(
                "an encoder-decoder batch cannot mix prompt-tuned and prefix-tuned prompts: the first enter the "
                "encoder's input, the second its attention layers; score them in separate batches"
            )
        if kinds != {2}:
            return super().stack_prefixes(prefixes)  # K/V prefixes (or none): the same left-padding as a causal LM
        n = max(p.shape[0] for p in prefixes if p is not None)
        stacked = torch.zeros(len(prefixes), n, self.shapes.hidden_size, dtype=self.dtype, device=self.device)
        mask = torch.zeros(len(prefixes), n, dtype=torch.long, device=self.device)
        for row, prefix in enumerate(prefixes):
            if prefix is not None and prefix.shape[0]:
                stacked[row, n - prefix.shape[0] :] = prefix
                mask[row, n - prefix.shape[0] :] = 1
        return stacked, mask  # (B, n, d_model), (B, n)

    # --- running the model -------------------------------------------------------------------------------------

    def new_cache(self, prefix: torch.Tensor | None, batch_size: int) -> Seq2SeqCache:
        """An empty cache holding the prompt (soft tokens or a K/V prefix), expanded to the batch when shared."""
        soft_tokens = encoder_prefix = None
        decoder_self = DynamicCache()
        if prefix is not None and prefix.dim() in (2, 3):
            soft_tokens = prefix.expand(batch_size, *prefix.shape[-2:])  # (B, n, d_model)
        elif prefix is not None:
            if prefix.dim() == 5:
                prefix = prefix.unsqueeze(0).expand(batch_size, *prefix.shape)  # (B, layers, 2, heads, n, d_kv)
            encoder_prefix = prefix[:, : self.encoder_layers]
            decoder_self = DynamicCache([(layer[:, 0], layer[:, 1]) for layer in prefix[:, self.encoder_layers :]
                                         .unbind(1)])  # fmt: skip
        slots = 0 if prefix is None else prefix.shape[-2]
        return Seq2SeqCache(soft_tokens, encoder_prefix, EncoderDecoderCache(decoder_self, DynamicCache()), slots)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        cache: Seq2SeqCache,
        past_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """First call on a cache: `input_ids` (B, T) are the prompt; the encoder reads them and the decoder its start
        token; returns the decoder's hidden state (B, 1, d_model) and the decoder's mask. past_mask: (B, n) which
        prompt slots are real. Later calls: decoder tokens after whatever the cache holds, as in `Backbone.forward`
        (past_mask is then the mask a previous call returned)."""
        batch = input_ids.shape[0]
        if cache.encoder_states is None:
            past_mask = self._read_prompt(cache, input_ids, attention_mask, past_mask)
            start = torch.full((batch, 1), self.start_id, dtype=torch.long, device=input_ids.device)
            return self._decode(start, torch.ones_like(start), cache, past_mask)
        if past_mask is None:
            past_mask = attention_mask.new_ones(batch, cache.get_seq_length())
        return self._decode(input_ids, attention_mask, cache, past_mask)

    def target_hidden(
        self, batch, prompt_input: torch.Tensor | None, prefix_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Teacher forcing: the decoder's final hidden states that predict the batch's loss tokens, (K, d_model), in
        their order. `batch` is `data.collate`'s layout, on this device: each row is split where its loss begins."""
        ids, mask = batch.input_ids, batch.attention_mask  # (B, T) input then target, right-padded
        rows, T = ids.shape
        lengths = mask.sum(-1)  # (B,)
        # first target index per row: one past the row's first loss position (rows without a loss: all input)
        start = lengths.clone().scatter_reduce(0, batch.loss_rows, batch.loss_positions + 1, "amin")
        columns = torch.arange(T, device=ids.device)
        encoder_mask = (columns[None] < start[:, None]).long() * mask  # (B, T) the input part
        # decoder input [start] + target[:-1]: column j reads row index start - 1 + j, its column 0 the start token
        width = max(1, int((lengths - start).max()))
        j = torch.arange(width, device=ids.device)
        decoder_mask = (j[None] < (lengths - start)[:, None]).long()  # (B, width)
        decoder_ids = ids.gather(1, (start[:, None] - 1 + j[None]).clamp(0, T - 1))  # (B, width)
        decoder_ids[:, 0] = self.start_id
        decoder_ids = decoder_ids.masked_fill(decoder_mask == 0, self.pad_id)
        cache = self.new_cache(prompt_input, rows)
        past_mask = self._read_prompt(cache, ids, encoder_mask, prefix_mask)
        hidden, _ = self._decode(decoder_ids, decoder_mask, cache, past_mask)  # (B, width, d_model)
        return hidden[batch.loss_rows, batch.loss_positions + 1 - start[batch.loss_rows]]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over any (..., d_model) selection of decoder hidden states."""
        if self.output_scale is not None:
            hidden = hidden * self.output_scale
        return self.head(hidden).float()

    def _read_prompt(
        self, cache: Seq2SeqCache, ids: torch.Tensor, mask: torch.Tensor, slot_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Encode the prompt into the cache; returns the decoder's past mask (its prefix slots, or none)."""
        batch = ids.shape[0]
        if slot_mask is None:
            slot_mask = mask.new_ones(batch, cache.slots)
        slot_mask = slot_mask.to(mask.dtype)
        # Real tokens first, in order, so the prompt's last real slot sits right before the input's first token.
        order = torch.sort((mask == 0).to(torch.uint8), dim=-1, stable=True).indices  # (B, T)
        ids, mask = ids.gather(1, order), mask.gather(1, order)
        embeds = self.embed(ids)  # (B, T, d_model)
        encoder_cache = None
        if cache.soft_tokens is not None:
            embeds = torch.cat([cache.soft_tokens.to(embeds.dtype), embeds], dim=1)  # (B, n + T, d_model): [P; E]
            mask = torch.cat([slot_mask, mask], dim=-1)
            keys_mask = mask
        else:
            keys_mask = torch.cat([slot_mask, mask], dim=-1)  # (B, n + T): prefix slots, then the tokens
            if cache.encoder_prefix is not None:
                encoder_cache = DynamicCache([(layer[:, 0], layer[:, 1]) for layer in cache.encoder_prefix.unbind(1)])
        cache.encoder_states = self._run_encoder(embeds, keys_mask, encoder_cache)
        cache.encoder_mask = mask
        has_decoder_prefix = cache.encoder_prefix is not None
        return slot_mask if has_decoder_prefix else slot_mask[:, :0]

    def _run_encoder(
        self, embeds: torch.Tensor, keys_mask: torch.Tensor, cache: DynamicCache | None
    ) -> torch.Tensor:
        """The encoder stack over `embeds` (B, S, d_model). With `cache` (its prefix keys/values, n per layer), every
        self-attention also sees those slots, placed before the tokens; keys_mask (B, n + S) says which keys are
        real. Its own loop: transformers' encoder stack drops any cache it is given."""
        additive = (1.0 - keys_mask[:, None, None, :].to(embeds.dtype)) * torch.finfo(embeds.dtype).min  # (B,1,1,K)
        hidden, position_bias = self.encoder.dropout(embeds), None
        extra = {self._block_cache_keyword: cache}
        if self._block_takes_positions:
            past = cache.get_seq_length() if cache is not None else 0
            extra["cache_position"] = torch.arange(past, past + embeds.shape[1], device=embeds.device)  # (S,)
        for block in self.encoder.block:
            # the first block computes the relative position bias (queries after the cached slots); the rest share it
            hidden, position_bias = block(hidden, additive, position_bias, **extra)[:2]  # 5.24 adds attention weights
        return self.encoder.dropout(self.encoder.final_layer_norm(hidden))

    def _decode(
        self, ids: torch.Tensor, mask: torch.Tensor, cache: Seq2SeqCache, past_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Decoder tokens (B, T) after what the cache's decoder holds; returns (B, T, d_model) and the full mask."""
        full_mask = torch.cat([past_mask, mask], dim=-1)  # (B, past + T)
        out = self.decoder(
            input_ids=ids,
            attention_mask=full_mask,
            encoder_hidden_states=cache.encoder_states,
            encoder_attention_mask=cache.encoder_mask,
            use_cache=True,
            **{self._cache_keyword: cache.decoder},
        )
        return out.last_hidden_state, full_mask

    def select_rows(self, cache: Seq2SeqCache, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Keep only `rows` of a cache whose prompt has been read, in place; returns their decoder mask."""
        index = torch.tensor(rows, dtype=torch.long, device=mask.device)
        cache.decoder.self_attention_cache.batch_select_indices(index)
        cache.decoder.cross_attention_cache.batch_select_indices(index)
        cache.encoder_states, cache.encoder_mask = cache.encoder_states[index], cache.encoder_mask[index]
        return mask[index]
