"""Without validation data a run holds a seeded share of its training data out (`TrainConfig.holdout`), never
trains on it, keeps the prompt that scores best on it and says so; with too little data, at holdout 0, or when it
never validates, it keeps its last prompt as before; a resume that would draw another split is refused with why.
On the tiny Llama and test_train's cue-word task."""

from __future__ import annotations

import json
import random

import pytest
import torch

from conftest import run_main
from softprompt.errors import SoftPromptError
from softprompt.scoring.evaluate import evaluate
from softprompt.training.loop import loss_on, train
from softprompt.training.search import default_candidates, search
from test_cli import LABELS as CLI_LABELS
from test_cli import TEMPLATE as CLI_TEMPLATE
from test_cli import save_tiny_model, write_data
from test_train import llama, prompt_config, read_log, sentiment_records, sentiment_task, train_config  # noqa: F401


@pytest.fixture
def many(llama):
    """200 training examples: a tenth of them, 20, is over the 16 worth holding out."""
    task = sentiment_task(llama)
    return task, task.encode(sentiment_records(200, seed=1), "train")


def recording(seen: list):
    """`loss_on`, noting the examples of every batch it is handed."""

    def objective(backbone, prompt_input, examples, *args, **kwargs):
        seen.extend(examples)
        return loss_on(backbone, prompt_input, examples, *args, **kwargs)

    return objective


def test_a_run_without_validation_selects_on_a_held_out_tenth_it_never_trains_on(llama, many, tmp_path, capsys):
    task, examples = many
    held = [examples[i] for i in sorted(random.Random(0).sample(range(200), 20))]  # the draw, written out here
    seen = []
    run = train(llama, task, prompt_config(), train_config(steps=12, lr=0.1, eval_every=4), examples, tmp_path,
                progress=False, objective=recording(seen))  # fmt: skip
    assert "holding out 20 of its 200 training examples" in capsys.readouterr().err
    assert len(seen) == 12 * 8 and not {id(e) for e in seen} & {id(e) for e in held}
    assert {id(e) for e in seen} <= {id(e) for e in examples}
    summary = run.summary
    assert summary["held_out"] == 20 and summary["best_step"] in (0, 4, 8, 12)
    assert [r["step"] for r in read_log(tmp_path)[1]] == [0, 4, 8, 12]
    with torch.no_grad():  # the kept prompt scored here anew on the examples drawn above
        result = evaluate(llama, task, held, run.method.kv(llama))
    assert result["accuracy"] == pytest.approx(summary["valid"]["accuracy"])
    assert result["gold_logprob"] == pytest.approx(summary["valid"]["gold_logprob"], rel=1e-4)
    assert json.loads((tmp_path / "config.json").read_text())["training"]["held_out"] == 20


@pytest.mark.parametrize("why", ["holdout 0", "too few", "no validation"])
def test_without_a_share_to_spare_the_run_keeps_its_last_prompt_and_trains_on_all(llama, many, tmp_path, capsys,
                                                                                   why):  # fmt: skip
    task, examples = many
    cfg = train_config(steps=4, lr=0.1, eval_every={"no validation": 0}.get(why, 2),
                       holdout={"holdout 0": 0.0}.get(why, 0.1))  # fmt: skip
    data = examples[:159] if why == "too few" else examples  # a tenth of 159 is 15: under 16
    seen = []
    run = train(llama, task, prompt_config(), cfg, data, tmp_path, progress=False, objective=recording(seen))
    assert "holding out" not in capsys.readouterr().err and "held_out" not in run.summary
    assert run.summary["best_step"] == 4 and not read_log(tmp_path)[1]
    assert {id(e) for e in data} >= {id(e) for e in seen}


def test_given_validation_data_nothing_is_held_out(llama, many, tmp_path, capsys):
    task, examples = many
    seen = []
    run = train(llama, task, prompt_config(), train_config(steps=25, lr=0.1, eval_every=5), examples, tmp_path,
                examples[:16], progress=False, objective=recording(seen))  # fmt: skip
    assert "holding out" not in capsys.readouterr().err and "held_out" not in run.summary
    assert len({id(e) for e in seen}) > 180  # 200 examples, 25 batches of 8: all of them, given a held-out none


def test_a_search_without_validation_data_holds_out_one_share_for_every_candidate(llama, many, tmp_path, capsys):
    task, examples = many
    held = {id(examples[i]) for i in random.Random(0).sample(range(200), 20)}
    candidates = default_candidates(prompt_config(init="text"), "classification")[:2]
    result = search(llama, task, candidates, train_config(steps=4, eval_every=2), examples, [], tmp_path,
                    progress=False)  # fmt: skip
    assert capsys.readouterr().err.count("holding out 20 of its 200") == 1
    for run in result.runs.values():
        assert run.summary["held_out"] == 20 and run.summary["valid"]


def test_cli_train_says_it_holds_out_and_the_search_runs_without_valid(tmp_path, monkeypatch, capsys):
    model = save_tiny_model(tmp_path / "model")
    data = write_data(tmp_path / "train.jsonl", 170, seed=1)
    code, _, stderr = run_main(monkeypatch, capsys, [
        "train", "--model", model, "--train", data, "--template", CLI_TEMPLATE, "--labels", CLI_LABELS,
        "--label-field", "label", "--steps", "4", "--eval-every", "2", "--grid", "lr=0.1,0.01", "--out", tmp_path / "run", "--no-progress"])
    assert code == 0, stderr
    assert "holding out 17 of its 170 training examples" in " ".join(stderr.split())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["training"]["held_out"] == 17


def test_a_resume_that_would_hold_out_another_split_is_refused_with_the_reason(llama, many, tmp_path):
    task, examples = many
    cfg = train_config(steps=4, lr=0.1, eval_every=2, checkpoint_every=2)
    train(llama, task, prompt_config(), cfg, examples, tmp_path, progress=False)
    resume = lambda **kw: train(llama, task, prompt_config(), train_config(**{**vars(cfg), **kw}),  # noqa: E731
                                examples, tmp_path, progress=False, resume=True)  # fmt: skip
    with pytest.raises(SoftPromptError, match=r"training data differ \(without validation data, eval_every and "
                       r"eval_size also set how many .* eval_size 300 -> 16"):  # 20 held out before, 16 now
        resume(steps=6, eval_size=16)
    assert resume(steps=6, eval_size=50).summary["held_out"] == 20  # the same split: min(a tenth, 50) is 20
