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
import json
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, broadcast_object_list
from tqdm.auto import tqdm
from transformers import get_scheduler
from transformers.optimization import Adafactor

from . import artifact, methods
from .backbone import Backbone
from .checkpoint import data_fingerprint, latest_checkpoint, resume_state, save_checkpoint
from .config import PromptConfig, TrainConfig, to_dict
from .data import Example, Task, collate
from .errors import SoftPromptError
from .evaluate import evaluate
from .interruption import TrainingInterrupted, signals_caught


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
    kv: a shared prefix, or one per row with its `prefix_mask` (see `row_prefixes`)."""
    batch = collate(examples, backbone.pad_id).to(backbone.device)
    hidden = backbone.target_hidden(batch, kv, prefix_mask)  # (K, hidden)
    logits = backbone.logits(hidden)  # (K, vocab)
    total = F.cross_entropy(logits, batch.loss_tokens, reduction="sum")
    return total / (normalizer or len(batch.loss_tokens)), batch.num_input_tokens


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


class PromptSet(nn.Module):
    """The prompts of a run, one per task; one module, so one optimizer and one DDP wrapper cover them all."""

    def __init__(self, prompts: dict[str, methods.PromptMethod]):
        super().__init__()
        self.prompts = nn.ModuleDict(prompts)

    def forward(self, backbone: Backbone, names: set[str]) -> dict[str, torch.Tensor]:
        """The K/V prefix of each named task's prompt (only those: prompt tuning runs the model for each)."""
        return {name: self.prompts[name].kv(backbone) for name in names}


def row_prefixes(backbone: Backbone, kvs: dict[str, torch.Tensor], names: list[str]):
    """The prefix for a batch whose rows belong to `names`' tasks: shared (5-D, no mask) when they are all one task,
    else per row, shorter prefixes left-padded with masked slots."""
    if len(set(names)) == 1:
        return kvs[names[0]], None
    return backbone.stack_prefixes([kvs[name] for name in names])


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
) -> Run:
    """Train one prompt for one task; `out_dir` becomes its artifact (plus log, plot and checkpoints)."""
    data = TaskData(task, train_examples, valid_examples or [], init_method)
    return _train(backbone, {"prompt": data}, prompt_config, train_config, Path(out_dir), progress, resume,
                  single=True)["prompt"]


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
    return _train(backbone, tasks, prompt_config, train_config, Path(out_dir), progress, resume, single=False)


def _train(
    backbone: Backbone,
    tasks: dict[str, TaskData],
    prompt_config: PromptConfig,
    cfg: TrainConfig,
    out_dir: Path,
    progress: bool,
    resume: bool,
    single: bool,
) -> dict[str, Run]:
    """The loop behind both: `single` runs write their one artifact into `out_dir` itself."""
    # Without CUDA, processes started by `accelerate launch`/torchrun train on the CPU and synchronise over gloo.
    accelerator = Accelerator(cpu=not torch.cuda.is_available(),
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=len(tasks) > 1)])
    world, rank, main = accelerator.num_processes, accelerator.process_index, accelerator.is_main_process
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
    data_id = data_fingerprint(tasks)
    state = resume_state(out_dir, prompt_config, cfg, data_id) if resume else None
    if not resume and latest_checkpoint(out_dir):
        raise SoftPromptError(
            f"{out_dir} already holds a run (checkpoint {latest_checkpoint(out_dir).name}); pass --resume to "
            "continue it, or choose another --out."
        )
    artifact_dir = {name: out_dir if single else out_dir / name for name in tasks}
    # Sharding the frozen layers (FSDP2) starts from the CPU copy, so no device ever holds the whole model.
    sharded = world > 1 and (cfg.shard_model or accelerator.distributed_type == DistributedType.FSDP)
    if sharded:
        frozen_held = backbone.shard_layers(accelerator.device)
    else:
        backbone.model.to(accelerator.device)
        frozen_held = sum(p.numel() for p in backbone.model.parameters())
    backbone.gradient_checkpointing(cfg.gradient_checkpointing)
    seed_everything(cfg.seed)
    generator = torch.Generator().manual_seed(cfg.seed)
    prompts = PromptSet({
        name: copy.deepcopy(data.init) if data.init else methods.build(prompt_config, backbone,
                                                                      data.task.config.labels, generator)
        for name, data in tasks.items()
    }).to(accelerator.device)  # fmt: skip
    optimizer = make_optimizer(prompts.parameters(), cfg)
    # Not prepared by accelerate: its wrapper would step once per process; `steps` counts global optimizer steps.
    scheduler = get_scheduler(
        cfg.schedule if cfg.schedule != "constant" else "constant_with_warmup",
        optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=cfg.steps,
    )
    if sharded:  # only the prompt module is replicated: our DDP over it, never accelerate's FSDP wrapping of it
        model = DistributedDataParallel(prompts, find_unused_parameters=len(tasks) > 1)
    else:  # accelerate: DDP across processes, or the module as it is
        model, optimizer = accelerator.prepare(prompts, optimizer)
    valid = {name: data.valid[: cfg.eval_size] for name, data in tasks.items() if data.valid}
    mixture = [(name, example) for name, data in tasks.items() for example in data.train]
    order = BatchOrder(mixture, cfg.batch_size, cfg.seed)
    shard = cfg.batch_size // world  # this process's rows of each global batch
    micro = shard // cfg.grad_accum
    log_path = out_dir / "metrics.jsonl"
    history: list[dict] = []
    best: dict[str, tuple] = {}  # per task: selection key, step, artifact tensors
    evals_without_gain = dict.fromkeys(tasks, 0)
    first_step, stopped_early, tokens_seen, train_seconds, started = 1, False, 0, 0.0, time.perf_counter()

    if state:
        prompts.load_state_dict(state["prompts"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate(state["python_rng"])
        best, evals_without_gain, stopped_early = state["best"], state["evals_without_gain"], state["stopped_early"]
        first_step = cfg.steps + 1 if stopped_early or state["step"] >= cfg.steps else state["step"] + 1
        tokens_seen, train_seconds = state["tokens_seen"], state["train_seconds"]
        if main and log_path.is_file():  # as it was at the checkpoint (only the main process touches the log)
            history = [json.loads(line) for line in log_path.read_text(encoding="utf-8").splitlines() if line]
            history = [r for r in history if r["step"] <= state["step"]]
        if main:
            tqdm.write(f"resuming from {latest_checkpoint(out_dir)} (step {state['step']} of {cfg.steps})",
                       file=sys.stderr)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
        log_path.write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")

    def log(record: dict) -> None:
        history.append(record)
        if main:
            with log_path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def training_summary(name: str) -> dict:
        step = best[name][1] if name in best else None
        result = next((r["valid"] for r in history if r["step"] == step and r.get("task", name) == name
                       and "valid" in r), {})  # fmt: skip
        return {"best_step": step, "valid": result, **to_dict(cfg), "processes": world, "model_sharded": sharded,
                "frozen_parameters_per_process": frozen_held,
                **({} if single else {"task": name, "tasks": sorted(tasks)})}  # fmt: skip

    def validate_and_keep_best(step: int) -> bool:
        """Validate each task on the main process (on every process when the layers are sharded: their forwards
        gather weights together), keeping each task's best prompt; True when training should stop early: no task
        improved for `patience` evaluations (the main process decides for all)."""
        stop = [False]
        results = {}
        if main or sharded:
            with torch.no_grad(), accelerator.autocast():
                results = {name: evaluate(backbone, tasks[name].task, examples, prompts.prompts[name].kv(backbone))
                           for name, examples in valid.items()}  # fmt: skip
        if main:
            for name, result in results.items():
                prompt = prompts.prompts[name]
                log({"step": step, **({} if single else {"task": name}), "valid": result})
                key = selection_key(result)
                if name not in best or improves(key, best[name][0]):
                    best[name], evals_without_gain[name] = (key, step, prompt.artifact_tensors()), 0
                    artifact.save(artifact_dir[name], prompt, tasks[name].task.config, backbone,
                                  training=training_summary(name))  # fmt: skip
                else:
                    evals_without_gain[name] += 1
            stop = [bool(cfg.patience) and all(evals_without_gain[n] >= cfg.patience for n in valid)]
        return broadcast_object_list(stop)[0]

    def checkpoint(step: int, finished: bool = False) -> Path | None:
        if not main:
            return None
        return save_checkpoint(out_dir, step, {
            "prompts": {k: v.detach().clone() for k, v in prompts.state_dict().items()},
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "torch_rng": torch.get_rng_state(), "python_rng": random.getstate(), "batches_consumed": step,
            "best": best, "evals_without_gain": evals_without_gain, "tokens_seen": tokens_seen,
            "train_seconds": train_seconds, "prompt_config": to_dict(prompt_config), "train_config": to_dict(cfg),
            "data": data_id, "finished": finished, "stopped_early": stopped_early,
        })  # fmt: skip

    if valid and state is None:
        validate_and_keep_best(0)

    step = state["step"] if state else 0
    bar = tqdm(range(first_step, cfg.steps + 1), desc="training", disable=not (progress and main),
               initial=first_step - 1, total=cfg.steps)  # fmt: skip
    try:
        with signals_caught() as caught:
            for step in bar:
                step_started = time.perf_counter()
                batch = order[step - 1]  # (task name, example) pairs
                rows = batch[rank * shard : (rank + 1) * shard]
                # Every process knows the whole global batch, so each divides its summed loss by the global target
                # count (times `world`, which DDP's gradient averaging undoes): the gradient of the global mean.
                normalizer = sum(len(e.target_ids) for _, e in batch) / world
                step_loss = torch.zeros((), device=accelerator.device)
                for start in range(0, shard, micro):
                    names, examples = zip(*rows[start : start + micro])
                    last = start + micro >= shard
                    with contextlib.nullcontext() if last else accelerator.no_sync(model), accelerator.autocast():
                        # Each prompt's K/V, once per micro-batch, shared by the rows of its task.
                        kv, prefix_mask = row_prefixes(backbone, model(backbone, set(names)), list(names))
                        loss, _ = loss_on(backbone, kv, list(examples), normalizer, prefix_mask)
                        accelerator.backward(loss)
                    step_loss += loss.detach() / world
                tokens_seen += sum(len(e.input_ids) + len(e.target_ids) for _, e in batch)
                # One collective per step: the global loss, and whether any process was asked to stop.
                totals = accelerator.reduce(torch.stack([step_loss, step_loss.new_tensor(float(bool(caught)))]), "sum")
                step_loss, stop_requested = totals.tolist()
                # A finite loss can still have a non-finite gradient (an overflow in the backward pass): stepping on
                # it would make the prompt NaN, and then the best one and every later checkpoint.
                grad_norm = float(accelerator.clip_grad_norm_(model.parameters(), cfg.max_grad_norm or float("inf")))
                lr = scheduler.get_last_lr()[0]  # what this step applies (after scheduler.step: the next step's)
                if not (math.isfinite(step_loss) and math.isfinite(grad_norm)):
                    last_good = latest_checkpoint(out_dir)
                    what = f"loss became {step_loss}" if not math.isfinite(step_loss) else (
                        f"gradient norm became {grad_norm} (loss {step_loss:.4g})")  # fmt: skip
                    raise SoftPromptError(
                        f"The training {what} at step {step} (learning rate {lr:.3g}); training stopped. The best "
                        f"prompt so far stays in {out_dir}"
                        + (f", and the last good checkpoint is {last_good}" if last_good else "")
                        + f". Try a lower --lr (now {cfg.lr}), more --warmup-steps, or --max-grad-norm 1.0."
                    )
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                train_seconds += time.perf_counter() - step_started
                log({"step": step, "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                     "tokens_per_s": round(tokens_seen / train_seconds, 1)})  # fmt: skip
                bar.set_postfix(loss=f"{step_loss:.4f}")

                evaluating = valid and (step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0))
                stopped_early = bool(evaluating) and validate_and_keep_best(step)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0:
                    checkpoint(step)
                # Several processes decide together (a signal that reached one stops them all), one alone at once.
                if stop_requested or (world == 1 and caught):
                    number = caught[0] if caught else signal.SIGTERM
                    path = checkpoint(step)
                    raise TrainingInterrupted(
                        f"{signal.Signals(number).name} received: stopped after step {step}"
                        + (f", checkpoint written to {path}" if path else "")
                        + ". Run the same command with --resume to continue.",
                        number,
                    )
                if stopped_early:
                    break
    finally:
        bar.close()
        backbone.gradient_checkpointing(False)

    for name in tasks:  # a task without validation data keeps its last prompt
        if name not in valid:
            best[name] = ((), step, prompts.prompts[name].artifact_tensors())
    best = broadcast_object_list([best])[0]  # only the main process validated
    runs = {}
    for name, data in tasks.items():
        summary = training_summary(name)
        summary.update(last_step=step, stopped_early=stopped_early, seconds=round(time.perf_counter() - started, 1))
        best_method = methods.from_tensors(prompts.prompts[name].config, backbone, best[name][2])
        if main:
            artifact.save(artifact_dir[name], best_method, data.task.config, backbone, training=summary)
        runs[name] = Run(best_method, summary)
    if main:
        checkpoint(step, finished=True)
        plot_losses(history, out_dir / "loss.png")
    accelerator.wait_for_everyone()
    return runs


def plot_losses(history: list[dict], path: Path) -> None:
    """Training loss (raw and smoothed) and the validation metric, one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history if "loss" in r]
    losses = [r["loss"] for r in history if "loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, losses, alpha=0.35, label="train loss")
    if losses:
        smooth, value = [], losses[0]
        for x in losses:
            value = 0.9 * value + 0.1 * x
            smooth.append(value)
        ax.plot(steps, smooth, label="train loss (smoothed)")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    evals = [r for r in history if "valid" in r]
    if evals:
        other = ax.twinx()
        for task in dict.fromkeys(r.get("task") for r in evals):  # one line per task, in order of appearance
            mine = [r for r in evals if r.get("task") == task]
            key = "accuracy" if "accuracy" in mine[0]["valid"] else "loss"
            other.plot([r["step"] for r in mine], [r["valid"][key] for r in mine], "o-",
                       label=f"{task + ' ' if task else ''}valid {key}")
        other.set_ylabel("validation")
        other.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
