"""A run that does not learn says so (`TrainConfig.no_learning_after`), once, on the console and in metrics.jsonl,
and a run that learns says nothing; the training summary holds the template's own validation result, scored here
with no prompt at all, and whether the saved prompt beat it. On the tiny Llama and test_train's cue-word task."""

from __future__ import annotations

import json

from conftest import run_main
from softprompt.scoring.evaluate import evaluate
from softprompt.training.loop import train
from test_cli import LABELS as CLI_LABELS
from test_cli import TEMPLATE as CLI_TEMPLATE
from test_cli import save_tiny_model, write_data
from test_train import data, llama, prompt_config, read_log, train_config  # noqa: F401  (fixtures)

WORDS = "did not learn"


def warnings_in(out) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if '"warning"' in line]


def test_a_prompt_that_cannot_move_says_once_that_it_did_not_learn(llama, data, tmp_path, capsys):
    """At a learning rate of 1e-12 the prompt cannot change, so no validation beats the starting one: the first
    validation at or after 30 % of the steps (step 10 of 20, validating every 5) warns, and no later one again."""
    task, train_examples, valid = data
    run = train(llama, task, prompt_config(), train_config(steps=20, lr=1e-12, eval_every=5), train_examples,
                tmp_path, valid, progress=False)  # fmt: skip
    err = capsys.readouterr().err
    assert err.count(WORDS) == 1 and "--lr" in err and "--init" in err, err
    [warning] = warnings_in(tmp_path)
    assert warning["step"] == 10 and WORDS in warning["warning"]
    assert run.summary["best_step"] == 0


def test_a_prompt_that_learns_says_nothing(llama, data, tmp_path, capsys):
    task, train_examples, valid = data
    run = train(llama, task, prompt_config(), train_config(steps=20, lr=0.1, eval_every=5), train_examples, tmp_path,
                valid, progress=False)  # fmt: skip
    assert WORDS not in capsys.readouterr().err and not warnings_in(tmp_path)
    assert run.summary["best_step"] > 0


def test_without_validation_a_loss_that_does_not_fall_warns_and_one_that_falls_does_not(llama, data, tmp_path,
                                                                                          capsys):  # fmt: skip
    """Every batch is the whole training set (64 rows), so an unmoving prompt's loss is the same at every step. The
    loss is judged at 30 % of the steps, but not before step 8."""
    task, train_examples, _ = data
    stuck, learning = tmp_path / "stuck", tmp_path / "learning"
    train(llama, task, prompt_config(), train_config(steps=10, batch_size=64, lr=1e-12), train_examples, stuck,
          progress=False)  # fmt: skip
    losses = [r["loss"] for r in read_log(stuck)[0]]
    assert max(losses) - min(losses) < 1e-4 * losses[0]
    [warning] = warnings_in(stuck)
    assert warning["step"] == 8 and "training loss has not fallen" in warning["warning"]  # judged from step 8 on
    capsys.readouterr()
    train(llama, task, prompt_config(), train_config(steps=10, batch_size=64, lr=0.3), train_examples, learning,
          progress=False)  # fmt: skip
    losses = [r["loss"] for r in read_log(learning)[0]]
    assert losses[-1] < 0.9 * losses[0]
    assert not warnings_in(learning) and WORDS not in capsys.readouterr().err


def test_the_summary_says_whether_the_prompt_beat_the_template_alone(llama, data, tmp_path):
    """The template's result is the task's metrics with no prompt input; beat_template compares the saved prompt's
    validation result with it by the selection rule (accuracy, then the gold label's log-probability)."""
    task, train_examples, valid = data
    for lr, out in ((1e-12, tmp_path / "stuck"), (0.1, tmp_path / "learning")):
        run = train(llama, task, prompt_config(init="random"), train_config(steps=20, lr=lr, eval_every=5),
                    train_examples, out, valid, progress=False)  # fmt: skip
        template = evaluate(llama, task, valid)
        summary = run.summary
        assert summary["template_valid"] == template
        key = lambda r: (r["accuracy"], r["gold_logprob"])  # noqa: E731
        assert summary["beat_template"] == (key(summary["valid"]) > key(template))
        saved = json.loads((out / "config.json").read_text())["training"]
        assert saved["template_valid"] == template and saved["beat_template"] == summary["beat_template"]
    without = train(llama, task, prompt_config(), train_config(steps=2), train_examples, tmp_path / "none",
                    progress=False)  # fmt: skip
    assert without.summary["template_valid"] is None and without.summary["beat_template"] is None


def test_the_command_line_warns_and_the_check_can_be_turned_off(tmp_path, monkeypatch, capsys):
    model = save_tiny_model(tmp_path / "llama")
    data = write_data(tmp_path / "data.jsonl", 32, seed=0)
    common = ["train", "--model", model, "--train", data, "--valid", data, "--template", CLI_TEMPLATE, "--labels",
              CLI_LABELS, "--label-field", "label", "--steps", 6, "--eval-every", 2, "--num-tokens", 4, "--lr",
              "1e-12", "--no-progress"]  # fmt: skip
    code, out, err = run_main(monkeypatch, capsys, [*common, "--out", tmp_path / "on"])
    assert code == 0 and err.count(WORDS) == 1, err
    assert "no better than the template alone" in out or "Saved the best prompt (step 0" in out, out
    code, out, err = run_main(monkeypatch, capsys, [*common, "--out", tmp_path / "off", "--no-learning-after", 0])
    assert code == 0 and WORDS not in err and not warnings_in(tmp_path / "off"), err
