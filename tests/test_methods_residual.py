"""Residual prompt tuning (`PromptConfig.residual`): P + LayerNorm(up(ReLU(down(P)))) while training, folded into
plain embeddings when saved. The folded artifact must give the logits of the unfolded prompt, computed by the
definition (explicit `[P'; E]` through the model's own forward)."""

from __future__ import annotations

import pytest
import torch

from softprompt import artifact, methods
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import Task
from softprompt.errors import SoftPromptError
from softprompt.train import train

from conftest import tiny_backbone

TASK = TaskConfig(template="review {text} sentiment", labels=["negative", "positive"], label_field="label")


def explicit_last_logits(backbone, prompt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The model's own forward over inputs_embeds = [P; E]: logits at the last position."""
    embeds = torch.cat([prompt, backbone.embed(torch.tensor(ids))])[None]
    return backbone.model(inputs_embeds=embeds).logits[0, -1].float()


def residual_prompt(backbone, seed: int = 0):
    config = PromptConfig(num_tokens=4, init="random", residual=True, mlp_hidden=16)
    method = methods.build(config, backbone, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # as after some training: the residual branch no longer zero
        torch.manual_seed(seed)
        for param in method.residual.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return method


def test_a_new_residual_prompt_starts_as_its_init():
    backbone = tiny_backbone("llama", seed=1)
    plain = methods.build(PromptConfig(num_tokens=4, init="random"), backbone, generator=torch.Generator().manual_seed(3))
    residual = methods.build(PromptConfig(num_tokens=4, init="random", residual=True), backbone,
                             generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(residual.prompt(), plain.prompt())
    residual.prompt().sum().backward()  # the zero LayerNorm gain still gets a gradient, so the branch can learn
    assert residual.residual[3].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_the_folded_artifact_gives_the_unfolded_prompts_logits(arch, tmp_path):
    backbone = tiny_backbone(arch, seed=2)
    method = residual_prompt(backbone)
    unfolded = method.prompt().detach()
    assert not torch.allclose(unfolded, method.embeddings)  # the residual branch changes P
    artifact.save(tmp_path / "p", method, TASK, backbone)
    saved = artifact.load(tmp_path / "p")
    assert saved.prompt.residual is False and set(saved.tensors) == {"prompt_embeddings"}
    prefix = artifact.prefix_of(saved, backbone)
    ids = backbone.tokenizer("review one two three sentiment")["input_ids"]
    with torch.no_grad():
        hidden, _ = backbone.forward(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                     backbone.new_cache(prefix, 1))  # fmt: skip
        ours = backbone.logits(hidden[0, -1])
        assert torch.allclose(ours, explicit_last_logits(backbone, unfolded, ids), atol=1e-4)


def test_training_moves_the_residual_branch_and_saves_plain_embeddings(tmp_path):
    backbone = tiny_backbone("llama", seed=3)
    task = Task(TASK, backbone.tokenizer)
    records = [{"text": " ".join(["one", "two", "three", "four"][: 1 + i % 4]), "label": ["negative", "positive"][i % 2]}
               for i in range(16)]  # fmt: skip
    config = PromptConfig(num_tokens=3, init="random", residual=True, mlp_hidden=8)
    run = train(backbone, task, config, TrainConfig(steps=4, batch_size=4, eval_every=0, lr=0.1), task.encode(records),
                tmp_path / "run", progress=False)  # fmt: skip
    saved = artifact.load(tmp_path / "run")
    assert saved.prompt.residual is False and run.method.config.residual is False  # folded
    assert torch.equal(saved.tensors["prompt_embeddings"], run.method.embeddings.detach().cpu())


def test_residual_is_refused_for_prefix_tuning():
    with pytest.raises(SoftPromptError, match="residual applies to method=prompt only"):
        PromptConfig(method="prefix", residual=True, init="random")
