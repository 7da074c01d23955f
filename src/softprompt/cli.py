"""The `softprompt` command: parse, call the library, print."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import Annotated, Optional

import typer

from .config import PromptConfig, TaskConfig, TrainConfig, build_all
from .distill import DistillConfig
from .errors import SoftPromptError
from .models import DEFAULT_MODEL
from .serve import ServeConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adapt a frozen causal LM by learning continuous prompts (prompt tuning, prefix tuning).")

Opt = typer.Option


def _task_config(template, labels, label_field, target_field):
    return TaskConfig.infer(template, labels, label_field, target_field)


def _launched_with_fsdp() -> bool:
    """`accelerate launch --use_fsdp` means --shard-model. Its flag is taken out of the environment: our sharding
    replaces accelerate's FSDP wrapping, whose plugin refuses to start without an accelerator (CPU processes)."""
    return os.environ.pop("ACCELERATE_USE_FSDP", "false").lower() == "true"  # accelerate's own test of it


def _backbone(model_name: str):
    from .backbones import backbone_for
    from .models import load_model

    return backbone_for(*load_model(model_name))


@app.command()
def train(
    out: Annotated[Path, Opt(help="Output directory: the artifact (best prompt), log, plot, checkpoints.")],
    train_file: Annotated[Optional[Path], Opt("--train", help="Training data: .jsonl, .csv, .tsv, .parquet, or a "
                                                          "datasets save_to_disk folder.")] = None,
    template: Annotated[Optional[str], Opt(help="Input template with {field} placeholders, e.g. "
                                                "'Review: {text}\\nSentiment:'.")] = None,
    tasks: Annotated[Optional[Path], Opt(help="Multi-task: a JSON tasks file (see softprompt.multitask) instead of "
                                              "--train/--valid/--template/--labels; one prompt per task, written "
                                              "to OUT/<task>.")] = None,
    model: Annotated[str, Opt(help="Embedded short name, local folder or hub name.")] = DEFAULT_MODEL,
    valid_file: Annotated[Optional[Path], Opt("--valid", help="Validation data for model selection.")] = None,
    labels: Annotated[Optional[str], Opt(help="Comma-separated label words (classification).")] = None,
    label_field: Annotated[Optional[str], Opt(help="Field holding the label.")] = None,
    target_field: Annotated[Optional[str], Opt(help="Field holding the target text (generation).")] = None,
    method: Annotated[str, Opt(help="prompt or prefix.")] = PromptConfig.method,
    num_tokens: Annotated[int, Opt(help="Virtual tokens.")] = PromptConfig.num_tokens,
    init: Annotated[str, Opt(help="random, vocab, text or labels.")] = PromptConfig.init,
    init_text: Annotated[Optional[str], Opt(help="Text for --init text (default: the template's literal "
                                                 "words).")] = PromptConfig.init_text,
    init_range: Annotated[float, Opt(help="Half-width of the uniform range for --init "
                                          "random.")] = PromptConfig.init_range,
    prefix_mlp: Annotated[bool, Opt(help="Prefix tuning through an MLP reparameterization.")] = PromptConfig.prefix_mlp,
    mlp_hidden: Annotated[int, Opt(help="Hidden width of that MLP (or of the residual one).")] = PromptConfig.mlp_hidden,
    residual: Annotated[bool, Opt(help="Prompt tuning through a residual MLP (P + LayerNorm(MLP(P))), folded away "
                                       "when saved.")] = PromptConfig.residual,
    steps: Annotated[int, Opt(help="Optimizer steps.")] = TrainConfig.steps,
    batch_size: Annotated[int, Opt(help="Examples per step.")] = TrainConfig.batch_size,
    grad_accum: Annotated[int, Opt(help="Micro-batches per step.")] = TrainConfig.grad_accum,
    lr: Annotated[float, Opt(help="Peak learning rate.")] = TrainConfig.lr,
    optimizer: Annotated[str, Opt(help="adamw or adafactor.")] = TrainConfig.optimizer,
    schedule: Annotated[str, Opt(help="linear, cosine or constant decay after warmup.")] = TrainConfig.schedule,
    warmup_steps: Annotated[int, Opt(help="Linear warmup steps.")] = TrainConfig.warmup_steps,
    weight_decay: Annotated[float, Opt()] = TrainConfig.weight_decay,
    max_grad_norm: Annotated[float, Opt(help="Gradient clipping (0: off).")] = TrainConfig.max_grad_norm,
    eval_every: Annotated[int, Opt(help="Validate every N steps.")] = TrainConfig.eval_every,
    eval_size: Annotated[int, Opt(help="Validation examples used.")] = TrainConfig.eval_size,
    patience: Annotated[int, Opt(help="Early stop after N evaluations without gain (0: "
                                      "never).")] = TrainConfig.patience,
    max_length: Annotated[int, Opt(help="Longest example in tokens.")] = TrainConfig.max_length,
    too_long: Annotated[str, Opt(help="A longer example: truncate its input (with a warning) or "
                                      "refuse.")] = TrainConfig.too_long,
    seed: Annotated[int, Opt()] = TrainConfig.seed,
    checkpoint_every: Annotated[int, Opt(help="Write a resumable checkpoint every N steps (0: only when "
                                              "stopped).")] = TrainConfig.checkpoint_every,
    resume: Annotated[bool, Opt(help="Continue the run in --out from its newest checkpoint.")] = False,
    gradient_checkpointing: Annotated[bool, Opt(help="Recompute activations in backward: less memory, "
                                                    "slower.")] = TrainConfig.gradient_checkpointing,
    shard_model: Annotated[bool, Opt(help="Several processes: shard the frozen layers across them "
                                          "(FSDP2).")] = TrainConfig.shard_model,
    init_from: Annotated[Optional[Path], Opt(help="Start from a trained prompt directory (transfer, SPoT).")] = None,
    search: Annotated[bool, Opt(help="Train several candidates side by side (prompt tuning from the labels and the "
                                     "text, prefix tuning; two learning rates each), halve them on --valid as they "
                                     "go, keep the best: OUT/search.md lists them all.")] = False,
    grid: Annotated[Optional[str], Opt(help="The candidates of --search as a grid, e.g. 'lr=0.3,0.03 "
                                            "method=prompt,prefix num_tokens=10,20' (implies --search).")] = None,
    report_to: Annotated[str, Opt(help="Experiment trackers: tensorboard (files in OUT/tensorboard), wandb, mlflow, "
                                       "all (every installed one) or none; auto: tensorboard when it is installed, "
                                       "else none ($SOFTPROMPT_REPORT_TO overrides).")] = TrainConfig.report_to,
    progress: Annotated[bool, Opt(help="Progress bars.")] = True,
):
    """Train a soft prompt or prefix on a frozen model; --out becomes the artifact (with --tasks, one per task;
    with --search, the best candidate's)."""
    from .data import read_records
    from .multitask import TaskSpec, read_tasks_file
    from .prepare import fitted_task, template_init_text, transfer_source
    from .trackers import resolve as resolve_trackers
    from .train import TaskData, train_multitask
    from .train import train as run_training

    if tasks and (train_file or template or valid_file or labels or init_from):
        raise SoftPromptError("--tasks names each task's data, template and labels; drop --train, --valid, "
                              "--template, --labels and --init-from.")  # fmt: skip
    if not tasks and not (train_file and template):
        raise SoftPromptError("train needs --train and --template (or --tasks FILE for several tasks).")
    search = search or grid is not None
    if search and (tasks or init_from or not valid_file):
        raise SoftPromptError("--search compares candidates on one task's validation data: give --valid, and drop "
                              "--tasks and --init-from.")  # fmt: skip
    specs = read_tasks_file(tasks) if tasks else {
        "prompt": TaskSpec(_task_config(template, labels, label_field, target_field), train_file, valid_file)}
    shard_model = _launched_with_fsdp() or shard_model  # the flag leaves the environment either way
    if init == "text" and not init_text:  # the literal words of the (first) template
        init_text = template_init_text(next(iter(specs.values())).config.template)
    prompt_config, train_config = build_all(
        lambda: PromptConfig(method=method, num_tokens=num_tokens, init=init, init_text=init_text,
                             init_range=init_range, prefix_mlp=prefix_mlp, mlp_hidden=mlp_hidden,
                             residual=residual),
        lambda: TrainConfig(steps=steps, batch_size=batch_size, grad_accum=grad_accum, lr=lr, optimizer=optimizer,
                            schedule=schedule, warmup_steps=warmup_steps, weight_decay=weight_decay,
                            max_grad_norm=max_grad_norm, eval_every=eval_every, eval_size=eval_size,
                            patience=patience, max_length=max_length, too_long=too_long, seed=seed,
                            checkpoint_every=checkpoint_every, gradient_checkpointing=gradient_checkpointing,
                            shard_model=shard_model, report_to=report_to),
    )
    resolve_trackers(train_config.report_to)  # a missing tracker package fails before the model loads
    records = {name: (read_records(spec.train), read_records(spec.valid) if spec.valid else None)
               for name, spec in specs.items()}  # fmt: skip
    backbone = _backbone(model)
    init_method = None
    if init_from:  # the source prompt's method and length replace --method/--num-tokens/--init
        init_method = transfer_source(init_from, backbone, f"--init-from {init_from}")
        prompt_config = init_method.config
    data = {}
    for name, spec in specs.items():
        task = fitted_task(spec.config, backbone, prompt_config.num_tokens, train_config.max_length,
                           train_config.too_long)  # fmt: skip
        train_records, valid_records = records[name]
        data[name] = TaskData(task, task.encode(train_records, str(spec.train)),
                              task.encode(valid_records, str(spec.valid)) if valid_records else [], init_method)
    if search:
        return _search(backbone, data["prompt"], prompt_config, train_config, grid, out, progress, resume)
    try:
        if tasks:
            runs = train_multitask(backbone, data, prompt_config, train_config, out, progress=progress, resume=resume)
        else:
            d = data["prompt"]
            runs = {"prompt": run_training(backbone, d.task, prompt_config, train_config, d.train, out, d.valid,
                                           init_method=init_method, progress=progress, resume=resume)}
    except KeyboardInterrupt:  # a second Ctrl-C (interruption.py); typer exits silently (0.29) or with 1 (0.12)
        stopped = SoftPromptError("interrupted: training stopped at once; the files it wrote before are complete "
                                  "(every write is atomic).")
        stopped.exit_code = 130  # 128 + SIGINT
        raise stopped from None
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one report
        return
    for name, run in runs.items():
        best = run.summary.get("valid") or {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if isinstance(v, float))
        where = out / name if tasks else out
        typer.echo(f"Saved the best prompt (step {run.summary['best_step']}{': ' + shown if shown else ''}) to "
                   f"{where}")


def _search(backbone, data, prompt_config: PromptConfig, train_config: TrainConfig, grid: str | None, out: Path,
            progress: bool, resume: bool) -> None:  # fmt: skip
    """`train --search`: the candidates side by side, then their table and what the search cost."""
    from .search import cost, default_candidates, format_table, parse_grid
    from .search import search as run_search

    if grid is None:
        candidates = default_candidates(prompt_config, data.task.is_classification)
    else:
        candidates, skipped = parse_grid(grid, prompt_config, train_config.lr)
        for reason in skipped:
            typer.echo(f"left out of the grid: {reason}", err=True)
    typer.echo(f"Searching {len(candidates)} candidates: {', '.join(c.name for c in candidates)}", err=True)
    result = run_search(backbone, data.task, candidates, train_config, data.train, data.valid, out, progress, resume)
    typer.echo(format_table(result.table))
    typer.echo(f"Saved the best candidate, {result.best}, to {out} (its table: {out / 'search.md'}); the candidates "
               f"trained {cost(result.table, train_config.steps):.0%} of the steps of training each one fully.")


@app.command()
def distill(
    out: Annotated[Path, Opt(help="Output directory: the artifact (an ordinary prompt), log, plot, checkpoints.")],
    train_file: Annotated[Path, Opt("--train", help="Training records (.jsonl or .csv); labels are not needed.")],
    template: Annotated[str, Opt(help="The student's short template, e.g. 'Review: {text}\\nSentiment:'.")],
    teacher_template: Annotated[str, Opt(help="The teacher's long text prompt: an instruction and demonstrations, "
                                              "then the input's {field}s.")],
    teacher_model: Annotated[Optional[str], Opt(help="A (larger) teacher model sharing the student's tokenizer "
                                                     "(default: the student's own).")] = DistillConfig.teacher_model,
    alpha: Annotated[float, Opt(help="Weight of the cross-entropy on the records' gold labels or targets (0: pure "
                                     "distillation; above 0 every record needs one).")] = DistillConfig.alpha,
    max_new_tokens: Annotated[int, Opt(help="Generation: the longest teacher continuation the student "
                                            "learns.")] = DistillConfig.max_new_tokens,
    model: Annotated[str, Opt(help="The student's model: embedded short name, local folder or hub "
                                   "name.")] = DEFAULT_MODEL,
    valid_file: Annotated[Optional[Path], Opt("--valid", help="Labelled validation data for model selection "
                                                              "(without it the last prompt is kept).")] = None,
    labels: Annotated[Optional[str], Opt(help="Comma-separated label words (classification).")] = None,
    label_field: Annotated[Optional[str], Opt(help="Field holding the gold label, where records have one (default: "
                                                   "label).")] = None,
    target_field: Annotated[Optional[str], Opt(help="Generation: the field of gold targets, where records have "
                                                    "them.")] = None,
    method: Annotated[str, Opt(help="prompt or prefix.")] = PromptConfig.method,
    num_tokens: Annotated[int, Opt(help="Virtual tokens.")] = PromptConfig.num_tokens,
    init: Annotated[str, Opt(help="random, vocab, text or labels.")] = PromptConfig.init,
    init_text: Annotated[Optional[str], Opt(help="Text for --init text (default: the student template's literal "
                                                 "words).")] = PromptConfig.init_text,
    steps: Annotated[int, Opt(help="Optimizer steps.")] = TrainConfig.steps,
    batch_size: Annotated[int, Opt(help="Examples per step.")] = TrainConfig.batch_size,
    lr: Annotated[float, Opt(help="Peak learning rate.")] = TrainConfig.lr,
    warmup_steps: Annotated[int, Opt(help="Linear warmup steps.")] = TrainConfig.warmup_steps,
    eval_every: Annotated[int, Opt(help="Validate every N steps.")] = TrainConfig.eval_every,
    eval_size: Annotated[int, Opt(help="Validation examples used.")] = TrainConfig.eval_size,
    patience: Annotated[int, Opt(help="Early stop after N evaluations without gain (0: "
                                      "never).")] = TrainConfig.patience,
    max_length: Annotated[int, Opt(help="Longest student example in tokens.")] = TrainConfig.max_length,
    too_long: Annotated[str, Opt(help="A longer example: truncate its input (with a warning) or "
                                      "refuse.")] = TrainConfig.too_long,
    seed: Annotated[int, Opt()] = TrainConfig.seed,
    resume: Annotated[bool, Opt(help="Continue the run in --out from its newest checkpoint.")] = False,
    progress: Annotated[bool, Opt(help="Progress bars.")] = True,
):
    """Distill a long text prompt into a soft one: train a prompt or prefix so that the model reading --template
    answers as the teacher (the same model, or --teacher-model) answers reading --teacher-template, on records that
    need no labels. --out becomes an ordinary prompt artifact."""
    from accelerate import PartialState

    from .data import read_records
    from .distill import distill as run_distillation
    from .prepare import fitted_task, template_init_text

    if init == "text" and not init_text:
        init_text = template_init_text(template)
    task_config, prompt_config, train_config, distill_config = build_all(
        lambda: _task_config(template, labels, label_field or ("label" if labels else None), target_field),
        lambda: PromptConfig(method=method, num_tokens=num_tokens, init=init, init_text=init_text),
        lambda: TrainConfig(steps=steps, batch_size=batch_size, lr=lr, warmup_steps=warmup_steps,
                            eval_every=eval_every, eval_size=eval_size, patience=patience, max_length=max_length,
                            too_long=too_long, seed=seed),
        lambda: DistillConfig(teacher_template=teacher_template, alpha=alpha, teacher_model=teacher_model,
                              max_new_tokens=max_new_tokens),
    )
    records = read_records(train_file)
    valid_records = read_records(valid_file) if valid_file else None
    backbone = _backbone(model)
    teacher = _backbone(teacher_model) if teacher_model else None
    task = fitted_task(task_config, backbone, num_tokens, max_length, too_long)
    valid = task.encode(valid_records, str(valid_file)) if valid_records else None
    run = run_distillation(backbone, task, distill_config, prompt_config, train_config, records, out, valid,
                           teacher, progress, resume)  # fmt: skip
    if PartialState().is_main_process:  # under `accelerate launch`, one report
        best = run.summary.get("valid") or {}
        shown = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if isinstance(v, float))
        typer.echo(f"Saved the distilled prompt (step {run.summary['best_step']}{': ' + shown if shown else ''}) to "
                   f"{out}")


@app.command("eval")
def evaluate_command(
    data: Annotated[Path, Opt(help="Data to score (a format --train takes).")],
    prompt: Annotated[Optional[list[Path]], Opt(help="A trained prompt directory; repeat for an ensemble.")] = None,
    combine: Annotated[str, Opt(help="Ensemble rule for several --prompt: vote (majority; ties go to the higher mean "
                                     "probability) or mean (mean label probability).")] = "vote",
    model: Annotated[Optional[str], Opt(help="Base model (default: the prompt's own, or the embedded one).")] = None,
    template: Annotated[Optional[str], Opt(help="Template, without --prompt.")] = None,
    labels: Annotated[Optional[str], Opt(help="Label words, without --prompt.")] = None,
    label_field: Annotated[Optional[str], Opt()] = None,
    target_field: Annotated[Optional[str], Opt()] = None,
    batch_size: Annotated[int, Opt()] = 32,
    limit: Annotated[Optional[int], Opt(help="Score only the first N examples.")] = None,
    as_json: Annotated[bool, Opt("--json", help="Print one JSON object.")] = False,
    plot: Annotated[Optional[Path], Opt(help="Classification: write the confusion matrix (rows gold, columns "
                                             "predicted) to this PNG; --json then lists its counts "
                                             "too.")] = None,
    progress: Annotated[bool, Opt()] = True,
):
    """Score a prompt (or the base model with the template alone) on labelled data."""
    from . import artifact
    from .data import read_records
    from .evaluate import evaluate
    from .prepare import fitted_task

    if batch_size < 1 or (limit is not None and limit < 1):
        raise SoftPromptError(f"--batch-size and --limit must be at least 1, got {batch_size} and {limit}.")
    if combine not in ("vote", "mean"):
        raise SoftPromptError(f"--combine {combine!r} is not one of vote, mean.")
    records = read_records(data)[:limit]
    if prompt and len(prompt) > 1:
        if plot:
            raise SoftPromptError("--plot draws the confusion matrix of one prompt; give a single --prompt.")
        return _evaluate_ensemble(data, records, prompt, combine, model, batch_size, as_json, progress)
    prompt = prompt[0] if prompt else None
    if prompt:
        saved = artifact.load(prompt)
        task_config = saved.task
    else:
        if not template:
            raise SoftPromptError("eval needs --prompt DIR, or --template with --labels/--label-field or --target-field.")
        task_config = _task_config(template, labels, label_field, target_field)
    if plot and task_config.task != "classification":
        raise SoftPromptError(f"--plot draws a confusion matrix of label words, and {prompt or 'this task'} is a "
                              "generation task (its metrics are exact match, chrF and BLEU); drop --plot.")  # fmt: skip
    if prompt:
        backbone = _backbone(model or saved.base_model)
        prefix = artifact.prefix_of(saved, backbone, str(prompt))
    else:
        backbone, prefix = _backbone(model or DEFAULT_MODEL), None
    task = fitted_task(task_config, backbone, saved.prompt.num_tokens if prompt else 0)
    examples, progress = task.encode(records, str(data)), progress and not as_json
    if plot:
        result = _evaluate_with_plot(backbone, task, examples, prefix, batch_size, progress, plot,
                                     str(prompt or "base model"))  # fmt: skip
    else:
        result = evaluate(backbone, task, examples, prefix, batch_size, progress)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                             if k not in ("confusion", "plot")))  # fmt: skip
        if plot:
            typer.echo(f"wrote {plot} (confusion matrix: rows gold, columns predicted)")


def _evaluate_with_plot(backbone, task, examples, prefix, batch_size, progress, plot: Path, title: str) -> dict:
    """`eval --plot`: the metrics, the confusion matrix's counts and its PNG, from one scoring of the labels."""
    from .evaluate import classification_result, label_scores
    from .metrics import confusion
    from .plots import plot_confusion

    scores = label_scores(backbone, task, examples, prefix, batch_size, progress)
    result = classification_result(examples, scores)
    labels = task.config.labels
    result["confusion"] = confusion([e.label for e in examples], scores.argmax(-1).tolist(), len(labels))
    caption = f"{title}: accuracy {result['accuracy']:.3f} on {result['n']}"
    result["plot"] = str(plot_confusion(result["confusion"], labels, plot, caption))
    return result


def _evaluate_ensemble(data, records, prompts, combine, model, batch_size, as_json, progress):
    """`eval` with several prompts: all members in one mixed batch, then the ensemble."""
    from . import artifact
    from .ensemble import evaluate_ensemble, format_table
    from .prepare import fitted_task

    saved = [artifact.load(p) for p in prompts]
    differ = [f"{p}: {s.task}" for p, s in zip(prompts, saved) if s.task != saved[0].task]
    if differ:
        raise SoftPromptError(f"an ensemble needs prompts of one task; {prompts[0]} has {saved[0].task}, but\n  - "
                              + "\n  - ".join(differ))  # fmt: skip
    backbone = _backbone(model or saved[0].base_model)
    prefixes = [artifact.prefix_of(s, backbone, str(p)) for p, s in zip(prompts, saved)]
    task = fitted_task(saved[0].task, backbone, max(s.prompt.num_tokens for s in saved))
    result = evaluate_ensemble(backbone, task, task.encode(records, str(data)), prefixes, combine, batch_size,
                               progress and not as_json)  # fmt: skip
    if as_json:
        members = [{"prompt": str(p), **r} for p, r in zip(prompts, result.members)]
        typer.echo(json.dumps({"members": members, "ensemble": {"combine": combine, **result.ensemble}}))
    else:
        typer.echo(format_table(result, [str(p) for p in prompts]))


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
    from .generate import decode_new
    from .generate import generate as run_generate
    from .prepare import check_generation_fits

    saved = artifact.load(prompt) if prompt else None
    backbone = _backbone(model or (saved.base_model if saved else DEFAULT_MODEL))
    prefix = artifact.prefix_of(saved, backbone, str(prompt)) if saved else None
    fields = saved.task.fields if saved and not raw else []
    inputs = [saved.task.fill_text(text) if fields else text for text in texts]
    ids = [backbone.tokenizer(text)["input_ids"] for text in inputs]
    check_generation_fits(backbone, texts, ids, saved.prompt.num_tokens if saved else 0, max_new_tokens)
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
    out: Annotated[Optional[Path], Opt(help="Folder for similarity.png and nearest_tokens.tsv (default: the "
                                            "prompt directory).")] = None,
):
    """Shapes, size, vector norms, cosine between the soft tokens (PNG heatmap) and the nearest vocabulary tokens of
    each soft token (TSV table)."""
    from . import artifact, methods
    from .inspection import describe, format_report, write_files

    saved = artifact.load(prompt)
    needs_model = methods.REGISTRY[saved.prompt.method].in_embedding_space  # for the nearest vocabulary tokens
    backbone = _backbone(model or saved.base_model) if needs_model else None
    if backbone is not None:
        artifact.check_base(saved, backbone, str(prompt))
    report = describe(saved, prompt, backbone, top_k)
    report["files"] = [str(path) for path in write_files(report, out or prompt)]
    typer.echo(json.dumps(report, ensure_ascii=False) if as_json else
               format_report(report) + "".join(f"\nwrote         {path}" for path in report["files"]))


@app.command()
def compare(
    prompts: Annotated[list[Path], typer.Argument(help="Two or more trained prompt directories.")],
    out: Annotated[Optional[Path], Opt(help="Where to write the heatmap PNG.")] = None,
    as_json: Annotated[bool, Opt("--json")] = False,
):
    """Cosine similarity between prompts (whole prompts token by token, and their mean vectors) and their norms."""
    from . import artifact
    from .inspection import compare as compare_prompts
    from .inspection import compare_heatmap, format_compare

    if len(prompts) < 2:
        raise SoftPromptError("compare needs at least two prompt directories.")
    report = compare_prompts([artifact.load(p) for p in prompts], [str(p) for p in prompts])
    if out:
        report["files"] = [str(compare_heatmap(report, out))]
    typer.echo(json.dumps(report, ensure_ascii=False) if as_json else
               format_compare(report) + "".join(f"\nwrote {path}" for path in report.get("files", [])))


@app.command()
def export(
    out: Annotated[Path, typer.Argument(help="The folder to write.")],
    prompt: Annotated[Path, Opt(help="A trained prompt directory.")],
    to: Annotated[str, Opt(help="Target format: peft (adapter_config.json + adapter_model.safetensors).")] = "peft",
):
    """Write a prompt as a PEFT adapter: `PeftModel.from_pretrained(base_model, OUT)` loads it."""
    from .peft_interop import export_peft

    if to != "peft":
        raise SoftPromptError(f"--to {to!r}: the one export format is peft.")
    export_peft(prompt, out)
    typer.echo(f"Wrote a PEFT adapter to {out}; load it with PeftModel.from_pretrained(<the same base model>, "
               f"{str(out)!r}).")


@app.command("import")
def import_command(
    peft_dir: Annotated[Path, typer.Argument(help="A PEFT prompt-tuning, P-tuning or prefix-tuning adapter folder.")],
    out: Annotated[Path, Opt(help="The artifact directory to write.")],
    model: Annotated[Optional[str], Opt(help="Base model (default: the adapter's base_model_name_or_path).")] = None,
    template: Annotated[str, Opt(help="How records become input (PEFT adapters carry no "
                                      "template).")] = TaskConfig.template,
    labels: Annotated[Optional[str], Opt(help="Comma-separated label words (classification).")] = None,
    label_field: Annotated[Optional[str], Opt(help="Field holding the label.")] = None,
    target_field: Annotated[Optional[str], Opt(help="Field holding the target text (generation).")] = "target",
):
    """Read a PEFT adapter into a softprompt artifact (checked against the base model's shapes)."""
    from .peft_interop import import_peft, read_adapter

    task_config = _task_config(template, labels, label_field, None if labels else target_field)
    config, _ = read_adapter(peft_dir)
    model = model or config.get("base_model_name_or_path")
    if not model:
        raise SoftPromptError(f"{peft_dir} names no base model; pass --model.")
    import_peft(peft_dir, out, _backbone(model), task_config)
    typer.echo(f"Imported the {config['peft_type']} adapter in {peft_dir} into {out} (base model {model}).")


@app.command()
def demo(
    out: Annotated[Path, Opt(help="Where the demo writes its data splits, run and artifact.")] = Path("runs/demo"),
    steps: Annotated[int, Opt(help="Training steps.")] = 150,
    method: Annotated[str, Opt(help="prompt or prefix.")] = PromptConfig.method,
    progress: Annotated[bool, Opt()] = True,
):
    """Movie-review sentiment on the embedded SmolLM2-135M: baseline, train, evaluate, inspect, generate."""
    from .demo import run_demo

    run_demo(out, steps=steps, method=method, progress=progress)


@app.command()
def serve(
    model: Annotated[str, Opt(help="Base model: embedded short name, local folder or hub name.")] = ServeConfig.model,
    prompts: Annotated[Optional[Path], Opt(help="Folder of prompt artifacts; each subfolder's name is a model "
                                                "id.")] = ServeConfig.prompts,
    host: Annotated[str, Opt()] = ServeConfig.host,
    port: Annotated[int, Opt()] = ServeConfig.port,
    api_key: Annotated[Optional[str], Opt(help="Require 'Authorization: Bearer KEY' (all but "
                                               "/health and the playground page's files).")] = ServeConfig.api_key,
    max_batch: Annotated[int, Opt(help="Rows decoded together.")] = ServeConfig.max_batch,
    max_queue: Annotated[int, Opt(help="Rows that may wait; more get 429.")] = ServeConfig.max_queue,
    max_prompt_tokens: Annotated[int, Opt(help="Longest prompt in tokens.")] = ServeConfig.max_prompt_tokens,
    max_tokens: Annotated[int, Opt(help="Most new tokens per choice.")] = ServeConfig.max_tokens,
    max_n: Annotated[int, Opt(help="Most choices per prompt.")] = ServeConfig.max_n,
    vllm_url: Annotated[Optional[str], Opt(help="Front a running `vllm serve --enable-prompt-embeds` of the same "
                                                "base model at this URL instead of running the model here "
                                                "(prompt-tuning artifacts only).")] = ServeConfig.vllm_url,
    vllm_timeout: Annotated[float, Opt(help="Seconds to wait for vLLM's next bytes before answering "
                                            "504.")] = ServeConfig.vllm_timeout,
):
    """OpenAI-compatible server: every prompt in --prompts, and the bare model, in mixed continuous batches (or
    through vLLM, with --vllm-url)."""
    from .serve import serve as run_server

    run_server(ServeConfig(model=model, prompts=prompts, host=host, port=port, api_key=api_key, max_batch=max_batch,
                           max_queue=max_queue, max_prompt_tokens=max_prompt_tokens, max_tokens=max_tokens,
                           max_n=max_n, vllm_url=vllm_url, vllm_timeout=vllm_timeout))


def _format_warning(message, category, filename, lineno, line=None) -> str:
    """Our own warnings (truncated examples) read as one line, like errors; others keep Python's format."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        return f"warning: {message}\n"
    return _python_format_warning(message, category, filename, lineno, line)


_python_format_warning = warnings.formatwarning


def main() -> None:
    warnings.formatwarning = _format_warning
    try:
        app()
    except SoftPromptError as error:
        typer.echo(f"error: {error}", err=True)
        sys.exit(getattr(error, "exit_code", 2))
