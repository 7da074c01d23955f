"""Training checkpoints: everything needed to continue a run (the method with any MLP, optimizer, scheduler,
random states, data position), one atomic file per checkpoint, the newest few kept."""

from __future__ import annotations

from pathlib import Path

import torch

from .atomic import write_atomic

KEEP = 2


def save_checkpoint(out_dir: Path, step: int, state: dict) -> Path:
    folder = Path(out_dir) / "checkpoints"
    path = folder / f"step-{step:07d}.pt"
    write_atomic(path, lambda tmp: torch.save({"step": step, **state}, tmp))
    for old in sorted(folder.glob("step-*.pt"))[:-KEEP]:
        old.unlink()
    return path


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((Path(out_dir) / "checkpoints").glob("step-*.pt"))
    return found[-1] if found else None
