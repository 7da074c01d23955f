"""Training checkpoints, the one place their format lives: what a run's progress is (`RunState`), everything needed
to continue it exactly (the prompts with any MLP, optimizer, scheduler, random states, data position, best prompt so
far) written as one atomic file per checkpoint, the newest few kept; restoring a run from one; and the checks that a
checkpoint belongs to the run asked to resume from it.

A checkpoint holds tensors, numbers, strings and the containers of them only, so it is read with torch's
`weights_only` unpickler, which builds nothing else: a planted or shared file that would run code when unpickled
(`--resume` picks the newest one up by itself) is refused, its code never run. Every checkpoint this code ever
wrote is of that kind (optimizer and schedule states are plain dicts; Python's random state a tuple of ints), so
none needs allow-listing."""

from __future__ import annotations

import dataclasses
import hashlib
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.optim.lr_scheduler import LRScheduler

from ..atomic import write_atomic
from ..config import PromptConfig, TrainConfig, to_dict
from ..errors import SoftPromptError

KEEP = 2


def checkpoint_dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save_checkpoint(out_dir: Path, step: int, state: dict) -> Path:
    folder = checkpoint_dir(out_dir)
    path = folder / f"step-{step:07d}.pt"
    write_atomic(path, lambda tmp: torch.save({"step": step, **state}, tmp))
    for old in sorted(folder.glob("step-*.pt"))[:-KEEP]:
        old.unlink()
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted(checkpoint_dir(out_dir).glob("step-*.pt"))
    return found[-1] if found else None


def load_checkpoint(path: Path) -> dict:
    """The checkpoint at `path`, read without building any object but tensors and plain Python data."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        unsafe = next((line.strip() for line in str(error).splitlines() if "GLOBAL" in line), None)
        if isinstance(error, pickle.UnpicklingError) and unsafe:  # refused before anything was built or called
            raise SoftPromptError(
                f"{path} was refused: it holds Python objects that are no checkpoint's data ({unsafe}), so it was "
                "not written by softprompt, or was changed since. Loading it could run code; nothing of it was run. "
                "Delete it (or move it away) to resume from the checkpoint before, or train into a new --out."
            ) from None
        raise SoftPromptError(  # a file damaged outside our atomic writes (disk full, copied half-way)
            f"{path} cannot be read ({type(error).__name__}: {str(error).strip()[:300]}); delete it to resume from "
            "the one before."
        ) from None


RESUMABLE_CHANGES = {"steps", "eval_every", "eval_size", "patience", "checkpoint_every", "gradient_checkpointing",
                     "compile", "shard_model", "report_to", "no_learning_after", "select_by"}
"""Settings a resumed run may change: they do not alter the steps already taken (a new `steps` stretches or
shortens the learning-rate schedule from here on; a new `select_by` ranks the best prompt so far anew, from its
logged result, and decides which is kept from here on)."""


HOLDOUT_SIZING = ("eval_every", "eval_size")
"""Resumable settings that also size the held-out split of a run without validation data (`setup.holdout_size`):
changed, they change the training data, which the fingerprint then refuses."""


def data_fingerprint(tasks: dict) -> str:
    """Task names and every training example's tokens, in order: a resumed run must see the very same batches."""
    digest = hashlib.sha256()
    for name, data in tasks.items():
        digest.update(name.encode() + b"\0")
        for example in data.train:
            digest.update(bytes(str((example.input_ids, example.target_ids)), "ascii"))
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class RunIdentity:
    """What makes a checkpoint this run's: its settings and its training data (stored under these keys)."""

    prompt_config: dict
    train_config: dict
    data: str
    """`data_fingerprint` of the run's tasks."""

    @classmethod
    def of(cls, prompt_config: PromptConfig, cfg: TrainConfig, tasks: dict) -> RunIdentity:
        return cls(to_dict(prompt_config), to_dict(cfg), data_fingerprint(tasks))


def saved_state(out_dir: Path, identity: RunIdentity, resume: bool) -> dict | None:
    """The checkpoint a run continues from: with `resume`, the newest one (None when there is none), after checking
    that it belongs to this very run; without, none, and a folder that holds one is refused (a new run must not
    overwrite it)."""
    path = latest_checkpoint(out_dir)
    if not resume:
        if path:
            raise SoftPromptError(f"{out_dir} already holds a run (checkpoint {path.name}); pass --resume to "
                                  "continue it, or choose another --out.")  # fmt: skip
        return None
    if path is None:
        return None
    state = load_checkpoint(path)
    saved = {**state["prompt_config"], **state["train_config"]}
    now = {**identity.prompt_config, **identity.train_config}
    changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now
               if k in saved and saved[k] != now[k] and k not in RESUMABLE_CHANGES]  # fmt: skip
    if state["data"] != identity.data:
        sizing = [f"{k} {saved[k]!r} -> {now[k]!r}" for k in HOLDOUT_SIZING if k in saved and saved[k] != now[k]]
        changed.append("the tasks or their training data differ" + (
            f" (without validation data, {' and '.join(HOLDOUT_SIZING)} also set how many training examples are "
            f"held out: {'; '.join(sizing)} changed that split)" if sizing else ""))
    if changed:
        raise SoftPromptError(
            f"cannot resume from {path}: the run was started with other settings ({'; '.join(changed)}). "
            f"Resume with the original settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change), or "
            "train into a new --out."
        )
    return state


@dataclass
class RunState:
    """A run's progress: what a checkpoint holds besides the modules' and random generators' states, so that a
    resumed run continues exactly where the checkpoint was written."""

    step: int = 0
    """The last optimizer step taken (= global batches consumed)."""
    best: dict[str, tuple] = field(default_factory=dict)
    """Per prompt: (selection key, step, artifact tensors) of its best one so far."""
    evals_without_gain: dict[str, int] = field(default_factory=dict)
    stopped_early: bool = False
    tokens_seen: int = 0
    train_seconds: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)
    """Prompts that stopped training before the others (the run's policy stopped them), with the step they stopped
    at."""

    @classmethod
    def from_checkpoint(cls, saved: dict) -> RunState:
        return cls(saved["step"], saved["best"], saved["evals_without_gain"], saved["stopped_early"],
                   saved["tokens_seen"], saved["train_seconds"], saved.get("dropped", {}))  # fmt: skip

    def to_checkpoint(self, modules: dict, identity: RunIdentity, finished: bool) -> dict:
        """The checkpoint (less "step", which `save_checkpoint` puts first): the `modules`' and random states, this
        progress and the run's `identity`, keys in the order checkpoints have always had."""
        return {**modules, "batches_consumed": self.step, "best": self.best,
                "evals_without_gain": self.evals_without_gain, "tokens_seen": self.tokens_seen,
                "train_seconds": self.train_seconds, **dataclasses.asdict(identity), "finished": finished,
                "stopped_early": self.stopped_early, "dropped": self.dropped}  # fmt: skip

    def next_step(self, steps: int) -> int:
        """The first step still to take; `steps + 1` (none) once the run stopped early or reached `steps`."""
        return steps + 1 if self.stopped_early or self.step >= steps else self.step + 1


def save_run(out_dir: Path, state: RunState, identity: RunIdentity, prompts: nn.Module,
             optimizer: torch.optim.Optimizer, scheduler: LRScheduler, finished: bool = False) -> Path:  # fmt: skip
    """Write a checkpoint of the run at `state.step`: the prompts', optimizer's, schedule's and random generators'
    states, its progress and identity."""
    modules = {"prompts": {k: v.detach().clone() for k, v in prompts.state_dict().items()},
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "torch_rng": torch.get_rng_state(), "python_rng": random.getstate()}  # fmt: skip
    if torch.cuda.is_initialized():  # each GPU's generator too (a run that never used a GPU drew nothing there)
        modules["cuda_rng"] = torch.cuda.get_rng_state_all()
    return save_checkpoint(out_dir, state.step, state.to_checkpoint(modules, identity, finished))


def restore_run(saved: dict, prompts: nn.Module, optimizer: torch.optim.Optimizer,
                scheduler: LRScheduler) -> RunState:  # fmt: skip
    """Put checkpoint `saved`'s states back into the prompts, optimizer, schedule and random generators; returns
    the run's progress."""
    prompts.load_state_dict(saved["prompts"])
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    torch.set_rng_state(saved["torch_rng"])
    random.setstate(saved["python_rng"])
    if "cuda_rng" in saved and torch.cuda.is_available():  # a GPU run resumed where there are GPUs
        torch.cuda.set_rng_state_all(saved["cuda_rng"][: torch.cuda.device_count()])
    return RunState.from_checkpoint(saved)
