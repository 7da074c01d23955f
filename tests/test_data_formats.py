"""Parquet files and `datasets` save_to_disk folders as training and evaluation data (tables.py): the rows as written,
in order across shards, with their types; a ClassLabel column whose names are not the label words in order refused;
a missing field refused with the message JSONL gets (its row instead of its line); a DatasetDict, a stray folder, a
damaged folder and a missing pyarrow refused clearly; and `softprompt train` on Parquet and on a folder gives the
prompt it gives on the same rows as JSONL.

The folders and the Parquet files with features are written by `datasets` itself (a test-only dependency: the library
reads them with pyarrow alone); plain Parquet files, as pandas or pyarrow write them, by pyarrow."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from softprompt.config import TaskConfig
from softprompt.data import TaskEncoder, read_records
from softprompt.errors import SoftPromptError

from conftest import run_main, tiny_tokenizer
from test_cli import LABELS, TEMPLATE, error_message, save_tiny_model

ROWS = [{"text": "the movie was great", "label": "positive"}, {"text": "a terrible film", "label": "negative"},
        {"text": "very good fun", "label": "positive"}, {"text": "boring and bad", "label": "negative"}]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_parquet(path: Path, rows: list[dict], schema: pa.Schema | None = None) -> Path:
    """A plain Parquet file (no `datasets` features in its metadata), as pandas or pyarrow write one."""
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def write_saved_dataset(folder: Path, rows: list[dict], features: datasets.Features | None = None,
                        shards: int = 2) -> Path:  # fmt: skip
    """`datasets.Dataset.save_to_disk(folder, num_shards=shards)` of the rows."""
    datasets.Dataset.from_list(rows, features=features).save_to_disk(str(folder), num_shards=shards)
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


def written_by_datasets(kind: str, root: Path, columns: dict[str, list], features: datasets.Features) -> Path:
    """The columns as a `datasets.Dataset`, written by datasets itself: save_to_disk in two shards, or to_parquet."""
    dataset = datasets.Dataset.from_dict(columns, features=features)
    if kind == "to_parquet":
        root.mkdir(parents=True, exist_ok=True)
        dataset.to_parquet(str(root / "data.parquet"))
        return root / "data.parquet"
    dataset.save_to_disk(str(root / "data"), num_shards=2)
    return root / "data"


def sentiment_features(names: list[str], **more: datasets.features.FeatureType) -> datasets.Features:
    return datasets.Features({"text": datasets.Value("string"), "label": datasets.ClassLabel(names=names), **more})


def sentiment_task() -> TaskEncoder:
    return TaskEncoder(TaskConfig(template=TEMPLATE, labels=LABELS.split(","), label_field="label"), tiny_tokenizer())


@pytest.mark.parametrize("kind", ["save_to_disk", "to_parquet"])
def test_what_datasets_writes_is_read_as_written(tmp_path, monkeypatch, kind):
    """Strings, ints, floats, lists, a null and a ClassLabel column, written by `datasets`: the rows given to it, value
    for value, read without importing datasets; each ClassLabel index becomes the label word that datasets' own
    `int2str` names."""
    features = sentiment_features(LABELS.split(","), count=datasets.Value("int64"), score=datasets.Value("float64"),
                                  tags=datasets.List(datasets.Value("string")), note=datasets.Value("string"))
    columns = {"text": ["great", "awful", "fine"], "label": [1, 0, 1], "count": [3, -2, 0], "score": [0.5, 1.5, -0.25],
               "tags": [["a", "b"], [], ["c"]], "note": ["x", None, "z"]}  # fmt: skip
    path = written_by_datasets(kind, tmp_path, columns, features)
    monkeypatch.setitem(sys.modules, "datasets", None)  # `import datasets` now raises ImportError
    records = read_records(path)
    assert records == [dict(zip(columns, values)) for values in zip(*columns.values())]
    words = [LABELS.split(",")[e.label] for e in sentiment_task().encode(records)]
    assert words == features["label"].int2str(columns["label"]) == ["positive", "negative", "positive"]


@pytest.mark.parametrize("kind", ["save_to_disk", "to_parquet"])
def test_a_class_label_column_must_name_the_label_words_in_their_order(tmp_path, kind):
    """The label column's names are the label words in order: its indices are read as those words (another ClassLabel
    column may name anything). The same words in another order, where an index would name another word than
    datasets' `int2str` does, or other words: refused, naming the file, the field and both lists, and saying which
    --labels would fit; a slice of the rows (eval --limit) too; a folder without dataset_info.json by its shards'
    metadata."""
    task, labels = sentiment_task(), LABELS.split(",")
    columns = {"text": ["great", "awful", "fine"], "label": [1, 0, 1], "topic": [0, 2, 1]}
    topic = datasets.ClassLabel(names=["film", "book", "song"])
    path = written_by_datasets(kind, tmp_path / "same", columns, sentiment_features(labels, topic=topic))
    assert [e.label for e in task.encode(read_records(path))] == [1, 0, 1]
    for case, names, differ in (("reversed", labels[::-1], "the same words in another order"),
                                ("other", ["bad", "good"], "other words")):  # fmt: skip
        features = sentiment_features(names, topic=topic)
        path = written_by_datasets(kind, tmp_path / case, columns, features)
        if case == "reversed":
            assert features["label"].int2str(1) != labels[1]  # what reading the indices as --labels would do
        read = [read_records(path), read_records(path)[:2]]
        if kind == "save_to_disk":
            (path / "dataset_info.json").unlink()
            read.append(read_records(path))
        for records in read:
            with pytest.raises(SoftPromptError) as info:
                task.encode(records)
            message = str(info.value)
            assert message.startswith(f"{path}: the label field 'label' is a ClassLabel column whose names are "
                                      f"{names}, {differ} than the label words {labels}; "), message  # fmt: skip
            assert f"(--labels {','.join(names)})" in message


def test_the_cli_refuses_a_class_label_column_in_another_order(tmp_path, monkeypatch, capsys):
    """`softprompt train` on a folder whose ClassLabel names are --labels reversed: the error, and no run."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    columns = {"text": [r["text"] for r in ROWS], "label": [LABELS.split(",").index(r["label"]) for r in ROWS]}
    data = written_by_datasets("save_to_disk", tmp_path, columns, sentiment_features(LABELS.split(",")[::-1]))
    code, _, err = run_main(monkeypatch, capsys, [
        "train", "--model", save_tiny_model(tmp_path / "model"), "--train", data, "--template", TEMPLATE, "--labels",
        LABELS, "--label-field", "label", "--steps", 2, "--out", tmp_path / "never"])  # fmt: skip
    assert code == 2 and "Traceback" not in err
    assert error_message(err).startswith(f"error: {data}: the label field 'label' is a ClassLabel column whose names "
                                         "are ['positive', 'negative'], the same words in another order than the "
                                         "label words ['negative', 'positive']; ")  # fmt: skip
    assert not (tmp_path / "never").exists()


def normalized(message: str, path: Path) -> str:
    """The message with its file as <file> and each place as <row N>: JSONL's "line N (example N)" (one record a
    line here) and a table's "row N" alike."""
    message = re.sub(r", line (\d+) \(example \1\)|, row (\d+)", lambda m: f", <row {m[1] or m[2]}>", message)
    return message.replace(str(path), "<file>")


def test_a_missing_field_is_refused_as_in_jsonl(tmp_path, table_kind):
    """Row 3 without a label (a null in a table, an absent key in JSONL): the same message, naming its row; a column
    no row has: the same message as a key no JSONL record has."""
    task = TaskEncoder(TaskConfig(template=TEMPLATE, labels=LABELS.split(","), label_field="label"), tiny_tokenizer())
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
    path = write_parquet(tmp_path / "empty.parquet", [], schema) if table_kind == "parquet" else tmp_path / "empty"
    if table_kind == "saved":
        datasets.Dataset.from_dict({"text": [], "label": []}, datasets.Features.from_arrow_schema(schema)).save_to_disk(
            str(path))
    with pytest.raises(SoftPromptError, match="holds no examples: the data set is empty"):
        read_records(path)


def test_folders_that_are_not_one_split_are_refused(tmp_path):
    split = datasets.Dataset.from_list(ROWS)
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dict"))
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
        (prompts[name],) = load_file(out / "prompt.safetensors").values()  # the one tensor: the prompt
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
