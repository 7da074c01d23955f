"""Several candidate prompts trained in one run, the best kept (`softprompt train --search` / `--grid`).

Every candidate (a method, init, length and learning rate) is a row group of the same mixed batch, behind its own
prompt: one forward for all of them, each with its own learning rate and gradient clipping, so each learns exactly
as it would alone. Successive halving on the validation set stops the weaker half at each rung, so the run costs a
fraction of training every candidate to the end one after another. The best candidate's prompt becomes the
artifact in `out`; every candidate's best prompt stays in `out/candidates/<name>`, and `search.md`/`search.json`
list them.

The training loop knows nothing of this: `Halving` is the policy it runs the candidates under (`policy.py`'s hooks),
and the place where the search decides who goes on (`rank`, `after_validation`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import artifact, methods
from ..atomic import write_json, write_text
from ..backbones import Backbone
from ..config import SELECTABLE, PromptConfig, TrainConfig
from ..data import Example, TaskEncoder
from ..errors import SoftPromptError
from .loop import Run, selection_key, train_prompts
from .policy import RunView, TrainingPolicy
from .run_files import Layout
from .setup import PromptSet, TrainingTask, hold_out, resolve_start, search_without_data

GRID_KEYS = {"lr": float, "method": str, "init": str, "num_tokens": int, "residual": bool, "prefix_mlp": bool,
             "mlp_hidden": int, "slot_dropout": float}  # fmt: skip
"""What a grid may vary: the learning rate and the prompt settings."""


@dataclass(frozen=True)
class Candidate:
    """One setting of the search."""

    prompt: PromptConfig
    lr: float
    default_length: bool = False
    """Its length is its start's default, not asked for: a start of demonstrations then takes what the training data
    fill when they fill fewer tokens, as a plain run's does (`setup.resolve_start`)."""

    @property
    def name(self) -> str:
        """Its folder name, e.g. prompt-labels-20-lr0p3 (no dot: it also names a module)."""
        p = self.prompt
        extra = "-residual" * p.residual + "-mlp" * p.prefix_mlp + f"-drop{p.slot_dropout:g}" * bool(p.slot_dropout)
        return f"{p.method}-{p.init}-{p.num_tokens}{extra}-lr{self.lr:g}".replace(".", "p")


def default_candidates(base: PromptConfig, kind: str) -> list[Candidate]:
    """Both methods at two learning rates each: prompt tuning from the label words (classification) and from the
    template's text, prefix tuning from the template's text; the length is `base`'s, else each method's default
    for a task of `kind`."""
    settings = [("prompt", "text", lr) for lr in (0.3, 0.03)] + [("prefix", "text", lr) for lr in (0.03, 0.01)]
    if kind == "classification":
        settings = [("prompt", "labels", lr) for lr in (0.3, 0.03)] + settings
    return [Candidate(dataclasses.replace(base, method=m, init=i).for_tasks([kind]), lr, base.num_tokens is None)
            for m, i, lr in settings]  # fmt: skip


def parse_grid(spec: str, base: PromptConfig, train: TrainConfig, kind: str) -> tuple[list[Candidate], list[str]]:
    """The candidates of a grid such as "lr=0.3,0.03 method=prompt,prefix num_tokens=10,20": every combination,
    the rest taken from `base` (what it leaves unset, each candidate's method's default for a task of `kind`), the
    learning rate from `train` (its lr, else each candidate's method's default).
    Returns them and why any combination was left out (e.g. a residual prefix); refuses a grid with unknown keys or
    values, or with no valid combination."""
    axes, problems = {}, []
    for part in spec.split():
        key, _, values = part.partition("=")
        if key not in GRID_KEYS or not values:
            problems.append(f"{part!r}: expected key=value,value,... with a key among {', '.join(GRID_KEYS)}")
            continue
        try:
            axes[key] = [_value(key, v) for v in values.split(",")]
        except ValueError as error:
            problems.append(f"{key}: {error}")
    if problems or not axes:
        raise SoftPromptError("Invalid --grid " + repr(spec) + ":\n  - " + "\n  - ".join(problems or ["it is empty"]))
    candidates, skipped = [], []
    for combination in itertools.product(*axes.values()):
        setting = dict(zip(axes, combination))
        lr = setting.pop("lr", None)  # a grid's rates are positive: None is "not on the grid"
        try:
            prompt = dataclasses.replace(base, **setting).for_tasks([kind])
            default_length = base.num_tokens is None and "num_tokens" not in setting
            candidates.append(Candidate(prompt, lr or train.for_method(prompt.method).lr, default_length))
        except SoftPromptError as error:
            skipped.append(f"{setting}: {str(error).splitlines()[-1].strip(' -')}")
    if not candidates:
        raise SoftPromptError(f"--grid {spec!r} has no valid combination:\n  - " + "\n  - ".join(skipped))
    return list({c.name: c for c in candidates}.values()), skipped  # a value given twice is one candidate


def _value(key: str, text: str):
    kind = GRID_KEYS[key]
    if kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{text!r} is not true or false")
        return text.lower() == "true"
    if key == "lr" and not float(text) > 0:
        raise ValueError(f"{text!r} must be positive")
    return kind(text)


def rungs(steps: int, count: int) -> tuple[int, ...]:
    """The steps at which the candidates still training are halved: with 2^(r-1) < count <= 2^r, at steps/2^r,
    ..., steps/4, steps/2, so the last one trains alone for the second half of the run."""
    halvings = math.ceil(math.log2(count)) if count > 1 else 0
    return tuple(dict.fromkeys(max(1, math.ceil(steps / 2**k)) for k in range(halvings, 0, -1)))


@dataclass(frozen=True)
class Halving(TrainingPolicy):
    """How the loop trains a search's candidates (one task's data, one prompt each) side by side: each reads the same
    batches with its own learning rate and its own gradient clipping, so each trains exactly as it would alone; one
    that holds or gets non-finite values leaves (the others go on); at each rung step the lower-scoring half on
    validation stops training (successive halving). Where the search decides: `rank` (what candidates are compared
    by) and `after_validation` (who goes on)."""

    lrs: dict[str, float]
    rungs: tuple[int, ...]
    says_when_not_learning = False  # halving stops the candidates that lag; the table shows what each one reached
    one_learning_rate = False  # each candidate's own (`lrs`)

    def pool(self, tasks: dict[str, TrainingTask]) -> list[tuple[str | None, Example]]:
        """The one task's data (every candidate has the same), each batch read by every candidate (`rows`)."""
        return [(None, e) for e in next(iter(tasks.values())).train]

    def rows(self, drawn: list[tuple[str | None, Example]], live: list[str]) -> list[tuple[str, Example]]:
        return [(name, e) for name in live for _, e in drawn]

    def copies(self, live: list[str]) -> int:
        return len(live)

    def param_groups(self, prompts: PromptSet) -> list[dict]:
        """One parameter group per candidate, at its own learning rate (the schedule scales them alike)."""
        return [{"params": list(prompts.prompts[name].parameters()), "lr": lr} for name, lr in self.lrs.items()]

    def before_step(self, run: RunView) -> None:
        """Candidates share one prefix in a batch (`side_by_side`), where a NaN slot would reach every row through
        the attention's zero weights: one holding non-finite values (a poisoned init or resumed state) leaves
        before it runs."""
        for name in run.live:
            if not all(bool(p.isfinite().all()) for p in run.prompts.prompts[name].parameters()):
                self.leave(run, name, "it holds non-finite values")

    def clip(self, run: RunView, limit: float) -> float:
        """Each candidate's gradient clipped on its own (as it would be alone). One whose gradient is not finite
        leaves (the others go on); the norm returned is the largest of those still training."""
        run.accelerator.unscale_gradients()
        norms = {name: float(torch.nn.utils.clip_grad_norm_(run.prompts.prompts[name].parameters(), limit))
                 for name in run.live}  # fmt: skip
        finite = [norm for norm in norms.values() if math.isfinite(norm)]
        for name in [name for name, norm in norms.items() if not math.isfinite(norm)] if finite else []:
            self.leave(run, name, "its gradient is not finite")
        return max(finite, default=float("nan"))

    def diverged(self, loss: float, grad_norm: float) -> bool:
        """Only when every candidate has (the loss, their mean, may be NaN from one that left in `clip`)."""
        return not math.isfinite(grad_norm)

    def step_record(self, copies: int) -> dict:
        return {"candidates": copies}

    def validates_at(self, step: int) -> bool:
        return step in self.rungs

    def rank(self, run: RunView, name: str) -> tuple:
        """What candidates are compared by at a rung (higher is better): their best validation result so far, as
        `--select-by` ranks it (the key the loop kept it by)."""
        return run.state.best[name][0]

    def after_validation(self, run: RunView, step: int, results: dict[str, dict]) -> None:
        """At a rung, keep the better half (rounded up) of the candidates still training, ranked by `rank` (ties: the
        earlier candidate); the rest stop here."""
        if step not in self.rungs:
            return
        ranked = sorted(run.live, key=lambda name: self.rank(run, name), reverse=True)
        for name in ranked[(len(ranked) + 1) // 2 :]:
            run.stop(name)
        tqdm.write(f"step {step}: {len(ranked)} -> {(len(ranked) + 1) // 2} candidates (kept: "
                   f"{', '.join(run.live)})", file=sys.stderr)  # fmt: skip

    @staticmethod
    def leave(run: RunView, name: str, why: str) -> None:
        run.stop(name)
        if run.main:
            tqdm.write(f"candidate {name} stops at step {run.state.step}: {why}.", file=sys.stderr)


def train_candidates(backbone: Backbone, tasks: dict[str, TrainingTask], prompt_config: PromptConfig,
                     train_config: TrainConfig, out_dir: str | Path, halving: Halving, progress: bool = True,
                     resume: bool = False) -> dict[str, Run]:  # fmt: skip
    """Train the candidates `tasks` (one task's data, each its own starting prompt) side by side under `halving`;
    each one's best prompt goes to `out_dir/candidates/<name>`, and its records and summary name it "candidate"."""
    layout = Layout(Path(out_dir), tuple(tasks), word="candidate", folder="candidates")
    return train_prompts(backbone, tasks, prompt_config, train_config, layout, progress, resume, policy=halving)


@dataclass
class SearchResult:
    best: str
    """The winning candidate's name."""
    runs: dict[str, Run]
    """Each candidate's best prompt and summary."""
    table: list[dict]
    """One row per candidate (settings, best validation result and step, steps trained), in candidate order."""


def search(
    backbone: Backbone,
    task: TaskEncoder,
    candidates: list[Candidate],
    train_config: TrainConfig,
    train_examples: list[Example],
    valid_examples: list[Example],
    out_dir: str | Path,
    progress: bool = True,
    resume: bool = False,
) -> SearchResult:
    """Train `candidates` side by side on one task with successive halving on `valid_examples` (none: a share of
    `train_examples`, `TrainConfig.holdout`), ranked by `train_config.select_by`; the best one's prompt becomes the
    artifact in `out_dir`, each candidate's in `out_dir/candidates/<name>`."""
    train_config.check_select_by(task.config.task)
    held_out = 0
    if not valid_examples:  # a share of the training data, as a plain run takes it
        held = hold_out({"search": TrainingTask(task, train_examples)}, train_config)["search"]
        if not held.valid:
            raise SoftPromptError(search_without_data(len(train_examples), train_config))
        train_examples, valid_examples, held_out = held.train, held.valid, held.held_out
    if len(candidates) < 2:
        raise SoftPromptError(f"a search needs at least two candidates, got {len(candidates)}.")
    main = os.environ.get("RANK", "0") == "0"  # one process speaks (accelerate's state is not set up yet)
    candidates = _fit_to_data(candidates, TrainingTask(task, train_examples), backbone.tokenizer, say=main)
    if main:
        print(f"Searching {len(candidates)} candidates: {', '.join(c.name for c in candidates)}", file=sys.stderr)
    out_dir = Path(out_dir)
    names = [c.name for c in candidates]
    tasks = {}
    for candidate in candidates:  # each from its own generator, as if it were the run's only prompt
        generator = torch.Generator().manual_seed(train_config.seed)
        init = methods.build(candidate.prompt, backbone, task.config.labels, generator, train_examples)
        tasks[candidate.name] = TrainingTask(task, train_examples, valid_examples, init, held_out)
    halving = Halving({c.name: c.lr for c in candidates}, rungs(train_config.steps, len(candidates)))
    runs = train_candidates(backbone, tasks, candidates[0].prompt, train_config, out_dir, halving, progress, resume)
    best = max(names, key=lambda name: selection_key(runs[name].summary["valid"] or {"loss": math.inf},
                                                     train_config.select_by))  # fmt: skip
    table = [_row(c, runs[c.name], c.name == best) for c in candidates]
    summary = {**runs[best].summary, "search": table}
    artifact.save(out_dir, runs[best].method, task.config, backbone, training=summary)
    write_json(out_dir / "search.json", table)
    write_text(out_dir / "search.md", format_table(table) + "\n")
    return SearchResult(best, runs, table)


def _fit_to_data(candidates: list[Candidate], data: TrainingTask, tokenizer, say: bool = True) -> list[Candidate]:
    """The candidates with a default start of demonstrations cut to what `data`'s training examples fill, when
    they fill fewer tokens (`Candidate.default_length`); stderr says so once (`say`)."""
    fitted = []
    for c in candidates:
        if c.default_length:
            prompt = resolve_start(dataclasses.replace(c.prompt, num_tokens=None), {"search": data}, tokenizer, say)
            say = say and prompt == c.prompt  # one message for all the candidates it cuts
            c = dataclasses.replace(c, prompt=prompt)
        fitted.append(c)
    return fitted


def _row(candidate: Candidate, run: Run, best: bool) -> dict:
    p, s = candidate.prompt, run.summary
    return {"candidate": candidate.name, "method": p.method, "init": p.init, "num_tokens": p.num_tokens,
            "lr": candidate.lr, "residual": p.residual, "prefix_mlp": p.prefix_mlp, "slot_dropout": p.slot_dropout,
            "valid": s["valid"], "best_step": s["best_step"], "trained_steps": s["last_step"],
            "best": best}  # fmt: skip


SHOWN = tuple(dict.fromkeys(name for names in SELECTABLE.values() for name in names))
"""What the table shows of a validation result: every metric `--select-by` may name that the result holds."""


def format_table(table: list[dict]) -> str:
    """The candidates as a Markdown table, the chosen one marked."""
    lines = ["| candidate | method | init | tokens | lr | best valid | at step | trained steps |",
             "| --- | --- | --- | ---: | ---: | --- | ---: | ---: |"]  # fmt: skip
    for r in table:
        shown = ", ".join(f"{k} {r['valid'][k]:.4f}" for k in SHOWN if k in r["valid"])
        mark = " (chosen)" if r["best"] else ""
        lines.append(f"| {r['candidate']}{mark} | {r['method']} | {r['init']} | {r['num_tokens']} | {r['lr']:g} | "
                     f"{shown} | {r['best_step']} | {r['trained_steps']} |")
    return "\n".join(lines)


def cost(table: list[dict], steps: int) -> float:
    """Candidate-steps trained, as a fraction of training every candidate for all `steps` one after another."""
    return sum(r["trained_steps"] for r in table) / (steps * len(table))
