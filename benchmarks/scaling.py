"""How training and serving costs grow: softprompt against PEFT (training) and vLLM (serving), one axis at a time.

Training (train_* axes, scaling_train.py): softprompt and PEFT 0.21 train side by side in one process, exactly as
train_speed.py runs them, through the same functions (common/training.py): the same model object (PEFT wraps it),
the same batches, the same initial values (ours `init="vocab"` under --seed, copied into PEFT's prompt encoder),
AdamW at the same learning rate, the two libraries alternating step by step (`paired_runs`). Each point is 1 untimed
warm-up step, then --steps timed steps (the ~1B model: half as many, at least 1). Unless an axis says otherwise:
prompt tuning, 20 virtual tokens, classification (`Review: {text}\\nSentiment:`, the label word the only target),
batch 8, float32, the embedded SmolLM2-135M.
- throughput: real input tokens per second over the timed steps (input + target, no pads, no virtual tokens);
- peak memory: per step, the peak RSS during the step above the RSS just before it (common/training.py's `PeakMemory`:
  the kernel's high-water mark VmHWM, reset per step, or 5 ms sampling where the kernel refuses the reset); a
  point's peak is the largest over its steps, warm-up included;
- correctness before any ratio: each library's step-0 loss against `reference_loss` (transformers' own loss over
  full logits of explicit `[P; E]`, or the prefix as the model's past) within 1e-4 relative. A point whose PEFT loss
  is not the reference's has `"peer_correct": false`, no speedup or memory ratio, and no PEFT value in the plots
  (its measured values stay in the JSON).
Axes:
- train_length: 32, 64, 128, 256, 512 real tokens per row, every row exactly that long (review texts concatenated
  behind `Review:`, cut, then `\\nSentiment:` and a label word: speed does not depend on the text);
- train_virtual_tokens: 10, 20, 50, 100, 200 virtual tokens, prompt tuning and prefix tuning (PEFT's without
  projection), ordinary review batches;
- train_batch: batch sizes 1, 2, 4, 8, 16, 32 of ordinary review batches;
- train_model_size: random-weight Llama-family models built from `LlamaConfig` under `torch.manual_seed` (nothing
  downloaded; the embedded tokenizer, vocabulary 49152, tied embeddings): SmolLM2-135M's own shape, a
  SmolLM2-360M-like one and a Llama-3.2-1B-like one (its layer shapes, this vocabulary).

Serving (serve_* axes, scaling_serve.py), on the embedded model: soft prompts of 20 virtual tokens, random
vocabulary-initialized (common/model.py's `vocab_prompt`, seeds 0, 1, ...), requests of distinct short texts, each
generating exactly 16 new tokens greedily (EOS ignored). A round is a set of requests that all arrive at once; the
next round starts when it has finished. Our engine (`softprompt.serve.engines.local.LocalEngine`, driven step by
step in this process by common/serving.py's `drive`, as serve_speed.py does; each prompt's K/V computed beforehand,
as the server's registry does) and vLLM (`vllm serve --enable-prompt-embeds` from .venv-vllm, started by
common/completions.py's `vllm_server` after all in-process measurements, each request streamed with `prompt_embeds`
= `[P; E]`) run the same rounds. Both hold at most 128 rows at once (vLLM's own default for its API server on CPU;
our engine's max_batch set to match).
- throughput: generated tokens / the summed wall time of the rounds;
- time to first token: for each request, from its round's start to its first streamed token; median and p95;
- checks: our first request of each point against greedy decoding by the definition (common/serving.py's
  `reference_generate`: uncached `[P; E]`), and how many of vLLM's outputs equal ours.
Axes:
- serve_prompts: 1, 4, 16, 64, 256 distinct prompts among one round of 256 requests (request i uses prompt i mod k);
- serve_concurrency: 1, 4, 16, 64 requests per round over 4 prompts, rounds repeated up to 32 requests per point.

Writes one PNG per axis (left: tokens/s; right: peak MB, or time to first token) and scaling.json with every point,
into --out (default docs/scaling; rewritten after each axis, so an interrupted run keeps what it measured; with
--only, the other axes already in scaling.json stay as they were, each with its own date).

    cd benchmarks && ../.venv/bin/python scaling.py                   # everything (about 16 min on 2 cores)
    ../.venv/bin/python scaling.py --only train_length,serve_prompts --steps 3
    ../.venv/bin/python scaling.py --quick --no-vllm                  # tiny sizes: a smoke check
    python -m benchmarks.scaling --quick --no-vllm                    # from the repository root, as a module

This file holds the axes' table, the plots, the report and the order of the run; the points are measured by
scaling_train.py and scaling_serve.py.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/scaling.py`: the repository root, for `benchmarks.` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import scaling_serve, scaling_train  # noqa: E402
from benchmarks.common.machine import command, log, machine, now, quiet_process, versions  # noqa: E402
from benchmarks.common.model import embedded_backbone  # noqa: E402
from benchmarks.common.training import BATCH_SIZE, PairSettings, default_memory_method  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

AXES = {  # name -> (title, x label)
    "train_length": ("Training against input length", "real input tokens per row"),
    "train_virtual_tokens": ("Training against virtual tokens", "virtual tokens"),
    "train_batch": ("Training against batch size", "batch size (rows)"),
    "train_model_size": ("Training against model size (random-weight Llama family)", "parameters"),
    "serve_prompts": ("Serving against distinct prompts in a round of requests", "distinct soft prompts"),
    "serve_concurrency": ("Serving against concurrent requests", "requests arriving at once"),
}



# ---------------------------------------------------------------------------------------------------- plots
def train_lines(points: list[dict]) -> list[tuple[str, str, str, list, list, list]]:
    """(label, colour, line style, x, tokens/s, peak MB) per line: ours and PEFT for each method on the axis; PEFT's
    value is NaN (a gap) where its step-0 loss is wrong."""
    methods = list(dict.fromkeys(p["method"] for p in points))
    lines = []
    for method in methods:
        rows = [p for p in points if p["method"] == method]
        suffix = f" ({method} tuning)" if len(methods) > 1 else ""
        style = "-" if method == "prompt" else "--"
        x = [p["x"] for p in rows]
        lines.append((f"softprompt{suffix}", "tab:blue", style, x, [p["ours_tokens_per_s"] for p in rows],
                      [p["ours_peak_mb"] for p in rows]))  # fmt: skip
        nan = float("nan")
        lines.append((f"PEFT{suffix}", "tab:orange", style, x,
                      [p["peft_tokens_per_s"] if p["peer_correct"] else nan for p in rows],
                      [p["peft_peak_mb"] if p["peer_correct"] else nan for p in rows]))  # fmt: skip
    return lines


def serve_lines(points: list[dict]) -> list[tuple[str, str, str, list, list, list]]:
    """(label, colour, style, x, tokens/s, TTFT median ms) for our engine and, where it ran, vLLM; TTFT p95 dotted."""
    lines = []
    for side, label, colour in (("ours", "softprompt engine", "tab:blue"), ("vllm", "vLLM", "tab:green")):
        rows = [p for p in points if side in p]
        if rows:
            x = [p["x"] for p in rows]
            lines.append((label, colour, "-", x, [p[side]["tokens_per_s"] for p in rows],
                          [p[side]["ttft_ms_median"] for p in rows]))  # fmt: skip
            lines.append((f"{label}, p95", colour, ":", x, None, [p[side]["ttft_ms_p95"] for p in rows]))
    return lines


def plot_axis(name: str, points: list[dict], path: Path, stamp: str) -> None:
    """Two panels side by side, log-x: tokens/s on the left, peak MB (training) or TTFT (serving) on the right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    title, x_label = AXES[name]
    serving = name.startswith("serve_")
    lines = serve_lines(points) if serving else train_lines(points)
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8))
    for label, colour, style, x, speed, other in lines:
        if speed is not None:
            left.plot(x, speed, style, color=colour, marker="o", label=label)
        right.plot(x, other, style, color=colour, marker="o", label=label)
    left.set_ylabel("generated tokens/s" if serving else "real input tokens/s")
    right.set_ylabel("time to first token (ms)" if serving else "peak MB above the step's starting RSS")
    ticks = {p["x"]: f"{p['model']}\n{p['x'] / 1e6:.1f}M" if "model" in p else str(p["x"]) for p in points}
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
        ax.minorticks_off()
        ax.set_xlabel(x_label)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    for ax, values in ((left, [v for *_, speed, _ in lines for v in speed or [] if v == v]),
                       (right, [v for *_, other in lines for v in other if v == v])):  # v == v: not NaN
        if values and max(values) > 20 * min(values):
            ax.set_yscale("log")  # spans more than an order of magnitude
    wrong = [p["label"] for p in points if not serving and not p["peer_correct"]]
    if wrong:
        fig.text(0.5, 0.01, f"PEFT not plotted where its step-0 loss differs from the reference: {', '.join(wrong)}",
                 ha="center", fontsize=8, color="tab:red")  # fmt: skip
    fig.suptitle(f"{title}\n{stamp}", fontsize=10)
    fig.tight_layout(rect=(0, 0.03, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------------- report
def header(args, serve_sizes: scaling_serve.ServeSizes, memory: str) -> dict:
    return {
        "date": now(),
        "command": command(),
        "versions": versions(),
        "settings": {"timed_steps": args.steps, "timed_steps_above_500M_parameters": max(1, args.steps // 2),
                     "warm_up_steps": 1, "threads": args.threads, "lr": args.lr, "seed": args.seed, "memory": memory,
                     "quick": args.quick, "dtype": "float32", "batch_size": BATCH_SIZE,
                     "virtual_tokens": scaling_train.VIRTUAL_TOKENS, "serve_new_tokens": serve_sizes.new_tokens,
                     "serve_max_rows": scaling_serve.MAX_ROWS,
                     "serve_concurrency_prompts": scaling_serve.CONCURRENCY_PROMPTS},
        "notes": [
            "Training tokens/s count real input tokens (input + target, no pads, no virtual tokens); peak MB is the "
            "largest over a point's steps of the peak RSS during a step above the RSS just before it.",
            "peer_correct / ours_correct: the library's step-0 loss within 1e-4 (relative) of transformers' own loss "
            "over full logits. Where peer_correct is false, PEFT's values below were measured but are not plotted and "
            "no speedup or memory_ratio is given: a speed of a wrong computation means nothing.",
            "Serving: tokens/s = generated tokens / summed wall time of a point's rounds; TTFT from a round's start to "
            "a request's first streamed token. ours.correct: the point's first request equals uncached [P; E] greedy "
            "decoding; vllm.equal_ours: requests whose greedy tokens equal ours.",
        ],
    }


def save(report: dict, out: Path) -> None:
    """scaling.json and one PNG per axis measured so far (rewritten after every axis)."""
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, "machine": machine()}
    for name, axis in report["axes"].items():
        plot_axis(name, axis["points"], out / f"{name}.png", f"{axis['date']} · {report['machine']}")
    (out / "scaling.json").write_text(json.dumps(report, indent=1) + "\n")


def axis_entry(name: str, points: list[dict]) -> dict:
    title, x_label = AXES[name]
    return {"title": title, "x": x_label, "date": now(), "points": points}


# ---------------------------------------------------------------------------------------------------- main
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default=",".join(AXES), help=f"comma-separated subset of {', '.join(AXES)}")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed training steps per point after 1 warm-up step (default 2, --quick 1; models "
                             "above 500M parameters run half as many, at least 1)")  # fmt: skip
    parser.add_argument("--no-vllm", action="store_true", help="serving axes without vLLM (no .venv-vllm needed)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "scaling", help="where the PNGs and JSON go")
    parser.add_argument("--quick", action="store_true", help="tiny sizes everywhere: a smoke check, not a result")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all cores)")
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.axes = [a.strip() for a in args.only.split(",") if a.strip()]
    unknown = [a for a in args.axes if a not in AXES]
    if unknown or not args.axes:
        parser.error(f"unknown axis/axes {unknown}; choose from {', '.join(AXES)}")
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 2)
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1")
    return args


def train_axes(args, backbone, report: dict, memory: str) -> None:
    """Each training axis asked for, into `report` (saved after each)."""
    from softprompt.data.corpora import sentiment_splits

    names = [a for a in args.axes if a in scaling_train.TRAIN_AXES]
    if not names:
        return
    sizes = scaling_train.QUICK if args.quick else scaling_train.FULL
    setup = scaling_train.TrainSetup(args.steps, PairSettings(args.lr, args.seed, memory))
    records = sentiment_splits()["train"]
    scaling_train.warm_up(backbone, records, setup)
    for name in names:
        started = time.perf_counter()
        report["axes"][name] = axis_entry(name, scaling_train.TRAIN_AXES[name](backbone, records, sizes, setup))
        report["axes"][name]["seconds"] = round(time.perf_counter() - started, 1)
        save(report, args.out)
        log(f"[{name}] done in {(time.perf_counter() - started) / 60:.1f} min")


def serve_axes(args, backbone, report: dict, sizes: scaling_serve.ServeSizes) -> None:
    """Each serving axis asked for on our engine, then (unless --no-vllm) every one of their points on vLLM."""
    names = [a for a in args.axes if a in scaling_serve.SERVE_PLANS]
    if not names:
        return
    started = time.perf_counter()
    work = scaling_serve.serve_work(backbone, names, sizes)
    log(f"{len(work.soft)} soft prompts and their K/V built in {time.perf_counter() - started:.0f} s")
    scaling_serve.warm_up_ours(backbone, work)
    ours = {}
    for name in names:
        started = time.perf_counter()
        points, ours[name] = scaling_serve.serve_ours(backbone, work, name)
        report["axes"][name] = {**axis_entry(name, points), "seconds": round(time.perf_counter() - started, 1)}
        save(report, args.out)
    if not args.no_vllm:  # after every in-process measurement, so vLLM never competes with them for the cores
        started = time.perf_counter()
        results = {name: report["axes"][name]["points"] for name in names}
        report["vllm_version"] = scaling_serve.serve_vllm(work, results, ours)
        report["vllm_seconds"] = round(time.perf_counter() - started, 1)
        save(report, args.out)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    serve_sizes = scaling_serve.QUICK if args.quick else scaling_serve.FULL
    quiet_process(args.threads)
    began = time.perf_counter()
    backbone = embedded_backbone(page_in=True)  # or the first point's peak would hold the weights
    memory = default_memory_method()
    report = {**header(args, serve_sizes, memory), "axes": {}}
    previous = args.out / "scaling.json"
    if set(args.axes) != set(AXES) and previous.exists():  # --only: the other axes' earlier points stay
        report["axes"] = {k: v for k, v in json.loads(previous.read_text())["axes"].items() if k not in args.axes}
    train_axes(args, backbone, report, memory)
    serve_axes(args, backbone, report, serve_sizes)
    report["seconds"] = round(time.perf_counter() - began, 1)
    save(report, args.out)
    log(f"wrote {args.out}/scaling.json and {len(report['axes'])} plot(s) in {report['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
