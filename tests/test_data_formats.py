"""Parquet files and `datasets` save_to_disk folders as training and evaluation data (tables.py): the rows as written,
in order across shards; a missing field refused with the message JSONL gets (its row instead of its line); a
DatasetDict, a stray folder, a damaged folder and a missing pyarrow refused clearly; and `softprompt train` on
Parquet and on a folder gives the prompt it gives on the same rows as JSONL.

The folders are written here with pyarrow the way datasets 5.2 writes them (Arrow IPC stream shards
`data-0000i-of-0000n.arrow` with the features in the schema's "huggingface" metadata, state.json listing the shards,
dataset_info.json with the features), so datasets itself is not needed to test them."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from softprompt.config import TaskConfig
from softprompt.data import Task, read_records
from softprompt.errors import SoftPromptError

from conftest import run_main, tiny_tokenizer
from test_cli import LABELS, TEMPLATE, error_message, save_tiny_model

ROWS = [{"text": "the movie was great", "label": "positive"}, {"text": "a terrible film", "label": "negative"},
        {"text": "very good fun", "label": "positive"}, {"text": "boring and bad", "label": "negative"}]  # fmt: skip
FEATURES = {"text": {"dtype": "string", "_type": "Value"}, "label": {"dtype": "string", "_type": "Value"}}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_saved_dataset(folder: Path, rows: list[dict], features: dict = FEATURES, shards: int = 2) -> Path:
    """A folder as `Dataset.save_to_disk(folder, num_shards=shards)` writes it (datasets 5.2)."""
    folder.mkdir(parents=True)
    table = pa.Table.from_pylist(rows)
    table = table.replace_schema_metadata({"huggingface": json.dumps({"info": {"features": features}})})
    names, start = [], 0
    for i in range(shards):  # contiguous shards, the first ones one row longer (datasets' Dataset.shard)
        size = len(rows) // shards + (i < len(rows) % shards)
        names.append(f"data-{i:05d}-of-{shards:05d}.arrow")
        with pa.OSFile(str(folder / names[-1]), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table.slice(start, size))
        start += size
    state = {"_data_files": [{"filename": name} for name in names], "_fingerprint": "0123456789abcdef",
             "_format_columns": None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
             "_split": None}  # fmt: skip
    (folder / "state.json").write_text(json.dumps(state, indent=2, sort_keys=True), encoding="utf-8")
    info = {"citation": "", "description": "", "features": features, "homepage": "", "license": ""}
    (folder / "dataset_info.json").write_text(json.dumps(info, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(params=["parquet", "saved"])
def table_kind(request) -> str:
    return request.param


def write_table(kind: str, root: Path, rows: list[dict]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if kind == "parquet":
        return write_parquet(root / "data.parquet", rows)
    return write_saved_dataset(root / "data", rows, shards=3)


def test_rows_are_read_in_order_with_their_row_numbers(tmp_path, table_kind):
    path = write_table(table_kind, tmp_path, ROWS)
    records = read_records(path)
    assert records == ROWS
    assert [records.where(i) for i in (0, 3)] == [f"{path}, row 1", f"{path}, row 4"]
    assert records[2:].where(0) == f"{path}, row 3"  # a slice keeps its rows' numbers


def test_values_keep_their_types_and_class_labels_are_indices(tmp_path):
    """A ClassLabel column holds indices into the label words; ints, floats and lists come back as such."""
    features = {"text": {"dtype": "string", "_type": "Value"},
                "label": {"names": LABELS.split(","), "_type": "ClassLabel"}}  # fmt: skip
    rows = [{"text": "great", "label": 1, "score": 0.5, "tags": ["a", "b"]},
            {"text": "awful", "label": 0, "score": 1.5, "tags": []}]  # fmt: skip
    records = read_records(write_saved_dataset(tmp_path / "saved", rows, features, shards=1))
    assert records == rows
    task = Task(TaskConfig(template=TEMPLATE, labels=LABELS.split(","), label_field="label"), tiny_tokenizer())
    assert [e.label for e in task.encode(records)] == [1, 0]


def normalized(message: str, path: Path) -> str:
    """The message with its file as <file> and each place as <row N>: JSONL's "line N (example N)" (one record a
    line here) and a table's "row N" alike."""
    message = re.sub(r", line (\d+) \(example \1\)|, row (\d+)", lambda m: f", <row {m[1] or m[2]}>", message)
    return message.replace(str(path), "<file>")


def test_a_missing_field_is_refused_as_in_jsonl(tmp_path, table_kind):
    """Row 3 without a label (a null in a table, an absent key in JSONL): the same message, naming its row; a column
    no row has: the same message as a key no JSONL record has."""
    task = Task(TaskConfig(template=TEMPLATE, labels=LABELS.split(","), label_field="label"), tiny_tokenizer())
    rows = [dict(r) for r in ROWS]
    rows[2]["label"] = None
    without = [{"text": r["text"]} for r in ROWS]
    cases = {  # rows with one label missing, rows without any
        "one": (rows, "Problems in the data:\n  - <file>, <row 3>: missing field(s) label"),
        "all": (without, "Problems in the data:\n  - <file>: --label-field 'label' names a field no record has (the "
                         "records have: text)\n  - <file>, <row 1>: missing field(s) label\n  - <file>, <row 2>: "
                         "missing field(s) label"),
    }  # fmt: skip
    for case, (data, expected) in cases.items():
        jsonl = write_jsonl(tmp_path / f"{case}.jsonl", [{k: v for k, v in r.items() if v is not None} for r in data])
        table = write_table(table_kind, tmp_path / case, data)
        messages = []
        for path in (jsonl, table):
            with pytest.raises(SoftPromptError) as info:
                task.encode(read_records(path))
            messages.append(normalized(str(info.value), path))
        assert messages[0] == messages[1], case
        assert messages[1].startswith(expected), messages[1]
        if case == "one":  # the brief wording a person reads
            assert f"{table}, row 3: missing field(s) label" in str(info.value)


def test_an_empty_table_is_refused(tmp_path, table_kind):
    schema = pa.schema([("text", pa.string()), ("label", pa.string())])
    path = write_parquet(tmp_path / "empty.parquet", [], schema) if table_kind == "parquet" else (
        write_saved_dataset(tmp_path / "empty", [{"text": "x", "label": "y"}], shards=1))  # fmt: skip
    if table_kind == "saved":
        (path / "state.json").write_text(json.dumps({"_data_files": []}), encoding="utf-8")
    with pytest.raises(SoftPromptError, match="holds no examples: the data set is empty"):
        read_records(path)


def test_folders_that_are_not_one_split_are_refused(tmp_path):
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}), encoding="utf-8")
    write_saved_dataset(tmp_path / "dict" / "train", ROWS)
    cases = {
        tmp_path / "dict": f"holds a DatasetDict (splits: train, test); give one split's folder, e.g. "
                           f"{tmp_path / 'dict' / 'train'}.",
        tmp_path / "dict" / "train" / "..": "holds a DatasetDict",
        tmp_path: "is a folder without state.json: not a data set written by datasets' save_to_disk",
    }  # fmt: skip
    for folder, expected in cases.items():
        with pytest.raises(SoftPromptError) as info:
            read_records(folder)
        assert str(folder) in str(info.value) and expected in str(info.value)
    assert read_records(tmp_path / "dict" / "train") == ROWS


def test_damaged_folders_and_files_are_refused(tmp_path):
    folder = write_saved_dataset(tmp_path / "saved", ROWS)
    (folder / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(SoftPromptError, match=r"data-00001-of-00002.arrow is missing, though .*state.json lists it"):
        read_records(folder)
    (folder / "data-00001-of-00002.arrow").write_bytes(b"not arrow")
    with pytest.raises(SoftPromptError, match="not an Arrow stream as save_to_disk writes it"):
        read_records(folder)
    (folder / "state.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(SoftPromptError, match="state.json is not valid JSON"):
        read_records(folder)
    (folder / "state.json").write_text(json.dumps({"_fingerprint": "x"}), encoding="utf-8")
    with pytest.raises(SoftPromptError, match=r"state.json lists no data files \(_data_files\)"):
        read_records(folder)
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 this is no parquet")
    with pytest.raises(SoftPromptError, match=f"{bad}: not a readable Parquet file"):
        read_records(bad)


def test_without_pyarrow_the_message_says_how_to_install_it(tmp_path, monkeypatch):
    path = write_parquet(tmp_path / "data.parquet", ROWS)
    folder = write_saved_dataset(tmp_path / "saved", ROWS)
    for name in [m for m in sys.modules if m == "pyarrow" or m.startswith("pyarrow.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow` now raises ImportError
    for target in (path, folder):
        with pytest.raises(SoftPromptError) as info:
            read_records(target)
        assert f"Reading {target} needs the package pyarrow, which is not installed: `pip install pyarrow`" in str(
            info.value)


def test_cli_trains_the_same_prompt_from_parquet_a_folder_and_jsonl(tmp_path, monkeypatch, capsys):
    """The same 24 rows as JSONL, Parquet and a three-shard folder (validation too): identical prompts; and a row
    without its label stops the command with its row."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    model = save_tiny_model(tmp_path / "model")
    words = "the a it this very quite".split() * 4
    rows = [{**ROWS[i % 4], "text": f"{ROWS[i % 4]['text']} {word}"} for i, word in enumerate(words)]
    sources = {"jsonl": write_jsonl(tmp_path / "d.jsonl", rows), "parquet": write_parquet(tmp_path / "d.parquet", rows),
               "saved": write_saved_dataset(tmp_path / "d", rows, shards=3)}  # fmt: skip
    prompts = {}
    for name, data in sources.items():
        out = tmp_path / f"out-{name}"
        code, _, err = run_main(monkeypatch, capsys, [
            "train", "--model", model, "--train", data, "--valid", data, "--template", TEMPLATE, "--labels", LABELS,
            "--label-field", "label", "--steps", 4, "--num-tokens", 3, "--eval-every", 2, "--no-progress",
            "--out", out])  # fmt: skip
        assert code == 0, err
        prompts[name] = load_file(out / "prompt.safetensors")["prompt_embeddings"]
        assert json.loads((out / "config.json").read_text())["training"]["valid"]["n"] == 24
    assert torch.equal(prompts["parquet"], prompts["jsonl"]) and torch.equal(prompts["saved"], prompts["jsonl"])

    broken = [dict(r) for r in rows]
    broken[4]["label"] = None
    data = write_parquet(tmp_path / "broken.parquet", broken)
    code, _, err = run_main(monkeypatch, capsys, [
        "train", "--model", model, "--train", data, "--template", TEMPLATE, "--labels", LABELS, "--label-field",
        "label", "--steps", 2, "--out", tmp_path / "never"])  # fmt: skip
    assert code == 2 and "Traceback" not in err
    assert f"{data}, row 5: missing field(s) label" in error_message(err)
    assert not (tmp_path / "never").exists()
