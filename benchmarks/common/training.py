"""softprompt and PEFT training side by side on one model object: the work, the two steps, the independent reference
loss and the peak-memory meter (train_speed.py, the training half of scaling, profile_step.py); and the schedule
of the training loops other benchmarks write themselves (defaults.py's peers, after_input.py).

Both libraries get identical work: the same batches, the same initial prompt values (ours built with `init="vocab"`
under a seed, copied into PEFT's prompt encoder), AdamW at the same learning rate (no weight decay, clipping or
schedule), the model frozen and in eval mode (PEFT wraps this very model object; `side_by_side` checks the model is
as it was)."""

from __future__ import annotations

import ctypes
import gc
import os
import re
import threading
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from benchmarks.common.model import vocab_prompt

BATCH_SIZE = 8
MB = 2**20
CORRECT_REL = {"float32": 1e-4, "bfloat16": 2e-2, "float16": 5e-3}
"""A library's step-0 loss is correct when it is this close (relative) to the independent reference, computed in
float32 whatever the dtype the libraries run in: a half-precision model's loss differs from it by rounding alone,
about 2^-8 (bfloat16) or 2^-11 (float16) per operation over 30 layers (measured: README, Precision)."""


# ---------------------------------------------------------------------------------------------------- memory
def warmup_then_decay(optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of training loops written in a benchmark (the LoRA and IA3 columns, probes): a
    linear rise over `warmup` steps, then a linear fall to 0 at `steps`."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * max(0.0, (steps - s) / steps))


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def release_freed_memory() -> None:
    """Return freed heap pages to the OS, so a run's baseline is not inflated by the previous run's garbage."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_high_water_mark() -> bool:
    """Reset the kernel's peak-RSS counter (VmHWM) to the current RSS (Linux >= 4.0); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def high_water_mark() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmHWM:\s+(\d+) kB", f.read()).group(1)) * 1024


MEMORY_METHODS = {
    "vmhwm": "the kernel's peak RSS (VmHWM, /proc/self/status) reset on entry via /proc/self/clear_refs: exact, "
    "and costs the run nothing",
    "sample": "RSS read from /proc/self/statm every 5 ms by a thread: may miss short peaks, and the thread slows "
    "training (both libraries alike)",
    "cuda": "torch's CUDA allocator: its peak allocated bytes (reset on entry) above those allocated on entry",
}


def default_memory_method(device: str = "cpu") -> str:
    """On a GPU its allocator's peak; on the CPU the kernel's high-water mark where this process may reset it, else
    sampling."""
    if torch.device(device).type == "cuda":
        return "cuda"
    return "vmhwm" if reset_high_water_mark() else "sample"


class PeakMemory:
    """Peak resident set size inside the block minus the RSS on entry, taken after freeing earlier garbage."""

    def __init__(self, how: str):
        self.how = how

    def __enter__(self) -> "PeakMemory":
        release_freed_memory()
        if self.how == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.baseline = torch.cuda.memory_allocated()
            return self
        if self.how == "vmhwm" and not reset_high_water_mark():
            raise RuntimeError("/proc/self/clear_refs is not writable here; use --memory sample")
        self.baseline = self.peak = rss()
        if self.how == "sample":
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, rss())

    def __exit__(self, *exc) -> None:
        if self.how == "cuda":
            torch.cuda.synchronize()  # the step's kernels are done: its time and its peak are complete
            self.above = torch.cuda.max_memory_allocated() - self.baseline
            return
        if self.how == "sample":
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, rss(), high_water_mark() if self.how == "vmhwm" else 0)
        self.above = self.peak - self.baseline


# ---------------------------------------------------------------------------------------------------- the work
def make_task(tokenizer, task: str):
    """cls: `Review: {text}\\nSentiment:` -> the label word (one token); gen: `Write a {label} movie review:\\n` ->
    the review text (about 25 tokens) and EOS."""
    from softprompt.config import TaskConfig
    from softprompt.data import TaskEncoder

    if task == "cls":
        config = TaskConfig(template="Review: {text}\nSentiment:", task="classification",
                            labels=["negative", "positive"], label_field="label")  # fmt: skip
    else:
        config = TaskConfig(template="Write a {label} movie review:\n", task="generation", target_field="text")
    return TaskEncoder(config, tokenizer)


def draw_batches(task, records: list[dict], count: int, seed: int, size: int = BATCH_SIZE) -> list:
    """`count` batches of `size` encoded examples, a fixed seeded draw."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[: count * size]
    examples = task.encode([records[i] for i in order.tolist()])
    return [examples[i : i + size] for i in range(0, len(examples), size)]


def batch_tokens(batch) -> int:
    """Real tokens of a batch of examples (input and target, no pads, no virtual tokens)."""
    return sum(len(e.input_ids) + len(e.target_ids) for e in batch)


# ---------------------------------------------------------------------------------------------------- the two steps
def padded_loss_on(backbone, kv, examples):
    """`softprompt.training.loop.loss_on` computing on the padded batch (`new_cache` + `forward`) instead of packing
    the real tokens: what train_speed's --padded measures, to show what packing gains."""
    from softprompt.data import collate

    batch = collate(examples, backbone.tokenizer.pad_token_id).to(backbone.device)
    hidden, _ = backbone.forward(batch.input_ids, batch.attention_mask, backbone.new_cache(kv, len(examples)))
    logits = backbone.logits(hidden[batch.loss_rows, batch.loss_positions])  # (K, vocab)
    return F.cross_entropy(logits, batch.loss_tokens), batch.num_input_tokens


def ours_step(backbone, method_name, n, lr, seed, padded=False):
    """One training step of softprompt, as `training.loop.train` runs it (minus clipping, scheduling and logging)."""
    from softprompt.training.loop import loss_on

    loss_fn = padded_loss_on if padded else loss_on
    method = vocab_prompt(backbone, method_name, n, seed)
    optimizer = torch.optim.AdamW(method.parameters(), lr=lr, weight_decay=0.0)

    def step(examples):
        optimizer.zero_grad(set_to_none=True)
        prompt_input = method.kv(backbone) if padded else method.training_input(backbone)  # what `train` hands it
        loss, tokens = loss_fn(backbone, prompt_input, examples)
        loss.backward()
        optimizer.step()
        return loss.item(), tokens

    return step


def peft_labels(batch) -> torch.Tensor:
    """transformers' convention: each target token at its own position, -100 everywhere else."""
    labels = torch.full_like(batch.input_ids, -100)
    labels[batch.loss_rows, batch.loss_positions + 1] = batch.loss_tokens
    return labels


def peft_step(backbone, method_name, n, lr, seed):
    """One training step of PEFT over the same model object, starting from our initial values (prompt tuning: PEFT's
    embedding weight = our embeddings; prefix tuning, PEFT without projection: our (layers, 2, kv_heads, n, head_dim)
    key/values permuted to (n, layers*2*kv_heads*head_dim)). Its forward with `labels` and its own loss, as its users
    run it (default `use_cache`, full logits)."""
    import peft

    from softprompt.data import collate

    initial = vocab_prompt(backbone, method_name, n, seed)  # our initial values, copied into PEFT's prompt encoder
    if method_name == "prompt":
        config = peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)
        values = initial.embeddings  # (n, hidden)
    else:
        config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n, prefix_projection=False)
        values = initial.prefix.permute(3, 0, 1, 2, 4).reshape(n, -1)  # (n, layers * 2 * kv_heads * head_dim)
    peft_model = peft.get_peft_model(backbone.model, config).eval()  # wraps this very model object
    weight = peft_model.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        weight.copy_(values)
    del initial, values
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable == [weight] and peft_model.get_base_model() is backbone.model
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    pad = backbone.tokenizer.pad_token_id

    def step(examples):
        optimizer.zero_grad(set_to_none=True)
        batch = collate(examples, pad).to(backbone.device)
        out = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=peft_labels(batch))
        out.loss.backward()
        optimizer.step()
        return out.loss.item(), batch.num_input_tokens

    return step


# ---------------------------------------------------------------------------------------------------- correctness
def reference_loss(backbone, method_name: str, n: int, seed: int, examples, start=None) -> float:
    """The step-0 loss computed independently of both libraries: transformers' own loss over full logits at every
    position, the model reading `[P; E]` as inputs_embeds (prompt tuning) or the prefix key/values handed to it as its
    past, positions after them (prefix tuning). Both libraries' step-0 losses must equal it. `start`: the initial
    prompt the libraries start from when it was drawn on another copy of the model (a half-precision one), else
    `vocab_prompt` on this one."""
    from transformers import DynamicCache

    from softprompt.backbones import cache_keyword
    from softprompt.data import collate

    model, initial = backbone.model, start or vocab_prompt(backbone, method_name, n, seed)
    batch = collate(examples, backbone.tokenizer.pad_token_id).to(model.device)
    rows, device = batch.input_ids.shape[0], model.device
    mask = torch.cat([batch.attention_mask.new_ones(rows, n), batch.attention_mask], dim=1)  # (B, n + T)
    with torch.no_grad():
        if method_name == "prompt":
            embeds = model.get_input_embeddings()(batch.input_ids)  # (B, T, hidden)
            P = initial.embeddings.to(device, model.dtype)
            embeds = torch.cat([P[None].expand(rows, -1, -1), embeds], dim=1)
            labels = torch.cat([torch.full((rows, n), -100, device=device), peft_labels(batch)], dim=1)
            return model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.item()
        kv = initial.prefix.to(device, model.dtype)  # (layers, 2, kv_heads, n, head_dim)
        cache = DynamicCache([(k[None].expand(rows, -1, -1, -1), v[None].expand(rows, -1, -1, -1)) for k, v in kv],
                             config=model.config)  # fmt: skip
        positions = n + torch.arange(batch.input_ids.shape[1], device=device).expand(rows, -1)  # real tokens first
        return model(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions, labels=peft_labels(batch),
                     **{cache_keyword(model): cache}).loss.item()  # fmt: skip


def rel_diff(a: float, b: float) -> float:
    """|a - b| / |b|, to 3 significant digits."""
    return float(f"{abs(a - b) / abs(b):.3g}")


def is_correct(loss: float, reference: float, dtype: str = "float32") -> bool:
    """No ratio is reported against a library whose step-0 loss (in `dtype`) is not the float32 reference's: a
    speed of a wrong computation means nothing."""
    return rel_diff(loss, reference) <= CORRECT_REL[dtype]


def model_state(model) -> tuple:
    """What must not change between runs: mode, frozen weights, hooks, attention implementation, cache setting."""
    from softprompt.models import fingerprint

    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return (model.training, any(p.requires_grad for p in model.parameters()), hooks,
            model.config._attn_implementation, model.config.use_cache, fingerprint(model))  # fmt: skip


# ---------------------------------------------------------------------------------------------------- side by side
@dataclass
class RunResult:
    tokens_per_s: float
    peak_bytes: int
    loss_step0: float
    loss_last: float


@dataclass(frozen=True)
class PairSettings:
    """What a side-by-side run is given besides the model and the batches."""

    lr: float
    seed: int
    memory: str
    """How peak memory is measured: a key of MEMORY_METHODS."""
    padded: bool = False
    """Ours on the padded batch instead of packed real tokens."""


def paired_runs(steps: dict, batches, memory: str, flip: bool) -> dict[str, RunResult]:
    """Both libraries train side by side, step for step on the same batch, the order flipping every step (so a burst
    of load from elsewhere on the machine hits both). Step 0 is a warm-up (untimed); each step's memory peak is
    measured above the RSS just before it, and a run's peak is the largest over its steps."""
    losses = {who: [] for who in steps}
    seconds, tokens, peaks = dict.fromkeys(steps, 0.0), dict.fromkeys(steps, 0), dict.fromkeys(steps, 0)
    for i, batch in enumerate(batches):
        for who in list(steps)[:: -1 if (i + flip) % 2 else 1]:
            with PeakMemory(memory) as peak:
                started = time.perf_counter()
                loss, n = steps[who](batch)
                elapsed = time.perf_counter() - started
            losses[who].append(loss)
            peaks[who] = max(peaks[who], peak.above)
            if i:
                seconds[who] += elapsed
                tokens[who] += n
    return {who: RunResult(tokens[who] / seconds[who] if seconds[who] else float("nan"), peaks[who],
                           losses[who][0], losses[who][-1]) for who in steps}  # fmt: skip


def side_by_side(backbone, method: str, n: int, batches, settings: PairSettings, flip: bool,
                 before: tuple) -> dict[str, RunResult]:
    """Ours and PEFT over `batches` (the first one the warm-up step), {"ours": ..., "peft": ...}; the model must be in
    the state `before` (`model_state`) when PEFT has wrapped it and after PEFT's wrapper is gone."""
    model = backbone.model
    steps = {"ours": ours_step(backbone, method, n, settings.lr, settings.seed, settings.padded),
             "peft": peft_step(backbone, method, n, settings.lr, settings.seed)}  # fmt: skip
    assert model_state(model) == before, "wrapping the model in PEFT changed it"
    runs = paired_runs(steps, batches, settings.memory, flip)
    del steps  # drops PEFT's wrapper
    assert model_state(model) == before, f"the base model changed while training {method} tuning, {n} tokens"
    return runs
