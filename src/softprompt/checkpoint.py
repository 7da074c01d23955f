"""Training checkpoints: everything needed to continue a run exactly (the method with any MLP, optimizer,
scheduler, random states, data position, best prompt so far), one atomic file per checkpoint, the newest few kept;
and the checks that a checkpoint belongs to the run asked to resume from it."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from .atomic import write_atomic
from .config import PromptConfig, TrainConfig, to_dict
from .errors import SoftPromptError

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
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # a file damaged outside our atomic writes (disk full, copied half-way)
        raise SoftPromptError(
            f"{path} cannot be read ({type(error).__name__}: {error}); delete it to resume from the one before."
        ) from None


RESUMABLE_CHANGES = {"steps", "eval_every", "eval_size", "patience", "checkpoint_every", "gradient_checkpointing",
                     "shard_model", "report_to"}
"""Settings a resumed run may change: they do not alter the steps already taken (a new `steps` stretches or
shortens the learning-rate schedule from here on)."""


def data_fingerprint(tasks: dict) -> str:
    """Task names and every training example's tokens, in order: a resumed run must see the very same batches."""
    digest = hashlib.sha256()
    for name, data in tasks.items():
        digest.update(name.encode() + b"\0")
        for example in data.train:
            digest.update(bytes(str((example.input_ids, example.target_ids)), "ascii"))
    return digest.hexdigest()[:16]


def resume_state(out_dir: Path, prompt_config: PromptConfig, cfg: TrainConfig, data: str) -> dict | None:
    """The newest checkpoint's state, after checking that it belongs to this very run."""
    path = latest_checkpoint(out_dir)
    if path is None:
        return None
    state = load_checkpoint(path)
    saved = {**state["prompt_config"], **state["train_config"]}
    now = {**to_dict(prompt_config), **to_dict(cfg)}
    changed = [f"{k}: {saved[k]!r} -> {now[k]!r}" for k in now
               if k in saved and saved[k] != now[k] and k not in RESUMABLE_CHANGES]  # fmt: skip
    if state["data"] != data:
        changed.append("the tasks or their training data differ")
    if changed:
        raise SoftPromptError(
            f"cannot resume from {path}: the run was started with other settings ({'; '.join(changed)}). "
            f"Resume with the original settings (only {', '.join(sorted(RESUMABLE_CHANGES))} may change), or "
            "train into a new --out."
        )
    return state
