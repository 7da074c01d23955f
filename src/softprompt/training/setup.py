"""The set-up steps of a training run, in the order `loop.train_prompts` takes them: the accelerator, the data
checks, the frozen model on its device(s), the starting prompts, the optimizer and its schedule. Each refuses what it
cannot do before anything costly happens after it."""

from __future__ import annotations

import copy
import os
import random
import sys
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, ProjectConfiguration
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim.lr_scheduler import LRScheduler
from transformers import get_scheduler
from transformers.optimization import Adafactor

from .. import methods
from ..backbones import Backbone
from ..config import PromptConfig, TrainConfig
from ..data import Example, TaskEncoder
from ..errors import SoftPromptError
from . import trackers


@dataclass
class TrainingTask:
    """One task of a run: how records become examples, its data, and optionally a prompt to start from."""

    task: TaskEncoder
    train: list[Example]
    valid: list[Example] = field(default_factory=list)
    init: methods.PromptMethod | None = None
    """Start from this prompt (e.g. a trained one: transfer) instead of building one from the prompt config."""
    held_out: int = 0
    """How many of `valid` were held out of the training data given (`hold_out`); 0: validation data was given."""


class PromptSet(nn.Module):
    """The prompts of a run, one per name; one module, so one optimizer and one DDP wrapper cover them all."""

    def __init__(self, prompts: dict[str, methods.PromptMethod]):
        super().__init__()
        self.prompts = nn.ModuleDict(prompts)

    def forward(self, backbone: Backbone, names: set[str]) -> dict[str, torch.Tensor]:
        """What each named prompt hands the backbone in a training step (`training_input`: its prefix, or its soft
        tokens for prompt tuning); only those named."""
        return {name: self.prompts[name].training_input(backbone) for name in names}

    def training_mask(self, names: list[str], examples: list[Example], prompt_input: torch.Tensor,
                      prefix_mask: torch.Tensor | None, seed: int) -> torch.Tensor | None:  # fmt: skip
        """The (B, slots) mask a training batch runs with, for rows behind prompts `names` (`prompt_input_for`'s
        prompt input and mask; no mask: each row sees every slot): each row's own demonstration hidden from it
        (init=demos: leave-one-out), then each slot hidden with its prompt's `slot_dropout` probability (drawn under
        `seed`; a row that would see none keeps what it saw)."""
        own = [self.prompts[name].demo_slots.get(methods.demo_key(e)) for name, e in zip(names, examples)]
        dropout = [self.prompts[name].config.slot_dropout for name in names]
        if not any(own) and not any(dropout):
            return prefix_mask
        if prefix_mask is None:
            prefix_mask = torch.ones(len(names), prompt_input.shape[-2], dtype=torch.long, device=prompt_input.device)
        mask = prefix_mask.clone()
        for row, span in enumerate(own):
            if span:  # a row's prompt starts at the first slot it sees (`side_by_side` gives each prompt one span)
                start = int(mask[row].argmax())
                mask[row, start + span.start : start + span.stop] = 0
        if any(dropout):
            generator = torch.Generator().manual_seed(seed)
            draws = torch.rand(mask.shape, generator=generator, device="cpu")  # (B, slots), one per row and slot
            hide = draws < torch.tensor(dropout, device="cpu").unsqueeze(1)
            kept = mask.masked_fill(hide.to(mask.device), 0)
            mask = torch.where(kept.any(dim=1, keepdim=True), kept, mask)
        return mask


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


def _trains_on_cpu(device: torch.device) -> bool:
    # Without CUDA, processes started by `accelerate launch`/torchrun train on the CPU and synchronise over gloo.
    return not torch.cuda.is_available() or (device.type == "cpu" and "LOCAL_RANK" not in os.environ)


def training_device(device: torch.device) -> torch.device:
    """Where this process will train a model loaded on `device`, known before the accelerator exists: the process
    state is made here, as the accelerator made later needs it (it inherits the state; a bare PartialState() on a
    machine without CUDA would take each launched process for a lone one)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)  # a single process on cuda:N: the process state takes the current GPU
    return PartialState(cpu=_trains_on_cpu(device)).device


def accelerator_for(find_unused: bool, report_to: str, out_dir: Path, device: torch.device) -> Accelerator:
    """The accelerator on the frozen model's device (`device`: where it was loaded; a CPU copy to be sharded trains
    on the GPUs when there are some), with the experiment trackers `report_to` names (checked here, so a missing
    package stops the run before anything else; `trackers.start` starts them)."""
    precision = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision != "no":  # its autocast would run the float32 prompts in half precision: --dtype says what is half
        warnings.warn(f"Accelerate's mixed precision ({precision}) is not used: the frozen weights are in the dtype "
                      "they were loaded in (--dtype; auto is bfloat16 on GPUs and on CPUs that multiply it) and the "
                      "prompts train in float32.")
    training_device(device)  # the process state (and current GPU) the accelerator inherits, made one way
    return Accelerator(cpu=_trains_on_cpu(device), mixed_precision="no",
                       kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=find_unused)],
                       log_with=trackers.resolve(report_to) or None,
                       project_config=ProjectConfiguration(project_dir=str(out_dir),
                                                           logging_dir=str(trackers.tensorboard_dir(out_dir))))


FLOAT16_REFUSED = ("training on a float16 model is refused: gradients through float16 activations underflow "
                   "without loss scaling, which softprompt does not do; use --dtype bfloat16 (or float32).")


def check_model(backbone: Backbone) -> None:
    """Refuse a frozen model that a training run cannot use, however it was loaded (a library caller's too)."""
    if backbone.dtype == torch.float16:
        raise SoftPromptError(FLOAT16_REFUSED)


MIN_HOLDOUT = 16
"""Fewest held-out examples worth choosing a prompt by; a task with less to spare keeps its last prompt."""


def holdout_size(available: int, cfg: TrainConfig) -> int:
    """How many of `available` training examples a run without validation data holds out (`hold_out`; 0: none)."""
    count = min(int(available * cfg.holdout), cfg.eval_size)
    return count if count >= MIN_HOLDOUT and cfg.eval_every else 0


def search_without_data(available: int, cfg: TrainConfig) -> str:
    """Why a search without validation data cannot compare its candidates on `available` training examples."""
    return (f"a search compares its candidates on validation data: give --valid, or training data from which "
            f"--holdout {cfg.holdout:g} sets at least {MIN_HOLDOUT} examples aside (it has {available}; "
            f"--eval-every {cfg.eval_every}).")  # fmt: skip


def hold_out(tasks: dict[str, TrainingTask], cfg: TrainConfig, say: bool = True) -> dict[str, TrainingTask]:
    """Each task given no validation data, with `cfg.holdout` of its training data (a seeded draw of at most
    eval_size examples) moved to its validation data, so the run keeps its best prompt rather than its last; the
    others, and every task of a run that never validates (eval_every 0), as they are. Says so on stderr (`say`:
    this process is the one that speaks)."""
    out = dict(tasks)
    for name, data in tasks.items():
        count = holdout_size(len(data.train), cfg)
        if data.valid or not count:
            continue
        chosen = set(random.Random(cfg.seed).sample(range(len(data.train)), count))
        out[name] = replace(data, train=[e for i, e in enumerate(data.train) if i not in chosen],
                            valid=[data.train[i] for i in sorted(chosen)], held_out=count)  # fmt: skip
        if say:
            where = f" for task {name!r}" if len(tasks) > 1 else ""
            print(f"softprompt: no validation data{where}: holding out {count} of its {len(data.train)} training "
                  "examples to choose the best prompt by (--holdout 0 trains on all and keeps the last prompt)",
                  file=sys.stderr)  # fmt: skip
    return out


def check_data(tasks: dict[str, TrainingTask], cfg: TrainConfig, world: int, available: int) -> None:
    """Refuse what cannot make one global batch of the `available` examples batches are drawn from (a policy's
    pool: a search's candidates share one task's), split evenly over processes and accumulation steps."""
    if cfg.batch_size % (world * cfg.grad_accum):
        raise SoftPromptError(
            f"batch_size {cfg.batch_size} must be divisible by processes x grad_accum = {world} x {cfg.grad_accum}."
        )
    empty = [name for name, data in tasks.items() if not data.train]
    if empty:
        raise SoftPromptError(f"no training examples for {', '.join(empty)}: the training data is empty.")
    if available < cfg.batch_size:
        raise SoftPromptError(f"the training data has {available} examples, fewer than one batch of "
                              f"{cfg.batch_size}; lower --batch-size or add data.")  # fmt: skip


def place_model(backbone: Backbone, cfg: TrainConfig, accelerator: Accelerator) -> tuple[bool, int]:
    """Put the frozen model on this process's device, whole or sharded; returns whether it is sharded and how many
    of its parameters this process holds."""
    # Sharding the frozen layers (FSDP2) starts from the CPU copy, so no device ever holds the whole model.
    sharded = accelerator.num_processes > 1 and (
        cfg.shard_model or accelerator.distributed_type == DistributedType.FSDP)  # fmt: skip
    if sharded and cfg.compile:  # FSDP swaps each layer's weights in and out around its forward: not tried compiled
        raise SoftPromptError("--compile does not work with a sharded model (--shard-model, FSDP) yet; drop one of "
                              "them.")  # fmt: skip
    if sharded:
        frozen_held = backbone.shard_layers(accelerator.device)
    else:
        if backbone.device != accelerator.device:  # loaded elsewhere (a library caller's model); a quantized model
            backbone.model.to(accelerator.device)  # cannot move, and was loaded on its device already
        frozen_held = sum(p.numel() for p in backbone.model.parameters())
    backbone.gradient_checkpointing(cfg.gradient_checkpointing)
    eager_because = backbone.compile() if cfg.compile else None
    if eager_because:
        warnings.warn(f"--compile: the decoder stays eager; torch.compile does not work here ({eager_because}).")
    return sharded, frozen_held


def resolve_start(prompt_config: PromptConfig, tasks: dict[str, TrainingTask], tokenizer, say: bool = True
                  ) -> PromptConfig:  # fmt: skip
    """The prompt settings with their length and init explicit (`PromptConfig.for_tasks`). Where the length is the
    default one of demonstrations and the training examples written out fill fewer tokens, the prompt takes all of
    them instead of refusing, as stderr says (`say`: this process is the one that speaks)."""
    resolved = prompt_config.for_tasks([data.task.config.task for data in tasks.values()])
    if prompt_config.num_tokens is not None or resolved.init != "demos":
        return resolved
    fill = min(methods.demonstrations_length(data.train, tokenizer) for data in tasks.values())
    if fill >= resolved.num_tokens:
        return resolved
    if say:
        print(f"softprompt: the training examples written out with their answers fill {fill} tokens, fewer than "
              f"the {resolved.num_tokens} of the demonstrations start: the prompt takes {fill} (--num-tokens sets "
              "another length)", file=sys.stderr)  # fmt: skip
    return replace(resolved, num_tokens=fill)


def build_prompts(backbone: Backbone, tasks: dict[str, TrainingTask], prompt_config: PromptConfig, seed: int,
                  device: torch.device) -> PromptSet:  # fmt: skip
    """Each task's starting prompt: a copy of its `init`, or a new one drawn from one seeded generator in task
    order."""
    generator = torch.Generator().manual_seed(seed)
    return PromptSet({
        name: copy.deepcopy(data.init) if data.init else methods.build(prompt_config, backbone,
                                                                      data.task.config.labels, generator, data.train)
        for name, data in tasks.items()
    }).to(device)  # fmt: skip


def optimizer_for(prompts: PromptSet, params, cfg: TrainConfig, accelerator: Accelerator, sharded: bool,
                  find_unused: bool) -> tuple[nn.Module, torch.optim.Optimizer, LRScheduler]:  # fmt: skip
    """The optimizer over `params` (the prompts' parameters or parameter groups: `TrainingPolicy.param_groups`; the
    schedule scales every group alike), its learning-rate schedule, and the prompts as the model to run (replicated
    across processes)."""
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
