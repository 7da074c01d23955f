"""An independent check of the whole classification path. The scorer below reads ONLY a prompt-tuning artifact's
`prompt.safetensors` and `config.json` and the base model's folder (safetensors + json + transformers; nothing from
softprompt), builds `inputs_embeds = cat(P, E)` for each filled template exactly as Lester et al. (2021) define prompt
tuning, scores each label word by the sum of its tokens' log-probabilities, and must agree with
`softprompt.scoring.evaluate.evaluate` (the K/V-prefix path) on accuracy, predictions and scores: on a tiny random Llama and,
marked `real_model`, on the embedded SmolLM2-135M after 30 steps of training on Rotten Tomatoes snippets."""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer


# ------------------------------------------------------------------------------------------- independent scorer
class IndependentScorer:
    """Prompt-tuning classification from the artifact files alone."""

    def __init__(self, prompt_dir: str | Path, model_dir: str | Path):
        prompt_dir = Path(prompt_dir)
        self.config = json.loads((prompt_dir / "config.json").read_text(encoding="utf-8"))
        assert self.config["method"] == "prompt", "this scorer reads prompt-tuning artifacts"
        self.prompt = load_file(prompt_dir / "prompt.safetensors")["prompt_embeddings"].float()  # (n, hidden)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self.labels = self.config["labels"]
        # each label word alone, with a leading space, no special tokens
        self.label_ids = [self.tokenizer(" " + label, add_special_tokens=False)["input_ids"] for label in self.labels]

    def fill(self, record: dict) -> str:
        return re.sub(r"\{(\w+)\}", lambda m: str(record[m.group(1)]), self.config["template"])

    def gold(self, record: dict) -> int:
        value = str(record[self.config["label_field"]]).strip()
        return self.labels.index(value) if value in self.labels else int(value)

    @torch.no_grad()
    def _logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(next token) at every position of [P; E(ids)], (n + len(ids), vocab)."""
        embeds = self.model.get_input_embeddings()(torch.tensor(ids))  # (m, hidden)
        inputs = torch.cat([self.prompt, embeds])[None]  # (1, n + m, hidden)
        return self.model(inputs_embeds=inputs).logits[0].float().log_softmax(-1)

    def scores(self, record: dict) -> list[float]:
        ids = self.tokenizer(self.fill(record))["input_ids"]  # tokenizer defaults
        n, cache, result = self.prompt.shape[0], {}, []
        for label in self.label_ids:
            row = tuple(ids + label[:-1])  # the last label token is predicted, never read
            if row not in cache:
                cache[row] = self._logprobs(list(row))
            logprobs = cache[row]
            start = n + len(ids) - 1  # the position that predicts the label's first token
            result.append(sum(float(logprobs[start + j, token]) for j, token in enumerate(label)))
        return result

    def evaluate(self, records: list[dict]) -> tuple[float, list[int], torch.Tensor]:
        scores = torch.tensor([self.scores(r) for r in records])  # (N, labels)
        predictions = scores.argmax(-1).tolist()
        accuracy = sum(p == self.gold(r) for p, r in zip(predictions, records)) / len(records)
        return accuracy, predictions, scores


# ------------------------------------------------------------------------------------------ the library's side
def library_evaluation(prompt_dir: Path, backbone, records: list[dict]) -> tuple[dict, list[int], torch.Tensor]:
    """`softprompt.scoring.evaluate.evaluate` on the loaded artifact, plus the label scores it computed on the way."""
    from unittest import mock

    from softprompt import artifact
    from softprompt.scoring import evaluate as evaluation
    from softprompt.data import TaskEncoder

    saved = artifact.load(prompt_dir)
    task = TaskEncoder(saved.task, backbone.tokenizer)
    examples = task.encode(records, "test")
    with torch.no_grad():
        prefix = artifact.attach(saved, backbone).kv(backbone)
    seen = []
    real_label_scores = evaluation.label_scores

    def recording(*args, **kwargs):
        seen.append(real_label_scores(*args, **kwargs))
        return seen[-1]

    with mock.patch.object(evaluation, "label_scores", recording):  # one scoring pass, not two
        result = evaluation.evaluate(backbone, task, examples, prefix, batch_size=16)
    [scores] = seen
    return result, scores.argmax(-1).tolist(), scores


def train_prompt(backbone, records, out: Path, template: str, labels: list[str], steps: int, **train_kw) -> None:
    from softprompt.config import PromptConfig, TaskConfig, TrainConfig
    from softprompt.data import TaskEncoder
    from softprompt.training.loop import train

    task = TaskEncoder(TaskConfig(template=template, labels=labels, label_field="label"), backbone.tokenizer)
    prompt = PromptConfig(method="prompt", num_tokens=train_kw.pop("num_tokens", 4), init="text",
                          init_text=train_kw.pop("init_text", "review label sentiment"))
    config = TrainConfig(steps=steps, eval_every=0, patience=0, **train_kw)
    train(backbone, task, prompt, config, task.encode(records, "train"), out, progress=False)


# -------------------------------------------------------------------------------------------------- tiny model
CUES = {"good": ["great", "fun"], "bad": ["terrible", "awful"]}
FILLER = "the a movie film was is it this very quite".split()


def tiny_records(n: int, seed: int, labels: list[str]) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        index = rng.randrange(2)
        words = rng.sample(FILLER, rng.randint(1, 6)) + [rng.choice(CUES[("bad", "good")[index]])]
        rng.shuffle(words)  # varied lengths: the library sorts and pads, the scorer never pads
        records.append({"text": " ".join(words), "label": labels[index] if rng.random() < 0.8 else index})
    return records


@pytest.mark.parametrize(
    "labels",
    [["negative", "positive"], ["bad", "very good"], ["quite bad", "very good"]],
    ids=["one-token", "mixed-lengths", "two-tokens"],
)
def test_independent_scorer_agrees_on_a_tiny_model(tmp_path, labels):
    from softprompt.backbones import backbone_for
    from softprompt.models import load_model

    from conftest import tiny_model, tiny_tokenizer

    model_dir = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    backbone = backbone_for(*load_model(str(model_dir)))
    train_prompt(backbone, tiny_records(48, 1, labels), tmp_path / "prompt", "review {text} sentiment", labels,
                 steps=15, lr=0.1, warmup_steps=0)

    records = tiny_records(40, 2, labels)
    result, library_predictions, library_scores = library_evaluation(tmp_path / "prompt", backbone, records)
    scorer = IndependentScorer(tmp_path / "prompt", model_dir)
    accuracy, predictions, scores = scorer.evaluate(records)

    torch.testing.assert_close(library_scores, scores, atol=1e-4, rtol=1e-4)
    scorer.prompt = scorer.prompt[:0]  # the agreement is not vacuous: without P the scores are different
    assert not torch.allclose(scorer.evaluate(records)[2], scores, atol=1e-2)
    assert library_predictions == predictions
    assert result["accuracy"] == accuracy
    assert result["n"] == len(records)


# -------------------------------------------------------------------------------------------------- real model
TEMPLATE = "Review: {text}\nSentiment:"
LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def trained_real_prompt(real_backbone, tmp_path_factory):
    """30 library training steps on 240 short Rotten Tomatoes snippets (CPU time), with the embedded model."""
    from softprompt.data.corpora import sentiment_splits

    splits = sentiment_splits()
    rows = [r for r in splits["train"] if len(r["text"]) <= 100][:240]
    out = tmp_path_factory.mktemp("real") / "prompt"
    train_prompt(real_backbone, rows, out, TEMPLATE, LABELS, steps=30, lr=0.01, warmup_steps=5, batch_size=8,
                 num_tokens=10, init_text="Classify the sentiment of this movie review.")
    return out, {**splits, "train": rows}


@pytest.mark.real_model
def test_independent_scorer_agrees_on_the_real_model(real_backbone, trained_real_prompt):
    from softprompt.models import DEFAULT_MODEL, embedded_model_dir

    out, splits = trained_real_prompt
    records = splits["test"][:100]
    result, library_predictions, library_scores = library_evaluation(out, real_backbone, records)
    accuracy, predictions, scores = IndependentScorer(out, embedded_model_dir(DEFAULT_MODEL)).evaluate(records)
    torch.testing.assert_close(library_scores, scores, atol=2e-3, rtol=1e-4)
    assert library_predictions == predictions
    assert result["accuracy"] == accuracy
    assert result["n"] == 100


@pytest.mark.real_model
def test_thirty_steps_lower_the_training_loss_on_the_real_model(real_backbone, trained_real_prompt):
    from softprompt import artifact, methods
    from softprompt.config import PromptConfig
    from softprompt.data import TaskEncoder
    from softprompt.training.loop import loss_on

    out, splits = trained_real_prompt
    log = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5

    # the same on a fixed batch: the initial (text-init) prompt against the trained one
    saved = artifact.load(out)
    task = TaskEncoder(saved.task, real_backbone.tokenizer)
    batch = task.encode(splits["train"][:16], "train")
    initial = methods.build(PromptConfig(**{k: getattr(saved.prompt, k) for k in ("method", "num_tokens", "init",
                                                                                  "init_text")}),
                            real_backbone, LABELS, torch.Generator().manual_seed(0))
    trained = artifact.attach(saved, real_backbone)
    with torch.no_grad():
        before = float(loss_on(real_backbone, initial.kv(real_backbone), batch)[0])
        after = float(loss_on(real_backbone, trained.kv(real_backbone), batch)[0])
    assert after < before
