"""Atomic file writes: a temporary file in the same folder, then a rename, so a crash never leaves half a file. The
temporary files a killed writer left behind are removed by the next write into the same folder, once they are old
enough that no live writer can still own them."""

from __future__ import annotations

import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Callable

TEMPORARY = re.compile(r"\..+\.[a-z0-9_]{8}\.tmp")
"""The names `write_atomic` gives its temporary files: `.<target>.<mkstemp's 8 random characters>.tmp`."""
STALE_AFTER = 3600.0
"""Seconds after its last change that a temporary file of ours counts as left behind by a killed writer. A live
writer touches its file far more often than this (our largest write, a checkpoint, takes seconds), so removing only
older ones never pulls a file from under a write still in progress, in this process or another."""


def write_atomic(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` and move the result onto `path` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path.parent)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data reaches the disk before the rename makes it the file
        os.replace(tmp, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # and the rename itself survives a power loss
        finally:
            os.close(directory)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale(folder: Path, older_than: float = STALE_AFTER) -> list[Path]:
    """Remove the temporary files of interrupted atomic writes in `folder` (our naming only, unchanged for
    `older_than` seconds); returns what was removed. Files of any other name are never touched."""
    removed, now = [], time.time()
    for entry in folder.glob(".*.tmp"):
        try:
            if TEMPORARY.fullmatch(entry.name) and entry.is_file() and now - entry.stat().st_mtime > older_than:
                entry.unlink()
                removed.append(entry)
        except OSError:  # gone meanwhile (another process cleaned it), or not ours to remove: leave it
            continue
    return removed


def append_whole(path: str | Path, data: bytes) -> None:
    """Append all of `data` to `path` or nothing: a write that fails part-way (a full disk) is cut back off, so the
    file never ends in part of a record. Unbuffered, so the record goes down in one call and a killed process
    leaves whole records too."""
    with open(path, "ab", buffering=0) as f:
        end = f.seek(0, os.SEEK_END)
        try:
            rest = memoryview(data)
            while rest:
                rest = rest[f.write(rest) :]
        except OSError:
            f.truncate(end)
            raise


def write_json(path: str | Path, data) -> None:
    def dump(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, ensure_ascii=False)
            f.write("\n")

    write_atomic(path, dump)


def write_jsonl(path: str | Path, records: list[dict]) -> None:
    """One JSON object per line (UTF-8 as it is: Chinese stays readable)."""
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def write_text(path: str | Path, text: str) -> None:
    write_atomic(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
