"""An append-only JSONL results store: one row (a JSON object) per line, each line flushed and
fsynced as it is appended, so a finished row survives a crash, Ctrl-C or SIGKILL. A line torn by
a kill mid-write is skipped with a warning on reading, and the next append starts a fresh line.
"""

import json
import math
import os
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd


def _plain(value):
    """`value` as JSON can hold it: non-finite floats -> None, numpy scalars -> Python ones."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _hashable(value):
    return tuple(_hashable(v) for v in value) if isinstance(value, list) else value


def _last_line_torn(f) -> bool:
    """Whether the binary file `f` ends in a line without its newline."""
    end = f.seek(0, os.SEEK_END)
    if not end:
        return False
    f.seek(end - 1)
    return f.read(1) != b"\n"


class Store:
    """Rows in the JSONL file `path`; the folder is created if missing."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"results store path {str(self.path)!r} is a folder; give a file "
                             "path, e.g. results/sweep.jsonl")
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def append(self, row: dict) -> None:
        """Writes `row` as one line and returns once it is on disk."""
        self.extend([row])

    def extend(self, rows: Iterable[dict]) -> None:
        """Writes `rows`, a line each, and returns once they are on disk (one sync for all:
        for the many rows of one measurement)."""
        text = "".join(json.dumps(_plain(row), allow_nan=False) + "\n" for row in rows)
        if not text:
            return
        with open(self.path, "a+b") as f:
            if _last_line_torn(f):
                text = "\n" + text  # leave the torn line on a line of its own
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())

    def rows(self) -> list[dict]:
        """Every readable row, in order; unreadable lines are skipped with a warning."""
        if not self.path.exists():
            return []
        out = []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict):
                    warnings.warn(f"{self.path}:{number}: skipped an unreadable row (torn by a "
                                  f"killed writer?): {line[:80]!r}", stacklevel=2)
                    continue
                out.append(row)
        return out

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows())

    def done(self, keys: Sequence[str], statuses: Iterable[str] | None = None) -> set[tuple]:
        """The `keys` values (a tuple per row, None where missing) of the rows already stored,
        only those whose status is in `statuses` if given: the cases a resumed sweep skips."""
        if isinstance(keys, str):
            raise TypeError(f"keys must be a sequence of field names, not the string {keys!r}")
        statuses = None if statuses is None else set(statuses)
        return {tuple(_hashable(row.get(k)) for k in keys) for row in self.rows()
                if statuses is None or row.get("status") in statuses}

    def __len__(self) -> int:
        return len(self.rows())
