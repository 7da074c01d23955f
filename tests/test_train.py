"""The training loop on tiny random models (conftest) and tiny synthetic data: every method and init learns, the base
model never changes, the artifact is complete, loads back to identical logits, refuses another base model, holds the
best prompt on validation; early stopping, seeding, both optimizers, gradient accumulation and generation tasks."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from softprompt import __version__, artifact, methods
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import Task, collate
from softprompt.errors import SoftPromptError
from softprompt.evaluate import evaluate, label_scores
from softprompt.models import fingerprint
from softprompt.train import loss_on, selection_key, train

from conftest import tiny_backbone

LABELS = ["negative", "positive"]
TEMPLATE = "review {text} sentiment"
FILLER = "the a movie film was is it this very quite".split()
CUES = {"positive": ["great", "good", "fun"], "negative": ["bad", "terrible", "awful"]}
INIT_TEXT = "review label sentiment"


def sentiment_records(n: int, seed: int, only: str | None = None) -> list[dict]:
    """The label is determined by one cue word among filler words (learnable from the text)."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        label = only or rng.choice(LABELS)
        words = rng.sample(FILLER, 3) + [rng.choice(CUES[label])]
        rng.shuffle(words)
        records.append({"text": " ".join(words), "label": label})
    return records


def sentiment_task(backbone) -> Task:
    return Task(TaskConfig(template=TEMPLATE, labels=LABELS, label_field="label"), backbone.tokenizer)


def prompt_config(method="prompt", init="random", n=4, prefix_mlp=False) -> PromptConfig:
    return PromptConfig(method=method, num_tokens=n, init=init, init_text=INIT_TEXT if init == "text" else None,
                        prefix_mlp=prefix_mlp, mlp_hidden=32)


def train_config(**kw) -> TrainConfig:
    defaults = dict(steps=20, batch_size=8, lr=0.05, warmup_steps=0, eval_every=0, patience=0, seed=0)
    return TrainConfig(**{**defaults, **kw})


def read_log(out: Path) -> tuple[list[dict], list[dict]]:
    """(training records, validation records) of metrics.jsonl."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in records if "loss" in r], [r for r in records if "valid" in r]


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs)


def prefix_logits(backbone, prefix: torch.Tensor, examples) -> torch.Tensor:
    """Logits at every position of the collated examples after the prefix, (B, T, vocab)."""
    batch = collate(examples, backbone.tokenizer.pad_token_id)
    with torch.no_grad():
        hidden, _ = backbone.forward(batch.input_ids, batch.attention_mask, backbone.new_cache(prefix, len(examples)))
        return backbone.logits(hidden)


@pytest.fixture
def llama():
    return tiny_backbone("llama")


@pytest.fixture
def data(llama):
    task = sentiment_task(llama)
    return task, task.encode(sentiment_records(64, seed=1), "train"), task.encode(sentiment_records(24, seed=2), "valid")


METHOD_VARIANTS = [("prompt", False), ("prefix", False), ("prefix", True)]
VARIANT_IDS = ["prompt", "prefix", "prefix-mlp"]


# ------------------------------------------------------------------------------------------- every method learns
@pytest.mark.parametrize("init", ["random", "vocab", "text", "labels"])
@pytest.mark.parametrize("method, mlp", METHOD_VARIANTS, ids=VARIANT_IDS)
def test_each_method_and_init_lowers_the_loss_and_changes_the_prompt(llama, data, tmp_path, method, mlp, init):
    task, train_examples, _ = data
    config = prompt_config(method, init, prefix_mlp=mlp)
    initial = methods.build(config, llama, LABELS, torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in initial.artifact_tensors().items()}
    fixed = train_examples[:16]
    with torch.no_grad():
        loss_before = float(loss_on(llama, initial.kv(llama), fixed)[0])

    run = train(llama, task, config, train_config(steps=25), train_examples, tmp_path, init_method=initial,
                progress=False)

    losses = [r["loss"] for r in read_log(tmp_path)[0]]
    assert len(losses) == 25 and all(map(lambda x: x == x, losses))
    assert mean(losses[-5:]) < mean(losses[:5])
    with torch.no_grad():
        loss_after = float(loss_on(llama, run.method.kv(llama), fixed)[0])
    assert loss_after < loss_before
    saved = load_file(tmp_path / "prompt.safetensors")
    [key] = saved
    assert key == {"prompt": "prompt_embeddings", "prefix": "prefix"}[method]
    assert not torch.allclose(saved[key], before[key])
    assert torch.equal(saved[key], run.method.artifact_tensors()[key])


# ---------------------------------------------------------------------------------------- the base model is frozen
def _snapshot(model) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in [*model.named_parameters(), *model.named_buffers()]}


@pytest.mark.parametrize("method, mlp", METHOD_VARIANTS, ids=VARIANT_IDS)
def test_base_model_is_bit_identical_after_training(arch, tmp_path, method, mlp):
    backbone = tiny_backbone(arch)
    task = sentiment_task(backbone)
    before = _snapshot(backbone.model)
    train(backbone, task, prompt_config(method, "text", prefix_mlp=mlp), train_config(steps=4, lr=0.5),
          task.encode(sentiment_records(16, seed=1)), tmp_path, task.encode(sentiment_records(8, seed=2)),
          progress=False)
    after = _snapshot(backbone.model)
    assert before.keys() == after.keys()
    changed = [name for name in before if not torch.equal(before[name], after[name])]
    assert not changed, f"base model tensors changed: {changed}"
    assert not any(p.requires_grad for p in backbone.model.parameters())
    assert all(p.grad is None for p in backbone.model.parameters())
    assert fingerprint(backbone.model) == json.loads((tmp_path / "config.json").read_text())["base_model_fingerprint"]


# -------------------------------------------------------------------------------------------------- the artifact
REQUIRED_KEYS = ["method", "num_tokens", "template", "task", "labels", "label_field", "target_field", "base_model",
                 "base_model_fingerprint", "init", "softprompt_version", "training"]


def test_out_dir_holds_a_complete_artifact(llama, data, tmp_path):
    task, train_examples, valid_examples = data
    run = train(llama, task, prompt_config("prompt", "text"), train_config(steps=6, eval_every=3), train_examples,
                tmp_path, valid_examples, progress=False)
    for name in ("prompt.safetensors", "config.json", "metrics.jsonl", "loss.png"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config = json.loads((tmp_path / "config.json").read_text())
    missing = [k for k in REQUIRED_KEYS if k not in config]
    assert not missing, f"config.json lacks {missing}"
    assert config["method"] == "prompt" and config["num_tokens"] == 4 and config["init"] == "text"
    assert config["template"] == TEMPLATE and config["task"] == "classification"
    assert config["labels"] == LABELS and config["label_field"] == "label" and config["target_field"] is None
    assert config["base_model_fingerprint"] == fingerprint(llama.model)
    assert config["softprompt_version"] == __version__
    training = config["training"]
    assert training == json.loads(json.dumps(run.summary))
    for key in ("best_step", "valid", "last_step", "stopped_early", "steps", "lr", "seed"):
        assert key in training, key
    assert training["last_step"] == 6 and training["steps"] == 6 and training["stopped_early"] is False

    train_log, valid_log = read_log(tmp_path)
    assert [r["step"] for r in train_log] == list(range(1, 7))
    assert [r["step"] for r in valid_log] == [0, 3, 6]
    for record in train_log:
        assert {"loss", "lr", "grad_norm", "tokens_per_s"} <= set(record)
    for record in valid_log:
        assert {"accuracy", "macro_f1", "n", "gold_logprob"} <= set(record["valid"])
        assert record["valid"]["n"] == len(valid_examples)

    loaded = artifact.load(tmp_path)
    assert loaded.prompt.method == "prompt" and loaded.task.labels == LABELS
    assert loaded.base_fingerprint == config["base_model_fingerprint"]


SHAPES = {  # arch: (layers, kv_heads, head_dim, hidden) of the tiny configs in conftest
    "llama": (2, 2, 8, 32),
    "qwen3": (2, 2, 16, 32),
    "gpt2": (2, 4, 8, 32),
}


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("arch_name", list(SHAPES))
def test_artifact_tensor_shapes(tmp_path, arch_name, method):
    backbone = tiny_backbone(arch_name)
    task = sentiment_task(backbone)
    n = 5
    train(backbone, task, prompt_config(method, "vocab", n=n), train_config(steps=2),
          task.encode(sentiment_records(8, seed=1)), tmp_path, progress=False)
    tensors = load_file(tmp_path / "prompt.safetensors")
    layers, kv_heads, head_dim, hidden = SHAPES[arch_name]
    if method == "prompt":
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prompt_embeddings": (n, hidden)}
    else:
        assert {k: tuple(v.shape) for k, v in tensors.items()} == {"prefix": (layers, 2, kv_heads, n, head_dim)}
    assert all(v.dtype == torch.float32 for v in tensors.values())
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["tensor_shapes"] == {k: list(v.shape) for k, v in tensors.items()}


@pytest.mark.parametrize("method, mlp", METHOD_VARIANTS, ids=VARIANT_IDS)
def test_save_then_load_gives_identical_logits(llama, data, tmp_path, method, mlp):
    task, train_examples, valid_examples = data
    config = prompt_config(method, "random", prefix_mlp=mlp)
    trained = methods.build(config, llama, LABELS, torch.Generator().manual_seed(0))
    run = train(llama, task, config, train_config(steps=8), train_examples, tmp_path, init_method=trained,
                progress=False)  # no validation: the artifact is the last prompt
    last = torch.load(max((tmp_path / "checkpoints").glob("*.pt")), weights_only=False)["prompts"]
    trained.load_state_dict({k.removeprefix("prompts.prompt."): v for k, v in last.items()})  # with its MLP
    with torch.no_grad():
        expected = prefix_logits(llama, trained.kv(llama), valid_examples[:6])  # MLP-reparameterized when mlp
        returned = prefix_logits(llama, run.method.kv(llama), valid_examples[:6])
    # a fresh copy of the same base model (same seed), as a later process would load it
    other = tiny_backbone("llama")
    loaded = artifact.attach(artifact.load(tmp_path), other)
    assert not loaded.config.prefix_mlp  # the MLP is folded away in the artifact
    with torch.no_grad():
        actual = prefix_logits(other, loaded.kv(other), valid_examples[:6])
    assert torch.equal(returned, actual)
    if mlp:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    else:
        assert torch.equal(actual, expected)
    scores = label_scores(other, task, valid_examples, loaded.kv(other))
    assert torch.equal(scores, label_scores(llama, task, valid_examples, run.method.kv(llama)))


@pytest.mark.parametrize("method", ["prompt", "prefix"])
@pytest.mark.parametrize("other_arch, other_seed", [("llama", 1), ("qwen2", 0), ("qwen3", 0), ("gpt2", 0)])
def test_loading_onto_another_base_model_is_refused(llama, data, tmp_path, method, other_arch, other_seed):
    task, train_examples, _ = data
    train(llama, task, prompt_config(method, "random"), train_config(steps=2), train_examples, tmp_path,
          progress=False)
    saved = artifact.load(tmp_path)
    other = tiny_backbone(other_arch, seed=other_seed)
    with pytest.raises(SoftPromptError) as info:
        artifact.attach(saved, other, "my prompt")
    message = str(info.value)
    assert "my prompt was trained on base model" in message
    assert saved.base_fingerprint in message and fingerprint(other.model) in message
    if other_arch in ("qwen3", "gpt2"):  # different head_dim / kv heads
        assert "shapes" in message
    artifact.attach(saved, tiny_backbone("llama", seed=0))  # the same weights load fine


# --------------------------------------------------------------------------------------------- model selection
def _best_eval(valid_log: list[dict]) -> dict:
    """The first evaluation with the highest selection key (a later tie does not replace it)."""
    best = None
    for record in valid_log:
        if best is None or selection_key(record["valid"]) > selection_key(best["valid"]):
            best = record
    return best


def test_saved_prompt_is_the_best_on_validation(llama, data, tmp_path):
    task, train_examples, valid_examples = data
    run = train(llama, task, prompt_config("prefix", "random"), train_config(steps=40, eval_every=4, lr=0.1),
                train_examples, tmp_path, valid_examples, progress=False)
    _, valid_log = read_log(tmp_path)
    assert [r["step"] for r in valid_log] == list(range(0, 41, 4))
    best = _best_eval(valid_log)
    training = json.loads((tmp_path / "config.json").read_text())["training"]
    assert training["best_step"] == best["step"] == run.summary["best_step"]
    assert training["valid"] == best["valid"]
    loaded = artifact.attach(artifact.load(tmp_path), llama)
    result = evaluate(llama, task, valid_examples, loaded.kv(llama))
    assert result["accuracy"] == best["valid"]["accuracy"]
    assert result["gold_logprob"] == pytest.approx(best["valid"]["gold_logprob"], abs=1e-5)
    # in this setup validation accuracy peaks mid-run, so "best" is not simply "last"
    assert 0 < best["step"] < 40


def _contradicting_setup(backbone, tmp_path):
    """A prompt first trained to answer "negative", then trained on all-positive labels while validated on
    all-negative ones: every training step can only hurt on validation (accuracy and gold log-probability)."""
    task = sentiment_task(backbone)
    negative = task.encode(sentiment_records(32, seed=3, only="negative"))
    config = prompt_config("prompt", "random")
    pretrained = train(backbone, task, config, train_config(steps=30, lr=0.1), negative, tmp_path / "pretrain",
                       progress=False).method
    return (task, config, pretrained, task.encode(sentiment_records(32, seed=1, only="positive")),
            task.encode(sentiment_records(16, seed=2, only="negative")))


def test_saved_prompt_is_not_the_last_when_training_hurts_validation(llama, tmp_path):
    task, config, initial, train_examples, valid_examples = _contradicting_setup(llama, tmp_path)
    before = initial.artifact_tensors()["prompt_embeddings"].clone()
    train(llama, task, config, train_config(steps=12, eval_every=3), train_examples, tmp_path / "run",
          valid_examples, init_method=initial, progress=False)
    _, valid_log = read_log(tmp_path / "run")
    golds = [r["valid"]["gold_logprob"] for r in valid_log]
    assert valid_log[0]["valid"]["accuracy"] == 1.0
    assert golds == sorted(golds, reverse=True) and golds[-1] < golds[0]  # validation got worse at every evaluation
    training = json.loads((tmp_path / "run" / "config.json").read_text())["training"]
    assert training["best_step"] == 0 and training["last_step"] == 12
    saved = load_file(tmp_path / "run" / "prompt.safetensors")["prompt_embeddings"]
    assert torch.equal(saved, before)  # the prompt it started from, not the last one
    last = torch.load(max((tmp_path / "run" / "checkpoints").glob("*.pt")), weights_only=False)["prompts"]
    assert not torch.allclose(last["prompts.prompt.embeddings"], before)  # the trained one did move
    assert torch.equal(initial.embeddings.detach(), before)  # and the caller's starting prompt is left as it was


def test_early_stopping_stops(llama, tmp_path):
    task, config, initial, train_examples, valid_examples = _contradicting_setup(llama, tmp_path)
    run = train(llama, task, config, train_config(steps=50, eval_every=2, patience=3), train_examples,
                tmp_path / "run", valid_examples, init_method=initial, progress=False)
    train_log, valid_log = read_log(tmp_path / "run")
    assert run.summary["stopped_early"] is True
    assert run.summary["last_step"] == 6 and run.summary["best_step"] == 0
    assert [r["step"] for r in train_log] == list(range(1, 7))
    assert [r["step"] for r in valid_log] == [0, 2, 4, 6]


def test_no_early_stop_without_patience(llama, tmp_path):
    task, config, initial, train_examples, valid_examples = _contradicting_setup(llama, tmp_path)
    run = train(llama, task, config, train_config(steps=8, eval_every=2, patience=0), train_examples,
                tmp_path / "run", valid_examples, init_method=initial, progress=False)
    assert run.summary["stopped_early"] is False and run.summary["last_step"] == 8


def test_validation_without_periodic_evaluation_keeps_the_trained_prompt(llama, data, tmp_path):
    task, train_examples, valid_examples = data
    config = prompt_config("prompt", "random")
    initial = methods.build(config, llama, LABELS, torch.Generator().manual_seed(0))
    before = initial.artifact_tensors()["prompt_embeddings"].clone()
    run = train(llama, task, config, train_config(steps=10, eval_every=0), train_examples, tmp_path, valid_examples,
                init_method=initial, progress=False)
    saved = load_file(tmp_path / "prompt.safetensors")["prompt_embeddings"]
    assert not torch.equal(saved, before), f"the untrained prompt was saved (best_step {run.summary['best_step']})"


# ------------------------------------------------------------------------------------------------- reproducible
@pytest.mark.parametrize("method, mlp", METHOD_VARIANTS, ids=VARIANT_IDS)
def test_same_seed_gives_bit_identical_prompts(llama, data, tmp_path, method, mlp):
    task, train_examples, valid_examples = data
    config = prompt_config(method, "random", prefix_mlp=mlp)
    outs = {}
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        train(llama, task, config, train_config(steps=8, eval_every=4, seed=seed), train_examples, tmp_path / name,
              valid_examples, progress=False)
        outs[name] = load_file(tmp_path / name / "prompt.safetensors")
    key = next(iter(outs["a"]))
    assert torch.equal(outs["a"][key], outs["b"][key])
    assert not torch.equal(outs["a"][key], outs["c"][key])
    losses = {name: [r["loss"] for r in read_log(tmp_path / name)[0]] for name in ("a", "b")}
    assert losses["a"] == losses["b"]


# --------------------------------------------------------------------------------------------------- optimizers
@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_optimizers(llama, data, tmp_path, optimizer, method):
    task, train_examples, _ = data
    run = train(llama, task, prompt_config(method, "vocab"), train_config(steps=20, optimizer=optimizer, lr=0.05),
                train_examples, tmp_path, progress=False)
    losses = [r["loss"] for r in read_log(tmp_path)[0]]
    assert mean(losses[-5:]) < mean(losses[:5])
    assert all(torch.isfinite(t).all() for t in run.method.artifact_tensors().values())
    assert json.loads((tmp_path / "config.json").read_text())["training"]["optimizer"] == optimizer


@pytest.mark.parametrize("method, mlp", METHOD_VARIANTS, ids=VARIANT_IDS)
def test_gradient_accumulation_matches_one_big_batch(llama, data, tmp_path, method, mlp):
    task, train_examples, _ = data
    config = prompt_config(method, "random", prefix_mlp=mlp)
    results = {}
    for accum in (1, 2):
        run = train(llama, task, config, train_config(steps=6, batch_size=8, grad_accum=accum, lr=0.01),
                    train_examples, tmp_path / str(accum), progress=False)
        results[accum] = (run.method.artifact_tensors(), [r["loss"] for r in read_log(tmp_path / str(accum))[0]])
    (tensors1, losses1), (tensors2, losses2) = results[1], results[2]
    assert losses1 == pytest.approx(losses2, rel=1e-4, abs=1e-5)
    for key in tensors1:
        torch.testing.assert_close(tensors2[key], tensors1[key], atol=1e-4, rtol=1e-4)
    initial = methods.build(config, llama, LABELS, torch.Generator().manual_seed(0)).artifact_tensors()
    assert not any(torch.allclose(tensors1[k], initial[k]) for k in tensors1)  # they both moved, the same way


# --------------------------------------------------------------------------------------------------- generation
COLORS = {"red": "one two", "blue": "three four", "green": "five one"}


def generation_data(backbone):
    config = TaskConfig(template="hello {color} answer", task="generation", target_field="number")
    task = Task(config, backbone.tokenizer)
    rng = random.Random(0)
    records = [{"color": c, "number": COLORS[c]} for c in (rng.choice(list(COLORS)) for _ in range(32))]
    return task, task.encode(records, "train"), task.encode([{"color": c, "number": n} for c, n in COLORS.items()])


def test_generation_loss_is_only_on_target_tokens(llama):
    task, examples, _ = generation_data(llama)
    method = methods.build(prompt_config("prompt", "random"), llama, (), torch.Generator().manual_seed(0))
    chunk = examples[:5]
    with torch.no_grad():
        kv = method.kv(llama)
        loss, _ = loss_on(llama, kv, chunk)
        logits = prefix_logits(llama, kv, chunk)  # (B, T, vocab) at every position
    # the explicit computation: cross-entropy of each row's target tokens (the answer and EOS), nothing else
    terms = []
    for row, example in enumerate(chunk):
        start = len(example.input_ids)
        assert example.target_ids[-1] == llama.tokenizer.eos_token_id
        for j, token in enumerate(example.target_ids):
            terms.append(-logits[row, start + j - 1].log_softmax(-1)[token])
    assert len(terms) == sum(len(e.target_ids) for e in chunk)
    torch.testing.assert_close(loss, torch.stack(terms).mean(), atol=1e-5, rtol=1e-5)


def test_generation_task_trains(llama, tmp_path):
    task, train_examples, valid_examples = generation_data(llama)
    config = prompt_config("prefix", "random")
    initial = methods.build(config, llama, (), torch.Generator().manual_seed(0))
    with torch.no_grad():
        loss_before = float(loss_on(llama, initial.kv(llama), train_examples)[0])
    run = train(llama, task, config, train_config(steps=30, lr=0.1, eval_every=10), train_examples, tmp_path,
                valid_examples, init_method=initial, progress=False)
    with torch.no_grad():
        loss_after = float(loss_on(llama, run.method.kv(llama), train_examples)[0])
    assert loss_after < loss_before
    losses = [r["loss"] for r in read_log(tmp_path)[0]]
    assert mean(losses[-5:]) < mean(losses[:5])
    _, valid_log = read_log(tmp_path)
    for record in valid_log:
        assert {"exact_match", "chrf", "bleu", "loss", "n"} <= set(record["valid"])
    best = min(valid_log, key=lambda r: r["valid"]["loss"])
    assert run.summary["best_step"] == best["step"]  # generation selects on validation loss
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["task"] == "generation" and config_json["target_field"] == "number"
    assert config_json["labels"] == []
