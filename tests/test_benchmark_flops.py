"""benchmarks/flops.py's count of a training step's matmul FLOPs against torch's own FLOP counter on the real step.

The step is `train.loss_on` + backward on a tiny Llama, rows short enough to pack into one row with no pad, so the
step does exactly the useful linear-layer and head work, and one thing more: prompt tuning runs its prompt through
the whole last layer, where only the keys/values are read (the backward skips the rest by itself). torch's count of
the step's matrix products (mm/addmm, forward and backward) must equal the shape-based count plus that. Attention
runs in SDPA kernels over whole (masked) blocks, so torch counts more there than the pairs that are useful; it is
left out of the comparison.

The step benchmarks/train_speed.py times for prompt tuning hands `loss_on` the prompt's embeddings (`training_input`),
which run in front of the packed row in the batch's own pass (or, when the rows fill several packed rows, once at
batch 1 as K/V); its count is checked the same way, with what that step computes beyond the useful work written out
by hand from the config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from softprompt import methods
from softprompt.backbones.causal import PACK_WIDTH
from softprompt.config import PromptConfig
from softprompt.data import Example, collate
from softprompt.training.loop import loss_on

from conftest import tiny_backbone

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root: the `benchmarks` package
from benchmarks.flops import step_flops, useful_flops  # noqa: E402


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


@pytest.mark.parametrize("targets", [1, 3])
@pytest.mark.parametrize("lengths", [(7, 12, 4), (150, 120, 60)], ids=["one-row", "two-rows"])
def test_training_input_step_flops_equal_torch_count(lengths, targets):
    """The prompt-tuning step train_speed.py times (`training_input` -> `loss_on`). In one packed row, P runs in
    front of it: torch's count of its matrix products is the useful count plus, by hand, P's last layer beyond its
    keys/values, forward and backward (its outputs there sit in the same tensor as the tokens', so the backward runs
    over them too), and the first layer's q/k/v input gradients of the real tokens (the embeddings share one tensor
    with P, which needs a gradient). 330 tokens overflow one packed row of 256: P then runs once at batch 1 as K/V
    (its last layer beyond its keys/values forward only), and the two packed rows' pad slots run through every linear
    layer forward and backward, but for the first layer's input gradients (the token embeddings need none)."""
    backbone, n = tiny_backbone("llama"), 5
    torch.manual_seed(0)
    prompt = methods.build(PromptConfig(method="prompt", num_tokens=n, init="random"), backbone)
    examples = [Example(input_ids=torch.randint(3, 100, (length - targets,)).tolist(),
                        target_ids=torch.randint(3, 100, (targets,)).tolist()) for length in lengths]  # fmt: skip
    calls = []  # the decoder's inputs: (R, n + width, hidden) embeddings, or P (1, n, hidden) then (R, width) ids
    backbone.decoder.register_forward_pre_hook(
        lambda _, args, kwargs: calls.append((kwargs.get("inputs_embeds"), kwargs.get("input_ids"))), with_kwargs=True)
    with FlopCounterMode(display=False) as counter:
        loss, _ = loss_on(backbone, prompt.training_input(backbone), examples)
        loss.backward()
    real, in_front = sum(lengths), len(calls) == 1
    assert in_front == (real <= PACK_WIDTH)
    rows, slots = calls[0][0].shape[:2] if in_front else calls[1][1].shape
    counts = counter.get_flop_counts()["Global"]
    measured = sum(v for op, v in counts.items() if str(op) in ("aten.mm", "aten.addmm"))
    batch = collate(examples, backbone.pad_id)
    counted = step_flops(backbone.model, batch.attention_mask.sum(-1).tolist(), len(batch.loss_tokens), n, "prompt")
    assert useful_flops(backbone.model, [examples], "prompt", n) * real == pytest.approx(counted.total, rel=1e-12)
    config = backbone.model.config
    hidden, intermediate, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    kv_width = config.num_key_value_heads * hidden // config.num_attention_heads
    q, k_v = 2 * hidden * hidden, 2 * 2 * hidden * kv_width  # forward FLOPs per token
    o_mlp = 2 * (hidden * hidden + 3 * hidden * intermediate)
    if in_front:
        beyond_useful = (2 * layers * (q + k_v + o_mlp) * (rows * slots - n - real)  # pad slots
                         + 2 * (q + o_mlp) * n  # P's last layer beyond its keys/values
                         + (q + k_v) * real)  # the first layer's input gradients of the real tokens  # fmt: skip
    else:
        beyond_useful = ((2 * layers * (q + k_v + o_mlp) - (q + k_v)) * (rows * slots - real)  # pad slots
                         + (q + o_mlp) * n)  # P's last layer beyond its keys/values, forward only  # fmt: skip
    assert measured == counted.linear + counted.head + beyond_useful
