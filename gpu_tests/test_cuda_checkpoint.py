"""A checkpoint keeps the GPU's random generators (issue 25), so a run on the device resumes exactly: the numbers
the device draws after a restore are the ones it drew right after the save. Run by `bash scripts/test_gpu.sh`;
`SOFTPROMPT_TEST_DEVICE=cpu` checks the test itself on the CPU generator."""

from __future__ import annotations

import os

import torch
from torch import nn

from softprompt.training.checkpoint import RunIdentity, RunState, load_checkpoint, restore_run, save_run

DEVICE = torch.device(os.environ.get("SOFTPROMPT_TEST_DEVICE", "cuda"))


def test_a_resumed_run_draws_the_numbers_the_device_drew_after_the_save(tmp_path):
    prompts = nn.Linear(2, 2)
    optimizer = torch.optim.SGD(prompts.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    torch.randn(5, device=DEVICE)  # the generator is somewhere past its seed
    path = save_run(tmp_path, RunState(step=1), RunIdentity({}, {}, "data"), prompts, optimizer, scheduler)
    after_save = torch.randn(8, device=DEVICE)  # the reference: what the interrupted run went on to draw
    torch.randn(100, device=DEVICE)

    saved = load_checkpoint(path)
    assert ("cuda_rng" in saved) == (DEVICE.type == "cuda")  # only a run that used a GPU keeps its generators
    restore_run(saved, prompts, optimizer, scheduler)
    assert torch.equal(torch.randn(8, device=DEVICE), after_save)
