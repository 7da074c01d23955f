"""PEFT interop with the real `peft` package: our export loads with `PeftModel.from_pretrained` and PEFT's own forward
gives our logits; adapters that PEFT itself trained-and-saved (`get_peft_model` + `save_pretrained`) import into
artifacts whose logits through our path equal PEFT's. Tiny random models of every test architecture."""

from __future__ import annotations

import json

import peft
import pytest
import torch

from softprompt import artifact, methods
from softprompt.backbones import backbone_for
from softprompt.config import PromptConfig, TaskConfig
from softprompt.errors import SoftPromptError
from softprompt.models import load_model
from softprompt.artifact.peft import ADAPTER_CONFIG, ADAPTER_WEIGHTS, export_peft, import_peft

from conftest import ARCHS, PAD, tiny_backbone, tiny_model, tiny_tokenizer, run_main

ATOL = 1e-4
TASK = TaskConfig(template="review {text} sentiment", labels=["negative", "positive"], label_field="label")


def batch(lengths=(6, 3, 5), seed=0):
    """Right-padded (input_ids, attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.full((len(lengths), max(lengths)), PAD, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = torch.randint(3, 128, (n,), generator=g)
        mask[row, :n] = 1
    return ids, mask


def our_logits(prompt_dir, arch):
    """Load our artifact onto a fresh backbone and run our prefix path: (B, T, vocab)."""
    backbone = tiny_backbone(arch)
    ids, mask = batch()
    with torch.no_grad():
        prefix = artifact.attach(artifact.load(prompt_dir), backbone).kv(backbone)
        hidden, _ = backbone.forward(ids, mask, backbone.new_cache(prefix, ids.shape[0]))
        return backbone.logits(hidden)


def peft_logits(peft_model, num_tokens: int):
    """PEFT's own forward over the full sequence; prompt tuning returns the virtual positions too, dropped here."""
    ids, mask = batch()
    with torch.no_grad():
        logits = peft_model.eval()(input_ids=ids, attention_mask=mask).logits.float()
    return logits[:, -ids.shape[1] :] if logits.shape[1] == num_tokens + ids.shape[1] else logits


def assert_close(ours, reference):
    real = batch()[1].bool()
    assert ours.shape == reference.shape
    diff = (ours[real] - reference[real]).abs().max().item()
    assert diff <= ATOL, f"max abs diff {diff:.2e} > {ATOL:.0e}"


def save_ours(tmp_path, arch, method_name, n=3):
    backbone = tiny_backbone(arch)
    config = PromptConfig(method=method_name, num_tokens=n, init="random", init_range=1.0)
    method = methods.build(config, backbone, generator=torch.Generator().manual_seed(5))
    return artifact.save(tmp_path / "ours", method, TASK, backbone)


# ----------------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method_name, peft_type", [("prompt", "PROMPT_TUNING"), ("prefix", "PREFIX_TUNING")])
def test_export_loads_in_peft_with_equal_logits(tmp_path, arch, method_name, peft_type):
    ours_dir = save_ours(tmp_path, arch, method_name)
    out = export_peft(ours_dir, tmp_path / "peft")
    assert {p.name for p in out.iterdir()} == {ADAPTER_CONFIG, ADAPTER_WEIGHTS}
    assert json.loads((out / ADAPTER_CONFIG).read_text())["peft_type"] == peft_type
    loaded = peft.PeftModel.from_pretrained(tiny_model(arch), out)
    assert loaded.active_peft_config.peft_type == peft_type
    assert_close(our_logits(ours_dir, arch), peft_logits(loaded, 3))


def test_export_differs_from_an_untrained_peft_adapter(tmp_path):
    """The equality above is not vacuous: a PEFT adapter with other weights gives other logits."""
    ours_dir = save_ours(tmp_path, "llama", "prefix")
    config = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    fresh = peft.get_peft_model(tiny_model("llama"), config)
    reference = peft_logits(fresh, 3)
    assert (our_logits(ours_dir, "llama") - reference).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------- import
PEFT_CONFIGS = {
    "prompt_tuning": lambda: peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "p_tuning": lambda: peft.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=4, encoder_hidden_size=16),
    "prefix": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4),
    "prefix_projection": lambda: peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4,
                                                         prefix_projection=True, encoder_hidden_size=16),
}  # fmt: skip


def peft_adapter(kind: str, arch: str, folder):
    """A PEFT model of `kind` with perturbed (as if trained) weights, saved by PEFT itself into `folder`."""
    torch.manual_seed(11)
    model = peft.get_peft_model(tiny_model(arch), PEFT_CONFIGS[kind]())
    with torch.no_grad():
        for parameter in model.prompt_encoder.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.5)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kind", sorted(PEFT_CONFIGS))
def test_import_of_peft_saved_adapters_gives_peft_logits(tmp_path, arch, kind):
    model = peft_adapter(kind, arch, tmp_path / "peft")
    reference = peft_logits(model, 4)  # PEFT's forward with its in-memory adapter (the MLP, where it has one)
    out = import_peft(tmp_path / "peft", tmp_path / "ours", tiny_backbone(arch), TASK)
    saved = artifact.load(out)
    assert saved.prompt.method == ("prefix" if kind.startswith("prefix") else "prompt")
    assert saved.prompt.num_tokens == 4 and saved.task == TASK
    assert saved.extra["training"]["peft_type"] == model.active_peft_config.peft_type
    assert_close(our_logits(out, arch), reference)


@pytest.mark.parametrize("method_name", ["prompt", "prefix"])
def test_export_then_import_round_trips_exactly(tmp_path, method_name):
    ours_dir = save_ours(tmp_path, "qwen3", method_name, n=5)
    export_peft(ours_dir, tmp_path / "peft")
    back = import_peft(tmp_path / "peft", tmp_path / "back", tiny_backbone("qwen3"), TASK)
    before, after = artifact.load(ours_dir), artifact.load(back)
    assert after.base_fingerprint == before.base_fingerprint
    for name, tensor in before.tensors.items():
        assert torch.equal(after.tensors[name], tensor), name


# ----------------------------------------------------------------------------------------------------- refusals
def test_import_refuses_lora_with_a_clear_message(tmp_path):
    lora = peft.get_peft_model(tiny_model("llama"), peft.LoraConfig(target_modules=["q_proj"], r=2))
    lora.save_pretrained(tmp_path / "lora")
    with pytest.raises(SoftPromptError, match="holds a LORA adapter; softprompt reads only prompt-learning"):
        import_peft(tmp_path / "lora", tmp_path / "ours", tiny_backbone("llama"), TASK)
    assert not (tmp_path / "ours").exists()


def test_import_refuses_an_adapter_of_another_model(tmp_path):
    peft_adapter("prefix", "qwen3", tmp_path / "peft")  # head_dim 16: rows twice as wide as llama's
    with pytest.raises(SoftPromptError, match="does not fit") as error:
        import_peft(tmp_path / "peft", tmp_path / "ours", tiny_backbone("llama"), TASK)
    assert "prefix rows of width 128" in str(error.value) and "= 64" in str(error.value)
    peft_adapter("prompt_tuning", "llama", tmp_path / "pt")
    config = json.loads((tmp_path / "pt" / ADAPTER_CONFIG).read_text())
    (tmp_path / "pt" / ADAPTER_CONFIG).write_text(json.dumps({**config, "task_type": "SEQ_2_SEQ_LM"}))
    with pytest.raises(SoftPromptError, match="task_type SEQ_2_SEQ_LM"):
        import_peft(tmp_path / "pt", tmp_path / "ours", tiny_backbone("llama"), TASK)


def test_import_of_a_folder_that_is_no_adapter(tmp_path):
    with pytest.raises(SoftPromptError, match="is not a PEFT adapter folder"):
        import_peft(tmp_path, tmp_path / "ours", tiny_backbone("llama"), TASK)
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"peft_type": "PREFIX_TUNING"}))
    with pytest.raises(SoftPromptError, match="has no adapter_model.safetensors"):
        import_peft(tmp_path, tmp_path / "ours", tiny_backbone("llama"), TASK)


# ------------------------------------------------------------------------------------------------------ CLI
def test_export_and_import_commands(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    backbone = backbone_for(*load_model(str(folder)))
    prefix = methods.build(PromptConfig(method="prefix", num_tokens=3, init="random"), backbone)
    ours = artifact.save(tmp_path / "ours", prefix, TASK, backbone)
    code, out, err = run_main(monkeypatch, capsys, ["export", "--prompt", ours, "--to", "peft", tmp_path / "peft"])
    assert code == 0 and "PeftModel.from_pretrained" in out, err
    loaded = peft.PeftModel.from_pretrained(tiny_model("llama"), tmp_path / "peft")
    assert_close(our_logits(ours, "llama"), peft_logits(loaded, 3))
    # the adapter names its base model (the folder), so import needs no --model
    args = ["import", tmp_path / "peft", "--out", tmp_path / "back", "--labels", "negative,positive",
            "--label-field", "label"]
    code, out, err = run_main(monkeypatch, capsys, args)
    assert code == 0 and "PREFIX_TUNING" in out, err
    back = artifact.load(tmp_path / "back")
    assert back.task == TaskConfig(template="{text}", labels=TASK.labels, label_field="label")
    assert torch.equal(back.tensors["prefix"], artifact.load(ours).tensors["prefix"])
    config = json.loads((tmp_path / "peft" / ADAPTER_CONFIG).read_text())
    (tmp_path / "peft" / ADAPTER_CONFIG).write_text(json.dumps({**config, "base_model_name_or_path": None}))
    mistakes = [
        (["import", tmp_path / "peft", "--out", tmp_path / "x"], "names no base model; pass --model"),
        (["export", "--prompt", ours, "--to", "gguf", tmp_path / "y"], "the one export format is peft"),
    ]
    for args, needle in mistakes:
        code, _, err = run_main(monkeypatch, capsys, args)
        assert code == 2 and needle in err and "Traceback" not in err, err


@pytest.mark.real_model
def test_export_of_real_model_prompts_loads_in_peft_with_equal_logits(real_backbone, tmp_path):
    """SmolLM2-135M: both methods exported from text-initialized prompts; PEFT's logits equal ours."""
    backbone = real_backbone
    tok = backbone.tokenizer
    texts = ["Review: a joyless, plodding mess.\nSentiment:", "Review: great fun\nSentiment:"]
    encoded = tok(texts, padding=True, padding_side="right", return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    base, _ = load_model("smollm2-135m")  # PEFT gets its own copy: it wraps the model it loads onto
    for method_name in ("prompt", "prefix"):
        config = PromptConfig(method=method_name, num_tokens=6, init="text", init_text="Classify the sentiment.")
        method = methods.build(config, backbone)
        folder = artifact.save(tmp_path / method_name, method, TASK, backbone)
        with torch.no_grad():
            prefix = artifact.attach(artifact.load(folder), backbone).kv(backbone)
            hidden, _ = backbone.forward(ids, mask, backbone.new_cache(prefix, 2))
            ours = backbone.logits(hidden)
            loaded = peft.PeftModel.from_pretrained(base, export_peft(folder, tmp_path / f"peft-{method_name}"))
            theirs = loaded.eval()(input_ids=ids, attention_mask=mask).logits.float()[:, -ids.shape[1] :]
            base = loaded.get_base_model()  # prompt learning leaves the model itself untouched
        diff = (ours[mask.bool()] - theirs[mask.bool()]).abs().max().item()
        assert diff <= ATOL, f"{method_name}: max abs diff {diff:.2e}"
