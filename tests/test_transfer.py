"""`softprompt train --init-from DIR` (issue 6, item 3; SPoT): training starts from a trained prompt, whatever
--method/--num-tokens say, and refuses a prompt made for another base model."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import run_main
from test_cli import save_tiny_model, write_data


def run_cli(monkeypatch, capsys, *args) -> tuple[int, str]:
    code, _, err = run_main(monkeypatch, capsys, args)
    return code, err


def test_init_from_starts_at_the_source_prompt(tmp_path, monkeypatch, capsys):
    model = save_tiny_model(tmp_path / "tiny")
    data = write_data(tmp_path / "data.jsonl", 24, seed=1)
    common = ["train", "--model", model, "--train", data, "--valid", data, "--template", "review {text} sentiment",
              "--labels", "negative,positive", "--label-field", "label", "--no-progress", "--eval-every", 2]
    code, err = run_cli(monkeypatch, capsys, *common, "--out", tmp_path / "source", "--method", "prefix",
                        "--num-tokens", 3, "--init", "random", "--steps", 4, "--lr", 0.1)
    assert code == 0, err
    source = load_file(tmp_path / "source" / "prompt.safetensors")["prefix"]

    code, err = run_cli(monkeypatch, capsys, *common, "--out", tmp_path / "target", "--init-from",
                        tmp_path / "source", "--num-tokens", 7, "--steps", 2, "--lr", 1e-12, "--warmup-steps", 0)
    assert code == 0, err
    config = json.loads((tmp_path / "target" / "config.json").read_text())
    assert config["method"] == "prefix" and config["num_tokens"] == 3  # the source's, not --num-tokens 7
    target = load_file(tmp_path / "target" / "prompt.safetensors")["prefix"]
    assert (target - source).abs().max() < 1e-9  # a learning rate of 1e-12 barely moves it from the source
    step0 = json.loads((tmp_path / "target" / "metrics.jsonl").read_text().splitlines()[0])["valid"]
    source_best = json.loads((tmp_path / "source" / "config.json").read_text())["training"]["valid"]
    assert step0 == pytest.approx(source_best)  # the untrained target scores exactly what the source scored

    other = save_tiny_model(tmp_path / "other", seed=1)
    code, err = run_cli(monkeypatch, capsys, *common[:2], other, *common[3:], "--out", tmp_path / "wrong",
                        "--init-from", tmp_path / "source", "--steps", 1)
    assert code == 2 and "--init-from" in err and "trained on base model" in err
