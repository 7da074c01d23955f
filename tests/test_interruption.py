"""Ctrl-C during training (issue 11), on the real `softprompt train` command in a subprocess on a tiny Llama:

- one SIGINT: the run finishes its step, writes a checkpoint of that step and exits with 130 (128 + SIGINT), and the
  checkpoint continues the run;
- a repeat within 2 s (a launcher forwarding the terminal's Ctrl-C to a process that already got it) is the same
  request: the checkpoint is still written;
- a second Ctrl-C later than that stops at once, in the middle of the checkpoint's write: exit 130, and neither a
  checkpoint nor a temporary file is left (the write is atomic).

The two repeat cases slow the checkpoint write down (a wrapper around `softprompt.checkpoint.write_atomic` that
touches a marker file once the data is written, then sleeps) so that the second signal surely lands during it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from softprompt.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint

from conftest import run_main
from test_cli import save_tiny_model, write_data

SLOW_SAVE_CLI = [sys.executable, "-c", """
import os, time
from pathlib import Path
import softprompt.checkpoint as checkpoint
from softprompt.cli import main

real_write_atomic = checkpoint.write_atomic

def slow_write_atomic(path, write):
    def slow(tmp):
        write(tmp)
        Path(os.environ["SLOW_SAVE_MARKER"]).touch()  # the data is in the temporary file, not yet renamed
        time.sleep(float(os.environ["SLOW_SAVE_SECONDS"]))
    real_write_atomic(path, slow)

checkpoint.write_atomic = slow_write_atomic
main()
"""]
"""`softprompt` whose checkpoint writes take SLOW_SAVE_SECONDS longer (the module's global is what
`save_checkpoint` calls)."""
PLAIN_CLI = [sys.executable, "-c", "from softprompt.cli import main; main()"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("interruption")
    env = {**os.environ, "SOFTPROMPT_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    return dict(root=root, env=env, model=save_tiny_model(root / "tiny"), train=write_data(root / "train.jsonl", 32, 1))


def train_args(setup, out: Path, steps: int = 100_000) -> list[str]:
    """No validation and no periodic checkpoints: a checkpoint can only come from the interruption."""
    return ["train", "--model", setup["model"], "--train", setup["train"], "--template", "review {text} sentiment",
            "--labels", "negative,positive", "--label-field", "label", "--out", out, "--steps", steps,
            "--checkpoint-every", 0, "--num-tokens", 4, "--init", "random", "--batch-size", 4, "--no-progress"]


def logged_steps(out: Path) -> list[int]:
    log = out / "metrics.jsonl"
    lines = log.read_text(encoding="utf-8").splitlines() if log.is_file() else []
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]


def wait_for(condition, process: subprocess.Popen, what: str, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if process.poll() is not None:
            _, err = process.communicate()
            pytest.fail(f"the run ended (code {process.returncode}) before {what}:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            process.kill()
            process.communicate()
            pytest.fail(f"no {what} within {seconds} s")
        time.sleep(0.01)


class Run:
    """A training subprocess, killed at the end of the test if it is still running."""

    def __init__(self, setup, cli: list[str], out: Path, marker: Path | None = None, sleep: float = 0):
        env = {**setup["env"], "SLOW_SAVE_MARKER": str(marker), "SLOW_SAVE_SECONDS": str(sleep)}
        self.process = subprocess.Popen([str(a) for a in [*cli, *train_args(setup, out)]], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.out = out

    def training(self) -> float:
        """Wait until the loop runs (a step is logged: the signal handlers are set), then send SIGINT; its time."""
        wait_for(lambda: logged_steps(self.out), self.process, "a logged training step")
        self.process.send_signal(signal.SIGINT)
        return time.monotonic()

    def finish(self, seconds: float = 60) -> tuple[int, str, float]:
        """Exit code, stderr, and when the process ended."""
        _, err = self.process.communicate(timeout=seconds)
        return self.process.returncode, err, time.monotonic()

    def __enter__(self):
        return self

    def __exit__(self, *_):
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()


def test_sigint_writes_a_checkpoint_exits_130_and_resumes(setup, monkeypatch, capsys):
    out = setup["root"] / "sigint"
    with Run(setup, PLAIN_CLI, out) as run:
        run.training()
        code, err, _ = run.finish()
    assert code == 128 + signal.SIGINT == 130, err[-3000:]
    assert "Traceback" not in err
    path = latest_checkpoint(out)
    assert path is not None, "no checkpoint written"
    checkpoint = load_checkpoint(path)  # complete and readable
    steps = logged_steps(out)
    # the step that was running when the signal came was finished, logged and checkpointed
    assert not checkpoint["finished"] and checkpoint["step"] == max(steps) == len(steps)
    assert f"SIGINT received: stopped after step {checkpoint['step']}, checkpoint written to {path}" in err
    assert "--resume" in err
    assert [p.name for p in checkpoint_dir(out).iterdir()] == [path.name]  # only this one, no temporary file
    # the same command with --resume continues from it (in-process: the same code path as the command)
    monkeypatch.setenv("SOFTPROMPT_CACHE", setup["env"]["SOFTPROMPT_CACHE"])
    args = train_args(setup, out, steps=checkpoint["step"] + 2)
    code, _, err = run_main(monkeypatch, capsys, [*args, "--resume"])
    assert code == 0, err[-3000:]
    assert f"resuming from {path}" in err
    last = load_checkpoint(latest_checkpoint(out))
    assert last["finished"] and last["step"] == checkpoint["step"] + 2
    assert logged_steps(out) == list(range(1, checkpoint["step"] + 3))
    assert not torch.equal(last["prompts"]["prompts.prompt.embeddings"],
                           checkpoint["prompts"]["prompts.prompt.embeddings"])  # fmt: skip


def test_a_repeat_within_two_seconds_is_the_same_request(setup):
    out, marker = setup["root"] / "repeat", setup["root"] / "repeat.saving"
    with Run(setup, SLOW_SAVE_CLI, out, marker, sleep=2.5) as run:
        first = run.training()
        wait_for(marker.exists, run.process, "a checkpoint write")
        run.process.send_signal(signal.SIGINT)
        repeat_after = time.monotonic() - first
        code, err, _ = run.finish()
    assert repeat_after < 2, f"the test sent its repeat {repeat_after:.1f} s after the first signal (too slow here)"
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "SIGINT received: stopped after step" in err
    path = latest_checkpoint(out)
    assert path is not None and not load_checkpoint(path)["finished"]
    assert [p.name for p in checkpoint_dir(out).iterdir()] == [path.name]


def test_a_later_second_ctrl_c_stops_during_the_save(setup):
    out, marker = setup["root"] / "second", setup["root"] / "second.saving"
    with Run(setup, SLOW_SAVE_CLI, out, marker, sleep=120) as run:
        first = run.training()
        wait_for(marker.exists, run.process, "a checkpoint write")
        time.sleep(max(0.0, first + 2.5 - time.monotonic()))  # past the 2 s in which a repeat is the same request
        run.process.send_signal(signal.SIGINT)
        sent = time.monotonic()
        code, err, ended = run.finish()
    assert ended - sent < 30, "the second Ctrl-C did not stop the run at once"  # the write would sleep 120 s
    assert code == 130, err[-3000:]
    assert "Traceback" not in err
    assert "error: interrupted" in err
    assert "SIGINT received" not in err  # it never got to report a written checkpoint
    assert latest_checkpoint(out) is None
    assert not any(checkpoint_dir(out).iterdir()), "the interrupted write left a file behind"
