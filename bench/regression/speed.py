"""The speed gate's benchmarks, its calibration kernel and its interleaved timer.

Benchmarks (`NAMES`), float32, batch 2, one call each:
- `dit_forward`, `pixart_forward`, `ptdit_forward`: a no-grad forward of DiT-S/2, PixArt-XL/2
  and PT-DiT/XL at depth 2, width 128, 4 heads, on 32x32 latents (256 px; 120 T5 tokens);
- `window_attention`, `shift_window_attention`: ptdit.attention.Attention (width 128, 4 heads)
  on a window-major batch, a 32x32 token grid in 8x8 windows: (B·nW, N, D) = (32, 64, 128), and
  (B, nW, N, D) with the shifted-window bias (nW, 1, N, N);
- `closed_form`: ptdit.complexity.closed_form of every named model at 1024 px (on the CPU);
- `torch_count`: bench.flops.count(…, "torch") of PT-DiT/S-Class at depth 1, 256 px (meta).

CPU benchmarks are timed in process CPU time (`CLOCKS`), CUDA ones in synchronised wall time.

The calibration kernel (`calibration`) is fixed work on the benchmark's device: float32 matmuls
and a chain of tiny elementwise ops; `interleaved` times it and the benchmark back to back in
every round (gate.py's rule).

Environment: PTDIT_BENCH_DEVICE (cpu, the default, or cuda: the model and attention benchmarks
run there, the counting ones stay on the CPU), PTDIT_BENCH_THREADS (torch's CPU threads,
default 1: a second core on a shared machine is the one another job takes), and, for the gate's
self-test only, PTDIT_BENCH_INJECT_SLOWDOWN=name:factor (runs that benchmark `factor` times per
call).
"""

import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

import ptdit
from bench.flops import count
from ptdit import Workload, complexity, example_inputs
from ptdit.attention import Attention, shift_window_bias, window_partition

NAMES = ("dit_forward", "pixart_forward", "ptdit_forward", "window_attention",
         "shift_window_attention", "closed_form", "torch_count")
DEVICE_ENV, THREADS_ENV = "PTDIT_BENCH_DEVICE", "PTDIT_BENCH_THREADS"
INJECT_ENV = "PTDIT_BENCH_INJECT_SLOWDOWN"
BASELINES = Path(__file__).with_name("baselines")
SMALL = dict(depth=2, hidden_size=128, num_heads=4)
GRID, WINDOW = (1, 32, 32), (1, 8, 8)          # attention benchmarks: tokens (F, H, W)
CALIBRATION = {"cpu": 256, "cuda": 4096}       # side of the calibration's float32 matmuls
CALIBRATION_MATMULS = {"cpu": 4, "cuda": 1}
CALIBRATION_OPS = 400
CPU_ONLY = ("closed_form", "torch_count")
# CPU benchmarks are timed in process CPU time: time the scheduler gives other jobs on a shared
# machine is not counted. CUDA benchmarks in wall time, synchronised.
CLOCKS = {"cpu": time.process_time, "cuda": time.perf_counter}


@dataclass(frozen=True)
class Benchmark:
    """A benchmark ready to call: `run()` is one call, finished on its device when it returns."""
    name: str
    device: torch.device
    run: Callable[[], None]

    @property
    def clock(self) -> Callable[[], float]:
        return CLOCKS[self.device.type]


def device() -> torch.device:
    """PTDIT_BENCH_DEVICE's device (cpu by default); ValueError on anything else."""
    name = os.environ.get(DEVICE_ENV, "cpu")
    if name not in CALIBRATION:
        raise ValueError(f"{DEVICE_ENV}={name!r}; allowed: {', '.join(CALIBRATION)}")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{DEVICE_ENV}=cuda but CUDA is not available here")
    return torch.device(name)


def clock(name: str) -> Callable[[], float]:
    """The clock the named benchmark is timed with under PTDIT_BENCH_DEVICE (read as given:
    `device()` checks it)."""
    kind = "cpu" if name in CPU_ONLY else os.environ.get(DEVICE_ENV, "cpu")
    return CLOCKS.get(kind, time.perf_counter)


def threads() -> int:
    """PTDIT_BENCH_THREADS (default 1)."""
    value = os.environ.get(THREADS_ENV, "1")
    if not value.isdigit() or int(value) < 1:
        raise ValueError(f"{THREADS_ENV}={value!r}; allowed: a positive integer")
    return int(value)


def injected(names=NAMES) -> dict[str, int]:
    """PTDIT_BENCH_INJECT_SLOWDOWN 'name:factor[,name:factor]' as {name: factor}; {} unset."""
    spec = os.environ.get(INJECT_ENV, "").strip()
    out = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        name, _, factor = item.partition(":")
        if name not in names or not factor.isdigit() or int(factor) < 1:
            raise ValueError(f"{INJECT_ENV}={spec!r}: give name:factor with a name of "
                             f"{', '.join(names)} and a whole factor >= 1, e.g. "
                             f"ptdit_forward:2")
        out[name] = int(factor)
    return out


def _sync(dev: torch.device) -> Callable[[], None]:
    return torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)


#################################################################################
#                               Benchmarks                                      #
#################################################################################

def _forward(model_name: str, dev: torch.device) -> Callable[[], None]:
    model = ptdit.build(model_name, device=dev, **SMALL)
    work = Workload(model_name, 256, batch=2, overrides=SMALL)
    inputs = example_inputs(model, work, generator=torch.Generator().manual_seed(0))
    sync = _sync(dev)

    def run():
        with torch.no_grad():
            model(**inputs)
        sync()
    return run


def _attention(dev: torch.device, shifted: bool) -> Callable[[], None]:
    width, batch = SMALL["hidden_size"], 2
    kind = "shift_window" if shifted else "window"
    module = Attention(width, SMALL["num_heads"], kind).to(dev).eval()
    grid = torch.randn(batch, *GRID, width, generator=torch.Generator().manual_seed(0))
    rows = window_partition(grid, WINDOW).to(dev)                  # (B, nW·N, D) window-major
    nW, N = rows.shape[1] // (WINDOW[1] * WINDOW[2]), WINDOW[1] * WINDOW[2]
    if shifted:
        x = rows.view(batch, nW, N, width)                         # (B, nW, N, D)
        bias = shift_window_bias(GRID, WINDOW, torch.float32, dev)  # (nW, 1, N, N)
    else:
        x, bias = rows.view(batch * nW, N, width), None            # (B·nW, N, D)
    sync = _sync(dev)

    def run():
        with torch.no_grad():
            module(x, bias)
        sync()
    return run


def _closed_form() -> Callable[[], None]:
    works = [Workload(name, 1024) for name in ptdit.list_models()]
    return lambda: [complexity.closed_form(w) for w in works]


def _torch_count() -> Callable[[], None]:
    work = Workload("PT-DiT/S-Class", 256, overrides={"depth": 1})

    def run():
        row = count(work, "torch")
        if row["status"] != "ok":
            raise RuntimeError(f"torch_count: {row['status']}")
    return run


def build(name: str, dev: torch.device, slowdown: int = 1) -> Benchmark:
    """The named benchmark on `dev` (counting benchmarks stay on the CPU), run `slowdown` times
    per call (the gate's self-test)."""
    if name not in NAMES:
        raise ValueError(f"unknown benchmark {name!r}; allowed: {', '.join(NAMES)}")
    torch.manual_seed(0)
    if name in CPU_ONLY:
        dev = torch.device("cpu")
    if name.endswith("_forward"):
        model = {"dit": "DiT-S/2", "pixart": "PixArt-XL/2", "ptdit": "PT-DiT/XL"}
        run = _forward(model[name.removesuffix("_forward")], dev)
    elif name.endswith("window_attention"):
        run = _attention(dev, shifted=name.startswith("shift"))
    elif name == "closed_form":
        run = _closed_form()
    else:
        run = _torch_count()
    if slowdown > 1:
        once = run

        def run():
            for _ in range(slowdown):
                once()
    return Benchmark(name, dev, run)


#################################################################################
#                      Calibration and the interleaved timer                    #
#################################################################################

def calibration(dev: torch.device) -> Callable[[], float]:
    """A function that runs the calibration kernel once on `dev` and returns its time in
    seconds by `dev`'s clock. The kernel holds the two costs the benchmarks are made of, BLAS
    throughput and torch's per-op overhead: CALIBRATION_MATMULS float32 matmuls of
    CALIBRATION-sided matrices, then CALIBRATION_OPS (multiply, add) pairs on a 16-element
    tensor. Load that slows either cost moves the calibration with the benchmarks."""
    n, calls = CALIBRATION[dev.type], CALIBRATION_MATMULS[dev.type]
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(dev) for _ in range(2))
    small = torch.randn(16, generator=gen).to(dev)
    sync, clock = _sync(dev), CLOCKS[dev.type]

    def timed() -> float:
        sync()
        start = clock()
        for _ in range(calls):
            torch.mm(a, b)
        x = small
        for _ in range(CALIBRATION_OPS):
            x = x * 1.0001 + 0.5
        sync()
        return clock() - start
    return timed


def calibration_kernel(dev: torch.device) -> str:
    """What `calibration(dev)` runs, as a baseline records it."""
    n = CALIBRATION[dev.type]
    return (f"{CALIBRATION_MATMULS[dev.type]} x mm({n}x{n} @ {n}x{n}, float32) + "
            f"{CALIBRATION_OPS} x (mul, add) on 16 float32, {dev.type}")


def interleaved(bench: Benchmark, calibrate: Callable[[], float], rounds: int, warmup: int
                ) -> tuple[list[float], list[float]]:
    """(benchmark seconds, calibration seconds) of `rounds` rounds, each the calibration kernel
    then one benchmark call, after `warmup` untimed rounds."""
    times, calib = [], []
    for i in range(warmup + rounds):
        c = calibrate()
        start = bench.clock()
        bench.run()
        t = bench.clock() - start
        if i >= warmup:
            times.append(t)
            calib.append(c)
    return times, calib


def machine(dev: torch.device) -> dict:
    """What a speed baseline is comparable with: device, CPU model, threads, torch."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "cpu": cpu, "threads": torch.get_num_threads(),
            "torch": torch.__version__.split("+")[0]}


def baseline_path(dev: torch.device) -> Path:
    """baselines/speed-cpu.json or baselines/speed-cuda.json."""
    return BASELINES / f"speed-{dev.type}.json"
