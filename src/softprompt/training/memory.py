"""A training run's peak memory, estimated from the model's config alone (no weight is read), and the check that a
device can hold it, so a run that cannot fit is refused before its weights are loaded.

The estimate follows what a training step keeps (ARCHITECTURE.md, "From a record to a loss"):

- weights: the frozen model's parameters in their dtype, counted on a copy built on the meta device (no storage);
  a quantized base's linear layers at bitsandbytes' size (8-bit: a byte and a row scale; 4-bit NF4: half a byte
  and a float32 scale per 64 values);
- prompt and optimizer: the prompt's parameters, their gradients and the optimizer's state, all float32 (the
  precision policy): AdamW keeps two values per parameter, Adafactor a row and a column per matrix;
- activations: what the forward pass keeps for the backward one. `packed_forward` packs the batch's real tokens into
  rows of `PACK_WIDTH`; prompt tuning's soft tokens lead the packed row when there is one (else their K/V are
  computed first, at batch 1), prefix tuning's K/V sit in the cache in front of it. Per decoder layer and position:
  the two norms' float32 inputs, attention's query, output and keys and values (repeated to every head: the packed
  mask rules out grouped-query kernels), the gated MLP's three intermediates; the cache's own keys and values where
  they are fewer heads. With gradient checkpointing a layer keeps only its input and its cache entry, and one layer
  is recomputed at a time;
- workspace: what lives for a moment on top: the packed attention mask, then the largest of the end of the forward
  (the rows gathered back, the boolean masks, a grouped-query model's cache), the logits and loss at the loss
  positions only (float32; the head never runs elsewhere), and one layer's backward (with checkpointing, on top of
  that layer's replayed activations).

What tensors hold, not what an allocator keeps besides: glibc's malloc on a CPU can keep much more (`needed`).
Checked op by op against the live tensor bytes of real steps (tests/test_memory_estimate.py) and against the peak
resident memory of random-weight Llama models of 0.5-1.5 B parameters in bfloat16 (benchmarks/memory_estimate.py;
README, "Memory"). Other decoder shapes are counted the same way from their config (LayerNorm and ungated MLPs keep
less); encoder-decoders as one stack of both stacks' layers, roughly.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch

from .. import methods
from ..backbones import Shapes
from ..backbones.causal import PACK_WIDTH
from ..config import PromptConfig, TrainConfig
from ..errors import SoftPromptError

GIB = 2**30
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
QUANTIZED_BYTES = {8: 1.0, 4: 0.5 + 4 / 64}
"""Bytes per quantized weight: int8 (plus a float32 scale per output row, counted apart), NF4 with a float32 absmax
per block of 64 (transformers' default, no double quantization)."""


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a model, from its config alone."""

    parameters: int
    """Its parameters, tied ones once."""
    weights: int
    """Bytes of its parameters and buffers, built in `dtype`."""
    dtype: torch.dtype
    quantizable: int
    """Weights of the decoder layers' linear layers (what bitsandbytes quantizes)."""
    quantizable_rows: int
    """Output rows of those linear layers (8-bit keeps a float32 scale per row)."""
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    gated_mlp: bool
    """An MLP of act(gate(x)) * up(x) (Llama, Mistral, Qwen, Gemma): three intermediates kept, not one."""
    rms_norm: bool
    """RMSNorm, which keeps its input in float32 whatever the dtype (LayerNorm keeps it in the dtype)."""
    config: object = field(repr=False, compare=False)

    @classmethod
    def of(cls, config, dtype: torch.dtype) -> "ModelShape":
        """Counted on the model built in `dtype` on the meta device (no storage) from `config`, a transformers
        `PretrainedConfig`."""
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM
        from transformers.modeling_layers import GradientCheckpointingLayer

        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        try:
            with torch.device("meta"):
                model = auto.from_config(config, dtype=dtype)
            model.tie_weights()  # transformers 5.0 leaves tied weights untied on the meta device (counted twice)
        except Exception as error:  # an architecture transformers cannot build: nothing to count
            raise SoftPromptError(f"cannot estimate the memory of a {type(config).__name__} model: transformers "
                                  f"does not build it from its config ({type(error).__name__}: {error})") from error
        shapes = Shapes.of(config)
        layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)] or [model]
        linears = [m for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)]
        text = config.get_text_config(decoder=True)
        heads = next(getattr(text, n) for n in ("num_attention_heads", "n_head", "num_heads") if hasattr(text, n))
        intermediate = next((getattr(text, n) for n in ("intermediate_size", "n_inner", "ffn_dim", "d_ff")
                             if getattr(text, n, None)), 4 * shapes.hidden_size)  # fmt: skip
        into_mlp = [m.out_features for m in layers[0].modules()
                    if isinstance(m, torch.nn.Linear) and m.in_features == shapes.hidden_size]  # fmt: skip
        return cls(
            parameters=sum(p.numel() for p in model.parameters()), dtype=dtype,
            weights=sum(_nbytes(t) for t in (*model.parameters(), *model.buffers())),
            quantizable=sum(m.weight.numel() for m in linears), quantizable_rows=sum(m.out_features for m in linears),
            layers=len(layers), hidden=shapes.hidden_size, heads=heads, kv_heads=shapes.num_kv_heads,
            head_dim=shapes.head_dim, intermediate=intermediate, vocab=shapes.vocab_size,
            gated_mlp=into_mlp.count(intermediate) >= 2 or 2 * intermediate in into_mlp,
            rms_norm=not any(isinstance(m, torch.nn.LayerNorm) for m in layers[0].modules()), config=config,
        )

    @property
    def shapes(self) -> Shapes:
        return Shapes(self.layers, self.kv_heads, self.head_dim, self.hidden, self.vocab)


@dataclass(frozen=True)
class PromptShape:
    """What the estimate needs of a prompt method, asked of the method itself (built on the meta device)."""

    parameters: tuple[tuple[int, ...], ...]
    """The shapes of its trainable tensors."""
    soft_tokens: bool
    """Whether its training input runs through the layers in front of a packed row (soft tokens), rather than
    sitting in the cache (a prefix)."""
    num_tokens: int
    activations: int
    """Bytes its own computation keeps for the backward (an MLP's intermediates) and its training input."""
    config: PromptConfig = field(repr=False)

    @classmethod
    def of(cls, prompt_config: PromptConfig, shapes: Shapes, dtype: torch.dtype) -> "PromptShape":
        stand_in = SimpleNamespace(shapes=shapes, device=torch.device("meta"), dtype=dtype, tokenizer=None)
        saved: list[torch.Tensor] = []
        with torch.device("meta"):
            method = methods.build(dataclasses.replace(prompt_config, init="random"), stand_in)
            with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
                prompt_input = method.training_input(stand_in)
        params = {id(p) for p in method.parameters()}
        kept = {id(t): t for t in saved if id(t) not in params and id(t._base) not in params}  # not a weight's view
        return cls(
            parameters=tuple(tuple(p.shape) for p in method.parameters()),
            soft_tokens=prompt_input.dim() == 2,  # (n, hidden), as `packed_forward` tells them apart
            num_tokens=method.config.num_tokens,  # an unset length resolved by `build` (a run resolves it first)
            activations=sum(_nbytes(t) for t in kept.values()) + _nbytes(prompt_input),
            config=prompt_config,
        )


@dataclass(frozen=True)
class RunShape:
    """The settings of a run that decide its memory."""

    dtype: torch.dtype
    """The frozen weights' dtype (with `bits`: the dtype the quantized layers compute in)."""
    batch_size: int
    """Rows in one forward pass (one process's micro-batch; a search's candidates multiply it)."""
    max_length: int
    """Real tokens of the longest row (input and target)."""
    target_length: int
    """Loss tokens of the longest row (the logits are taken there only)."""
    gradient_checkpointing: bool = False
    optimizer: str = "adamw"
    bits: int | None = None
    """8 or 4: a bitsandbytes-quantized frozen base."""
    candidates: int = 1
    """Prompts trained side by side on every row (`train --search`): rows, prompts and optimizer state times this."""


@dataclass(frozen=True)
class MemoryEstimate:
    """A training run's estimated peak memory on its device, in bytes, by what holds it."""

    weights: int
    activations: int
    """Kept by the forward pass for the backward one."""
    trainable: int
    """The prompt's parameters, gradients and optimizer state (float32)."""
    workspace: int
    """Transient: the attention mask, then the largest of the logits and loss, the forward's cache, a layer's
    backward."""
    model: ModelShape = field(repr=False)
    prompt: PromptShape = field(repr=False)
    run: RunShape = field(repr=False)

    @property
    def total(self) -> int:
        return self.weights + self.activations + self.trainable + self.workspace

    @property
    def text(self) -> str:
        """One line for people: 'about 3.1 GiB: weights 2.5 GiB, activations 410 MiB, ...'."""
        parts = [("weights", self.weights), ("activations", self.activations),
                 ("prompt and optimizer", self.trainable), ("workspace", self.workspace)]  # fmt: skip
        return f"about {size_text(self.total)}: " + ", ".join(f"{name} {size_text(n)}" for name, n in parts)

    def changed(self, **settings) -> "MemoryEstimate":
        """The estimate of the same run with some of `RunShape`'s settings changed."""
        run = dataclasses.replace(self.run, **settings)
        if run.dtype == self.run.dtype:
            return _estimate(self.model, self.prompt, run)
        model = ModelShape.of(self.model.config, run.dtype)
        return _estimate(model, PromptShape.of(self.prompt.config, model.shapes, run.dtype), run)


def estimate(
    model_config,
    *,
    prompt_config: PromptConfig,
    dtype: torch.dtype | str = "bfloat16",
    batch_size: int,
    max_length: int,
    target_length: int | None = None,
    gradient_checkpointing: bool = False,
    optimizer: str = "adamw",
    bits: int | None = None,
    candidates: int = 1,
) -> MemoryEstimate:
    """The peak memory of training `prompt_config`'s prompt on the model of `model_config` (a transformers
    `PretrainedConfig`; no weight is read), for forward passes of `batch_size` rows of up to `max_length` real
    tokens of which up to `target_length` carry the loss (default: all of them, the bound for generation).
    dtype: the frozen weights' (float32, bfloat16, float16); bits: 8 or 4 for a quantized base."""
    dtype = _dtype(dtype)
    if batch_size < 1 or max_length < 1 or candidates < 1 or bits not in (None, 8, 4):
        raise SoftPromptError(f"cannot estimate memory for batch_size={batch_size}, max_length={max_length}, "
                              f"candidates={candidates}, bits={bits}: sizes must be at least 1, bits 8, 4 or None")
    run = RunShape(dtype, batch_size, max_length, min(target_length or max_length, max_length),
                   gradient_checkpointing, optimizer, bits, candidates)  # fmt: skip
    model = ModelShape.of(model_config, dtype)
    return _estimate(model, PromptShape.of(prompt_config, model.shapes, dtype), run)


def estimate_run(model_config, prompt_config: PromptConfig, train_config: TrainConfig, *,
                 dtype: torch.dtype | str = "bfloat16", processes: int = 1, max_length: int | None = None,
                 target_length: int | None = None, bits: int | None = None,
                 candidates: int = 1) -> MemoryEstimate:  # fmt: skip
    """`estimate` for a `train` run: one process's micro-batch (batch_size / processes / grad_accum rows) of up to
    the run's `max_length` tokens (or the data's longest row, `max_length`, where shorter), with its checkpointing
    and optimizer."""
    micro = max(1, train_config.batch_size // max(1, processes) // train_config.grad_accum)
    return estimate(model_config, prompt_config=prompt_config, dtype=dtype, batch_size=micro,
                    max_length=min(max_length or train_config.max_length, train_config.max_length),
                    target_length=target_length,
                    gradient_checkpointing=train_config.gradient_checkpointing, optimizer=train_config.optimizer,
                    bits=bits, candidates=candidates)  # fmt: skip


def _estimate(model: ModelShape, prompt: PromptShape, run: RunShape) -> MemoryEstimate:
    activations, workspace = _activations(model, prompt, run)
    trainable = run.candidates * sum(_trainable_bytes(shape, run.optimizer) for shape in prompt.parameters)
    return MemoryEstimate(weights_bytes(model, run.bits), activations, trainable, workspace, model, prompt, run)


def _activations(model: ModelShape, prompt: PromptShape, run: RunShape) -> tuple[int, int]:
    """(kept for the backward, the largest transient on top) of one training step. Kept besides the layers': the
    final norm's input, the rows gathered back from the packed ones, the packed mask and the rotary tables (every
    layer's attention keeps the same ones). The transient is the largest of three moments: the end of the forward
    (the packed rows' copies, the boolean masks, a grouped-query model's cache), the loss (logits), and a layer's
    backward (a norm's float32 gradients, the MLP's gradients; with checkpointing on top of the replayed layer's
    activations)."""
    b, h = _element_size(run.dtype), model.hidden
    rows = run.batch_size * run.candidates
    packed, width = packed_rows(rows, run.max_length)
    n = prompt.num_tokens * run.candidates  # a search's candidates sit side by side in one prefix
    soft = prompt.soft_tokens and run.candidates == 1 and packed == 1  # else soft prompts become their K/V first
    queries, keys = packed * (width + (n if soft else 0)), packed * (width + n)
    kept, cache = layer_bytes(model, b, queries, keys)
    norm = 4 if model.rms_norm else b  # RMSNorm computes in float32
    mask, tokens = queries * (keys // packed), rows * run.max_length  # (packed rows, queries, keys) in the dtype
    # the final norm's input; behind a prefix the first layer's first norm keeps none (its input needs no gradient)
    shared = (queries * h * norm if soft else 0) + tokens * h * b + mask * b + 2 * queries * model.head_dim * b
    shared += prompt.activations if soft or run.candidates == 1 else run.candidates * prompt.activations
    if prompt.soft_tokens and not soft:  # each soft prompt's K/V: the model run over it alone
        shared += model.layers * layer_bytes(model, b, n, n)[0]
    backward = max(5 * queries * h * norm,
                   queries * model.intermediate * b * (3 if model.gated_mlp else 1) + 2 * queries * h * norm)
    gathered = 3 * tokens * h * b + queries * h * b + 2 * mask  # the packed rows' copies, the boolean masks
    logits = rows * run.target_length * (model.vocab * (8 + b + (4 if b < 4 else 0)) + h * b)  # and a float32 copy
    if run.gradient_checkpointing:  # each layer keeps its input and its cache entry (held by its replay)
        entry = keys * 2 * model.kv_heads * model.head_dim * b
        per_layer = queries * h * b + entry
        replayed = kept - (entry if model.kv_heads == model.heads else 0)  # attention keeps the entry's own K/V
        transient = max(replayed + backward, logits, gathered)  # one layer replayed at a time
    else:
        per_layer, transient = kept, max(model.layers * cache + gathered, logits, backward)
    return model.layers * per_layer + shared, transient


def packed_rows(rows: int, length: int, width: int = PACK_WIDTH) -> tuple[int, int]:
    """How `CausalBackbone.packed_forward` packs `rows` rows of `length` real tokens: (packed rows, their width)."""
    packed = max(1, min(rows, -(-rows * length // width)))
    return packed, -(-rows // packed) * length


def layer_bytes(model: ModelShape, b: int, queries: int, keys: int) -> tuple[int, int]:
    """What one decoder layer keeps for the backward pass, for `queries` positions over `keys` key slots in all
    packed rows (b: bytes per value of the dtype); and its cache's own keys and values, which are separate tensors
    only when the model has fewer key/value heads than heads (else attention keeps the cache's)."""
    norms = 2 * queries * model.hidden * (4 if model.rms_norm else b)
    attention = queries * model.heads * (2 * model.head_dim * b + 4) + keys * 2 * model.heads * model.head_dim * b
    mlp = queries * model.intermediate * b * (3 if model.gated_mlp else 1)
    cache = keys * 2 * model.kv_heads * model.head_dim * b if model.kv_heads < model.heads else 0
    return norms + attention + mlp, cache


def weights_bytes(model: ModelShape, bits: int | None = None) -> int:
    """The frozen weights: as built in the model's dtype, or with the decoder layers' linear weights quantized to
    `bits`."""
    if bits is None:
        return model.weights
    quantized = int(model.quantizable * QUANTIZED_BYTES[bits]) + (model.quantizable_rows * 4 if bits == 8 else 0)
    return model.weights - model.quantizable * _element_size(model.dtype) + quantized


def _trainable_bytes(shape: tuple[int, ...], optimizer: str) -> int:
    """A float32 parameter, its gradient and its optimizer state: AdamW's two moments, or Adafactor's factored
    second moment (a row and a column for a matrix, the whole for a vector; no first moment by default)."""
    count = 1
    for size in shape:
        count *= size
    if optimizer != "adafactor":
        state = 2 * count
    elif len(shape) >= 2:  # transformers' Adafactor: rows over the last axis, columns over the one before
        state = count // shape[-1] + count // shape[-2]
    else:
        state = count
    return 4 * (2 * count + state)


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _dtype(dtype: torch.dtype | str) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise SoftPromptError(f"cannot estimate memory for dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def size_text(count: int) -> str:
    """Bytes for people: GiB with one decimal from 1 GiB, MiB below, KiB below that."""
    if count >= GIB:
        return f"{count / GIB:.1f} GiB"
    return f"{count / 2**20:.0f} MiB" if count >= 2**20 else f"{count / 2**10:.0f} KiB"


# ------------------------------------------------------------------------------------------------ the device's side
def available_memory(device: torch.device | str) -> int | None:
    """Bytes the device can still give: CUDA's free memory (`torch.cuda.mem_get_info`), the host's MemAvailable for
    the CPU (psutil where installed, else /proc/meminfo); None where it cannot be asked (MPS, other platforms)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            return int(re.search(r"MemAvailable:\s+(\d+) kB", f.read()).group(1)) * 1024
    except (OSError, AttributeError):
        return None


CPU_MALLOC_SLACK = 1.3
"""On a CPU, glibc's malloc keeps the blocks a step frees once its mmap threshold has risen to their size (up to
32 MiB), so the process's peak RSS can exceed what its tensors need (the estimate): allowed for as this fraction of
the estimate's non-weight part, an allowance not yet measured (benchmarks/memory_estimate.py's last stage measures
it), and nothing with MALLOC_MMAP_THRESHOLD_ set in the environment (e.g. 65536, before Python starts), under which
the estimate was measured (README, "Memory"). `check_fits` asks a CPU for it too."""


def needed(estimate: MemoryEstimate, device: torch.device | str) -> int:
    """What `device` must have free for the run: the estimate, plus glibc's retention on a CPU (`CPU_MALLOC_SLACK`)."""
    if torch.device(device).type == "cpu" and not os.environ.get("MALLOC_MMAP_THRESHOLD_"):
        return estimate.total + int(CPU_MALLOC_SLACK * (estimate.total - estimate.weights))
    return estimate.total


def check_fits(estimate: MemoryEstimate, device: torch.device | str, available: int | None = None) -> None:
    """Refuse a run that needs more than `device` has free (`available`, bytes: asked of the device when None;
    nothing is checked where it cannot be asked). The message says what is needed, what the device has, and what
    would fit: gradient checkpointing, smaller micro-batches, bfloat16, shorter examples, a bigger device."""
    available = available if available is not None else available_memory(device)
    need = needed(estimate, device)
    if available is None or need <= available:
        return
    malloc = "" if need == estimate.total else (
        f", and up to {size_text(need - estimate.total)} more that glibc's malloc keeps on a CPU (none with "
        "MALLOC_MMAP_THRESHOLD_=65536 in the environment)")  # fmt: skip
    raise SoftPromptError(
        f"this training run needs {estimate.text} on {device}{malloc}: more than the {size_text(available)} free "
        "there. What would fit:\n  - " + "\n  - ".join(_alternatives(estimate, available, device))
    )


def _alternatives(estimate: MemoryEstimate, available: int, device: torch.device | str) -> list[str]:
    """The changes that bring the run down, each with what it would need and whether that fits."""
    run, options = estimate.run, []

    def option(what: str, changed: MemoryEstimate) -> str:
        need = needed(changed, device)
        return f"{what}: {size_text(need)} ({'fits' if need <= available else 'still too much'})"

    if not run.gradient_checkpointing:
        options.append(option("--gradient-checkpointing", estimate.changed(gradient_checkpointing=True)))
    for micro in dict.fromkeys(max(1, run.batch_size // 2**k) for k in range(1, 12)):  # the largest that fits
        changed = estimate.changed(batch_size=micro)
        if needed(changed, device) <= available or micro == 1:
            options.append(option(f"micro-batches of {micro} rows (a {-(-run.batch_size // micro)} times larger "
                                  "--grad-accum, or a smaller --batch-size)", changed))  # fmt: skip
            break
    if run.dtype == torch.float32 and run.bits is None:
        options.append(option("--dtype bfloat16", estimate.changed(dtype=torch.bfloat16)))
    options.append(f"shorter examples (--max-length; the longest row now has {run.max_length} tokens)")
    options.append(f"a device with {size_text(needed(estimate, device))} free, or --shard-model over several")
    return options
