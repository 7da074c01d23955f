"""Reading records: JSONL and CSV/TSV files here, Parquet files and `datasets` save_to_disk folders in tables.py;
`Records` remember where each row came from, so problems found later can name it."""

from __future__ import annotations

import codecs
import csv
import io
import json
from pathlib import Path

from ..errors import SoftPromptError


class Records(list):
    """Rows read from one file (a list of dicts) that remember the file and the line each row starts on (`unit`
    "line"), or their row number in a table ("row", tables.py), so problems found later, while encoding, can name
    them. `class_labels`: a table's ClassLabel columns, each with its names in index order (tables.py), which
    `TaskEncoder.encode` checks against the label words. Slices keep all of it."""

    def __init__(self, rows: list[dict], path: str | Path, lines: list[int], unit: str = "line",
                 class_labels: dict[str, list[str]] | None = None):  # fmt: skip
        super().__init__(rows)
        self.path, self.lines, self.unit = str(path), list(lines), unit
        self.class_labels = dict(class_labels or {})

    def __getitem__(self, index):
        if isinstance(index, slice):
            return Records(list.__getitem__(self, index), self.path, self.lines[index], self.unit, self.class_labels)
        return list.__getitem__(self, index)

    def where(self, i: int) -> str:
        if self.unit == "row":  # a table's row number is its example number
            return f"{self.path}, row {self.lines[i]}"
        return f"{self.path}, line {self.lines[i]} (example {i + 1})"


def read_records(path: str | Path) -> Records:
    """Rows of a JSONL (.jsonl/.json, one object per line) or CSV/TSV file, as dicts of strings and values; or of a
    Parquet file or a folder written by `datasets`' save_to_disk (tables.py, with pyarrow).
    CSV/TSV: the first line names the fields; a row with more values than the header, or broken quoting (a quote
    never closed, text right after a closing quote), is refused with its line rather than read shifted."""
    path = Path(path)
    if path.is_dir() or (path.is_file() and path.suffix.lower() == ".parquet"):
        from .tables import read_table

        rows, class_labels = read_table(path)
        return Records(rows, path, list(range(1, len(rows) + 1)), unit="row", class_labels=class_labels)
    if not path.is_file():
        raise SoftPromptError(f"Data file {path} does not exist.")
    suffix = path.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".json", ".ndjson"):
        raise SoftPromptError(f"{path}: unknown data format {suffix!r}; use .jsonl, .csv, .tsv or .parquet, or a "
                              "folder written by datasets' save_to_disk.")  # fmt: skip
    raw = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0  # tolerate a byte-order mark
    try:
        text = raw[bom:].decode("utf-8")
    except UnicodeDecodeError as error:
        # Decoded whole, so the offset is the file's own (a streaming reader gives it within its current chunk).
        at = bom + error.start
        line = raw[:at].count(b"\n") + 1
        raise SoftPromptError(
            f"{path}, line {line}: not UTF-8 text (byte {at}: {error.reason}); save the file as UTF-8."
        ) from None
    records, lines = [], []
    if suffix in (".csv", ".tsv"):
        # strict: broken quoting is an error, not a field that silently swallows the following lines
        reader = csv.DictReader(io.StringIO(text, newline=""), delimiter="\t" if suffix == ".tsv" else ",",
                                strict=True)  # fmt: skip
        end = 1  # the header's last line; a quoted field may span lines, so a row starts after the last
        try:
            for row in reader:
                if None in row:  # DictReader's key for values beyond the header
                    raise SoftPromptError(
                        f"{path}, line {end + 1}: {len(reader.fieldnames) + len(row[None])} values, but the header "
                        f"names {len(reader.fieldnames)} ({', '.join(reader.fieldnames)}); quote a value that "
                        f"holds the delimiter ({'a tab' if suffix == '.tsv' else 'a comma'})."
                    )
                records.append(row)
                lines.append(end + 1)
                end = reader.line_num
        except csv.Error as error:
            raise SoftPromptError(
                f"{path}, line {end + 1}: malformed {suffix[1:].upper()} ({error}); a quoted value must end with a "
                'quote, and a quote inside it is written twice ("").'
            ) from None
    else:
        for number, line in enumerate(io.StringIO(text, newline=""), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise SoftPromptError(
                    f"{path}, line {number}, column {error.colno}: not valid JSON ({error.msg}). "
                    "Each line must hold one JSON object."
                ) from None
            if not isinstance(record, dict):
                raise SoftPromptError(f"{path}, line {number}: expected a JSON object, got {type(record).__name__}.")
            records.append(record)
            lines.append(number)
    if not records:
        raise SoftPromptError(f"{path} holds no examples: the data set is empty.")
    return Records(records, path, lines)
