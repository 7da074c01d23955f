"""Does an ensemble of prompts beat its members? Three 20-token prompts trained with seeds 0, 1, 2 on the demo task
(Rotten Tomatoes sentiment on the embedded SmolLM2-135M), scored with the ensemble path on the 600 held-out snippets
of `softprompt demo`: each member, then the ensemble by majority vote and by mean label probability.

    .venv/bin/python examples/ensemble_demo.py --out runs/ensemble_demo          # about 15 min per prompt on 2 cores
    .venv/bin/python examples/ensemble_demo.py --out runs/ensemble_demo --reuse  # score prompts trained earlier

The seed changes the order of the training batches (the text init is the same for all three).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from softprompt import artifact
from softprompt.backbones import backbone_for
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data.corpora import sentiment_splits
from softprompt.demo import DEMO_TRAINING, INIT_TEXT, LABELS, NUM_TOKENS, TEMPLATE
from softprompt.scoring.ensemble import member_scores, summarize
from softprompt.models import DEFAULT_MODEL, load_model
from softprompt.prepare import fitted_task
from softprompt.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/ensemble_demo"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--lr", type=float, default=0.03)
    parser.add_argument("--test-size", type=int, default=600)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--reuse", action="store_true", help="load prompts already trained into --out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    say = lambda text: print(text, flush=True)  # noqa: E731
    started = time.perf_counter()

    backbone = backbone_for(*load_model(DEFAULT_MODEL))
    training = {**DEMO_TRAINING, "lr": args.lr}
    splits = sentiment_splits(test_size=args.test_size, valid_size=training["eval_size"])
    task = fitted_task(TaskConfig(template=TEMPLATE, labels=LABELS, label_field="label"), backbone, NUM_TOKENS)
    train_examples, valid_examples = task.encode(splits["train"], "train"), task.encode(splits["valid"], "valid")
    test = task.encode(splits["test"], "test")

    prompt_config = PromptConfig(method="prompt", num_tokens=NUM_TOKENS, init="text", init_text=INIT_TEXT)
    prefixes, names, seconds = [], [], {}
    for seed in args.seeds:
        folder = args.out / f"seed{seed}"
        if args.reuse and (folder / artifact.WEIGHTS).is_file():
            method = artifact.attach(artifact.load(folder), backbone, str(folder))
            say(f"seed {seed}: loaded {folder}")
        else:
            say(f"seed {seed}: training {args.steps} steps into {folder} ...")
            t0 = time.perf_counter()
            run = train(backbone, task, prompt_config, TrainConfig(steps=args.steps, seed=seed, **training),
                        train_examples, folder, valid_examples, progress=False)  # fmt: skip
            method, seconds[seed] = run.method, round(time.perf_counter() - t0)
            say(f"seed {seed}: best validation at step {run.summary['best_step']} "
                f"(accuracy {run.summary['valid']['accuracy']:.3f}), {seconds[seed]} s")
        with torch.no_grad():
            prefixes.append(method.kv(backbone).detach())
        names.append(f"seed {seed}")

    t0 = time.perf_counter()
    scores = member_scores(backbone, task, test, prefixes)  # one mixed-batch pass serves both rules
    scoring_seconds = round(time.perf_counter() - t0)
    golds = [e.label for e in test]
    results = {how: summarize(scores, golds, how) for how in ("vote", "mean")}
    members = results["vote"].members
    mean_accuracy = sum(m["accuracy"] for m in members) / len(members)
    mean_f1 = sum(m["macro_f1"] for m in members) / len(members)

    say(f"\nHeld-out accuracy on {len(test)} Rotten Tomatoes snippets ({DEFAULT_MODEL}, {NUM_TOKENS}-token prompt "
        f"tuning, {args.steps} steps, lr {args.lr}):")
    rows = [(name, m["accuracy"], m["macro_f1"]) for name, m in zip(names, members)]
    rows.append(("mean of the members", mean_accuracy, mean_f1))
    rows += [(f"ensemble, {how}", r.ensemble["accuracy"], r.ensemble["macro_f1"]) for how, r in results.items()]
    width = max(len(r[0]) for r in rows)
    say(f"  {'':<{width}}  accuracy  macro-F1")
    for name, accuracy, f1 in rows:
        say(f"  {name:<{width}}  {accuracy:8.4f}  {f1:8.4f}")
    for how, r in results.items():
        verdict = "at least" if r.ensemble["accuracy"] >= mean_accuracy else "BELOW"
        say(f"ensemble ({how}) accuracy {r.ensemble['accuracy']:.4f} is {verdict} the members' mean {mean_accuracy:.4f}"
            f" (best member {max(m['accuracy'] for m in members):.4f})")
    summary = {
        "members": dict(zip(names, members)),
        "members_mean": {"accuracy": mean_accuracy, "macro_f1": mean_f1},
        "ensemble": {how: r.ensemble for how, r in results.items()},
        "settings": {"steps": args.steps, "seeds": args.seeds, "test_size": len(test), **training},
        "seconds": {"training": seconds, "ensemble_scoring": scoring_seconds,
                    "total": round(time.perf_counter() - started)},
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    say(f"\nWritten to {args.out / 'results.json'} in {summary['seconds']['total']} s.")


if __name__ == "__main__":
    main()
