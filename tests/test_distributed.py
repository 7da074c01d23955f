"""Training under `accelerate launch` (issue 5): two CPU processes (torchrun + gloo) that each train on half of every
global batch end with the same prompt as one process trained on the whole batch, to float tolerance, for prefix
tuning (plain DDP and with the frozen layers sharded) and for prompt tuning (its embeddings run in front of every
packed row, `training_input`). A generation task (targets of different lengths) with gradient accumulation in the
distributed run checks that the loss is the mean over the global batch's target tokens however the batch is split.

`accelerate launch --cpu` alone starts a single process (its multi-CPU path needs MPI), so the launcher is told
`--multi_gpu` (or `--use_fsdp`), which starts the processes through torchrun; without CUDA, softprompt trains them on
the CPU over gloo.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_model
from test_cli import save_tiny_model, write_data

STEPS = 5


def free_port() -> str:
    """A loopback port nothing listens on now, so concurrent test runs do not meet at a fixed one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def launch() -> list:
    """`accelerate launch` of two processes on this machine (the distributed kind still to be added)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port()]  # fmt: skip


def training_args(tmp_path: Path, method: str) -> list:
    """`train` on a tiny Llama folder and a generation task, STEPS steps of 8 rows, validated every 2 steps."""
    model = save_tiny_model(tmp_path / "tiny")
    data = write_data(tmp_path / "train.jsonl", 48, seed=1)
    valid = write_data(tmp_path / "valid.jsonl", 6, seed=2)
    return ["train", "--model", model, "--train", data, "--valid", valid, "--template", "write a {label} review:",
            "--target-field", "text", "--method", method, "--num-tokens", "3", "--init", "random", "--steps",
            STEPS, "--eval-every", "2", "--patience", "0", "--batch-size", "8", "--lr", "0.05", "--warmup-steps", "0",
            "--no-progress"]  # fmt: skip


def run_all(tmp_path: Path, runs: dict[str, list], report: str = "Saved the best prompt") -> None:
    """Start every command at once, wait for all; each must succeed and `report` once (from the main process)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SOFTPROMPT_CACHE": str(tmp_path / "cache"),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    started = {name: subprocess.Popen([str(a) for a in args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True) for name, args in runs.items()}  # fmt: skip
    for name, process in started.items():
        out, err = process.communicate(timeout=600)
        assert process.returncode == 0, f"{name}:\n{err[-4000:]}"
        assert out.count(report) == 1, out


def final(folder: Path) -> tuple[dict, dict, list[float]]:
    """A finished run's last checkpoint, its training summary and its per-step losses."""
    checkpoint = torch.load(max((folder / "checkpoints").glob("*.pt")), weights_only=False)
    assert checkpoint["finished"] and checkpoint["step"] == STEPS
    training = json.loads((folder / "config.json").read_text())["training"]
    log = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return checkpoint, training, [r["loss"] for r in log if "loss" in r]


def assert_same_training(folder: Path, alone: Path, key: str) -> dict:
    """The run in `folder` (two processes) took the per-step losses, reached the prompt (`key` of the checkpoint)
    and validated as the run `alone`, which moved its prompt every step; returns its training summary."""
    one, one_training, one_losses = final(alone)
    checkpoint, training, losses = final(folder)
    assert len(one_losses) == STEPS and len(set(one_losses)) == STEPS  # the prompt moved every step
    assert one_training["processes"] == 1 and training["processes"] == 2
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(one_losses), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(checkpoint["prompts"][key], one["prompts"][key], atol=1e-5, rtol=1e-4)
    assert training["valid"] == pytest.approx(one_training["valid"], rel=1e-4)
    return training


def test_two_processes_train_the_same_prompt_as_one(tmp_path):
    """Prefix tuning. Plain DDP, and with the frozen decoder layers sharded across the two processes (--shard-model,
    FSDP2), and `accelerate launch --use_fsdp` without --shard-model, which implies it: the same per-step losses and
    final prompt as one process; validation (greedy generation) runs through the sharded layers too."""
    common = training_args(tmp_path, "prefix")
    launcher = [*launch(), "--multi_gpu", "-m", "softprompt"]
    runs = {
        "one": [sys.executable, "-m", "softprompt", *common, "--out", tmp_path / "one"],
        "two": [*launcher, *common, "--grad-accum", "2", "--out", tmp_path / "two"],
        "sharded": [*launcher, *common, "--shard-model", "--out", tmp_path / "sharded"],
        "fsdp": [*launch(), "--use_fsdp", "-m", "softprompt", *common, "--out", tmp_path / "fsdp"],
    }
    for name, args in runs.items():  # one at a time: each launch takes the machine's cores
        run_all(tmp_path, {name: args})
    one_training = final(tmp_path / "one")[1]
    assert not one_training["shard_model"] and not one_training["model_sharded"]
    for name in ("two", "sharded", "fsdp"):
        training = assert_same_training(tmp_path / name, tmp_path / "one", "prompts.prompt.prefix")
        assert training["shard_model"] == training["model_sharded"] == (name != "two"), name
    assert final(tmp_path / "two")[0]["train_config"]["grad_accum"] == 2
    # each sharded process holds half of the decoder layers' weights (embeddings, norm and head stay whole)
    layer_params = sum(p.numel() for p in tiny_model("llama").model.layers.parameters())
    for name in ("sharded", "fsdp"):
        held = final(tmp_path / name)[1]["frozen_parameters_per_process"]
        assert held == one_training["frozen_parameters_per_process"] - layer_params // 2, name


def test_two_processes_train_the_same_prompt_tuning_embeddings_as_one(tmp_path):
    """Prompt tuning, which trains through `training_input` (P in front of the packed row of the batch's own pass):
    two DDP processes with gradient accumulation take the same per-step losses, end with the same embeddings and
    validate alike as one process. The two runs share the machine at once."""
    common = training_args(tmp_path, "prompt")
    run_all(tmp_path, {
        "one": [sys.executable, "-m", "softprompt", *common, "--out", tmp_path / "one"],
        "two": [*launch(), "--multi_gpu", "-m", "softprompt", *common, "--grad-accum", "2", "--out", tmp_path / "two"],
    })  # fmt: skip
    assert_same_training(tmp_path / "two", tmp_path / "one", "prompts.prompt.embeddings")
    assert final(tmp_path / "two")[0]["train_config"]["grad_accum"] == 2


def test_two_processes_distill_the_same_prompt_as_one(tmp_path):
    """Distillation caches the teacher's prefix on the training device before the accelerator exists; it must
    still see two launched CPU processes as two (a bare process state had each train alone on the whole batch and
    both write the artifact): the same per-step losses, prompt and validation as one process."""
    from test_distill import LABELS, STUDENT, TEACHER, records, write_jsonl

    common = ["distill", "--model", save_tiny_model(tmp_path / "tiny"), "--template", STUDENT,
              "--teacher-template", TEACHER, "--labels", ",".join(LABELS),
              "--train", write_jsonl(tmp_path / "train.jsonl", records(24, seed=9)),
              "--valid", write_jsonl(tmp_path / "valid.jsonl", records(12, seed=10, labelled=True)),
              "--num-tokens", "3", "--init", "random", "--steps", STEPS, "--eval-every", "2", "--patience", "0",
              "--batch-size", "8", "--lr", "0.05", "--warmup-steps", "0", "--no-progress"]  # fmt: skip
    run_all(tmp_path, {
        "one": [sys.executable, "-m", "softprompt", *common, "--out", tmp_path / "one"],
        "two": [*launch(), "--multi_gpu", "-m", "softprompt", *common, "--out", tmp_path / "two"],
    }, report="Saved the distilled prompt")  # fmt: skip
    assert_same_training(tmp_path / "two", tmp_path / "one", "prompts.prompt.prefix")
