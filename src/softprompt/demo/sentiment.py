"""The default demo: movie-review sentiment on SmolLM2-135M, before and after prompt tuning."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from .. import artifact, methods
from ..artifact.inspection import describe, format_report
from ..atomic import write_atomic, write_jsonl
from ..config import PromptConfig, TaskConfig, TrainConfig
from ..data import TaskEncoder, fill
from ..data.corpora import sentiment_splits
from ..models import DEFAULT_MODEL, LoadConfig
from ..prepare import load_backbone, task_data
from ..scoring.evaluate import evaluate
from ..scoring.generate import decode_new, generate
from ..training.loop import train

TEMPLATE = "Review: {text}\nSentiment:"
INSTRUCTION = "Is the following movie review positive or negative?\n" + TEMPLATE
LABELS = ["negative", "positive"]
STOP = ["\n"]
INIT_TEXT = "Classify the sentiment of this movie review as positive or negative."
NUM_TOKENS = 20
# Defaults measured on this task (README): prompt tuning (the method the project starts from; `train` defaults to
# prefix tuning), AdamW at 0.03 with warmup and linear decay, 20 tokens, text init, validation every 25 steps keeping
# the best prompt.
DEMO_METHOD = "prompt"
DEMO_TRAINING = dict(batch_size=8, lr=0.03, warmup_steps=10, eval_every=25, eval_size=200, patience=4)


def run_demo(out: Path, steps: int = 150, method: str = DEMO_METHOD, test_size: int = 600,
             progress: bool = True, load: LoadConfig | None = None) -> dict:
    started = time.perf_counter()
    out = Path(out)
    say = lambda text: print(text, flush=True)  # noqa: E731
    say(f"Loading the embedded model {DEFAULT_MODEL} (SmolLM2-135M-Instruct)...")
    backbone = load_backbone(DEFAULT_MODEL, load, training=True)
    say(f"  ({backbone.dtype} on {backbone.device})")
    splits = sentiment_splits(test_size=test_size, valid_size=DEMO_TRAINING["eval_size"])
    for name, records in splits.items():
        write_jsonl(out / "data" / f"{name}.jsonl", records)
    say(f"Rotten Tomatoes snippets: {', '.join(f'{len(v)} {k}' for k, v in splits.items())} "
        f"(written to {out / 'data'}; the test split is never trained on)")

    def encoded(template: str, names: list[str]):  # room for the prompt's virtual tokens in the model's context
        config = TaskConfig(template=template, labels=LABELS, label_field="label")
        return task_data(config, backbone, {name: splits[name] for name in names}, NUM_TOKENS)

    task, (test, train_examples, valid) = encoded(TEMPLATE, ["test", "train", "valid"])
    instruction, (instruction_test,) = encoded(INSTRUCTION, ["test"])
    rows = []

    def score(name: str, task_: TaskEncoder, examples, prefix) -> None:
        result = evaluate(backbone, task_, examples, prefix, progress=progress)
        rows.append((name, result))
        say(f"  {name}: accuracy {result['accuracy']:.3f}, macro-F1 {result['macro_f1']:.3f}")

    say("\nBase model, no soft prompt:")
    score("base model, instruction + template", instruction, instruction_test, None)
    score("base model, template only", task, test, None)

    prompt_config = PromptConfig(method=method, num_tokens=NUM_TOKENS, init="text", init_text=INIT_TEXT)
    generator = torch.Generator().manual_seed(0)
    untrained = methods.build(prompt_config, backbone, LABELS, generator)
    with torch.no_grad():
        score("untrained soft prompt (text init) + template", task, test, untrained.kv(backbone))

    say(f"\nTraining a {method}-tuning prompt of {NUM_TOKENS} tokens for up to {steps} steps (best on validation "
        "kept)...")
    run = train(backbone, task, prompt_config, TrainConfig(steps=steps, **DEMO_TRAINING), train_examples,
                out / "prompt", valid, progress=progress,
                resume=True)  # a demo run again continues (or just reuses) the run already in `out`
    with torch.no_grad():
        prefix = run.method.kv(backbone)
    score(f"trained soft prompt (step {run.summary['best_step']}) + template", task, test, prefix)

    say(f"\nArtifact in {out / 'prompt'}:")
    say(format_report(describe(artifact.load(out / "prompt"), out / "prompt", backbone, k=3)))

    say("\nA few generations with the trained prompt (greedy):")
    examples = splits["test"][:4]
    inputs = [backbone.tokenizer(fill(TEMPLATE, r))["input_ids"] for r in examples]
    for record, ids in zip(examples, generate(backbone, inputs, prefix, max_new_tokens=4, stop=STOP)):
        answer = decode_new(backbone.tokenizer, ids, STOP)
        say(f"  [{record['label']}] {record['text'][:70]!r}... -> {answer!r}")

    width = max(len(name) for name, _ in rows)
    say(f"\nHeld-out accuracy on {len(test)} Rotten Tomatoes snippets:")
    say(f"  {'setting':<{width}}  accuracy  macro-F1")
    for name, result in rows:
        say(f"  {name:<{width}}  {result['accuracy']:8.3f}  {result['macro_f1']:8.3f}")
    summary = {name: result for name, result in rows}
    write_atomic(out / "results.json", lambda tmp: Path(tmp).write_text(json.dumps(summary, indent=2)))
    say(f"\nDone in {time.perf_counter() - started:.0f} s. Try: softprompt eval --prompt {out / 'prompt'} "
        f"--data {out / 'data' / 'test.jsonl'}")
    return summary
