"""A model of a billion parameters on this CPU, through the commands users run: `train` two steps, `eval`,
`generate`, and one request to `serve`. Random weights (no hub), Llama-shaped at the width of 1 B models. In
bfloat16 where the CPU multiplies it in hardware; in float32 where it would emulate it (an AVX2 CPU: about 40x
slower, which would make two steps of a 1 B model take most of an hour).

What is checked against something independent: the weights stay in their dtype on the device asked for and are
never changed (their bits before and after, hashed), the prompt is stored in float32, the served answer is the one
`generate` gives, and both match transformers' own greedy decoding over explicit `[P; E]` on the same model for the
first token (where the margin between the two best logits is wider than bfloat16's rounding)."""

from __future__ import annotations

import ast
import hashlib
import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from softprompt import artifact
from softprompt.models import LoadConfig, cpu_multiplies, load_model

from conftest import VOCAB_SIZE, run_main, tiny_tokenizer

BIG = dict(vocab_size=VOCAB_SIZE, hidden_size=2048, intermediate_size=5632, num_hidden_layers=23, num_attention_heads=16,
           num_key_value_heads=4, max_position_embeddings=512, tie_word_embeddings=False, initializer_range=0.02,
           eos_token_id=1, bos_token_id=1, pad_token_id=0)  # fmt: skip
"""About 1.04 B parameters (the layers of a 1 B Llama; the tiny tokenizer's 128 words instead of a real vocabulary)."""
DTYPE = "bfloat16" if cpu_multiplies(torch.bfloat16) else "float32"


def weights_hash(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes())  # the bits, as they are
    return digest.hexdigest()


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("big") / "llama-1b"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**BIG), dtype=getattr(torch, DTYPE))
    assert sum(p.numel() for p in model.parameters()) > 1.0e9
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder, weights_hash(model)


def test_a_billion_parameter_model_trains_evaluates_generates_and_serves(big_folder, tmp_path, monkeypatch, capsys):
    folder, saved_hash = big_folder
    torch.set_num_threads(os.cpu_count())  # a real model's matmuls: every core (conftest restores the setting)
    rows = [{"text": f"the movie was {w}", "label": w} for w in ["good", "bad", "fine", "awful"] * 4]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    load = ["--dtype", DTYPE, "--device", "cpu"]
    code, _, err = run_main(monkeypatch, capsys, [
        "train", "--model", folder, "--train", data, "--template", "{text} review:", "--labels", "good,bad,fine,awful",
        "--label-field", "label", "--out", out, "--steps", "2", "--batch-size", "4", "--eval-every", "0",
        "--method", "prompt", "--num-tokens", "4", "--init", "random", "--lr", "0.1", "--no-progress",
        *load])  # fmt: skip  (prompt tuning: checked below against explicit [P; E])
    assert code == 0, err
    steps = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [s["step"] for s in steps if "loss" in s] == [1, 2] and all(torch.isfinite(torch.tensor(s["loss"]))
                                                                       for s in steps if "loss" in s)  # fmt: skip
    saved = artifact.load(out)
    assert saved.tensors["prompt_embeddings"].dtype == torch.float32

    code, stdout, err = run_main(monkeypatch, capsys, ["eval", "--prompt", out, "--data", data, "--json",
                                                       "--no-progress", *load])  # fmt: skip
    assert code == 0, err
    assert json.loads(stdout.strip().splitlines()[-1])["n"] == len(rows)

    code, stdout, err = run_main(monkeypatch, capsys, ["generate", "--prompt", out, "--max-new-tokens", "4",
                                                       "the movie was good", *load])  # fmt: skip
    assert code == 0, err
    generated = stdout.strip().splitlines()[-1].split(" -> ", 1)[1]

    from starlette.testclient import TestClient

    from softprompt.serve import ServeConfig, build

    prompts = tmp_path / "prompts"
    prompts.mkdir()
    (prompts / "review").symlink_to(out, target_is_directory=True)
    app, engine, registry = build(ServeConfig(model=str(folder), prompts=prompts, api_key="k",
                                              load=LoadConfig(dtype=DTYPE, device="cpu")))  # fmt: skip
    try:
        with TestClient(app) as client:  # a classification prompt answers with its best label word
            answer = client.post("/v1/completions", headers={"Authorization": "Bearer k"},
                                 json={"model": "review", "prompt": "the movie was good", "max_tokens": 4})  # fmt: skip
        assert answer.status_code == 200, answer.text
        served = answer.json()["choices"][0]["text"]
    finally:
        engine.stop()

    model, tokenizer = load_model(str(folder), LoadConfig(dtype=DTYPE, device="cpu"))
    assert model.dtype == getattr(torch, DTYPE) and weights_hash(model) == saved_hash  # as saved, never changed
    P = saved.tensors["prompt_embeddings"].to(model.dtype)
    ids = tokenizer(saved.task.fill_text("the movie was good"))["input_ids"]
    with torch.no_grad():
        embeds = torch.cat([P, model.get_input_embeddings()(torch.tensor(ids))])[None]  # (1, n + T, hidden)
        logits = model(inputs_embeds=embeds).logits[0, -1].float()
    top2 = logits.topk(2)
    assert top2.values[0] - top2.values[1] > 0.05, "the two best first tokens are too close to compare"
    assert ast.literal_eval(generated).split()[0] == tokenizer.decode([int(top2.indices[0])]).strip()
    labels = saved.task.labels  # one word (one token) each
    label_ids = [tokenizer(" " + label)["input_ids"][0] for label in labels]
    assert served.strip() == labels[int(logits[label_ids].argmax())]
