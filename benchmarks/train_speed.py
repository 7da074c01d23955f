"""Training throughput and memory of softprompt against PEFT, side by side in one process (issue 3).

The embedded SmolLM2-135M (float32, CPU) is loaded once. For each configuration the two libraries train side by
side, step for step, the order flipping every step and every repetition (so a burst of load from elsewhere on a
shared machine hits both alike), on identical work:

- the same movie-review batches of 8 (Rotten Tomatoes, one fixed seeded draw, the same in every repetition);
- the same initial prompt values: ours built with `init="vocab"` under a fixed seed (torch.manual_seed and a seeded
  generator), copied into PEFT's prompt encoder (prompt tuning: PEFT's embedding weight = our embeddings; prefix
  tuning, PEFT without projection: PEFT's embedding weight = our (layers, 2, kv_heads, n, head_dim) key/values
  permuted to (n, layers*2*kv_heads*head_dim));
- AdamW with the same learning rate (no weight decay, clipping or schedule); the model frozen and in eval mode for
  both (PEFT wraps this very model object; the script checks after every run that the model is as it was).

Tasks:
- cls: input `Review: {text}\\nSentiment:`, target the label word ` negative` / ` positive` (one token each);
  the loss is full-vocabulary cross-entropy on that token only.
- gen: input `Write a {label} movie review:\\n`, target the review text itself followed by EOS (about 25 tokens,
  a multi-token generation target); the loss is on the target tokens and EOS only.

softprompt runs its real training step, `softprompt.train.loss_on`: `method.train_prefix()` -> `Backbone.packed_forward`
(the real tokens of the batch packed densely after the prefix, nothing computed on pads; prompt tuning's embeddings
run in front of each packed row, in the same pass) -> LM head only at the loss positions -> cross-entropy. With
--padded, ours computes on the padded batch instead (`new_cache` + `forward`). PEFT runs
`get_peft_model(model, PromptTuningConfig | PrefixTuningConfig)` forward with `labels` (-100 everywhere but the
targets) and its own loss, as its users do (default `use_cache`, full logits).

Measured per run: step 0 is a warm-up (untimed; its loss is "step 0"), then --steps timed steps.
- throughput: real input tokens per second (all non-pad tokens of input and target; virtual tokens not counted);
- peak memory: for each step, the peak resident set size during the step minus the RSS just before it (taken after
  freeing earlier garbage: gc + malloc_trim, outside the timing); a run's peak is the largest over its steps, warm-up
  included: activations, logits, gradients and optimizer state, not the loaded model. By default the peak is the
  kernel's own high-water mark (VmHWM), reset through /proc/self/clear_refs: exact and free. `--memory sample`
  reads RSS from /proc/self/statm every 5 ms in a thread instead, which may miss short peaks and, on 2 busy cores,
  slows both libraries by about 15%;
- losses at step 0 and after --steps updates.
Useful FLOPs and the machine's peak (benchmarks/flops.py): each batch's useful FLOPs are counted from the model's
shapes (the same for both libraries), and before each repetition of a configuration the model's own linear-layer
matmuls are timed alone at the step's token count; fraction_of_peak = achieved useful FLOP/s / that peak (ours;
peft_fraction_of_peak for PEFT).
speedup = ours / PEFT throughput and memory_ratio = ours / PEFT peak, each taken within a repetition (whose two runs
ran together) and then the median over --repeats repetitions.
Correctness comes first: both libraries' step-0 losses are compared with `reference_loss`, transformers' own loss
over full logits (explicit `[P; E]` for prompt tuning, the prefix as the model's past for prefix tuning). Where PEFT's
differs, the configuration reports `"peer_correct": false` and no speedup or memory ratio.

    python benchmarks/train_speed.py                 # readable table (then the JSON summary)
    python benchmarks/train_speed.py --json          # only the JSON: one object keyed by configuration, one line
    python benchmarks/train_speed.py --steps 2 --repeats 1 --configs prompt-20-cls,prefix-20-gen
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import os
import re
import shlex
import statistics
import sys
import threading
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from flops import matmul_peak, step_flops
from machine import machine  # benchmarks/machine.py (scripts run from this folder)

CONFIGS = {  # name -> (method, virtual tokens, task)
    f"{method}-{n}-{task}": (method, n, task)
    for method, n in (("prompt", 20), ("prompt", 100), ("prefix", 20))
    for task in ("cls", "gen")
}
TARGETS = {"prompt-20": 1.2, "prompt-100": 1.6, "prefix-20": 1.15}
"""Issue 3's speedup targets on the 2-core machine; also cls-mode memory_ratio <= 0.7, loss_rel_diff_step0 <= 1e-3."""
BATCH_SIZE = 8
MB = 2**20


# ---------------------------------------------------------------------------------------------------- memory
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
}


class PeakMemory:
    """Peak resident set size inside the block minus the RSS on entry, taken after freeing earlier garbage."""

    def __init__(self, how: str):
        self.how = how

    def __enter__(self) -> "PeakMemory":
        release_freed_memory()
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
        if self.how == "sample":
            self._stop.set()
            self._thread.join()
        self.peak = max(self.peak, rss(), high_water_mark() if self.how == "vmhwm" else 0)
        self.above = self.peak - self.baseline


# ---------------------------------------------------------------------------------------------------- the work
@dataclass
class RunResult:
    tokens_per_s: float
    peak_bytes: int
    loss_step0: float
    loss_last: float


def make_task(tokenizer, task: str):
    from softprompt.config import TaskConfig
    from softprompt.data import Task

    if task == "cls":
        config = TaskConfig(template="Review: {text}\nSentiment:", task="classification",
                            labels=["negative", "positive"], label_field="label")  # fmt: skip
    else:
        config = TaskConfig(template="Write a {label} movie review:\n", task="generation", target_field="text")
    return Task(config, tokenizer)


def draw_batches(task, records: list[dict], count: int, seed: int, size: int = BATCH_SIZE) -> list:
    """`count` batches of `size` encoded examples, a fixed seeded draw."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed))[: count * size]
    examples = task.encode([records[i] for i in order.tolist()])
    return [examples[i : i + size] for i in range(0, len(examples), size)]


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


def build_ours(backbone, method_name: str, n: int, seed: int):
    """Our prompt: `init="vocab"`, i.e. embeddings of (prompt tuning) or the frozen model's key/values over (prefix
    tuning) real tokens drawn with the seed."""
    from softprompt import methods
    from softprompt.config import PromptConfig

    torch.manual_seed(seed)
    config = PromptConfig(method=method_name, num_tokens=n, init="vocab")
    return methods.build(config, backbone, generator=torch.Generator().manual_seed(seed))


def padded_loss_on(backbone, kv, examples):
    """`softprompt.train.loss_on` computing on the padded batch (`new_cache` + `forward`) instead of packing the
    real tokens: what --padded measures, to show what packing gains."""
    from softprompt.data import collate

    batch = collate(examples, backbone.tokenizer.pad_token_id).to(backbone.device)
    hidden, _ = backbone.forward(batch.input_ids, batch.attention_mask, backbone.new_cache(kv, len(examples)))
    logits = backbone.logits(hidden[batch.loss_rows, batch.loss_positions])  # (K, vocab)
    return F.cross_entropy(logits, batch.loss_tokens), batch.num_input_tokens


def ours_step(backbone, method_name, n, lr, seed, padded=False):
    """One training step of softprompt, as `train.train` runs it (minus clipping, scheduling and logging)."""
    from softprompt.train import loss_on

    loss_fn = padded_loss_on if padded else loss_on
    method = build_ours(backbone, method_name, n, seed)
    optimizer = torch.optim.AdamW(method.parameters(), lr=lr, weight_decay=0.0)

    def step(examples):
        optimizer.zero_grad(set_to_none=True)
        prefix = method.kv(backbone) if padded else method.train_prefix(backbone)  # what `train.train` hands it
        loss, tokens = loss_fn(backbone, prefix, examples)
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
    """One training step of PEFT over the same model object, starting from our initial values."""
    import peft

    from softprompt.data import collate

    initial = build_ours(backbone, method_name, n, seed)  # our initial values, copied into PEFT's prompt encoder
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
        batch = collate(examples, pad)
        out = peft_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=peft_labels(batch))
        out.loss.backward()
        optimizer.step()
        return out.loss.item(), batch.num_input_tokens

    return step


def reference_loss(backbone, method_name: str, n: int, seed: int, examples) -> float:
    """The step-0 loss computed independently of both libraries: transformers' own loss over full logits at every
    position, the model reading `[P; E]` as inputs_embeds (prompt tuning) or the prefix key/values handed to it as its
    past, positions after them (prefix tuning). Both libraries' step-0 losses must equal it."""
    from transformers import DynamicCache

    from softprompt.backbones import cache_keyword
    from softprompt.data import collate

    model, initial = backbone.model, build_ours(backbone, method_name, n, seed)
    batch = collate(examples, backbone.tokenizer.pad_token_id)
    rows = batch.input_ids.shape[0]
    mask = torch.cat([batch.attention_mask.new_ones(rows, n), batch.attention_mask], dim=1)  # (B, n + T)
    with torch.no_grad():
        if method_name == "prompt":
            embeds = model.get_input_embeddings()(batch.input_ids)  # (B, T, hidden)
            embeds = torch.cat([initial.embeddings[None].expand(rows, -1, -1), embeds], dim=1)
            labels = torch.cat([torch.full((rows, n), -100), peft_labels(batch)], dim=1)
            return model(inputs_embeds=embeds, attention_mask=mask, labels=labels).loss.item()
        kv = initial.prefix  # (layers, 2, kv_heads, n, head_dim)
        cache = DynamicCache([(k[None].expand(rows, -1, -1, -1), v[None].expand(rows, -1, -1, -1)) for k, v in kv],
                             config=model.config)  # fmt: skip
        positions = n + torch.arange(batch.input_ids.shape[1]).expand(rows, -1)  # right padding: real tokens first
        return model(input_ids=batch.input_ids, attention_mask=mask, position_ids=positions, labels=peft_labels(batch),
                     **{cache_keyword(model): cache}).loss.item()  # fmt: skip


def useful_flops(model, batches, method_name: str, n: int) -> float:
    """Useful FLOPs per real input token over `batches`, see flops.py: the same for both libraries, since it counts
    the work the batch needs, not the work a library does."""
    from softprompt.data import collate

    flops = tokens = 0
    for examples in batches:
        batch = collate(examples, 0)
        flops += step_flops(model, batch.attention_mask.sum(-1).tolist(), len(batch.loss_tokens), n, method_name).total
        tokens += batch.num_input_tokens
    return flops / tokens


def model_state(model) -> tuple:
    """What must not change between runs: mode, frozen weights, hooks, attention implementation, cache setting."""
    from softprompt.models import fingerprint

    hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks) for m in model.modules())
    return (model.training, any(p.requires_grad for p in model.parameters()), hooks,
            model.config._attn_implementation, model.config.use_cache, fingerprint(model))  # fmt: skip


# ---------------------------------------------------------------------------------------------------- report
CORRECT_REL = 1e-4
"""A library's step-0 loss is correct when it is this close (relative) to the independent reference (float32)."""


def summarize(ours: list[RunResult], theirs: list[RunResult], reference: float, flops_per_token: float,
              peaks: list[float]) -> dict:
    """Ratios are taken within each repetition (the two runs of a repetition ran step for step together), then the
    median over repetitions; throughput and memory columns are each library's own median. No ratio is reported
    against a peer whose step-0 loss is not the reference's: a speed ratio against a wrong answer means nothing."""
    med = statistics.median
    rel = lambda a, b: float(f"{abs(a - b) / abs(b):.3g}")  # noqa: E731
    peer_correct = rel(theirs[0].loss_step0, reference) <= CORRECT_REL
    speedups = [round(o.tokens_per_s / p.tokens_per_s, 3) for o, p in zip(ours, theirs)] if peer_correct else []
    memory_ratios = [round(o.peak_bytes / p.peak_bytes, 3) for o, p in zip(ours, theirs)] if peer_correct else []

    def fraction(runs: list[RunResult]) -> float:
        """Each repetition against the matmul peak measured just before it (the same minutes of the machine)."""
        return round(med([r.tokens_per_s * flops_per_token / p for r, p in zip(runs, peaks)]), 3)

    return {
        "peer_correct": peer_correct,
        "ours_correct": rel(ours[0].loss_step0, reference) <= CORRECT_REL,
        "speedup": round(med(speedups), 3) if peer_correct else None,
        "memory_ratio": round(med(memory_ratios), 3) if peer_correct else None,
        "reference_loss_step0": round(reference, 6),
        "loss_rel_diff_step0": rel(ours[0].loss_step0, theirs[0].loss_step0),
        "loss_rel_diff_last": rel(ours[0].loss_last, theirs[0].loss_last),
        "peft_fraction_of_peak": fraction(theirs) if peer_correct else None,
        "fraction_of_peak": fraction(ours),
        "gflop_per_token": round(flops_per_token / 1e9, 4),
        "peak_gflops": round(med(peaks) / 1e9, 1),
        "ours_gflops": round(med([r.tokens_per_s for r in ours]) * flops_per_token / 1e9, 1),
        "peft_gflops": round(med([r.tokens_per_s for r in theirs]) * flops_per_token / 1e9, 1) if peer_correct else None,
        "ours_tokens_per_s": round(med([r.tokens_per_s for r in ours]), 1),
        "peft_tokens_per_s": round(med([r.tokens_per_s for r in theirs]), 1),
        "ours_peak_mb": round(med([r.peak_bytes for r in ours]) / MB, 1),
        "peft_peak_mb": round(med([r.peak_bytes for r in theirs]) / MB, 1),
        "ours_loss_step0": round(ours[0].loss_step0, 6),
        "peft_loss_step0": round(theirs[0].loss_step0, 6),
        "ours_loss_last": round(ours[0].loss_last, 6),
        "peft_loss_last": round(theirs[0].loss_last, 6),
        "same_step0_loss_every_repeat": all(len({r.loss_step0 for r in runs}) == 1 for runs in (ours, theirs)),
        "speedup_per_repeat": speedups,
        "memory_ratio_per_repeat": memory_ratios,
    }


def verdict(name: str, row: dict) -> str:
    if not row["ours_correct"]:
        return "WRONG: ours differs from the reference loss"
    if not row["peer_correct"]:
        return "no ratio: PEFT's loss differs from the reference"
    misses = []
    target = TARGETS[name.rsplit("-", 1)[0]]
    if row["speedup"] < target:
        misses.append(f"speed<{target}")
    if name.endswith("-cls") and row["memory_ratio"] > 0.7:
        misses.append("mem>0.7")
    if row["loss_rel_diff_step0"] > 1e-3:
        misses.append("loss")
    return "ok" if not misses else "MISS " + ",".join(misses)


def print_table(results: dict, args, seconds: float) -> None:
    import peft
    import transformers

    print(f"softprompt vs PEFT: training steps on SmolLM2-135M (float32, CPU), batch {BATCH_SIZE}, AdamW lr {args.lr}")
    print(f"date     : {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}")
    print(f"machine  : {machine()}")
    print(f"versions : torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
    print(f"command  : {' '.join(shlex.quote(a) for a in ['python', *sys.argv])}")
    print(f"runs     : {args.repeats} repetition(s) x ({args.steps} timed steps after 1 warm-up step), the libraries "
          "alternating step by step; ratios per repetition, then medians; "
          f"{seconds / 60:.1f} min in all")  # fmt: skip
    print(f"memory   : peak RSS during a step above the RSS just before it, largest over the run's steps; "
          f"{MEMORY_METHODS[args.memory]}")
    print("tokens   : real input tokens per second (input + target, no pads, no virtual tokens)")
    print("ours     : " + ("loss_on over the padded batch (kv -> new_cache -> forward -> head at loss positions)"
                          if args.padded
                          else "softprompt.train.loss_on (train_prefix -> packed_forward -> head at loss positions)"))
    print("PEFT     : get_peft_model(model, PromptTuningConfig | PrefixTuningConfig) forward with labels\n")
    header = (f"{'config':<15}{'ours tok/s':>11}{'PEFT tok/s':>11}{'speedup':>9}{'ours MB':>9}{'PEFT MB':>9}"
              f"{'mem ratio':>10}{'loss0 ours':>12}{'loss0 PEFT':>12}{'rel diff':>10}{'lossK ours':>12}"
              f"{'lossK PEFT':>12}  target")  # fmt: skip
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        speedup = f"{r['speedup']:>8.2f}x" if r["peer_correct"] else f"{'-':>9}"
        memory_ratio = f"{r['memory_ratio']:>10.2f}" if r["peer_correct"] else f"{'-':>10}"
        print(f"{name:<15}{r['ours_tokens_per_s']:>11.1f}{r['peft_tokens_per_s']:>11.1f}{speedup}"
              f"{r['ours_peak_mb']:>9.0f}{r['peft_peak_mb']:>9.0f}{memory_ratio}"
              f"{r['ours_loss_step0']:>12.5f}{r['peft_loss_step0']:>12.5f}{r['loss_rel_diff_step0']:>10.1e}"
              f"{r['ours_loss_last']:>12.5f}{r['peft_loss_last']:>12.5f}  {verdict(name, r)}")  # fmt: skip
    print(f"\n{'config':<15}{'GFLOP/token':>12}{'matmul peak':>12}{'ours GFLOP/s':>13}{'fraction':>9}"
          f"{'PEFT GFLOP/s':>13}{'fraction':>9}")  # fmt: skip
    for name, r in results.items():
        peft = (f"{r['peft_gflops']:>13.1f}{r['peft_fraction_of_peak']:>9.2f}" if r["peer_correct"]
                else f"{'-':>13}{'-':>9}")  # fmt: skip
        print(f"{name:<15}{r['gflop_per_token']:>12.3f}{r['peak_gflops']:>12.1f}{r['ours_gflops']:>13.1f}"
              f"{r['fraction_of_peak']:>9.2f}{peft}")
    print("GFLOP/token: useful FLOPs per real input token (forward + backward to the inputs, attention, the head at "
          "the loss positions; benchmarks/flops.py); matmul peak: GFLOP/s of the model's own linear-layer matmuls "
          "alone at the step's token count, measured before each repetition; fraction = achieved / peak, median "
          "over repetitions.")
    print(f"\nlossK = loss at step {args.steps}, after {args.steps} updates. Speedup per repetition: "
          + "; ".join(f"{k} {v['speedup_per_repeat']}" for k, v in results.items()))  # fmt: skip
    print("Targets (issue 3): speedup prompt-100 >= 1.6, prompt-20 >= 1.2, prefix-20 >= 1.15; cls memory ratio "
          "<= 0.7; step-0 loss rel diff <= 1e-3.")  # fmt: skip
    print(f"Correct: each library's step-0 loss within {CORRECT_REL:g} (relative) of transformers' own loss over full "
          "logits of [P; E] (prompt) or with the prefix as its past (prefix); ratios only where PEFT's is.")
    print("\nJSON (--json prints all fields):")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run, after one untimed warm-up step")
    parser.add_argument("--repeats", type=int, default=3, help="repetitions per configuration (medians reported)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {', '.join(CONFIGS)}")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--padded", action="store_true",
                        help="ours computes on the padded batch instead of packing real tokens (shows packing's gain)")
    parser.add_argument("--memory", choices=list(MEMORY_METHODS), default=None,
                        help="how peak memory is measured (default: vmhwm where the kernel allows it, else sample)")
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by configuration")
    args = parser.parse_args(argv)
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    if args.steps < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--steps, --repeats and --threads must be at least 1")
    args.memory = args.memory or ("vmhwm" if reset_high_water_mark() else "sample")

    warnings.filterwarnings("ignore")  # PEFT's and transformers' deprecation notes would repeat on every run
    from tqdm.auto import tqdm
    from transformers.utils import logging as hf_logging

    from softprompt.backbones import backbone_for
    from softprompt.datasets import sentiment_splits
    from softprompt.models import load_model

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    backbone = backbone_for(model, tokenizer)
    with torch.no_grad():  # page the weights in (memory-mapped from disk), or the first run's peak would hold them
        sum(float(p.sum()) for p in model.parameters())
    records = sentiment_splits()["train"]
    work = {task: draw_batches(make_task(tokenizer, task), records, args.steps + 1, args.seed)
            for task in ("cls", "gen")}  # fmt: skip
    before = model_state(model)

    def side_by_side(name: str, batches, flip: bool) -> dict[str, RunResult]:
        method_name, n, _ = CONFIGS[name]
        steps = {"ours": ours_step(backbone, method_name, n, args.lr, args.seed, args.padded),
                 "peft": peft_step(backbone, method_name, n, args.lr, args.seed)}  # fmt: skip
        assert model_state(model) == before, "wrapping the model in PEFT changed it"
        runs = paired_runs(steps, batches, args.memory, flip)
        del steps  # drops PEFT's wrapper
        assert model_state(model) == before, f"the base model changed during {name}"
        return runs

    for task, batches in work.items():  # a step of each first: one-time allocations stay out of the measurements
        side_by_side(f"prefix-20-{task}", batches[:1], flip=False)
    ours: dict[str, list[RunResult]] = {name: [] for name in names}
    theirs: dict[str, list[RunResult]] = {name: [] for name in names}
    references = {name: reference_loss(backbone, *CONFIGS[name][:2], args.seed, work[CONFIGS[name][2]][0])
                  for name in names}  # fmt: skip
    flops_per_token = {name: useful_flops(model, work[CONFIGS[name][2]][1:], *CONFIGS[name][:2])  # timed batches
                       for name in names}  # fmt: skip
    step_tokens = {task: round(statistics.mean(sum(len(e.input_ids) + len(e.target_ids) for e in b) for b in batches))
                   for task, batches in work.items()}  # fmt: skip
    peaks: dict[str, list[float]] = {name: [] for name in names}
    for rep in tqdm(range(args.repeats), desc="repetitions", file=sys.stderr):
        for name in tqdm(names, desc=f"repetition {rep + 1}", file=sys.stderr, leave=False):
            peaks[name].append(matmul_peak(model, step_tokens[CONFIGS[name][2]]))
            runs = side_by_side(name, work[CONFIGS[name][2]], flip=bool(rep % 2))
            ours[name].append(runs["ours"])
            theirs[name].append(runs["peft"])
    results = {name: summarize(ours[name], theirs[name], references[name], flops_per_token[name], peaks[name])
               for name in names}  # fmt: skip
    for row in results.values():
        row.update(steps=args.steps, repeats=args.repeats, threads=args.threads, padded=args.padded,
                   memory=args.memory)  # fmt: skip
    if not args.json:
        print_table(results, args, time.perf_counter() - started)
    print(json.dumps(results))  # one object on the last line, as in --json mode


if __name__ == "__main__":
    main()
