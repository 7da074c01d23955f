"""The `softprompt` command: parse, call the library, print."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from .errors import SoftPromptError
from .models import DEFAULT_MODEL

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adapt a frozen causal LM by learning continuous prompts (prompt tuning, prefix tuning).")

Opt = typer.Option


def _labels(labels: Optional[str]) -> list[str]:
    return [x.strip() for x in labels.split(",")] if labels else []


def _task_config(template, labels, label_field, target_field):
    from .config import TaskConfig

    task = "generation" if target_field and not labels else "classification"
    return TaskConfig(template=template, task=task, labels=_labels(labels), label_field=label_field,
                      target_field=target_field)


def _all_or_errors(*builders):
    """Build every config, reporting the problems of all of them at once."""
    built, errors = [], []
    for build in builders:
        try:
            built.append(build())
        except SoftPromptError as error:
            errors.append(str(error))
    if errors:
        raise SoftPromptError("\n".join(errors))
    return built


def _backbone(model_name: str):
    from .backbone import Backbone
    from .models import load_model

    return Backbone(*load_model(model_name))


@app.command()
def train(
    train_file: Annotated[Path, Opt("--train", help="Training data (.jsonl or .csv).")],
    template: Annotated[str, Opt(help="Input template with {field} placeholders, e.g. 'Review: {text}\\nSentiment:'.")],
    out: Annotated[Path, Opt(help="Output directory: the artifact (best prompt), log, plot, checkpoints.")],
    model: Annotated[str, Opt(help="Embedded short name, local folder or hub name.")] = DEFAULT_MODEL,
    valid_file: Annotated[Optional[Path], Opt("--valid", help="Validation data for model selection.")] = None,
    labels: Annotated[Optional[str], Opt(help="Comma-separated label words (classification).")] = None,
    label_field: Annotated[Optional[str], Opt(help="Field holding the label.")] = None,
    target_field: Annotated[Optional[str], Opt(help="Field holding the target text (generation).")] = None,
    method: Annotated[str, Opt(help="prompt or prefix.")] = "prompt",
    num_tokens: Annotated[int, Opt(help="Virtual tokens.")] = 20,
    init: Annotated[str, Opt(help="random, vocab, text or labels.")] = "text",
    init_text: Annotated[Optional[str], Opt(help="Text for --init text (default: the template's literal words).")] = None,
    init_range: Annotated[float, Opt(help="Half-width of the uniform range for --init random.")] = 0.5,
    prefix_mlp: Annotated[bool, Opt(help="Prefix tuning through an MLP reparameterization.")] = False,
    mlp_hidden: Annotated[int, Opt(help="Hidden width of that MLP.")] = 512,
    steps: Annotated[int, Opt(help="Optimizer steps.")] = 300,
    batch_size: Annotated[int, Opt(help="Examples per step.")] = 8,
    grad_accum: Annotated[int, Opt(help="Micro-batches per step.")] = 1,
    lr: Annotated[float, Opt(help="Peak learning rate.")] = 0.01,
    optimizer: Annotated[str, Opt(help="adamw or adafactor.")] = "adamw",
    schedule: Annotated[str, Opt(help="linear, cosine or constant decay after warmup.")] = "linear",
    warmup_steps: Annotated[int, Opt(help="Linear warmup steps.")] = 10,
    weight_decay: Annotated[float, Opt()] = 0.0,
    max_grad_norm: Annotated[float, Opt(help="Gradient clipping (0: off).")] = 1.0,
    eval_every: Annotated[int, Opt(help="Validate every N steps.")] = 25,
    eval_size: Annotated[int, Opt(help="Validation examples used.")] = 300,
    patience: Annotated[int, Opt(help="Early stop after N evaluations without gain (0: never).")] = 6,
    max_length: Annotated[int, Opt(help="Longest example in tokens.")] = 512,
    seed: Annotated[int, Opt()] = 0,
    progress: Annotated[bool, Opt(help="Progress bars.")] = True,
):
    """Train a soft prompt or prefix on a frozen model; --out becomes the artifact."""
    from .config import PLACEHOLDER, PromptConfig, TrainConfig
    from .data import Task, read_records
    from .train import train as run_training

    task_config = _task_config(template, labels, label_field, target_field)
    if init == "text" and not init_text:
        init_text = " ".join(PLACEHOLDER.sub(" ", task_config.template).split()) or "Answer:"
    prompt_config, train_config = _all_or_errors(
        lambda: PromptConfig(method=method, num_tokens=num_tokens, init=init, init_text=init_text,
                             init_range=init_range, prefix_mlp=prefix_mlp, mlp_hidden=mlp_hidden),
        lambda: TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, optimizer=optimizer,
                            schedule=schedule, warmup_steps=warmup_steps, weight_decay=weight_decay,
                            max_grad_norm=max_grad_norm, eval_every=eval_every, eval_size=eval_size,
                            patience=patience, max_length=max_length, seed=seed),
    )
    train_records = read_records(train_file)
    valid_records = read_records(valid_file) if valid_file else None
    backbone = _backbone(model)
    task = Task(task_config, backbone.tokenizer, train_config.max_length)
    train_examples = task.encode(train_records, str(train_file))
    valid_examples = task.encode(valid_records, str(valid_file)) if valid_records else None
    run = run_training(backbone, task, prompt_config, train_config, train_examples, out, valid_examples,
                       progress=progress)
    best = run.summary.get("valid") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if isinstance(v, float))
    typer.echo(f"Saved the best prompt (step {run.summary['best_step']}{': ' + shown if shown else ''}) to {out}")


@app.command("eval")
def evaluate_command(
    data: Annotated[Path, Opt(help="Data to score (.jsonl or .csv).")],
    prompt: Annotated[Optional[Path], Opt(help="A trained prompt directory.")] = None,
    model: Annotated[Optional[str], Opt(help="Base model (default: the prompt's own, or the embedded one).")] = None,
    template: Annotated[Optional[str], Opt(help="Template, without --prompt.")] = None,
    labels: Annotated[Optional[str], Opt(help="Label words, without --prompt.")] = None,
    label_field: Annotated[Optional[str], Opt()] = None,
    target_field: Annotated[Optional[str], Opt()] = None,
    batch_size: Annotated[int, Opt()] = 32,
    limit: Annotated[Optional[int], Opt(help="Score only the first N examples.")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print one JSON object.")] = False,
    progress: Annotated[bool, Opt()] = True,
):
    """Score a prompt (or the base model with the template alone) on labelled data."""
    from . import artifact
    from .data import Task, read_records
    from .evaluate import evaluate

    records = read_records(data)[:limit]
    if prompt:
        saved = artifact.load(prompt)
        task_config = saved.task
        backbone = _backbone(model or saved.base_model)
        prefix = artifact.attach(saved, backbone, str(prompt)).kv(backbone).detach()
    else:
        if not template:
            raise SoftPromptError("eval needs --prompt DIR, or --template with --labels/--label-field or --target-field.")
        task_config = _task_config(template, labels, label_field, target_field)
        backbone, prefix = _backbone(model or DEFAULT_MODEL), None
    task = Task(task_config, backbone.tokenizer)
    result = evaluate(backbone, task, task.encode(records, str(data)), prefix, batch_size, progress and not as_json)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()))


@app.command()
def generate(
    texts: Annotated[list[str], typer.Argument(help="Inputs; each fills the template's field (see --raw).")],
    prompt: Annotated[Optional[Path], Opt(help="A trained prompt directory (none: the bare base model).")] = None,
    model: Annotated[Optional[str], Opt(help="Base model (default: the prompt's own).")] = None,
    max_new_tokens: Annotated[int, Opt()] = 32,
    temperature: Annotated[float, Opt(help="0: greedy.")] = 0.0,
    top_p: Annotated[float, Opt()] = 1.0,
    stop: Annotated[Optional[list[str]], Opt(help="Stop string (repeatable).")] = None,
    seed: Annotated[Optional[int], Opt()] = None,
    raw: Annotated[bool, Opt(help="Use the texts as they are, without the prompt's template.")] = False,
):
    """Generate with a trained prompt; left-padded batches give each text its unbatched result."""
    from . import artifact
    from .data import fill
    from .generate import decode_new
    from .generate import generate as run_generate

    saved = artifact.load(prompt) if prompt else None
    backbone = _backbone(model or (saved.base_model if saved else DEFAULT_MODEL))
    prefix = artifact.attach(saved, backbone, str(prompt)).kv(backbone).detach() if saved else None
    fields = saved.task.fields if saved and not raw else []
    inputs = [fill(saved.task.template, {f: text for f in fields}) if fields else text for text in texts]
    ids = [backbone.tokenizer(text)["input_ids"] for text in inputs]
    outputs = run_generate(backbone, ids, prefix, max_new_tokens=max_new_tokens, temperature=temperature,
                           top_p=top_p, stop=stop, seed=seed)
    for text, out in zip(texts, outputs):
        typer.echo(f"{text!r} -> {decode_new(backbone.tokenizer, out, stop)!r}")


@app.command()
def inspect(
    prompt: Annotated[Path, Opt(help="A trained prompt directory.")],
    top_k: Annotated[int, Opt(help="Nearest tokens per vector.")] = 5,
    model: Annotated[Optional[str], Opt(help="Base model for nearest tokens (default: the prompt's own).")] = None,
    as_json: Annotated[bool, Opt("--json")] = False,
):
    """Shapes, parameter count, size on disk and the nearest vocabulary tokens of each soft token."""
    from . import artifact
    from .inspection import describe, format_report

    saved = artifact.load(prompt)
    backbone = _backbone(model or saved.base_model) if saved.prompt.method == "prompt" else None
    if backbone is not None:
        artifact.check_base(saved, backbone, str(prompt))
    report = describe(saved, prompt, backbone, top_k)
    typer.echo(json.dumps(report, ensure_ascii=False) if as_json else format_report(report))


@app.command()
def demo(
    out: Annotated[Path, Opt(help="Where the demo writes its data splits, run and artifact.")] = Path("runs/demo"),
    steps: Annotated[int, Opt(help="Training steps.")] = 150,
    method: Annotated[str, Opt(help="prompt or prefix.")] = "prompt",
    progress: Annotated[bool, Opt()] = True,
):
    """Movie-review sentiment on the embedded SmolLM2-135M: baseline, train, evaluate, inspect, generate."""
    from .demo import run_demo

    run_demo(out, steps=steps, method=method, progress=progress)


def main() -> None:
    try:
        app()
    except SoftPromptError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(2)
