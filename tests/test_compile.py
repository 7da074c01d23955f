"""`--compile` (backbones/compiled.py): the decoder's training pass compiled by inductor.

- The training step compiled gives what the plain model gives uncompiled: the loss and the prompt's gradient of
  `loss_on` against the plain transformers forward over explicit `[P; E]` (prompt tuning, in front of one packed row
  and as K/V behind two) and over the prefix as the model's past (prefix tuning), eager, computed before compiling;
  with gradient checkpointing too. Validation (no gradients) stays eager.
The CLI's `--compile`, and its fallback without a working compiler, are tested in test_cli_flags.py."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from softprompt.backbones import cache_keyword
from softprompt.data import Example
from softprompt.training.loop import loss_on

from conftest import EOS, random_prompt, tiny_backbone

TOL = dict(atol=1e-5, rtol=1e-4)  # fused kernels round differently


def rows(lengths: list[int]) -> list[Example]:
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    return [Example(ids(n - 3), ids(2) + [EOS]) for n in lengths]


def plain_loss(model, prompt: torch.Tensor, examples: list[Example]) -> torch.Tensor:
    """The definition, one example at a time through the plain model: soft tokens (n, hidden) read as inputs_embeds
    in front of the example, or a prefix (layers, 2, kv_heads, n, head_dim) as the model's past; the mean over the
    target tokens of their negative log-probability."""
    total, count = 0.0, 0
    for row in examples:
        ids = torch.tensor(row.input_ids + row.target_ids)
        if prompt.dim() == 2:
            embeds = torch.cat([prompt, model.get_input_embeddings()(ids)])[None]
            logits, n = model(inputs_embeds=embeds).logits[0], prompt.shape[0]
        else:
            past = DynamicCache([(layer[0][None], layer[1][None]) for layer in prompt], config=model.config)
            n = prompt.shape[-2]
            mask = torch.ones(1, n + len(ids), dtype=torch.long)
            logits = model(ids[None], attention_mask=mask, position_ids=n + torch.arange(len(ids))[None],
                           **{cache_keyword(model): past}).logits[0]  # fmt: skip
            n = 0  # the logits cover the tokens only
        before = n + len(row.input_ids) - 1 + torch.arange(len(row.target_ids))  # predicts each target token
        total = total - logits.float().log_softmax(-1)[before, torch.tensor(row.target_ids)].sum()
        count += len(row.target_ids)
    return total / count


@pytest.mark.parametrize("method_name,lengths,checkpointing", [
    ("prompt", [20, 14, 9], False), ("prompt", [110, 97, 83, 64], True), ("prefix", [20, 14, 9], False)],
    ids=["prompt-one-row", "prompt-two-rows-checkpointed", "prefix"])  # fmt: skip
def test_compiled_step_equals_the_plain_model(method_name, lengths, checkpointing):
    backbone = tiny_backbone("llama")
    method = random_prompt(backbone, method_name)
    examples = rows(lengths)
    param = next(method.parameters())
    given = method.training_input(backbone) if method_name == "prompt" else method.kv(backbone)
    reference = plain_loss(backbone.model, given, examples)
    (expected,) = torch.autograd.grad(reference, param)

    assert backbone.compile() is None
    calls, compiled = [], backbone._compiled_decoder
    backbone._compiled_decoder = lambda **kwargs: calls.append(1) or compiled(**kwargs)  # counts its runs
    backbone.gradient_checkpointing(checkpointing)
    loss, _ = loss_on(backbone, method.training_input(backbone), examples)
    (ours,) = torch.autograd.grad(loss, param)
    assert len(calls) == 1
    with torch.no_grad():
        loss_on(backbone, method.training_input(backbone), examples)
    assert len(calls) == 1, "a pass without gradients should run eager"
    torch.testing.assert_close(loss, reference, **TOL)
    assert expected.abs().max() > 0
    torch.testing.assert_close(ours, expected, **TOL)
