"""Inspection: norms and cosines recomputed here by hand from the saved tensors, nearest tokens of prompts that are
exactly vocabulary embeddings, the PNG heatmap and TSV table on disk, `compare` across artifacts, and the `inspect`
and `compare` commands."""

from __future__ import annotations

import csv
import json
import math

import pytest
import torch

from softprompt import artifact, methods
from softprompt.backbones import backbone_for
from softprompt.config import PromptConfig, TaskConfig
from softprompt.errors import SoftPromptError
from softprompt.artifact.inspection import HEATMAP, NEAREST_TABLE, compare, compare_heatmap, describe, write_files
from softprompt.models import load_model

from conftest import tiny_backbone, tiny_model, tiny_tokenizer, run_main

TASK = TaskConfig(template="review {text} sentiment", labels=["negative", "positive"], label_field="label")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def save(backbone, folder, method="prompt", n=4, seed=1, **config):
    config = {"init": "random", "init_range": 1.0, **config}
    prompt = methods.build(PromptConfig(method=method, num_tokens=n, **config), backbone,
                           generator=torch.Generator().manual_seed(seed))  # fmt: skip
    return artifact.save(folder, prompt, TASK, backbone)


def cosine(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def per_token(saved) -> list[list[float]]:
    """Each virtual token's numbers as a plain list, read straight from the tensor."""
    if saved.prompt.method == "prompt":
        return saved.tensors["prompt_embeddings"].tolist()
    prefix = saved.tensors["prefix"]  # (layers, 2, kv_heads, n, head_dim)
    return [prefix[:, :, :, i, :].flatten().tolist() for i in range(prefix.shape[3])]


@pytest.mark.parametrize("method", ["prompt", "prefix"])
def test_norms_and_token_cosines_equal_a_computation_by_hand(tmp_path, method):
    backbone = tiny_backbone("qwen3")
    folder = save(backbone, tmp_path / "p", method, n=5)
    saved = artifact.load(folder)
    report = describe(saved, folder)
    vectors = per_token(saved)
    assert report["norms"] == pytest.approx([math.sqrt(sum(x * x for x in v)) for v in vectors], abs=1e-4)
    for i, u in enumerate(vectors):
        assert report["token_cosine"][i] == pytest.approx([cosine(u, v) for v in vectors], abs=1e-4)
    pairs = [cosine(vectors[i], vectors[j]) for i in range(5) for j in range(5) if i != j]
    assert report["mean_token_cosine"] == pytest.approx(sum(pairs) / len(pairs), abs=1e-4)


def test_nearest_tokens_of_a_prompt_made_of_vocabulary_embeddings(tmp_path):
    """A text-initialized prompt is exactly the embeddings of its words: each is its own nearest token, cosine 1."""
    backbone = tiny_backbone("llama")
    folder = save(backbone, tmp_path / "p", n=3, init="text", init_text="great boring dog")
    report = describe(artifact.load(folder), folder, backbone, k=2)
    assert [row[0] for row in report["nearest_tokens"]] == ["great", "boring", "dog"]
    assert [row[0] for row in report["nearest_cosines"]] == pytest.approx([1.0] * 3, abs=1e-5)
    assert all(row[1] < row[0] for row in report["nearest_cosines"])
    written = write_files(report, tmp_path / "files")
    assert [p.name for p in written] == [HEATMAP, NEAREST_TABLE]
    assert (tmp_path / "files" / HEATMAP).read_bytes()[:8] == PNG_MAGIC
    rows = list(csv.reader((tmp_path / "files" / NEAREST_TABLE).open(encoding="utf-8"), delimiter="\t"))
    assert rows[0] == ["token", "norm", "nearest1", "cosine1", "nearest2", "cosine2"]
    assert [r[0] for r in rows[1:]] == ["p0", "p1", "p2"]
    assert [r[2] for r in rows[1:]] == ["'great'", "'boring'", "'dog'"]
    assert float(rows[1][3]) == pytest.approx(1.0, abs=1e-4)


def test_prefix_reports_have_no_nearest_tokens_but_a_heatmap(tmp_path):
    backbone = tiny_backbone("gpt2")
    folder = save(backbone, tmp_path / "p", "prefix")
    report = describe(artifact.load(folder), folder, backbone)
    assert "nearest_tokens" not in report and len(report["key_norm_per_layer"]) == 2
    assert [p.name for p in write_files(report, tmp_path)] == [HEATMAP]


def test_compare_equals_cosines_by_hand(tmp_path):
    backbone = tiny_backbone("llama")
    a, b = (artifact.load(save(backbone, tmp_path / name, seed=seed)) for name, seed in (("a", 1), ("b", 2)))
    report = compare([a, b, a], ["a", "b", "a again"])
    flat = [sum(per_token(x), []) for x in (a, b)]
    assert report["cosine"][0] == pytest.approx([1.0, cosine(*flat), 1.0], abs=1e-4)
    means = [[sum(col) / len(col) for col in zip(*per_token(x))] for x in (a, b)]
    assert report["mean_vector_cosine"][1][0] == pytest.approx(cosine(*means), abs=1e-4)
    assert [p["mean_norm"] for p in report["prompts"]][0] == pytest.approx(
        sum(math.sqrt(sum(x * x for x in v)) for v in per_token(a)) / 4, abs=1e-4
    )
    assert not report["base_models_differ"]
    assert compare_heatmap(report, tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC


def test_compare_of_other_lengths_and_refusals(tmp_path):
    backbone = tiny_backbone("llama")
    short = artifact.load(save(backbone, tmp_path / "short", n=2))
    long = artifact.load(save(backbone, tmp_path / "long", n=6))
    report = compare([short, long], ["short", "long"])
    assert report["cosine"] is None and len(report["mean_vector_cosine"]) == 2
    prefix = artifact.load(save(backbone, tmp_path / "prefix", "prefix"))
    with pytest.raises(SoftPromptError, match="one method"):
        compare([short, prefix], ["short", "prefix"])
    other = artifact.load(save(tiny_backbone("qwen3"), tmp_path / "other", "prefix"))  # head_dim 16, not 8
    with pytest.raises(SoftPromptError, match="widths"):
        compare([prefix, other], ["prefix", "other"])


# ------------------------------------------------------------------------------------------------------ CLI
def test_inspect_and_compare_commands(tmp_path, monkeypatch, capsys):
    folder = tmp_path / "tiny-llama"
    tiny_model("llama").save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    backbone = backbone_for(*load_model(str(folder)))
    a = save(backbone, tmp_path / "a", n=3, init="text", init_text="fun movie")
    b = save(backbone, tmp_path / "b", n=3, seed=4)
    code, out, err = run_main(monkeypatch, capsys, ["inspect", "--prompt", a, "--top-k", 2, "--out", tmp_path / "i",
                                                    "--json"])  # fmt: skip
    assert code == 0, err
    report = json.loads(out)
    assert [row[0] for row in report["nearest_tokens"]] == ["fun", "movie", "fun"]
    assert report["files"] == [str(tmp_path / "i" / HEATMAP), str(tmp_path / "i" / NEAREST_TABLE)]
    code, out, err = run_main(monkeypatch, capsys, ["inspect", "--prompt", b])  # files beside the prompt
    assert code == 0 and "vector norms" in out and (b / HEATMAP).is_file(), err
    code, out, err = run_main(monkeypatch, capsys, ["compare", a, b, "--out", tmp_path / "c.png"])
    assert code == 0, err
    assert "cosine between whole prompts" in out and (tmp_path / "c.png").read_bytes()[:8] == PNG_MAGIC
    code, _, err = run_main(monkeypatch, capsys, ["compare", a])
    assert code == 2 and "error: compare needs at least two" in err
