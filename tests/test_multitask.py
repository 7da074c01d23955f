"""Multi-task training (issue 6, item 4): one run trains one prompt per task over the mixture of their data, each row
of a batch behind its own task's prompt.

- The mixed-batch loss and gradients equal the definition computed row by row: the model reading
  `inputs_embeds = [P_task; E]` for each row alone (prompts of different lengths), summed over the batch's target
  tokens; a prompt gets gradient only from its own task's rows.
- A run on two tasks (a classification and a generation task) writes one artifact per task; each loads back and is
  evaluated on its own held-out data with the same numbers the run recorded.
- `softprompt train --tasks FILE` does the same from the command line, and a bad tasks file is reported clearly.
"""

from __future__ import annotations

import json
import random

import pytest
import torch
import torch.nn.functional as F

from softprompt import artifact
from softprompt.cli import main
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import Example, Task
from softprompt.evaluate import evaluate
from softprompt.train import TaskData, loss_on, row_prefixes, train_multitask

from conftest import EOS, random_prompt, tiny_backbone
from test_cli import save_tiny_model, write_data


def test_mixed_batch_loss_and_gradients_equal_the_row_by_row_definition():
    backbone = tiny_backbone("llama")
    prompts = {"a": random_prompt(backbone, n=3, seed=1), "b": random_prompt(backbone, n=5, seed=2)}
    g = torch.Generator().manual_seed(0)
    ids = lambda n: torch.randint(3, 128, (n,), generator=g).tolist()  # noqa: E731
    rows = [("a", Example(ids(4), ids(2) + [EOS])), ("b", Example(ids(6), ids(1))), ("a", Example(ids(2), ids(3))),
            ("b", Example(ids(5), ids(2) + [EOS]))]  # fmt: skip
    names, examples = zip(*rows)

    kvs = {name: prompt.kv(backbone) for name, prompt in prompts.items()}
    kv, prefix_mask = row_prefixes(backbone, kvs, list(names))
    assert kv.dim() == 6 and prefix_mask.tolist()[1] == [1] * 5 and prefix_mask.tolist()[0] == [0, 0, 1, 1, 1]
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
    kv, mask = row_prefixes(backbone, kvs, [n for n, _ in rows])
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
    sentiment = Task(TaskConfig(template="review {text} sentiment", task="classification",
                                labels=["negative", "positive"], label_field="label"), backbone.tokenizer)  # fmt: skip
    colors = Task(TaskConfig(template="{text} answer", task="generation", target_field="target"), backbone.tokenizer)
    held_out = {"sentiment": sentiment.encode(sentiment_records(24, 9)), "colors": colors.encode(color_records(12, 9))}
    tasks = {
        "sentiment": TaskData(sentiment, sentiment.encode(sentiment_records(48, 1)),
                              sentiment.encode(sentiment_records(16, 2))),
        "colors": TaskData(colors, colors.encode(color_records(24, 1)), colors.encode(color_records(8, 2))),
    }  # fmt: skip
    runs = train_multitask(backbone, tasks, PromptConfig(method="prefix", num_tokens=3, init="random"),
                           TrainConfig(steps=12, batch_size=8, lr=0.05, eval_every=4, patience=0, warmup_steps=0),
                           tmp_path / "run", progress=False)  # fmt: skip
    assert set(runs) == {"sentiment", "colors"}
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["task"] for r in log if "valid" in r} == {"sentiment", "colors"}
    losses = [r["loss"] for r in log if "loss" in r]
    assert len(losses) == 12 and losses[-1] < losses[0]
    for name, run in runs.items():
        saved = artifact.load(tmp_path / "run" / name)
        assert saved.task == tasks[name].task.config and saved.extra["training"]["task"] == name
        prefix = artifact.attach(saved, backbone).kv(backbone)
        assert torch.equal(prefix, run.method.kv(backbone))
        with torch.no_grad():
            # the artifact is the best on this task's own validation data: its score there is the one logged
            logged = [r["valid"] for r in log if r.get("task") == name and r["step"] == run.summary["best_step"]]
            assert evaluate(backbone, tasks[name].task, tasks[name].valid, prefix) == pytest.approx(logged[0])
            result = evaluate(backbone, tasks[name].task, held_out[name], prefix)
        assert result["n"] == len(held_out[name])
    other = torch.load(max((tmp_path / "run" / "checkpoints").glob("*.pt")), weights_only=False)["prompts"]
    assert not torch.equal(other["prompts.sentiment.prefix"], other["prompts.colors.prefix"])


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
