"""Memory before the first step (issue 25): `softprompt.training.memory.estimate` against the measured peak of real
training runs, and what fits on 24, 48 and 80 GiB GPUs by the estimate alone.

Measured: random-weight Llama-shaped models of about 0.5, 1 and 1.5 B parameters (vocabulary 49,152 like SmolLM2),
built from their config in bfloat16 (no download), each trained through the library's own
`softprompt.training.loop.train` (AdamW, no validation or checkpoints) in a process of its own for --steps optimizer
steps (default 1: AdamW's state, made at the end of a step, is a few MB for these prompts), for prompt and prefix
tuning (20 virtual tokens), two batch/length settings, with and without gradient checkpointing. Every row of a batch
has exactly `length` real tokens, the last quarter of them its target (the loss, and so the logits, is there), so
the longest row is every row: the case the estimate bounds.

Shape-only matmuls (every run but the check's real ones): the frozen linear layers (and the LM head) return
zero-filled outputs of their true shape and dtype, and zero-filled input gradients of their true shape, instead of
multiplying. Every tensor the training path allocates, keeps and frees is the same; only the arithmetic is skipped.
Why: this machine's CPU (AMD EPYC, AVX2 only, no AVX-512 BF16 or AMX) multiplies bfloat16 at 6-17 GFLOP/s, and
torch 2.13's CPU matmul of two row-major bfloat16 operands (what a frozen linear layer's backward runs) at about
0.3 GFLOP/s: one real bfloat16 step of the 1.5 B model would take hours. The check runs the smallest model in
float32 (which multiplies at 60-70 GFLOP/s here) both ways: peaks within 1 % (README, "Memory").

How the peak is read: the process imports everything, loads the tokenizer and matplotlib (the run's loss plot), and
reads its resident memory (RSS): the Python/torch baseline, which the estimate leaves out (a GPU does not hold it;
on a CPU it is resident before the check runs). It then builds the model and takes the weights' fingerprint (an
artifact records it; taken once), resets the kernel's peak-RSS counter (VmHWM, /proc/self/clear_refs) and trains.
measured = VmHWM - baseline: weights, activations, prompt and optimizer, and every transient, as the process held
them. The main table runs with glibc's mmap threshold pinned at 64 KiB (MALLOC_MMAP_THRESHOLD_=65536): each tensor's
memory then goes back to the system when it is freed, so RSS is what the tensors need. glibc as it comes raises the
threshold to the largest block freed and keeps such blocks on its heap afterwards; its peak RSS is measured too, for
one setting per model. The import-only baseline of a separate process is printed.

    python benchmarks/memory_estimate.py                    # every table (4x128 alone: about 22 minutes on 2 cores)
    python benchmarks/memory_estimate.py --models 0.5b --settings 4x128 --no-check
    python benchmarks/memory_estimate.py --gpu-table        # only the GPU table (estimates, seconds)
    python benchmarks/memory_estimate.py --rows rows.json   # rows saved with --json, against the estimator as it is
    python -m benchmarks.memory_estimate                     # the same, as a module of the benchmarks package
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/memory_estimate.py`: the repository root, for `benchmarks.` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.machine import log, print_facts, quiet_process  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
NUM_TOKENS = 20
SMOLLM2_VOCAB = 49152
MEASURED = {  # name -> Llama config (GQA in two of them; one with its own LM head)
    "0.5b": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                 num_key_value_heads=8, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "1.5b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=20, num_attention_heads=32,
                 num_key_value_heads=32, tie_word_embeddings=True),
}  # fmt: skip
SETTINGS = {"4x128": (4, 128), "8x256": (8, 256)}
"""batch x length (real tokens per row; the last quarter the target)."""
GPU_MODELS = {  # the published shapes of Llama 3.2 1B/3B, Llama 3.1 8B, Llama 2 13B, Code Llama 34B, Llama 3.1 70B
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "3B": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000),
    "34B": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=32000),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256),
}  # fmt: skip
GPU_RUN = dict(batch_size=8, max_length=512, target_length=128)
"""The run the GPU table states: 8 rows of 512 real tokens, 128 of them the target, 20 virtual tokens, AdamW."""
FIXED_MMAP_THRESHOLD = 65536
GPUS = (24, 48, 80)
CUDA_RESERVE = 1.0
"""GiB of a GPU taken as unavailable to tensors: the CUDA context, cuBLAS workspace, allocator rounding."""


def llama_config(shape: dict):
    from transformers import LlamaConfig

    return LlamaConfig(**{"vocab_size": SMOLLM2_VOCAB, "max_position_embeddings": 4096, **shape})


def estimate_for(name: str, method: str, batch: int, length: int, checkpointing: bool, dtype: str = "bfloat16",
                 **run):  # fmt: skip
    from softprompt.config import PromptConfig
    from softprompt.training import memory

    shape = MEASURED.get(name) or GPU_MODELS[name]
    prompt = PromptConfig(method=method, num_tokens=NUM_TOKENS, init="random")
    return memory.estimate(llama_config(shape), prompt_config=prompt, dtype=dtype, batch_size=batch,
                           max_length=length, gradient_checkpointing=checkpointing, **run)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- one run
def resident() -> dict:
    """This process's resident memory now and at its peak (bytes)."""
    from benchmarks.common.training import high_water_mark, rss

    return {"rss": rss(), "hwm": high_water_mark()}


def prepare_process(threads: int):
    """Everything a run imports and loads before its model: what the baseline holds."""
    quiet_process(threads)
    import matplotlib.pyplot  # noqa: F401  (the run's loss plot imports it; part of the baseline, not the run)
    from transformers import AutoTokenizer

    import softprompt.training.loop  # noqa: F401
    from softprompt.models import embedded_model_dir

    return AutoTokenizer.from_pretrained(embedded_model_dir())


def shape_only(model) -> None:
    """Every frozen linear layer of `model` (the LM head too) allocates what it would, zero-filled, without
    multiplying: its output in the forward, its input's gradient in the backward; like torch's own linear with a
    frozen weight, it keeps nothing for the backward but the weight."""
    import torch

    class ShapeOnly(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, weight):
            ctx.in_features = weight.shape[1]
            return x.new_zeros(*x.shape[:-1], weight.shape[0])

        @staticmethod
        def backward(ctx, grad):
            return grad.new_zeros(*grad.shape[:-1], ctx.in_features), None

    for module in model.modules():
        if isinstance(module, torch.nn.Linear):
            assert module.bias is None and not module.weight.requires_grad, "Llama's frozen linear layers only"
            module.forward = lambda x, weight=module.weight: ShapeOnly.apply(x, weight)


def child(spec: dict) -> dict:
    """One measured training run in this process (see the module's docstring)."""
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.common.training import high_water_mark, release_freed_memory, reset_high_water_mark, rss
    from softprompt.backbones import backbone_for
    from softprompt.config import PromptConfig, TaskConfig, TrainConfig
    from softprompt.data import Example, TaskEncoder
    from softprompt.training.loop import train

    tokenizer = prepare_process(spec["threads"])
    release_freed_memory()
    baseline = rss()
    torch.manual_seed(0)
    dtype = getattr(torch, spec["dtype"])
    model = AutoModelForCausalLM.from_config(llama_config(MEASURED[spec["model"]]), dtype=dtype).eval()
    backbone = backbone_for(model, tokenizer)
    backbone.fingerprint  # noqa: B018  (taken once, before training: its float32 embeddings are not a step's)
    if spec["arithmetic"] == "shape-only":
        shape_only(model)
    batch, length = SETTINGS[spec["setting"]]
    target = length // 4
    ids = torch.randint(3, 40000, (batch * spec["steps"], length), generator=torch.Generator().manual_seed(1))
    examples = [Example(row[:-target], row[-target:]) for row in ids.tolist()]
    task = TaskEncoder(TaskConfig(template="{text}", task="generation", target_field="target"), tokenizer)
    config = TrainConfig(steps=spec["steps"], batch_size=batch, max_length=length, eval_every=0, checkpoint_every=0,
                         warmup_steps=0, gradient_checkpointing=spec["checkpointing"], report_to="none")  # fmt: skip
    prompt = PromptConfig(method=spec["method"], num_tokens=NUM_TOKENS, init="random")
    release_freed_memory()
    if not reset_high_water_mark():
        raise SystemExit("/proc/self/clear_refs is not writable here: the peak cannot be read")
    before, started = rss(), time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train(backbone, task, prompt, config, examples, Path(out) / "run", progress=False)
    return {"baseline": baseline, "weights_rss": before - baseline, "peak": high_water_mark() - baseline,
            "seconds": round(time.perf_counter() - started, 1),
            "parameters": sum(p.numel() for p in model.parameters())}  # fmt: skip


def run_child(spec: dict, timeout: float) -> dict:
    """`child(spec)` in a fresh process: its peak is its own. malloc "fixed": glibc's mmap threshold pinned at
    64 KiB (MALLOC_MMAP_THRESHOLD_), so every tensor's memory goes back to the system when it is freed; "default":
    glibc as it comes, whose threshold rises to the largest block freed, after which such blocks come from the heap
    and stay with the process."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    if spec["malloc"] == "fixed":
        env["MALLOC_MMAP_THRESHOLD_"] = str(FIXED_MMAP_THRESHOLD)
    done = subprocess.run([sys.executable, "-m", "benchmarks.memory_estimate", "--child", json.dumps(spec)],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"run {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def baseline_process(threads: int) -> int:
    """The peak resident memory of a process that only imports and loads what a run does before its model."""
    code = ("import json,sys; from benchmarks.memory_estimate import prepare_process, resident; "
            f"prepare_process({threads}); print(json.dumps(resident()))")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])["hwm"]


# ---------------------------------------------------------------------------------------------------- the tables
def measure(runs: list[dict], args) -> list[dict]:
    """Each run of `runs` (model, setting, method, checkpointing, dtype, arithmetic, malloc) measured and estimated."""
    rows = []
    for run in runs:
        spec = {**run, "steps": args.steps, "threads": args.threads}
        log(" ".join(f"{k}={v}" for k, v in run.items()) + " ...")
        rows.append(estimated({**spec, **run_child(spec, args.timeout)}))
        r = rows[-1]
        log(f"  estimate {r['estimate'] / GIB:.2f} GiB, measured {r['peak'] / GIB:.2f} GiB, ratio {r['ratio']} "
            f"({r['seconds']} s)")  # fmt: skip
    return rows


def estimated(row: dict) -> dict:
    """A measured row with the estimate of the estimator as it is now (so `--rows` reprints saved runs against a
    changed estimator without running them again)."""
    batch, length = SETTINGS[row["setting"]]
    est = estimate_for(row["model"], row["method"], batch, length, row["checkpointing"], row["dtype"],
                       target_length=length // 4)  # fmt: skip
    return {**row, "estimate": est.total, "estimate_text": est.text, "ratio": round(est.total / row["peak"], 3)}


def grid(models, settings, methods, dtype="bfloat16", arithmetic="shape-only", malloc="fixed") -> list[dict]:
    return [dict(model=m, setting=s, method=method, checkpointing=c, dtype=dtype, arithmetic=arithmetic,
                 malloc=malloc) for m in models for s in settings for method in methods for c in (False, True)]


KEY = ("model", "setting", "method", "checkpointing", "dtype")


def print_measured(rows: list[dict], title: str) -> None:
    print(f"\n{title}\n\n| model | parameters | method | batch x length | checkpointing | estimate GiB | measured GiB "
          "| estimate / measured |\n|---|---:|---|---|---|---:|---:|---:|")  # fmt: skip
    for r in rows:
        print(f"| {r['model']} | {r['parameters'] / 1e9:.2f} B | {r['method']} | {r['setting']} | "
              f"{'on' if r['checkpointing'] else 'off'} | {r['estimate'] / GIB:.2f} | {r['peak'] / GIB:.2f} | "
              f"{r['ratio']:.2f} |")  # fmt: skip
    worst = max(rows, key=lambda r: abs(r["ratio"] - 1))
    print(f"\nworst ratio {worst['ratio']} ({worst['model']} {worst['method']} {worst['setting']}); all within "
          f"20 %: {all(abs(r['ratio'] - 1) <= 0.2 for r in rows)}")  # fmt: skip


def print_pairs(rows: list[dict], field: str, a: str, b: str, title: str) -> None:
    """Measured peaks of the same runs that differ in `field` only: b's over a's."""
    first = {tuple(r[k] for k in KEY): r["peak"] for r in rows if r[field] == a}
    pairs = [(r, first[tuple(r[k] for k in KEY)]) for r in rows if r[field] == b and tuple(r[k] for k in KEY) in first]
    print(f"\n{title}: " + ", ".join(f"{r['model']} {r['method']} {r['setting']} "
                                     f"{'checkpointing' if r['checkpointing'] else 'plain'} {r['peak'] / p:.3f}"
                                     for r, p in pairs))  # fmt: skip


def print_tables(rows: list[dict], baseline: int) -> None:
    """The measured tables: the main one (bfloat16, shape-only, pinned threshold), the float32 check of shape-only
    matmuls against real ones, and glibc's default malloc against the pinned threshold."""
    main = [r for r in rows if r["dtype"] == "bfloat16" and r["malloc"] == "fixed"]
    matmuls = [r for r in rows if r["dtype"] == "float32"]
    malloc = [r for r in rows if r["malloc"] == "default"]
    print(f"baseline : an import-only process peaks at {baseline / GIB:.2f} GiB resident (Python, torch, "
          "transformers, softprompt, tokenizer, matplotlib); each run subtracts its own RSS before its model")
    if main:
        print_measured(main, f"bfloat16, shape-only matmuls, MALLOC_MMAP_THRESHOLD_={FIXED_MMAP_THRESHOLD}:")
    if matmuls:
        print_measured(matmuls, "float32, real and shape-only matmuls (in that order):")
        print_pairs(matmuls, "arithmetic", "real", "shape-only", "shape-only / real, measured peak")
    if malloc:
        print_measured(malloc, "bfloat16, shape-only matmuls, glibc's default malloc:")
        print_pairs(main + malloc, "malloc", "fixed", "default", "default malloc / fixed threshold, measured peak")


def gpu_table() -> None:
    """What fits on 24, 48 and 80 GiB GPUs, by the estimate alone (no GPU was used)."""
    print(f"\nGPU table: estimates only, bfloat16 weights, batch {GPU_RUN['batch_size']} x {GPU_RUN['max_length']} "
          f"tokens ({GPU_RUN['target_length']} of them the target), {NUM_TOKENS} virtual tokens, AdamW; a GPU of "
          f"G GiB is taken to give G - {CUDA_RESERVE} GiB to tensors.\n")  # fmt: skip
    print("| model | parameters | weights GiB | prompt | prompt + checkpointing | prefix | prefix + checkpointing "
          "| 4-bit base, prefix + checkpointing |\n|---|---:|---:|---|---|---|---|---|")  # fmt: skip
    for name in GPU_MODELS:
        cells, weights, parameters = [], 0, 0
        for method, checkpointing, bits in (("prompt", False, None), ("prompt", True, None), ("prefix", False, None),
                                            ("prefix", True, None), ("prefix", True, 4)):  # fmt: skip
            est = estimate_for(name, method, GPU_RUN["batch_size"], GPU_RUN["max_length"], checkpointing,
                               target_length=GPU_RUN["target_length"], bits=bits)  # fmt: skip
            weights, parameters = weights or est.weights, est.model.parameters
            fits = [g for g in GPUS if est.total <= (g - CUDA_RESERVE) * GIB]
            cells.append(f"{est.total / GIB:.1f} GiB: {f'{fits[0]} GB' if fits else 'none'}")
        print(f"| {name} | {parameters / 1e9:.1f} B | {weights / GIB:.1f} | " + " | ".join(cells) + " |")
    print("\nEach cell: the estimated peak, then the smallest of the 24, 48 and 80 GB GPUs that holds it.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MEASURED))
    parser.add_argument("--settings", type=lambda s: s.split(","), default=list(SETTINGS))
    parser.add_argument("--methods", type=lambda s: s.split(","), default=["prompt", "prefix"])
    parser.add_argument("--steps", type=int, default=1, help="optimizer steps per run")
    parser.add_argument("--no-check", action="store_true",
                        help="skip the runs that check the method: real against shape-only matmuls, default malloc")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds one run may take before it fails")
    parser.add_argument("--gpu-table", action="store_true", help="only the GPU table")
    parser.add_argument("--json", metavar="FILE", help="also write the measured rows here")
    parser.add_argument("--rows", metavar="FILE", help="print the tables of rows saved with --json, against the "
                                                       "estimator as it is now (no run)")  # fmt: skip
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    quiet_process(args.threads)
    started, baseline, rows = time.perf_counter(), None, []
    if args.rows:
        saved = json.loads(Path(args.rows).read_text())
        baseline, rows = saved["baseline"], [estimated(row) for row in saved["rows"]]
    elif not args.gpu_table:
        baseline, stages = baseline_process(args.threads), [grid(args.models, args.settings, args.methods)]
        if not args.no_check:  # float32 (which multiplies fast here) both ways; glibc as it comes
            stages.append([run for arithmetic in ("real", "shape-only")
                           for run in grid(["0.5b"], ["4x128"], args.methods, "float32", arithmetic)])
            stages.append(grid(args.models, args.settings[-1:], ["prompt"], malloc="default"))
        for runs in stages:
            rows += measure(runs, args)
            if args.json:  # after each stage, so an interrupted run keeps what it measured
                Path(args.json).write_text(json.dumps({"baseline": baseline, "rows": rows}, indent=1))
    print_facts()
    if rows:
        print_tables(rows, baseline)
    gpu_table()
    print(f"\n{time.perf_counter() - started:.0f} s in all")


if __name__ == "__main__":
    main()
