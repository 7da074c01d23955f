"""Learning-rate schedules: linear warmup from 0 over `warmup_steps`, then linear decay to 0, cosine decay to 0, or
constant. The rates the optimizer actually applies at each step (read from its parameter group just before it steps)
and the ones metrics.jsonl records are checked against the formulas written out here, for the three schedules."""

from __future__ import annotations

import json
import math

import pytest
import torch

from softprompt import methods
from softprompt.training import setup as train_module
from softprompt.config import TrainConfig
from softprompt.training.loop import train

from conftest import tiny_backbone
from test_train import LABELS, prompt_config, sentiment_records, sentiment_task

PEAK, WARMUP, STEPS = 0.1, 4, 12


def expected_lr(schedule: str, step: int, peak: float = PEAK, warmup: int = WARMUP, steps: int = STEPS) -> float:
    """The rate optimizer step `step` (1-based) applies: step 1 starts the warmup at 0 and step warmup + 1 is the
    first at the peak; the decay then reaches 0 one step after the last."""
    done = step - 1  # steps completed before this one
    if done < warmup:
        return peak * done / warmup
    if schedule == "constant":
        return peak
    progress = (done - warmup) / (steps - warmup)
    if schedule == "linear":
        return peak * (1 - progress)
    if schedule == "cosine":
        return peak * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(schedule)


def test_the_formula_by_hand():
    # a few values worked out on paper for peak 0.1, 4 warmup steps, 12 steps
    assert [expected_lr("linear", k) for k in (1, 2, 3, 5)] == pytest.approx([0, 0.025, 0.05, 0.1])
    assert [expected_lr("linear", k) for k in (9, 12)] == pytest.approx([0.05, 0.0125])  # 4/8 and 1/8 of the peak
    assert expected_lr("cosine", 9) == pytest.approx(0.05)  # halfway through the decay: cos(pi/2) = 0
    assert expected_lr("cosine", 7) == pytest.approx(0.05 * (1 + 2**-0.5))  # a quarter: cos(pi/4)
    assert expected_lr("constant", 2) == pytest.approx(0.025) and expected_lr("constant", 12) == 0.1


def applied_rates(monkeypatch) -> list[float]:
    """Records the rate of every optimizer step of the next run, read just before the optimizer applies it."""
    rates: list[float] = []
    make = train_module.make_optimizer

    def recording(params, config):
        optimizer = make(params, config)
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: rates.append(opt.param_groups[0]["lr"]))
        return optimizer

    monkeypatch.setattr(train_module, "make_optimizer", recording)
    return rates


@pytest.mark.parametrize("optimizer", ["adamw", "adafactor"])
@pytest.mark.parametrize("schedule", ["linear", "cosine", "constant"])
def test_rate_at_every_step(tmp_path, monkeypatch, schedule, optimizer):
    backbone = tiny_backbone("llama")
    task = sentiment_task(backbone)
    rates = applied_rates(monkeypatch)
    config = TrainConfig(steps=STEPS, batch_size=8, lr=PEAK, warmup_steps=WARMUP, schedule=schedule,
                         optimizer=optimizer, eval_every=0, patience=0)  # fmt: skip
    train(backbone, task, prompt_config(), config, task.encode(sentiment_records(16, seed=1)), tmp_path,
          progress=False)
    expected = [expected_lr(schedule, k) for k in range(1, STEPS + 1)]
    assert rates == pytest.approx(expected, abs=1e-12)
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["lr"]) for r in logged] == [(k, pytest.approx(lr, abs=1e-12))
                                                      for k, lr in enumerate(expected, start=1)]  # fmt: skip


def test_no_warmup_starts_at_the_peak(tmp_path, monkeypatch):
    backbone = tiny_backbone("llama")
    task = sentiment_task(backbone)
    rates = applied_rates(monkeypatch)
    train(backbone, task, prompt_config(), TrainConfig(steps=5, lr=PEAK, warmup_steps=0, eval_every=0),
          task.encode(sentiment_records(16, seed=1)), tmp_path, progress=False)
    assert rates == pytest.approx([expected_lr("linear", k, warmup=0, steps=5) for k in range(1, 6)], abs=1e-12)
    assert rates == pytest.approx([0.1, 0.08, 0.06, 0.04, 0.02], abs=1e-12)


@pytest.mark.parametrize("method, default", [("prefix", 0.03), ("prompt", 0.01)])
def test_without_lr_a_run_takes_its_methods_own(tmp_path, monkeypatch, capsys, method, default):
    """TrainConfig.lr unset: each method's documented default is what the optimizer applies, logs, saves and says."""
    backbone = tiny_backbone("llama")
    task = sentiment_task(backbone)
    rates = applied_rates(monkeypatch)
    run = train(backbone, task, prompt_config(method=method), TrainConfig(steps=3, warmup_steps=0, schedule="constant",
                eval_every=0), task.encode(sentiment_records(16, seed=1)), tmp_path, progress=False)  # fmt: skip
    assert rates == pytest.approx([default] * 3, abs=1e-12)
    assert run.summary["lr"] == json.loads((tmp_path / "config.json").read_text())["training"]["lr"] == default
    assert f"learning rate {default:g}, {method} tuning's default" in capsys.readouterr().err


def test_a_step_at_rate_zero_leaves_the_prompt_and_the_next_one_moves_it(tmp_path, capsys):
    """The warmup's first rate is really what the optimizer applies, not only a logged number (a given lr: no word
    about a default)."""
    backbone = tiny_backbone("llama")
    task = sentiment_task(backbone)
    config = prompt_config()
    initial = methods.build(config, backbone, LABELS, torch.Generator().manual_seed(0))
    train(backbone, task, config, TrainConfig(steps=2, lr=PEAK, warmup_steps=WARMUP, eval_every=0, checkpoint_every=1),
          task.encode(sentiment_records(16, seed=1)), tmp_path, init_method=initial, progress=False)
    prompts = {step: torch.load(tmp_path / "checkpoints" / f"step-{step:07d}.pt", weights_only=False)["prompts"]
               for step in (1, 2)}  # fmt: skip
    start = initial.embeddings.detach()
    assert torch.equal(prompts[1]["prompts.prompt.embeddings"], start)
    assert not torch.allclose(prompts[2]["prompts.prompt.embeddings"], start)
    assert "default" not in capsys.readouterr().err
