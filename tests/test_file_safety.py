"""What a run and an artifact keep on disk cannot be turned against the user or strand them (issue 26): a checkpoint
carrying code is refused without running it (the same file, unpickled as before, does run it); a metrics.jsonl line
torn by a kill does not block `--resume`, and an append that hits a full disk leaves no torn line (the disk filled
for real, with a file-size limit); a config.json paired with another save's weights is refused; temporary files of
interrupted writes are cleaned once stale, and nothing else is touched."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from softprompt import artifact
from softprompt.atomic import STALE_AFTER
from softprompt.cli import main
from softprompt.config import TaskConfig
from softprompt.errors import SoftPromptError
from softprompt.training.checkpoint import latest_checkpoint

from conftest import random_prompt, run_main, tiny_backbone
from test_cli import save_tiny_model, write_data


class Payload:
    """What an attacker plants: unpickling it runs a shell command (here, one that creates `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("file-safety")
    return dict(root=root, model=save_tiny_model(root / "tiny"), data=write_data(root / "train.jsonl", 24, 1))


def train_argv(w, out: Path, *extra) -> list:
    return ["train", "--model", w["model"], "--train", w["data"], "--valid", w["data"], "--template",
            "review {text} sentiment", "--labels", "negative,positive", "--label-field", "label", "--out", out,
            "--steps", 6, "--eval-every", 3, "--checkpoint-every", 3, "--num-tokens", 4, "--init", "random",
            "--no-progress", *extra]  # fmt: skip


@pytest.fixture(scope="module")
def finished(workspace) -> Path:
    """A run of 6 steps, checkpoints at steps 3 and 6; tests damage copies of it."""
    out, threads = workspace["root"] / "finished", torch.get_num_threads()
    torch.set_num_threads(1)  # as the tests' own fixture does for tiny models (it runs after this one)
    try:
        with pytest.MonkeyPatch.context() as monkeypatch, pytest.raises(SystemExit) as exit:
            monkeypatch.setattr("sys.argv", ["softprompt", *map(str, train_argv(workspace, out))])
            main()
    finally:
        torch.set_num_threads(threads)
    assert exit.value.code == 0
    return out


def copy_of(finished: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(finished, tmp_path / "run"))


def test_a_checkpoint_carrying_code_is_refused_and_its_code_never_runs(workspace, tmp_path, monkeypatch, capsys):
    out, marker = tmp_path / "run", tmp_path / "marker"
    planted = out / "checkpoints" / "step-0000003.pt"
    planted.parent.mkdir(parents=True)
    torch.save({"step": 3, "prompts": Payload(marker)}, planted)  # where --resume looks by itself

    code, _, err = run_main(monkeypatch, capsys, train_argv(workspace, out, "--resume"))
    assert code == 2 and f"{planted} was refused" in err and "posix.system" in err and "nothing of it was run" in err
    assert not marker.exists()
    assert [p.name for p in out.rglob("*") if p.is_file()] == [planted.name]  # the run wrote nothing

    torch.load(planted, weights_only=False)  # the reference: unpickled as before, the payload is real and runs
    assert marker.exists()


OLDER_CHECKPOINT_KEYS = {"step", "prompts", "optimizer", "scheduler", "torch_rng", "python_rng", "batches_consumed",
                         "best", "evals_without_gain", "tokens_seen", "train_seconds", "prompt_config", "train_config",
                         "data", "finished", "stopped_early", "dropped"}  # fmt: skip
"""What checkpoints of older versions hold (all of it plain data)."""


def test_a_cpu_run_writes_checkpoints_as_before_that_torch_loads_safely(finished):
    for path in sorted((finished / "checkpoints").glob("step-*.pt")):
        assert torch.load(path, weights_only=True).keys() == OLDER_CHECKPOINT_KEYS  # torch's own safe loader


def test_a_damaged_checkpoint_is_named_with_what_to_do(workspace, finished, tmp_path, monkeypatch, capsys):
    out = copy_of(finished, tmp_path)
    newest = latest_checkpoint(out)
    newest.write_bytes(newest.read_bytes()[:200])  # copied half-way
    code, _, err = run_main(monkeypatch, capsys, train_argv(workspace, out, "--resume"))
    assert code == 2 and f"{newest} cannot be read" in err and "delete it to resume from the one before" in err


def losses(text: str) -> list[tuple]:
    """(step, loss) and (step, validation) of a metrics.jsonl, without the timings that differ between runs."""
    records = [json.loads(line) for line in text.splitlines()]
    return [(r["step"], r.get("loss"), r.get("lr"), r.get("valid")) for r in records]


def test_a_torn_metrics_line_does_not_block_resume(workspace, finished, tmp_path, monkeypatch, capsys, recwarn):
    """A run killed while writing step 5's record, after its step-3 checkpoint: resumed, it ends with the log an
    uninterrupted run wrote (the reference), the torn line gone."""
    out = copy_of(finished, tmp_path)
    uninterrupted = (out / "metrics.jsonl").read_text()
    lines = uninterrupted.splitlines(keepends=True)
    torn = next(i for i, line in enumerate(lines) if json.loads(line)["step"] == 5)
    (out / "metrics.jsonl").write_text("".join(lines[:torn]) + lines[torn][: len(lines[torn]) // 2])
    latest_checkpoint(out).unlink()  # the kill came before the step-6 checkpoint

    code, _, err = run_main(monkeypatch, capsys, train_argv(workspace, out, "--resume"))
    assert code == 0, err
    assert any("dropped a torn last line" in str(w.message) for w in recwarn)
    assert losses((out / "metrics.jsonl").read_text()) == losses(uninterrupted)


def test_a_bad_line_inside_metrics_is_refused_with_its_number(workspace, finished, tmp_path, monkeypatch, capsys):
    out = copy_of(finished, tmp_path)
    lines = (out / "metrics.jsonl").read_text().splitlines(keepends=True)
    (out / "metrics.jsonl").write_text("".join(lines[:2]) + "{not a record\n" + "".join(lines[2:]))
    code, _, err = run_main(monkeypatch, capsys, train_argv(workspace, out, "--resume"))
    assert code == 2 and f"{out / 'metrics.jsonl'}:3 is not a metrics record" in err and "delete that line" in err


FULL_DISK = """
import resource, signal, sys
from pathlib import Path
from softprompt.training.run_files import MetricsLog

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
ours, plain = Path(sys.argv[1]), Path(sys.argv[2])
resource.setrlimit(resource.RLIMIT_FSIZE, (ours.stat().st_size + 10, resource.RLIM_INFINITY))
record = {"step": 7, "loss": 1.5, "note": "x" * 200}
with plain.open("a") as f:  # the reference: the same fault tears a plain append
    try:
        f.write(str(record) + "\\n")
        f.close()
    except OSError:
        pass
try:
    MetricsLog(ours, main=True).append(record)
except OSError as error:
    print("refused", error.errno)
"""


def test_an_append_that_fills_the_disk_leaves_no_torn_line(tmp_path):
    ours, plain = tmp_path / "metrics.jsonl", tmp_path / "plain.jsonl"
    ours.write_text('{"step": 1, "loss": 2.0}\n')
    shutil.copy(ours, plain)
    before = ours.read_bytes()
    result = subprocess.run([sys.executable, "-c", FULL_DISK, ours, plain], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("refused")  # the error still reaches the run
    assert len(plain.read_bytes()) == len(before) + 10  # the fault is real: part of a line was written there
    assert ours.read_bytes() == before


def save_prompt(backbone, folder: Path, seed: int) -> Path:
    task = TaskConfig(template="review {text} sentiment", labels=["negative", "positive"], label_field="label")
    return artifact.save(folder, random_prompt(backbone, seed=seed), task, backbone)


def test_a_config_from_another_save_is_refused(tmp_path):
    """Two saves of the same shapes (nothing but the named sha256 tells them apart): one's config.json with the
    other's weights is refused; each pair as saved loads, and so does an older config that names no sha256."""
    backbone = tiny_backbone("llama")
    first, second = save_prompt(backbone, tmp_path / "first", 1), save_prompt(backbone, tmp_path / "second", 2)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    shutil.copy(first / "prompt.safetensors", mixed)
    shutil.copy(second / "config.json", mixed)
    with pytest.raises(SoftPromptError, match="come from different saves") as info:
        artifact.load(mixed)
    assert str(mixed / "config.json") in str(info.value) and "both files together" in str(info.value)

    config = json.loads((first / "config.json").read_text())
    with safe_open(first / "prompt.safetensors", "pt") as weights:  # the sha256 the weights carry in their header
        assert config["weights_sha256"] == weights.metadata()["sha256"]
    for folder in (first, second):
        artifact.load(folder)
    del config["weights_sha256"]  # as saved by an older version
    (mixed / "config.json").write_text(json.dumps(config))
    assert torch.equal(artifact.load(mixed).tensors["prompt_embeddings"],
                       artifact.load(first).tensors["prompt_embeddings"])  # fmt: skip


def test_stale_temporary_files_are_cleaned_and_nothing_else(tmp_path):
    folder = tmp_path / "prompt"
    folder.mkdir()
    old = time.time() - STALE_AFTER - 60
    stale = [folder / ".config.json.k3j_x9q2.tmp", folder / ".step-0000010.pt.abcdefgh.tmp"]
    kept = [folder / ".prompt.safetensors.zz99zz99.tmp",  # a live writer's: recent
            folder / "notes.tmp", folder / ".mine.tmp", folder / ".x.TOOLONG123.tmp"]  # not our naming
    for path in stale + kept:
        path.write_text("partial")
        if path != kept[0]:
            os.utime(path, (old, old))
    save_prompt(tiny_backbone("llama"), folder, 1)
    assert not any(path.exists() for path in stale)
    assert all(path.exists() for path in kept)
    assert {p.name for p in folder.iterdir()} == {"config.json", "prompt.safetensors", *(p.name for p in kept)}
