"""Training under `accelerate launch` (issue 5): two CPU processes (torchrun + gloo) that each train on half of every
global batch end with the same prompt as one process trained on the whole batch, to float tolerance. A generation
task (targets of different lengths) with gradient accumulation in the distributed run checks that the loss is the
mean over the global batch's target tokens however the batch is split.

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

import pytest
import torch

from conftest import tiny_model
from test_cli import save_tiny_model, write_data


def free_port() -> str:
    """A loopback port nothing listens on now, so concurrent test runs do not meet at a fixed one."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def test_two_processes_train_the_same_prompt_as_one(tmp_path):
    """Plain DDP, and with the frozen decoder layers sharded across the two processes (--shard-model, FSDP2), and
    `accelerate launch --use_fsdp` without --shard-model, which implies it: the same per-step losses and final prompt
    as one process; validation (greedy generation) runs through the sharded layers too."""
    model = save_tiny_model(tmp_path / "tiny")
    data = write_data(tmp_path / "train.jsonl", 48, seed=1)
    valid = write_data(tmp_path / "valid.jsonl", 6, seed=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SOFTPROMPT_CACHE": str(tmp_path / "cache"),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    common = ["train", "--model", model, "--train", data, "--valid", valid, "--template", "write a {label} review:",
              "--target-field", "text", "--method", "prefix", "--num-tokens", "3", "--init", "random", "--steps", "5",
              "--eval-every", "2", "--patience", "0", "--batch-size", "8", "--lr", "0.05", "--warmup-steps", "0",
              "--no-progress"]  # fmt: skip
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port()]  # fmt: skip
    launcher = [*launch, "--multi_gpu", "-m", "softprompt"]
    runs = {
        "one": [sys.executable, "-m", "softprompt", *common, "--out", tmp_path / "one"],
        "two": [*launcher, *common, "--grad-accum", "2", "--out", tmp_path / "two"],
        "sharded": [*launcher, *common, "--shard-model", "--out", tmp_path / "sharded"],
        "fsdp": [*launch, "--use_fsdp", "-m", "softprompt", *common, "--out", tmp_path / "fsdp"],
    }
    for name, args in runs.items():
        result = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{name}:\n{result.stderr[-4000:]}"
        assert result.stdout.count("Saved the best prompt") == 1, result.stdout  # one report, from the main process

    def final(name: str) -> tuple[dict, dict, list[float]]:
        checkpoint = torch.load(max((tmp_path / name / "checkpoints").glob("*.pt")), weights_only=False)
        assert checkpoint["finished"] and checkpoint["step"] == 5
        training = json.loads((tmp_path / name / "config.json").read_text())["training"]
        log = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        return checkpoint, training, [r["loss"] for r in log if "loss" in r]

    one, one_training, one_losses = final("one")
    assert len(one_losses) == 5 and len(set(one_losses)) == 5  # the prompt moved every step
    assert not one_training["shard_model"] and not one_training["model_sharded"]
    for name in ("two", "sharded", "fsdp"):
        checkpoint, training, losses = final(name)
        assert training["processes"] == 2
        assert training["shard_model"] == training["model_sharded"] == (name != "two"), name
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(one_losses), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(checkpoint["prompts"]["prompts.prompt.prefix"],
                                   one["prompts"]["prompts.prompt.prefix"], atol=1e-5, rtol=1e-4)  # fmt: skip
        assert training["valid"] == pytest.approx(one_training["valid"], rel=1e-4)
    assert final("two")[0]["train_config"]["grad_accum"] == 2
    # each sharded process holds half of the decoder layers' weights (embeddings, norm and head stay whole)
    layer_params = sum(p.numel() for p in tiny_model("llama").model.layers.parameters())
    for name in ("sharded", "fsdp"):
        held = final(name)[1]["frozen_parameters_per_process"]
        assert held == one_training["frozen_parameters_per_process"] - layer_params // 2, name
