"""What a new user gets on tasks the defaults never saw, against LoRA: for each task built from real data in PyPI
packages, on an embedded model, held-out accuracy (classification) or chrF (generation) and wall time of

  - the template alone (the frozen model, no prompt),
  - one `softprompt train` run with only data, template and labels (every other setting its default),
  - `softprompt train --search` (the default candidates, successive halving on validation) and its pick, with the
    time the same candidates would take trained one after another (each one's seconds per step alone, timed over
    --probe-steps steps, times --steps; validation not counted, so this understates that time),
  - LoRA through PEFT (rank 8 on q_proj/v_proj, alpha 16, lr 1e-3, no dropout): the same steps and batches, the same
    loss (cross-entropy on the label word or target text), validation and keep-best, and scoring by the same code
    path (generation: greedy, ending at the end of the line, EOS or the task's token limit, for every column),
  - with --ia3, IA3 through PEFT the same way (k_proj, v_proj and down_proj's input scaled, lr 3e-3).

Tasks: sentiment (the demo's Rotten Tomatoes fresh/rotten), review-or-plot (the same corpus: a critic's snippet or
a plot summary, balanced), debate-party (2016 US debates: which party's candidate said it), moral-foundation (a word
of the Moral Foundations Dictionary 2.0: which of five foundations it speaks to), pinyin-tones (HSK sentences'
pinyin, tone marks -> tone numbers: generation), all on --model; translation (the translation demo's HSK English ->
Chinese pairs, template without instruction) on gemma3-270m.

    python benchmarks/defaults.py                           # every task, 300 steps of 8 (train's default)
    python benchmarks/defaults.py --tasks debate-party --steps 100
    python benchmarks/defaults.py --no-search --single "method=prefix lr=0.03"    # a candidate default, side by side
    python benchmarks/defaults.py --tasks moral-foundation --candidates-only --single "method=prefix"
    python benchmarks/defaults.py --tasks translation --no-search --test 100 --valid 48
    python benchmarks/defaults.py --tasks debate-party --no-search --seed 1         # another draw of every column
    python benchmarks/defaults.py --tasks debate-party --candidates-only --ia3      # IA3 beside the template

Prints a table per task as it finishes, a line on the defaults against LoRA over all tasks, and one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from softprompt.backbones import backbone_for
from softprompt.config import PromptConfig, TrainConfig
from softprompt.data import TaskEncoder
from softprompt.scoring.evaluate import evaluate
from softprompt.models import LoadConfig, load_model
from softprompt.prepare import template_init_text
from softprompt.training.search import default_candidates, parse_grid, search
from softprompt.training.loop import BatchOrder, improves, loss_on, selection_key, train

if __package__ in (None, ""):  # `python benchmarks/defaults.py`: the repository root, for `benchmarks.` imports
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common.machine import machine  # noqa: E402
from benchmarks.common.tasks import TASKS, splits  # noqa: E402
from benchmarks.common.training import warmup_then_decay  # noqa: E402


def timed(fn):
    began = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - began


PEERS = {  # name: (the PEFT config, its learning rate)
    "lora": (lambda peft: peft.LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"],
                                          task_type="CAUSAL_LM"), 1e-3),
    # IA3 (Liu et al. 2022): learned scales of keys, values and the MLP's inner activations, made for few examples
    "ia3": (lambda peft: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                        feedforward_modules=["down_proj"], task_type="CAUSAL_LM"), 3e-3),
}  # fmt: skip


def peer_run(peer: str, model_name: str, task: TaskEncoder, train_set, valid_set, cfg: TrainConfig, dtype: str
             ) -> tuple:  # fmt: skip
    """A PEFT adapter (`PEERS`) on a fresh copy of the model, trained and scored through our backbone (the adapter
    lives inside the model's own projections): the same batches, loss, validation rule and scorer as the prompts
    get."""
    import peft

    model, tokenizer = load_model(model_name, LoadConfig(dtype=dtype))
    make_config, lr = PEERS[peer]
    peft_model = peft.get_peft_model(model, make_config(peft))
    params = [p for p in peft_model.parameters() if p.requires_grad]  # the adapter's own
    backbone = backbone_for(peft_model.base_model.model, tokenizer)  # freezes every parameter ...
    for p in params:  # ... so the adapter's are switched back on
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=lr)
    schedule = warmup_then_decay(optimizer, cfg.warmup_steps, cfg.steps)
    order = BatchOrder(train_set, cfg.batch_size, cfg.seed)
    best_key, best_state = None, None

    def validate():
        nonlocal best_key, best_state
        with torch.no_grad():
            key = selection_key(evaluate(backbone, task, valid_set[: cfg.eval_size]))
        if best_key is None or improves(key, best_key):
            best_key, best_state = key, [p.detach().clone() for p in params]

    validate()
    for step in range(1, cfg.steps + 1):
        loss, _ = loss_on(backbone, None, order[step - 1])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optimizer.step(), schedule.step(), optimizer.zero_grad(set_to_none=True)
        if step % cfg.eval_every == 0 or step == cfg.steps:
            validate()
    with torch.no_grad():
        for p, best in zip(params, best_state):
            p.copy_(best)
    return backbone, sum(p.numel() for p in params)


def test_score(backbone, task: TaskEncoder, test_set, prefix, max_new_tokens: int) -> float:
    """Held-out accuracy (classification) or chrF (generation: greedy, to the end of the line)."""
    if task.is_classification:
        return round(evaluate(backbone, task, test_set, prefix)["accuracy"], 4)
    return round(evaluate(backbone, task, test_set, prefix, max_new_tokens=max_new_tokens, stop=["\n"])["chrf"], 2)


def run_task(name: str, backbone, model_name: str, args) -> dict:
    bench = TASKS[name]
    config = bench.config
    data = splits(bench.load(), args.test, args.valid)
    task = TaskEncoder(config, backbone.tokenizer, max_length=args.max_length)
    train_set, valid_set, test_set = (task.encode(data[k]) for k in ("train", "valid", "test"))
    cfg = TrainConfig(steps=args.steps, eval_size=args.valid, max_length=args.max_length, seed=args.seed)
    base = PromptConfig(init_text=template_init_text(config.template))  # what `softprompt train` builds
    row = {"task": name, "model": model_name, "metric": "accuracy" if task.is_classification else "chrf",
           "train": len(train_set), "valid": len(valid_set), "test": len(test_set)}
    score = lambda prefix: test_score(backbone, task, test_set, prefix, bench.max_new_tokens)  # noqa: E731
    row["template_only"] = score(None)
    out = tempfile.mkdtemp()
    if not args.candidates_only:
        run, row["single_seconds"] = timed(lambda: train(backbone, task, base, cfg, train_set, out + "/single",
                                                         valid_set, progress=False))  # fmt: skip
        row["single"] = score(run.method.kv(backbone).detach())
    row["alternatives"] = []
    for spec in args.single:  # other single settings a default could take, each one ordinary run
        (candidate,), _ = parse_grid(spec, base, cfg, config.task)
        alt_cfg = dataclasses.replace(cfg, lr=candidate.lr)
        run, seconds = timed(lambda: train(backbone, task, candidate.prompt, alt_cfg, train_set,
                                           out + "/" + candidate.name, valid_set, progress=False))  # fmt: skip
        row["alternatives"].append({"settings": spec, "score": score(run.method.kv(backbone).detach()),
                                    "seconds": round(seconds, 1)})
    if args.ia3:
        _peer(row, "ia3", model_name, task, train_set, valid_set, test_set, cfg, args.dtype)
    if not args.candidates_only and not args.no_search:
        candidates = default_candidates(base, config.task)
        result, row["search_seconds"] = timed(lambda: search(backbone, task, candidates, cfg, train_set, valid_set,
                                                             out + "/search", progress=False))  # fmt: skip
        row["search_pick"], row["search"] = result.best, score(result.runs[result.best].method.kv(backbone).detach())
        row["search_table"] = [{k: r[k] for k in ("candidate", "valid", "best_step", "trained_steps")} for r in
                               result.table]  # fmt: skip
        probe = TrainConfig(steps=args.probe_steps, eval_every=0, warmup_steps=1, max_length=args.max_length)
        alone = lambda c: timed(lambda: train(backbone, task, c.prompt, probe, train_set, out + "/probe-" + c.name,
                                              progress=False))[1]  # noqa: E731  (seconds for --probe-steps)
        row["one_after_another_seconds"] = round(sum(alone(c) / args.probe_steps * args.steps for c in candidates), 1)
    if not args.candidates_only:
        _peer(row, "lora", model_name, task, train_set, valid_set, test_set, cfg, args.dtype)
    shutil.rmtree(out)
    for key in ("single_seconds", "search_seconds"):
        if key in row:
            row[key] = round(row[key], 1)
    return row


def _peer(row: dict, peer: str, model_name: str, task: TaskEncoder, train_set, valid_set, test_set,
          cfg: TrainConfig, dtype: str) -> None:  # fmt: skip
    """The PEFT adapter's column: held-out score, parameters, wall time (`row[peer]`, `..._params`, `..._seconds`)."""
    (backbone, row[peer + "_params"]), seconds = timed(
        lambda: peer_run(peer, model_name, task, train_set, valid_set, cfg, dtype))
    row[peer] = test_score(backbone, task, test_set, None, TASKS[row["task"]].max_new_tokens)
    row[peer + "_seconds"] = round(seconds, 1)


def against_lora(rows: list[dict]) -> dict:
    """The defaults beside LoRA over the tasks, in points (accuracy x 100, or chrF): on how many they are within one
    point or ahead, the mean difference, and on how many their wall time is not above LoRA's."""
    gaps = [(r["single"] - r["lora"]) * (100 if r["metric"] == "accuracy" else 1) for r in rows]
    return {"tasks": len(rows), "within_1_point_or_ahead": sum(g >= -1 for g in gaps),
            "mean_difference_points": round(sum(gaps) / len(gaps), 2),
            "not_slower": sum(r["single_seconds"] <= r["lora_seconds"] for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--steps", type=int, default=TrainConfig.steps, help="Steps of 8 for every column (the "
                        "default: `softprompt train`'s).")  # fmt: skip
    parser.add_argument("--test", type=int, default=300)
    parser.add_argument("--valid", type=int, default=100)
    parser.add_argument("--probe-steps", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256, help="Longest example in tokens (longer plot "
                        "summaries and debate answers keep their end).")  # fmt: skip
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16"], help="Every column's "
                        "frozen model (the README's tables: float32; auto takes bfloat16 on a CPU that multiplies it).")
    parser.add_argument("--seed", type=int, default=TrainConfig.seed, help="Every column's training seed (starts, "
                        "batch order; LoRA's initialization follows from it), not the data's split.")  # fmt: skip
    parser.add_argument("--single", action="append", default=[], metavar="SETTINGS",
                        help='Also train one run with these settings in --grid syntax, e.g. "method=prefix lr=0.03" '
                             "(repeatable): candidates for the defaults.")  # fmt: skip
    parser.add_argument("--no-search", action="store_true", help="Leave out the --search run.")
    parser.add_argument("--ia3", action="store_true", help="Also train IA3 through PEFT (scales of keys, values and "
                        "the MLP's inner activations; lr 3e-3): a second peer, made for few examples.")  # fmt: skip
    parser.add_argument("--candidates-only", action="store_true", help="Train only the --single settings and --ia3 "
                        "(beside the template alone): every run is seeded, so an earlier run's defaults and LoRA "
                        "stand.")  # fmt: skip
    args = parser.parse_args()
    if args.candidates_only and not (args.single or args.ia3):
        parser.error("--candidates-only needs at least one --single, or --ia3")
    backbones, rows = {}, []
    for name in args.tasks.split(","):
        model = TASKS[name].model or args.model
        if model not in backbones:
            backbones[model] = backbone_for(*load_model(model, LoadConfig(dtype=args.dtype)))
        row = run_task(name, backbones[model], model, args)
        rows.append(row)
        m = row["metric"]
        print(f"\n{name} on {model} (train {row['train']}, valid {row['valid']}, test {row['test']}; {args.steps} "
              f"steps of 8; seed {args.seed})")
        print(f"  template only             {m} {row['template_only']:.3f}")
        if "single" in row:
            print(f"  softprompt train          {m} {row['single']:.3f}  {row['single_seconds']:7.1f} s")
        for alt in row["alternatives"]:
            print(f"  train {alt['settings']:<19} {m} {alt['score']:.3f}  {alt['seconds']:7.1f} s")
        if "search" in row:
            print(f"  softprompt train --search {m} {row['search']:.3f}  {row['search_seconds']:7.1f} s  "
                  f"(pick {row['search_pick']}; one after another ~{row['one_after_another_seconds']:.0f} s)")
        if "lora" in row:
            print(f"  LoRA r=8 q,v (PEFT)       {m} {row['lora']:.3f}  {row['lora_seconds']:7.1f} s")
        if "ia3" in row:
            print(f"  IA3 k,v,down (PEFT)       {m} {row['ia3']:.3f}  {row['ia3_seconds']:7.1f} s")
        for r in row.get("search_table", []):
            print(f"    {r['candidate']:<26} valid {r['valid'].get(m, float('nan')):.3f} at step "
                  f"{r['best_step']}, trained {r['trained_steps']}")
        print(flush=True)
    summary = {"steps": args.steps, "seed": args.seed, "tasks": rows}
    if not args.candidates_only:  # only then did LoRA run
        v = summary["against_lora"] = against_lora(rows)
        print(f"The defaults against LoRA: within 1 point or ahead on {v['within_1_point_or_ahead']} of {v['tasks']} "
              f"tasks, mean difference {v['mean_difference_points']:+.2f} points (accuracy x 100 or chrF), wall time "
              f"not above LoRA's on {v['not_slower']} of {v['tasks']}.")
    print(machine())
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
