"""What a training run keeps and writes besides the prompt and its checkpoints: where its files go (`Layout`), its
metrics log and its loss plot."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..atomic import append_whole, write_text
from ..errors import SoftPromptError


@dataclass(frozen=True)
class Layout:
    """Where a run writes and how its records name a prompt, decided once. A run of one prompt is its own artifact
    (`out_dir` itself; records and summary name nothing); a run of several named prompts (a multitask run's tasks,
    or the names its caller supplies) writes prompt `name`'s artifact to `out_dir/<folder>/name` and names it in
    its validation records and summaries. Log, plot and checkpoints are in `out_dir` either way."""

    out_dir: Path
    names: tuple[str, ...] | None = None
    """The prompts' names, in order (a multitask run's tasks, sorted); None for a run of one prompt."""
    word: str = "task"
    """What records and summaries call a name: the key holding it (and the list of all under `word` + "s")."""
    folder: str = ""
    """The folder under `out_dir` holding the artifacts ("": `out_dir/name`)."""

    def artifact_dir(self, name: str) -> Path:
        return self.out_dir if self.names is None else self.out_dir / self.folder / name

    def record_tag(self, name: str) -> dict:
        """The keys naming prompt `name` in its validation records."""
        return {} if self.names is None else {self.word: name}

    def summary_tag(self, name: str) -> dict:
        """The keys naming prompt `name` and its siblings in its training summary."""
        return {} if self.names is None else {self.word: name, f"{self.word}s": list(self.names)}


class MetricsLog:
    """The run's records (training steps, validations): kept in memory by every process for the summaries and the
    plot, and appended to metrics.jsonl by the main process only, which also hands each new one to `forward` (the
    experiment trackers). The file is only ever whole lines: a rewrite is atomic, an append that fails (a full disk)
    is cut back off, and a line torn by a kill or a power loss is dropped, with a warning, on resume."""

    def __init__(self, path: Path, main: bool, forward: Callable[[dict], None] | None = None):
        self.path, self.main, self.records, self.forward = path, main, [], forward

    def reload(self, until_step: int) -> None:
        """On resume, the main process's log as it was at the checkpoint: later records were never checkpointed."""
        if self.main and self.path.is_file():
            self.records = [r for r in read_records(self.path) if r["step"] <= until_step]

    def start(self) -> None:
        """(Re)write the file with the records so far, so it never holds steps this run will take again."""
        if self.main:
            write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict) -> None:
        self.records.append(record)
        if self.main:
            append_whole(self.path, (json.dumps(record) + "\n").encode("utf-8"))
            if self.forward:
                self.forward(record)

    def valid_result(self, name: str, step: int | None, key: str = "valid") -> dict:
        """Task `name`'s validation result at `step` ({} when there is none, as on the other processes); `key`
        "template": the template's alone, scored beside the starting prompt's at step 0."""
        return next((r[key] for r in self.records if r["step"] == step and key in r
                     and named(r, name) == name), {})  # fmt: skip

    def warned(self, name: str | None) -> bool:
        """Whether the run already said that prompt `name` (None: the run as a whole) did not learn."""
        return any("warning" in r and named(r, name) == name for r in self.records)


def read_records(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A last line that is not a whole record (the run was killed, or the disk filled,
    while writing it) is dropped with a warning: it was never checkpointed, and resuming rewrites the file. A bad
    line anywhere else was not torn by us, and is refused with its number."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                raise ValueError("not a record with a step")
        except ValueError as error:
            if number == len(lines):
                warnings.warn(f"{path}:{number}: dropped a torn last line ({line[:60]!r}...): the run stopped while "
                              "writing it; the file is rewritten without it.", stacklevel=2)  # fmt: skip
                break
            raise SoftPromptError(f"{path}:{number} is not a metrics record ({error}): the file was changed by hand "
                                  "or by another program; delete that line and resume again.") from None
        records.append(record)
    return records


RECORD_KEYS = ("step", "valid", "template", "warning")
"""What a validation or warning record holds besides the key naming its prompt (`Layout.record_tag`)."""


def named(record: dict, default: str | None = None) -> str | None:
    """The name of the prompt a validation or warning record belongs to: its one key besides `RECORD_KEYS` holds
    it (`Layout.record_tag`), else `default` (a run of one prompt names none)."""
    return next((value for key, value in record.items() if key not in RECORD_KEYS), default)


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
        for name in dict.fromkeys(map(named, evals)):  # one line per named prompt, in order of appearance
            mine = [r for r in evals if named(r) == name]
            key = "accuracy" if "accuracy" in mine[0]["valid"] else "loss"
            other.plot([r["step"] for r in mine], [r["valid"][key] for r in mine], "o-",
                       label=f"{name + ' ' if name else ''}valid {key}")
        other.set_ylabel("validation")
        other.legend(loc="upper right")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
