"""Residual prompt tuning (`PromptConfig.residual`): P + LayerNorm(up(ReLU(down(P)))) while training, folded into
plain embeddings when saved. The reference is that formula written out in this file from the module's raw parameters
(`residual_by_hand`), and the model's own forward over explicit `[P; E]`: what the method hands the backbone, its
gradient, the folded artifact (library and command line) and its logits are all checked against them."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from softprompt import artifact, methods
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import Example, TaskEncoder
from softprompt.errors import SoftPromptError
from softprompt.training.loop import loss_on, train

from conftest import VOCAB, run_main, tiny_backbone
from test_cli import save_tiny_model, write_data

TASK = TaskConfig(template="review {text} sentiment", labels=["negative", "positive"], label_field="label")
PARAMETERS = {"embeddings", "residual.0.weight", "residual.0.bias", "residual.2.weight", "residual.2.bias",
              "residual.3.weight", "residual.3.bias"}  # fmt: skip
"""Everything a residual prompt trains: P, the down and up projections, the LayerNorm's gain and bias."""


def residual_by_hand(params: dict[str, torch.Tensor]) -> torch.Tensor:
    """P + LayerNorm(up(ReLU(down(P)))) in float64 from raw tensors (LayerNorm: biased variance, eps 1e-5)."""
    p = {name: value.double() for name, value in params.items()}
    down = (p["embeddings"] @ p["residual.0.weight"].T + p["residual.0.bias"]).clamp(min=0)
    up = down @ p["residual.2.weight"].T + p["residual.2.bias"]
    centred = up - up.mean(-1, keepdim=True)
    normed = centred / (centred.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt()
    return p["embeddings"] + normed * p["residual.3.weight"] + p["residual.3.bias"]


def explicit_last_logits(backbone, prompt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The model's own forward over inputs_embeds = [P; E]: logits at the last position."""
    embeds = torch.cat([prompt, backbone.embed(torch.tensor(ids))])[None]
    return backbone.model(inputs_embeds=embeds).logits[0, -1].float()


def explicit_loss(model, prompt: torch.Tensor, examples: list[Example]) -> torch.Tensor:
    """Mean cross-entropy of the target tokens, each row read as [P; E(input + target)] by the model's own forward."""
    total, count = prompt.new_zeros(()), 0
    for e in examples:
        ids = torch.tensor(e.input_ids + e.target_ids)
        logits = model(inputs_embeds=torch.cat([prompt, model.get_input_embeddings()(ids)])[None]).logits[0]
        start = len(prompt) + len(e.input_ids) - 1  # the position that predicts the first target token
        total = total + F.cross_entropy(logits[start : start + len(e.target_ids)], torch.tensor(e.target_ids),
                                        reduction="sum")  # fmt: skip
        count += len(e.target_ids)
    return total / count


def residual_prompt(backbone, seed: int = 0):
    config = PromptConfig(method="prompt", num_tokens=4, init="random", residual=True, mlp_hidden=16)
    method = methods.build(config, backbone, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():  # as after some training: the residual branch no longer zero
        torch.manual_seed(seed)
        for param in method.residual.parameters():
            param.add_(torch.randn_like(param) * 0.3)
    return method


def records(n: int) -> list[dict]:
    return [{"text": " ".join(["one", "two", "three", "four"][: 1 + i % 4]), "label": ["negative", "positive"][i % 2]}
            for i in range(n)]  # fmt: skip


def test_a_new_residual_prompt_starts_as_its_init():
    backbone = tiny_backbone("llama", seed=1)
    plain = methods.build(PromptConfig(method="prompt", num_tokens=4, init="random"), backbone,
                          generator=torch.Generator().manual_seed(3))  # fmt: skip
    residual = methods.build(PromptConfig(method="prompt", num_tokens=4, init="random", residual=True), backbone,
                             generator=torch.Generator().manual_seed(3))  # fmt: skip
    assert torch.equal(residual.prompt(), plain.prompt())
    residual.prompt().sum().backward()  # the zero LayerNorm gain still gets a gradient, so the branch can learn
    assert residual.residual[3].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_the_backbone_and_the_artifact_get_the_hand_computed_residual_prompt(arch, tmp_path):
    """What a training step hands the backbone (`training_input`), the artifact tensor and the saved file are the MLP's
    output computed by hand from the module's raw parameters, whose every part matters here (some ReLU inputs are
    cut, LayerNorm's gain and bias are not 1 and 0); the prefixes of `kv()` and of the loaded (folded) artifact give
    the logits of that P in front of the input through the model's own forward."""
    backbone = tiny_backbone(arch, seed=2)
    method = residual_prompt(backbone)
    params = {name: value.detach() for name, value in method.named_parameters()}
    assert set(params) == PARAMETERS
    expected = residual_by_hand(params)
    pre_relu = params["embeddings"] @ params["residual.0.weight"].T + params["residual.0.bias"]
    assert (pre_relu < 0).any() and (pre_relu > 0).any()
    assert not torch.allclose(expected, params["embeddings"].double(), atol=0.1)  # the branch is not negligible
    close = dict(atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(method.training_input(backbone).double(), expected, **close)
        torch.testing.assert_close(method.artifact_tensors()["prompt_embeddings"].double(), expected, **close)
        folder = artifact.save(tmp_path / "p", method, TASK, backbone)
        on_disk = load_file(folder / "prompt.safetensors")
        assert set(on_disk) == {"prompt_embeddings"}
        torch.testing.assert_close(on_disk["prompt_embeddings"].double(), expected, **close)
        saved = artifact.load(folder)
        assert saved.prompt.residual is False and set(saved.tensors) == {"prompt_embeddings"}
        ids = backbone.tokenizer("review one two three sentiment")["input_ids"]
        reference = explicit_last_logits(backbone, expected.float(), ids)
        for prefix in (method.kv(backbone), artifact.prefix_of(saved, backbone)):
            hidden, _ = backbone.forward(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                         backbone.new_cache(prefix, 1))  # fmt: skip
            torch.testing.assert_close(backbone.logits(hidden[0, -1]), reference, atol=1e-4, rtol=1e-4)


def test_the_training_loss_sends_the_hand_built_prompts_gradient_to_every_residual_parameter():
    """The loss a training step takes (`loss_on` over `training_input`) and its gradient with respect to P and every
    MLP parameter equal those of the hand-built residual prompt read as [P; E] by the model's own forward."""
    backbone = tiny_backbone("llama", seed=4)
    method = residual_prompt(backbone, seed=1)
    examples = TaskEncoder(TASK, backbone.tokenizer).encode(records(6))
    loss, _ = loss_on(backbone, method.training_input(backbone), examples)
    loss.backward()
    leaves = {name: value.detach().clone().requires_grad_() for name, value in method.named_parameters()}
    reference = explicit_loss(backbone.model, residual_by_hand(leaves).float(), examples)
    reference.backward()
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    for name, param in method.named_parameters():
        assert leaves[name].grad.abs().sum() > 0, name
        torch.testing.assert_close(param.grad, leaves[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_training_moves_the_residual_branch_and_saves_its_folded_output(tmp_path):
    """A few steps from a new residual prompt (LayerNorm gain zero, so the linears get no gradient at the first step)
    move P and every MLP parameter, each linear's weight included (AdamW without weight decay moves only what a
    gradient reached); the artifact is the hand-computed residual output of the final parameters, which the final
    checkpoint holds, as plain embeddings."""
    backbone = tiny_backbone("llama", seed=3)
    task = TaskEncoder(TASK, backbone.tokenizer)
    config = PromptConfig(method="prompt", num_tokens=3, init="random", residual=True, mlp_hidden=8)
    start = methods.build(config, backbone, generator=torch.Generator().manual_seed(0))
    before = {name: value.detach().clone() for name, value in start.named_parameters()}
    assert not before["residual.3.weight"].any()
    run = train(backbone, task, config, TrainConfig(steps=4, batch_size=4, eval_every=0, lr=0.1, weight_decay=0.0),
                task.encode(records(16)), tmp_path / "run", init_method=start, progress=False)  # fmt: skip
    checkpoint = torch.load(max((tmp_path / "run" / "checkpoints").glob("*.pt")), weights_only=False)
    assert checkpoint["finished"] and checkpoint["step"] == 4
    final = {name.removeprefix("prompts.prompt."): value for name, value in checkpoint["prompts"].items()}
    assert set(final) == PARAMETERS
    for name in PARAMETERS:
        assert not torch.allclose(final[name], before[name]), f"{name} did not move"
    saved = artifact.load(tmp_path / "run")
    assert saved.prompt.residual is False and run.method.config.residual is False  # folded
    assert set(load_file(tmp_path / "run" / "prompt.safetensors")) == {"prompt_embeddings"}
    torch.testing.assert_close(saved.tensors["prompt_embeddings"].double(), residual_by_hand(final), atol=1e-5,
                               rtol=1e-5)  # fmt: skip
    assert torch.equal(saved.tensors["prompt_embeddings"], run.method.embeddings.detach().cpu())


def test_the_residual_command_saves_plain_embeddings_that_evaluate_as_explicit_p_e(tmp_path, monkeypatch, capsys):
    """`softprompt train --residual` on a tiny model folder: the artifact file holds only plain embeddings, the hand-
    computed residual output of the final checkpoint's parameters (no validation, so the last prompt is saved);
    `softprompt eval` loads it and reports the accuracy and gold log-probability that transformers alone (the model
    loaded from the folder, inputs_embeds = [P; E] with P read from the file) gives, and the library's logits behind
    the loaded artifact are those of that explicit forward."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model_dir = save_tiny_model(tmp_path / "tiny")
    data = write_data(tmp_path / "data.jsonl", 12, seed=3)
    out = tmp_path / "run"
    code, stdout, err = run_main(monkeypatch, capsys, [
        "train", "--model", model_dir, "--train", data, "--template", TASK.template, "--labels", "negative,positive",
        "--label-field", "label", "--method", "prompt", "--num-tokens", 3, "--init", "random", "--residual",
        "--mlp-hidden", 8, "--steps", 4, "--batch-size", 4, "--lr", 0.1, "--eval-every", 0, "--no-progress", "--out", out])  # fmt: skip
    assert code == 0, err
    config = json.loads((out / "config.json").read_text())
    assert config["residual"] is False and config["tensor_shapes"] == {"prompt_embeddings": [3, 32]}
    prompt = load_file(out / "prompt.safetensors")
    assert set(prompt) == {"prompt_embeddings"}
    p = prompt["prompt_embeddings"]
    checkpoint = torch.load(max((out / "checkpoints").glob("*.pt")), weights_only=False)
    final = {name.removeprefix("prompts.prompt."): value for name, value in checkpoint["prompts"].items()}
    assert set(final) == PARAMETERS and final["residual.3.weight"].any()  # trained through the MLP
    torch.testing.assert_close(p.double(), residual_by_hand(final), atol=1e-5, rtol=1e-5)

    code, stdout, err = run_main(monkeypatch, capsys, ["eval", "--prompt", out, "--data", data, "--json",
                                                       "--no-progress"])  # fmt: skip
    assert code == 0, err
    result = json.loads(stdout)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    words = [VOCAB["negative"], VOCAB["positive"]]
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    gold_logprobs, correct = [], 0
    library = tiny_backbone("llama", seed=0)  # the model the folder was saved from, built here
    prefix = artifact.prefix_of(artifact.load(out), library)
    with torch.no_grad():
        for row in rows:
            ids = tokenizer(TASK.template.format(text=row["text"]))["input_ids"]
            embeds = torch.cat([p, model.get_input_embeddings()(torch.tensor(ids))])[None]
            logits = model(inputs_embeds=embeds).logits[0, -1]
            hidden, _ = library.forward(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long),
                                        library.new_cache(prefix, 1))  # fmt: skip
            torch.testing.assert_close(library.logits(hidden[0, -1]), logits, atol=1e-4, rtol=1e-4)
            logprobs = logits.log_softmax(-1)[words]
            gold = ["negative", "positive"].index(row["label"])
            gold_logprobs.append(float(logprobs[gold]))
            correct += int(logprobs.argmax()) == gold
    assert result["n"] == len(rows) and result["accuracy"] == correct / len(rows)
    assert result["gold_logprob"] == pytest.approx(sum(gold_logprobs) / len(rows), rel=1e-5)


def test_residual_is_refused_for_prefix_tuning():
    with pytest.raises(SoftPromptError, match="residual applies to method=prompt only"):
        PromptConfig(method="prefix", residual=True, init="random")
