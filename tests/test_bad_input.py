"""Every bad input of issue 5 through the real command (`main()`, as the console script runs it): a specific `error:`
message naming the file, line and field where there is one, a non-zero exit, no traceback, and a prompt saved
before (a tiny Llama trained once, its whole folder: weights, config, log, plot) byte-identical afterwards. Bad
training input is aimed at that very folder as `--out`. The truncate-with-a-warning path runs as a subprocess, since
pytest would swallow the warning's real formatting."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from safetensors import safe_open
from typer.testing import CliRunner

from softprompt.cli import app

from test_cli import CLI, LABELS, TEMPLATE, error_message, run_main, save_tiny_model, write_data

CONTEXT = 128
"""max_position_embeddings of the tiny Llama (conftest.tiny_config)."""


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def write_lines(path: Path, lines: list) -> Path:
    """Each item a JSON object, or a raw string written as it is."""
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model folder, a data file and a prompt-tuning prompt trained on them through the CLI."""
    root = tmp_path_factory.mktemp("bad_input")
    model = save_tiny_model(root / "tiny-llama")
    data = write_data(root / "data.jsonl", 8, seed=1)
    prompt = root / "prompt"
    result = CliRunner().invoke(app, [str(a) for a in [
        "train", "--model", model, "--train", data, "--template", TEMPLATE, "--labels", LABELS, "--label-field",
        "label", "--method", "prompt", "--steps", 2, "--num-tokens", 4, "--batch-size", 4, "--out", prompt,
        "--no-progress"]])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert (prompt / "prompt.safetensors").is_file() and (prompt / "config.json").is_file()
    return dict(root=root, model=model, data=data, prompt=prompt, before=snapshot(prompt))


@pytest.fixture
def cli(saved, monkeypatch, capsys, tmp_path):
    """`cli(args, needles)`: runs the command, asserts the failure and every needle in its `error:` message, and that
    the saved prompt is untouched; returns the message."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unknown hub name must fail the same way with or without network

    def run(args: list, needles: list[str]) -> str:
        code, _, err = run_main(monkeypatch, capsys, args)
        assert code not in (0, None), (args, err)
        assert "Traceback" not in err
        message = error_message(err)
        assert message, (args, err)
        for needle in needles:
            assert needle in message, (needle, message)
        assert snapshot(saved["prompt"]) == saved["before"], f"{args} changed the saved prompt"
        return message

    return run


def train_args(saved, data: Path, *extra) -> list:
    return ["train", "--model", saved["model"], "--train", data, "--template", TEMPLATE, "--labels", LABELS,
            "--label-field", "label", "--steps", 2, "--num-tokens", 4, "--batch-size", 2, "--out", saved["prompt"],
            "--no-progress", *extra]  # fmt: skip


def eval_args(saved, data: Path, *extra) -> list:
    return ["eval", "--prompt", saved["prompt"], "--data", data, "--no-progress", *extra]


GOOD = {"text": "the movie was great", "label": "positive"}


# --------------------------------------------------------------------------------------------------------- data
def test_malformed_jsonl_line(saved, cli, tmp_path):
    data = write_lines(tmp_path / "broken.jsonl", [GOOD, "", '{"text": "fun", "label": }', GOOD])
    for args in (train_args(saved, data), eval_args(saved, data)):
        message = cli(args, [str(data), "line 3", "column", "not valid JSON"])
        assert "line 1" not in message and "line 4" not in message
    not_object = write_lines(tmp_path / "list.jsonl", [GOOD, '["fun", "positive"]'])
    cli(train_args(saved, not_object), [f"{not_object}, line 2", "expected a JSON object, got list"])


def test_missing_field(saved, cli, tmp_path):
    # the blank line makes file lines and example numbers differ: the message gives both
    data = write_lines(tmp_path / "missing.jsonl", [GOOD, "", {"text": "fun"}, {"label": "negative"},
                                                     {"text": None, "label": "negative"}])  # fmt: skip
    for args in (train_args(saved, data), eval_args(saved, data)):
        message = cli(args, [f"{data}, line 3 (example 2): missing field(s) label",
                             f"{data}, line 4 (example 3): missing field(s) text",
                             f"{data}, line 5 (example 4): missing field(s) text"])  # fmt: skip
        assert "line 1" not in message
    csv_data = tmp_path / "missing.csv"
    csv_data.write_text('text,label\n"the movie,\nwas great",positive\nfun\n', encoding="utf-8")
    cli(train_args(saved, csv_data), [f"{csv_data}, line 4 (example 2): missing field(s) label"])


def test_empty_data_set(saved, cli, tmp_path):
    empty = write_lines(tmp_path / "empty.jsonl", ["", "   "])
    header_only = tmp_path / "header.csv"
    header_only.write_text("text,label\n", encoding="utf-8")
    for data in (empty, header_only):
        cli(train_args(saved, data), [str(data), "holds no examples", "empty"])
    cli(train_args(saved, saved["data"], "--valid", empty), [str(empty), "holds no examples"])
    cli(eval_args(saved, empty), [str(empty), "holds no examples"])


def test_label_not_among_label_words(saved, cli, tmp_path):
    data = write_lines(tmp_path / "labels.jsonl", [GOOD, {"text": "fun", "label": "neutral"},
                                                   {"text": "bad", "label": 2}])  # fmt: skip
    for args in (train_args(saved, data), eval_args(saved, data)):
        message = cli(args, [f"{data}, line 2 (example 2): label 'neutral' in field 'label'",
                             f"{data}, line 3 (example 3): label '2' in field 'label'",
                             "not among the label words ['negative', 'positive']"])  # fmt: skip
        assert "line 1" not in message


def test_example_longer_than_the_context_refused(saved, cli, tmp_path):
    long_text = " ".join(["the movie was great"] * 40)  # 160 words, one token each, over the 128 positions
    data = write_lines(tmp_path / "long.jsonl", [GOOD, {"text": long_text, "label": "positive"}, GOOD,
                                                 {"text": long_text + " fun", "label": "negative"}])  # fmt: skip
    message = cli(train_args(saved, data, "--too-long", "refuse"),
                  ["2 example(s) longer than 124 tokens",
                   f"max_length 512 capped by the model's context: {CONTEXT} positions minus 4 virtual tokens",
                   f"{data}, line 2 (example 2): 163 tokens", f"{data}, line 4 (example 4): 164 tokens",
                   "--too-long truncate"])  # fmt: skip
    assert "line 1" not in message and "line 3" not in message
    # GOOD takes 6 + 1 tokens (template and text, label word), the second example 7 + 1
    short = write_lines(tmp_path / "short.jsonl", [GOOD, {"text": "a very good fun film", "label": "positive"}])
    cli(train_args(saved, short, "--too-long", "refuse", "--max-length", 7),
        ["1 example(s) longer than 7 tokens (max_length 7)", f"{short}, line 2 (example 2): 8 tokens"])
    cli(train_args(saved, short, "--num-tokens", CONTEXT - 1),
        [f"{CONTEXT - 1} virtual tokens leave no room", f"context of {CONTEXT} positions", "--num-tokens"])
    cli(train_args(saved, short, "--too-long", "cut"), ["too_long 'cut' is not one of truncate, refuse"])
    # filled into the template, the text takes 6 tokens: 4 + 6 + 119 > 128
    cli(["generate", "--prompt", saved["prompt"], "--max-new-tokens", 119, "the movie was great"],
        [f"context of {CONTEXT} positions with 4 virtual tokens", "'the movie was great' (6 tokens)"])


def test_example_longer_than_the_context_truncated_with_a_warning(saved, tmp_path):
    """The default: the long example's input is cut from the left, with a one-line warning naming it."""
    long_text = " ".join(["the movie was great"] * 40)
    data = write_lines(tmp_path / "long.jsonl", [GOOD, GOOD, {"text": long_text, "label": "positive"}, GOOD])
    env = {**os.environ, "SOFTPROMPT_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}  # fmt: skip
    args = train_args(saved, data)
    args[args.index("--out") + 1] = tmp_path / "run"
    result = subprocess.run(CLI + [str(a) for a in args], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warning == [
        f"warning: {data}: 1 example(s) longer than 124 tokens (max_length 512 capped by the model's context: "
        f"{CONTEXT} positions minus 4 virtual tokens) had their input cut from the left to fit: "
        f"{data}, line 3 (example 3): 163 tokens"
    ], result.stderr[-3000:]
    assert (tmp_path / "run" / "prompt.safetensors").is_file()
    assert snapshot(saved["prompt"]) == saved["before"]


def test_template_naming_a_field_the_data_lacks(saved, cli, tmp_path):
    data = saved["data"]
    message = cli(train_args(saved, data, "--template", "review {body} sentiment"),
                  [f"{data}: the template 'review {{body}} sentiment' names the field {{body}}, but no record has it",
                   "(the records have: label, text)"])  # fmt: skip
    assert message.count("{body}") == 2  # the template and the field, not one line per example...
    assert message.count("missing field(s) body") == 8  # ...which follow, naming their lines
    cli(train_args(saved, data, "--label-field", "sentiment"),
        [f"{data}: --label-field 'sentiment' names a field no record has (the records have: label, text)"])
    cli(["eval", "--model", saved["model"], "--data", data, "--template", "{question}", "--target-field", "answer"],
        ["names the field {question}", "--target-field 'answer' names a field no record has"])


# -------------------------------------------------------------------------------------------------------- model
def test_unknown_model_name(saved, cli, tmp_path):
    cli(train_args(saved, saved["data"], "--model", "smollm2-136m"),
        ["Unknown model 'smollm2-136m'", "not in the local Hugging Face cache", "Did you mean 'smollm2-135m'?",
         "the embedded 'smollm2-135m'", "a local Hugging Face model folder", "or a hub name"])  # fmt: skip
    cli(eval_args(saved, saved["data"], "--model", "some-org/no-such-model"),
        ["Unknown model 'some-org/no-such-model'", "the hub is offline"])
    cli(["generate", "--model", tmp_path / "no" / "folder", "fun"],
        [f"Unknown model '{tmp_path / 'no' / 'folder'}': no such folder"])
    (tmp_path / "not-a-model").mkdir()
    cli(["generate", "--model", tmp_path / "not-a-model", "fun"],
        [f"{tmp_path / 'not-a-model'} is a folder without config.json"])


# ----------------------------------------------------------------------------------------------------- artifact
def damaged_copy(saved, tmp_path, damage) -> tuple[Path, dict[str, bytes]]:
    copy = tmp_path / "damaged"
    shutil.copytree(saved["prompt"], copy)
    weights = copy / "prompt.safetensors"
    weights.write_bytes(damage(weights.read_bytes()))
    return copy, snapshot(copy)


def flip_last_byte(data: bytes) -> bytes:
    """The last byte belongs to the last float of the tensor data: the header still parses, sizes still match."""
    return data[:-1] + bytes([data[-1] ^ 0x40])


@pytest.mark.parametrize("damage, needles", [
    (lambda b: b[: len(b) // 2], ["corrupted or truncated"]),
    (lambda b: b[:5], ["corrupted or truncated"]),
    (lambda b: b"", ["corrupted or truncated"]),
    (flip_last_byte, ["is corrupted", "checksum"]),
], ids=["half", "header-cut", "empty", "flipped-byte"])  # fmt: skip
def test_corrupted_or_truncated_prompt_file(saved, cli, tmp_path, damage, needles):
    copy, damaged = damaged_copy(saved, tmp_path, damage)
    weights = str(copy / "prompt.safetensors")
    for args in (["eval", "--prompt", copy, "--data", saved["data"]], ["generate", "--prompt", copy, "fun"],
                 ["inspect", "--prompt", copy]):
        message = cli(args, [weights, *needles, "retrain, or restore it"])
        assert message.startswith(f"error: {weights}")
    assert snapshot(copy) == damaged, "loading must not rewrite the damaged file"


def test_flipped_byte_really_changes_a_value(saved, tmp_path):
    """The checksum case is a real corruption: safetensors alone reads the damaged file without complaint."""
    copy, _ = damaged_copy(saved, tmp_path, flip_last_byte)
    with safe_open(copy / "prompt.safetensors", "pt") as f:
        damaged = f.get_tensor("prompt_embeddings")
    with safe_open(saved["prompt"] / "prompt.safetensors", "pt") as f:
        original = f.get_tensor("prompt_embeddings")
    assert damaged.shape == original.shape and (damaged != original).sum() == 1


def test_weights_and_config_from_different_runs(saved, cli, tmp_path):
    copy = tmp_path / "mixed"
    shutil.copytree(saved["prompt"], copy)
    config = json.loads((copy / "config.json").read_text())
    config["num_tokens"], config["tensor_shapes"] = 8, {"prompt_embeddings": [8, 32]}
    (copy / "config.json").write_text(json.dumps(config))
    cli(["inspect", "--prompt", copy], [f"{copy / 'prompt.safetensors'} holds prompt_embeddings of shape [4, 32]",
                                        "[8, 32]", "different runs"])  # fmt: skip
    (copy / "config.json").write_text('{"method": "prompt", ')
    cli(["inspect", "--prompt", copy], [f"{copy / 'config.json'} is not valid JSON", "damaged"])


def test_artifact_for_another_base_model(saved, cli, tmp_path):
    other = save_tiny_model(tmp_path / "other-llama", seed=1)
    for args in (eval_args(saved, saved["data"], "--model", other),
                 ["generate", "--prompt", saved["prompt"], "--model", other, "fun"],
                 ["inspect", "--prompt", saved["prompt"], "--model", other],
                 train_args(saved, saved["data"], "--init-from", saved["prompt"], "--model", other)):
        cli(args, [f"{saved['prompt']} was trained on base model '{saved['model']}'", "fingerprint",
                   f"the loaded model '{other}'", f"--model {saved['model']}"])  # fmt: skip


def test_inspect_of_a_prefix_refuses_a_model_it_would_not_read(saved, cli, tmp_path):
    prefix = tmp_path / "prefix"
    args = train_args(saved, saved["data"], "--method", "prefix")
    args[args.index("--out") + 1] = prefix
    assert CliRunner().invoke(app, [str(a) for a in args]).exit_code == 0
    cli(["inspect", "--prompt", prefix, "--model", saved["model"]], ["prefix-tuning artifact", "drop --model"])


# ------------------------------------------------------------------------------------------------ hyperparameters
def test_invalid_hyperparameters(saved, cli):
    data = saved["data"]
    for extra, needle in [(["--num-tokens", 0], "num_tokens must be at least 1, got 0"),
                          (["--lr", -0.1], "lr must be positive, got -0.1"),
                          (["--batch-size", 0], "batch_size must be at least 1, got 0")]:  # fmt: skip
        cli(train_args(saved, data, *extra), [needle])
    # all at once: every problem in one message, before any model is loaded
    cli(train_args(saved, data, "--num-tokens", 0, "--lr", -0.1, "--batch-size", 0, "--model", "never-loaded"),
        ["Invalid prompt settings", "num_tokens must be at least 1, got 0", "Invalid training settings",
         "lr must be positive, got -0.1", "batch_size must be at least 1, got 0"])  # fmt: skip
    cli(eval_args(saved, data, "--batch-size", 0), ["--batch-size and --limit must be at least 1, got 0"])
