"""Training checkpoints: everything needed to continue a run exactly (the method with any MLP, optimizer,
scheduler, random states, data position, best prompt so far), one atomic file per checkpoint, the newest few kept."""

from __future__ import annotations

from pathlib import Path

import torch

from .atomic import write_atomic
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
