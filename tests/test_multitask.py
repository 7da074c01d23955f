"""Multi-task training (issue 6, item 4): one run trains one prompt per task over the mixture of their data, each row
of a batch behind its own task's prompt.

- The mixed-batch loss and gradients equal the definition computed row by row: the model reading
  `inputs_embeds = [P_task; E]` for each row alone (prompts of different lengths), summed over the batch's target
  tokens; a prompt gets gradient only from its own task's rows.
- A run on two tasks (a classification and a generation task) writes one artifact per task. Each is the prompt of
  that task's own best step, derived here from the logged validation records by the documented rule (accuracy,
  then gold log-probability; generation by loss), a tie included: the prompt the run had at that step, with the
  validation metrics logged there, and held-out metrics equal to the definition computed with `inputs_embeds`.
- Early stopping: patience counts per task, but the run (every task) stops only once every task with validation
  data has gone `patience` evaluations without improving; a stalled task trains on beside an improving one, and a
  task without validation data neither holds the run nor stops it, keeping the prompt it has when the run stops.
- `softprompt train --tasks FILE` does the same from the command line, and a bad tasks file is reported clearly.
"""

from __future__ import annotations

import json
import random

import pytest
import sacrebleu
import torch
import torch.nn.functional as F

from softprompt import artifact
from softprompt.cli import main
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import Example, TaskEncoder
from softprompt.scoring.evaluate import evaluate
from softprompt.training.loop import TrainingTask, loss_on, prompt_input_for, train_multitask

from conftest import EOS, VOCAB, random_prompt, tiny_backbone
from test_cli import save_tiny_model, write_data
from test_train import contradicting_setup


def test_mixed_batch_loss_and_gradients_equal_the_row_by_row_definition():
    backbone = tiny_backbone("llama")
    prompts = {"a": random_prompt(backbone, n=3, seed=1), "b": random_prompt(backbone, n=5, seed=2)}
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    rows = [("a", Example(ids(4), ids(2) + [EOS])), ("b", Example(ids(6), ids(1))), ("a", Example(ids(2), ids(3))),
            ("b", Example(ids(5), ids(2) + [EOS]))]  # fmt: skip
    names, examples = zip(*rows)

    kvs = {name: prompt.kv(backbone) for name, prompt in prompts.items()}
    kv, prefix_mask = prompt_input_for(backbone, kvs, list(names))
    # Both prompts' slots side by side in one shared prefix, each row seeing its own prompt's only (rows then pack).
    assert kv.shape[-2] == 8 and prefix_mask.tolist() == [[1] * 3 + [0] * 5, [0] * 3 + [1] * 5] * 2
    loss, _ = loss_on(backbone, kv, list(examples), prefix_mask=prefix_mask)
    loss.backward()
    ours = {name: p.embeddings.grad.clone() for name, p in prompts.items()}

    for p in prompts.values():
        p.zero_grad(set_to_none=True)
    total, count = 0.0, 0
    for name, example in rows:  # the definition, one row at a time: the model reads [P; E]
        P = prompts[name].embeddings
        tokens = torch.tensor(example.input_ids + example.target_ids)
        embeds = torch.cat([P, backbone.embed(tokens)])[None]
        logits = backbone.model(inputs_embeds=embeds).logits[0]  # (n + T, vocab)
        start = len(P) + len(example.input_ids) - 1  # the position that predicts the first target token
        targets = torch.tensor(example.target_ids)
        total = total + F.cross_entropy(logits[start : start + len(targets)], targets, reduction="sum")
        count += len(targets)
    reference = total / count
    reference.backward()
    torch.testing.assert_close(loss.detach(), reference.detach(), atol=1e-5, rtol=1e-4)
    for name, prompt in prompts.items():
        torch.testing.assert_close(ours[name], prompt.embeddings.grad, atol=1e-5, rtol=1e-4)


def test_a_prompt_learns_only_from_its_own_rows():
    backbone = tiny_backbone("qwen2")
    prompts = {"a": random_prompt(backbone, n=4, seed=1), "b": random_prompt(backbone, n=4, seed=2)}
    rows = [("a", Example([5, 6, 7], [8])), ("b", Example([9, 10], [11])), ("b", Example([12], [13, EOS]))]
    kvs = {name: prompt.kv(backbone) for name, prompt in prompts.items()}
    kv, mask = prompt_input_for(backbone, kvs, [n for n, _ in rows])
    loss_on(backbone, kv, [e for _, e in rows], normalizer=4, prefix_mask=mask)[0].backward()
    mixed = prompts["a"].embeddings.grad.clone()
    prompts["a"].zero_grad(set_to_none=True)
    loss_on(backbone, prompts["a"].kv(backbone), [rows[0][1]], normalizer=4)[0].backward()  # a's rows alone
    torch.testing.assert_close(mixed, prompts["a"].embeddings.grad, atol=1e-6, rtol=1e-5)


WORDS = {"positive": ["great", "good", "fun"], "negative": ["bad", "terrible", "awful"]}


def sentiment_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        label = rng.choice(sorted(WORDS))
        records.append({"text": " ".join(rng.sample(["the", "movie", "was", "very"], 2) + [rng.choice(WORDS[label])]),
                        "label": label})  # fmt: skip
    return records


def color_records(n: int, seed: int) -> list[dict]:
    """A generation task: name the color word that follows 'color'."""
    rng = random.Random(seed)
    return [{"text": f"the color {c} is nice", "target": c} for c in (rng.choice(["red", "blue", "green"])
                                                                      for _ in range(n))]  # fmt: skip


def test_two_task_run_writes_one_artifact_per_task(tmp_path):
    backbone = tiny_backbone("llama")
    tasks, _ = two_tasks(backbone)
    runs = train_multitask(backbone, tasks, PromptConfig(method="prefix", num_tokens=3, init="random"),
                           TrainConfig(steps=12, batch_size=8, lr=0.05, eval_every=4, patience=0, warmup_steps=0),
                           tmp_path / "run", progress=False)  # fmt: skip
    assert set(runs) == {"sentiment", "colors"}
    log = read_log(tmp_path / "run")
    assert {r["task"] for r in log if "valid" in r} == {"sentiment", "colors"}
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    for name, run in runs.items():
        saved = artifact.load(tmp_path / "run" / name)
        assert saved.task == tasks[name].task.config and saved.extra["training"]["task"] == name
        prefix = artifact.attach(saved, backbone).kv(backbone)
        assert torch.equal(prefix, run.method.kv(backbone))
    other = torch.load(max((tmp_path / "run" / "checkpoints").glob("*.pt")), weights_only=False)["prompts"]
    assert not torch.equal(other["prompts.sentiment.prefix"], other["prompts.colors.prefix"])


# ------------------------------------------------------------------------------------ each task's own best step
LABEL_WORDS = ["negative", "positive"]


def two_tasks(backbone):
    """A classification and a generation task, each with validation data, and held-out data for each."""
    sentiment = TaskEncoder(TaskConfig(template="review {text} sentiment", task="classification", labels=LABEL_WORDS,
                                label_field="label"), backbone.tokenizer)  # fmt: skip
    colors = TaskEncoder(TaskConfig(template="{text} answer", task="generation", target_field="target"), backbone.tokenizer)
    tasks = {
        "sentiment": TrainingTask(sentiment, sentiment.encode(sentiment_records(48, 1)),
                              sentiment.encode(sentiment_records(24, 2))),
        "colors": TrainingTask(colors, colors.encode(color_records(24, 1)), colors.encode(color_records(8, 2))),
    }  # fmt: skip
    held_out = {"sentiment": sentiment.encode(sentiment_records(24, 9)), "colors": colors.encode(color_records(12, 9))}
    return tasks, held_out


def read_log(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def is_better(new: dict, old: dict, by_loss: bool = False) -> bool:
    """train.selection_key's documented rule, written out: classification by accuracy, a tie on it by the mean
    gold-label log-probability; generation by chrF, a tie on it by the lower validation loss (`by_loss`, as
    --select-by loss: by the loss alone); only strictly better counts."""
    if "accuracy" in new:
        return new["accuracy"] > old["accuracy"] or (new["accuracy"] == old["accuracy"]
                                                     and new["gold_logprob"] > old["gold_logprob"])  # fmt: skip
    if by_loss:
        return new["loss"] < old["loss"]
    return new["chrf"] > old["chrf"] or (new["chrf"] == old["chrf"] and new["loss"] < old["loss"])


def best_record(log: list[dict], task: str, by_loss: bool = False) -> dict:
    """The task's best evaluation by that rule, from its own records only (the earliest of complete ties)."""
    mine = [r for r in log if r.get("task") == task and "valid" in r]
    best = mine[0]
    for record in mine[1:]:
        if is_better(record["valid"], best["valid"], by_loss):
            best = record
    return best


def explicit_metrics(backbone, P: torch.Tensor, examples, classification: bool) -> dict:
    """Held-out metrics with the model reading inputs_embeds = [P; E] one example at a time (prompt tuning's
    definition): label-word log-probabilities after the input, or greedy decoding up to EOS and teacher-forced loss."""
    model, tokenizer = backbone.model, backbone.tokenizer

    def logits_after(ids: list[int]) -> torch.Tensor:
        return model(inputs_embeds=torch.cat([P, backbone.embed(torch.tensor(ids))])[None]).logits[0]

    with torch.no_grad():
        if classification:
            words = [VOCAB[w] for w in LABEL_WORDS]
            scores = torch.stack([logits_after(e.input_ids)[-1].log_softmax(-1)[words] for e in examples])
            golds, preds = [e.label for e in examples], scores.argmax(-1).tolist()
            f1s = []
            for label in range(len(words)):
                tp = sum(g == p == label for g, p in zip(golds, preds))
                counted = preds.count(label) + golds.count(label)
                f1s += [2 * tp / counted] if counted else []
            return {"accuracy": sum(g == p for g, p in zip(golds, preds)) / len(golds),
                    "macro_f1": sum(f1s) / len(f1s), "n": len(golds),
                    "gold_logprob": float(scores[range(len(golds)), golds].mean())}  # fmt: skip
        limit = max(len(e.target_ids) for e in examples) + 8
        hypotheses, losses = [], []
        for e in examples:
            new = []
            while len(new) < limit:
                token = int(logits_after(e.input_ids + new)[-1].argmax())
                if token == EOS:
                    break
                new.append(token)
            hypotheses.append(tokenizer.decode(new, skip_special_tokens=True).strip())
            logits = logits_after(e.input_ids + e.target_ids)
            start = len(P) + len(e.input_ids) - 1
            losses += F.cross_entropy(logits[start : start + len(e.target_ids)], torch.tensor(e.target_ids),
                                      reduction="none").tolist()  # fmt: skip
        targets = [e.target.strip() for e in examples]
        return {"exact_match": sum(h == t for h, t in zip(hypotheses, targets)) / len(targets),
                "chrf": sacrebleu.corpus_chrf(hypotheses, [targets]).score,
                "bleu": sacrebleu.corpus_bleu(hypotheses, [targets]).score, "n": len(targets),
                "loss": sum(losses) / len(losses)}  # fmt: skip


def test_each_task_keeps_the_prompt_of_its_own_best_step(tmp_path):
    backbone = tiny_backbone("llama")
    tasks, held_out = two_tasks(backbone)
    prompt_config = PromptConfig(method="prompt", num_tokens=3, init="random")
    # constant rate: a run cut at step k has the very prompt the longer run had at step k
    settings = dict(batch_size=8, lr=0.1, eval_every=2, patience=0, warmup_steps=0, schedule="constant", seed=2)
    steps = 20
    runs = train_multitask(backbone, tasks, prompt_config, TrainConfig(steps=steps, **settings), tmp_path / "run",
                           progress=False)  # fmt: skip
    log = read_log(tmp_path / "run")
    best = {name: best_record(log, name) for name in tasks}
    sentiment = [r for r in log if r.get("task") == "sentiment"]
    tied = [r for r in sentiment if r["valid"]["accuracy"] == best["sentiment"]["valid"]["accuracy"]]
    # what makes this run a test of the rule: the tasks' best steps differ; sentiment's best accuracy is tied and
    # the tie is not won by the first; an evaluation with a higher gold log-probability has a lower accuracy
    assert best["sentiment"]["step"] != best["colors"]["step"]
    assert len(tied) >= 2 and best["sentiment"] is not tied[0]
    assert any(r["valid"]["gold_logprob"] > best["sentiment"]["valid"]["gold_logprob"] for r in sentiment)

    last = torch.load(max((tmp_path / "run" / "checkpoints").glob("*.pt")), weights_only=False)["prompts"]
    for name, task_data in tasks.items():
        step = best[name]["step"]
        assert runs[name].summary["best_step"] == step and runs[name].summary["valid"] == best[name]["valid"]
        saved = artifact.load(tmp_path / "run" / name)
        assert saved.extra["training"]["best_step"] == step
        P = saved.tensors["prompt_embeddings"]
        # the artifact is the prompt after exactly `step` steps of the same run: the end of a run cut there
        if step == steps:
            at_step = last[f"prompts.{name}.embeddings"]
        else:
            train_multitask(backbone, tasks, prompt_config, TrainConfig(steps=step, **settings),
                            tmp_path / f"cut-{step}", progress=False)  # fmt: skip
            at_step = torch.load(max((tmp_path / f"cut-{step}" / "checkpoints").glob("*.pt")),
                                 weights_only=False)["prompts"][f"prompts.{name}.embeddings"]  # fmt: skip
        assert torch.equal(P, at_step)
        prefix = artifact.attach(saved, backbone).kv(backbone)
        classification = task_data.task.is_classification
        with torch.no_grad():
            # its own validation metrics are the ones logged at its best step ...
            logged = best[name]["valid"]
            assert evaluate(backbone, task_data.task, task_data.valid, prefix) == pytest.approx(logged, abs=1e-5)
            assert explicit_metrics(backbone, P, task_data.valid, classification) == pytest.approx(logged, abs=1e-5)
            # ... and its held-out metrics are what the definition gives for that prompt
            result = evaluate(backbone, task_data.task, held_out[name], prefix)
        assert result == pytest.approx(explicit_metrics(backbone, P, held_out[name], classification), abs=1e-5)
        assert result["n"] == len(held_out[name])


# ----------------------------------------------------------------------------------------- early stopping
def stop_step(log: list[dict], patience: int, by_loss: bool = False) -> int | None:
    """The documented rule, written out: each validated task counts its evaluations since its last improvement;
    the run stops at the first evaluation where every validated task has counted `patience` (None: never)."""
    names = sorted({r["task"] for r in log if "valid" in r})
    best, waiting = {}, dict.fromkeys(names, 0)
    for step in sorted({r["step"] for r in log if "valid" in r}):
        for name in names:
            [record] = [r for r in log if "valid" in r and r["task"] == name and r["step"] == step]
            if name not in best or is_better(record["valid"], best[name], by_loss):
                best[name], waiting[name] = record["valid"], 0
            else:
                waiting[name] += 1
        if all(count >= patience for count in waiting.values()):
            return step
    return None


def stalled_task(backbone, tmp_path) -> TrainingTask:
    """A prompt trained to answer "negative", trained on all-positive labels and validated on all-negative ones: it
    only gets worse on its validation data."""
    task, _, initial, train_examples, valid_examples = contradicting_setup(backbone, tmp_path)
    return TrainingTask(task, train_examples, valid_examples, init=initial)


def test_a_stalled_task_trains_on_while_another_improves(tmp_path):
    backbone = tiny_backbone("llama")
    stalled = stalled_task(backbone, tmp_path)
    colors = two_tasks(backbone)[0]["colors"]
    tasks = {"stalled": stalled, "colors": colors}
    # colors improves by its loss at every validation (its chrF, the default metric, is flat or noisy here)
    runs = train_multitask(backbone, tasks, PromptConfig(method="prompt", num_tokens=4, init="random"),
                           TrainConfig(steps=12, lr=0.05, eval_every=2, patience=2, warmup_steps=0, select_by="loss"),
                           tmp_path / "run", progress=False)  # fmt: skip
    log = read_log(tmp_path / "run")
    stalled_log = [r for r in log if r.get("task") == "stalled" and "valid" in r]
    assert best_record(log, "stalled")["step"] == 0 and len(stalled_log) == 7  # past its patience many times over
    assert best_record(log, "colors", by_loss=True)["step"] == 12
    assert [(r["task"], r["step"]) for r in log if "warning" in r] == [("stalled", 4)]  # 30 % of 12: the first eval
    assert stop_step(log, patience=2, by_loss=True) is None
    # so nothing stops: every task trains to the last step, each artifact is its own best
    assert [r["step"] for r in log if "loss" in r] == list(range(1, 13))
    for name, run in runs.items():
        assert run.summary["stopped_early"] is False and run.summary["last_step"] == 12
        assert run.summary["best_step"] == best_record(log, name, by_loss=True)["step"]
    initial = stalled.init.embeddings.detach()
    assert torch.equal(artifact.load(tmp_path / "run" / "stalled").tensors["prompt_embeddings"], initial)
    last = torch.load(max((tmp_path / "run" / "checkpoints").glob("*.pt")), weights_only=False)["prompts"]
    assert not torch.allclose(last["prompts.stalled.embeddings"], initial)  # it went on training, its best kept


def test_the_run_stops_when_every_validated_task_has_stalled(tmp_path):
    backbone = tiny_backbone("llama")
    stalled = stalled_task(backbone, tmp_path)
    colors = two_tasks(backbone)[0]["colors"]
    plain = TrainingTask(colors.task, colors.train)  # no validation data: it cannot hold the run, nor stop it
    runs = train_multitask(backbone, {"stalled": stalled, "plain": plain},
                           PromptConfig(method="prompt", num_tokens=4, init="random"),
                           TrainConfig(steps=30, lr=0.05, eval_every=2, patience=3, warmup_steps=0),
                           tmp_path / "run", progress=False)  # fmt: skip
    log = read_log(tmp_path / "run")
    assert {r["task"] for r in log if "valid" in r} == {"stalled"}
    stop = stop_step(log, patience=3)
    assert stop == 2 * 3  # three evaluations after the step-0 one, none better
    assert [r["step"] for r in log if "loss" in r] == list(range(1, stop + 1))
    assert [r["step"] for r in log if "valid" in r] == [0, 2, 4, 6]
    for run in runs.values():
        assert run.summary["stopped_early"] is True and run.summary["last_step"] == stop
    assert runs["stalled"].summary["best_step"] == 0
    # the task without validation keeps the prompt it had when the run stopped
    last = torch.load(max((tmp_path / "run" / "checkpoints").glob("*.pt")), weights_only=False)
    assert last["step"] == stop
    assert torch.equal(artifact.load(tmp_path / "run" / "plain").tensors["prompt_embeddings"],
                       last["prompts"]["prompts.plain.embeddings"])  # fmt: skip


def test_cli_tasks_file(tmp_path, capsys, monkeypatch):
    model = save_tiny_model(tmp_path / "tiny")
    write_data(tmp_path / "reviews.jsonl", 24, seed=1)
    with (tmp_path / "colors.jsonl").open("w") as f:
        f.writelines(json.dumps(r) + "\n" for r in color_records(16, 1))
    tasks = {
        "sentiment": {"train": "reviews.jsonl", "template": "review {text} sentiment", "labels": "negative,positive",
                      "label_field": "label"},
        "colors": {"train": "colors.jsonl", "valid": "colors.jsonl", "template": "{text} answer",
                   "target_field": "target"},
    }  # fmt: skip
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    args = ["softprompt", "train", "--model", str(model), "--tasks", str(tmp_path / "tasks.json"), "--steps", "4",
            "--num-tokens", "3", "--init", "random", "--no-progress", "--out"]
    monkeypatch.setattr("sys.argv", args + [str(tmp_path / "out")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.count("Saved the best prompt") == 2
    for name in tasks:
        assert artifact.load(tmp_path / "out" / name).task.template == tasks[name]["template"]

    tasks["colors"]["labelz"] = "x"
    tasks["colors"]["template"] = 5
    del tasks["sentiment"]["train"]
    (tmp_path / "tasks.json").write_text(json.dumps(tasks))
    monkeypatch.setattr("sys.argv", args + [str(tmp_path / "out2")])
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert "task 'sentiment': missing train" in err and "task 'colors': unknown key(s) labelz" in err
    assert "not text: template" in err
    assert not (tmp_path / "out2").exists()
