"""benchmarks/flops.py's count of a training step's matmul FLOPs against torch's own FLOP counter on the real step.

The step is `train.loss_on` + backward on a tiny Llama, rows short enough to pack into one row with no pad, so the
step does exactly the useful linear-layer and head work, and one thing more: prompt tuning runs its prompt through
the whole last layer, where only the keys/values are read (the backward skips the rest by itself). torch's count of
the step's matrix products (mm/addmm, forward and backward) must equal the shape-based count plus that. Attention
runs in SDPA kernels over whole (masked) blocks, so torch counts more there than the pairs that are useful; it is
left out of the comparison."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from softprompt import methods
from softprompt.config import PromptConfig
from softprompt.data import Example
from softprompt.train import loss_on

from conftest import tiny_backbone

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from flops import step_flops  # noqa: E402


@pytest.mark.parametrize("method,targets", [("prompt", 1), ("prefix", 1), ("prompt", 3), ("prefix", 4)])
def test_linear_and_head_flops_equal_torch_count(method, targets):
    backbone = tiny_backbone("llama")
    torch.manual_seed(0)
    prompt = methods.build(PromptConfig(method=method, num_tokens=5, init="random"), backbone)
    lengths = [7, 12, 4]
    examples = [Example(input_ids=torch.randint(3, 100, (n - targets,)).tolist(),
                        target_ids=torch.randint(3, 100, (targets,)).tolist()) for n in lengths]  # fmt: skip
    with FlopCounterMode(display=False) as counter:
        loss, _ = loss_on(backbone, prompt.kv(backbone), examples)
        loss.backward()
    counts = counter.get_flop_counts()["Global"]
    measured = sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.addmm"))
    counted = step_flops(backbone.model, lengths, targets * len(lengths), 5, method)
    config = backbone.model.config
    hidden, intermediate = config.hidden_size, config.intermediate_size
    last_layer_rest = 2 * (hidden * hidden + hidden * hidden + 3 * hidden * intermediate)  # q, o, gate/up/down
    assert measured == counted.linear + counted.head + (5 * last_layer_rest if method == "prompt" else 0)
    assert counted.attention > 0
