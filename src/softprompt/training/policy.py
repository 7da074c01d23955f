"""What the training loop leaves to a policy: hooks it calls at fixed points of a run (which rows read a batch, the
optimizer's parameter groups, clipping, what a non-finite value does, what happens after a validation), so the loop
itself knows one way to train. `TrainingPolicy` is the plain policy of ordinary runs (one task or several); a
search brings its own (`search.Halving`)."""

from __future__ import annotations

import math
from typing import Iterable, Protocol

from accelerate import Accelerator
from torch import nn

from ..data import Example
from .checkpoint import RunState
from .setup import PromptSet, TrainingTask

Rows = list[tuple[str, Example]]
"""Rows of a batch, each with the name of the prompt it runs behind."""


class RunView(Protocol):
    """What a policy's hooks see of the run they serve (the loop's trainer)."""

    accelerator: Accelerator
    model: nn.Module
    """`prompts` as run: wrapped for DDP across processes (or the module itself in one process)."""
    prompts: PromptSet
    state: RunState
    main: bool
    """Whether this is the main process (the one that logs and writes)."""

    @property
    def live(self) -> list[str]:
        """The prompts still training, in order."""

    def stop(self, name: str) -> None:
        """Prompt `name` stops training at the current step (the others go on; its best prompt stays)."""


class TrainingPolicy:
    """The plain policy: global batches are drawn from every task's training data and each row runs behind its own
    task's prompt; one learning rate; the gradients of all prompts clipped together; a non-finite loss or gradient
    ends the run; a validation only decides which prompt is best. Subclass it to change any of these."""

    says_when_not_learning = True
    """Whether the loop warns of a prompt that has not learned (`TrainConfig.no_learning_after`)."""
    one_learning_rate = True
    """Whether every prompt trains at the run's learning rate (the loop then names a default one it chose)."""

    def pool(self, tasks: dict[str, TrainingTask]) -> list[tuple[str | None, Example]]:
        """What global batches are drawn from, as (prompt name, example) pairs (the name may be left to `rows`)."""
        return [(name, e) for name, data in tasks.items() for e in data.train]

    def rows(self, drawn: list[tuple[str | None, Example]], live: list[str]) -> Rows:
        """The rows a slice of a global batch runs as: each drawn pair behind the prompt it names."""
        return drawn  # type: ignore[return-value]  # the plain pool names every row

    def copies(self, live: list[str]) -> int:
        """How many rows each drawn example becomes (`rows`): the loss logged is the mean over them."""
        return 1

    def param_groups(self, prompts: PromptSet) -> Iterable[nn.Parameter] | list[dict]:
        """What the optimizer trains: every prompt's parameters at the configured learning rate."""
        return prompts.parameters()

    def before_step(self, run: RunView) -> None:
        """Called before each step's forward, on every process."""

    def clip(self, run: RunView, limit: float) -> float:
        """Clip the gradients to norm `limit`; return their norm before clipping (of all prompts together)."""
        return float(run.accelerator.clip_grad_norm_(run.model.parameters(), limit))

    def diverged(self, loss: float, grad_norm: float) -> bool:
        """Whether a step with this global loss and gradient norm (`clip`'s) ends the run before the optimizer
        steps: a finite loss can still have a non-finite gradient (an overflow in the backward pass), and stepping
        on it would make the prompt NaN, and then the best one and every later checkpoint."""
        return not (math.isfinite(loss) and math.isfinite(grad_norm))

    def step_record(self, copies: int) -> dict:
        """Keys this policy adds to a training step's record (`copies`: what `copies` said before the step)."""
        return {}

    def validates_at(self, step: int) -> bool:
        """Whether `step` validates besides the configured ones (`eval_every`, the last step)."""
        return False

    def after_validation(self, run: RunView, step: int, results: dict[str, dict]) -> None:
        """Called on the main process after each validation (`results`: each live prompt's, best ones already
        kept); a prompt stopped here (`run.stop`) stops on every process."""
