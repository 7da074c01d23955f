"""What a training run keeps and writes besides the prompt: where its files go (`Layout`), its progress as
checkpoints store it (`RunState`), its metrics log and its loss plot."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class Layout:
    """Where a run writes and how its records name a task, decided once. A single-task run is its own artifact
    (`out_dir` itself; records and summary name no task); a multitask run writes task `name`'s artifact to
    `out_dir/name` and names the task in its validation records and summaries. Log, plot and checkpoints are in
    `out_dir` either way."""

    out_dir: Path
    tasks: tuple[str, ...] | None = None
    """A multitask run's task names, sorted (or a search's candidates, in order); None for a single-task run."""
    kind: str = "task"
    """What `tasks` names: "task", or "candidate" (a search: their artifacts in `out_dir/candidates/`)."""

    def artifact_dir(self, name: str) -> Path:
        if self.tasks is None:
            return self.out_dir
        return self.out_dir / name if self.kind == "task" else self.out_dir / "candidates" / name

    def record_tag(self, name: str) -> dict:
        """The keys naming task `name` in its validation records."""
        return {} if self.tasks is None else {self.kind: name}

    def summary_tag(self, name: str) -> dict:
        """The keys naming task `name` and its siblings in its training summary."""
        return {} if self.tasks is None else {self.kind: name, f"{self.kind}s": list(self.tasks)}


@dataclass
class RunState:
    """A run's progress: what a checkpoint holds besides the modules' and random generators' states, so that a
    resumed run continues exactly where the checkpoint was written."""

    step: int = 0
    """The last optimizer step taken (= global batches consumed)."""
    best: dict[str, tuple] = field(default_factory=dict)
    """Per task: (selection key, step, artifact tensors) of its best prompt so far."""
    evals_without_gain: dict[str, int] = field(default_factory=dict)
    stopped_early: bool = False
    tokens_seen: int = 0
    train_seconds: float = 0.0
    dropped: dict[str, int] = field(default_factory=dict)
    """Candidates that stopped training (halving, or diverged), with the step they stopped at."""

    @classmethod
    def from_checkpoint(cls, saved: dict) -> RunState:
        return cls(saved["step"], saved["best"], saved["evals_without_gain"], saved["stopped_early"],
                   saved["tokens_seen"], saved["train_seconds"], saved.get("dropped", {}))  # fmt: skip

    def to_checkpoint(self, modules: dict, identity: dict, finished: bool) -> dict:
        """The checkpoint (less "step", which `save_checkpoint` puts first): the `modules`' and random states, this
        progress and the run's `identity` (settings, data), keys in the order checkpoints have always had."""
        return {**modules, "batches_consumed": self.step, "best": self.best,
                "evals_without_gain": self.evals_without_gain, "tokens_seen": self.tokens_seen,
                "train_seconds": self.train_seconds, **identity, "finished": finished,
                "stopped_early": self.stopped_early, "dropped": self.dropped}  # fmt: skip

    def next_step(self, steps: int) -> int:
        """The first step still to take; `steps + 1` (none) once the run stopped early or reached `steps`."""
        return steps + 1 if self.stopped_early or self.step >= steps else self.step + 1


class MetricsLog:
    """The run's records (training steps, validations): kept in memory by every process for the summaries and the
    plot, and appended to metrics.jsonl by the main process only, which also hands each new one to `forward` (the
    experiment trackers)."""

    def __init__(self, path: Path, main: bool, forward: Callable[[dict], None] | None = None):
        self.path, self.main, self.records, self.forward = path, main, [], forward

    def reload(self, until_step: int) -> None:
        """On resume, the main process's log as it was at the checkpoint: later records were never checkpointed."""
        if self.main and self.path.is_file():
            records = [json.loads(line) for line in self.path.read_text(encoding="utf-8").splitlines() if line]
            self.records = [r for r in records if r["step"] <= until_step]

    def start(self) -> None:
        """(Re)write the file with the records so far, so it never holds steps this run will take again."""
        if self.main:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text("".join(json.dumps(r) + "\n" for r in self.records), encoding="utf-8")

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self.main:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.forward:
                self.forward(record)

    def valid_result(self, name: str, step: int | None) -> dict:
        """Task `name`'s validation result at `step` ({} when there is none, as on the other processes)."""
        return next((r["valid"] for r in self.records if r["step"] == step and _named(r, name) == name
                     and "valid" in r), {})  # fmt: skip


def _named(record: dict, default: str | None = None) -> str | None:
    """The task or candidate a record belongs to."""
    return record.get("task", record.get("candidate", default))


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
        for task in dict.fromkeys(map(_named, evals)):  # one line per task or candidate, in order of appearance
            mine = [r for r in evals if _named(r) == task]
            key = "accuracy" if "accuracy" in mine[0]["valid"] else "loss"
            other.plot([r["step"] for r in mine], [r["valid"][key] for r in mine], "o-",
                       label=f"{task + ' ' if task else ''}valid {key}")
        other.set_ylabel("validation")
        other.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
