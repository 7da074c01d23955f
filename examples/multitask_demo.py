"""Multi-task training on the embedded model: one run, two prompts, mixed batches.

Task 1 is the demo's movie-review sentiment; task 2 asks whether a snippet of the same corpus is a critic's review or
a plot summary (balanced: every summary and as many reviews). `train_multitask` trains one 20-token prompt per task
over the mixture of both training sets (each batch's rows behind their own task's prompt), keeps each task's best
prompt on its own validation split, and writes runs/multitask/<task>/. Each artifact is then scored on its own
held-out split, next to the base model with the template alone.

    .venv/bin/python examples/multitask_demo.py [--steps 60] [--out runs/multitask]
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from softprompt import artifact
from softprompt.backbones import backbone_for
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data.corpora import review_or_plot, sentiment_splits
from softprompt.scoring.evaluate import evaluate
from softprompt.models import load_model
from softprompt.prepare import fitted_task
from softprompt.training.loop import TrainingTask, train_multitask


def kind_splits(test: int = 300, valid: int = 100) -> dict[str, list[dict]]:
    records = review_or_plot()
    summaries = [r for r in records if r["kind"] == "summary"]
    reviews = random.Random(1).sample([r for r in records if r["kind"] == "review"], len(summaries))
    balanced = summaries + reviews
    random.Random(0).shuffle(balanced)
    return {"test": balanced[:test], "valid": balanced[test : test + valid], "train": balanced[test + valid :]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/multitask")
    args = parser.parse_args()
    torch.manual_seed(0)
    started = time.perf_counter()
    backbone = backbone_for(*load_model("smollm2-135m"))
    sentiment = sentiment_splits(test_size=300, valid_size=100)
    configs = {
        "sentiment": (TaskConfig(template="Review: {text}\nSentiment:", labels=["negative", "positive"],
                                 label_field="label"), sentiment),
        "kind": (TaskConfig(template="Text: {text}\nThis text is a movie", labels=["review", "summary"],
                            label_field="kind"), kind_splits()),
    }  # fmt: skip
    prompt_config = PromptConfig(num_tokens=20, init="text", init_text="Classify this movie text.")
    tasks, held_out = {}, {}
    for name, (config, splits) in configs.items():
        task = fitted_task(config, backbone, prompt_config.num_tokens)
        tasks[name] = TrainingTask(task, task.encode(splits["train"], f"{name} train"),
                               task.encode(splits["valid"], f"{name} valid"))  # fmt: skip
        held_out[name] = task.encode(splits["test"], f"{name} test")
    runs = train_multitask(
        backbone, tasks, prompt_config,
        TrainConfig(steps=args.steps, lr=0.03, eval_every=20, eval_size=100, patience=0), args.out,
    )  # fmt: skip
    report = {}
    with torch.no_grad():
        for name, run in runs.items():
            task, test = tasks[name].task, held_out[name]
            trained = artifact.attach(artifact.load(f"{args.out}/{name}"), backbone).kv(backbone)
            report[name] = {
                "train_examples": len(tasks[name].train),
                "best_step": run.summary["best_step"],
                "template_alone": evaluate(backbone, task, test),
                "trained_prompt": evaluate(backbone, task, test, trained),
            }
    report["seconds"] = round(time.perf_counter() - started)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
