"""Checks that need a CUDA GPU, which CI does not have: outside the default collection (pyproject's testpaths), run by
`bash scripts/test_gpu.sh`, which fails, never skips, without a GPU. `SOFTPROMPT_TEST_DEVICE=cpu` runs them on the
CPU, to check the tests themselves where no GPU is lent."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import EOS, random_prompt, tiny_backbone  # noqa: E402

from softprompt.data import Example  # noqa: E402
from softprompt.training.loop import loss_on  # noqa: E402

DEVICE = torch.device(os.environ.get("SOFTPROMPT_TEST_DEVICE", "cuda"))


def test_the_device_is_there():
    if DEVICE.type == "cuda":
        assert torch.cuda.is_available(), ("no CUDA device: scripts/test_gpu.sh needs one (SOFTPROMPT_TEST_DEVICE=cpu "
                                           "runs these tests on the CPU)")  # fmt: skip


def explicit_loss(model, P: torch.Tensor, rows: list[Example]) -> torch.Tensor:
    """The definition, one example at a time in float32: the plain model reads inputs_embeds = [P; E]."""
    total, count = 0.0, 0
    for row in rows:
        tokens = torch.tensor(row.input_ids + row.target_ids, device=P.device)
        embeds = torch.cat([P, model.get_input_embeddings()(tokens)])[None]  # (1, n + T, hidden)
        logits = model(inputs_embeds=embeds).logits[0].float()
        start = len(P) + len(row.input_ids) - 1  # predicts the first target token
        targets = torch.tensor(row.target_ids, device=P.device)
        total = total + F.cross_entropy(logits[start : start + len(targets)], targets, reduction="sum")
        count += len(targets)
    return total / count


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_prompt_tuning_step_on_the_device_equals_explicit_concatenation(dtype):
    """`loss_on` over `training_input` (P in front of the packed rows) on the device, in `dtype`, against the explicit
    [P; E] loss and dL/dP computed in float32 on the CPU."""
    backbone = tiny_backbone("llama")
    prompt = random_prompt(backbone, "prompt", n=4)
    rows = [Example([5, 6, 7, 8], [9, EOS]), Example([10, 11], [12, 13, EOS]), Example([14, 15, 16], [EOS])]
    reference = explicit_loss(backbone.model, prompt.embeddings, rows)
    (expected,) = torch.autograd.grad(reference, prompt.embeddings)

    backbone.model.to(DEVICE, dtype)
    prompt.to(DEVICE)
    loss, _ = loss_on(backbone, prompt.training_input(backbone), rows)
    (ours,) = torch.autograd.grad(loss, prompt.embeddings)
    assert loss.device.type == DEVICE.type and ours.device.type == DEVICE.type
    tolerance = 1e-5 if dtype == torch.float32 else 3e-2
    assert abs(loss.item() - reference.item()) <= tolerance * max(1.0, reference.item())
    cosine = F.cosine_similarity(ours.float().cpu().flatten(), expected.flatten(), dim=0).item()
    assert cosine > (1 - 1e-6 if dtype == torch.float32 else 0.99), cosine
