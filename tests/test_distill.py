"""Context distillation (distill.py) on tiny random models (conftest). The loss against KL computed here from plain
transformers forwards (explicit `[P; E]` for the student, the whole teacher text for the teacher, greedy decoding
without a cache for its continuation), for classification (one- and two-token label words) and generation, with the
student's own model and with another teacher; the teacher's prefix, read once, against the whole text read uncached
(with and without a BOS); alpha's mix of KL and cross-entropy; student and teacher reading the same tokens give KL 0
and no gradient; training lowers the KL; the CLI writes an artifact that loads and scores as its log says, and a run
interrupted and resumed (--resume) ends as the uninterrupted one; bad input is refused with messages that name it."""

from __future__ import annotations

import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from tokenizers.processors import TemplateProcessing
from transformers import PreTrainedTokenizerFast
from typer.testing import CliRunner

from softprompt import artifact
from softprompt.backbones import backbone_for
from softprompt.training.checkpoint import latest_checkpoint
from softprompt.cli import app
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import TaskEncoder, fill
from softprompt.training.distill import (
    DistillConfig, DistillObjective, Teacher, distill, distill_examples, teacher_label_logprobs,
)  # fmt: skip
from softprompt.errors import SoftPromptError
from softprompt.scoring.evaluate import evaluate
from softprompt.training.loop import BatchOrder, loss_on

from conftest import EOS, VOCAB, random_prompt, run_main, tiny_backbone, tiny_model, tiny_tokenizer
from test_backbones_seq2seq import tiny_seq2seq
from test_cli import error_message, save_tiny_model

STUDENT = "review {text} sentiment"
TEACHER = "question great positive bad negative terrible negative fun positive answer review {text} sentiment"
LABELS = ["negative", "positive"]
TWO_TOKEN_LABELS = ["bad", "not good", "very good"]
CUES = {"positive": ["great", "good", "fun"], "negative": ["bad", "terrible", "awful"]}
FILLER = "the a movie film was is it this very quite".split()


def records(n: int, seed: int, labelled: bool = False) -> list[dict]:
    """Texts of filler words and one cue word; the cue's label only when `labelled`, and a gold target always
    named `target` then too (for generation)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(LABELS)
        words = rng.sample(FILLER, 3) + [rng.choice(CUES[label])]
        rng.shuffle(words)
        out.append({"text": " ".join(words), **({"label": label, "target": f"it was {label}"} if labelled else {})})
    return out


def classification(backbone, labels=LABELS, template=STUDENT) -> TaskEncoder:
    return TaskEncoder(TaskConfig(template=template, labels=labels, label_field="label"), backbone.tokenizer)


def generation(backbone, template=STUDENT) -> TaskEncoder:
    return TaskEncoder(TaskConfig(template=template, task="generation", target_field="target"), backbone.tokenizer)


# ------------------------------------------------------------------------- independent computations (transformers)
def student_logits(model, prompt: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab): the logits of `[P; E(ids)]` at the ids' positions, the model's own forward."""
    embeds = torch.cat([prompt, model.get_input_embeddings()(torch.tensor(ids))])[None]
    return model(inputs_embeds=embeds).logits[0, len(prompt) :]


def whole_logits(model, ids: list[int]) -> torch.Tensor:
    """(len(ids), vocab): the logits of the token sequence read whole, no cache, no prefix."""
    return model(input_ids=torch.tensor([ids])).logits[0]


def label_distribution(logits_of, ids: list[int], label_ids: list[list[int]]) -> torch.Tensor:
    """(labels,) log-softmax over the label words of each word's summed token log-probability after `ids`."""
    scores = []
    for label in label_ids:
        logprobs = logits_of(ids + label).log_softmax(-1)
        scores.append(sum(logprobs[len(ids) - 1 + j, token] for j, token in enumerate(label)))
    return torch.stack(scores).log_softmax(-1)


def kl(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) summed over the last axis."""
    return (teacher_logprobs.exp() * (teacher_logprobs - student_logprobs)).sum(-1)


def greedy(model, ids: list[int], max_new_tokens: int) -> list[int]:
    """Greedy decoding by the definition (the whole sequence at every step), EOS appended where it stopped."""
    out = []
    while len(out) < max_new_tokens:
        token = int(whole_logits(model, ids + out)[-1].argmax())
        if token == EOS:
            return out + [EOS]
        out.append(token)
    return out


def expected_label_kl(student, prompt, teacher_model, task, recs, teacher_template=TEACHER) -> torch.Tensor:
    """Mean over records of KL over the label words: the student reading `[P; E]` of its template, the teacher the
    whole teacher text."""
    tok = student.tokenizer
    values = []
    for record in recs:
        s = label_distribution(lambda ids: student_logits(student.model, prompt, ids),
                               tok(fill(task.config.template, record))["input_ids"], task.label_ids)  # fmt: skip
        t = label_distribution(lambda ids: whole_logits(teacher_model, ids),
                               tok(fill(teacher_template, record))["input_ids"], task.label_ids)  # fmt: skip
        values.append(kl(t, s))
    return torch.stack(values).mean()


def expected_token_kl(student, prompt, teacher_model, task, recs, continuations) -> torch.Tensor:
    """Mean over every continuation position of KL between the two models' next-token distributions."""
    tok, values = student.tokenizer, []
    for record, cont in zip(recs, continuations):
        s_ids, t_ids = tok(fill(task.config.template, record))["input_ids"], tok(fill(TEACHER, record))["input_ids"]
        # the positions that predict the continuation's tokens, (len(cont), vocab) each
        s = student_logits(student.model, prompt, s_ids + cont).log_softmax(-1)[len(s_ids) - 1 : -1]
        t = whole_logits(teacher_model, t_ids + cont).log_softmax(-1)[len(t_ids) - 1 : -1]
        values.append(kl(t, s))
    return torch.cat(values).mean()


def built(student, teacher_backbone, task, recs, **config):
    """(objective, examples) as `distill` builds them."""
    config = DistillConfig(teacher_template=TEACHER, **config)
    teacher = Teacher.of(teacher_backbone, config.teacher_template)
    return DistillObjective(teacher, task, config.alpha), distill_examples(task, teacher, recs, config)


# --------------------------------------------------------------------------------- the loss is KL, as defined
@pytest.mark.parametrize("teacher_seed", [None, 1], ids=["own-model", "other-teacher"])
@pytest.mark.parametrize("labels", [LABELS, TWO_TOKEN_LABELS], ids=["one-token", "two-token"])
def test_classification_loss_is_kl_over_the_label_words(arch, labels, teacher_seed):
    student = tiny_backbone(arch)
    teacher = student if teacher_seed is None else tiny_backbone(arch, seed=teacher_seed)
    task = classification(student, labels)
    recs = records(6, seed=3)
    objective, examples = built(student, teacher, task, recs)
    method = random_prompt(student, "prompt", n=4, seed=2)
    with torch.no_grad():
        loss, tokens = objective(student, method.kv(student), examples)
        expected = expected_label_kl(student, method.embeddings, teacher.model, task, recs)
        # the teacher's answer (each example's target) is its most probable label word
        answers = [task.label_ids[int(label_distribution(lambda ids: whole_logits(teacher.model, ids),
                                                         student.tokenizer(fill(TEACHER, r))["input_ids"],
                                                         task.label_ids).argmax())] for r in recs]  # fmt: skip
    assert float(expected) > 1e-4  # the two sides differ: a loss of 0 would not pass
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    assert [e.target_ids for e in examples] == answers
    assert tokens == sum(len(e.input_ids) + len(e.target_ids) for e in examples)


@pytest.mark.parametrize("teacher_seed", [None, 1], ids=["own-model", "other-teacher"])
def test_generation_loss_is_kl_along_the_teachers_greedy_continuation(arch, teacher_seed):
    student = tiny_backbone(arch)
    teacher = student if teacher_seed is None else tiny_backbone(arch, seed=teacher_seed)
    task = generation(student)
    recs = records(5, seed=4)
    objective, examples = built(student, teacher, task, recs, max_new_tokens=4)
    method = random_prompt(student, "prompt", n=3, seed=2)
    with torch.no_grad():
        continuations = [greedy(teacher.model, student.tokenizer(fill(TEACHER, r))["input_ids"], 4) for r in recs]
        loss, _ = objective(student, method.kv(student), examples)
        expected = expected_token_kl(student, method.embeddings, teacher.model, task, recs, continuations)
    assert [e.target_ids for e in examples] == continuations
    assert sum(map(len, continuations)) > len(recs)  # some continuation has several positions
    assert float(expected) > 1e-4
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------- the teacher's prefix is its text, read once
def bos_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny tokenizer, adding `<eos>` as a BOS in front of every text it tokenizes with special tokens."""
    tok = tiny_tokenizer()
    tok.backend_tokenizer.post_processor = TemplateProcessing(single="<eos> $A", special_tokens=[("<eos>", EOS)])
    return tok


@pytest.mark.parametrize("template", [TEACHER, "{text} great positive bad negative answer"], ids=["head", "no-head"])
@pytest.mark.parametrize("bos", [False, True], ids=["no-bos", "bos"])
def test_cached_teacher_prefix_gives_the_scores_of_the_whole_text(arch, template, bos):
    tok = bos_tokenizer() if bos else tiny_tokenizer()
    teacher = backbone_for(tiny_model(arch), tok)
    task = classification(teacher, TWO_TOKEN_LABELS)
    recs = records(6, seed=5)
    cached = Teacher.of(teacher, template)
    head = template[: template.index("{")]
    assert cached.prefix_length == len(tok(head)["input_ids"]) == len(head.split()) + bos
    assert (cached.prefix is None) == (cached.prefix_length == 0)
    rows = [cached.row_ids(r) for r in recs]
    with torch.no_grad():
        ours = teacher_label_logprobs(cached, task, rows)
        whole = torch.stack([label_distribution(lambda ids: whole_logits(teacher.model, ids),
                                                tok(fill(template, r))["input_ids"], task.label_ids)
                             for r in recs])  # fmt: skip
    if bos:
        assert tok(fill(template, recs[0]))["input_ids"][0] == EOS and EOS not in rows[0]
    torch.testing.assert_close(ours, whole, rtol=1e-4, atol=1e-5)
    assert float((whole[:, 0] - whole[:, 1]).std()) > 1e-4  # the rows' texts matter: a constant would not pass


# --------------------------------------------------------------------------------------------------- alpha mixes
@pytest.mark.parametrize("kind", ["classification", "generation"])
@pytest.mark.parametrize("alpha", [0.3, 1.0])
def test_alpha_mixes_kl_and_the_ordinary_cross_entropy(kind, alpha):
    student, teacher = tiny_backbone("llama"), tiny_backbone("llama", seed=1)
    task = classification(student) if kind == "classification" else generation(student)
    recs = records(6, seed=6, labelled=True)
    objective, examples = built(student, teacher, task, recs, alpha=alpha, max_new_tokens=3)
    method = random_prompt(student, "prompt", n=4, seed=2)
    with torch.no_grad():
        kv = method.kv(student)
        loss, _ = objective(student, kv, examples)
        if kind == "classification":
            kl_part = expected_label_kl(student, method.embeddings, teacher.model, task, recs)
        else:
            continuations = [e.target_ids for e in examples]
            kl_part = expected_token_kl(student, method.embeddings, teacher.model, task, recs, continuations)
        ce, _ = loss_on(student, kv, task.encode(recs))  # the gold labels or targets, as `train` reads them
    torch.testing.assert_close(loss, (1 - alpha) * kl_part + alpha * ce, rtol=1e-4, atol=1e-6)
    # the trainer's normalizer (its target count per process) weights a call by its share of it
    with torch.no_grad():
        part, _ = objective(student, kv, examples[:2], normalizer=10.0)
        alone, _ = objective(student, kv, examples[:2])
    torch.testing.assert_close(part, alone * sum(len(e.target_ids) for e in examples[:2]) / 10.0)


# ------------------------------------------------------------------- the same tokens on both sides: nothing to learn
@pytest.mark.parametrize("kind", ["classification", "generation"])
@pytest.mark.parametrize("method_name", ["prompt", "prefix"])
def test_kl_is_zero_when_student_and_teacher_read_the_same_tokens(kind, method_name):
    """The teacher caches "review" as its prefix and reads "{text} sentiment"; the student's one virtual token
    starts as the same word's K/V (text init) and reads the same template: both see one sequence."""
    backbone = tiny_backbone("llama")
    template = "{text} sentiment"
    task = classification(backbone, template=template) if kind == "classification" else generation(backbone, template)
    config = DistillConfig(teacher_template="review " + template, max_new_tokens=3)
    teacher = Teacher.of(backbone, config.teacher_template)
    examples = distill_examples(task, teacher, records(6, seed=7), config)
    assert all(e.input_ids == e.teacher_ids for e in examples)
    method = random_prompt(backbone, method_name, n=1, init="text", init_text="review")
    loss, _ = DistillObjective(teacher, task)(backbone, method.kv(backbone), examples)
    loss.backward()
    assert abs(float(loss.detach())) < 1e-6
    assert max(float(p.grad.abs().max()) for p in method.parameters()) < 1e-5
    # another prompt differs from the teacher, and the loss says so
    other = random_prompt(backbone, method_name, n=1, seed=3)
    with torch.no_grad():
        assert float(DistillObjective(teacher, task)(backbone, other.kv(backbone), examples)[0]) > 1e-3


# ------------------------------------------------------------------------------------------------ training learns
@pytest.mark.parametrize("kind", ["classification", "generation"])
@pytest.mark.parametrize("method_name", ["prompt", "prefix"])
def test_distillation_lowers_the_kl_and_keeps_the_last_prompt_without_validation(tmp_path, kind, method_name):
    """Also: the run's first logged loss is the objective, with the teacher given, on the run's first batch."""
    student, teacher = tiny_backbone("llama"), tiny_backbone("llama", seed=1)
    task = classification(student) if kind == "classification" else generation(student)
    recs = records(32, seed=8)
    config = DistillConfig(teacher_template=TEACHER, max_new_tokens=3)
    prompt_config = PromptConfig(method=method_name, num_tokens=4, init="random")
    run = distill(student, task, config, prompt_config, TrainConfig(steps=25, batch_size=8, lr=0.1, warmup_steps=0),
                  recs, tmp_path, teacher=teacher, progress=False)  # fmt: skip
    objective, examples = built(student, teacher, task, recs, max_new_tokens=3)
    start = random_prompt(student, method_name, n=4, seed=0)  # what the run started from (seed 0)
    first = [e for _, e in BatchOrder([("prompt", e) for e in examples], 8, seed=0)[0]]
    with torch.no_grad():
        before = float(objective(student, start.kv(student), examples)[0])
        after = float(objective(student, run.method.kv(student), examples)[0])
        first_loss = float(objective(student, start.kv(student), first)[0])
    logged = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1 and logged["loss"] == pytest.approx(first_loss, rel=1e-5)
    assert after < 0.8 * before
    assert run.summary["best_step"] == run.summary["last_step"] == 25
    assert run.summary["distillation"] == {"teacher_template": TEACHER, "alpha": 0.0, "teacher_model": None,
                                           "max_new_tokens": 3}  # fmt: skip
    saved = artifact.load(tmp_path)
    assert saved.task == task.config and saved.extra["training"] == json.loads(json.dumps(run.summary))


# ------------------------------------------------------------------------------------------------------------ CLI
def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    return dict(root=root, model=save_tiny_model(root / "student"), teacher=save_tiny_model(root / "teacher", seed=1),
                train=write_jsonl(root / "train.jsonl", records(24, seed=9)),
                valid=write_jsonl(root / "valid.jsonl", records(12, seed=10, labelled=True)))  # fmt: skip


def cli_args(f, out, *extra) -> list[str]:
    return [str(a) for a in ["distill", "--model", f["model"], "--train", f["train"], "--template", STUDENT,
                             "--teacher-template", TEACHER, "--num-tokens", 4, "--steps", 6, "--batch-size", 4,
                             "--out", out, "--no-progress", *extra]]  # fmt: skip


def test_cli_distills_into_an_artifact_that_loads(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "classifier"
    result = CliRunner().invoke(app, cli_args(folders, out, "--labels", ",".join(LABELS), "--valid", folders["valid"],
                                              "--eval-every", 3))  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Saved the distilled prompt (step " in result.output and str(out) in result.output
    saved = artifact.load(out)
    config = json.loads((out / "config.json").read_text())
    assert saved.prompt.method == "prefix" and saved.prompt.num_tokens == 4  # train's defaults, --num-tokens
    assert saved.task.template == STUDENT and saved.task.labels == LABELS and saved.task.label_field == "label"
    training = config["training"]
    assert training["distillation"]["teacher_template"] == TEACHER and training["last_step"] == 6
    # selected by accuracy on the labelled validation data: the saved prompt scores what the log recorded for it
    backbone = backbone_for(tiny_model("llama"), tiny_tokenizer())
    task = TaskEncoder(saved.task, backbone.tokenizer)
    result = evaluate(backbone, task, task.encode(records(12, seed=10, labelled=True)),
                      artifact.prefix_of(saved, backbone))  # fmt: skip
    assert result["accuracy"] == training["valid"]["accuracy"]

    out = tmp_path / "generator"  # generation from another teacher model, no validation: the last prompt
    result = CliRunner().invoke(app, cli_args(folders, out, "--target-field", "target", "--teacher-model",
                                              folders["teacher"], "--method", "prefix", "--max-new-tokens", 3))
    assert result.exit_code == 0, result.output
    saved = artifact.load(out)
    training = saved.extra["training"]
    assert saved.task.task == "generation" and saved.prompt.method == "prefix"
    assert training["best_step"] == training["last_step"] == 6
    assert training["distillation"]["teacher_model"] == str(folders["teacher"])
    assert artifact.prefix_of(saved, backbone).shape == (2, 2, 2, 4, 8)


def test_cli_resume_after_an_interruption_ends_as_the_uninterrupted_run(folders, tmp_path, monkeypatch, capsys):
    """`distill --resume`: a run stopped by SIGTERM in its 3rd step of 6 (sent from inside that step's loss, so it
    arrives at a known step) writes a checkpoint and exits with 143; the same command with --resume finishes it, and
    the artifact (the best prompt on validation), the last step's prompt and every logged loss and validation are
    bit for bit those of the same command never interrupted (one thread: the same arithmetic)."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    extra = ["--labels", ",".join(LABELS), "--valid", folders["valid"], "--eval-every", 2, "--lr", 0.1,
             "--warmup-steps", 0]  # fmt: skip
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    code, _, err = run_main(monkeypatch, capsys, cli_args(folders, whole, *extra))
    assert code == 0, err
    objective, steps = DistillObjective.__call__, []

    def interrupting(self, *args, **kwargs):
        if torch.is_grad_enabled():  # a training step (validation scores without gradients)
            steps.append(1)
            if len(steps) == 3:
                os.kill(os.getpid(), signal.SIGTERM)
        return objective(self, *args, **kwargs)

    monkeypatch.setattr(DistillObjective, "__call__", interrupting)
    code, _, err = run_main(monkeypatch, capsys, cli_args(folders, parts, *extra))
    assert code == 128 + signal.SIGTERM and "SIGTERM received: stopped after step 3" in err, err
    stopped = torch.load(latest_checkpoint(parts), weights_only=False)
    assert stopped["step"] == 3 and not stopped["finished"]
    monkeypatch.setattr(DistillObjective, "__call__", objective)
    code, _, err = run_main(monkeypatch, capsys, cli_args(folders, parts, *extra, "--resume"))
    assert code == 0 and "resuming from" in err, err

    def finished(out: Path) -> tuple[dict, dict, list[dict], dict]:
        checkpoint = torch.load(latest_checkpoint(out), weights_only=False)
        assert checkpoint["finished"] and checkpoint["step"] == 6
        log = [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"}  # a speed, not a result
               for line in (out / "metrics.jsonl").read_text().splitlines()]  # fmt: skip
        training = json.loads((out / "config.json").read_text())["training"]
        return load_file(out / "prompt.safetensors"), checkpoint["prompts"], log, training

    (artifact_a, last_a, log_a, training_a), (artifact_b, last_b, log_b, training_b) = map(finished, (whole, parts))
    for a, b in ((artifact_a, artifact_b), (last_a, last_b)):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert log_b == log_a and [r["step"] for r in log_a if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert training_b["best_step"] == training_a["best_step"] and training_b["valid"] == training_a["valid"]
    assert len({float(r["loss"]) for r in log_a if "loss" in r}) == 6  # the prompt moved every step


# ------------------------------------------------------------------------------------------------------ bad input
def swapped_tokenizer(folder: Path) -> Path:
    """The tiny model with a tokenizer of the same size whose words 'great' and 'bad' trade ids."""
    vocab = dict(VOCAB)
    vocab["great"], vocab["bad"] = VOCAB["bad"], VOCAB["great"]
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tiny_model("llama").save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                            unk_token="<unk>").save_pretrained(folder)  # fmt: skip
    return folder


def wider_vocabulary(folder: Path) -> Path:
    """The tiny model with two more token ids than its tokenizer knows."""
    model = tiny_model("llama")
    model.resize_token_embeddings(130)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def test_bad_input_is_refused_with_a_message_that_names_it(folders, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    f, labels = folders, ["--labels", ",".join(LABELS)]
    partial = write_jsonl(tmp_path / "partial.jsonl", [{"text": "the movie", "topic": "film"}, {"text": "a film"}])
    long_head = " ".join(["the"] * 130) + " review {text} sentiment"  # the head alone is too long
    long_rows = " ".join(["the"] * 124) + " review {text} sentiment"  # 125 + 5 + a label: 131 positions

    def refused(args: list, needles: list[str]) -> None:
        code, _, err = run_main(monkeypatch, capsys, args)
        assert code != 0 and "Traceback" not in err, err
        message = error_message(err)
        for needle in needles:
            assert needle in message, (needle, message)

    out = tmp_path / "out"
    refused(cli_args(f, out, *labels, "--alpha", 1.5), ["alpha must be in [0, 1], got 1.5"])
    refused(cli_args(f, out, *labels, "--alpha", -0.1, "--max-new-tokens", 0),
            ["alpha must be in [0, 1], got -0.1", "max_new_tokens must be at least 1, got 0"])
    refused([*cli_args(f, out, *labels), "--teacher-template", "no field here"],
            ["the teacher template 'no field here' names no {field}"])
    refused([*cli_args(f, out, *labels), "--teacher-template", "question {topic} review {text}"],
            [str(f["train"]), "--teacher-template names the field {topic}, but no record has it",
             "the records have: text"])
    refused([*cli_args(f, out, *labels), "--train", partial, "--teacher-template", "question {topic} review {text}"],
            [f"{partial}, line 2 (example 2): missing field(s) topic of --teacher-template"])
    refused([*cli_args(f, out, *labels), "--template", "review {body}"],
            [str(f["train"]), "the template 'review {body}' names the field {body}, but no record has it"])
    refused(cli_args(f, out, *labels, "--alpha", 0.5),  # cross-entropy needs the labels the records lack
            [str(f["train"]), "--label-field 'label' names a field no record has", "line 1 (example 1): missing "
             "field(s) label"])  # fmt: skip
    refused([*cli_args(f, out, *labels), "--teacher-template", long_head],
            ["text before its first {field} runs past the teacher model's context of 128 positions (131 tokens)"])
    refused([*cli_args(f, out, *labels), "--teacher-template", long_rows],
            ["runs past the teacher model's context of 128 positions", f"{f['train']}, line 1 (example 1) (131 "
             "positions)"])  # fmt: skip
    refused(cli_args(f, out, "--target-field", "target", "--max-new-tokens", 10, "--max-length", 8),
            ["the teacher's answers take up to 11 tokens, leaving no room for the input within max_length 8"])
    refused(cli_args(f, out, *labels, "--teacher-model", swapped_tokenizer(tmp_path / "swapped")),
            ["cannot teach", "its tokenizer's vocabulary differs from the student's", "share the student's tokenizer"])
    refused(cli_args(f, out, *labels, "--teacher-model", wider_vocabulary(tmp_path / "wider")),
            ["its logits cover 130 token ids, the student's 128"])
    assert not out.exists()


def test_an_encoder_decoder_cannot_be_a_teacher():
    with pytest.raises(SoftPromptError, match="cannot be a teacher: the constant part of its text cannot be cached"):
        Teacher.of(tiny_seq2seq(), TEACHER)
