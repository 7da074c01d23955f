"""Ctrl-C during training (issue 11), on the real `softprompt train` command in a subprocess on a tiny Llama:

- one SIGINT: the run finishes its step, writes a checkpoint of that step and exits with 130 (128 + SIGINT), and the
  checkpoint continues the run;
- a repeat within 2 s (a launcher forwarding the terminal's Ctrl-C to a process that already got it) is the same
  request: the checkpoint is still written;
- a second Ctrl-C later than that stops at once, in the middle of the checkpoint's write: exit 130, and neither a
  checkpoint nor a temporary file is left (the write is atomic).

The two repeat cases read no wall clock: the subprocess's signal handler reads a clock the test sets (a file, through
`softprompt.training.interruption.time`), and its checkpoint write (a wrapper around `softprompt.training.checkpoint.write_atomic`)
touches a marker file once the data is written, then waits until the handler has read that clock for the second
signal. So the second signal surely lands during the write, and the write ends only after the handler has decided.
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

from softprompt.training.checkpoint import checkpoint_dir, latest_checkpoint, load_checkpoint

from conftest import run_main
from test_cli import save_tiny_model, write_data

HELD_SAVE_CLI = [sys.executable, "-c", """
import os, time
from pathlib import Path
import softprompt.training.checkpoint as checkpoint
import softprompt.training.interruption as interruption
from softprompt.cli import main

clock, reads = Path(os.environ["TEST_CLOCK"]), []

class TestClock:
    @staticmethod
    def monotonic():
        reads.append(1)
        return float(clock.read_text())

interruption.time = TestClock  # the only clock the signal handler reads
real_write_atomic = checkpoint.write_atomic

def held_write_atomic(path, write):
    def held(tmp):
        write(tmp)
        Path(os.environ["SAVING_MARKER"]).touch()  # the data is in the temporary file, not yet renamed
        while len(reads) < 2:  # until the handler has read the clock for the second signal
            time.sleep(0.01)
    real_write_atomic(path, held)

checkpoint.write_atomic = held_write_atomic
main()
"""]
"""`softprompt` whose signal handler reads the test's clock (TEST_CLOCK, a file holding seconds) and whose checkpoint
write waits, once its data is written, for the handler of a second signal (the module's global is what
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
    """A training subprocess, killed at the end of the test if it is still running. With `clock`, a file that the
    test writes the seconds into that the subprocess's signal handler reads (HELD_SAVE_CLI)."""

    def __init__(self, setup, cli: list[str], out: Path, clock: Path | None = None):
        env = {**setup["env"], "TEST_CLOCK": str(clock), "SAVING_MARKER": str(out) + ".saving"}
        self.process = subprocess.Popen([str(a) for a in [*cli, *train_args(setup, out)]], env=env,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
        self.out, self.clock, self.saving = out, clock, Path(env["SAVING_MARKER"])

    def signal_at(self, seconds: float) -> None:
        """SIGINT, read by the handler at `seconds` on the test's clock."""
        self.clock.write_text(str(seconds))
        self.process.send_signal(signal.SIGINT)

    def training(self, seconds: float = 0.0) -> None:
        """Wait until the loop runs (a step is logged: the signal handlers are set), then send SIGINT."""
        wait_for(lambda: logged_steps(self.out), self.process, "a logged training step")
        if self.clock:
            self.signal_at(seconds)
        else:
            self.process.send_signal(signal.SIGINT)

    def finish(self, seconds: float = 240) -> tuple[int, str]:
        """Exit code and stderr (a deadline against hangs, not a timing assertion)."""
        try:
            _, err = self.process.communicate(timeout=seconds)
        except subprocess.TimeoutExpired:
            self.process.kill()
            _, err = self.process.communicate()
            pytest.fail(f"the run did not end within {seconds} s:\n{err[-3000:]}")
        return self.process.returncode, err

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
        code, err = run.finish()
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
    assert not any(torch.equal(last["prompts"][name], before)
                   for name, before in checkpoint["prompts"].items())  # every trained tensor moved on


def test_a_repeat_within_two_seconds_is_the_same_request(setup):
    """The repeat comes 1.5 s after the first signal on the handler's clock, while the checkpoint is being written;
    the write ends only after the handler has read the clock for it."""
    out, clock = setup["root"] / "repeat", setup["root"] / "repeat.clock"
    with Run(setup, HELD_SAVE_CLI, out, clock) as run:
        run.training(seconds=10.0)
        wait_for(run.saving.exists, run.process, "a checkpoint write")
        run.signal_at(11.5)
        code, err = run.finish()
    assert code == 130, err[-3000:]
    assert "Traceback" not in err and "SIGINT received: stopped after step" in err
    path = latest_checkpoint(out)
    assert path is not None and not load_checkpoint(path)["finished"]
    assert [p.name for p in checkpoint_dir(out).iterdir()] == [path.name]


def test_a_later_second_ctrl_c_stops_during_the_save(setup):
    """The second signal comes 2.5 s after the first on the handler's clock, while the checkpoint is being written:
    the write (which would complete once the handler has read the clock) never completes."""
    out, clock = setup["root"] / "second", setup["root"] / "second.clock"
    with Run(setup, HELD_SAVE_CLI, out, clock) as run:
        run.training(seconds=10.0)
        wait_for(run.saving.exists, run.process, "a checkpoint write")
        run.signal_at(12.5)  # past the 2 s in which a repeat is the same request
        code, err = run.finish()
    assert code == 130, err[-3000:]
    assert "Traceback" not in err
    assert "error: interrupted" in err
    assert "SIGINT received" not in err  # it never got to report a written checkpoint
    assert latest_checkpoint(out) is None
    assert not any(checkpoint_dir(out).iterdir()), "the interrupted write left a file behind"
