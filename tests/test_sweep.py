"""bench.sweep and its CLI: sweep files validated before anything runs (the bad key named), one
row per case after a SIGKILL and a restart, out-of-memory cases as rows with the larger ones
skipped (naming the case that ran out), the shipped sweep files, and the GPU suite's dry run."""

import collections
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import bench.rows
from bench import latency, sweep
from bench.rows import SCHEMA_VERSION, check_row
from bench.store import Store
from bench.sweep import EXIT_RULE
from ptdit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = 'overrides = { depth = 1, hidden_size = 64, num_heads = 4 }\n'


pytestmark = pytest.mark.usefixtures("one_thread")


def grid_of(text: str, tmp_path: Path) -> list[sweep.Job]:
    path = tmp_path / "sweep.toml"
    path.write_text(text)
    return sweep.plan(sweep.grids(sweep.load(path), str(path)))


def keys(rows) -> collections.Counter:
    return collections.Counter(tuple(row.get(k) for k in sweep.KEY) for row in rows)


#################################################################################
#                             Validation                                        #
#################################################################################

@pytest.mark.parametrize("text, message", [
    ('models = ["DiT-S/2"]\nresolutions = [256]\ndtypes = ["float32"]\n',
     "unknown key 'dtypes' (did you mean 'dtype'?)"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\ndtype = "fp8"\n',
     "key 'dtype': 'fp8' is not allowed; allowed: float32, bfloat16, float16"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\nmode = ["forward", "sample"]\n',
     "key 'mode': 'sample' is not allowed; allowed: forward, cfg, train"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\nmeasure = "speed"\n', "key 'measure'"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\nrepeats = 0\n', "key 'repeats': 0"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\nrepeats = 1e20\n',
     "key 'repeats': 1e+20 is not allowed; allowed: a positive 64-bit integer"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\nrepeats = 2.0\n', "key 'repeats': 2.0 is not"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\nrepeats = true\n', "key 'repeats': True is"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\nrepeats = 100000000000000000000\n',
     "key 'repeats': 100000000000000000000 is not allowed"),    # beyond TOML's 64-bit range
    ('models = ["DiT-S/2"]\nresolutions = [256]\nwarmup = 0.5\n', "key 'warmup': 0.5 is not"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\nwarmup = 9223372036854775808\n',
     "key 'warmup': 9223372036854775808 is not"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\ntext_tokens = 8.0\n', "key 'text_tokens'"),
    ('models = ["DiT-S/2"]\nresolutions = [256.0]\n', "key 'resolutions': 256.0 is not"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\nframes = [true]\n', "key 'frames': True"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\nbatch = [1, 1e20]\n', "key 'batch': 1e+20"),
    ('models = ["DiT-S/2"]\nresolutions = []\n', "key 'resolutions' is an empty list"),
    ('resolutions = [256]\n', "key 'models' is required"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\n[[grid]]\nmode = "train"\n[[grid]]\nmoda = 1\n',
     "[[grid]] 2: unknown key 'moda'"),
    ('models = ["DiT-S/2"]\nresolutions = [256, 250]\n',
     "resolution 250 px is not a multiple of the VAE factor 8"),
    ('models = ["DiT-S/3"]\nresolutions = [256]\n', "unknown model 'DiT-S/3'"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\noverrides = { dept = 2 }\n', "dept"),
    ('models = ["DiT-S/2"]\nresolutions = [256]\ncuda_graphs = true\n',
     "cuda_graphs needs device 'cuda'"),
])
def test_a_bad_sweep_file_names_the_bad_key_before_anything_runs(text, message, tmp_path,
                                                                  monkeypatch):
    monkeypatch.setattr(latency, "prepare", lambda case: pytest.fail("measured"))
    with pytest.raises(ValueError, match="sweep.toml") as err:
        grid_of(text, tmp_path)
    assert message in str(err.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_a_cuda_sweep_without_a_gpu_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(ValueError, match="CUDA is not available"):
        grid_of('models = ["DiT-S/2"]\nresolutions = [256]\ndevice = "cuda"\n', tmp_path)


def test_plan_orders_by_size_drops_duplicates_and_keeps_memory_eager(tmp_path):
    jobs = grid_of(TINY + 'models = ["DiT-S/2"]\nresolutions = [256, 128]\nbatch = [2, 1]\n'
                   'measure = ["latency", "memory"]\ncompile = [false, true]\n[[grid]]\n'
                   '[[grid]]\nresolutions = [128]\n', tmp_path)
    latency_jobs = [j for j in jobs if j.measurement == "latency"]
    memory_jobs = [j for j in jobs if j.measurement == "memory"]
    assert len(latency_jobs) == 8 and len(memory_jobs) == 4     # 2 res x 2 batch (x 2 compile)
    assert not any(j.case.compile for j in memory_jobs)
    for group in ({False}, {True}):
        sizes = [j.case.size for j in jobs if {j.case.compile} == group]
        assert sizes == sorted(sizes)
    assert len({j.key() for j in jobs}) == len(jobs)


#################################################################################
#                         Resume, out of memory                                 #
#################################################################################

KILL_SWEEP = TINY + """models = ["DiT-S/2", "PT-DiT/XL"]
resolutions = [128]
batch = [1, 2]
mode = ["forward", "cfg"]
repeats = 150   # each case over 0.1 s on an idle machine: the test, polling every 10 ms,
                # stops the sweep rows before its last
warmup = 0
text_tokens = 8
"""


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="POSIX only")
def test_a_sweep_interrupted_then_killed_midway_and_restarted_has_one_row_per_case(tmp_path):
    (tmp_path / "kill.toml").write_text(KILL_SWEEP)
    jobs = grid_of(KILL_SWEEP, tmp_path)      # planned on one thread, as the child runs
    store = Store(tmp_path / "rows.jsonl")
    command = [sys.executable, "-m", "ptdit.cli", "sweep", str(tmp_path / "kill.toml"),
               "--out", str(store.path), "--threads", "1"]

    def stop_after(rows: int, sig: signal.Signals) -> tuple[int, str]:
        """Runs the sweep until the store holds `rows` rows, then sends `sig`."""
        # SIGINT as a terminal delivers it, even when this test runs in the background of a
        # non-interactive shell (which starts its children with SIGINT ignored)
        child = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE, text=True,
                                 preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 40
        while child.poll() is None and len(store) < rows and time.monotonic() < deadline:
            time.sleep(0.01)
        child.send_signal(sig)
        child.wait(timeout=30)
        assert rows <= len(store) < len(jobs), f"the sweep was not stopped mid-way by {sig!r}"
        return child.returncode, child.stderr.read()
    code, err = stop_after(2, signal.SIGINT)               # Ctrl-C
    assert code == 130 and "run the same command again to resume" in err
    assert stop_after(len(store) + 2, signal.SIGKILL)[0] == -signal.SIGKILL
    subprocess.run(command, cwd=ROOT, check=True, capture_output=True, timeout=60)
    rows = store.rows()
    assert keys(rows) == collections.Counter(j.key() for j in jobs)      # each exactly once
    assert all(row["status"] == "ok" for row in rows)


OOM_SWEEP = TINY + """models = ["DiT-S/2", "PT-DiT/XL"]
resolutions = [512, 128, 384, 256]
repeats = 1
warmup = 0
text_tokens = 8
"""


def oom_above(tokens: int, monkeypatch) -> list[str]:
    """latency.prepare raising torch.OutOfMemoryError above `tokens` × batch; the labels of
    the cases it was asked to build."""
    real, asked = latency.prepare, []

    def prepare(case):
        asked.append(case.label)
        if case.size > tokens:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(case)
    monkeypatch.setattr(latency, "prepare", prepare)
    return asked


def test_an_oom_case_is_a_row_and_the_larger_cases_are_skipped(tmp_path, monkeypatch):
    asked = oom_above(300, monkeypatch)                 # 384 px = 576 tokens runs out
    jobs = grid_of(OOM_SWEEP, tmp_path)
    store = Store(tmp_path / "rows.jsonl")
    rows = list(sweep.run(jobs, store))
    assert rows == store.rows()
    for row in rows:
        check_row(row)
    by_case = {(r["model"], r["resolution"]): r["status"] for r in rows}
    for model in ("DiT-S/2", "PT-DiT/XL"):
        assert by_case[model, 128] == by_case[model, 256] == "ok"
        assert by_case[model, 384] == "oom"
        assert by_case[model, 512].startswith(f"skipped: the latency case {model} at 384 px")
        assert "ran out of memory" in by_case[model, 512] and "1024 > 576" in by_case[model, 512]
    assert len(asked) == 6                              # the skipped cases were never built

    # a restart that finds the oom row (but not the skips) still skips the larger case
    kept = [r for r in rows if r["resolution"] != 512]
    resumed = Store(tmp_path / "resumed.jsonl")
    for row in kept:
        resumed.append(row)
    asked.clear()
    again = list(sweep.run(jobs, resumed))
    assert asked == [] and [r["resolution"] for r in again] == [512, 512]
    assert all(r["status"].startswith("skipped: ") for r in again)
    assert keys(resumed.rows()) == collections.Counter(j.key() for j in jobs)


def test_memory_rows_share_the_oom_limit(tmp_path, monkeypatch):
    oom_above(300, monkeypatch)
    jobs = grid_of(OOM_SWEEP.replace('"DiT-S/2", "PT-DiT/XL"', '"DiT-S/2"')
                   .replace("[512, 128, 384, 256]", "[384, 512]")
                   + 'measure = ["latency", "memory"]\n', tmp_path)
    statuses = [(r["measurement"], r["resolution"], r["status"][:8]) for r in sweep.run(jobs)]
    assert statuses[0] == ("latency", 384, "oom")
    assert ("memory", 512, "skipped:") in statuses and ("latency", 512, "skipped:") in statuses


def test_a_profile_job_stores_its_rows_once_and_a_rerun_reads_them_back(tmp_path):
    jobs = grid_of('models = ["DiT-S/2"]\nresolutions = [128]\nmeasure = "profile"\n'
                   'repeats = 1\nwarmup = 0\n' + TINY, tmp_path)
    store = Store(tmp_path / "s.jsonl")
    rows = list(sweep.run(jobs, store))
    assert {r["level"] for r in rows} == {"category", "op"} and len(store) == len(rows)
    for row in rows:
        check_row(row)
    assert list(sweep.run(jobs, store)) == []                      # done: nothing profiled
    assert sweep.stored_rows(jobs, store) == store.rows()          # one run: all its rows


#################################################################################
#                         Shipped sweep files                                   #
#################################################################################

def test_the_cpu_sweep_measures_the_reports_pairs_at_one_depth():
    jobs = sweep.plan(sweep.grids(sweep.load(ROOT / "bench/sweeps/cpu.toml"), "cpu.toml"))
    fields = [j.fields() for j in jobs]
    assert {f["device"].split()[0] for f in fields} == {"cpu"}
    assert {f["dtype"] for f in fields} == {"float32"}
    assert {f["mode"] for f in fields} == {"forward", "cfg", "train"}
    assert {f["measurement"] for f in fields} == {"latency", "memory", "profile"}
    assert max(f["latent_frames"] for f in fields) == 16
    assert {f["resolution"] for f in fields} == {256, 512, 1024}
    assert {"DiT-S/2", "DiT-B/2"} <= {f["model"] for f in fields}

    def cases(model):
        return {(f["overrides"], f["resolution"], f["latent_frames"], f["mode"],
                 f["measurement"]) for f in fields if f["model"] == model}
    for ptdit, baseline in (("PT-DiT/XL", "PixArt-XL/2"), ("PT-DiT/L", "PixArt-XL/2"),
                            ("PT-DiT/B", "DiT-B/2")):
        shared = cases(ptdit) & cases(baseline)
        assert {(r, m) for _, r, frames, m, _ in shared if frames == 1} >= {
            (256, "forward"), (512, "forward"), (1024, "forward"), (256, "cfg")}


def test_the_gpu_sweep_is_valid_for_a_gpu(monkeypatch):
    monkeypatch.setattr(latency, "_cuda_available", lambda: True)
    monkeypatch.setattr(bench.rows, "_cuda_name", lambda index: "NVIDIA H100 80GB HBM3")
    jobs = sweep.plan(sweep.grids(sweep.load(ROOT / "bench/sweeps/gpu.toml"), "gpu.toml"))
    fields = [j.fields() for j in jobs]
    assert {f["device"] for f in fields} == {"NVIDIA H100 80GB HBM3"}
    assert sweep.device_slug(jobs) == "nvidia-h100-80gb-hbm3"
    assert {f["model"] for f in fields} == {"PT-DiT/XL", "PT-DiT/L", "PixArt-XL/2", "DiT-XL/2"}
    assert {f["dtype"] for f in fields} == {"bfloat16"}
    assert {f["mode"] for f in fields} == {"forward", "train"}
    assert {f["resolution"] for f in fields} == {256, 512, 1024, 2048}
    assert {f["latent_frames"] for f in fields} == {1, 16, 32, 48}
    assert any(f["compile"] for f in fields) and any(f["cuda_graphs"] for f in fields)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bash and /proc")
def test_the_gpu_suite_dry_run_runs_the_same_grid_tiny_on_the_cpu(tmp_path):
    done = subprocess.run(["bash", str(ROOT / "bench/gpu_suite.sh"), "--dry-run"], cwd=ROOT,
                          env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    (store_path,) = tmp_path.glob("*/cpu-*/store.jsonl")
    rows = Store(store_path).rows()
    gpu_grid = sweep.grids(sweep.load(ROOT / "bench/sweeps/gpu.toml"), "gpu.toml")
    jobs = sweep.plan(sweep.smoke(gpu_grid))
    assert keys(rows) == collections.Counter(j.key() for j in jobs)
    assert [r["status"] for r in rows if r["status"] != "ok"] == []
    assert {r["dtype"] for r in rows} == {"bfloat16"} and {r["n"] for r in rows
                                                           if "n" in r} == {1}
    assert (store_path.parent / "runtime.md").is_file()
    assert str(store_path) in done.stdout


#################################################################################
#                                  CLI                                          #
#################################################################################

BENCH = ["--model", "DiT-S/2", "--resolution", "128", "--override", "depth=1", "hidden_size=64",
         "num_heads=4", "--repeats", "2", "--warmup", "0"]


def test_bench_prints_rows_and_resumes_from_its_store(tmp_path, capsys, monkeypatch):
    store = tmp_path / "rows.jsonl"
    assert main(["bench", "latency", *BENCH, "--mode", "forward", "cfg", "--format", "json",
                 "--store", str(store)]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [(r["mode"], r["forward_batch"]) for r in rows] == [("forward", 1), ("cfg", 2)]
    assert keys(rows) == keys(Store(store).rows())
    medians = [r["latency_ms_median"] for r in rows]
    assert medians == pytest.approx([r["latency_ms_median"] for r in Store(store).rows()])

    def broken(case):
        raise RuntimeError("measured again")
    monkeypatch.setattr(latency, "prepare", broken)
    assert main(["bench", "latency", *BENCH, "--mode", "cfg", "forward", "--format", "json",
                 "--store", str(store)]) == 0
    again = json.loads(capsys.readouterr().out)                     # in the order asked for
    assert [again[1], again[0]] == rows                             # nothing measured again
    assert main(["bench", "latency", *BENCH]) == 1                  # without a store it is
    assert "error: RuntimeError: measured again" in capsys.readouterr().out


def test_bench_errors_are_messages(capsys):
    assert main(["bench", "latency", *BENCH, "--override", "dept=2"]) == 2
    assert "dept" in capsys.readouterr().err


def test_sweep_dry_run_lists_the_cases_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(latency, "prepare", lambda case: pytest.fail("measured"))
    (tmp_path / "s.toml").write_text(OOM_SWEEP)
    out = tmp_path / "none" / "rows.jsonl"
    assert main(["sweep", str(tmp_path / "s.toml"), "--out", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "8 cases, 0 already in" in text and "TFLOP" in text and "PT-DiT/XL" in text
    assert not out.parent.exists()


def test_report_calls_write_report_on_the_stores_rows(tmp_path, capsys, monkeypatch):
    store = Store(tmp_path / "rows.jsonl", "runtime")
    store.append({"measurement": "latency", "model": "DiT-S/2", "status": "ok"})
    calls = []

    def write_report(frame, out_dir):
        calls.append((frame.to_dict("records"), out_dir))
        return {"runtime.md": Path(out_dir) / "runtime.md"}
    import bench.runtime_report
    monkeypatch.setattr(bench.runtime_report, "write_report", write_report)
    assert main(["report", str(store.path), "--out", str(tmp_path / "report")]) == 0
    assert calls == [(store.rows(), str(tmp_path / "report"))]
    assert "runtime.md" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert "no results store" in capsys.readouterr().err


#################################################################################
#                 Stores, output paths, one writer, failed cases                #
#################################################################################

def no_measuring(monkeypatch) -> None:
    monkeypatch.setattr(latency, "prepare", lambda case: pytest.fail("measured"))


def sweep_file(tmp_path: Path, text: str = OOM_SWEEP) -> str:
    path = tmp_path / "s.toml"
    path.write_text(text)
    return str(path)


def one_line_error(capsys, command: str) -> str:
    """The CLI's error message (one line on stderr), without its 'ptdit CMD: error: '."""
    err = capsys.readouterr().err
    prefix = f"ptdit {command}: error: "
    assert err.startswith(prefix) and err.count("\n") == 1, err
    return err[len(prefix):-1]


def test_report_refuses_stores_that_hold_no_runtime_rows(tmp_path, capsys):
    flops = tmp_path / "flops.jsonl"
    assert main(["flops", "--model", "DiT-S/8", "--resolution", "256", "--store",
                 str(flops)]) == 0
    binary = tmp_path / "rows.bin"
    binary.write_bytes(np.random.default_rng(9).bytes(3000).replace(b"\n", b"."))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    capsys.readouterr()
    out = tmp_path / "report"
    for store, message in (
            (flops, f"{flops} holds flops rows (line 1); expected runtime rows of schema "
                    f"version {SCHEMA_VERSION}: write to another store"),
            (binary, f"{binary} is not a ptdit results store (JSON lines): line 1 is "),
            (empty, f"no rows in {empty}: nothing to report")):
        assert main(["report", str(store), "--out", str(out)]) == 2
        assert one_line_error(capsys, "report").startswith(message)
    assert not out.exists()


OLD_ROW = {"schema_version": 1, "measurement": "latency", "model": "DiT-S/2", "status": "error: x"}


@pytest.mark.parametrize("content, message", [
    (b"model,resolution\nDiT-S/2,128\n",
     "is not a ptdit results store (JSON lines): line 1 is 'model,resolution'"),
    ((json.dumps(OLD_ROW) + "\n").encode(), "holds rows of schema version 1 (line 1)"),
    ((json.dumps({"schema_version": bench.rows.SCHEMA_VERSION, "table": "flops"}) + "\n"
      ).encode(), "holds flops rows (line 1)"),
], ids=["csv", "schema 1", "flops"])
def test_sweep_and_bench_refuse_a_store_of_other_rows_and_leave_it_alone(
        content, message, tmp_path, capsys, monkeypatch):
    no_measuring(monkeypatch)
    store = tmp_path / "given.jsonl"
    store.write_bytes(content)
    for argv in (["sweep", sweep_file(tmp_path), "--out", str(store)],
                 ["sweep", sweep_file(tmp_path), "--out", str(store), "--dry-run"],
                 ["bench", "latency", *BENCH, "--store", str(store)]):
        assert main(argv) == 2
        assert message in one_line_error(capsys, argv[0])
    assert store.read_bytes() == content


HOLDER = """
import sys
from bench.store import Store
with Store(sys.argv[1], sys.argv[2]).lock():
    print("locked", flush=True)
    sys.stdin.readline()
"""


@pytest.fixture
def hold():
    """hold(path, table): another process takes the store's lock and keeps it (till the
    test ends); returns its pid."""
    holders = []

    def start(path: Path, table: str) -> int:
        holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(path), table], cwd=ROOT,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        holders.append(holder)
        assert holder.stdout.readline().strip() == "locked"
        return holder.pid

    yield start
    for holder in holders:
        with holder:
            holder.kill()


def test_a_second_writer_is_refused_before_anything_is_measured(tmp_path, capsys, monkeypatch,
                                                                hold):
    no_measuring(monkeypatch)
    runtime, flops = tmp_path / "runtime.jsonl", tmp_path / "flops.jsonl"
    pids = {runtime: hold(runtime, "runtime"), flops: hold(flops, "flops")}
    for argv, path in (
            (["sweep", sweep_file(tmp_path), "--out", str(runtime)], runtime),
            (["bench", "latency", *BENCH, "--store", str(runtime)], runtime),
            (["flops", "--model", "DiT-S/8", "--resolution", "256", "--store", str(flops)],
             flops)):
        assert main(argv) == 2
        assert re.fullmatch(rf"{re.escape(str(path))} is being written by pid {pids[path]} "
                            r"since \d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ: wait for it to finish, or "
                            "write to another store", one_line_error(capsys, argv[0]))
    assert not runtime.exists() and not flops.exists()
    assert main(["sweep", sweep_file(tmp_path), "--out", str(runtime), "--dry-run"]) == 0


def test_output_paths_under_a_file_fail_before_anything_is_measured(tmp_path, capsys,
                                                                    monkeypatch):
    no_measuring(monkeypatch)
    taken = tmp_path / "a_file"
    taken.write_text("x")
    runtime = Store(tmp_path / "runtime.jsonl", "runtime")
    runtime.append({"measurement": "latency", "model": "DiT-S/2", "status": "ok"})
    toml, fine = sweep_file(tmp_path), str(tmp_path / "new.jsonl")
    for argv, flag in (
            (["sweep", toml, "--out", str(taken / "rows.jsonl")], "--out"),
            (["sweep", toml, "--out", str(taken / "x" / "rows.jsonl"), "--dry-run"], "--out"),
            (["sweep", toml, "--out", str(tmp_path)], "--out"),
            (["sweep", toml, "--out", fine, "--report", str(taken / "report")], "--report"),
            (["sweep", toml, "--out", fine, "--report", str(taken)], "--report"),
            (["bench", "latency", *BENCH, "--store", str(taken / "rows.jsonl")], "--store"),
            (["flops", "--model", "DiT-S/8", "--resolution", "256", "--store",
              str(taken / "flops.jsonl")], "--store"),
            (["reproduce", "--out", str(tmp_path / "complexity"), "--store",
              str(taken / "costs.jsonl")], "--store"),
            (["report", str(runtime.path), "--out", str(taken / "report")], "--out")):
        assert main(argv) == 2
        message = one_line_error(capsys, argv[0])
        assert message.startswith(f"{flag} ") and ("a_file is a file" in message
                                                   or "is a folder" in message), message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "runtime.jsonl", "s.toml"]


@pytest.mark.skipif(os.geteuid() == 0, reason="as root os.access calls a chmod 555 folder "
                    "writable, so there is no read-only folder to refuse (tests/test_store.py "
                    "checks the refusal through os.access)")
def test_output_paths_in_a_read_only_folder_fail_before_anything_is_measured(
        tmp_path, capsys, monkeypatch):
    no_measuring(monkeypatch)
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        for argv, flag in (
                (["sweep", sweep_file(tmp_path), "--out", str(folder / "rows.jsonl")], "--out"),
                (["sweep", sweep_file(tmp_path), "--out", str(tmp_path / "rows.jsonl"),
                  "--report", str(folder / "report")], "--report"),
                (["bench", "latency", *BENCH, "--store", str(folder / "s" / "rows.jsonl")],
                 "--store")):
            assert main(argv) == 2
            message = one_line_error(capsys, argv[0])
            assert message.startswith(f"{flag} ") and "not writable" in message
        assert list(folder.iterdir()) == [] and not (tmp_path / "rows.jsonl").exists()
    finally:
        folder.chmod(0o755)


def flaky(monkeypatch, resolutions: set[int]) -> list[str]:
    """oom_above(300) and, for the cases at `resolutions` (emptied to heal them), a
    RuntimeError; the labels of the cases asked for."""
    asked = oom_above(300, monkeypatch)
    oom = latency.prepare

    def prepare(case):
        if case.work.resolution in resolutions:
            asked.append(case.label)
            raise RuntimeError("flaky")
        return oom(case)
    monkeypatch.setattr(latency, "prepare", prepare)
    return asked


def test_failed_cases_are_measured_again_only_with_retry_failed(tmp_path, capsys, monkeypatch):
    broken = {256}
    asked = flaky(monkeypatch, broken)
    toml, out = sweep_file(tmp_path), str(tmp_path / "rows.jsonl")
    assert main(["sweep", toml, "--out", out]) == 1                 # 2 error rows
    assert "2 ok, 2 oom, 2 skipped, 2 error;" in capsys.readouterr().out
    statuses = {(r["model"], r["resolution"]): r["status"] for r in Store(out).rows()}
    assert statuses["DiT-S/2", 256] == "error: RuntimeError: flaky"
    assert statuses["DiT-S/2", 384] == "oom" and statuses["PT-DiT/XL", 512].startswith("skipped")

    asked.clear()
    assert main(["sweep", toml, "--out", out]) == 1                 # failed rows stay failed
    text = capsys.readouterr().out
    assert asked == [] and "0 measured now, 8 already stored" in text
    assert "; 2 failed cases not retried (--retry-failed measures them again);" in text
    assert main(["sweep", toml, "--out", out, "--dry-run", "--retry-failed"]) == 0
    assert "8 cases, 6 already in" in capsys.readouterr().out

    broken.clear()                                                  # healed
    assert main(["sweep", toml, "--out", out, "--retry-failed"]) == 0
    text = capsys.readouterr().out
    assert sorted(asked) == sorted(["DiT-S/2 256px b1 forward float32",
                                    "PT-DiT/XL 256px b1 forward float32"])   # not oom, skipped
    assert "2 measured now" in text and "4 ok, 2 oom, 2 skipped, 0 error" in text
    assert "not retried" not in text
    rows = Store(out, "runtime").rows()
    assert len(rows) == 10 and [r["status"] for r in rows[-2:]] == ["ok", "ok"]
    asked.clear()
    assert main(["sweep", toml, "--out", out, "--retry-failed"]) == 0 and asked == []


def test_bench_retry_failed(tmp_path, capsys, monkeypatch):
    real, store = latency.prepare, str(tmp_path / "rows.jsonl")

    def broken(case):
        raise RuntimeError("flaky")
    monkeypatch.setattr(latency, "prepare", broken)
    assert main(["bench", "latency", *BENCH, "--store", store]) == 1
    assert main(["bench", "latency", *BENCH, "--store", store]) == 1    # not measured again
    assert len(Store(store).rows()) == 1
    monkeypatch.setattr(latency, "prepare", real)
    capsys.readouterr()
    assert main(["bench", "latency", *BENCH, "--store", store, "--retry-failed",
                 "--format", "json"]) == 0
    assert [r["status"] for r in json.loads(capsys.readouterr().out)] == ["ok"]
    assert [r["status"] for r in Store(store).rows()] == ["error: RuntimeError: flaky", "ok"]
    assert main(["bench", "latency", *BENCH, "--retry-failed"]) == 2
    assert one_line_error(capsys, "bench").startswith("--retry-failed measures the failed "
                                                      "cases of --store again; give --store")


def test_stored_key_values_of_any_json_type_are_read(tmp_path, capsys, monkeypatch):
    store = Store(tmp_path / "rows.jsonl", "runtime")
    hand = {"measurement": "latency", "model": "DiT-S/2", "resolution": 128,
            "overrides": {"depth": 1, "hidden_size": 64, "num_heads": 4}, "window": [1, 2, 2],
            "latent_frames": 1, "batch": 1, "tokens": 64, "forward_batch": 1}
    store.extend([{**hand, "status": "ok"}, {**hand, "status": "oom", "batch": [1, 2]},
                  {"measurement": "latency", "model": "DiT-S/2", "status": "oom",
                   "overrides": {"depth": 1}, "tokens": [64], "forward_batch": None}])
    toml = sweep_file(tmp_path, TINY + 'models = ["DiT-S/2"]\nresolutions = [128]\n'
                                       "repeats = 1\nwarmup = 0\n")
    assert main(["sweep", toml, "--out", str(store.path), "--dry-run"]) == 0
    assert "1 cases, 0 already in" in capsys.readouterr().out   # a dict is not the JSON text
    assert main(["sweep", toml, "--out", str(store.path)]) == 0
    assert "1 measured now" in capsys.readouterr().out
    no_measuring(monkeypatch)                                     # the same case: stored
    assert main(["bench", "latency", *BENCH, "--store", str(store.path)]) == 0
    assert [r["status"] for r in store.rows()] == ["ok", "oom", "oom", "ok"]
    assert list(sweep.run(grid_of(TINY + 'models = ["DiT-S/2"]\nresolutions = [128]\n',
                                  tmp_path), store, retry_failed=True)) == []


def test_oom_and_skipped_rows_exit_0_and_error_rows_exit_1(tmp_path, capsys, monkeypatch):
    oom_above(300, monkeypatch)                                   # 384 px runs out
    argv = ["bench", "latency", *BENCH, "--resolution", "128", "384", "512", "--format", "json"]
    assert main(argv) == 0
    assert [r["status"][:8] for r in json.loads(capsys.readouterr().out)] == [
        "ok", "oom", "skipped:"]
    assert main([*argv, "--store", str(tmp_path / "rows.jsonl")]) == 0
    assert main(["sweep", sweep_file(tmp_path), "--out", str(tmp_path / "sweep.jsonl")]) == 0

    def broken(case):
        raise RuntimeError("broken")
    monkeypatch.setattr(latency, "prepare", broken)
    assert main(argv) == 1


@pytest.mark.parametrize("command", ["flops", "bench", "sweep"])
def test_the_exit_rule_is_in_each_commands_help(command, capsys):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert " ".join(EXIT_RULE.split()) in text
    assert "Exit status: 1 when some row has an 'error: …' status" in EXIT_RULE


def test_bench_memory_refuses_compile_and_cuda_graphs(capsys, monkeypatch):
    no_measuring(monkeypatch)
    assert main(["bench", "memory", *BENCH, "--compile"]) == 2
    assert one_line_error(capsys, "bench") == (
        "memory rows measure eager steps; --compile applies to latency and profile rows only: "
        "drop it, or measure latency")
    assert main(["bench", "memory", *BENCH, "--compile", "--cuda-graphs"]) == 2
    assert one_line_error(capsys, "bench").startswith(
        "memory rows measure eager steps; --compile and --cuda-graphs apply to")


@pytest.mark.parametrize("flags, message", [
    (["--resolution", "0"], "argument --resolution: '0' is not a resolution; allowed: PX"),
    (["--batch-size", "1", "0"], "argument --batch-size: '0' is not a positive integer"),
    (["--repeats", "0"], "--repeats: 0 is not allowed; allowed: a positive 64-bit integer"),
    (["--warmup", "-1"], "--warmup: -1 is not allowed"),
    (["--text-tokens", "0"], "argument --text-tokens: '0' is not a positive integer"),
    (["--frames", "0"], "argument --frames: '0' is not a positive integer"),
    (["--resolution", "250"], "--model DiT-S/2 --resolution 250 --batch-size 1 --override depth=1 "
     "hidden_size=64 num_heads=4: resolution 250 px is not a multiple of the VAE factor 8"),
    (["--override", "dept=2"], "--override depth=1 hidden_size=64 num_heads=4 dept=2: "),
    (["--cuda-graphs"], "--model DiT-S/2 --mode forward --dtype float32 --backend sdpa "
     "--device cpu --cuda-graphs: cuda_graphs needs device 'cuda', got 'cpu'"),
])
def test_bench_errors_name_the_flags_not_the_sweep_keys(flags, message, capsys, monkeypatch):
    no_measuring(monkeypatch)
    assert main(["bench", "latency", *BENCH, *flags]) == 2
    error = one_line_error(capsys, "bench")
    assert message in error and "key '" not in error


def test_bench_ctrl_c_keeps_the_finished_rows_and_exits_130(tmp_path, capsys, monkeypatch):
    real = latency.prepare

    def prepare(case):
        if case.mode == "cfg":
            raise KeyboardInterrupt
        return real(case)
    monkeypatch.setattr(latency, "prepare", prepare)
    store = tmp_path / "rows.jsonl"
    argv = ["bench", "latency", *BENCH, "--mode", "forward", "cfg", "--store", str(store)]

    def interrupted(argv: list[str]) -> int:
        try:
            return main(argv)
        except KeyboardInterrupt:
            pytest.fail("Ctrl-C escaped ptdit bench as a traceback")
    assert interrupted(argv) == 130
    assert capsys.readouterr().err == (f"ptdit bench: interrupted; every finished row is in "
                                       f"{store}: run the same command again to resume\n")
    assert [(r["mode"], r["status"]) for r in Store(store).rows()] == [("forward", "ok")]
    assert interrupted(argv[:-2]) == 130
    assert "without --store no row was kept" in capsys.readouterr().err
    monkeypatch.setattr(latency, "prepare", real)
    assert main(argv) == 0                                        # resumed: cfg only
    assert [(r["mode"], r["status"]) for r in Store(store).rows()] == [("forward", "ok"),
                                                                       ("cfg", "ok")]


HELP = """
import sys
from ptdit import cli
for command in ("bench", "sweep", "report"):
    try:
        main([command, "--help"])
    except SystemExit:
        pass
print(" ".join(sys.modules))
"""

