"""Experiment trackers (TensorBoard, Weights & Biases, MLflow) through Accelerate's tracking API: which ones a run
reports to, the run's settings as flat hyperparameters, and each metrics.jsonl record as tracker values.

metrics.jsonl stays the portable record; a tracker gets the same numbers under keys such as `train/loss`,
`valid/accuracy` or, in a run of several named prompts (multitask, search), `valid/<name>/accuracy`. TensorBoard
writes under `OUT/tensorboard/`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from accelerate import Accelerator

from ..config import REPORT_TO, TRACKERS, PromptConfig, TrainConfig, to_dict
from ..errors import SoftPromptError
from .run_files import named

ENV = "SOFTPROMPT_REPORT_TO"
"""Overrides what report_to="auto" means (the tests set it to none: a unit test writes no tracker files)."""
PROJECT = "softprompt"
"""The project (W&B) or experiment (MLflow) a run reports to; the run is named after its output folder."""
TENSORBOARD_DIR = "tensorboard"


def installed(name: str) -> bool:
    """Whether the tracker's package can be imported."""
    return importlib.util.find_spec(name) is not None


def resolve(report_to: str) -> list[str]:
    """The trackers `report_to` (one of REPORT_TO) means here. auto: $SOFTPROMPT_REPORT_TO when set, else
    tensorboard when it is installed, else none; all: every one of TRACKERS that is installed. One named but not
    installed is refused before anything runs: a long run must not find out at its end that nothing was tracked."""
    if report_to == "auto":
        report_to = os.environ.get(ENV) or ("tensorboard" if installed("tensorboard") else "none")
        if report_to == "auto" or report_to not in REPORT_TO:
            allowed = ", ".join(x for x in REPORT_TO if x != "auto")
            raise SoftPromptError(f"${ENV}={report_to!r} is not one of {allowed}.")
    if report_to == "none":
        return []
    if report_to == "all":
        return [name for name in TRACKERS if installed(name)]
    if report_to not in TRACKERS:
        raise SoftPromptError(f"report_to {report_to!r} is not one of {', '.join(REPORT_TO)}.")
    if not installed(report_to):
        raise SoftPromptError(f"--report-to {report_to} needs the package `{report_to}`, which is not installed: "
                              f"`pip install {report_to}`, or choose --report-to none.")  # fmt: skip
    return [report_to]


def tensorboard_dir(out_dir: Path) -> Path:
    """Where TensorBoard's event files go: `out_dir/tensorboard/softprompt/` (Accelerate adds the project name)."""
    return Path(out_dir) / TENSORBOARD_DIR


def hparams(prompt_config: PromptConfig, cfg: TrainConfig) -> dict[str, str | int | float | bool]:
    """The prompt and training settings as one flat dict of scalars (what every tracker's hparams accept)."""
    flat = {**to_dict(prompt_config), **to_dict(cfg)}
    return {key: value if isinstance(value, (str, int, float, bool)) else str(value) for key, value in flat.items()}


def values_of(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as tracker values: a training step's numbers under `train/`, a validation's under
    `valid/` (and the name of the prompt it belongs to); the example count `n` is left out."""
    if "valid" not in record:  # a training step (a warning's text is metrics.jsonl's and the console's)
        return {f"train/{key}": value for key, value in record.items()
                if key != "step" and isinstance(value, (int, float))}  # fmt: skip
    name = named(record)
    prefix = f"valid/{name}/" if name else "valid/"
    return {prefix + key: value for key, value in record["valid"].items()
            if key != "n" and isinstance(value, (int, float))}  # fmt: skip


def start(accelerator: Accelerator, out_dir: Path, prompt_config: PromptConfig, cfg: TrainConfig) -> None:
    """Start the trackers the accelerator was built with (none: nothing happens) and record the run's settings."""
    if accelerator.log_with:
        run_name = Path(out_dir).resolve().name
        accelerator.init_trackers(PROJECT, config=hparams(prompt_config, cfg),
                                  init_kwargs={"wandb": {"name": run_name}, "mlflow": {"run_name": run_name}})


def log(accelerator: Accelerator, record: dict) -> None:
    """Send one metrics.jsonl record to the trackers (main process; a no-op without trackers)."""
    if accelerator.trackers:
        accelerator.log(values_of(record), step=record["step"])


def finish(accelerator: Accelerator) -> None:
    """Close the trackers (flush TensorBoard's files, end the W&B or MLflow run). Not `end_training()`: it also
    destroys the process group, which a library call must leave to its caller."""
    for tracker in accelerator.trackers:
        tracker.finish()
    accelerator.trackers = []
