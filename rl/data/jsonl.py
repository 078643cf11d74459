"""The one JSON-lines reader (values with the `file line N` they came from, for messages) and
the one appender (a batch of rows in one flushed write that a kill cannot leave half-merged)."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from rl.core.errors import DataError


def jsonl_values(path: str | Path, n: int | None = None) -> Iterator[tuple[str, Any]]:
    """(`"<path> line <k>"`, parsed value) of each non-blank line, at most `n` of them.
    A missing file or a line that is not JSON is a DataError naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    count = 0
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if n is not None and count >= n:
                return
            if not line.strip():
                continue
            where = f"{path} line {lineno}"
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
            count += 1
            yield where, value


def append_jsonl(path: Path, rows: Iterable[Mapping[str, Any]]) -> None:
    """Append `rows` as JSON lines in one write, flushed and synced to disk (a kill loses at
    most this batch). A previous run's partial last line is closed first, so it stays one
    unreadable line that readers skip instead of merging with the first new row."""
    text = "".join(json.dumps(dict(r), ensure_ascii=False) + "\n" for r in rows)
    if not text:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as f:
        if f.tell() > 0:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                text = "\n" + text
        f.write(text.encode())
        f.flush()
        os.fsync(f.fileno())
