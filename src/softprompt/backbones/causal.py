"""A decoder-only (causal) LM as a stack of attention layers that accept a key/value prefix.

In a causal model the soft tokens attend only to each other, so both prompt methods reach it as a per-layer K/V
prefix (num_layers, 2, kv_heads, n, head_dim), shared by all rows, or (B, num_layers, 2, kv_heads, n, head_dim), one
per row, put in the model's own cache in front of the tokens. This file holds our calls into transformers' cache,
masks and positions for such models; `cache_rows.py` reshapes a running batch's cache, `replay.py` checkpoints layers.
"""

from __future__ import annotations

from functools import cached_property

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from ..errors import SoftPromptError
from . import cache_rows
from .base import Backbone, Shapes, cache_keyword, execution_device
from .compiled import compiler_problem
from .head import HeadTransform, check_head
from .replay import replaying

PACK_WIDTH = 256
"""Tokens per packed row in `packed_forward`: masked attention over a packed row costs O(width) per token, small next
to the layers' matmuls at this width."""


class CausalBackbone(Backbone):
    """A frozen causal LM plus the operations the prompt methods need from it."""

    kind = "causal LM"

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase):
        super().__init__(model, tokenizer, Shapes.of(model.config))
        self.decoder = model.base_model  # the transformer stack without the LM head
        self.head_transform = HeadTransform.of(model.config)
        check_head(self)  # refuses a model whose own forward takes its logits otherwise
        self._checkpointed_layers: list[torch.nn.Module] = []  # the decoder layers, while checkpointing is on
        self._cache_keyword = cache_keyword(self.decoder)
        self._compiled_decoder: torch.nn.Module | None = None  # `compile()`: the training pass's decoder

    def prefix_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """Per-layer K/V of the frozen model run over `embeddings` (n, hidden) at batch 1: exactly what every row of
        `[P; E]` sees at those positions, since in a causal model P attends only to itself. Differentiable."""
        cache = DynamicCache(config=self.model.config)  # the one the model would make, passed so layers can replay
        # whose sliding-window layers would keep only their last window - 1 slots: the prefix needs all n (a cache
        # made from it by `new_cache` keeps what its layers see, and counts every slot's position)
        cache.layers = [DynamicLayer() if getattr(layer, "is_sliding", False) else layer for layer in cache.layers]
        with self._checkpointed(cache):
            self.decoder(inputs_embeds=embeddings[None], use_cache=True, **{self._cache_keyword: cache})
        layers = [torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers]
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
        # unbind, not indexing per layer: its backward is one stack, where 2 x layers index backwards would each
        # zero-fill and add a prefix-sized gradient
        layers = [tuple(layer.unbind(1)) for layer in prefix.unbind(1)]  # per layer: keys, values (B, kv, n, hd)
        if self.layer_devices:  # a device map: each layer's prefix on its layer's device, where its keys meet it
            layers = [(k.to(device), v.to(device)) for (k, v), device in zip(layers, self.layer_devices)]
        return DynamicCache(layers, config=self.model.config)

    @cached_property
    def layer_devices(self) -> list[torch.device] | None:
        """Each attention layer's device when a device map spreads the model over several (None on one device)."""
        if len(set(getattr(self.model, "hf_device_map", {}).values())) < 2:
            return None
        layers = [m for m in self.decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
        if len(layers) != self.shapes.num_layers:
            raise SoftPromptError(f"{type(self.model).__name__}: {len(layers)} decoder layers for "
                                  f"{self.shapes.num_layers} attention layers; it cannot be spread over devices.")
        return [execution_device(layer) for layer in layers]

    def prefix_problems(self, prefix: torch.Tensor, prefix_mask: torch.Tensor | None, rows: int) -> list[str]:
        """What is wrong with a prefix for `rows` rows (empty when nothing): the checks callers run first."""
        s = self.shapes
        if prefix.dim() not in (5, 6):
            return [f"prefix must have 5 dims (shared) or 6 (per row), got shape {tuple(prefix.shape)}"]
        problems = []
        if tuple(prefix.shape[-5:-2]) + (prefix.shape[-1],) != (s.num_layers, 2, s.num_kv_heads, s.head_dim):
            problems.append(f"prefix shape {tuple(prefix.shape)} does not match the model: expected "
                            f"(..., {s.num_layers}, 2, {s.num_kv_heads}, n, {s.head_dim})")  # fmt: skip
        if prefix.dim() == 6 and prefix.shape[0] != rows:
            problems.append(f"per-row prefix has {prefix.shape[0]} rows for {rows} prompts")
        if prefix_mask is not None and tuple(prefix_mask.shape) != (rows, prefix.shape[-2]):
            problems.append(f"prefix_mask shape {tuple(prefix_mask.shape)} should be (rows, prefix slots) = "
                            f"({rows}, {prefix.shape[-2]})")  # fmt: skip
        return problems

    def target_hidden(self, batch, prompt_input: torch.Tensor | None, prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: the final hidden states that predict the batch's loss tokens, (K, hidden), in their order.
        `batch` is `data.collate`'s layout (input then target per row) on this device. A shared prefix's rows are
        packed densely, so nothing is computed on pads (benchmarks/train_speed.py --padded shows the gain).
        prompt_input: a K/V prefix, or soft tokens (n, hidden), which then run in the same pass as the rows
        (`packed_forward`)."""
        if prompt_input is None:
            hidden, _ = self.forward(batch.input_ids, batch.attention_mask, self.new_cache(None, len(batch.input_ids)))
        else:
            hidden = self.packed_forward(prompt_input, batch.input_ids, batch.attention_mask, prefix_mask)
        return hidden[batch.loss_rows, batch.loss_positions]

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
        with self._checkpointed(cache):
            out = self.decoder(
                input_ids=input_ids,
                attention_mask=full_mask,
                position_ids=positions.clamp(min=0),
                use_cache=True,
                **{self._cache_keyword: cache},
            )
        return out.last_hidden_state, full_mask

    def as_kv(self, prefix: torch.Tensor) -> torch.Tensor:
        """A K/V prefix as it is, or the K/V of a soft prompt's embeddings (n, hidden)."""
        return self.prefix_from_embeddings(prefix) if prefix.dim() == 2 else prefix

    def side_by_side(self, prefixes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Every distinct prompt's slots side by side in one shared prefix (num_layers, 2, kv_heads, sum of n,
        head_dim), and a (B, sum of n) mask that lets each row see its own prompt's slots only: `packed_forward`
        then packs the rows as for one prompt (a per-row prefix would take the padded path). A slot's key keeps the
        position it was computed at, and a row's tokens are placed after its own prompt's length, so each row gets
        what it gets behind its prompt alone. A prompt given as embeddings is first turned into its K/V."""
        distinct = {id(p): p for p in prefixes}  # each prompt once, in order of first use
        distinct = {key: self.as_kv(p) for key, p in distinct.items()}
        spans, start = {}, 0
        for key, prefix in distinct.items():
            spans[key] = slice(start, start + prefix.shape[-2])
            start += prefix.shape[-2]
        mask = torch.zeros(len(prefixes), start, dtype=torch.long, device=self.device)
        for row, prefix in enumerate(prefixes):
            mask[row, spans[id(prefix)]] = 1
        return torch.cat(list(distinct.values()), dim=-2), mask

    def packed_forward(
        self,
        prompt_input: torch.Tensor,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        prefix_mask: torch.Tensor | None = None,
        width: int = PACK_WIDTH,
    ) -> torch.Tensor:
        """Training forward after a shared prefix without computing on pads: the real tokens of all rows are packed
        into ceil(real tokens / width) rows, each token seeing the prefix and the earlier tokens of its own row only,
        at the position it has in `forward`. Same numbers as `new_cache` + `forward` up to float rounding; a batch
        costs what its real tokens cost, not its padded width.

        prompt_input: a prefix (num_layers, 2, kv_heads, n, head_dim), or soft tokens (n, hidden) (prompt tuning),
        which run at the front of the packed row in this same pass, where a causal model computes exactly the K/V
        `prefix_from_embeddings` gives, without its separate pass at batch 1 (whose small matrix products run at half
        the speed of these); when the batch packs into several rows, that separate pass runs instead (the README's
        speed section measures both).
        prefix_mask: (B, n), the slots each row sees (`side_by_side`; default all), or with a per-row prefix from
        `stack_prefixes` (which takes the padded path).
        Returns the final hidden states (B, T, hidden), zeros at pads. The cache is internal (nothing to continue).
        Falls back to `forward` where a custom mask would not be honoured (per-row prefixes, attention kernels
        without dense masks, sliding windows shorter than a row).
        """
        batch, T = input_ids.shape
        n = prompt_input.shape[-2]
        soft = prompt_input.dim() == 2  # soft tokens (n, hidden), not K/V
        config = self.model.config.get_text_config(decoder=True)
        lengths = attention_mask.sum(-1).tolist()
        if (prompt_input.dim() == 6 or config._attn_implementation not in ("sdpa", "eager")
                or getattr(config, "attention_chunk_size", None) or n + max(lengths) > self.window):  # fmt: skip
            prefix = self.as_kv(prompt_input)
            hidden, _ = self.forward(input_ids, attention_mask, self.new_cache(prefix, batch), prefix_mask)
            return hidden.masked_fill(~attention_mask.bool()[..., None], 0)
        # Longest rows first, each into the emptiest packed row: loads stay within one row's length of each other.
        bins: list[list[int]] = [[] for _ in range(max(1, min(batch, -(-sum(lengths) // width))))]
        loads = [0] * len(bins)
        for row in sorted(range(batch), key=lambda r: -lengths[r]):
            b = loads.index(min(loads))
            bins[b].append(row)
            loads[b] += lengths[row]
        width = max(loads)  # the longest packed row
        if soft and len(bins) > 1:  # the prompt would run again in front of every packed row: its K/V once at batch 1
            prompt_input, soft = self.prefix_from_embeddings(prompt_input), False  # is less memory, no more time
        real = attention_mask.bool()
        seen = prefix_mask.sum(-1).tolist() if prefix_mask is not None else [n] * batch  # prefix slots per row
        ids = input_ids.new_full((len(bins), width), self.pad_id)
        segment = torch.full((len(bins), width), -1, device=input_ids.device)  # which row each slot holds
        positions = torch.zeros_like(ids)
        source, target = [], []  # flat (B*T) index of each real token, its flat index in the packed rows
        for b, rows in enumerate(bins):
            start = 0
            for row in rows:
                where = real[row].nonzero().squeeze(-1)  # (length,) the row's real tokens
                span = slice(start, start + len(where))
                ids[b, span], segment[b, span] = input_ids[row, where], row
                positions[b, span] = seen[row] + torch.arange(len(where), device=ids.device)
                source.append(row * T + where)
                target.append(b * width + torch.arange(span.start, span.stop, device=ids.device))
                start = span.stop
        # A slot sees its row's prefix slots and the earlier slots of its own row; empty slots see only the prefix.
        causal = torch.ones(width, width, dtype=torch.bool, device=ids.device).tril()
        same_row = (segment[:, :, None] == segment[:, None, :]) & (segment[:, None, :] >= 0) & causal
        sees = same_row.new_ones(len(bins), width, n)  # (R, width, n)
        if prefix_mask is not None:
            sees = prefix_mask.bool()[segment.clamp(min=0)] | (segment < 0)[..., None]
        allowed = torch.cat([sees, same_row], dim=-1)  # (R, width, n + width)
        inputs = {"input_ids": ids}
        if soft:  # the prompt's n slots lead every packed row, causal among themselves, seeing no token
            prompt_rows = torch.ones(n, n, dtype=torch.bool, device=ids.device).tril()  # (n, n)
            prompt_rows = torch.cat([prompt_rows, prompt_rows.new_zeros(n, width)], -1).expand(len(bins), -1, -1)
            allowed = torch.cat([prompt_rows, allowed], dim=1)  # (R, n + width, n + width)
            embeds = torch.cat([prompt_input.expand(len(bins), -1, -1), self.embed(ids)], dim=1)  # (R, n + width, hidden)
            positions = torch.cat([torch.arange(n, device=ids.device).expand(len(bins), -1), positions], dim=1)
            inputs = {"inputs_embeds": embeds}
        mask = torch.zeros(allowed.shape, dtype=self.dtype, device=ids.device)
        mask = mask.masked_fill(~allowed, torch.finfo(self.dtype).min)[:, None]  # (R, 1, queries, keys) additive
        cache = self.new_cache(None if soft else prompt_input, len(bins))
        compiled = self._compiled_decoder is not None and torch.is_grad_enabled()
        decoder = self._compiled_decoder if compiled else self.decoder
        with self._checkpointed(cache):
            out = decoder(**inputs, attention_mask=mask, position_ids=positions, use_cache=True,
                          **{self._cache_keyword: cache})  # fmt: skip
        packed = out.last_hidden_state[:, -width:].reshape(len(bins) * width, -1)  # (R * width, hidden) no prompt
        hidden = packed.new_zeros(batch * T, packed.shape[-1])
        hidden = hidden.index_copy(0, torch.cat(source), packed[torch.cat(target)])
        return hidden.view(batch, T, -1)

    def shard_layers(self, device: torch.device) -> int:
        """Shard every decoder layer's frozen weights across the processes of the running torch.distributed group
        (FSDP2 `fully_shard`, each layer its own unit: its weights are gathered for its forward and freed after),
        then move the rest to `device`. Call it on a model still on the CPU, so no device ever holds it whole.
        Embeddings, final norm and LM head stay whole on every process: the backbone calls them directly, and models
        often tie the head to the embeddings. Returns the frozen parameters this process now holds."""
        from torch.distributed.fsdp import fully_shard
        from torch.distributed.tensor import DTensor

        self.fingerprint  # noqa: B018  (taken while the weights are whole)
        for layer in self._decoder_layers():
            fully_shard(layer)  # moves the layer's shard to the process's device
        for module in self.model.modules():  # the unsharded rest; `.data` keeps tied parameters tied
            for param in module._parameters.values():
                if param is not None and not isinstance(param, DTensor):
                    param.data = param.data.to(device)
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    module._buffers[name] = buffer.to(device)
        return sum(getattr(p, "_local_tensor", p).numel() for p in self.model.parameters())

    def compile(self) -> str | None:
        """Compile the decoder for the training pass (`compiled.py`); returns None, or why it stays eager."""
        problem = compiler_problem(self.device)
        if problem is None:
            self._compiled_decoder = torch.compile(self.decoder, dynamic=True)
        return problem

    def _decoder_layers(self) -> list[torch.nn.Module]:
        layers = [m for m in self.decoder.modules() if isinstance(m, GradientCheckpointingLayer)]
        if len(layers) != self.shapes.num_layers:
            raise SoftPromptError(
                f"found {len(layers)} decoder layers in {type(self.model).__name__}, expected {self.shapes.num_layers}"
            )
        return layers

    def gradient_checkpointing(self, enabled: bool = True) -> "CausalBackbone":
        """Trade compute for memory: keep only each decoder layer's inputs and recompute its activations during the
        backward pass (one extra forward). Gradients are unchanged; works for both methods.

        transformers' own switch (`model.gradient_checkpointing_enable()`) cannot be used: it acts only in train mode
        and it drops `past_key_values`, which holds our prefix (a replayed layer would append its keys to the cache a
        second time). So we checkpoint each layer ourselves and, before a replay, put the layer's cache entry back as
        the first run found it: the replay then reads the same prefix and appends the same keys. The model stays in
        eval mode and frozen; the prefix's gradient flows through the recorded graph as usual.
        """
        self._checkpointed_layers = self._decoder_layers() if enabled else []
        return self

    @property
    def checkpointing(self) -> bool:
        return bool(self._checkpointed_layers)

    def _checkpointed(self, cache: DynamicCache):
        """Checkpointing applies only while gradients are recorded: a `no_grad` forward runs the layers as they are."""
        return replaying(self._checkpointed_layers if torch.is_grad_enabled() else [], cache)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head over any (..., hidden) selection of hidden states, then what the model's forward does to the head's
        output (`head_transform`): callers pass only the positions they need."""
        return self.head_transform(self.head(hidden)).float()

    def select_rows(self, cache: DynamicCache, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
        return cache_rows.select(cache, mask, rows)

    def merge_rows(self, cache: DynamicCache, mask: torch.Tensor, other: DynamicCache, other_mask: torch.Tensor
                   ) -> torch.Tensor:  # fmt: skip
        return cache_rows.merge(cache, mask, other, other_mask)

    def check_joinable(self) -> None:
        """Sliding-window layers keep only their last window of slots, which breaks the slot-for-slot mask that rows
        joining and leaving a running batch rely on."""
        if any(getattr(layer, "is_sliding", False) for layer in DynamicCache(config=self.model.config).layers):
            raise SoftPromptError(
                f"{type(self.model).__name__} uses sliding-window attention; the serving engine cannot batch its "
                "cache yet. Serve a model without sliding windows."
            )
