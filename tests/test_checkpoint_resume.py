"""Surviving interruptions (issue 5): a run killed with SIGKILL and resumed ends with a prompt bit-identical to an
uninterrupted run; SIGTERM writes a valid checkpoint before exiting; a resume with other settings, or a new run into
an --out that holds one, is refused without touching what is there; a run that diverges (a huge learning rate: a
non-finite gradient; a poisoned example: a non-finite loss) stops with a message naming the problem and leaves the
best prompt, the log and the last good checkpoint byte for byte as they were.

Runs are the real `softprompt train` command in subprocesses (one thread each, so the arithmetic is the same in
every run) on a tiny Llama saved to disk.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softprompt.training.checkpoint import latest_checkpoint
from softprompt.cli import main

from conftest import VOCAB, tiny_model, tiny_tokenizer
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


POISON = "w100"
"""A filler word of the tiny vocabulary, whose input embedding the poisoned model holds as infinity."""


@pytest.fixture(scope="module")
def poisoned(setup):
    """The tiny model with the embedding of POISON set to infinity, and the training data with that word in one
    example: the loss turns NaN at the step whose batch holds it."""
    folder = setup["root"] / "poisoned"
    model = tiny_model("llama")
    with torch.no_grad():
        model.get_input_embeddings().weight[VOCAB[POISON]] = float("inf")
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    lines = Path(setup["train"]).read_text(encoding="utf-8").splitlines()
    lines[20] = json.dumps({"text": f"the {POISON} movie", "label": "positive"})
    data = setup["root"] / "poisoned.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {"model": folder, "train": data}


DIVERGING = {  # case: (options, what the message says went non-finite)
    # the first update throws the prefix to 1e30; the next step's backward overflows (its loss is still finite)
    "huge-lr": (["--method", "prefix", "--lr", "1e30"], "gradient norm became nan (loss "),
    "poisoned-example": (["--lr", "0.05"], "loss became nan at step"),
}


@pytest.mark.parametrize("case", list(DIVERGING))
def test_non_finite_training_stops_and_leaves_every_file_as_it_was(setup, poisoned, case, capsys, monkeypatch):
    options, problem = DIVERGING[case]
    if case == "poisoned-example":
        setup = {**setup, **poisoned}
    args = [str(a) for a in train_args(setup, setup["root"] / case, "--warmup-steps", 0, "--schedule", "constant",
                                       "--max-grad-norm", 0, "--checkpoint-every", 1, *options)[3:]]  # fmt: skip

    def train_until(out: Path, steps: int, *extra: str) -> tuple[int, str]:
        argv = list(args)
        argv[argv.index("--out") + 1], argv[argv.index("--steps") + 1] = str(out), str(steps)
        monkeypatch.setattr("sys.argv", ["softprompt", *argv, *extra])
        with pytest.raises(SystemExit) as exit_info:
            main()
        return exit_info.value.code, capsys.readouterr().err

    code, err = train_until(setup["root"] / case / "probe", STEPS)  # where does this run diverge?
    assert code == 2 and problem in err, err
    failing = int(re.search(r"at step (\d+)", err).group(1))
    assert failing >= 2, err  # so a good step, and its checkpoint, come first

    out = setup["root"] / case / "run"
    code, err = train_until(out, failing - 1)  # the good steps, as a run of their own: what must stay
    assert code == 0, err
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    last_good = out / "checkpoints" / f"step-{failing - 1:07d}.pt"
    assert {"prompt.safetensors", "config.json", "metrics.jsonl"} <= set(map(str, before)) and last_good.is_file()
    assert all(torch.isfinite(t).all() for t in load_file(out / "prompt.safetensors").values())

    code, err = train_until(out, STEPS, "--resume")  # the same run continued into the diverging step
    assert code == 2 and "Traceback" not in err
    lr = float(options[options.index("--lr") + 1])
    assert f"The training {problem}" in err
    assert f"at step {failing} (learning rate {lr:.3g}); training stopped" in err
    assert f"The best prompt so far stays in {out}, and the last good checkpoint is {last_good}." in err
    assert f"Try a lower --lr (now {lr})" in err
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after.keys() == before.keys()  # nothing written, no temporary file left behind
    assert [name for name in before if after[name] != before[name]] == []  # and nothing rewritten differently
    assert all(torch.isfinite(t).all() for t in torch.load(last_good, weights_only=False)["prompts"].values())
