"""The results-row fields every measurement carries (docs/results.md "Results rows"): provenance,
device labels, the status of a failed case, and a check that a row has them all."""

import functools
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path

import torch

SCHEMA_VERSION = 2   # 2: rows carry `table` (bench.store.TABLES)
PROVENANCE_FIELDS = ("schema_version", "git_sha", "time_utc", "host", "device", "torch", "dtype",
                     "backend")
ROW_FIELDS = PROVENANCE_FIELDS + ("model", "resolution", "latent_frames", "tokens", "batch",
                                  "status")
DEVICE_TYPES = ("cpu", "cuda", "meta")
# c10/core/impl/alloc_cpu.cpp: posix_memalign failing, and _aligned_malloc failing (Windows)
CPU_OOM_MESSAGES = ("DefaultCPUAllocator: can't allocate memory",
                    "DefaultCPUAllocator: not enough memory")


@functools.cache
def git_sha() -> str:
    """The commit of this code (not of the working directory), '+dirty' when tracked files are
    modified; 'unknown' outside a git checkout (e.g. an installed wheel)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _cuda_name(index: int | None) -> str:
    return torch.cuda.get_device_name(index)


def device_label(device: str | torch.device) -> str:
    """What a row's `device` says: 'cpu (2 threads)', the CUDA device's name, or
    'meta (shapes only)'."""
    try:
        device = torch.device(device)
    except RuntimeError as err:
        raise ValueError(f"unknown device {device!r}; allowed types: "
                         f"{', '.join(DEVICE_TYPES)}") from err
    if device.type == "cpu":
        threads = torch.get_num_threads()
        return f"cpu ({threads} thread{'s' if threads != 1 else ''})"
    if device.type == "cuda":
        return _cuda_name(device.index)
    if device.type == "meta":
        return "meta (shapes only)"
    raise ValueError(f"unknown device type {device.type!r} (from {str(device)!r}); "
                     f"allowed: {', '.join(DEVICE_TYPES)}")


def provenance(device: str, backend: str, dtype: str) -> dict:
    """The provenance fields of a row, in the documented order (docs/results.md); `device` is
    already a label."""
    return {
        "schema_version": SCHEMA_VERSION,
        "git_sha": git_sha(),
        "time_utc": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "device": device,
        "torch": torch.__version__,
        "dtype": dtype,
        "backend": backend,
    }


def status_of(err: BaseException) -> str:
    """A failed case's `status`: 'oom' for running out of memory (CUDA, Python or torch's CPU
    allocator), else 'error: <type>: <message>' on one line."""
    if isinstance(err, (torch.OutOfMemoryError, MemoryError)):
        return "oom"
    message = " ".join(str(err).splitlines())
    if isinstance(err, RuntimeError) and any(m in message for m in CPU_OOM_MESSAGES):
        return "oom"
    return f"error: {type(err).__name__}" + (f": {message}" if message else "")


def check_row(row: dict) -> None:
    """Raises ValueError naming the results-row fields `row` lacks."""
    missing = [field for field in ROW_FIELDS if field not in row]
    if missing:
        raise ValueError(f"row lacks the results-row fields {', '.join(missing)} "
                         f"(docs/results.md 'Results rows'); it has: {', '.join(map(str, row))}")
