"""Training under `accelerate launch` (issue 5): two CPU processes (torchrun + gloo) that each train on half of every
global batch end with the same prompt as one process trained on the whole batch, to float tolerance. A generation
task (targets of different lengths) with gradient accumulation in the distributed run checks that the loss is the
mean over the global batch's target tokens however the batch is split.

`accelerate launch --cpu` alone starts a single process (its multi-CPU path needs MPI), so the launcher is told
`--multi_gpu`, which starts the processes through torchrun; without CUDA, softprompt trains them on the CPU over gloo.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from test_cli import save_tiny_model, write_data


def test_two_processes_train_the_same_prompt_as_one(tmp_path):
    model = save_tiny_model(tmp_path / "tiny")
    data = write_data(tmp_path / "train.jsonl", 48, seed=1)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SOFTPROMPT_CACHE": str(tmp_path / "cache"),
           "TOKENIZERS_PARALLELISM": "false"}  # fmt: skip
    common = ["train", "--model", model, "--train", data, "--template", "write a {label} review:",
              "--target-field", "text", "--method", "prefix", "--num-tokens", "3", "--init", "random",
              "--steps", "5", "--batch-size", "8", "--lr", "0.05", "--warmup-steps", "0", "--no-progress"]  # fmt: skip
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
                "29533", "-m", "softprompt"]  # fmt: skip
    runs = {
        "one": [sys.executable, "-m", "softprompt", *common, "--out", tmp_path / "one"],
        "two": [*launcher, *common, "--grad-accum", "2", "--out", tmp_path / "two"],
    }
    for name, args in runs.items():
        result = subprocess.run([str(a) for a in args], env=env, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, f"{name}:\n{result.stderr[-4000:]}"
        assert result.stdout.count("Saved the best prompt") == 1, result.stdout  # one report, from the main process

    def final(out: Path) -> dict:
        checkpoint = torch.load(max((out / "checkpoints").glob("*.pt")), weights_only=False)
        assert checkpoint["finished"] and checkpoint["step"] == 5
        return checkpoint

    one, two = final(tmp_path / "one"), final(tmp_path / "two")
    assert two["train_config"]["grad_accum"] == 2
    assert (tmp_path / "two" / "config.json").read_text().count('"processes": 2') == 1
    losses = {name: [json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
                     if '"loss"' in line] for name in runs}  # fmt: skip
    assert len(losses["one"]) == 5 and len(set(losses["one"])) == 5  # the prompt moved every step
    torch.testing.assert_close(torch.tensor(losses["two"]), torch.tensor(losses["one"]), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(two["prompts"]["prompts.prompt.prefix"], one["prompts"]["prompts.prompt.prefix"], atol=1e-5, rtol=1e-4)
