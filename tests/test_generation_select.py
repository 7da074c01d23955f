"""Generation as a first-class task: model selection by a generation metric (`TrainConfig.select_by`, chrF by default)
through the keep-best loop, the "did not learn" check, a resumed run and a search, with a metric the task does not
report refused; and `eval --show N` / `--save-outputs FILE`, whose outputs are checked against greedy decoding and
label scoring written out here with the model's plain forward (no cache, no code of ours)."""

from __future__ import annotations

import json

import pytest
import sacrebleu
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from softprompt import artifact
from softprompt.backbones import backbone_for
from softprompt.config import PromptConfig, TaskConfig, TrainConfig
from softprompt.data import TaskEncoder, fill, read_records
from softprompt.errors import SoftPromptError
from softprompt.training import search
from softprompt.training.loop import improves, selection_key, train

from conftest import EOS, VOCAB, random_prompt, run_main, tiny_tokenizer
from test_cli import save_tiny_model, write_data
from test_train import generation_data, llama, prompt_config, sentiment_records, sentiment_task  # noqa: F401

NEAR = {"chrf": 30.0, "bleu": 2.0, "exact_match": 0.0, "loss": 6.0, "n": 4}
"""A generation result with a better chrF and a worse loss than `FAR`."""
FAR = {"chrf": 12.0, "bleu": 5.0, "exact_match": 0.0, "loss": 1.0, "n": 4}


# ------------------------------------------------------------------------------------------ the selection rule
def test_chrf_wins_by_default_and_the_loss_when_asked():
    assert improves(selection_key(NEAR), selection_key(FAR)) and not improves(selection_key(FAR), selection_key(NEAR))
    by_loss = lambda r: selection_key(r, "loss")  # noqa: E731
    assert improves(by_loss(FAR), by_loss(NEAR)) and not improves(by_loss(NEAR), by_loss(FAR))
    assert improves(selection_key(FAR, "bleu"), selection_key(NEAR, "bleu"))
    # a tie on the metric goes to the lower loss; a complete tie keeps the earlier one
    tied = {**NEAR, "loss": 5.0}
    assert improves(selection_key(tied), selection_key(NEAR)) and not improves(selection_key(NEAR), selection_key(tied))
    assert improves(selection_key(FAR, "exact_match"), selection_key(NEAR, "exact_match"))
    assert not improves(selection_key(NEAR), selection_key(dict(NEAR)))
    # a result without the metric ranks below every one with it, by its loss among those without
    bare = {"loss": 0.5}
    assert improves(selection_key(FAR), selection_key(bare)) and not improves(selection_key(bare), selection_key(FAR))
    assert improves(selection_key(bare), selection_key({"loss": 0.7}))
    assert not improves(selection_key({**NEAR, "loss": float("nan")}), selection_key(FAR))  # never a NaN loss


def test_classification_keeps_accuracy_then_gold_logprob_and_may_select_by_another_metric():
    a = {"accuracy": 0.75, "macro_f1": 0.5, "n": 4, "gold_logprob": -3.0}
    b = {"accuracy": 0.5, "macro_f1": 0.6, "n": 4, "gold_logprob": -1.0}
    assert improves(selection_key(a), selection_key(b))
    assert improves(selection_key({**a, "gold_logprob": -2.0}), selection_key(a))  # the tie-break
    for metric in ("macro_f1", "gold_logprob", "loss"):  # loss: the gold label words' negative log-probability
        assert improves(selection_key(b, metric), selection_key(a, metric)), metric


# ----------------------------------------------------------------------------- through the loop, with scripted results
def scripted(monkeypatch, results: list[dict]) -> list[dict]:
    """The loop's validations answer `results` in turn (the template alone, scored at step 0, a poor one); returns
    the list the answers are taken from."""
    pending = [dict(r) for r in results]

    def fake_evaluate(backbone, task, examples, prompt_input=None, *args, **kwargs):
        if prompt_input is None:
            return {"chrf": 0.0, "bleu": 0.0, "exact_match": 0.0, "loss": 9.0, "n": len(examples)}
        return pending.pop(0)

    monkeypatch.setattr("softprompt.training.loop.evaluate", fake_evaluate)
    return pending


STEPS = [  # validation at steps 0..4
    {"chrf": 10.0, "bleu": 1.0, "exact_match": 0.0, "loss": 3.0, "n": 3},
    {"chrf": 30.0, "bleu": 2.0, "exact_match": 0.0, "loss": 6.0, "n": 3},  # the best chrF, a worse loss
    {"chrf": 12.0, "bleu": 3.0, "exact_match": 0.0, "loss": 1.0, "n": 3},  # the lowest loss
    {"chrf": 30.0, "bleu": 4.0, "exact_match": 0.0, "loss": 5.0, "n": 3},  # ties step 1's chrF, with a lower loss
    {"chrf": 20.0, "bleu": 5.0, "exact_match": 0.0, "loss": 2.0, "n": 3},  # the best BLEU
]


@pytest.mark.parametrize("select_by, best", [("auto", 3), ("chrf", 3), ("loss", 2), ("bleu", 4),
                                             ("exact_match", 2)])  # exact match all tied: the loss decides
def test_the_loop_keeps_the_prompt_of_the_selected_metric(llama, tmp_path, monkeypatch, select_by, best):
    task, train_examples, valid = generation_data(llama)
    pending = scripted(monkeypatch, STEPS)
    cfg = TrainConfig(steps=4, batch_size=8, lr=0.05, warmup_steps=0, eval_every=1, patience=0, select_by=select_by)
    run = train(llama, task, prompt_config(), cfg, train_examples, tmp_path, valid, progress=False)
    assert not pending
    assert run.summary["best_step"] == best and run.summary["valid"] == STEPS[best]
    assert json.loads((tmp_path / "config.json").read_text())["training"]["best_step"] == best
    assert run.summary["beat_template"] is True


def test_did_not_learn_is_judged_by_the_selected_metric(llama, tmp_path, monkeypatch, capsys):
    """The loss falls at every validation while chrF stays below the start's: by chrF the prompt did not learn, by
    the loss it did."""
    task, train_examples, valid = generation_data(llama)
    falling = [{"chrf": 10.0 if step == 0 else 5.0, "bleu": 0.0, "exact_match": 0.0, "loss": 5.0 - step, "n": 3}
               for step in range(5)]  # fmt: skip
    for select_by, warned in (("auto", True), ("loss", False)):
        scripted(monkeypatch, falling)
        cfg = TrainConfig(steps=4, batch_size=8, lr=0.05, warmup_steps=0, eval_every=1, patience=0,
                          select_by=select_by)  # fmt: skip
        capsys.readouterr()
        run = train(llama, task, prompt_config(), cfg, train_examples, tmp_path / select_by, valid, progress=False)
        assert ("did not learn" in capsys.readouterr().err) == warned, select_by
        assert run.summary["best_step"] == (0 if warned else 4)


def test_a_resumed_run_may_change_select_by_and_ranks_its_best_anew(llama, tmp_path, monkeypatch):
    """Steps 0-2 by the loss keep step 2 (chrF 12); resumed by chrF, steps 3 and 4 (chrF 11, 11.5, worse losses)
    do not beat it: its key was recomputed from the log (the loss's key would have lost to both)."""
    task, train_examples, valid = generation_data(llama)
    common = dict(batch_size=8, lr=0.05, warmup_steps=0, eval_every=1, patience=0, checkpoint_every=1,
                  schedule="constant")  # fmt: skip
    scripted(monkeypatch, STEPS[:3])
    first = train(llama, task, prompt_config(), TrainConfig(steps=2, select_by="loss", **common), train_examples,
                  tmp_path, valid, progress=False)  # fmt: skip
    assert first.summary["best_step"] == 2
    pending = scripted(monkeypatch, [{**STEPS[1], "chrf": 11.0, "loss": 5.0}, {**STEPS[1], "chrf": 11.5, "loss": 4.0}])
    resumed = train(llama, task, prompt_config(), TrainConfig(steps=4, select_by="auto", **common), train_examples,
                    tmp_path, valid, progress=False, resume=True)  # fmt: skip
    assert not pending and resumed.summary["best_step"] == 2 and resumed.summary["select_by"] == "auto"


# ------------------------------------------------------------------------------------------------------- a search
@pytest.mark.parametrize("select_by, chosen_tokens", [(None, 2), ("loss", 3)])
def test_search_ranks_and_picks_generation_candidates_by_select_by(tmp_path, monkeypatch, capsys, select_by,
                                                                   chosen_tokens):  # fmt: skip
    """Two candidates told apart by their length: the 2-token one has the better chrF and the worse loss. The rung
    keeps, and the search picks, the 2-token one by default and the 3-token one with --select-by loss; the table
    shows chrF."""

    def fake_evaluate(backbone, task, examples, prompt_input=None, *args, **kwargs):
        if prompt_input is None:
            return {"chrf": 0.0, "bleu": 0.0, "exact_match": 0.0, "loss": 9.0, "n": len(examples)}
        tokens = prompt_input.shape[-2]  # the prefix (layers, 2, kv_heads, n, head_dim)
        return {"chrf": 40.0 if tokens == 2 else 20.0, "bleu": 1.0, "exact_match": 0.0,
                "loss": 5.0 if tokens == 2 else 1.0, "n": len(examples)}  # fmt: skip

    monkeypatch.setattr("softprompt.training.loop.evaluate", fake_evaluate)
    model = save_tiny_model(tmp_path / "model")
    out = tmp_path / "run"
    code, stdout, stderr = run_main(monkeypatch, capsys, [
        "train", "--model", model, "--train", write_data(tmp_path / "train.jsonl", 16, seed=1), "--valid",
        write_data(tmp_path / "valid.jsonl", 4, seed=2), "--template", "write a {label} review:", "--target-field",
        "text", "--grid", "num_tokens=2,3", "--steps", 2, "--eval-every", 1, "--batch-size", 8, "--no-progress",
        "--out", out, *(["--select-by", select_by] if select_by else [])])  # fmt: skip
    assert code == 0, stderr
    table = json.loads((out / "search.json").read_text())
    [chosen] = [r for r in table if r["best"]]
    assert chosen["num_tokens"] == chosen_tokens
    assert {r["num_tokens"]: r["trained_steps"] for r in table} == {chosen_tokens: 2, 5 - chosen_tokens: 1}
    assert "chrf 40.0000" in stdout and "chrf 20.0000" in stdout and "loss 1.0000" in stdout


# ---------------------------------------------------------------------------------------- a metric the task lacks
def test_a_metric_the_task_does_not_report_is_refused_before_training(llama, tmp_path):
    task, train_examples, valid = generation_data(llama)
    with pytest.raises(SoftPromptError, match="--select-by accuracy is not a generation metric") as error:
        train(llama, task, prompt_config(), TrainConfig(steps=2, select_by="accuracy"), train_examples,
              tmp_path / "run", valid, progress=False)  # fmt: skip
    assert "auto, chrf, bleu, exact_match, loss" in str(error.value)
    assert not (tmp_path / "run").exists()
    sentiment = sentiment_task(llama)
    with pytest.raises(SoftPromptError, match="--select-by bleu is not a classification metric"):
        search.search(llama, sentiment, search.default_candidates(PromptConfig(init_text="review"), "classification"),
                      TrainConfig(steps=2, select_by="bleu"), sentiment.encode(sentiment_records(8, 1)),
                      sentiment.encode(sentiment_records(4, 2)), tmp_path / "search", progress=False)  # fmt: skip
    assert not (tmp_path / "search").exists()
    with pytest.raises(SoftPromptError, match="select_by 'rouge' is not one of auto, accuracy"):
        TrainConfig(select_by="rouge")


def test_the_command_refuses_a_metric_of_the_other_task(tmp_path, monkeypatch, capsys):
    model = save_tiny_model(tmp_path / "model")
    code, _, stderr = run_main(monkeypatch, capsys, [
        "train", "--model", model, "--train", write_data(tmp_path / "train.jsonl", 8, seed=1), "--template",
        "review {text} sentiment", "--labels", "negative,positive", "--label-field", "label", "--steps", 2,
        "--select-by", "chrf", "--out", tmp_path / "run", "--no-progress"])  # fmt: skip
    assert code != 0 and "Traceback" not in stderr
    assert "--select-by chrf is not a classification metric" in stderr
    assert "auto, accuracy, macro_f1, gold_logprob, loss" in stderr
    assert not (tmp_path / "run" / "prompt.safetensors").exists()


# ------------------------------------------------------------------------------------- eval --show, --save-outputs
GENERATION_TEMPLATE = "write a {label} review:"
CLASSIFICATION_TEMPLATE = "review {text} sentiment"


def shown_examples(stdout: str) -> list[dict]:
    """The examples `--show` printed: "[i] input ...", "    reference ...", "    output ..." lines."""
    lines = stdout.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("[")]
    return [{key: json.loads(lines[i + k].split(None, 1 + (k == 0))[-1])
             for k, key in enumerate(("input", "reference", "output"))} for i in starts]  # fmt: skip


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def greedy_after(model, soft_tokens: torch.Tensor, ids: list[int], limit: int) -> list[int]:
    """Greedy new tokens with the model reading inputs_embeds = [P; E] whole at every step (no cache), up to EOS."""
    embed, new = model.get_input_embeddings(), []
    with torch.no_grad():
        while len(new) < limit:
            embeds = torch.cat([soft_tokens, embed(torch.tensor(ids + new))])[None]
            token = int(model(inputs_embeds=embeds).logits[0, -1].argmax())
            if token == EOS:
                break
            new.append(token)
    return new


def test_eval_shows_and_saves_generated_outputs_as_greedy_decoding_gives_them(tmp_path, monkeypatch, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_data(tmp_path / "data.jsonl", 6, seed=3)
    config = TaskConfig(template=GENERATION_TEMPLATE, task="generation", target_field="text")
    backbone = backbone_for(AutoModelForCausalLM.from_pretrained(model_dir), tiny_tokenizer())
    artifact.save(tmp_path / "prompt", random_prompt(backbone, "prompt", n=3, seed=2), config, backbone)
    common = ["eval", "--prompt", tmp_path / "prompt", "--model", model_dir, "--data", data, "--no-progress"]
    code, stdout, stderr = run_main(monkeypatch, capsys, [*common, "--show", 2, "--save-outputs", tmp_path / "o.jsonl"])
    assert code == 0, stderr
    assert stdout.splitlines()[0].startswith("exact_match ") and "chrf " in stdout.splitlines()[0]
    rows, records = read_jsonl(tmp_path / "o.jsonl"), list(read_records(data))
    assert len(rows) == len(records) and all(set(r) == {"input", "reference", "output"} for r in rows)
    assert shown_examples(stdout) == [{k: r[k] for k in ("input", "reference", "output")} for r in rows[:2]]
    # each output is the greedy continuation of [P; E] computed here, up to the limit eval decodes to
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    soft_tokens = load_file(tmp_path / "prompt" / "prompt.safetensors")["prompt_embeddings"]
    tokenizer = tiny_tokenizer()
    limit = max(len(e.target_ids) for e in TaskEncoder(config, tokenizer).encode(records)) + 8
    for row, record in zip(rows, records):
        assert row["input"] == fill(GENERATION_TEMPLATE, record) and row["reference"] == record["text"]
        new = greedy_after(model, soft_tokens, tokenizer(row["input"])["input_ids"], limit)
        assert row["output"] == tokenizer.decode(new, skip_special_tokens=True)
    assert any(row["output"].strip() for row in rows)  # not a vacuous match of empty answers
    # --json: one line of metrics naming the file, whose outputs give the metrics reported
    code, stdout, stderr = run_main(monkeypatch, capsys, [*common, "--json", "--save-outputs", tmp_path / "j.jsonl"])
    assert code == 0, stderr
    [line] = stdout.splitlines()
    result = json.loads(line)
    assert result["outputs"] == str(tmp_path / "j.jsonl") and read_jsonl(tmp_path / "j.jsonl") == rows
    refs, hyps = [r["reference"].strip() for r in rows], [r["output"].strip() for r in rows]
    assert result["exact_match"] == sum(r == h for r, h in zip(refs, hyps)) / len(rows)
    assert result["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    assert result["n"] == len(rows)


def test_eval_shows_and_saves_predicted_labels_as_label_scoring_gives_them(tmp_path, monkeypatch, capsys):
    model_dir = save_tiny_model(tmp_path / "model")
    data = write_data(tmp_path / "data.jsonl", 8, seed=4)
    common = ["eval", "--model", model_dir, "--template", CLASSIFICATION_TEMPLATE, "--labels", "negative,positive",
              "--label-field", "label", "--data", data, "--no-progress"]  # fmt: skip
    code, stdout, stderr = run_main(monkeypatch, capsys, [*common, "--show", 2, "--save-outputs", tmp_path / "o.jsonl"])
    assert code == 0, stderr
    rows, records = read_jsonl(tmp_path / "o.jsonl"), list(read_records(data))
    assert len(rows) == len(records) and len(shown_examples(stdout)) == 2
    assert shown_examples(stdout) == [{k: r[k] for k in ("input", "reference", "output")} for r in rows[:2]]
    # each prediction is the label word the model's plain forward scores highest after the input
    model, tokenizer = AutoModelForCausalLM.from_pretrained(model_dir).eval(), tiny_tokenizer()
    labels = ["negative", "positive"]
    words = [VOCAB[w] for w in labels]
    for row, record in zip(rows, records):
        assert row["input"] == fill(CLASSIFICATION_TEMPLATE, record) and row["reference"] == record["label"]
        with torch.no_grad():
            logits = model(torch.tensor([tokenizer(row["input"])["input_ids"]])).logits[0, -1]
        predicted = int(logits.log_softmax(-1)[words].argmax())
        assert row["predicted_label"] == predicted and row["output"] == labels[predicted]
    code, stdout, stderr = run_main(monkeypatch, capsys, [*common, "--json", "--save-outputs", tmp_path / "j.jsonl"])
    assert code == 0, stderr
    result = json.loads(stdout)
    assert result["accuracy"] == sum(r["output"] == r["reference"] for r in rows) / len(rows)
    # --plot scores the labels once for the matrix and the outputs alike
    code, _, stderr = run_main(monkeypatch, capsys, [*common, "--plot", tmp_path / "m.png", "--save-outputs",
                                                     tmp_path / "p.jsonl"])  # fmt: skip
    assert code == 0, stderr
    assert read_jsonl(tmp_path / "p.jsonl") == rows and (tmp_path / "m.png").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--show", 2, "--json"], "--show prints examples as text, and --json the metrics alone"),
    (["--show", -1], "--show must not be negative"),
    (["--prompt", "a", "--prompt", "b", "--show", 1], "--show and --save-outputs give one prompt's outputs"),
])  # fmt: skip
def test_eval_refuses_what_it_cannot_show(tmp_path, monkeypatch, capsys, extra, message):
    data = write_data(tmp_path / "data.jsonl", 2, seed=1)
    code, _, stderr = run_main(monkeypatch, capsys, ["eval", "--data", data, "--template", CLASSIFICATION_TEMPLATE,
                                                     "--labels", "negative,positive", "--label-field", "label",
                                                     *extra])  # fmt: skip
    assert code != 0 and message in stderr and "Traceback" not in stderr
