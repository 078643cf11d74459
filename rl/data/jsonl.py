"""The one JSON-lines reader: values with the `file line N` they came from, for messages."""

from __future__ import annotations

import json
from collections.abc import Iterator
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
