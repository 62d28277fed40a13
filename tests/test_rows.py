"""bench.rows: provenance fields in the documented order (docs/results.md), device labels,
statuses, git_sha."""

import importlib.util
import re
import shutil
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import pytest
import torch

from bench import rows

DESIGN_FIELDS = ("schema_version", "git_sha", "time_utc", "host", "device", "torch", "dtype",
                 "backend", "model", "resolution", "latent_frames", "tokens", "batch", "status")


def test_every_design_field_is_required():
    for field in DESIGN_FIELDS:
        row = {f: None for f in DESIGN_FIELDS if f != field}
        with pytest.raises(ValueError, match=f"lacks the results-row fields {field} "):
            rows.check_row(row)


def test_provenance_fields_in_order():
    env = rows.provenance("cpu (2 threads)", "sdpa", "bfloat16")
    assert tuple(env) == DESIGN_FIELDS[:8]
    assert env["schema_version"] == rows.SCHEMA_VERSION
    assert env["git_sha"] == rows.git_sha()
    assert (env["device"], env["backend"], env["dtype"]) == ("cpu (2 threads)", "sdpa", "bfloat16")
    assert env["torch"] == torch.__version__
    when = datetime.strptime(env["time_utc"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
    assert abs((datetime.now(UTC) - when).total_seconds()) < 60


def test_cpu_label_counts_threads(monkeypatch):
    threads = torch.get_num_threads()
    assert rows.device_label("cpu") == f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    assert rows.device_label(torch.device("cpu")) == "cpu (3 threads)"
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert rows.device_label("cpu") == "cpu (1 thread)"


def test_meta_and_cuda_labels(monkeypatch):
    assert rows.device_label("meta") == "meta (shapes only)"
    monkeypatch.setattr(rows, "_cuda_name", lambda index: f"Fake GPU {index}")
    assert rows.device_label("cuda:1") == "Fake GPU 1"
    assert rows.device_label(torch.device("cuda")) == "Fake GPU None"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_real_cuda_label():
    assert rows.device_label("cuda:0") == torch.cuda.get_device_name(0)


@pytest.mark.parametrize("device", ["xpu", "mps:0", "gpu", torch.device("xla")])
def test_unknown_device_type(device):
    with pytest.raises(ValueError, match="allowed.*cpu, cuda, meta"):
        rows.device_label(device)


def test_status_of_oom():
    assert rows.status_of(torch.OutOfMemoryError("CUDA out of memory.")) == "oom"
    assert rows.status_of(torch.cuda.OutOfMemoryError("CUDA out of memory.")) == "oom"
    assert rows.status_of(MemoryError()) == "oom"
    # the Windows allocator's text (alloc_cpu.cpp, _aligned_malloc failing)
    windows = ("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough "
               "memory: you tried to allocate 911360 bytes.")
    assert rows.status_of(RuntimeError(windows)) == "oom"


def test_status_of_real_cpu_allocation_failure():
    with pytest.raises(RuntimeError, match="DefaultCPUAllocator: can't allocate memory") as err:
        torch.empty(2**62, dtype=torch.uint8)
    assert rows.status_of(err.value) == "oom"


def test_status_of_other_errors():
    assert rows.status_of(ValueError("msg")) == "error: ValueError: msg"
    assert rows.status_of(RuntimeError("shape\nmismatch\r\nhere")) == \
        "error: RuntimeError: shape mismatch here"
    assert rows.status_of(RuntimeError("memory layout not supported")).startswith("error: ")
    assert rows.status_of(KeyboardInterrupt()) == "error: KeyboardInterrupt"


def test_check_row_names_missing_fields():
    row = {field: None for field in DESIGN_FIELDS} | {"ms": 1.0}
    rows.check_row(row)
    del row["batch"], row["status"]
    with pytest.raises(ValueError, match="lacks the results-row fields batch, status"):
        rows.check_row(row)


def test_git_sha_of_this_checkout():
    assert re.fullmatch(r"[0-9a-f]{12}(\+dirty)?", rows.git_sha())


def _load_copy(folder: Path):
    """A fresh bench.rows module running from a copy in `folder` (git_sha's cache included)."""
    path = shutil.copy(rows.__file__, folder / "rows.py")
    spec = importlib.util.spec_from_file_location(f"rows_copy_{id(folder)}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_git_sha_outside_git(tmp_path):
    assert _load_copy(tmp_path).git_sha() == "unknown"


def test_git_sha_clean_and_dirty(tmp_path):
    def git(*args):
        return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args],
                              cwd=tmp_path, check=True, capture_output=True, text=True).stdout
    git("init", "-q")
    copy = _load_copy(tmp_path)
    (tmp_path / "notes.txt").write_text("a\n")
    git("add", "rows.py", "notes.txt")
    git("commit", "-q", "-m", "c")
    (tmp_path / "untracked.txt").write_text("ignored by +dirty\n")
    sha = git("rev-parse", "--short=12", "HEAD").strip()
    assert copy.git_sha() == sha
    (tmp_path / "notes.txt").write_text("b\n")
    assert copy.git_sha() == sha  # cached for the process
    copy.git_sha.cache_clear()
    assert copy.git_sha() == sha + "+dirty"
