"""Surviving interruptions (issue 5): a run killed with SIGKILL and resumed ends with a prompt bit-identical to an
uninterrupted run; SIGTERM writes a valid checkpoint before exiting; a resume with other settings, or a new run into
an --out that holds one, is refused without touching what is there; a non-finite loss stops the run cleanly.

Runs are the real `softprompt train` command in subprocesses (one thread each, so the arithmetic is the same in
every run) on a tiny Llama saved to disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softprompt.checkpoint import latest_checkpoint
from softprompt.cli import main

from test_cli import CLI, save_tiny_model, write_data

STEPS = 40


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    env = {**os.environ, "SOFTPROMPT_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    return dict(root=root, env=env, model=save_tiny_model(root / "tiny"), train=write_data(root / "train.jsonl", 64, 1),
                valid=write_data(root / "valid.jsonl", 16, 2))  # fmt: skip


def train_args(setup, out: Path, *extra) -> list[str]:
    return [*CLI, "train", "--model", setup["model"], "--train", setup["train"], "--valid", setup["valid"],
            "--template", "review {text} sentiment", "--labels", "negative,positive", "--label-field", "label",
            "--out", out, "--steps", STEPS, "--eval-every", 10, "--checkpoint-every", 5, "--num-tokens", 4,
            "--init", "random", "--lr", "0.05", "--patience", 0, "--no-progress", *extra]  # fmt: skip


def run(setup, args) -> subprocess.CompletedProcess:
    result = subprocess.run([str(a) for a in args], env=setup["env"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def interrupt(setup, args, sig: int) -> subprocess.CompletedProcess:
    """Start a run and send `sig` as soon as its first checkpoint exists (long before its last step)."""
    out = Path(args[args.index("--out") + 1])
    process = subprocess.Popen([str(a) for a in args], env=setup["env"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)  # fmt: skip
    deadline = time.monotonic() + 240
    while latest_checkpoint(out) is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    process.send_signal(sig)
    stdout, stderr = process.communicate(timeout=120)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def final_state(out: Path) -> tuple[dict, dict]:
    """The saved artifact's tensors and the last checkpoint's prompt (the last step's values)."""
    checkpoint = torch.load(latest_checkpoint(out), weights_only=False)
    assert checkpoint["finished"] and checkpoint["step"] == STEPS
    return load_file(out / "prompt.safetensors"), checkpoint["prompts"]


def assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key} differs"


PREFIX_MLP = ["--method", "prefix", "--prefix-mlp", "--mlp-hidden", 16]
"""Prefix tuning through its MLP: the hardest case for a checkpoint, which must carry the MLP (not the folded
prefix) so that training continues exactly."""


@pytest.fixture(scope="module")
def reference(setup):
    out = setup["root"] / "uninterrupted"
    run(setup, train_args(setup, out, *PREFIX_MLP))
    return final_state(out)


def test_sigkill_then_resume_is_bit_identical(setup, reference):
    out = setup["root"] / "killed"
    killed = interrupt(setup, train_args(setup, out, *PREFIX_MLP), signal.SIGKILL)
    assert killed.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    stopped_at = torch.load(latest_checkpoint(out), weights_only=False)
    assert not stopped_at["finished"] and stopped_at["step"] < STEPS
    assert any(".mlp." in k for k in stopped_at["prompts"])
    resumed = run(setup, train_args(setup, out, *PREFIX_MLP, "--resume"))
    assert "resuming from" in resumed.stderr and "Traceback" not in resumed.stderr
    artifact, last = final_state(out)
    assert_identical(artifact, reference[0])
    assert_identical(last, reference[1])
    log_steps = [line for line in (out / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(log_steps) == STEPS  # no step logged twice, none missing


def test_sigterm_writes_a_checkpoint_and_resume_finishes(setup, reference):
    out = setup["root"] / "terminated"
    stopped = interrupt(setup, train_args(setup, out, *PREFIX_MLP), signal.SIGTERM)
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert "SIGTERM received" in stopped.stderr and "--resume" in stopped.stderr
    assert "Traceback" not in stopped.stderr
    checkpoint = torch.load(latest_checkpoint(out), weights_only=False)  # complete and loadable
    assert not checkpoint["finished"] and 0 < checkpoint["step"] < STEPS
    assert {"prompts", "optimizer", "scheduler", "torch_rng", "batches_consumed"} <= checkpoint.keys()
    run(setup, train_args(setup, out, *PREFIX_MLP, "--resume"))
    artifact, last = final_state(out)
    assert_identical(artifact, reference[0])
    assert_identical(last, reference[1])


def test_resume_with_other_settings_and_reuse_of_out_are_refused(setup, reference, capsys, monkeypatch):
    out = setup["root"] / "uninterrupted"
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    args = [str(a) for a in train_args(setup, out, *PREFIX_MLP)[3:]]
    other_data = write_data(setup["root"] / "other.jsonl", 64, 5)
    cases = (
        (args + ["--resume", "--lr", "0.1"], "lr: 0.05 -> 0.1"),
        ([str(other_data) if a == str(setup["train"]) else a for a in args] + ["--resume"], "training data differ"),
        (args, "pass --resume"),
    )
    for argv, expected in cases:
        monkeypatch.setattr("sys.argv", ["softprompt", *argv])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 2
        assert expected in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_non_finite_loss_stops_and_keeps_the_saved_prompt(setup, capsys, monkeypatch):
    out = setup["root"] / "diverged"
    args = [str(a) for a in train_args(setup, out)[3:]]
    args[args.index("--lr") + 1] = "1e38"  # the first update overflows the prompt
    monkeypatch.setattr("sys.argv", ["softprompt", *args, "--max-grad-norm", "0"])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "The training loss became" in err and "Try a lower --lr" in err
    saved = load_file(out / "prompt.safetensors")  # the step-0 prompt, still finite
    assert all(torch.isfinite(t).all() for t in saved.values())
