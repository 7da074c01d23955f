"""Columnar data: Parquet files, and the folders `datasets`' `save_to_disk` writes (Arrow IPC stream shards listed
in state.json, beside dataset_info.json). Both are read with pyarrow alone, so `datasets` is not a dependency.

records.py wraps the rows as `Records` that name their row (counted from 1, like examples), so a problem found while
encoding reads "train.parquet, row 3: missing field(s) label". A null value counts as a missing field, as a JSON
null does. A `ClassLabel` column holds label indices into its own names (the features `datasets` keeps in
dataset_info.json and in each file's schema metadata); the records say which columns those are, and `TaskEncoder.encode`
refuses one whose names are not the label words in the same order, which would otherwise mislabel every row.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import SoftPromptError

STATE, INFO, DATASET_DICT = "state.json", "dataset_info.json", "dataset_dict.json"
"""The files of a `save_to_disk` folder: the shard list, the features, and (for a DatasetDict) the split list."""


def read_table(path: Path) -> tuple[list[dict], dict[str, list[str]]]:
    """The rows of a .parquet file or of a `save_to_disk` folder (one split), each a dict of column values, and each
    ClassLabel column's names in index order."""
    rows, features = _saved_dataset(path) if path.is_dir() else _parquet(path)
    if not rows:
        raise SoftPromptError(f"{path} holds no examples: the data set is empty.")
    return rows, _class_labels(features)


def _pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise SoftPromptError(f"Reading {path} needs the package pyarrow, which is not installed: `pip install "
                              "pyarrow` (or `pip install 'softprompt[data]'`), or convert the data to JSONL.") from None
    return pyarrow


def _parquet(path: Path) -> tuple[list[dict], dict]:
    """The rows, and the features `datasets`' to_parquet keeps in the schema metadata (none: {})."""
    pa = _pyarrow(path)
    try:
        table = pa.parquet.read_table(path)
    except (pa.ArrowException, OSError) as error:
        raise SoftPromptError(f"{path}: not a readable Parquet file ({error}).") from None
    return table.to_pylist(), _schema_features(table.schema)


def _saved_dataset(path: Path) -> tuple[list[dict], dict]:
    """The rows of every shard state.json lists, in its order (save_to_disk writes rows already in dataset order),
    and the features: dataset_info.json's, as `datasets` itself prefers them, else the shards' schema metadata."""
    if (path / DATASET_DICT).is_file() and not (path / STATE).is_file():
        splits = _json(path / DATASET_DICT).get("splits") or []
        example = path / (splits[0] if splits else "train")
        raise SoftPromptError(f"{path} holds a DatasetDict (splits: {', '.join(map(str, splits)) or 'none'}); give "
                              f"one split's folder, e.g. {example}.")  # fmt: skip
    if not (path / STATE).is_file():
        raise SoftPromptError(f"{path} is a folder without {STATE}: not a data set written by datasets' save_to_disk. "
                              "Give a data file (.jsonl, .csv, .tsv, .parquet) or such a folder.")  # fmt: skip
    files = _json(path / STATE).get("_data_files")
    if not isinstance(files, list) or not all(isinstance(f, dict) and "filename" in f for f in files):
        raise SoftPromptError(f"{path / STATE} lists no data files (_data_files); the folder is damaged.")
    pa = _pyarrow(path)
    rows, features = [], {}
    for entry in files:
        shard = path / entry["filename"]
        if not shard.is_file():
            raise SoftPromptError(f"{shard} is missing, though {path / STATE} lists it; the folder is incomplete.")
        try:
            with pa.memory_map(str(shard)) as source:  # the table's buffers live in the map: read them inside
                table = pa.ipc.open_stream(source).read_all()
                rows += table.to_pylist()
        except (pa.ArrowException, OSError) as error:
            raise SoftPromptError(f"{shard}: not an Arrow stream as save_to_disk writes it ({error}).") from None
        features = features or _schema_features(table.schema)
    if (path / INFO).is_file():
        features = _json(path / INFO).get("features") or features
    return rows, features


def _schema_features(schema) -> dict:
    """The features `datasets` writes into an Arrow or Parquet schema's metadata ({} when there are none)."""
    try:
        info = json.loads((schema.metadata or {}).get(b"huggingface", b"{}")).get("info")
    except (ValueError, AttributeError):  # not JSON, or not an object: written by something else
        return {}
    return (info.get("features") or {}) if isinstance(info, dict) else {}


def _class_labels(features: dict) -> dict[str, list[str]]:
    """Each ClassLabel column's names, in index order."""
    if not isinstance(features, dict):
        return {}
    return {name: [str(n) for n in feature["names"]] for name, feature in features.items()
            if isinstance(feature, dict) and feature.get("_type") == "ClassLabel"
            and isinstance(feature.get("names"), list)}  # fmt: skip


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise SoftPromptError(f"{path} is not valid JSON ({error}); the folder is damaged.") from None
    if not isinstance(data, dict):
        raise SoftPromptError(f"{path} holds no JSON object; the folder is damaged.")
    return data
