"""An append-only JSONL results store: one row (a JSON object) per line, each line flushed and
fsynced as it is appended, so a finished row survives a crash, Ctrl-C or SIGKILL. A line torn by
a kill mid-write is skipped on reading (with one warning per process), and the next append
starts a fresh line.

A store holds one table of rows (`TABLES`) of one schema version (`bench.rows.SCHEMA_VERSION`):
`Store(path, "runtime")` stamps `table` (and a missing `schema_version`) into each row it writes
and refuses a file that holds anything else (another table, another schema version, or lines
that are not JSON objects: a CSV, say) before its first read or write. `Store(path)` reads and
writes any table, stamps nothing, and still refuses files that are not JSON lines and rows of
another schema version. One writer at a time: `with store.lock(): ...`.

    store = Store("results/cpu/cpu_sweep.jsonl", "runtime")
    with store.lock():
        store.append(row)
"""

import contextlib
import difflib
import json
import math
import os
import warnings
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from .rows import SCHEMA_VERSION

# runtime: bench/sweep latency, memory and profile rows; flops: `ptdit flops --store`;
# complexity: `ptdit reproduce --store`; samples: `ptdit sample`'s OUT/samples.jsonl;
# metrics: fid / clip-score rows; attention: `ptdit attention`'s OUT/attention.jsonl
TABLES = ("runtime", "flops", "complexity", "samples", "metrics", "attention", "commands",
          "train", "study")

_warned: set[tuple[str, int, str]] = set()   # (store, line number, line) warned about


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


def hashable(value):
    """A JSON value as a hashable one, equal where the values are equal: lists -> tuples,
    objects -> frozensets of (key, value) pairs, recursively."""
    if isinstance(value, list):
        return tuple(hashable(v) for v in value)
    if isinstance(value, dict):
        return frozenset((k, hashable(v)) for k, v in value.items())
    return value


def row_key(row: dict, keys: Sequence[str]) -> tuple:
    """The `keys` values of `row` (None where missing), hashable: what names its case."""
    return tuple(hashable(row.get(k)) for k in keys)


def _last_line_torn(f) -> bool:
    """Whether the binary file `f` ends in a line without its newline."""
    end = f.seek(0, os.SEEK_END)
    if not end:
        return False
    f.seek(end - 1)
    return f.read(1) != b"\n"


def _what(row: dict) -> str:
    """What kind of rows `row` is, for messages: 'flops rows', 'rows of schema version 1'."""
    version, table = row.get("schema_version"), row.get("table")
    if version != SCHEMA_VERSION:
        return ("rows without a schema_version" if version is None
                else f"rows of schema version {version!r}")
    if table is None:
        return "rows without a table"
    return f"{table} rows" if isinstance(table, str) else f"rows of table {table!r}"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Store:
    """Rows in the JSONL file `path` (its folder is created at the first write), of one
    `table` (one of `TABLES`) if given."""

    def __init__(self, path: str | os.PathLike, table: str | None = None):
        self.path = Path(path)
        if table is not None and table not in TABLES:
            near = difflib.get_close_matches(str(table), TABLES, n=1)
            raise ValueError(f"unknown results table {table!r}; allowed: {', '.join(TABLES)}"
                             + (f" (nearest: {near[0]})" if near else ""))
        self.table = table
        if self.path.is_dir():
            raise ValueError(f"results store path {str(self.path)!r} is a folder; give a file "
                             "path, e.g. results/sweep.jsonl")
        self._checked = False

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r}, {self.table!r})"

    def _expected(self) -> str:
        return f"{self.table + ' ' if self.table else ''}rows of schema version {SCHEMA_VERSION}"

    def _stamped(self, row: dict) -> dict:
        """`row` as this store writes it; ValueError for a row of another table or schema."""
        version, table = row.get("schema_version", SCHEMA_VERSION), row.get("table")
        if version != SCHEMA_VERSION:
            raise ValueError(f"cannot append a row of schema version {version!r} to "
                             f"{self.path}, which takes {self._expected()}")
        if self.table is not None and table not in (None, self.table):
            raise ValueError(f"cannot append a row of table {table!r} to {self.path}, which "
                             f"takes {self._expected()}")
        if self.table is None:
            return row
        return {"schema_version": SCHEMA_VERSION, **row, "table": self.table}

    def append(self, row: dict) -> dict:
        """Writes `row` as one line and returns once it is on disk; returns the row as
        written (`table` stamped)."""
        return self.extend([row])[0]

    def extend(self, rows: Iterable[dict]) -> list[dict]:
        """Writes `rows`, a line each, and returns once they are on disk (one sync for all:
        for the many rows of one measurement); returns them as written (`table` stamped)."""
        rows = [self._stamped(row) for row in rows]
        if not rows:
            return rows
        if not self._checked:
            self.rows()
        text = "".join(json.dumps(_plain(row), allow_nan=False) + "\n" for row in rows)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a+b") as f:
            if _last_line_torn(f):
                text = "\n" + text  # leave the torn line on a line of its own
            f.write(text.encode())
            f.flush()
            os.fsync(f.fileno())
        self._checked = True
        return rows

    def rows(self) -> list[dict]:
        """Every readable row, in order; unreadable (torn) lines are skipped with a warning
        (once per line and process). ValueError if the file is not such a store."""
        if not self.path.exists():
            return []
        out, unreadable = [], []
        with open(self.path, encoding="utf-8", errors="replace") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if isinstance(row, dict):
                    out.append((number, row))
                else:
                    unreadable.append((number, line))
        self._check(out, unreadable)
        for number, line in unreadable:
            seen = (str(self.path.resolve()), number, line.rstrip("\n")[:80])
            if seen not in _warned:
                _warned.add(seen)
                warnings.warn(f"{self.path}:{number}: skipped an unreadable row (torn by a "
                              f"killed writer?): {line[:80]!r}", stacklevel=2)
        self._checked = True
        return [row for _, row in out]

    def check(self) -> "Store":
        """The store, once its file (if any) is found to hold its rows; ValueError otherwise
        (as on the first read or write): to refuse a wrong store before a long run."""
        self.rows()
        return self

    def _check(self, rows: list[tuple[int, dict]], unreadable: list[tuple[int, str]]) -> None:
        """ValueError unless the lines read are this store's rows (a lone torn first row
        aside)."""
        if not rows and unreadable:
            number, line = unreadable[0]
            torn_first = len(unreadable) == 1 and line.lstrip().startswith("{") \
                and not line.endswith("\n")
            if not torn_first:
                raise ValueError(f"{self.path} is not a ptdit results store (JSON lines): "
                                 f"line {number} is {line.rstrip()[:60]!r}")
        for number, row in rows:
            versioned = "schema_version" in row or self.table is not None
            if (versioned and row.get("schema_version") != SCHEMA_VERSION) or (
                    self.table is not None and row.get("table") != self.table):
                raise ValueError(f"{self.path} holds {_what(row)} (line {number}); expected "
                                 f"{self._expected()}: write to another store")

    def frame(self):
        """The rows as a pandas DataFrame."""
        import pandas as pd  # here: the CLI's parsers import this module, --help stays light

        return pd.DataFrame(self.rows())

    def done(self, keys: Sequence[str], statuses: Iterable[str] | None = None) -> set[tuple]:
        """The `keys` values (`row_key`: a hashable tuple per row, None where missing) of the
        rows already stored, only those whose status is in `statuses` if given: the cases a
        resumed sweep skips."""
        if isinstance(keys, str):
            raise TypeError(f"keys must be a sequence of field names, not the string {keys!r}")
        statuses = None if statuses is None else set(statuses)
        return {row_key(row, keys) for row in self.rows()
                if statuses is None or row.get("status") in statuses}

    def latest(self, keys: Sequence[str]) -> dict[tuple, dict]:
        """The last stored row of each `keys` value (`row_key`), in order of first appearance."""
        if isinstance(keys, str):
            raise TypeError(f"keys must be a sequence of field names, not the string {keys!r}")
        return {row_key(row, keys): row for row in self.rows()}

    @contextlib.contextmanager
    def lock(self) -> Iterator["Store"]:
        """Holds an advisory exclusive lock on the store for a writer session (fcntl.flock on
        `<store>.lock`, which names the holder's pid and start time); ValueError at once if
        another process holds it. Released on exit, and by the kernel if the process dies."""
        import fcntl

        path = self.path.with_name(self.path.name + ".lock")
        made = [p for p in reversed(path.parents) if not p.exists()]   # outermost first
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").split()
                os.close(fd)
                who = (f"pid {holder[0]} since {holder[1]}" if len(holder) == 2
                       else "another process")
                raise ValueError(f"{self.path} is being written by {who}: wait for it to "
                                 "finish, or write to another store") from None
            try:   # a holder that was releasing may have unlinked the file we locked
                same = os.fstat(fd).st_ino == os.stat(path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()} {_now()}\n".encode())
            yield self
        finally:
            path.unlink(missing_ok=True)   # before the unlock: a waiter re-checks the inode
            os.close(fd)
            for folder in reversed(made):  # innermost first; a folder that holds rows stays
                try:
                    folder.rmdir()
                except OSError:
                    break

    def __len__(self) -> int:
        return len(self.rows())


#################################################################################
#                              Output paths                                     #
#################################################################################

def _exists(path: Path) -> bool:
    try:
        path.stat()
    except (FileNotFoundError, NotADirectoryError):
        return False
    return True


def _creatable(path: Path, flag: str, what: str) -> None:
    """ValueError naming `flag` unless `path` (missing) can be created as `what`."""
    for parent in path.parents:
        if not _exists(parent):
            continue
        if not parent.is_dir():
            raise ValueError(f"{flag} {path}: cannot create the {what}: {parent} is a file, "
                             "not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path}: cannot create the {what}: the folder {parent} "
                             "is not writable (permission denied)")
        return


def check_writable(path: str | os.PathLike, flag: str) -> Path:
    """`path` if a file can be created or appended there; otherwise a one-line ValueError
    naming `flag` and why (under a file, in a folder that is not writable, a folder, a file
    that is not writable). Creates nothing."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{flag} {path} is a folder; give a file path, e.g. "
                         f"{path / 'rows.jsonl'}")
    if _exists(path):
        if not os.access(path, os.W_OK):
            raise ValueError(f"{flag} {path} is not writable (permission denied)")
        return path
    _creatable(path, flag, "file")
    return path


def check_writable_folder(path: str | os.PathLike, flag: str) -> Path:
    """`path` if it is, or can be created as, a folder that files can be written to;
    otherwise a one-line ValueError naming `flag` and why. Creates nothing."""
    path = Path(path)
    if _exists(path):
        if not path.is_dir():
            raise ValueError(f"{flag} {path} is a file; give a folder (it is created if missing)")
        if not os.access(path, os.W_OK | os.X_OK):
            raise ValueError(f"{flag} {path} is a folder that is not writable "
                             "(permission denied)")
        return path
    _creatable(path, flag, "folder")
    return path
