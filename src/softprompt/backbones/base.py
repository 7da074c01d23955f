"""The contract between the library and a frozen model: what training, scoring, generation and serving call.

Words used throughout: a prompt's *prefix* is the per-layer key/value tensor it hands a causal model,
(num_layers, 2, kv_heads, n, head_dim) shared by all rows or (B, num_layers, 2, kv_heads, n, head_dim) one per row.
An encoder-decoder's prompt tuning hands over *soft tokens* (n, d_model) instead, which its encoder reads in front
of the input (backbones/seq2seq.py). The rest of the library passes either along without looking inside: what
`method.kv(backbone)` returns, the backbone takes back.

One subclass per model kind; `backbones.backbone_for` picks it. An operation a kind cannot do is declared in its
`cannot` table and refused with that reason, never inherited from another kind.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from functools import cached_property
from typing import NoReturn

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..errors import SoftPromptError


@dataclass(frozen=True)
class Shapes:
    """Sizes of the frozen model that a prompt must match."""

    num_layers: int
    """Layers that take a K/V prefix (an encoder-decoder counts both stacks)."""
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def of(cls, config) -> "Shapes":
        """A decoder's sizes from its config, under whichever names the architecture uses."""
        config = config.get_text_config(decoder=True)
        get = lambda *names: next(getattr(config, n) for n in names if getattr(config, n, None) is not None)  # noqa: E731
        hidden = get("hidden_size", "n_embd", "d_model")
        heads = get("num_attention_heads", "n_head")
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", False):
            kv_heads = 1  # Falcon-7B's layout caches one K/V head, whatever num_kv_heads says
        head_dim = getattr(config, "head_dim", None) or hidden // heads  # Qwen3 states head_dim explicitly
        return cls(get("num_hidden_layers", "n_layer"), kv_heads, head_dim, hidden, config.vocab_size)


def cache_keyword(module: torch.nn.Module) -> str:
    """The keyword `module.forward` takes its K/V cache under: `cache` from transformers 5.24, `past_key_values`
    before (the old name still works there, with a FutureWarning; our calls use the current one)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def execution_device(module: torch.nn.Module) -> torch.device:
    """Where `module` runs: its Accelerate hook's execution device under a device map (offloaded weights sit on the
    meta device or the CPU until used), else its weights' device."""
    device = getattr(getattr(module, "_hf_hook", None), "execution_device", None)
    return torch.device(device) if device is not None else next(module.parameters()).device


class Backbone(ABC):
    """A frozen model plus the operations the prompt methods need from it."""

    kind = "model"
    """What the kind is called in messages."""
    cannot: dict[str, str] = {}
    """Operation name -> why this kind cannot do it (the message a caller gets)."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, shapes: Shapes):
        self.model = model.requires_grad_(False)  # the one freezing call: nothing of the base model ever trains
        self.tokenizer = tokenizer
        self.shapes = shapes
        self.head = model.get_output_embeddings()

    # --- what every kind shares ---------------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where logits and targets meet: the output head's device (under a device map, where it runs)."""
        return execution_device(self.head)

    @property
    def dtype(self) -> torch.dtype:
        return self.head.weight.dtype

    @property
    def pad_id(self) -> int:
        """The token id every batch pads with: the tokenizer's pad token, else its EOS, else 0. Pads are always
        masked, so only their being a valid id matters."""
        tok = self.tokenizer
        return next((i for i in (tok.pad_token_id, tok.eos_token_id) if i is not None), 0)

    @property
    def window(self) -> float:
        """The most cache slots an attention layer reads (sliding window or attention chunk), inf when unlimited.
        Masked slots count too, so pads between a prefix and a row's tokens shorten what the row sees."""
        config = self.model.config.get_text_config(decoder=True)
        limits = (getattr(config, name, None) for name in ("sliding_window", "attention_chunk_size"))
        return min((limit for limit in limits if limit), default=float("inf"))

    @property
    def name(self) -> str:
        """The name the model was loaded by (messages, artifacts)."""
        return self.model.config.name_or_path

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    @cached_property
    def fingerprint(self) -> str:
        """The base model's fingerprint (artifacts record it; a `models.Fingerprint`), the same in any dtype, on any
        device or placement; taken once: sharding later hides the weights."""
        from ..models import fingerprint

        return fingerprint(self.model)

    def _cannot(self, operation: str) -> NoReturn:
        reason = self.cannot.get(operation, "not implemented for this kind of model")
        raise SoftPromptError(f"{type(self.model).__name__} ({self.kind}) cannot {operation}: {reason}")

    def stack_prefixes(self, prefixes: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """One per-row K/V prefix for a mixed batch: each row's (num_layers, 2, kv_heads, n_i, head_dim) prefix (None: no
        prompt) left-padded with masked slots to the longest. Returns the prefix (B, num_layers, 2, kv_heads, n,
        head_dim) and its mask (B, n), 1 on real slots; pass both to `new_cache` and `forward(past_mask=...)`."""
        s = self.shapes
        n = max((p.shape[-2] for p in prefixes if p is not None), default=0)
        stacked = torch.zeros(len(prefixes), s.num_layers, 2, s.num_kv_heads, n, s.head_dim, dtype=self.dtype,
                              device=self.device)  # fmt: skip
        mask = torch.zeros(len(prefixes), n, dtype=torch.long, device=self.device)
        for row, prefix in enumerate(prefixes):
            if prefix is not None and prefix.shape[-2]:
                stacked[row, ..., n - prefix.shape[-2] :, :] = prefix
                mask[row, n - prefix.shape[-2] :] = 1
        return stacked, mask

    def side_by_side(self, prefixes: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefix and (B, n) mask of a training batch whose rows run behind different prompts (`prefixes`, one
        per row, the same tensor for rows of the same prompt), for `target_hidden`: here one per row, as
        `stack_prefixes` gives them."""
        return self.stack_prefixes(prefixes)

    # --- what each kind does its own way ------------------------------------------------------------------------

    @abstractmethod
    def prefix_from_embeddings(self, embeddings: torch.Tensor) -> torch.Tensor:
        """What prompt tuning hands this model for soft prompt `embeddings` (n, hidden). Differentiable."""

    @abstractmethod
    def prefix_from_ids(self, input_ids: list[int]) -> torch.Tensor:
        """A K/V prefix from the frozen model's own activations over these tokens (prefix tuning's word inits)."""

    @abstractmethod
    def prefix_problems(self, prefix: torch.Tensor, prefix_mask: torch.Tensor | None, rows: int) -> list[str]:
        """What is wrong with a prefix for `rows` rows (empty when nothing): the checks callers run first."""

    @abstractmethod
    def new_cache(self, prefix: torch.Tensor | None, batch_size: int):
        """A cache holding the prefix (expanded to the batch when shared), for `forward`."""

    @abstractmethod
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache,
                past_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
        """Run tokens (B, T) after what `cache` holds, updating it in place; returns the final hidden states whose
        last column predicts each row's next token, and the mask of the cache's slots for the next call."""

    @abstractmethod
    def target_hidden(self, batch, prompt_input: torch.Tensor | None, prefix_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing over `data.collate`'s layout: the hidden states (K, hidden) that predict the loss tokens,
        after `prompt_input` (a K/V prefix or soft tokens, as the method's `training_input` gives)."""

    @abstractmethod
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The model's logits (float32) for any (..., hidden) selection of final hidden states."""

    @abstractmethod
    def select_rows(self, cache, mask: torch.Tensor, rows: list[int]) -> torch.Tensor:
        """Keep only `rows` of a cache (in that order), in place; returns their mask."""

    # --- what a kind may be unable to do (declared in `cannot`) ------------------------------------------------

    def merge_rows(self, cache, mask: torch.Tensor, other, other_mask: torch.Tensor) -> torch.Tensor:
        """Append `other`'s rows to `cache` in place (rows joining a running batch); returns the merged mask."""
        self._cannot("batch continuously")

    def check_joinable(self) -> None:
        """Refuse, before any work, a model whose rows cannot join a running batch (`merge_rows`)."""
        self._cannot("batch continuously")

    def packed_forward(self, prompt_input: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                       prefix_mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        self._cannot("pack rows for training")

    def shard_layers(self, device: torch.device) -> int:
        self._cannot("shard its layers")

    def compile(self) -> str | None:
        """Compile what can be compiled of the frozen layers, in place; returns None, or why they stay eager."""
        self._cannot("compile its layers")

    def gradient_checkpointing(self, enabled: bool = True) -> "Backbone":
        if enabled:
            self._cannot("use gradient checkpointing")
        return self

    @property
    def checkpointing(self) -> bool:
        return False
