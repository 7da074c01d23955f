"""The training loop on tiny random models (conftest) and tiny synthetic data: every method and init learns, the base
model never changes, the artifact is complete, loads back to identical logits, refuses another base model, holds the
best prompt on validation (by the documented rule, ties included); early stopping, seeding, both optimizers (one
step of each against a hand-built step), gradient accumulation, generation tasks, and the default text init."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from softprompt import __version__, artifact, methods
from softprompt.training import setup as train_module
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import TaskEncoder, collate
from softprompt.errors import SoftPromptError
from softprompt.scoring.evaluate import evaluate, label_scores
from softprompt.models import fingerprint
from softprompt.training.loop import improves, loss_on, train

from conftest import VOCAB, run_main, tiny_backbone, tiny_model
from test_cli import save_tiny_model, write_data

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


def sentiment_task(backbone) -> TaskEncoder:
    return TaskEncoder(TaskConfig(template=TEMPLATE, labels=LABELS, label_field="label"), backbone.tokenizer)


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
    train_examples = task.encode(sentiment_records(64, seed=1), "train")
    return task, train_examples, task.encode(sentiment_records(24, seed=2), "valid")


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
def best_by_the_documented_rule(valid_log: list[dict]) -> dict:
    """train.selection_key's rule for classification, written out: the highest accuracy; among evaluations tied on
    it, the highest mean log-probability of the gold label; a complete tie keeps the earlier evaluation (only a
    strictly better one replaces the best)."""
    best = valid_log[0]
    for record in valid_log[1:]:
        new, old = record["valid"], best["valid"]
        if new["accuracy"] > old["accuracy"] or (new["accuracy"] == old["accuracy"]
                                                 and new["gold_logprob"] > old["gold_logprob"]):  # fmt: skip
            best = record
    return best


def assert_saved_prompt_is_the_one_logged_at(out: Path, backbone, task, valid_examples, best: dict, valid_log):
    """The artifact's own validation metrics are those logged at `best`'s step, and no other step's."""
    loaded = artifact.attach(artifact.load(out), backbone)
    result = evaluate(backbone, task, valid_examples, loaded.kv(backbone))
    logged = best["valid"]
    assert (result["accuracy"], result["macro_f1"], result["n"]) == (logged["accuracy"], logged["macro_f1"],
                                                                     logged["n"])  # fmt: skip
    assert result["gold_logprob"] == pytest.approx(logged["gold_logprob"], abs=1e-5)
    others = [r["valid"]["gold_logprob"] for r in valid_log if r["step"] != best["step"]]
    assert min(abs(g - logged["gold_logprob"]) for g in others) > 1e-4  # so the match names one step


def test_saved_prompt_is_the_best_on_validation_accuracy_first_then_gold_logprob(llama, data, tmp_path):
    task, train_examples, valid_examples = data
    run = train(llama, task, prompt_config("prefix", "random"), train_config(steps=30, eval_every=3, lr=0.1, seed=1),
                train_examples, tmp_path, valid_examples, progress=False)
    _, valid_log = read_log(tmp_path)
    assert [r["step"] for r in valid_log] == list(range(0, 31, 3))
    best = best_by_the_documented_rule(valid_log)
    tied = [r for r in valid_log if r["valid"]["accuracy"] == best["valid"]["accuracy"]]
    # what makes this run a test of the rule: the best accuracy is tied, the tie is not won by the first of them
    # (so the gold log-probability decided it), and another evaluation has a higher gold log-probability but a
    # lower accuracy (so accuracy is compared first)
    assert len(tied) >= 2 and best is not tied[0]
    assert any(r["valid"]["gold_logprob"] > best["valid"]["gold_logprob"] for r in valid_log)
    training = json.loads((tmp_path / "config.json").read_text())["training"]
    assert training["best_step"] == best["step"] == run.summary["best_step"]
    assert training["valid"] == best["valid"]
    assert_saved_prompt_is_the_one_logged_at(tmp_path, llama, task, valid_examples, best, valid_log)
    assert 0 < best["step"] < 30  # neither the untrained prompt nor simply the last


def test_an_accuracy_tie_goes_to_the_higher_gold_logprob_even_when_earlier(llama, tmp_path):
    task, config, initial, train_examples, valid_examples = contradicting_setup(llama, tmp_path)
    run = train(llama, task, config, train_config(steps=12, eval_every=3), train_examples, tmp_path / "run",
                valid_examples, init_method=initial, progress=False)
    _, valid_log = read_log(tmp_path / "run")
    best = best_by_the_documented_rule(valid_log)
    tied = [r for r in valid_log if r["valid"]["accuracy"] == best["valid"]["accuracy"]]
    assert len(tied) >= 2 and best is tied[0]  # a later evaluation equals its accuracy, not its log-probability
    assert run.summary["best_step"] == best["step"]
    assert_saved_prompt_is_the_one_logged_at(tmp_path / "run", llama, task, valid_examples, best, valid_log)


def test_a_non_finite_validation_result_never_becomes_the_best():
    nan = float("nan")
    assert improves((0.6, -4.0), (0.5, -3.0)) and improves((0.5, -2.0), (0.5, -3.0))  # accuracy, then log-prob
    assert not improves((0.5, -3.0), (0.5, -3.0))  # a complete tie: the earlier stays
    assert not improves((0.9, nan), (0.5, -3.0))  # a diverged prompt's NaN does not win on its accuracy
    assert not improves((-float("inf"),), (-5.0,))  # generation (-loss): an infinite loss
    assert improves((0.5, -3.0), (0.9, nan))  # a finite result replaces a non-finite first one


def contradicting_setup(backbone, tmp_path):
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
    task, config, initial, train_examples, valid_examples = contradicting_setup(llama, tmp_path)
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
    task, config, initial, train_examples, valid_examples = contradicting_setup(llama, tmp_path)
    run = train(llama, task, config, train_config(steps=50, eval_every=2, patience=3), train_examples,
                tmp_path / "run", valid_examples, init_method=initial, progress=False)
    train_log, valid_log = read_log(tmp_path / "run")
    assert run.summary["stopped_early"] is True
    assert run.summary["last_step"] == 6 and run.summary["best_step"] == 0
    assert [r["step"] for r in train_log] == list(range(1, 7))
    assert [r["step"] for r in valid_log] == [0, 2, 4, 6]


def test_no_early_stop_without_patience(llama, tmp_path):
    task, config, initial, train_examples, valid_examples = contradicting_setup(llama, tmp_path)
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
def last_checkpoint(out: Path) -> dict:
    return torch.load(max((out / "checkpoints").glob("*.pt")), weights_only=False)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_optimizers(llama, data, tmp_path, optimizer, method):
    task, train_examples, _ = data
    run = train(llama, task, prompt_config(method, "vocab"), train_config(steps=20, optimizer=optimizer, lr=0.05),
                train_examples, tmp_path, progress=False)
    losses = [r["loss"] for r in read_log(tmp_path)[0]]
    assert mean(losses[-5:]) < mean(losses[:5])
    assert all(torch.isfinite(t).all() for t in run.method.artifact_tensors().values())
    # the optimizer's own state tells which one ran: Adafactor keeps only row and column statistics of the squared
    # gradient (the factored second moment, no momentum); AdamW keeps two moments the size of the parameter
    [shape] = [tuple(t.shape) for t in run.method.artifact_tensors().values()]
    [state] = last_checkpoint(tmp_path)["optimizer"]["state"].values()
    sizes = {k: tuple(v.shape) for k, v in state.items() if torch.is_tensor(v) and v.dim()}
    if optimizer == "adafactor":
        assert sizes == {"exp_avg_sq_row": shape[:-1], "exp_avg_sq_col": shape[:-2] + shape[-1:]}
    else:
        assert sizes == {"exp_avg": shape, "exp_avg_sq": shape}
    assert int(state["step"]) == 20


def explicit_gradient(backbone, embeddings: torch.Tensor, examples) -> torch.Tensor:
    """d(mean cross-entropy over the target tokens)/dP, the model reading inputs_embeds = [P; E] one row at a time."""
    P = embeddings.detach().clone().requires_grad_(True)
    total, count = 0.0, 0
    for example in examples:
        tokens = torch.tensor(example.input_ids + example.target_ids)
        logits = backbone.model(inputs_embeds=torch.cat([P, backbone.embed(tokens)])[None]).logits[0]
        start = len(P) + len(example.input_ids) - 1  # the position that predicts the first target token
        targets = torch.tensor(example.target_ids)
        total = total + F.cross_entropy(logits[start : start + len(targets)], targets, reduction="sum")
        count += len(targets)
    (total / count).backward()
    return P.grad


def adafactor_first_step(param, grad, lr, eps1=1e-30, clip=1.0):
    """Adafactor's factored update for a matrix (Shazeer & Stern 2018) at t = 1, with the settings we use (the given
    lr, no parameter scaling, no momentum): the decay 1 - t^-0.8 is 0, so the row sums R and column sums C are those
    of G^2 + eps1; the second moment is approximated by R C / sum(R); the update G / sqrt(V) is scaled down to RMS
    `clip` if above it. Returns the new parameter and the row and column means (what the optimizer stores)."""
    squared = grad**2 + eps1
    rows, cols = squared.sum(1), squared.sum(0)
    second_moment = torch.outer(rows, cols) / rows.sum()
    update = grad / second_moment.sqrt()
    update = update / max(1.0, float(update.pow(2).mean().sqrt()) / clip)
    return param - lr * update, squared.mean(1), squared.mean(0)


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
def test_one_optimizer_step_equals_the_hand_built_step(llama, tmp_path, optimizer):
    task = sentiment_task(llama)
    examples = task.encode(sentiment_records(16, seed=1))
    config = prompt_config("prompt", "random")
    initial = methods.build(config, llama, LABELS, torch.Generator().manual_seed(0))
    P = initial.embeddings.detach().clone()
    # one step on the whole data as one batch, at the full rate, unclipped
    train(llama, task, config, train_config(steps=1, batch_size=16, lr=0.05, optimizer=optimizer, max_grad_norm=0),
          examples, tmp_path, init_method=initial, progress=False)
    checkpoint = last_checkpoint(tmp_path)
    stepped = checkpoint["prompts"]["prompts.prompt.embeddings"]
    [state] = checkpoint["optimizer"]["state"].values()
    grad = explicit_gradient(llama, P, examples)
    if optimizer == "adafactor":
        expected, rows, cols = adafactor_first_step(P, grad, 0.05)
        torch.testing.assert_close(state["exp_avg_sq_row"], rows, rtol=1e-4, atol=1e-12)
        torch.testing.assert_close(state["exp_avg_sq_col"], cols, rtol=1e-4, atol=1e-12)
    else:  # Adam's first step, bias-corrected moments g and g^2: lr * g / (|g| + eps)
        expected = P - 0.05 * grad / (grad.abs() + 1e-8)
    torch.testing.assert_close(stepped, expected, rtol=1e-4, atol=1e-6)
    other = {"adamw": adafactor_first_step(P, grad, 0.05)[0], "adafactor": P - 0.05 * grad / (grad.abs() + 1e-8)}
    assert (stepped - other[optimizer]).abs().max() > 1e-3  # the two optimizers' steps are told apart here


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


# ------------------------------------------------------------------------------------ default init: template words
@pytest.mark.parametrize("template, words", [
    ("review {text} sentiment", ["review", "sentiment"]),
    ("the {text}\nreview {text}  label", ["the", "review", "label"]),  # every placeholder out, whitespace collapsed
])  # fmt: skip
def test_text_init_defaults_to_the_template_words(tmp_path, monkeypatch, capsys, template, words):
    initial = []  # the prompt as the run hands it to the optimizer, before any step
    make = train_module.make_optimizer

    def recording(params, config):
        params = list(params)
        initial.extend(p.detach().clone() for p in params)
        return make(params, config)

    monkeypatch.setattr(train_module, "make_optimizer", recording)
    model = save_tiny_model(tmp_path / "tiny")
    code, _, err = run_main(monkeypatch, capsys, [
        "train", "--model", model, "--train", write_data(tmp_path / "train.jsonl", 8, seed=1), "--template", template,
        "--labels", "negative,positive", "--label-field", "label", "--method", "prompt", "--num-tokens", 5, "--steps",
        1, "--batch-size", 8, "--out", tmp_path / "out", "--no-progress"])  # no --init, no --init-text
    assert code == 0, err
    # the words left when the placeholders are taken out, in order, repeated to the 5 virtual tokens
    ids = [VOCAB[w] for w in (words * 5)[:5]]
    expected = tiny_model("llama").get_input_embeddings().weight[ids]
    [embeddings] = initial
    assert torch.equal(embeddings, expected.detach())
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["init"] == "text" and saved["init_text"] == " ".join(words)


# --------------------------------------------------------------------------------------------------- generation
COLORS = {"red": "one two", "blue": "three four", "green": "five one"}


def generation_data(backbone):
    config = TaskConfig(template="hello {color} answer", task="generation", target_field="number")
    task = TaskEncoder(config, backbone.tokenizer)
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
    best = max(valid_log, key=lambda r: (r["valid"]["chrf"], -r["valid"]["loss"]))  # the earliest of complete ties
    assert run.summary["best_step"] == best["step"]  # generation selects on validation chrF, then the lower loss
    config_json = json.loads((tmp_path / "config.json").read_text())
    assert config_json["task"] == "generation" and config_json["target_field"] == "number"
    assert config_json["labels"] == []
