"""bench.store: JSONL round trip, resume keys, and no finished row lost to a SIGKILL."""

import json
import math
import random
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from bench.store import Store

ROOT = Path(__file__).resolve().parents[1]
needs_sigkill = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")


def read(store: Store) -> tuple[list[dict], list[str]]:
    """The store's rows and the warnings reading them raised."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = store.rows()
    return out, [str(w.message) for w in caught]


def test_round_trip(tmp_path):
    store = Store(tmp_path / "a" / "b" / "rows.jsonl")
    assert store.path.parent.is_dir() and len(store) == 0 and store.frame().empty
    rows = [{"model": "DiT-XL/2", "resolution": 256, "ms": 1.5, "shape": [1, 4, 32, 32]},
            {"model": "PT-DiT/B", "resolution": 512, "ms": 2.0, "status": "oom", "extra": "é"}]
    for row in rows:
        store.append(row)
    assert store.rows() == rows
    assert len(store) == 2
    assert [json.loads(line) for line in store.path.read_text().splitlines()] == rows
    df = store.frame()
    assert list(df.columns) == ["model", "resolution", "ms", "shape", "status", "extra"]
    assert df["ms"].tolist() == [1.5, 2.0] and math.isnan(df["status"][0])


def test_nonfinite_and_numpy_values(tmp_path):
    store = Store(tmp_path / "rows.jsonl")
    store.append({"ms": math.nan, "mib": math.inf, "runs": [1.0, -math.inf],
                  "n": np.int64(3), "x": np.float32("nan"), "nested": {"y": math.nan}})
    assert "NaN" not in store.path.read_text() and "Infinity" not in store.path.read_text()
    assert store.rows() == [{"ms": None, "mib": None, "runs": [1.0, None], "n": 3, "x": None,
                             "nested": {"y": None}}]


def test_done(tmp_path):
    store = Store(tmp_path / "rows.jsonl")
    store.append({"model": "DiT-XL/2", "resolution": [256, 256], "status": "ok"})
    store.append({"model": "DiT-XL/2", "resolution": [512, 512], "status": "oom"})
    store.append({"model": "PT-DiT/B", "status": "error: ValueError: bad"})
    assert store.done(["model", "resolution"]) == {
        ("DiT-XL/2", (256, 256)), ("DiT-XL/2", (512, 512)), ("PT-DiT/B", None)}
    assert store.done(("model",), statuses=["ok", "oom"]) == {("DiT-XL/2",)}
    assert store.done(["model", "resolution"], statuses={"ok"}) == {("DiT-XL/2", (256, 256))}
    assert Store(tmp_path / "missing.jsonl").done(["model"]) == set()
    with pytest.raises(TypeError, match="sequence of field names"):
        store.done("model")


def test_folder_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="is a folder"):
        Store(tmp_path)


def test_torn_line_is_skipped_and_next_append_starts_a_line(tmp_path):
    store = Store(tmp_path / "rows.jsonl")
    store.append({"i": 0})
    with open(store.path, "ab") as f:
        f.write(b'{"i": 1, "pay')
    rows, caught = read(store)
    assert rows == [{"i": 0}]
    assert len(caught) == 1 and f"{store.path}:2:" in caught[0]
    store.append({"i": 2})
    rows, caught = read(store)
    assert rows == [{"i": 0}, {"i": 2}]
    assert len(caught) == 1 and f"{store.path}:2:" in caught[0]
    store.path.write_text('{"i": 0}\n[1, 2]\n\n{"i": 3}\n')  # not an object; a blank line
    rows, caught = read(store)
    assert rows == [{"i": 0}, {"i": 3}] and len(caught) == 1 and ":2:" in caught[0]


def test_extend_writes_many_rows_after_a_torn_line(tmp_path):
    store = Store(tmp_path / "rows.jsonl")
    store.extend([])                                    # nothing: no file, no line
    assert not store.path.exists()
    store.extend({"i": i, "x": float(np.random.rand())} for i in range(3))
    with open(store.path, "ab") as f:
        f.write(b'{"i": 3, "pay')
    store.extend([{"i": 4}, {"i": 5}])
    rows, caught = read(store)
    assert [r["i"] for r in rows] == [0, 1, 2, 4, 5] and len(caught) == 1


#################################################################################
#                         A writer killed with SIGKILL                          #
#################################################################################

WRITER = """
import sys, time
from bench.store import Store
store, full, torn = Store(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "torn"
i = 0
while not torn or i < full:
    store.append({"index": i, "payload": f"{i:06d}" * 340})
    print(i, flush=True)
    i += 1
if torn:
    with open(store.path, "ab") as f:
        f.write(b'{"index": %d, "payload": "00' % i)
    print("ready", flush=True)
    time.sleep(60)
"""


@pytest.fixture
def start_writer():
    """Starts writer subprocesses; a hung one is killed after 30 s, every one at teardown."""
    started = []

    def start(path: Path, full: int, torn: bool) -> subprocess.Popen:
        mode = "torn" if torn else "loop"
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path), str(full), mode],
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        timer = threading.Timer(30, writer.kill)
        timer.start()
        started.append((writer, timer))
        return writer

    yield start
    for writer, timer in started:
        timer.cancel()
        with writer:
            writer.kill()


def confirmed(writer: subprocess.Popen, until: str) -> list[int]:
    """The indices the writer printed (each after its append returned), up to `until`."""
    out = []
    for line in writer.stdout:
        if line.strip() == until:
            return out
        out.append(int(line))
    raise AssertionError(f"writer ended early: {writer.wait()} {writer.stderr.read()}")


def kill(writer: subprocess.Popen) -> None:
    writer.send_signal(signal.SIGKILL)
    assert writer.wait() == -signal.SIGKILL


def intact(row: dict) -> bool:
    return row == {"index": row["index"], "payload": f"{row['index']:06d}" * 340}


@needs_sigkill
def test_killed_after_a_torn_line(tmp_path, start_writer):
    store = Store(tmp_path / "rows.jsonl")
    writer = start_writer(store.path, full=5, torn=True)
    assert confirmed(writer, until="ready") == list(range(5))
    kill(writer)
    rows, caught = read(store)
    assert [r["index"] for r in rows] == list(range(5)) and all(map(intact, rows))
    assert len(caught) == 1 and f"{store.path}:6:" in caught[0]
    store.append({"index": 99, "payload": f"{99:06d}" * 340})
    rows, caught = read(store)
    assert [r["index"] for r in rows] == [0, 1, 2, 3, 4, 99] and all(map(intact, rows))
    assert len(caught) == 1


@needs_sigkill
def test_killed_at_a_random_moment(tmp_path, start_writer):
    store = Store(tmp_path / "rows.jsonl")
    writer = start_writer(store.path, full=0, torn=False)
    seen = []
    for line in writer.stdout:
        seen.append(int(line))
        if len(seen) == 10:
            break
    time.sleep(random.uniform(0, 0.05))
    kill(writer)
    seen += [int(line) for line in writer.stdout.read().split()]
    rows, caught = read(store)
    indices = [r["index"] for r in rows]
    assert all(map(intact, rows))
    # every confirmed row is there; at most the one being appended at the kill follows it
    assert indices[:len(seen)] == seen == list(range(len(seen)))
    assert indices in (seen, seen + [len(seen)])
    assert len(caught) <= 1 and all(f"{store.path}:{len(rows) + 1}:" in w for w in caught)
    store.append({"index": -1, "payload": f"{-1:06d}" * 340})
    after, _ = read(store)
    assert after == rows + [{"index": -1, "payload": f"{-1:06d}" * 340}]
