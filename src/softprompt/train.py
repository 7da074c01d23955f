"""One flat training loop: batch -> forward -> loss -> backward -> clip -> step -> log -> eval/save.

Only the prompt method's parameters reach the optimizer; the base model was frozen once by Backbone. The
artifact written to `out_dir` is always the best prompt seen on the validation set (the last one without one).

Runs unchanged under `accelerate launch`: every process draws the same global batch from the seeded data order and
trains on its own slice of it; the prompt's gradients are averaged across processes (DDP over the prompt module
only); the main process validates, logs and writes. Checkpoints hold everything needed to continue exactly, and
SIGTERM/SIGINT write one before the run stops.
"""

from __future__ import annotations

import contextlib
import copy
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration, broadcast_object_list
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.optimization import Adafactor

from . import artifact, methods, trackers
from .backbones import Backbone
from .checkpoint import data_fingerprint, latest_checkpoint, resume_state, save_checkpoint
from .config import PromptConfig, TrainConfig, to_dict
from .data import Example, Task, collate
from .errors import SoftPromptError
from .evaluate import evaluate
from .interruption import TrainingInterrupted, signals_caught
from .run_files import Layout, MetricsLog, RunState, plot_losses


@dataclass
class Run:
    """What a training run returns."""

    method: methods.PromptMethod
    """The best prompt (loaded back from the artifact)."""
    summary: dict
    """Also stored in the artifact's config.json under `training`."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def make_optimizer(params, config: TrainConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        return Adafactor(
            params, lr=config.lr, weight_decay=config.weight_decay,
            scale_parameter=False, relative_step=False, warmup_init=False,
        )
    return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)


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
    kv: torch.Tensor,
    examples: list[Example],
    normalizer: float | None = None,
    prefix_mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, int]:
    """Cross-entropy summed over the examples' target tokens (full vocabulary, the head run only at those positions)
    and divided by `normalizer` (default: their count, i.e. the mean). Returns it and the batch's real (non-pad)
    token count.
    kv: a shared prefix (or a soft prompt's embeddings, `train_prefix`), or one per row with its `prefix_mask` (see
    `row_prefixes`)."""
    batch = collate(examples, backbone.pad_id).to(backbone.device)
    hidden = backbone.target_hidden(batch, kv, prefix_mask)  # (K, hidden)
    logits = backbone.logits(hidden)  # (K, vocab)
    total = F.cross_entropy(logits, batch.loss_tokens, reduction="sum")
    return total / (normalizer or len(batch.loss_tokens)), batch.num_input_tokens


Objective = Callable[..., tuple[torch.Tensor, int]]
"""A batch's loss with `loss_on`'s signature: (backbone, kv, examples, normalizer, prefix_mask) -> (loss, tokens)."""


def selection_key(result: dict) -> tuple:
    """Higher is better: accuracy then gold-label log-probability (classification), or -loss (generation)."""
    if "accuracy" in result:
        return (result["accuracy"], result["gold_logprob"])
    return (-result["loss"],)


def improves(key: tuple, best: tuple) -> bool:
    """Whether a validation result with selection key `key` replaces the best one: strictly higher, and never
    with a non-finite value (a diverging prompt's NaN log-probability must not win on its accuracy)."""
    finite = lambda k: all(map(math.isfinite, k))  # noqa: E731
    return finite(key) and (key > best or not finite(best))


@dataclass
class TaskData:
    """One task of a run: how records become examples, its data, and optionally a prompt to start from."""

    task: Task
    train: list[Example]
    valid: list[Example] = field(default_factory=list)
    init: methods.PromptMethod | None = None
    """Start from this prompt (e.g. a trained one: transfer) instead of building one from the prompt config."""


@dataclass(frozen=True)
class Halving:
    """Candidate prompts for one task trained side by side (`search.py`): each reads the same batches with its own
    learning rate and its own gradient clipping, so each trains exactly as it would alone; at each rung step the
    lower-scoring half on validation stops training (successive halving)."""

    lrs: dict[str, float]
    rungs: tuple[int, ...]


class PromptSet(nn.Module):
    """The prompts of a run, one per task; one module, so one optimizer and one DDP wrapper cover them all."""

    def __init__(self, prompts: dict[str, methods.PromptMethod]):
        super().__init__()
        self.prompts = nn.ModuleDict(prompts)

    def forward(self, backbone: Backbone, names: set[str]) -> dict[str, torch.Tensor]:
        """What each named task's prompt hands the backbone (`train_prefix`; only those named)."""
        return {name: self.prompts[name].train_prefix(backbone) for name in names}


def row_prefixes(backbone: Backbone, kvs: dict[str, torch.Tensor], names: list[str]):
    """The prefix for a batch whose rows belong to `names`' tasks (or candidates): that one prompt's `train_prefix`
    (no mask) when they are all one, else K/V with a mask saying which slots each row sees (`side_by_side`)."""
    if len(set(names)) == 1:
        return kvs[names[0]], None
    return backbone.side_by_side([kvs[name] for name in names])


def train(
    backbone: Backbone,
    task: Task,
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
    data = TaskData(task, train_examples, valid_examples or [], init_method)
    return _train(backbone, {"prompt": data}, prompt_config, train_config, Layout(Path(out_dir)), progress,
                  resume, objective or loss_on)["prompt"]  # fmt: skip


def train_multitask(
    backbone: Backbone,
    tasks: dict[str, TaskData],
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
    return _train(backbone, tasks, prompt_config, train_config, Layout(Path(out_dir), tuple(sorted(tasks))), progress,
                  resume)  # fmt: skip


def _train(
    backbone: Backbone,
    tasks: dict[str, TaskData],
    prompt_config: PromptConfig,
    cfg: TrainConfig,
    layout: Layout,
    progress: bool,
    resume: bool,
    objective: Objective | None = None,
    halving: Halving | None = None,
) -> dict[str, Run]:
    """The run behind all three (one task, several tasks, several candidates for one task): set-up in order (every
    check before the model moves; the seed right before the prompts are built), the loop (`_Trainer.fit`), then
    each task's (or candidate's) best prompt written as its artifact."""
    several = len(tasks) > 1  # a batch may leave some prompts unused: DDP must not wait for their gradients
    accelerator = _setup_accelerator(several, cfg.report_to, layout.out_dir)
    _check_data(tasks, cfg, accelerator.num_processes)
    data_id = data_fingerprint(tasks)
    saved = _saved_state(layout.out_dir, prompt_config, cfg, data_id, resume)
    sharded, frozen_held = _setup_model(backbone, cfg, accelerator)
    seed_everything(cfg.seed)
    prompts = _setup_prompts(backbone, tasks, prompt_config, cfg.seed, accelerator.device)
    model, optimizer, scheduler = _setup_optimizer(prompts, cfg, accelerator, sharded, several,
                                                   halving.lrs if halving else None)  # fmt: skip
    run = _Trainer(backbone, tasks, prompt_config, cfg, layout, accelerator, data_id, sharded, frozen_held, prompts,
                   model, optimizer, scheduler, objective or loss_on, halving)  # fmt: skip
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


def _setup_accelerator(find_unused: bool, report_to: str, out_dir: Path) -> Accelerator:
    """The accelerator, with the experiment trackers `report_to` names (checked here, so a missing package stops
    the run before anything else; `trackers.start` starts them)."""
    # Without CUDA, processes started by `accelerate launch`/torchrun train on the CPU and synchronise over gloo.
    return Accelerator(cpu=not torch.cuda.is_available(),
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
                       log_with=trackers.resolve(report_to) or None,
                       project_config=ProjectConfiguration(project_dir=str(out_dir),
                                                           logging_dir=str(trackers.tensorboard_dir(out_dir))))


def _check_data(tasks: dict[str, TaskData], cfg: TrainConfig, world: int) -> None:
    """Refuse what cannot make one global batch, split evenly over processes and accumulation steps."""
    if cfg.batch_size % (world * cfg.grad_accum):
        raise SoftPromptError(
            f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum = {world} x {cfg.grad_accum}."
        )
    empty = [name for name, data in tasks.items() if not data.train]
    if empty:
        raise SoftPromptError(f"no training examples for {', '.join(empty)}: the training data is empty.")
    available = sum(len(data.train) for data in tasks.values())
    if available < cfg.batch_size:
        raise SoftPromptError(f"the training data has {available} examples, fewer than one batch of "
                              f"{cfg.batch_size}; lower --batch-size or add data.")  # fmt: skip


def _saved_state(out_dir: Path, prompt_config: PromptConfig, cfg: TrainConfig, data_id: str,
                 resume: bool) -> dict | None:  # fmt: skip
    """The checkpoint to resume from (checked to belong to this run), if any; a new run must not overwrite one."""
    saved = resume_state(out_dir, prompt_config, cfg, data_id) if resume else None
    if not resume and latest_checkpoint(out_dir):
        raise SoftPromptError(
            f"{out_dir} already holds a run (checkpoint {latest_checkpoint(out_dir).name}); pass --resume to "
            "continue it, or choose another --out."
        )
    return saved


def _setup_model(backbone: Backbone, cfg: TrainConfig, accelerator: Accelerator) -> tuple[bool, int]:
    """Put the frozen model on this process's device, whole or sharded; returns whether it is sharded and how many
    of its parameters this process holds."""
    # Sharding the frozen layers (FSDP2) starts from the CPU copy, so no device ever holds the whole model.
    sharded = accelerator.num_processes > 1 and (
        cfg.shard_model or accelerator.distributed_type == DistributedType.FSDP)  # fmt: skip
    if sharded:
        frozen_held = backbone.shard_layers(accelerator.device)
    else:
        backbone.model.to(accelerator.device)
        frozen_held = sum(p.numel() for p in backbone.model.parameters())
    backbone.gradient_checkpointing(cfg.gradient_checkpointing)
    return sharded, frozen_held


def _setup_prompts(backbone: Backbone, tasks: dict[str, TaskData], prompt_config: PromptConfig, seed: int,
                   device: torch.device) -> PromptSet:  # fmt: skip
    """Each task's starting prompt: a copy of its `init`, or a new one drawn from one seeded generator in task
    order."""
    generator = torch.Generator().manual_seed(seed)
    return PromptSet({
        name: copy.deepcopy(data.init) if data.init else methods.build(prompt_config, backbone,
                                                                      data.task.config.labels, generator)
        for name, data in tasks.items()
    }).to(device)  # fmt: skip


def _setup_optimizer(prompts: PromptSet, cfg: TrainConfig, accelerator: Accelerator, sharded: bool,
                     find_unused: bool, lrs: dict[str, float] | None) -> tuple[nn.Module, torch.optim.Optimizer,
                                                                              LRScheduler]:  # fmt: skip
    """The optimizer over the prompts (one parameter group per prompt when `lrs` gives each its own learning rate;
    the schedule scales every group alike), its learning-rate schedule, and the prompts as the model to run
    (replicated across processes)."""
    params = prompts.parameters() if lrs is None else [
        {"params": list(prompts.prompts[name].parameters()), "lr": lr} for name, lr in lrs.items()]  # fmt: skip
    optimizer = make_optimizer(params, cfg)
    # Not prepared by accelerate: its wrapper would step once per process; `steps` counts global optimizer steps.
    scheduler = get_scheduler(
        cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup",
        optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps,
    )
    if sharded:  # only the prompt module is replicated: our DDP over it, never accelerate's FSDP wrapping of it
        model = DistributedDataParallel(prompts, find_unused_parameters=find_unused)
    else:  # accelerate: DDP across processes, or the module as it is
        model, optimizer = accelerator.prepare(prompts, optimizer)
    return model, optimizer, scheduler


@dataclass
class _Trainer:
    """A set-up run: the loop (`fit`) and what it calls each step, validation with keep-best, checkpoints, and the
    final artifacts. Its progress is `state`; every process runs it, only the main one validates (unless sharded),
    logs and writes."""

    backbone: Backbone
    tasks: dict[str, TaskData]
    prompt_config: PromptConfig
    cfg: TrainConfig
    layout: Layout
    accelerator: Accelerator
    data_id: str
    sharded: bool
    frozen_held: int
    """Parameters of the frozen model this process holds."""
    prompts: PromptSet
    model: nn.Module
    """`prompts` as run: wrapped for DDP across processes (or the module itself in one process)."""
    optimizer: torch.optim.Optimizer
    scheduler: LRScheduler
    objective: Objective
    halving: Halving | None = None

    def __post_init__(self) -> None:
        acc, cfg = self.accelerator, self.cfg
        self.world, self.rank, self.main = acc.num_processes, acc.process_index, acc.is_main_process
        self.valid = {name: data.valid[: cfg.eval_size] for name, data in self.tasks.items() if data.valid}
        # Global batches of (task name, example) pairs; candidates share one task's data, and each of their batches
        # is given to every candidate still training (`rows_of`).
        pool = [(name, e) for name, data in self.tasks.items() for e in data.train]
        if self.halving:
            pool = [(None, e) for e in next(iter(self.tasks.values())).train]
        self.order = BatchOrder(pool, cfg.batch_size, cfg.seed)
        self.shard = cfg.batch_size // self.world  # this process's rows of each global batch
        self.micro = self.shard // cfg.grad_accum
        self.log = MetricsLog(self.layout.out_dir / "metrics.jsonl", self.main,
                              forward=lambda record: trackers.log(acc, record))  # fmt: skip
        self.state = RunState(evals_without_gain=dict.fromkeys(self.tasks, 0))
        self.started = time.perf_counter()

    @property
    def live(self) -> list[str]:
        """The tasks or candidates still training (a candidate leaves at a rung of the halving, or on diverging)."""
        return [name for name in self.tasks if name not in self.state.dropped]

    def rows_of(self, pairs: list[tuple[str | None, Example]]) -> list[tuple[str, Example]]:
        """The rows a slice of a global batch runs as: its own, or each candidate still training on all of them."""
        return [(name, e) for name in self.live for _, e in pairs] if self.halving else pairs

    def restore(self, saved: dict) -> None:
        """Continue from checkpoint `saved`: module, optimizer, schedule and random states, progress, and the log."""
        self.prompts.load_state_dict(saved["prompts"])
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["python_rng"])
        self.state = RunState.from_checkpoint(saved)
        self.log.reload(until_step=self.state.step)
        if self.main:
            tqdm.write(f"resuming from {latest_checkpoint(self.layout.out_dir)} (step {self.state.step} of "
                       f"{self.cfg.steps})", file=sys.stderr)  # fmt: skip

    def fit(self, progress: bool) -> None:
        """Train until `steps`, an early stop, or a signal (which writes a checkpoint and raises)."""
        cfg, state, acc = self.cfg, self.state, self.accelerator
        first = state.next_step(cfg.steps)
        bar = tqdm(range(first, cfg.steps + 1), desc="training", disable=not (progress and self.main),
                   initial=first - 1, total=cfg.steps)  # fmt: skip
        try:
            with signals_caught() as caught:
                for step in bar:
                    state.step, step_started = step, time.perf_counter()
                    batch = self.order[step - 1]  # (task name, example) pairs
                    if self.halving:
                        self.drop_non_finite()
                    readers = len(self.live) if self.halving else 1  # candidates reading this batch
                    local_loss = self.forward_backward(batch)
                    state.tokens_seen += readers * sum(len(e.input_ids) + len(e.target_ids) for _, e in batch)
                    # One collective per step: the global loss, and whether any process was asked to stop.
                    stop_flag = local_loss.new_tensor(float(bool(caught)))
                    loss, stop_requested = acc.reduce(torch.stack([local_loss, stop_flag]), "sum").tolist()
                    # A finite loss can still have a non-finite gradient (an overflow in the backward pass): stepping
                    # on it would make the prompt NaN, and then the best one and every later checkpoint.
                    grad_norm = self.clip()
                    lr = self.scheduler.get_last_lr()[0]  # what this step applies (after scheduler.step: the next's)
                    # Candidates: one that diverged has left in clip(); the run fails only when all have.
                    if not (math.isfinite(grad_norm) and (self.halving or math.isfinite(loss))):
                        raise self.diverged(loss, grad_norm, lr)
                    loss /= readers  # candidates: the mean of their losses
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad(set_to_none=True)
                    state.train_seconds += time.perf_counter() - step_started
                    self.log.append({"step": step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                                     "tokens_per_s": round(state.tokens_seen / state.train_seconds, 1),
                                     **({"candidates": readers} if self.halving else {})})  # fmt: skip
                    bar.set_postfix(loss=f"{loss:.4f}")

                    rung = self.halving is not None and step in self.halving.rungs
                    evaluating = self.valid and (step == cfg.steps or rung or (cfg.eval_every
                                                                               and step % cfg.eval_every == 0))
                    state.stopped_early = bool(evaluating) and self.validate(step)
                    if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                        self.checkpoint()
                    # Several processes decide together (a signal that reached one stops them all), one alone at once.
                    if stop_requested or (self.world == 1 and caught):
                        raise self.interrupted(caught[0] if caught else signal.SIGTERM)
                    if state.stopped_early:
                        break
        finally:
            bar.close()
            self.backbone.gradient_checkpointing(False)

    def forward_backward(self, batch: list[tuple[str, Example]]) -> torch.Tensor:
        """Forward and backward over this process's rows of the global `batch`, `grad_accum` micro-batches
        (gradients synchronised on the last only); returns its share of the global mean loss (a 0-d tensor)."""
        rows = batch[self.rank * self.shard : (self.rank + 1) * self.shard]
        # Every process knows the whole global batch, so each divides its summed loss by the global target count
        # (times `world`, which DDP's gradient averaging undoes): the gradient of the global mean.
        normalizer = sum(len(e.target_ids) for _, e in batch) / self.world
        acc, backbone = self.accelerator, self.backbone
        total = torch.zeros((), device=acc.device)
        for start in range(0, self.shard, self.micro):
            names, examples = zip(*self.rows_of(rows[start : start + self.micro]))
            last = start + self.micro >= self.shard
            with contextlib.nullcontext() if last else acc.no_sync(self.model), acc.autocast():
                # Each prompt's prefix (prompt tuning: its embeddings), once per micro-batch, shared by its task's rows.
                kv, prefix_mask = row_prefixes(backbone, self.model(backbone, set(names)), list(names))
                loss, _ = self.objective(backbone, kv, list(examples), normalizer, prefix_mask)
                acc.backward(loss)
            total += loss.detach() / self.world
        return total

    def clip(self) -> float:
        """Clip the gradients to `max_grad_norm` and return their norm before clipping: of all prompts together, or
        each candidate's own (so each is clipped as it would be alone). A candidate whose gradient is not finite
        leaves the run (the others go on); the norm returned is the largest of those still training."""
        limit = self.cfg.max_grad_norm or float("inf")
        if not self.halving:
            return float(self.accelerator.clip_grad_norm_(self.model.parameters(), limit))
        self.accelerator.unscale_gradients()
        norms = {name: float(nn.utils.clip_grad_norm_(self.prompts.prompts[name].parameters(), limit))
                 for name in self.live}  # fmt: skip
        finite = [norm for norm in norms.values() if math.isfinite(norm)]
        for name in [name for name, norm in norms.items() if not math.isfinite(norm)] if finite else []:
            self.drop(name, "its gradient is not finite")
        return max(finite, default=float("nan"))

    def drop_non_finite(self) -> None:
        """Candidates share one prefix in a batch (`side_by_side`), where a NaN slot would reach every row through
        the attention's zero weights: one holding non-finite values (a poisoned init or resumed state) leaves
        before it runs."""
        for name in self.live:
            if not all(bool(p.isfinite().all()) for p in self.prompts.prompts[name].parameters()):
                self.drop(name, "it holds non-finite values")

    def drop(self, name: str, why: str) -> None:
        """Candidate `name` stops training here (the others go on)."""
        self.state.dropped[name] = self.state.step
        self.prompts.prompts[name].zero_grad(set_to_none=True)  # the optimizer skips it from now on
        if self.main:
            tqdm.write(f"candidate {name} stops at step {self.state.step}: {why}.", file=sys.stderr)

    def diverged(self, loss: float, grad_norm: float, lr: float) -> SoftPromptError:
        """The error for a non-finite loss or gradient at this step, pointing at what survives it."""
        last_good, out_dir, cfg = latest_checkpoint(self.layout.out_dir), self.layout.out_dir, self.cfg
        what = f"loss became {loss}" if not math.isfinite(loss) else (
            f"gradient norm became {grad_norm} (loss {loss:.4g})")  # fmt: skip
        return SoftPromptError(
            f"The training {what} at step {self.state.step} (learning rate {lr:.3g}); training stopped. The best "
            f"prompt so far stays in {out_dir}"
            + (f", and the last good checkpoint is {last_good}" if last_good else "")
            + f". Try a lower --lr (now {cfg.lr}), more --warmup-steps, or --max-grad-norm 1.0."
        )

    def interrupted(self, number: int) -> TrainingInterrupted:
        """Write a checkpoint (main process) and return the error that ends the run for signal `number`."""
        path = self.checkpoint()
        return TrainingInterrupted(
            f"{signal.Signals(number).name} received: stopped after step {self.state.step}"
            + (f", checkpoint written to {path}" if path else "")
            + ". Run the same command with --resume to continue.",
            number,
        )

    def validate(self, step: int) -> bool:
        """Validate each task (or candidate still training) on the main process (on every process when the layers
        are sharded: their forwards gather weights together), keeping each one's best prompt; at a rung of the
        halving, drop the lower-scoring half. True when training should stop early: none improved for `patience`
        evaluations (the main process decides for all)."""
        state, cfg = self.state, self.cfg
        stop, results = [False], {}
        if self.main or self.sharded:
            with torch.no_grad(), self.accelerator.autocast():
                results = {name: evaluate(self.backbone, self.tasks[name].task, self.valid[name],
                                          self.prompts.prompts[name].kv(self.backbone))
                           for name in self.live if name in self.valid}  # fmt: skip
        if self.main:
            for name, result in results.items():
                prompt = self.prompts.prompts[name]
                self.log.append({"step": step, **self.layout.record_tag(name), "valid": result})
                key = selection_key(result)
                if name not in state.best or improves(key, state.best[name][0]):
                    state.best[name], state.evals_without_gain[name] = (key, step, prompt.artifact_tensors()), 0
                    artifact.save(self.layout.artifact_dir(name), prompt, self.tasks[name].task.config, self.backbone,
                                  training=self.summary(name))  # fmt: skip
                else:
                    state.evals_without_gain[name] += 1
            if self.halving and step in self.halving.rungs:
                self.halve(step)
            stop = [bool(cfg.patience) and all(state.evals_without_gain[n] >= cfg.patience
                                               for n in self.live if n in self.valid)]  # fmt: skip
        stop, state.dropped = broadcast_object_list([stop[0], state.dropped])
        return stop

    def halve(self, step: int) -> None:
        """Keep the better half (rounded up) of the candidates still training, ranked by their best validation
        result so far (ties: the earlier candidate); the rest stop here."""
        ranked = sorted(self.live, key=lambda name: self.state.best[name][0], reverse=True)
        for name in ranked[(len(ranked) + 1) // 2 :]:
            self.state.dropped[name] = step
        if self.main:
            tqdm.write(f"step {step}: {len(ranked)} -> {(len(ranked) + 1) // 2} candidates (kept: "
                       f"{', '.join(n for n in self.live)})", file=sys.stderr)  # fmt: skip

    def summary(self, name: str) -> dict:
        """Task `name`'s training summary so far: its best step and result, the settings, how the run was spread."""
        step = self.state.best[name][1] if name in self.state.best else None
        return {"best_step": step, "valid": self.log.valid_result(name, step), **to_dict(self.cfg),
                "processes": self.world, "model_sharded": self.sharded,
                "frozen_parameters_per_process": self.frozen_held, **self.layout.summary_tag(name)}  # fmt: skip

    def checkpoint(self, finished: bool = False) -> Path | None:
        """Write a checkpoint at the current step (main process only; None elsewhere)."""
        if not self.main:
            return None
        modules = {"prompts": {k: v.detach().clone() for k, v in self.prompts.state_dict().items()},
                   "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                   "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}  # fmt: skip
        identity = {"prompt_config": to_dict(self.prompt_config), "train_config": to_dict(self.cfg),
                    "data": self.data_id}  # fmt: skip
        return save_checkpoint(self.layout.out_dir, self.state.step,
                               self.state.to_checkpoint(modules, identity, finished))  # fmt: skip

    def finish(self) -> dict[str, Run]:
        """Write each task's best prompt (its last one without validation data) as its artifact, with the run's
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
