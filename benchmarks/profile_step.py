"""Where the time of one training step goes: torch's profiler over softprompt's real step (`training.loop.loss_on`,
backward, AdamW) on the embedded SmolLM2-135M, the same batches of 8 movie reviews as train_speed.py's prompt-20-cls.

After --warmup untimed steps, --steps steps run under `torch.profiler.profile` (CPU activities); printed: the
operators with the most self time (time inside the operator itself, not its children), their share of the profiled
wall time, and a grouping into matrix products, attention, elementwise/normalization, copies and layout, and the
rest, so a change can be judged by where it moves time. The useful-FLOP rate of the same steps against the matmul
peak (benchmarks/flops.py) comes last.

    python benchmarks/profile_step.py                         # prompt tuning, 20 virtual tokens, classification
    python benchmarks/profile_step.py --method prefix --rows 25
    python -m benchmarks.profile_step --warmup 1 --steps 1 --rows 5   # a smoke check, as a module
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python benchmarks/profile_step.py`: the repository root, for `benchmarks.` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.machine import machine, quiet_process  # noqa: E402
from benchmarks.common.model import embedded_backbone  # noqa: E402
from benchmarks.common.training import draw_batches, make_task, ours_step  # noqa: E402
from benchmarks.flops import matmul_peak, useful_flops  # noqa: E402

GROUPS = {  # operator name fragments -> group, first match wins
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul"),
    "attention": ("attention", "aten::_softmax", "aten::softmax"),
    "copies and layout": ("copy", "aten::cat", "aten::index", "aten::contiguous", "aten::clone", "aten::stack",
                          "aten::masked_fill", "aten::fill_", "aten::zero_", "aten::empty", "aten::scatter",
                          "aten::gather", "aten::where"),
    "elementwise and norms": ("aten::mul", "aten::add", "aten::div", "aten::pow", "aten::rsqrt", "aten::mean",
                              "aten::silu", "aten::neg", "aten::sub", "aten::sum", "aten::exp", "aten::sigmoid",
                              "aten::cos", "aten::sin", "aten::log_softmax", "aten::_log_softmax", "aten::nll",
                              "aten::addcmul", "aten::addcdiv", "aten::sqrt", "aten::lerp", "aten::_foreach"),
}  # fmt: skip


def group_of(name: str) -> str:
    return next((g for g, parts in GROUPS.items() if any(p in name for p in parts)), "other")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", choices=("prompt", "prefix"), default="prompt")
    parser.add_argument("--num-tokens", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rows", type=int, default=15, help="operators listed")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", metavar="FILE", help="also write the summary here")
    args = parser.parse_args()
    quiet_process(args.threads)

    from softprompt.data.corpora import sentiment_splits

    backbone = embedded_backbone()
    model = backbone.model
    batches = draw_batches(make_task(backbone.tokenizer, "cls"), sentiment_splits()["train"], args.warmup + args.steps,
                           0)  # fmt: skip
    step = ours_step(backbone, args.method, args.num_tokens, 0.01, 0)
    for examples in batches[: args.warmup]:
        step(examples)
    timed = batches[args.warmup :]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        began = time.perf_counter()
        tokens = sum(step(examples)[1] for examples in timed)
        wall = time.perf_counter() - began
    # The same steps again without the profiler: its own overhead stays out of the rate.
    began = time.perf_counter()
    sum(step(examples)[1] for examples in timed)
    unprofiled = time.perf_counter() - began

    events = sorted(profile.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total_us = wall * 1e6
    groups: dict[str, float] = {}
    for e in events:
        groups[group_of(e.key)] = groups.get(group_of(e.key), 0.0) + e.self_cpu_time_total
    flops = useful_flops(model, timed, args.method, args.num_tokens) * tokens
    peak = matmul_peak(model, round(tokens / len(timed)))
    summary = {
        "method": args.method, "num_tokens": args.num_tokens, "steps": args.steps, "threads": args.threads,
        "seconds_per_step": round(unprofiled / len(timed), 3), "tokens_per_s": round(tokens / unprofiled, 1),
        "achieved_gflops": round(flops / unprofiled / 1e9, 1), "peak_gflops": round(peak / 1e9, 1),
        "fraction_of_peak": round(flops / unprofiled / peak, 3),
        "groups": {g: round(us / total_us, 3) for g, us in sorted(groups.items(), key=lambda kv: -kv[1])},
        "top": [{"op": e.key, "calls": e.count // len(timed),
                 "ms_per_step": round(e.self_cpu_time_total / 1e3 / len(timed), 2),
                 "share": round(e.self_cpu_time_total / total_us, 3)} for e in events[: args.rows]],
    }  # fmt: skip
    print(f"one training step of {args.method} tuning, {args.num_tokens} virtual tokens, batches of 8 reviews "
          f"({tokens / len(timed):.0f} real tokens per step); {machine()}")
    print(f"{'operator':<44}{'calls/step':>11}{'ms/step':>9}{'share':>8}")
    for row in summary["top"]:
        print(f"{row['op'][:43]:<44}{row['calls']:>11}{row['ms_per_step']:>9.1f}{row['share']:>8.1%}")
    print("groups (self time / profiled wall time): "
          + ", ".join(f"{g} {share:.0%}" for g, share in summary["groups"].items()))
    print(f"without the profiler: {summary['seconds_per_step']:.3f} s/step, {summary['tokens_per_s']} tokens/s, "
          f"{summary['achieved_gflops']} useful GFLOP/s of a {summary['peak_gflops']} GFLOP/s matmul peak: "
          f"fraction_of_peak {summary['fraction_of_peak']}")  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)


if __name__ == "__main__":
    main()
