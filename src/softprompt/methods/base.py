"""What every prompt method shares: the `kv()` contract and the choice of initial tokens."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from ..errors import SoftPromptError


class PromptMethod(nn.Module):
    """Learned vectors that reduce to a per-layer key/value prefix of the frozen model."""

    name: ClassVar[str]
    artifact_key: ClassVar[str]
    """Name of the tensor in prompt.safetensors."""
    token_axis: ClassVar[int]
    """The axis of that tensor that counts the virtual tokens."""
    in_embedding_space: ClassVar[bool]
    """Whether its vectors are input embeddings, so the nearest vocabulary tokens mean something."""
    supports_mlp: ClassVar[bool] = False
    """Whether it can train through an MLP reparameterization (`PromptConfig.prefix_mlp`)."""
    supports_residual: ClassVar[bool] = False
    """Whether it can train through a residual MLP (`PromptConfig.residual`)."""
    peft_types: ClassVar[tuple[str, ...]]
    """PEFT `peft_type`s whose adapters hold this method's tensor; export writes the first."""
    default_lr: ClassVar[float]
    """The peak learning rate a run uses when none is given (`TrainConfig.lr`), chosen with benchmarks/defaults.py."""

    def __init__(self, config, shapes):
        super().__init__()
        self.config = config
        self.shapes = shapes
        self.demo_slots: dict[tuple, slice] = {}
        """init=demos: the slots that hold each demonstrated example (`demo_key`), which that example's own row
        must not see in training (leave-one-out); empty otherwise. Not saved: it concerns this run's data."""

    def kv(self, backbone) -> torch.Tensor:
        """The prefix, (num_layers, 2, kv_heads, num_tokens, head_dim), differentiable w.r.t. this module. On an
        encoder-decoder, what `Seq2SeqBackbone` takes as a prefix (soft tokens for prompt tuning; see seq2seq.py)."""
        raise NotImplementedError

    def training_input(self, backbone) -> torch.Tensor:
        """What a training step hands `backbone.target_hidden`: `kv()`, unless the backbone can take something
        cheaper that means the same (prompt tuning's embeddings, see SoftPrompt)."""
        return self.kv(backbone)

    def forward(self, backbone) -> torch.Tensor:  # so DDP-style wrappers see a forward call
        return self.training_input(backbone)

    def artifact_tensors(self) -> dict[str, torch.Tensor]:
        """What a saved artifact stores: plain tensors, any reparameterization folded away."""
        raise NotImplementedError

    @classmethod
    def token_vectors(cls, tensor: torch.Tensor) -> torch.Tensor:
        """One vector per virtual token of the saved tensor, (n, width)."""
        raise NotImplementedError

    @classmethod
    def from_token_vectors(cls, vectors: torch.Tensor, shapes) -> torch.Tensor:
        """The saved tensor from one vector per virtual token, (n, width): the inverse of `token_vectors`.
        (n, width) is also PEFT's layout, so it reads PEFT adapters."""
        raise NotImplementedError

    @classmethod
    def peft_config(cls, shapes) -> dict:
        """This method's entries of PEFT's adapter_config.json, `peft_type` first; `shapes` the model's."""
        raise NotImplementedError

    @classmethod
    def peft_problems(cls, config: dict, vectors: torch.Tensor, shapes) -> list[str]:
        """Why a PEFT adapter (its config and (n, width) tensor) does not fit a model of `shapes`; empty if it does."""
        raise NotImplementedError

    @classmethod
    def create(cls, config, backbone, labels: list[str], generator: torch.Generator | None,
               demo_ids: list[int] | None = None) -> "PromptMethod":  # fmt: skip
        """A new prompt of `config` on `backbone`; `demo_ids`: the tokens of init=demos (`demonstrations`)."""
        raise NotImplementedError

    @classmethod
    def from_tensors(cls, config, backbone, tensors: dict[str, torch.Tensor]) -> "PromptMethod":
        raise NotImplementedError


def demo_key(example) -> tuple:
    """What identifies a training example (a `data.Example`) among the demonstrations: its tokens, so a duplicate
    of a demonstrated example is left out of the demonstration too."""
    return tuple(example.input_ids), tuple(example.target_ids)


def demonstrations(examples: list, tokenizer, n: int, generator: torch.Generator | None
                   ) -> tuple[list[int], dict[tuple, slice]]:  # fmt: skip
    """init=demos: n token ids reading as a few-shot prompt: what the tokenizer puts in front of a text (BOS, if
    any), then training examples in a seeded order, each its input, answer and a newline (no other special
    tokens), as many as fill n, the last one cut. Returns them and the slots each example's demonstration holds."""
    written, ids, slots = _written_out(tokenizer), list(tokenizer("")["input_ids"]), {}
    order = torch.randperm(len(examples), generator=generator).tolist()
    for example in (examples[i] for i in order):
        if len(ids) >= n:
            break
        text = written(example)
        slots.setdefault(demo_key(example), slice(len(ids), min(n, len(ids) + len(text))))
        ids += text
    if len(ids) < n:
        raise SoftPromptError(f"init=demos: the {len(examples)} training examples written out with their answers "
                              f"take {len(ids)} tokens, fewer than num_tokens {n}; use --num-tokens {len(ids)} or "
                              "less, or another --init.")  # fmt: skip
    return ids[:n], slots


def demonstrations_length(examples: list, tokenizer) -> int:
    """The tokens `demonstrations` writes when every example is shown: the most num_tokens init=demos can fill."""
    written = _written_out(tokenizer)
    return len(tokenizer("")["input_ids"]) + sum(len(written(example)) for example in examples)


def _written_out(tokenizer):
    """An example as a demonstration shows it: its input and answer without special tokens, then a newline."""
    special = set(tokenizer.all_special_ids)
    newline = tokenizer("\n", add_special_tokens=False)["input_ids"]
    return lambda example: [t for t in example.input_ids + example.target_ids if t not in special] + newline


def initial_token_ids(config, tokenizer, labels: list[str], generator: torch.Generator | None,
                      demo_ids: list[int] | None = None) -> list[int]:  # fmt: skip
    """num_tokens token ids for the vocab, text, labels and demos inits."""
    n = config.num_tokens
    if config.init == "demos":
        if demo_ids is None:
            raise SoftPromptError("init=demos starts from training examples: it needs training data")
        return demo_ids
    if config.init == "text":
        ids = tokenizer(config.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise SoftPromptError(f"init_text {config.init_text!r} tokenizes to nothing")
        return (ids * (n // len(ids) + 1))[:n]  # repeat a short text, truncate a long one
    special = set(tokenizer.all_special_ids)
    pool = torch.tensor([i for i in range(min(config.vocab_size_for_init, len(tokenizer))) if i not in special])
    sampled = pool[torch.randperm(len(pool), generator=generator)[:n]].tolist()
    if config.init == "vocab":
        return sampled
    # labels: the first token of each label word seeds one slot (Lester et al. 2021), sampled vocabulary the rest
    if config.init == "labels":
        if not labels:
            raise SoftPromptError("init=labels needs label words (a classification task with --labels)")
        seeds = [tokenizer(" " + label, add_special_tokens=False)["input_ids"][0] for label in labels]
        return (seeds + sampled)[:n]
    raise ValueError(f"no token ids for init={config.init}")
