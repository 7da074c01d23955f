"""Experiment trackers (trackers.py, `train --report-to`): TensorBoard's event files, read back with TensorBoard's
own reader, hold metrics.jsonl's loss, learning rate, gradient norm, throughput and validation series at the run's
steps, and the run's settings as hyperparameters; multitask and search runs name each task or candidate; `auto` and
`all` mean what they say; a tracker whose package is missing stops the run before anything is written; a resumed
run may change the tracker. (conftest sets SOFTPROMPT_REPORT_TO=none for every other test.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from softprompt.training import trackers
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import TaskEncoder
from softprompt.errors import SoftPromptError
from softprompt.training.loop import TrainingTask, train, train_multitask

from conftest import run_main, tiny_backbone
from test_cli import LABELS, TEMPLATE, save_tiny_model, write_data
from test_train import sentiment_records

PROMPT = PromptConfig(num_tokens=4, init="random")
RUN_SETTINGS = {
    # PROMPT: what it sets, then PromptConfig's defaults (no init_text: the string "None", trackers take no null)
    "method": "prefix", "num_tokens": 4, "init": "random", "init_text": "None", "init_range": 0.5,
    "vocab_size_for_init": 5000, "prefix_mlp": False, "mlp_hidden": 512, "residual": False, "slot_dropout": 0.0,
    # the TrainConfig of test_tensorboard_holds_the_series_of_metrics_jsonl, then TrainConfig's defaults (lr: prefix's)
    "steps": 6, "batch_size": 4, "eval_every": 3, "warmup_steps": 2, "report_to": "tensorboard",
    "grad_accum": 1, "lr": 0.03, "optimizer": "adamw", "weight_decay": 0.0, "schedule": "linear", "max_grad_norm": 1.0,
    "eval_size": 300, "holdout": 0.1, "patience": 6, "no_learning_after": 0.3, "seed": 0, "max_length": 512,
    "too_long": "truncate", "checkpoint_every": 50, "gradient_checkpointing": False, "compile": False, "shard_model": False, "select_by": "auto",
}  # fmt: skip
"""The run's settings by name, written out: what a tracker must show as its hyperparameters."""
KIND = {bool: "number_value", str: "string_value", int: "number_value", float: "number_value"}
"""The field of TensorBoard's hparams value that holds each Python type: torch's SummaryWriter.add_hparams (which
Accelerate calls) tests for a number before a bool, so a bool arrives as 0 or 1, never in `bool_value`."""


def events(out: Path) -> EventAccumulator:
    """TensorBoard's reader over the run's scalars (Accelerate writes them to OUT/tensorboard/<project>)."""
    folder = trackers.tensorboard_dir(out) / trackers.PROJECT
    assert list(folder.glob("events.out.tfevents.*")), f"no event file in {folder}"
    accumulator = EventAccumulator(str(folder))
    accumulator.Reload()
    return accumulator


def series(accumulator: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(event.step, event.value) for event in accumulator.Scalars(tag)]


def assert_series(accumulator: EventAccumulator, tag: str, expected: list[tuple[int, float]]) -> None:
    """The tag's (step, value) pairs: the steps exactly, the values as float32 holds them."""
    got = series(accumulator, tag)
    assert [step for step, _ in got] == [step for step, _ in expected], tag
    assert [value for _, value in got] == pytest.approx([value for _, value in expected], rel=1e-6), tag


def logged(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def sentiment_task(backbone) -> TaskEncoder:
    return TaskEncoder(TaskConfig(template=TEMPLATE, labels=LABELS.split(","), label_field="label"), backbone.tokenizer)


def test_tensorboard_holds_the_series_of_metrics_jsonl(tmp_path):
    backbone = tiny_backbone("llama")
    task = sentiment_task(backbone)
    cfg = TrainConfig(steps=6, batch_size=4, eval_every=3, warmup_steps=2, report_to="tensorboard")
    out = tmp_path / "run"
    train(backbone, task, PROMPT, cfg, task.encode(sentiment_records(16, 1)), out, task.encode(sentiment_records(8, 2)),
          progress=False)  # fmt: skip
    records, board = logged(out), events(out)
    steps = [r for r in records if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s"):
        got = series(board, f"train/{key}")
        assert [s for s, _ in got] == [r["step"] for r in steps], key
        assert [v for _, v in got] == pytest.approx([r[key] for r in steps], rel=1e-6), key  # stored as float32
    validations = [r for r in records if "valid" in r]
    assert [r["step"] for r in validations] == [0, 3, 6]
    for key in ("accuracy", "macro_f1", "gold_logprob"):
        got = series(board, f"valid/{key}")
        assert [s for s, _ in got] == [0, 3, 6], key
        assert [v for _, v in got] == pytest.approx([r["valid"][key] for r in validations], rel=1e-6), key
    assert "valid/n" not in board.Tags()["scalars"]
    # the settings: as TensorBoard's hparams plugin reads them, and in the YAML file Accelerate writes beside them
    (session,) = {p.parent for p in trackers.tensorboard_dir(out).rglob("events.out.tfevents.*")} - {
        trackers.tensorboard_dir(out) / trackers.PROJECT}
    plugin = EventAccumulator(str(session))
    plugin.Reload()
    content = plugin.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    stored = plugin_data_pb2.HParamsPluginData.FromString(content).session_start_info.hparams
    assert {name: (value.WhichOneof("kind"), getattr(value, value.WhichOneof("kind"))) for name, value in
            stored.items()} == {name: (KIND[type(value)], value) for name, value in RUN_SETTINGS.items()}  # fmt: skip
    (saved,) = trackers.tensorboard_dir(out).rglob("hparams.yml")
    assert yaml.safe_load(saved.read_text()) == RUN_SETTINGS


def test_multitask_and_search_runs_name_each_task_and_candidate(tmp_path, monkeypatch, capsys):
    backbone = tiny_backbone("llama")
    task = sentiment_task(backbone)
    data = {name: TrainingTask(task, task.encode(sentiment_records(8, seed)), task.encode(sentiment_records(4, seed + 5)))
            for name, seed in (("alpha", 1), ("beta", 2))}  # fmt: skip
    out = tmp_path / "multi"
    train_multitask(backbone, data, PROMPT, TrainConfig(steps=4, batch_size=4, eval_every=2, report_to="tensorboard"),
                    out, progress=False)  # fmt: skip
    board = events(out)
    for name in data:
        expected = [(r["step"], r["valid"]["accuracy"]) for r in logged(out) if r.get("task") == name]
        assert [s for s, _ in expected] == [0, 2, 4]
        assert_series(board, f"valid/{name}/accuracy", expected)
    assert "valid/accuracy" not in board.Tags()["scalars"]

    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    model, train_file = save_tiny_model(tmp_path / "model"), write_data(tmp_path / "train.jsonl", 16, 1)
    out = tmp_path / "search"
    code, _, err = run_main(monkeypatch, capsys, [
        "train", "--model", model, "--train", train_file, "--valid", train_file, "--template", TEMPLATE, "--labels",
        LABELS, "--label-field", "label", "--grid", "lr=0.3,0.03", "--num-tokens", 3, "--steps", 4, "--eval-every",
        2, "--no-progress", "--report-to", "tensorboard", "--out", out])  # fmt: skip
    assert code == 0, err
    board, records = events(out), logged(out)
    names = list(dict.fromkeys(r["candidate"] for r in records if "candidate" in r))
    assert len(names) == 2
    for name in names:
        expected = [(r["step"], r["valid"]["accuracy"]) for r in records if r.get("candidate") == name]
        assert_series(board, f"valid/{name}/accuracy", expected)
    assert [s for s, _ in series(board, "train/candidates")] == [1, 2, 3, 4]


def test_the_cli_default_is_tensorboard_when_installed(tmp_path, monkeypatch, capsys):
    """Without --report-to (and without $SOFTPROMPT_REPORT_TO) a run reports to TensorBoard, which the tests install;
    --report-to none writes no tracker files."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(trackers.ENV)
    model, data = save_tiny_model(tmp_path / "model"), write_data(tmp_path / "train.jsonl", 16, 1)
    args = ["train", "--model", model, "--train", data, "--template", TEMPLATE, "--labels", LABELS, "--label-field",
            "label", "--num-tokens", 3, "--steps", 3, "--no-progress"]  # fmt: skip
    for extra, tracked in (([], True), (["--report-to", "none"], False)):
        out = tmp_path / f"run-{tracked}"
        code, _, err = run_main(monkeypatch, capsys, args + extra + ["--out", out])
        assert code == 0, err
        assert trackers.tensorboard_dir(out).is_dir() == tracked
    assert_series(events(tmp_path / "run-True"), "train/loss",
                  [(r["step"], r["loss"]) for r in logged(tmp_path / "run-True")])


def test_auto_and_all_mean_what_they_say(monkeypatch):
    assert trackers.installed("tensorboard") and not trackers.installed("no_such_tracker_package")
    monkeypatch.delenv(trackers.ENV)
    assert trackers.resolve("auto") == ["tensorboard"]
    assert trackers.resolve("none") == [] and trackers.resolve("tensorboard") == ["tensorboard"]
    present = {"tensorboard", "mlflow"}
    monkeypatch.setattr(trackers, "installed", lambda name: name in present)
    assert trackers.resolve("all") == ["tensorboard", "mlflow"] and trackers.resolve("mlflow") == ["mlflow"]
    present.clear()
    assert trackers.resolve("auto") == [] and trackers.resolve("all") == []
    monkeypatch.setenv(trackers.ENV, "none")
    present.add("tensorboard")
    assert trackers.resolve("auto") == []
    monkeypatch.setenv(trackers.ENV, "bogus")
    with pytest.raises(SoftPromptError, match=r"\$SOFTPROMPT_REPORT_TO='bogus' is not one of tensorboard, wandb"):
        trackers.resolve("auto")
    with pytest.raises(SoftPromptError, match="report_to 'comet' is not one of auto, tensorboard, wandb, mlflow, all, "
                                              "none"):  # fmt: skip
        TrainConfig(report_to="comet")
    assert TrainConfig().report_to == "auto"


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_tracker_package_stops_the_run_before_it_starts(tmp_path, monkeypatch, capsys, tracker):
    """Whether or not the package is really installed here, the check is what decides (so the test runs the same
    everywhere): the command fails before loading the model, the library before writing anything."""
    monkeypatch.setattr(trackers, "installed", lambda name: name == "tensorboard")
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    expected = (f"--report-to {tracker} needs the package `{tracker}`, which is not installed: `pip install {tracker}`, "
                "or choose --report-to none.")  # fmt: skip
    out = tmp_path / "never"
    code, _, err = run_main(monkeypatch, capsys, [
        "train", "--model", tmp_path / "no-model-needed", "--train", write_data(tmp_path / "d.jsonl", 8, 1),
        "--template", TEMPLATE, "--labels", LABELS, "--label-field", "label", "--report-to", tracker, "--out", out])
    assert code == 2 and "Traceback" not in err
    assert f"error: {expected}" in err
    backbone = tiny_backbone("llama")
    task = sentiment_task(backbone)
    with pytest.raises(SoftPromptError) as info:
        train(backbone, task, PROMPT, TrainConfig(steps=2, batch_size=4, report_to=tracker),
              task.encode(sentiment_records(8, 1)), out, progress=False)  # fmt: skip
    assert str(info.value) == expected
    assert not out.exists()


def test_a_resumed_run_may_change_its_tracker(tmp_path):
    backbone = tiny_backbone("llama")
    task = sentiment_task(backbone)
    examples, out = task.encode(sentiment_records(16, 1)), tmp_path / "run"
    cfg = TrainConfig(steps=3, batch_size=4, checkpoint_every=3, report_to="none")
    train(backbone, task, PROMPT, cfg, examples, out, progress=False)
    assert not trackers.tensorboard_dir(out).exists()
    cfg = TrainConfig(steps=5, batch_size=4, checkpoint_every=3, report_to="tensorboard")
    train(backbone, task, PROMPT, cfg, examples, out, progress=False, resume=True)
    assert [s for s, _ in series(events(out), "train/loss")] == [4, 5]
    assert [r["step"] for r in logged(out)] == [1, 2, 3, 4, 5]


def test_values_of_a_record():
    assert trackers.values_of({"step": 3, "loss": 0.5, "lr": 0.01, "grad_norm": 1.0, "tokens_per_s": 9.0}) == {
        "train/loss": 0.5, "train/lr": 0.01, "train/grad_norm": 1.0, "train/tokens_per_s": 9.0}
    valid = {"accuracy": 0.5, "macro_f1": 0.4, "n": 8, "gold_logprob": -0.7}
    assert trackers.values_of({"step": 3, "valid": valid}) == {"valid/accuracy": 0.5, "valid/macro_f1": 0.4,
                                                               "valid/gold_logprob": -0.7}  # fmt: skip
    assert trackers.values_of({"step": 3, "candidate": "prompt-text-4-lr0p3", "valid": {"loss": 1.5, "bleu": 3.0}}) == {
        "valid/prompt-text-4-lr0p3/loss": 1.5, "valid/prompt-text-4-lr0p3/bleu": 3.0}
