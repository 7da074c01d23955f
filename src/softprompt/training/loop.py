"""One flat training loop: batch -> forward -> loss -> backward -> clip -> step -> log -> eval/save.

Only the prompt method's parameters reach the optimizer; the base model was frozen once by Backbone. The
artifact written to `out_dir` is always the best prompt seen on the validation set (given, or held out of the
training data by `setup.hold_out`; the last prompt when there is none).

`train_prompts` reads top to bottom: the set-up steps (`setup.py`), then `_Trainer.fit`, the loop, then each
prompt's best one written as its artifact. What differs between runs of one task, several tasks or a search's
candidates is the run's policy (`policy.py`: which rows read a batch, learning rates, clipping, what a non-finite
value or a validation does), never a branch here; what a checkpoint holds, and how a run comes back from one, is
`checkpoint.py`'s.

Runs unchanged under `accelerate launch`: every process draws the same global batch from the seeded data order and
trains on its own slice of it; the prompt's gradients are averaged across processes (DDP over the prompt module
only); the main process validates, logs and writes. Checkpoints hold everything needed to continue exactly, and
SIGTERM/SIGINT write one before the run stops.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from tqdm.auto import tqdm

from .. import artifact, methods
from ..backbones import Backbone
from ..backbones.compiled import compiled_graphs
from ..config import PromptConfig, TrainConfig, to_dict
from ..data import Example, TaskEncoder, collate
from ..errors import SoftPromptError
from ..scoring.evaluate import evaluate
from . import setup, trackers
from .checkpoint import RunIdentity, RunState, latest_checkpoint, restore_run, save_run, saved_state
from .interruption import interrupted, signals_caught
from .policy import TrainingPolicy
from .run_files import Layout, MetricsLog, plot_losses
from .setup import PromptSet, TrainingTask


@dataclass
class Run:
    """What a training run returns."""

    method: methods.PromptMethod
    """The best prompt (loaded back from the artifact)."""
    summary: dict
    """Also stored in the artifact's config.json under `training`."""


class BatchOrder:
    """The global batches of a run as a pure function of (seed, batch index): epoch e is a seeded shuffle of the
    data cut into full batches (its short tail dropped), so a resumed run continues with the very next batch."""

    def __init__(self, examples: list[Example], batch_size: int, seed: int):
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.per_epoch = max(1, len(examples) // batch_size)
        self._epoch, self._order = -1, []

    def __getitem__(self, index: int) -> list[Example]:
        epoch, start = divmod(index, self.per_epoch)
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._order = epoch, torch.randperm(len(self.examples), generator=generator).tolist()
        start *= self.batch_size
        return [self.examples[i] for i in self._order[start : start + self.batch_size]]


def loss_on(
    backbone: Backbone,
    prompt_input: torch.Tensor,
    examples: list[Example],
    normalizer: float | None = None,
    prefix_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over the examples' target tokens (full vocabulary, the head run only at those positions)
    and divided by `normalizer` (default: their count, i.e. the mean). Returns it and the batch's real (non-pad)
    token count.
    prompt_input: one prompt's prefix or soft tokens (`training_input`), or several prompts' prefixes with the
    `prefix_mask` saying which each row sees (`prompt_input_for`)."""
    batch = collate(examples, backbone.pad_id).to(backbone.device)
    hidden = backbone.target_hidden(batch, prompt_input, prefix_mask)  # (K, hidden)
    logits = backbone.logits(hidden)  # (K, vocab)
    total = F.cross_entropy(logits, batch.loss_tokens, reduction="sum")
    return total / (normalizer or len(batch.loss_tokens)), batch.num_input_tokens


MIN_LOSS_STEPS = 8
"""Steps a run without validation data takes before its loss is judged (a quarter of them against another)."""

Objective = Callable[..., tuple[torch.Tensor, int]]
"""A batch's loss with `loss_on`'s signature: (backbone, prompt_input, examples, normalizer, prefix_mask) -> (loss,
tokens)."""


def selection_key(result: dict, select_by: str = "auto") -> tuple:
    """How a validation result ranks (higher is better) under `select_by` (`TrainConfig.select_by`): its metric
    (auto: accuracy for classification, chrF for generation; loss negated), then the loss as the tie-break: -loss,
    or for classification, whose results hold no loss, the gold label's mean log-probability (its label words'
    negative loss). A result without the metric ranks below every one with it, by that loss among themselves."""
    classification = "gold_logprob" in result
    loss = -result["gold_logprob"] if classification else result.get("loss", math.inf)
    metric = select_by if select_by != "auto" else "accuracy" if classification else "chrf"
    value = -loss if metric == "loss" else result.get(metric)
    return (value is not None, value if value is not None else 0.0, -loss)


def improves(key: tuple, best: tuple) -> bool:
    """Whether a validation result with selection key `key` replaces the best one: strictly higher, and never
    with a non-finite value (a diverging prompt's NaN log-probability must not win on its accuracy)."""
    finite = lambda k: all(map(math.isfinite, k))  # noqa: E731
    return finite(key) and (key > best or not finite(best))


def prompt_input_for(backbone: Backbone, prompt_inputs: dict[str, torch.Tensor],
                     names: list[str]) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """The prompt input of a batch whose rows run behind the prompts `names` (one per row), from each one's
    `prompt_inputs` (`training_input`): that one prompt's own (its prefix or soft tokens; no mask) when they are all
    one, else their prefixes side by side with a mask saying which slots each row sees (`side_by_side`)."""
    if len(set(names)) == 1:
        return prompt_inputs[names[0]], None
    return backbone.side_by_side([prompt_inputs[name] for name in names])


def train(
    backbone: Backbone,
    task: TaskEncoder,
    prompt_config: PromptConfig,
    train_config: TrainConfig,
    train_examples: list[Example],
    out_dir: str | Path,
    valid_examples: list[Example] | None = None,
    init_method: methods.PromptMethod | None = None,
    progress: bool = True,
    resume: bool = False,
    objective: Objective | None = None,
) -> Run:
    """Train one prompt for one task; `out_dir` becomes its artifact (plus log, plot and checkpoints).
    objective: the loss of a batch, `loss_on`'s signature (default: `loss_on`, cross-entropy on the targets;
    distillation passes its own)."""
    data = TrainingTask(task, train_examples, valid_examples or [], init_method)
    return train_prompts(backbone, {"prompt": data}, prompt_config, train_config, Layout(Path(out_dir)), progress,
                         resume, objective)["prompt"]  # fmt: skip


def train_multitask(
    backbone: Backbone,
    tasks: dict[str, TrainingTask],
    prompt_config: PromptConfig,
    train_config: TrainConfig,
    out_dir: str | Path,
    progress: bool = True,
    resume: bool = False,
) -> dict[str, Run]:
    """Train one prompt per task at once over the mixture of their data (each global batch a seeded draw from all
    examples, so tasks are mixed in proportion to their sizes; each row runs behind its own task's prompt). Writes
    the artifact of task `name` to `out_dir/name`, each selected on that task's own validation data."""
    bad = [name for name in tasks if not name or not name.replace("-", "").replace("_", "").isalnum()]
    if bad or not tasks:
        raise SoftPromptError(f"task names must be non-empty letters, digits, '-' or '_' (they name folders); got "
                              f"{bad or 'no tasks'}")  # fmt: skip
    return train_prompts(backbone, tasks, prompt_config, train_config, Layout(Path(out_dir), tuple(sorted(tasks))),
                         progress, resume)  # fmt: skip


def train_prompts(
    backbone: Backbone,
    tasks: dict[str, TrainingTask],
    prompt_config: PromptConfig,
    cfg: TrainConfig,
    layout: Layout,
    progress: bool = True,
    resume: bool = False,
    objective: Objective | None = None,
    policy: TrainingPolicy | None = None,
) -> dict[str, Run]:
    """The run behind `train`, `train_multitask` and a search: one prompt per entry of `tasks`, written where
    `layout` says, trained under `policy` (default: the plain one). Set-up in order (every check before the model
    moves; the seed right before the prompts are built), the loop (`_Trainer.fit`), then each prompt's best one
    written as its artifact."""
    for data in tasks.values():  # a metric the task does not report, refused before anything is set up
        cfg.check_select_by(data.task.config.task)
    chosen_lr = cfg.lr is None
    cfg = cfg.for_method(prompt_config.method)  # the lr explicit before it is logged or checked on resume
    policy = policy or TrainingPolicy()
    several = len(tasks) > 1  # a batch may leave some prompts unused: DDP must not wait for their gradients
    accelerator = setup.accelerator_for(several, cfg.report_to, layout.out_dir, backbone.device)
    if chosen_lr and policy.one_learning_rate and accelerator.is_main_process:
        print(f"softprompt: learning rate {cfg.lr:g}, {prompt_config.method} tuning's default (--lr sets another)",
              file=sys.stderr)  # fmt: skip
    setup.check_model(backbone)
    tasks = setup.hold_out(tasks, cfg, say=accelerator.is_main_process)
    setup.check_data(tasks, cfg, accelerator.num_processes, len(policy.pool(tasks)))
    prompt_config = setup.resolve_start(prompt_config, tasks, backbone.tokenizer, say=accelerator.is_main_process)
    identity = RunIdentity.of(prompt_config, cfg, tasks)
    saved = saved_state(layout.out_dir, identity, resume)
    sharded, frozen_held = setup.place_model(backbone, cfg, accelerator)
    setup.seed_everything(cfg.seed)
    prompts = setup.build_prompts(backbone, tasks, prompt_config, cfg.seed, accelerator.device)
    model, optimizer, scheduler = setup.optimizer_for(prompts, policy.param_groups(prompts), cfg, accelerator,
                                                      sharded, several)  # fmt: skip
    run = _Trainer(backbone, tasks, cfg, layout, identity, accelerator, sharded, frozen_held, prompts, model,
                   optimizer, scheduler, objective or loss_on, policy)  # fmt: skip
    if saved:
        run.restore(saved)
    run.log.start()
    trackers.start(accelerator, layout.out_dir, prompt_config, cfg)  # after every refusal: those write nothing
    try:
        if run.valid and saved is None:
            run.validate(0)  # the starting prompt is the first best one
        run.fit(progress)
        return run.finish()
    finally:
        trackers.finish(accelerator)


@dataclass
class _Trainer:
    """A set-up run: the loop (`fit`) and its step, validation with keep-best, checkpoints, and the final artifacts.
    Its progress is `state`; every process runs it, only the main one validates (unless sharded), logs and writes.
    What differs between kinds of runs it asks its `policy` (it is the policy's `RunView`)."""

    backbone: Backbone
    tasks: dict[str, TrainingTask]
    cfg: TrainConfig
    layout: Layout
    identity: RunIdentity
    accelerator: Accelerator
    sharded: bool
    frozen_held: int
    """Parameters of the frozen model this process holds."""
    prompts: PromptSet
    model: nn.Module
    """`prompts` as run: wrapped for DDP across processes (or the module itself in one process)."""
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    objective: Objective
    policy: TrainingPolicy

    def __post_init__(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        self.world, self.rank, self.main = acc.num_processes, acc.process_index, acc.is_main_process
        self.valid = {name: data.valid[: cfg.eval_size] for name, data in self.tasks.items() if data.valid}
        self.order = BatchOrder(self.policy.pool(self.tasks), cfg.batch_size, cfg.seed)  # (name, example) pairs
        self.shard = cfg.batch_size // self.world  # this process's rows of each global batch
        self.micro = self.shard // cfg.grad_accum
        self.log = MetricsLog(self.layout.out_dir / "metrics.jsonl", self.main,
                              forward=lambda record: trackers.log(acc, record))  # fmt: skip
        self.state = RunState(evals_without_gain=dict.fromkeys(self.tasks, 0))
        self.started = time.perf_counter()
        self.graphs_before = compiled_graphs()

    @property
    def live(self) -> list[str]:
        """The prompts still training (the policy may stop some before the run ends)."""
        return [name for name in self.tasks if name not in self.state.dropped]

    def stop(self, name: str) -> None:
        """Prompt `name` stops training at this step (the others go on)."""
        self.state.dropped[name] = self.state.step
        self.prompts.prompts[name].zero_grad(set_to_none=True)  # the optimizer skips it from now on

    def restore(self, saved: dict) -> None:
        """Continue from checkpoint `saved`: module, optimizer, schedule and random states, progress, and the log."""
        self.state = restore_run(saved, self.prompts, self.optimizer, self.scheduler)
        self.log.reload(until_step=self.state.step)
        for name, (_, step, tensors) in self.state.best.items():  # ranked anew: --select-by may have changed
            valid = self.log.valid_result(name, step)
            if valid:
                self.state.best[name] = (selection_key(valid, self.cfg.select_by), step, tensors)
        if self.main:
            tqdm.write(f"resuming from {latest_checkpoint(self.layout.out_dir)} (step {self.state.step} of "
                       f"{self.cfg.steps})", file=sys.stderr)  # fmt: skip

    def fit(self, progress: bool) -> None:
        """Train until `steps`, an early stop, or a signal (which writes a checkpoint and raises)."""
        cfg, state = self.cfg, self.state
        first = state.next_step(cfg.steps)
        bar = tqdm(range(first, cfg.steps + 1), desc="training", disable=not (progress and self.main),
                   initial=first - 1, total=cfg.steps)  # fmt: skip
        try:
            with signals_caught() as caught:
                for step in bar:
                    state.step = step
                    loss, stop_requested = self.train_step(self.order[step - 1], caught)
                    bar.set_postfix(loss=f"{loss:.4f}")
                    evaluating = self.valid and (step == cfg.steps or self.policy.validates_at(step)
                                                 or (cfg.eval_every and step % cfg.eval_every == 0))  # fmt: skip
                    state.stopped_early = bool(evaluating) and self.validate(step)
                    if self.main and cfg.no_learning_after and self.policy.says_when_not_learning:
                        self.check_learning(step, bool(evaluating))
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                        self.checkpoint()
                    # Several processes decide together (a signal that reached one stops them all), one alone at once.
                    if stop_requested or (self.world == 1 and caught):
                        raise interrupted(caught[0] if caught else signal.SIGTERM, step, self.checkpoint())
                    if state.stopped_early:
                        break
        finally:
            bar.close()
            self.backbone.gradient_checkpointing(False)

    def train_step(self, batch: list[tuple[str | None, Example]], caught: list[int]) -> tuple[float, bool]:
        """One optimizer step on the global `batch`; returns its loss and whether any process was asked to stop
        (`caught`: the signals this one got so far)."""
        state, started = self.state, time.perf_counter()
        self.policy.before_step(self)
        copies = self.policy.copies(self.live)
        local_loss = self.forward_backward(batch)
        state.tokens_seen += copies * sum(len(e.input_ids) + len(e.target_ids) for _, e in batch)
        # One collective per step: the global loss, and whether any process was asked to stop.
        stop_flag = local_loss.new_tensor(float(bool(caught)))
        loss, stop_requested = self.accelerator.reduce(torch.stack([local_loss, stop_flag]), "sum").tolist()
        grad_norm = self.policy.clip(self, self.cfg.max_grad_norm or float("inf"))
        lr = self.scheduler.get_last_lr()[0]  # what this step applies (after scheduler.step: the next's)
        if self.policy.diverged(loss, grad_norm):
            raise _diverged(loss, grad_norm, lr, state.step, self.cfg, self.layout.out_dir)
        loss /= copies  # several copies of each row: the mean of their losses
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        state.train_seconds += time.perf_counter() - started
        self.log.append({"step": state.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                         "tokens_per_s": round(state.tokens_seen / state.train_seconds, 1),
                         **self.policy.step_record(copies)})  # fmt: skip
        return loss, bool(stop_requested)

    def forward_backward(self, batch: list[tuple[str | None, Example]]) -> torch.Tensor:
        """Forward and backward over this process's rows of the global `batch`, `grad_accum` micro-batches
        (gradients synchronised on the last only); returns its share of the global mean loss (a 0-d tensor)."""
        drawn = batch[self.rank * self.shard : (self.rank + 1) * self.shard]
        # Every process knows the whole global batch, so each divides its summed loss by the global target count
        # (times `world`, which DDP's gradient averaging undoes): the gradient of the global mean.
        normalizer = sum(len(e.target_ids) for _, e in batch) / self.world
        acc, backbone = self.accelerator, self.backbone
        total = torch.zeros((), device=acc.device)
        for start in range(0, self.shard, self.micro):
            names, examples = zip(*self.policy.rows(drawn[start : start + self.micro], self.live))
            last = start + self.micro >= self.shard
            with contextlib.nullcontext() if last else acc.no_sync(self.model), acc.autocast():
                # Each prompt's training input once per micro-batch, shared by its rows.
                prompt_input, prefix_mask = prompt_input_for(backbone, self.model(backbone, set(names)), list(names))
                prefix_mask = self.prompts.training_mask(list(names), list(examples), prompt_input, prefix_mask,
                                                         self.slot_seed(start))
                loss, _ = self.objective(backbone, prompt_input, list(examples), normalizer, prefix_mask)
                acc.backward(loss)
            total += loss.detach() / self.world
        return total

    def slot_seed(self, start: int) -> int:
        """The seed of slot dropout's draws (`PromptConfig.slot_dropout`) for the micro-batch at `start` of this
        process's rows: from the run's seed, the step and the row, so a resumed run draws what an uninterrupted one
        drew."""
        return (self.cfg.seed * 1_000_003 + self.state.step) * 65_537 + self.rank * self.shard + start

    def validate(self, step: int) -> bool:
        """Validate each prompt still training on the main process (on every process when the layers are sharded:
        their forwards gather weights together), keeping each one's best; then the policy's turn. True when
        training should stop early: none improved for `patience` evaluations (the main process decides for all).
        Step 0 also scores the template alone (`template_results`)."""
        state, cfg = self.state, self.cfg
        stop, results, template = [False], {}, {}
        if self.main or self.sharded:
            with torch.no_grad(), self.accelerator.autocast():
                results = {name: evaluate(self.backbone, self.tasks[name].task, self.valid[name],
                                          self.prompts.prompts[name].kv(self.backbone))
                           for name in self.live if name in self.valid}  # fmt: skip
                template = self.template_results() if step == 0 else {}
        if self.main:
            for name, result in results.items():
                self.keep_best(name, step, result, template.get(name))
            self.policy.after_validation(self, step, results)
            stop = [bool(cfg.patience) and all(state.evals_without_gain[n] >= cfg.patience
                                               for n in self.live if n in self.valid)]  # fmt: skip
        stop, state.dropped = broadcast_object_list([stop[0], state.dropped])
        return stop

    def template_results(self) -> dict[str, dict]:
        """Each prompt's validation result with the template alone (no prompt), scored once per task and data
        (a search's candidates share theirs): what a prompt must beat to have learned anything."""
        scored, results = {}, {}
        for name in self.valid:
            data = self.tasks[name]
            key = (id(data.task), id(data.valid))
            if key not in scored:
                scored[key] = evaluate(self.backbone, data.task, self.valid[name])
            results[name] = scored[key]
        return results

    def keep_best(self, name: str, step: int, result: dict, template: dict | None = None) -> None:
        """Log prompt `name`'s validation `result` (at step 0 beside the `template`'s alone); when it improves on
        its best, it is the new best and its artifact is written (main process)."""
        state, prompt = self.state, self.prompts.prompts[name]
        beside = {"template": template} if template else {}
        self.log.append({"step": step, **self.layout.record_tag(name), "valid": result, **beside})
        key = selection_key(result, self.cfg.select_by)
        if name not in state.best or improves(key, state.best[name][0]):
            state.best[name], state.evals_without_gain[name] = (key, step, prompt.artifact_tensors()), 0
            artifact.save(self.layout.artifact_dir(name), prompt, self.tasks[name].task.config, self.backbone,
                          training=self.summary(name))  # fmt: skip
        else:
            state.evals_without_gain[name] += 1

    def check_learning(self, step: int, evaluated: bool) -> None:
        """Say once of each prompt whose best validation is still its starting one at the first validation from
        `no_learning_after` of the steps on (or when the run ends before) that it did not learn; without validation
        data, of the run when its training loss has not fallen by then (and at least `MIN_LOSS_STEPS`). Printed and
        logged with what to try."""
        cfg, state = self.cfg, self.state
        due = math.ceil(cfg.no_learning_after * cfg.steps)
        if not self.valid:
            if step != max(due, MIN_LOSS_STEPS):  # judged once: the log is not read at every step
                return
            losses = [r["loss"] for r in self.log.records if "loss" in r]
            quarter = max(1, len(losses) // 4)
            start, now = sum(losses[:quarter]) / quarter, sum(losses[-quarter:]) / quarter
            if now > 0.98 * start:
                self.warn(None, f"its training loss has not fallen in {step} steps ({start:.4g} over the first "
                                f"{quarter}, {now:.4g} over the last {quarter})")  # fmt: skip
            return
        if not evaluated or (step < due and step < cfg.steps and not state.stopped_early):
            return
        for name in [n for n in self.live if n in self.valid and state.best[n][1] == 0 and not self.log.warned(n)]:
            start = ", ".join(f"{k} {v:.4g}" for k, v in self.log.valid_result(name, 0).items() if isinstance(v, float))
            self.warn(name, f"its validation has not beaten the starting prompt's ({start}) in {step} steps")

    def warn(self, name: str | None, why: str) -> None:
        """The warning that a prompt (None: the run) did not learn, with what to try, on the console and in the log."""
        layout = self.layout
        who = f"{layout.word} {name!r}" if name and layout.names else "the prompt" + "s" * bool(layout.names)
        text = (f"{who} did not learn: {why}. Try a larger --lr (now {self.cfg.lr:g}), another --init (vocab, text, "
                "labels or demos), more --num-tokens or --method prefix; the best prompt is saved all the same.")  # fmt: skip
        tqdm.write(f"warning: {text}", file=sys.stderr)
        self.log.append({"step": self.state.step, **(layout.record_tag(name) if name else {}), "warning": text})

    def summary(self, name: str) -> dict:
        """Prompt `name`'s training summary so far: its best step and result, the template's alone beside it and
        whether the prompt beat it, the settings, how the run was spread."""
        step = self.state.best[name][1] if name in self.state.best else None
        valid, template = self.log.valid_result(name, step), self.log.valid_result(name, 0, "template")
        key = lambda result: selection_key(result, self.cfg.select_by)  # noqa: E731
        beat = improves(key(valid), key(template)) if valid and template else None
        demonstrations = len(self.prompts.prompts[name].demo_slots)  # init=demos: how many examples it started as
        extra = {"demonstrations": demonstrations} if demonstrations else {}
        if self.tasks[name].held_out:  # validation drawn from the training data given
            extra["held_out"] = self.tasks[name].held_out
        if self.cfg.compile:  # graphs compiled since the run started (each shape or grad mode dynamo specialized on)
            extra["compiled_graphs"] = compiled_graphs() - self.graphs_before
        return {"best_step": step, **extra, "valid": valid, "template_valid": template or None, "beat_template": beat,
                **to_dict(self.cfg), "processes": self.world, "model_sharded": self.sharded,
                "frozen_parameters_per_process": self.frozen_held, **self.layout.summary_tag(name)}  # fmt: skip

    def checkpoint(self, finished: bool = False) -> Path | None:
        """Write a checkpoint at the current step (main process only; None elsewhere)."""
        if not self.main:
            return None
        return save_run(self.layout.out_dir, self.state, self.identity, self.prompts, self.optimizer, self.scheduler,
                        finished)  # fmt: skip

    def finish(self) -> dict[str, Run]:
        """Write each prompt's best one (its last one without validation data) as its artifact, with the run's
        summary; then the final checkpoint and the loss plot."""
        state = self.state
        for name in self.tasks:  # a task without validation data keeps its last prompt
            if name not in self.valid:
                state.best[name] = ((), state.step, self.prompts.prompts[name].artifact_tensors())
        state.best = broadcast_object_list([state.best])[0]  # only the main process validated
        runs = {}
        for name, data in self.tasks.items():
            summary = self.summary(name)
            summary.update(last_step=state.dropped.get(name, state.step), stopped_early=state.stopped_early,
                           seconds=round(time.perf_counter() - self.started, 1))  # fmt: skip
            best_method = methods.from_tensors(self.prompts.prompts[name].config, self.backbone, state.best[name][2])
            if self.main:
                artifact.save(self.layout.artifact_dir(name), best_method, data.task.config, self.backbone,
                              training=summary)  # fmt: skip
            runs[name] = Run(best_method, summary)
        if self.main:
            self.checkpoint(finished=True)
            plot_losses(self.log.records, self.layout.out_dir / "loss.png")
        self.accelerator.wait_for_everyone()
        return runs


def _diverged(loss: float, grad_norm: float, lr: float, step: int, cfg: TrainConfig, out_dir: Path) -> SoftPromptError:
    """The error for a non-finite loss or gradient at `step`, pointing at what survives it."""
    last_good = latest_checkpoint(out_dir)
    what = f"loss became {loss}" if not math.isfinite(loss) else (
        f"gradient norm became {grad_norm} (loss {loss:.4g})")  # fmt: skip
    return SoftPromptError(
        f"The training {what} at step {step} (learning rate {lr:.3g}); training stopped. The best prompt so far "
        f"stays in {out_dir}"
        + (f", and the last good checkpoint is {last_good}" if last_good else "")
        + f". Try a lower --lr (now {cfg.lr}), more --warmup-steps, or --max-grad-norm 1.0."
    )
