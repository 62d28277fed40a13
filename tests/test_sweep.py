"""bench.sweep and its CLI: sweep files validated before anything runs (the bad key named), one
row per case after a SIGKILL and a restart, out-of-memory cases as rows with the larger ones
skipped (naming the case that ran out), the shipped sweep files, and the GPU suite's dry run."""

import collections
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench.rows
from bench import latency, sweep
from bench.rows import check_row
from bench.store import Store
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
repeats = 400   # each case well over the 10 ms the test polls at, on an idle machine too
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
    store = Store(tmp_path / "rows.jsonl")
    store.append({"measurement": "latency", "model": "DiT-S/2", "status": "ok"})
    calls = []

    def write_report(frame, out_dir):
        calls.append((frame.to_dict("records"), out_dir))
        return {"runtime.md": Path(out_dir) / "runtime.md"}
    fake = type(sys)("bench.runtime_report")
    fake.write_report = write_report
    monkeypatch.setitem(sys.modules, "bench.runtime_report", fake)
    assert main(["report", str(store.path), "--out", str(tmp_path / "report")]) == 0
    assert calls == [(store.rows(), str(tmp_path / "report"))]
    assert "runtime.md" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "missing.jsonl"), "--out", str(tmp_path)]) == 2
    assert "no results store" in capsys.readouterr().err


HELP = """
import sys
from ptdit import cli
for command in ("bench", "sweep", "report"):
    try:
        cli.main([command, "--help"])
    except SystemExit:
        pass
print(" ".join(sys.modules))
"""


def test_the_new_commands_help_imports_nothing_heavy():
    out = subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    modules = out.splitlines()[-1].split()
    heavy = ("bench", "pandas", "matplotlib", "torch._dynamo", "fvcore")
    assert [m for m in modules if m.startswith(heavy)] == []
