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

softprompt runs its real training step, `softprompt.training.loop.loss_on`: `method.training_input()` ->
`Backbone.packed_forward` (the real tokens of the batch packed densely after the prefix, nothing computed on pads;
prompt tuning's embeddings run in front of each packed row, in the same pass) -> LM head only at the loss positions
-> cross-entropy. With
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
    python -m benchmarks.train_speed                 # the same, as a module of the benchmarks package

The work, the two steps, the reference loss and the memory meter are common/training.py's, shared with scaling.py.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/train_speed.py`: the repository root, for `benchmarks.` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.machine import log, print_facts, quiet_process  # noqa: E402
from benchmarks.common.model import embedded_backbone, vocab_prompt  # noqa: E402
from benchmarks.common.training import (BATCH_SIZE, CORRECT_REL, MB, MEMORY_METHODS, PairSettings,  # noqa: E402
                                        RunResult, batch_tokens, default_memory_method, draw_batches, is_correct,
                                        make_task, model_state, ours_step, reference_loss, rel_diff,
                                        side_by_side)  # fmt: skip
from benchmarks.flops import matmul_peak, useful_flops  # noqa: E402

CONFIGS = {  # name -> (method, virtual tokens, task)
    f"{method}-{n}-{task}": (method, n, task)
    for method, n in (("prompt", 20), ("prompt", 100), ("prefix", 20))
    for task in ("cls", "gen")
}
TARGETS = {"prompt-20": 1.2, "prompt-100": 1.6, "prefix-20": 1.15}
"""Issue 3's speedup targets on the 2-core machine; also cls-mode memory_ratio <= 0.7, loss_rel_diff_step0 <= 1e-3."""


# ---------------------------------------------------------------------------------------------------- report
def summarize(ours: list[RunResult], theirs: list[RunResult], reference: float, flops_per_token: float,
              peaks: list[float], dtype: str = "float32") -> dict:
    """Ratios are taken within each repetition (the two runs of a repetition ran step for step together), then the
    median over repetitions; throughput and memory columns are each library's own median. No ratio is reported
    against a peer whose step-0 loss is not the reference's: a speed ratio against a wrong answer means nothing."""
    med = statistics.median
    peer_correct = is_correct(theirs[0].loss_step0, reference, dtype)
    speedups = [round(o.tokens_per_s / p.tokens_per_s, 3) for o, p in zip(ours, theirs)] if peer_correct else []
    memory_ratios = [round(o.peak_bytes / p.peak_bytes, 3) for o, p in zip(ours, theirs)] if peer_correct else []

    def fraction(runs: list[RunResult]) -> float:
        """Each repetition against the matmul peak measured just before it (the same minutes of the machine)."""
        return round(med([r.tokens_per_s * flops_per_token / p for r, p in zip(runs, peaks)]), 3)

    return {
        "peer_correct": peer_correct,
        "ours_correct": is_correct(ours[0].loss_step0, reference, dtype),
        "speedup": round(med(speedups), 3) if peer_correct else None,
        "memory_ratio": round(med(memory_ratios), 3) if peer_correct else None,
        "reference_loss_step0": round(reference, 6),
        "loss_rel_diff_step0": rel_diff(ours[0].loss_step0, theirs[0].loss_step0),
        "loss_rel_diff_last": rel_diff(ours[0].loss_last, theirs[0].loss_last),
        "peft_fraction_of_peak": fraction(theirs) if peer_correct else None,
        "fraction_of_peak": fraction(ours),
        "gflop_per_token": round(flops_per_token / 1e9, 4),
        "peak_gflops": round(med(peaks) / 1e9, 1),
        "ours_gflops": round(med([r.tokens_per_s for r in ours]) * flops_per_token / 1e9, 1),
        "peft_gflops": (round(med([r.tokens_per_s for r in theirs]) * flops_per_token / 1e9, 1) if peer_correct
                        else None),
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
    misses, name = [], name.split("/")[0]  # "prompt-20-cls/bfloat16": the configuration, then the dtype
    target = TARGETS[name.rsplit("-", 1)[0]]
    if row["speedup"] < target:
        misses.append(f"speed<{target}")
    if name.endswith("-cls") and row["memory_ratio"] > 0.7:
        misses.append("mem>0.7")
    if row["loss_rel_diff_step0"] > max(1e-3, 2 * CORRECT_REL[row["dtype"]]):  # each within the reference's
        misses.append("loss")
    return "ok" if not misses else "MISS " + ",".join(misses)


def print_table(results: dict, args, seconds: float) -> None:
    print(f"softprompt vs PEFT: training steps on SmolLM2-135M ({args.dtype}, {args.device}), batch {BATCH_SIZE}, "
          f"AdamW lr {args.lr}")
    print_facts()
    print(f"runs     : {args.repeats} repetition(s) x ({args.steps} timed steps after 1 warm-up step), the libraries "
          "alternating step by step; ratios per repetition, then medians; "
          f"{seconds / 60:.1f} min in all")  # fmt: skip
    print(f"memory   : peak RSS during a step above the RSS just before it, largest over the run's steps; "
          f"{MEMORY_METHODS[args.memory]}")
    print("tokens   : real input tokens per second (input + target, no pads, no virtual tokens)")
    print("ours     : " + ("loss_on over the padded batch (kv -> new_cache -> forward -> head at loss positions)"
                          if args.padded else "softprompt.training.loop.loss_on (training_input -> packed_forward -> "
                          "head at loss positions)"))  # fmt: skip
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
    if args.compile:
        print("compiled (ours, --compile): graphs and seconds of the untimed steps that compiled them: " + "; ".join(
            f"{k} {v['compiled_graphs']} in {v['compile_warmup_seconds']} s" for k, v in results.items()))
    print(f"\nlossK = loss at step {args.steps}, after {args.steps} updates. Speedup per repetition: "
          + "; ".join(f"{k} {v['speedup_per_repeat']}" for k, v in results.items()))  # fmt: skip
    print("Targets (issue 3): speedup prompt-100 >= 1.6, prompt-20 >= 1.2, prefix-20 >= 1.15; cls memory ratio "
          "<= 0.7; step-0 loss rel diff <= 1e-3.")  # fmt: skip
    across = {k: v for k, v in results.items() if any(key.startswith("ours_vs_") for key in v)}
    if across:
        key = next(key for key in next(iter(across.values())) if key.startswith("ours_vs_"))
        print(f"\nours in each dtype against ours in {key.removeprefix('ours_vs_')} (tokens/s ratio, same batches, "
              "interleaved, median over repetitions): " + "; ".join(f"{k} {v[key]:.2f}x" for k, v in across.items()))
    tolerances = ", ".join(f"{CORRECT_REL[r['dtype']]:g} in {r['dtype']}" for r in {r["dtype"]: r for r in results.values()}.values())
    print(f"Correct: each library's step-0 loss within {tolerances} (relative) of transformers' own float32 loss over full "
          "logits of [P; E] (prompt) or with the prefix as its past (prefix); ratios only where PEFT's is.")
    print("\nJSON (--json prints all fields):")


def compile_ours(backbones: dict, runs: list[tuple[str, str]], work: dict, args) -> dict[tuple, dict]:
    """Compile each backbone's training pass, then run ours untimed over every configuration's batches: the graphs it
    needs are compiled here, not in the timed steps. Returns per (configuration, dtype) the seconds and graphs that
    took."""
    from softprompt.backbones.compiled import compiled_graphs

    for d, backbone in backbones.items():
        problem = backbone.compile()
        if problem:
            raise SystemExit(f"--compile: torch.compile does not work here ({problem})")
    done = {}
    for name, d in runs:
        method, n, task = CONFIGS[name]
        step = ours_step(backbones[d], method, n, args.lr, args.seed)
        graphs, started = compiled_graphs(), time.perf_counter()
        for batch in work[task]:
            step(batch)
        done[name, d] = {"compile_warmup_seconds": round(time.perf_counter() - started, 1),
                         "compiled_graphs": compiled_graphs() - graphs}  # fmt: skip
        log(f"{name} ({d}): compiled {done[name, d]['compiled_graphs']} graph(s) in "
            f"{done[name, d]['compile_warmup_seconds']} s over {len(work[task])} untimed steps")
    return done


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
    parser.add_argument("--dtype", default="float32",
                        help="the frozen model's dtype for both libraries: float32, bfloat16, float16, or several "
                             "comma-separated (each configuration then runs in each, interleaved, and ours is "
                             "compared across them)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both libraries on it)")
    parser.add_argument("--json", action="store_true", help="print one JSON object keyed by configuration")
    parser.add_argument("--compile", action="store_true",
                        help="ours with its training pass compiled (`train --compile`): each configuration first runs "
                             "untimed over all its batches, so compiling stays out of the timed steps (its time and "
                             "graphs reported apart)")
    args = parser.parse_args(argv)
    dtypes = [d.strip() for d in args.dtype.split(",") if d.strip()]
    if not dtypes or any(d not in CORRECT_REL for d in dtypes):
        parser.error(f"--dtype takes {', '.join(CORRECT_REL)} (comma-separated), got {args.dtype!r}")
    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = [c for c in names if c not in CONFIGS]
    if unknown or not names:
        parser.error(f"unknown configuration(s) {unknown}; choose from {', '.join(CONFIGS)}")
    if args.steps < 1 or args.repeats < 1 or args.threads < 1:
        parser.error("--steps, --repeats and --threads must be at least 1")
    args.memory = args.memory or default_memory_method(args.device)

    from tqdm.auto import tqdm

    from softprompt.data.corpora import sentiment_splits

    quiet_process(args.threads)
    started = time.perf_counter()
    backbones = {d: embedded_backbone(page_in=True, dtype=d, device=args.device) for d in dtypes}  # paged in: or a
    # first peak would hold the weights; the reference is float32
    reference_model = backbones.get("float32") or embedded_backbone(dtype="float32", device=args.device)
    tokenizer = reference_model.tokenizer
    records = sentiment_splits()["train"]
    work = {task: draw_batches(make_task(tokenizer, task), records, args.steps + 1, args.seed)
            for task in ("cls", "gen")}  # fmt: skip
    before = {d: model_state(b.model) for d, b in backbones.items()}
    settings = PairSettings(args.lr, args.seed, args.memory, args.padded)
    runs = [(name, d) for name in names for d in dtypes]  # each configuration in each dtype

    def run(name: str, dtype: str, batches, flip: bool) -> dict[str, RunResult]:
        method, n, _ = CONFIGS[name]
        return side_by_side(backbones[dtype], method, n, batches, settings, flip, before[dtype])

    for task, batches in work.items():  # a step of each first: one-time allocations stay out of the measurements
        for d in dtypes:
            run(f"prefix-20-{task}", d, batches[:1], flip=False)
    compiling = compile_ours(backbones, runs, work, args) if args.compile else {}
    ours: dict[tuple, list[RunResult]] = {key: [] for key in runs}
    theirs: dict[tuple, list[RunResult]] = {key: [] for key in runs}
    references = {(name, d): reference_loss(reference_model, *CONFIGS[name][:2], args.seed, work[CONFIGS[name][2]][0],
                                            start=vocab_prompt(backbones[d], *CONFIGS[name][:2], args.seed))
                  for name, d in runs}  # fmt: skip
    model = reference_model.model
    flops_per_token = {name: useful_flops(model, work[CONFIGS[name][2]][1:], *CONFIGS[name][:2])  # timed batches
                       for name in names}  # fmt: skip
    step_tokens = {task: round(statistics.mean(map(batch_tokens, batches))) for task, batches in work.items()}
    peaks: dict[tuple, list[float]] = {key: [] for key in runs}
    for rep in tqdm(range(args.repeats), desc="repetitions", file=sys.stderr):
        for name, d in tqdm(runs, desc=f"repetition {rep + 1}", file=sys.stderr, leave=False):
            peaks[name, d].append(matmul_peak(backbones[d].model, step_tokens[CONFIGS[name][2]]))
            pair = run(name, d, work[CONFIGS[name][2]], flip=bool(rep % 2))
            ours[name, d].append(pair["ours"])
            theirs[name, d].append(pair["peft"])
    results = {}
    for name, d in runs:
        row = summarize(ours[name, d], theirs[name, d], references[name, d], flops_per_token[name], peaks[name, d], d)
        row.update(dtype=d, steps=args.steps, repeats=args.repeats, threads=args.threads, padded=args.padded,
                   memory=args.memory, **compiling.get((name, d), {}))  # fmt: skip
        if d != dtypes[0]:  # ours in this dtype against ours in the first, repetition by repetition
            row[f"ours_vs_{dtypes[0]}"] = round(statistics.median(
                [a.tokens_per_s / b.tokens_per_s for a, b in zip(ours[name, d], ours[name, dtypes[0]])]), 3)
        results[name if len(dtypes) == 1 else f"{name}/{d}"] = row
    if not args.json:
        print_table(results, args, time.perf_counter() - started)
    print(json.dumps(results))  # one object on the last line, as in --json mode


if __name__ == "__main__":
    main()
