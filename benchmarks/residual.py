"""Residual prompt tuning against plain prompt tuning over seeds and learning rates, on the embedded model and the
demo task (Rotten Tomatoes sentiment, the demo's template and text init).

Each (variant, learning rate, seed) trains 20 virtual tokens for --steps steps of 8 (warm-up 10, no validation: the
last prompt is scored) and is scored on the first --test held-out snippets. Prints accuracy mean and spread (sample
standard deviation) over the seeds for each variant and learning rate, then one JSON line.

    python benchmarks/residual.py                          # 3 seeds x 2 learning rates x 2 variants
    python benchmarks/residual.py --steps 150 --lrs 0.03,0.3
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time

from softprompt.backbones import backbone_for
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import TaskEncoder
from softprompt.data.corpora import sentiment_splits
from softprompt.demo import INIT_TEXT, LABELS, TEMPLATE
from softprompt.scoring.evaluate import evaluate
from softprompt.models import LoadConfig, load_model
from softprompt.training.loop import train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--lrs", default="0.03,0.3")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--test", type=int, default=300)
    args = parser.parse_args()
    backbone = backbone_for(*load_model("smollm2-135m", LoadConfig(dtype="float32")))  # as its README table ran
    task = TaskEncoder(TaskConfig(template=TEMPLATE, labels=LABELS, label_field="label"), backbone.tokenizer)
    splits = sentiment_splits()
    train_set, test_set = task.encode(splits["train"]), task.encode(splits["test"][: args.test])
    results, began = {}, time.perf_counter()
    for lr in map(float, args.lrs.split(",")):
        for residual in (False, True):
            scores = []
            for seed in range(args.seeds):
                out = tempfile.mkdtemp()
                config = PromptConfig(num_tokens=20, init="text", init_text=INIT_TEXT, residual=residual)
                settings = TrainConfig(steps=args.steps, batch_size=8, lr=lr, warmup_steps=10, eval_every=0, seed=seed)
                run = train(backbone, task, config, settings, train_set, out, progress=False)
                scores.append(evaluate(backbone, task, test_set, run.method.kv(backbone).detach())["accuracy"])
                shutil.rmtree(out)
            name = f"{'residual' if residual else 'plain'} lr={lr}"
            results[name] = {"mean": round(statistics.mean(scores), 4), "std": round(statistics.stdev(scores), 4),
                             "accuracies": [round(s, 4) for s in scores]}  # fmt: skip
            print(f"{name:<22} accuracy {results[name]['mean']:.3f} +- {results[name]['std']:.3f}  {scores}",
                  flush=True)
    print(f"{args.steps} steps, {args.seeds} seeds, {args.test} held-out snippets, "
          f"{(time.perf_counter() - began) / 60:.1f} min")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
