"""The real `softprompt` command, run as subprocesses on a tiny Llama saved with save_pretrained: train (both methods),
eval with a prompt and with the base model alone, generate with a prompt and with the base model alone, inspect; and
user mistakes exit non-zero with one `error:` line and no traceback. What eval and generate print is checked against
the library called on the same model and input (and the base model's answers against plain transformers), and
`examples/independent_eval.py` against the library. Starting Python with torch and transformers costs seconds, so
the subprocesses run two phases of concurrent processes (train + base-model eval and generate + a broken-data run,
then everything that reads the trained prompts); the remaining user mistakes run `main()` in-process, which is the
same code path."""

from __future__ import annotations

import json
import os
import random
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from softprompt import artifact
from softprompt.backbones import Backbone, backbone_for
from softprompt.cli import main
from softprompt.config import TaskConfig
from softprompt.data import TaskEncoder, read_records
from softprompt.scoring.evaluate import evaluate, label_scores
from softprompt.scoring.generate import decode_new, generate

from conftest import PAD, VOCAB, random_prompt, tiny_model, tiny_tokenizer

CLI = [sys.executable, "-c", "from softprompt.cli import main; main()"]
TEMPLATE = "review {text} sentiment"
LABELS = "negative,positive"
CUES = {"positive": ["great", "good", "fun"], "negative": ["bad", "terrible", "awful"]}
FILLER = "the a movie film was is it this very quite".split()
TEXTS = ["the movie was great", "a terrible film"]
"""What `generate` is asked to continue."""
INDEPENDENT_EVAL = Path(__file__).resolve().parents[1] / "examples" / "independent_eval.py"


def write_data(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    with path.open("w", encoding="utf-8") as f:
        for _ in range(n):
            label = rng.choice(sorted(CUES))
            words = rng.sample(FILLER, 3) + [rng.choice(CUES[label])]
            rng.shuffle(words)
            f.write(json.dumps({"text": " ".join(words), "label": label}) + "\n")
    return path


def save_tiny_model(folder: Path, seed: int = 0) -> Path:
    tiny_model("llama", seed=seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder


def start(args: list[str], env: dict) -> subprocess.Popen:
    return subprocess.Popen(CLI + [str(a) for a in args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(processes: dict[str, subprocess.Popen]) -> dict[str, subprocess.CompletedProcess]:
    done = {}
    for name, process in processes.items():
        out, err = process.communicate(timeout=300)
        done[name] = subprocess.CompletedProcess(process.args, process.returncode, out, err)
    return done


def ok(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 0, f"{result.args[3:]} failed:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr
    return result.stdout


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = save_tiny_model(root / "tiny-llama")
    data = write_data(root / "data.jsonl", 24, seed=1)
    broken = root / "broken.jsonl"
    broken.write_text(data.read_text().splitlines()[0] + "\n{not json\n", encoding="utf-8")
    cache = root / "cache"
    env = {**os.environ, "SOFTPROMPT_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return dict(root=root, model=model, data=data, broken=broken, cache=cache, env=env)


@pytest.fixture(scope="module")
def runs(workspace):
    w = workspace
    root, model, data, env = w["root"], w["model"], w["data"], w["env"]
    common = ["--model", model, "--train", data, "--valid", data, "--template", TEMPLATE, "--labels", LABELS,
              "--label-field", "label", "--steps", 6, "--num-tokens", 4, "--eval-every", 3, "--no-progress"]
    phase1 = finish({
        "train_prompt": start(["train", *common, "--method", "prompt", "--out", root / "prompt"], env),
        "train_prefix": start(["train", *common, "--method", "prefix", "--init", "random", "--out", root / "prefix"],
                              env),
        "eval_base": start(["eval", "--model", model, "--template", TEMPLATE, "--labels", LABELS, "--label-field",
                            "label", "--data", data, "--json"], env),
        "generate_base": start(["generate", "--model", model, "--max-new-tokens", 4, *TEXTS], env),
        "broken_data": start(["train", "--model", model, "--train", w["broken"], "--template", TEMPLATE, "--labels",
                              LABELS, "--label-field", "label", "--out", root / "never", "--steps", 2], env),
    })  # fmt: skip
    phase2 = finish({
        "eval_prompt": start(["eval", "--prompt", root / "prompt", "--data", data, "--json"], env),
        "generate": start(["generate", "--prompt", root / "prompt", "--max-new-tokens", 3, *TEXTS], env),
        "inspect": start(["inspect", "--prompt", root / "prompt", "--json", "--top-k", 3], env),
    })  # fmt: skip
    return {**phase1, **phase2}


# ------------------------------------------------------------------------------------------------------- train
@pytest.mark.parametrize("method, tensor, shape", [("prompt", "prompt_embeddings", [4, 32]),
                                                   ("prefix", "prefix", [2, 2, 2, 4, 8])])
def test_train_writes_an_artifact(workspace, runs, method, tensor, shape):
    out = ok(runs[f"train_{method}"])
    folder = workspace["root"] / method
    assert "Saved the best prompt" in out and str(folder) in out
    for name in ("prompt.safetensors", "config.json", "metrics.jsonl", "loss.png"):
        assert (folder / name).is_file(), name
    config = json.loads((folder / "config.json").read_text())
    assert config["method"] == method and config["num_tokens"] == 4
    assert config["template"] == TEMPLATE and config["labels"] == LABELS.split(",")
    assert config["base_model"] == str(workspace["model"])
    assert config["tensor_shapes"] == {tensor: shape}
    assert config["training"]["last_step"] == 6
    records = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "warning" not in r]
    assert steps.count(6) == 2  # a training record and an evaluation at the last step
    assert not any(workspace["cache"].glob("*")), "a local --model must not touch the embedded-model cache"


# -------------------------------------------------------------------------------------------------------- eval
def test_eval_with_a_prompt_prints_json(workspace, runs):
    check_eval_json(workspace, "prompt", ok(runs["eval_prompt"]))


def check_eval_json(workspace, method: str, stdout: str) -> None:
    result = json.loads(stdout)
    assert {"accuracy", "macro_f1", "n"} <= set(result)
    assert result["n"] == 24
    assert 0 <= result["accuracy"] <= 1 and 0 <= result["macro_f1"] <= 1
    # validated on the same file during training: the saved (best) prompt scores what the log recorded for it
    best = json.loads((workspace["root"] / method / "config.json").read_text())["training"]["valid"]
    assert result["accuracy"] == best["accuracy"]
    assert result["macro_f1"] == pytest.approx(best["macro_f1"])


@pytest.fixture(scope="module")
def library() -> Backbone:
    """The tiny Llama the model folder was saved from, built in this process (not loaded from the folder)."""
    return backbone_for(tiny_model("llama"), tiny_tokenizer())


def test_eval_of_the_base_model_matches_the_library(workspace, runs, library):
    """The library's numbers for the same model, template and data; and the gold label's mean log-probability and
    the accuracy recomputed with plain transformers (the log-softmax at the last input position)."""
    result = json.loads(ok(runs["eval_base"]))
    task = TaskEncoder(TaskConfig.infer(TEMPLATE, LABELS, "label", None), library.tokenizer)
    records = read_records(workspace["data"])
    expected = evaluate(library, task, task.encode(records))
    assert result.keys() == expected.keys() and result["n"] == 24
    assert result == pytest.approx(expected, rel=1e-5)
    labels = LABELS.split(",")
    label_tokens = [VOCAB[word] for word in labels]
    gold_logprobs, correct = [], 0
    with torch.no_grad():
        for record in records:
            ids = torch.tensor([library.tokenizer(TEMPLATE.format(text=record["text"]))["input_ids"]])
            logprobs = library.model(ids).logits[0, -1].log_softmax(-1)[label_tokens]
            gold = labels.index(record["label"])
            gold_logprobs.append(float(logprobs[gold]))
            correct += int(logprobs.argmax()) == gold
    assert result["gold_logprob"] == pytest.approx(sum(gold_logprobs) / len(records), rel=1e-5)
    assert result["accuracy"] == correct / len(records)


def test_independent_eval_script_agrees_with_the_library(workspace, library, tmp_path, monkeypatch, capsys):
    """`examples/independent_eval.py` (transformers alone, `inputs_embeds = cat(P, E)`) run on a prompt artifact with
    five label words, two of them two tokens long: on data whose gold label is the library's top-scoring label for
    each text it scores accuracy 1, on data whose gold label is the library's lowest-scoring one 0, so it picks the
    library's label for every text; `softprompt eval` gives the same. Texts whose top two labels lie within 1e-3 are
    left out (float rounding of the two paths could swap them)."""
    labels = ["good", "bad", "very good", "not good", "fine"]
    config = TaskConfig.infer(TEMPLATE, labels, "label", None)
    task = TaskEncoder(config, library.tokenizer)
    assert sorted(map(len, task.label_ids)) == [1, 1, 1, 2, 2]
    method = random_prompt(library, "prompt", n=4, seed=5)
    folder = artifact.save(tmp_path / "prompt", method, config, library)
    records = [{"text": r["text"], "label": "good"} for r in read_records(workspace["data"])]
    scores = label_scores(library, task, task.encode(records), method.kv(library).detach())  # (24, 5)
    top_two = scores.topk(2, dim=-1).values
    clear = (top_two[:, 0] - top_two[:, 1] > 1e-3).tolist()
    best, worst = scores.argmax(-1).tolist(), scores.argmin(-1).tolist()
    picked = lambda choice: {i for i, c in zip(choice, clear) if c}  # noqa: E731
    assert sum(clear) >= 20 and len(picked(best)) >= 3 and len(picked(worst)) >= 2, (clear, best, worst)

    def relabelled(name: str, choice: list[int]) -> Path:
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({**r, "label": labels[i]}) + "\n"
                                for r, i, c in zip(records, choice, clear) if c), encoding="utf-8")  # fmt: skip
        return path

    for name, choice, accuracy in (("best", best, 1.0), ("worst", worst, 0.0)):
        data = relabelled(name, choice)
        monkeypatch.setattr(sys, "argv", [str(INDEPENDENT_EVAL), str(folder), str(data), str(workspace["model"])])
        capsys.readouterr()
        runpy.run_path(str(INDEPENDENT_EVAL), run_name="__main__")
        assert json.loads(capsys.readouterr().out) == {"accuracy": accuracy, "n": sum(clear)}, name
        monkeypatch.setenv("SOFTPROMPT_CACHE", str(workspace["cache"]))
        code, out, err = run_main(monkeypatch, capsys, ["eval", "--prompt", folder, "--model", workspace["model"],
                                                        "--data", data, "--json", "--no-progress"])  # fmt: skip
        assert code == 0, err
        assert json.loads(out)["accuracy"] == accuracy, name


# ------------------------------------------------------------------------------------------- generate, inspect
def expected_line(text: str, new_ids: list[int]) -> str:
    return f"{text!r} -> {decode_new(tiny_tokenizer(), new_ids)!r}"


def test_generate_with_a_prompt_matches_the_library(workspace, runs, library):
    """Each line is the library's greedy continuation of that text alone (the command batches them) behind the
    saved prompt, after the prompt's template."""
    lines = ok(runs["generate"]).strip().splitlines()
    saved = artifact.load(workspace["root"] / "prompt")
    prefix = artifact.attach(saved, library).kv(library).detach()
    outputs = [generate(library, [library.tokenizer(TEMPLATE.format(text=text))["input_ids"]], prefix,
                        max_new_tokens=3)[0] for text in TEXTS]  # fmt: skip
    assert any(outputs)  # not a vacuous match of empty answers
    assert lines == [expected_line(text, out) for text, out in zip(TEXTS, outputs)]


def test_generate_with_the_base_model_matches_the_library_and_transformers(runs, library):
    """Without a prompt the texts go in as they are: the library's greedy tokens, which are transformers' own
    `generate` (up to an EOS, which is not printed)."""
    lines = ok(runs["generate_base"]).strip().splitlines()
    outputs = []
    for text in TEXTS:
        ids = library.tokenizer(text)["input_ids"]
        ours = generate(library, [ids], None, max_new_tokens=4)[0]
        theirs = library.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                        max_new_tokens=4, do_sample=False, pad_token_id=PAD)[0, len(ids) :].tolist()
        eos = library.tokenizer.eos_token_id
        assert ours == (theirs[: theirs.index(eos)] if eos in theirs else theirs), text
        outputs.append(ours)
    assert any(outputs)
    assert lines == [expected_line(text, out) for text, out in zip(TEXTS, outputs)]


def test_inspect_prints_json(runs):
    report = json.loads(ok(runs["inspect"]))
    assert report["method"] == "prompt" and report["num_tokens"] == 4
    assert report["tensors"] == {"prompt_embeddings": [4, 32]}
    assert report["parameters"] == 4 * 32
    assert report["bytes_on_disk"] > 4 * 32 * 4
    assert len(report["nearest_tokens"]) == 4 and all(len(row) == 3 for row in report["nearest_tokens"])
    assert len(report["norms"]) == 4
    assert report["training"]["last_step"] == 6


# ---------------------------------------------------------------------------------------------- user mistakes
def error_message(stderr: str) -> str:
    """stderr from the `error:` line on (progress bars of model loading may come before it); '' when none."""
    lines = stderr.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    return "\n".join(lines[starts[0] :]) if starts else ""


def test_malformed_data_exits_with_an_error_line_and_no_traceback(workspace, runs):
    result = runs["broken_data"]
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    message = error_message(result.stderr)
    assert message, result.stderr[-2000:]
    assert str(workspace["broken"]) in message and "line 2" in message
    assert not (workspace["root"] / "never").exists()


def run_main(monkeypatch, capsys, args) -> tuple[int, str, str]:
    """`main()` in this process, as the console script runs it: (exit code, stdout, stderr)."""
    capsys.readouterr()
    monkeypatch.setattr(sys, "argv", ["softprompt", *map(str, args)])
    code = 0
    try:
        main()
    except SystemExit as exit:
        code = exit.code or 0
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_prefix_artifact_in_process(workspace, runs, monkeypatch, capsys):
    """eval, generate and inspect of the prefix artifact, through `main()` (saves three interpreter starts)."""
    ok(runs["train_prefix"])
    folder = workspace["root"] / "prefix"
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(workspace["cache"]))
    code, out, err = run_main(monkeypatch, capsys, ["eval", "--prompt", folder, "--data", workspace["data"], "--json"])
    assert code == 0, err
    check_eval_json(workspace, "prefix", out)
    code, out, err = run_main(monkeypatch, capsys, ["generate", "--prompt", folder, "--max-new-tokens", 2, "fun"])
    assert code == 0 and out.startswith("'fun' -> '"), err
    code, out, err = run_main(monkeypatch, capsys, ["inspect", "--prompt", folder])
    assert code == 0, err
    assert "prefix (4 virtual tokens" in out and "tensor        prefix (2, 2, 2, 4, 8)" in out
    assert "layer 1" in out


def test_user_mistakes_in_process(workspace, runs, monkeypatch, capsys, tmp_path):
    w = workspace
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(w["cache"]))
    train = ["train", "--model", w["model"], "--template", TEMPLATE, "--labels", LABELS, "--label-field", "label",
             "--out", tmp_path / "out", "--steps", 2, "--no-progress"]
    other_model = save_tiny_model(tmp_path / "other-llama", seed=1)
    cases = [
        (train + ["--train", w["data"], "--method", "bogus"], ["method 'bogus' is not one of prompt, prefix"]),
        (train + ["--train", tmp_path / "missing.jsonl"], [str(tmp_path / "missing.jsonl"), "does not exist"]),
        (train + ["--train", w["broken"]], [str(w["broken"]), "line 2"]),
        (train + ["--train", w["data"], "--num-tokens", 0], ["num_tokens must be at least 1"]),
        (train + ["--train", w["data"], "--steps", 0, "--batch-size", 6, "--grad-accum", 4],
         ["steps must be at least 1", "batch_size 6 is not divisible by grad_accum 4"]),
        (train + ["--train", w["data"], "--labels", "positive"], ["at least two label words"]),
        (["eval", "--data", tmp_path / "missing.jsonl", "--prompt", w["root"] / "prompt"], ["does not exist"]),
        (["eval", "--data", w["data"], "--prompt", tmp_path], ["config.json is missing", "not a softprompt artifact"]),
        (["eval", "--data", w["data"], "--prompt", w["root"] / "prompt", "--model", other_model],
         ["was trained on base model", "fingerprint"]),
        (["eval", "--data", w["data"], "--model", w["model"]], ["eval needs --prompt DIR"]),
    ]  # fmt: skip
    for args, needles in cases:
        code, _, err = run_main(monkeypatch, capsys, args)
        assert code != 0, args
        assert "Traceback" not in err
        message = error_message(err)
        assert message, (args, err)
        for needle in needles:
            assert needle in message, (args, needle, err)
    assert not (tmp_path / "out" / "prompt.safetensors").exists()


def test_bitsandbytes_missing_optional_cpu_kernel_is_not_printed_by_every_command():
    """bitsandbytes logs that warning when transformers imports it (on CPUs with AVX-512 BF16 only), so it is sent
    here by hand, beside another warning of the same logger that must still show."""
    code = ("import logging, softprompt.cli; log = logging.getLogger('bitsandbytes.backends.cpu.ops'); "
            "log.warning('Failed to load CPU gemm_4bit_forward from kernels-community: %s.', 'none'); "
            "log.warning('another warning')")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "gemm_4bit" not in result.stderr and "another warning" in result.stderr
