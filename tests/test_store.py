"""bench.store: JSONL round trip, resume keys, tables and schema versions, files that are not
stores, output paths checked before any work, one writer at a time, and no finished row lost
to a SIGKILL."""

import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

from bench.rows import SCHEMA_VERSION
from bench.store import Store, check_writable, check_writable_folder, hashable, row_key

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
    assert len(store) == 0 and store.frame().empty
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
    assert caught == []                                 # warned about once, above
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


def test_a_torn_line_is_warned_about_once_per_process(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"i": 0}\n{"i": 1, "pay\n{"i": 2}\n')
    rows, caught = read(Store(path))
    assert rows == [{"i": 0}, {"i": 2}] and len(caught) == 1 and f"{path}:2:" in caught[0]
    for store in (Store(path), Store(path, None), Store(tmp_path / "." / "rows.jsonl")):
        assert read(store) == (rows, [])                # the same line: no second warning
    with open(path, "a") as f:
        f.write('{"i": 3, "pa')                          # a new torn line is news
    rows, caught = read(Store(path))
    assert len(caught) == 1 and f"{path}:4:" in caught[0]


#################################################################################
#                      Tables, schema versions, foreign files                   #
#################################################################################

def test_an_unknown_table_is_refused_naming_the_nearest():
    with pytest.raises(ValueError, match=r"unknown results table 'runtimes'; allowed: runtime, "
                       r"flops, .*, study \(nearest: runtime\)"):
        Store("rows.jsonl", "runtimes")


def test_a_table_store_stamps_its_rows_and_refuses_rows_of_another_table(tmp_path):
    store = Store(tmp_path / "rows.jsonl", "runtime")
    row = {"schema_version": SCHEMA_VERSION, "model": "DiT-S/2", "ms": float(np.random.rand())}
    written = store.append(row)
    assert written == {**row, "table": "runtime"} and "table" not in row
    bare = store.append({"model": "PT-DiT/B"})          # schema_version stamped as well
    assert bare == {"schema_version": SCHEMA_VERSION, "model": "PT-DiT/B", "table": "runtime"}
    lines = store.path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [written, bare] == store.rows()
    with pytest.raises(ValueError, match=f"cannot append a row of table 'flops' to "
                       f"{re.escape(str(store.path))}, which takes runtime rows of schema "
                       f"version {SCHEMA_VERSION}"):
        store.append({**row, "table": "flops"})
    with pytest.raises(ValueError, match="cannot append a row of schema version 1 to"):
        store.extend([{"model": "x"}, {**row, "schema_version": 1}])
    assert store.path.read_text().splitlines() == lines  # nothing of a refused call written

    other = Store(store.path, "flops")
    for call in (other.rows, other.frame, lambda: other.done(["model"]), lambda: len(other),
                 lambda: other.append({"counter": "analytic"})):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == (f"{store.path} holds runtime rows (line 1); expected flops "
                                  f"rows of schema version {SCHEMA_VERSION}: write to another "
                                  "store")
    assert store.path.read_text().splitlines() == lines
    assert Store(store.path).rows() == [written, bare]   # no table: reads any table
    plain = Store(tmp_path / "plain.jsonl")
    assert plain.append({"i": 1}) == {"i": 1} and plain.rows() == [{"i": 1}]   # stamps nothing


@pytest.mark.parametrize("table", [None, "runtime"])
def test_rows_of_another_schema_version_are_refused(tmp_path, table):
    path = tmp_path / "old.jsonl"
    old = {"schema_version": 1, "model": "DiT-S/2", "measurement": "latency",
           "status": "error: RuntimeError: x"}
    text = json.dumps({"schema_version": SCHEMA_VERSION, "table": "runtime"}) + "\n" \
        + json.dumps(old) + "\n"
    path.write_text(text)
    store = Store(path, table)
    expected = f"{'runtime ' if table else ''}rows of schema version {SCHEMA_VERSION}"
    for call in (store.rows, lambda: store.done(["model"]), lambda: store.latest(["model"]),
                 lambda: store.append({"schema_version": SCHEMA_VERSION, "model": "x"})):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == (f"{path} holds rows of schema version 1 (line 2); expected "
                                  f"{expected}: write to another store")
    assert path.read_text() == text


def test_a_table_store_refuses_rows_without_a_version_or_a_table(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"model": "DiT-S/2"}\n')
    assert Store(path).rows() == [{"model": "DiT-S/2"}]  # any JSON rows without a table
    with pytest.raises(ValueError, match=r"holds rows without a schema_version \(line 1\)"):
        Store(path, "runtime").rows()
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "model": "DiT-S/2"}) + "\n")
    with pytest.raises(ValueError, match=r"holds rows without a table \(line 1\); expected "
                       "samples rows"):
        Store(path, "samples").rows()


FOREIGN = {
    "csv": (b"model,resolution,latency_ms\nDiT-S/2,256,1.5\n", "'model,resolution,latency_ms'"),
    "text": (b"just some notes\n{\"i\": 1\n", "'just some notes'"),
    "json array": (b"[1, 2, 3]\n", "'[1, 2, 3]'"),
    "binary": (np.random.default_rng(7).bytes(5000), None),
    "png": (b"\x89PNG\r\n\x1a\n" + np.random.default_rng(8).bytes(300), None),
}


@pytest.mark.parametrize("kind", FOREIGN)
@pytest.mark.parametrize("table", [None, "runtime"])
def test_a_file_that_is_not_json_lines_is_refused_and_left_alone(tmp_path, kind, table):
    content, shown = FOREIGN[kind]
    path = tmp_path / "given.jsonl"
    path.write_bytes(content)
    store = Store(path, table)
    for call in (store.rows, lambda: store.done(["model"]),
                 lambda: store.append({"schema_version": SCHEMA_VERSION, "model": "x"})):
        with pytest.raises(ValueError) as err:
            call()
        message = str(err.value)
        assert message.startswith(f"{path} is not a ptdit results store (JSON lines): line 1 is ")
        assert "\n" not in message and (shown is None or message.endswith(shown))
    assert path.read_bytes() == content


def test_empty_missing_and_lone_torn_row_stores_have_no_rows(tmp_path):
    assert Store(tmp_path / "missing.jsonl", "runtime").rows() == []
    for text in ("", "\n\n", "  \n"):
        (tmp_path / "empty.jsonl").write_text(text)
        assert Store(tmp_path / "empty.jsonl", "runtime").rows() == []
    torn = tmp_path / "torn.jsonl"        # a writer killed while writing its first row
    torn.write_text('{"schema_version": 2, "model": "DiT-')
    store = Store(torn, "runtime")
    rows, caught = read(store)
    assert rows == [] and len(caught) == 1 and f"{torn}:1:" in caught[0]
    row = store.append({"model": "DiT-S/2"})
    assert read(Store(torn, "runtime")) == ([row], [])


def test_the_folder_is_made_at_the_first_write_only(tmp_path):
    store = Store(tmp_path / "a" / "b" / "rows.jsonl", "runtime")
    assert store.rows() == [] and store.done(["model"]) == set() and len(store) == 0
    store.extend([])
    with pytest.raises(ValueError):
        store.append({"table": "flops"})
    assert list(tmp_path.iterdir()) == []
    store.append({"model": "DiT-S/2"})
    assert len(Store(store.path, "runtime")) == 1


def test_done_and_latest_take_key_values_of_any_json_type(tmp_path):
    store = Store(tmp_path / "rows.jsonl")
    rows = [{"model": "m", "overrides": {"depth": 2, "w": [1, {"x": None}]}, "status": "ok"},
            {"model": "m", "overrides": {"w": [1, {"x": None}], "depth": 2}, "status": "oom"},
            {"model": "m", "overrides": [["depth", 2], ["w", [1, {"x": None}]]],
             "status": "ok"},
            {"model": "m", "overrides": '{"depth": 2}', "status": "ok"},
            {"model": "m", "status": "error: x"}]
    store.extend(rows)
    done = store.done(["model", "overrides"])
    # the two objects are equal (keys in another order); the list of pairs and string are not
    assert len(done) == 4
    assert row_key(rows[0], ["model", "overrides"]) == row_key(rows[1], ["model", "overrides"])
    assert ("m", '{"depth": 2}') in done and ("m", None) in done
    assert store.done(["model", "overrides"], statuses=["oom"]) == {
        row_key(rows[1], ["model", "overrides"])}
    latest = store.latest(["model", "overrides"])
    assert list(latest.values()) == [rows[1], rows[2], rows[3], rows[4]]
    assert hash(hashable({"a": [1, {"b": 2}]})) == hash(hashable({"a": [1, {"b": 2}]}))


#################################################################################
#                   Output paths checked before any work                        #
#################################################################################

def test_a_path_under_a_file_is_refused_naming_the_flag(tmp_path):
    taken = tmp_path / "a_file"
    taken.write_text("not a folder")
    for check, path, flag in ((check_writable, taken / "rows.jsonl", "--store"),
                              (check_writable, taken / "x" / "rows.jsonl", "--out"),
                              (check_writable_folder, taken / "report", "--report")):
        with pytest.raises(ValueError) as err:
            check(path, flag)
        assert str(err.value) == (f"{flag} {path}: cannot create the "
                                  f"{'file' if check is check_writable else 'folder'}: "
                                  f"{taken} is a file, not a folder")
    assert sorted(tmp_path.iterdir()) == [taken] and taken.read_text() == "not a folder"


def test_a_folder_for_a_file_and_a_file_for_a_folder_are_refused(tmp_path):
    taken = tmp_path / "a_file"
    taken.write_text("x")
    with pytest.raises(ValueError, match=f"^--out {re.escape(str(tmp_path))} is a folder; "
                       "give a file path"):
        check_writable(tmp_path, "--out")
    with pytest.raises(ValueError, match=f"^--report {re.escape(str(taken))} is a file; give "
                       "a folder"):
        check_writable_folder(taken, "--report")


def test_writable_paths_pass_and_nothing_is_created(tmp_path):
    (tmp_path / "old.jsonl").write_text("")
    assert check_writable(tmp_path / "old.jsonl", "--store") == tmp_path / "old.jsonl"
    assert check_writable(tmp_path / "a" / "b" / "rows.jsonl", "--out") == \
        tmp_path / "a" / "b" / "rows.jsonl"
    assert check_writable_folder(tmp_path / "c" / "d", "--report") == tmp_path / "c" / "d"
    assert check_writable_folder(tmp_path, "--report") == tmp_path
    assert [p.name for p in tmp_path.iterdir()] == ["old.jsonl"]


def read_only_cases(tmp_path: Path) -> list:
    folder, existing = tmp_path / "ro", tmp_path / "ro" / "rows.jsonl"
    folder.mkdir()
    existing.write_text("")
    return [(check_writable, folder / "new.jsonl", "--store",
             f"--store {folder / 'new.jsonl'}: cannot create the file: the folder {folder} is "
             "not writable (permission denied)"),
            (check_writable, folder / "x" / "new.jsonl", "--out",
             f"--out {folder / 'x' / 'new.jsonl'}: cannot create the file: the folder "
             f"{folder} is not writable (permission denied)"),
            (check_writable_folder, folder / "report", "--report",
             f"--report {folder / 'report'}: cannot create the folder: the folder {folder} is "
             "not writable (permission denied)"),
            (check_writable_folder, folder, "--report",
             f"--report {folder} is a folder that is not writable (permission denied)"),
            (check_writable, existing, "--store",
             f"--store {existing} is not writable (permission denied)")]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="as root os.access calls every path writable, so a chmod'ed "
                    "read-only folder cannot be refused (the monkeypatched test below covers it)")
def test_read_only_folders_and_files_are_refused(tmp_path):
    cases = read_only_cases(tmp_path)
    (tmp_path / "ro" / "rows.jsonl").chmod(0o444)
    (tmp_path / "ro").chmod(0o555)
    try:
        for check, path, flag, message in cases:
            with pytest.raises(ValueError) as err:
                check(path, flag)
            assert str(err.value) == message
    finally:
        (tmp_path / "ro").chmod(0o755)


def test_read_only_folders_and_files_are_refused_by_what_os_access_says(tmp_path, monkeypatch):
    cases = read_only_cases(tmp_path)
    real = os.access
    ro = tmp_path / "ro"
    monkeypatch.setattr(os, "access", lambda p, mode: (Path(p) != ro and Path(p).parent != ro)
                        and real(p, mode))
    for check, path, flag, message in cases:
        with pytest.raises(ValueError) as err:
            check(path, flag)
        assert str(err.value) == message
    assert sorted(p.name for p in ro.iterdir()) == ["rows.jsonl"]


#################################################################################
#                              One writer at a time                             #
#################################################################################

HOLDER = """
import sys
from bench.store import Store
with Store(sys.argv[1], "runtime").lock():
    print("locked", flush=True)
    sys.stdin.readline()
print("released", flush=True)
sys.stdin.readline()
"""


@pytest.fixture
def start_holder():
    """Starts lock-holding subprocesses; every one is killed at teardown."""
    started = []

    def start(path: Path) -> subprocess.Popen:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        timer = threading.Timer(30, holder.kill)
        timer.start()
        started.append((holder, timer))
        assert holder.stdout.readline().strip() == "locked", holder.stderr.read()
        return holder

    yield start
    for holder, timer in started:
        timer.cancel()
        with holder:
            holder.kill()


def refusal(store: Store, pid: int) -> str:
    return (rf"^{re.escape(str(store.path))} is being written by pid {pid} since "
            r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: wait for it to finish, or write to another "
            r"store$")


def test_a_second_writer_is_refused_until_the_first_releases(tmp_path, start_holder):
    store = Store(tmp_path / "new" / "rows.jsonl", "runtime")
    holder = start_holder(store.path)
    lock_file = tmp_path / "new" / "rows.jsonl.lock"
    pid, since = lock_file.read_text().split()
    assert int(pid) == holder.pid and since.endswith("Z")
    for _ in range(2):                                   # refused each time, at once
        with pytest.raises(ValueError, match=refusal(store, holder.pid)):
            with store.lock():
                pytest.fail("locked twice")
    holder.stdin.write("\n")
    holder.stdin.flush()
    assert holder.stdout.readline().strip() == "released"
    assert not (tmp_path / "new").exists()               # nothing written: nothing left
    with store.lock() as locked:
        assert locked is store
        assert lock_file.read_text().split()[0] == str(os.getpid())
        store.append({"model": "DiT-S/2"})
        with pytest.raises(ValueError, match=refusal(store, os.getpid())):
            with Store(store.path).lock():               # one writer session, this one too
                pass
    assert not lock_file.exists() and len(store) == 1


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")
def test_a_killed_writers_lock_is_released(tmp_path, start_holder):
    store = Store(tmp_path / "rows.jsonl", "runtime")
    holder = start_holder(store.path)
    with pytest.raises(ValueError, match=refusal(store, holder.pid)):
        with store.lock():
            pass
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / "rows.jsonl.lock").exists()       # stale, but no longer locked
    with store.lock():
        store.append({"model": "DiT-S/2"})
    assert len(store) == 1


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
    assert caught == []                                 # warned about once, above


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
