"""The base model's fingerprint names the model, not how it was loaded (issue 25): the same weights in float32,
bfloat16 or float16, whole or offloaded to disk, and as the vLLM front reads them from the files, are one model, so
an artifact trained in one dtype loads in another; a model with one weight changed, a fine-tune or another model is
refused; and artifacts of older versions (16 hex digits over float32 values, written out here from their definition)
load on the float32 model as before, and with a warning on a model loaded narrower."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from softprompt import artifact
from softprompt.backbones import backbone_for
from softprompt.config import TaskConfig
from softprompt.errors import SoftPromptError
from softprompt.models import fingerprint
from softprompt.serve.vllm_embeds import InputEmbeddings

from conftest import random_prompt, tiny_model, tiny_tokenizer
from test_cli import save_tiny_model

DTYPES = (torch.float32, torch.bfloat16, torch.float16)
TASK = TaskConfig(template="review {text} sentiment", labels=["negative", "positive"], label_field="label")


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[torch.dtype, Path]:
    """The tiny Llama saved as float32 (the random values as drawn) and as bfloat16 (as models are released), the
    latter with a few weights that float16 cannot hold: below its smallest normal value, and beyond its range."""
    root = tmp_path_factory.mktemp("fingerprint")
    folders = {torch.float32: save_tiny_model(root / "float32")}
    model = tiny_model("llama").to(torch.bfloat16)
    with torch.no_grad():
        model.get_input_embeddings().weight[0, :4] = torch.tensor([3e-7, -2.5e-6, 1e-5, 7e4])
    model.save_pretrained(root / "bfloat16")
    tiny_tokenizer().save_pretrained(root / "bfloat16")
    return {**folders, torch.bfloat16: root / "bfloat16"}


def loaded(folder: Path, dtype: torch.dtype, **options):
    """The model as transformers alone loads it from `folder` in `dtype`, frozen, with the tiny tokenizer."""
    return backbone_for(AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, **options), tiny_tokenizer())


def save_prompt(backbone, folder: Path) -> artifact.Artifact:
    return artifact.load(artifact.save(folder, random_prompt(backbone), TASK, backbone))


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16], ids=["stored-float32", "stored-bfloat16"])
def test_one_model_one_fingerprint_in_every_dtype_and_in_front_of_vllm(folders, stored):
    """Loaded in each dtype, and read from the files by the vLLM front: one fingerprint. A model stored in bfloat16
    (every value a float16 one) is equal in float16 too; float16 copies of float32 values can round twice, so there
    the fingerprints match through their samples."""
    front = InputEmbeddings.load(str(folders[stored])).fingerprint
    prints = {dtype: fingerprint(loaded(folders[stored], dtype).model) for dtype in DTYPES}
    exact = DTYPES if stored == torch.bfloat16 else (torch.float32, torch.bfloat16)
    assert all(prints[dtype] == front for dtype in exact)
    for dtype in DTYPES:
        assert prints[dtype].matches(front, front.sample, str(stored).removeprefix("torch."))
        assert front.matches(prints[dtype], prints[dtype].sample, str(dtype).removeprefix("torch."))


def test_offloaded_weights_have_the_fingerprint_of_the_whole_model(folders, tmp_path):
    """Accelerate's big-model placement, here the embeddings, the last layer, the norm and the head on disk (meta
    tensors in the model), in bfloat16: the fingerprint of the float32 model loaded whole."""
    placement = {"model.embed_tokens": "disk", "model.layers.0": "cpu", "model.layers.1": "disk",
                 "model.norm": "disk", "model.rotary_emb": "cpu", "lm_head": "disk"}  # fmt: skip
    offloaded = AutoModelForCausalLM.from_pretrained(folders[torch.float32], dtype=torch.bfloat16,
                                                     device_map=placement, offload_folder=tmp_path)  # fmt: skip
    assert offloaded.get_input_embeddings().weight.device.type == "meta"
    assert fingerprint(offloaded) == loaded(folders[torch.float32], torch.float32).fingerprint


@pytest.mark.parametrize("trained_in", DTYPES, ids=str)
def test_an_artifact_trained_in_one_dtype_loads_in_the_others(folders, tmp_path, trained_in):
    saved = save_prompt(loaded(folders[torch.float32], trained_in), tmp_path / "prompt")
    assert saved.extra["base_model_dtype"] == str(trained_in).removeprefix("torch.")
    for dtype in DTYPES:
        backbone = loaded(folders[torch.float32], dtype)
        prefix = artifact.prefix_of(saved, backbone)
        assert prefix.dtype == dtype and torch.isfinite(prefix).all()
    front = InputEmbeddings.load(str(folders[torch.float32]))
    assert torch.equal(front.prompt_input(saved), saved.tensors["prompt_embeddings"])


def changed(model, change) -> None:
    """Apply `change` to the tensors the fingerprint reads (the input embeddings and the last three parameters)."""
    with torch.no_grad():
        for tensor in [model.get_input_embeddings().weight, *list(model.parameters())[-3:]]:
            change(tensor)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_one_changed_weight_a_fine_tune_or_another_model_is_refused(folders, tmp_path, dtype):
    """An artifact of the float32 model, on models that differ from it, loaded in `dtype`: one embedding weight
    changed (not one of the sampled values), every fingerprinted weight moved by about 1% (a fine-tune), another
    seed's model. A float16 copy of float32 values is compared on the sample only, so there the one-weight change
    is out of reach (the hash decides in float32 and bfloat16)."""
    original = loaded(folders[torch.float32], torch.float32)
    saved = save_prompt(original, tmp_path / "prompt")
    artifact.attach(saved, loaded(folders[torch.float32], dtype))  # the same model loads

    one_weight = tiny_model("llama")
    with torch.no_grad():
        one_weight.get_input_embeddings().weight[3, 5] += 0.05  # flat index 101: the sample takes every 64th
    fine_tune = tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    changed(fine_tune, lambda t: t.mul_(1 + 0.01 * torch.randn(t.shape, generator=generator)))
    others = {"one weight changed": one_weight, "fine-tuned": fine_tune, "another model": tiny_model("llama", seed=1)}
    if dtype == torch.float16:
        del others["one weight changed"]
    for name, model in others.items():
        backbone = backbone_for(model.to(dtype), tiny_tokenizer())
        assert backbone.fingerprint != original.fingerprint, name
        with pytest.raises(SoftPromptError, match="was trained on base model") as info:
            artifact.attach(saved, backbone)
        assert saved.base_fingerprint in str(info.value) and backbone.fingerprint in str(info.value), name


def older_fingerprint(model) -> str:
    """Older versions' fingerprint, from their definition: sha256 over each tensor's shape and its float32 values
    (every k-th of those over a million), the input embeddings then the last three parameters, 16 hex digits."""
    digest = hashlib.sha256()
    for tensor in [model.get_input_embeddings().weight, *list(model.parameters())[-3:]]:
        values = tensor.detach().float().flatten()
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(values[:: max(1, values.numel() // 1_000_000)].numpy().tobytes())
    return digest.hexdigest()[:16]


def as_older_versions_saved(folder: Path, model) -> artifact.Artifact:
    """Rewrite a saved artifact's config.json as older versions wrote it."""
    config = json.loads((folder / "config.json").read_text())
    for key in ("base_model_sample", "base_model_dtype", "weights_sha256"):
        del config[key]
    config["base_model_fingerprint"] = older_fingerprint(model)
    (folder / "config.json").write_text(json.dumps(config))
    return artifact.load(folder)


def test_an_older_artifact_loads_on_the_float32_model_as_before(folders, tmp_path):
    folder = tmp_path / "prompt"
    original = loaded(folders[torch.float32], torch.float32)
    artifact.save(folder, random_prompt(original), TASK, original)
    saved = as_older_versions_saved(folder, original.model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked exactly: no warning
        artifact.attach(saved, loaded(folders[torch.float32], torch.float32))
        InputEmbeddings.load(str(folders[torch.float32])).prompt_input(saved)  # the front reads the files as stored
    with pytest.raises(SoftPromptError, match="was trained on base model") as info:
        artifact.attach(saved, backbone_for(tiny_model("llama", seed=1), tiny_tokenizer()))
    assert saved.base_fingerprint in str(info.value)
    assert older_fingerprint(tiny_model("llama", seed=1)) in str(info.value)  # both in the older scheme

    with pytest.warns(UserWarning, match="saved by an older softprompt.*only its shapes were checked"):
        artifact.attach(saved, loaded(folders[torch.float32], torch.bfloat16))  # cannot be checked exactly there
