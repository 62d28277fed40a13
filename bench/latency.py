"""Step latency on the CPU and on CUDA through one interface: forward, guided (cfg) and train
steps of any workload, as results rows.

    case = Case(Workload("PT-DiT/XL", 512, overrides={"depth": 2}), mode="cfg")
    row = measure(case, repeats=10, warmup=2)

Modes (`MODES`): `forward` runs model(**inputs) under torch.no_grad; `cfg` is the guided forward
a sampler runs, DiT's and PixArt's `forward_with_cfg`: one forward of the batch doubled
(conditional + unconditional halves), so the model runs at `forward_batch` = 2 × `batch`;
`train` is model.train(), then per step: forward, MSE loss against a fixed random target of the
output's shape, backward, one torch.optim.AdamW step and zero_grad(set_to_none=True) (so the
gradients are allocated and freed within each step, and count in its peak memory).

A measurement (`measure`): build the model in the case's dtype on its device with the attention
backend, draw its inputs (ptdit.example_inputs, seed 0); with `compile` (torch.compile of each
transformer block, `_compile`), time the first call — compilation plus one step — alone, as
`compile_s`; with `cuda_graphs`, capture one step into a CUDA graph (after three steps on a side
stream) and time its replays; then `warmup` untimed steps, then `repeats` timed ones. The CPU
timer reads time.perf_counter around each step (torch's intra-op thread count is in `threads`
and in `device`); the CUDA timer records a pair of CUDA events around each step, synchronising
before and after it, and reads their elapsed time. Compilation is never inside a latency figure.

Every CUDA call sits in one of the small `_cuda_*` functions, so tests can replace them with
fakes and run the CUDA code paths on a CPU; a CUDA case where CUDA is not available is refused
when it is made (`check_device`), never run on the CPU instead.

Rows join the closed form's MACs of the same case (ptdit.complexity.closed_form of the forward
the step runs, at `forward_batch`): `total_gmacs`, `linear_gmacs` and `attention_gmacs` as
`ptdit flops` names them, `forward_gmacs` (= total_gmacs: the MACs of the step's forward pass;
backward is not in it), and `step_gflops`, the FLOPs of one step by `flop_model` (FLOPs = 2 ×
MACs; a train step ≈ 3 × its forward: backward costs about twice the forward, the optimiser and
elementwise ops are not counted), from which `achieved_tflops` = step_gflops / median time.
"""

import dataclasses
import gc
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import ptdit
from ptdit import Workload, complexity, example_inputs
from ptdit.attention import check_backend, set_backend
from ptdit.checks import either, positive_int

from .rows import device_label, provenance, status_of

MODES = ("forward", "cfg", "train")
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
FLOP_MODELS = {
    "forward": "2 x forward MACs",
    "cfg": "2 x forward MACs at forward_batch = 2 x batch",
    "train": "3 x forward FLOPs (backward ~ 2 x forward; optimizer and elementwise not counted)",
}
GRAPH_WARMUP = 3   # steps run on a side stream before a CUDA graph is captured (torch's recipe)

Step = Callable[[], None]


#################################################################################
#                                 CUDA calls                                    #
#################################################################################

def _cuda_available() -> bool:
    return torch.cuda.is_available()


def _cuda_synchronize() -> None:
    torch.cuda.synchronize()


def _cuda_event():
    return torch.cuda.Event(enable_timing=True)


def _cuda_empty_cache() -> None:
    torch.cuda.empty_cache()


def _cuda_graph(step: Step) -> Step:
    """`step` captured into a CUDA graph after GRAPH_WARMUP steps on a side stream; returns
    the graph's replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(GRAPH_WARMUP):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def check_device(device: str) -> str:
    """`device` ('cpu', or 'cuda': the current CUDA device, chosen by CUDA_VISIBLE_DEVICES) if it
    can run here; ValueError otherwise, never a silent fall back to the CPU."""
    if device not in DEVICES:
        raise ValueError(f"device {device!r} cannot be timed; allowed: {', '.join(DEVICES)} "
                         "(pick the GPU with CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and not _cuda_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available here "
                         f"(torch.cuda.is_available() is False; torch {torch.__version__}, "
                         f"CUDA {torch.version.cuda or 'none'}); run on a machine with a GPU "
                         "or ask for device 'cpu'")
    return device


def synchronize(device: str) -> None:
    """Waits for `device`'s queued work (nothing to wait for on the CPU)."""
    if device == "cuda":
        _cuda_synchronize()


def release(device: str) -> None:
    """On CUDA, frees what a finished case left for the next: garbage, then the cached blocks
    (on the CPU, reference counting already returned the memory)."""
    if device == "cuda":
        gc.collect()
        _cuda_empty_cache()


#################################################################################
#                                   Cases                                       #
#################################################################################

def _choice(label: str, value, allowed: tuple) -> None:
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{label} must be {either(map(repr, allowed))}, got {value!r}")


@dataclass(frozen=True)
class Case:
    """A step to measure: `work` (at the requested batch) run in `mode` in `dtype` on `device`
    with the attention `backend`, optionally torch.compile'd and/or replayed as a CUDA graph.
    Raises ValueError naming what is allowed."""
    work: Workload
    mode: str = "forward"
    dtype: str = "float32"
    backend: str = "sdpa"
    device: str = "cpu"
    compile: bool = False
    cuda_graphs: bool = False
    forward_work: Workload = field(init=False, repr=False, compare=False)  # what the model runs

    def __post_init__(self):
        _choice("mode", self.mode, MODES)
        _choice("dtype", self.dtype, DTYPES)
        check_backend(self.backend)
        check_device(self.device)
        for flag in ("compile", "cuda_graphs"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"{flag} must be True or False, got {getattr(self, flag)!r}")
        if self.cuda_graphs and self.device != "cuda":
            raise ValueError(f"cuda_graphs needs device 'cuda', got {self.device!r}")
        forward = (dataclasses.replace(self.work, batch=2 * self.work.batch)
                   if self.mode == "cfg" else self.work)   # cfg: the batch doubled
        object.__setattr__(self, "forward_work", forward)

    @property
    def size(self) -> int:
        """Tokens × forward batch: what memory grows with, for one model and setup."""
        return self.work.tokens * self.forward_work.batch

    @property
    def label(self) -> str:
        """A short name, e.g. 'PT-DiT/XL 512px 16f b1 cfg bfloat16'."""
        w = self.work
        frames = f" {w.latent_frames}f" if w.frames is not None else ""
        extras = " compile" * self.compile + " graphs" * self.cuda_graphs
        return f"{w.name} {w.resolution}px{frames} b{w.batch} {self.mode} {self.dtype}{extras}"

    def columns(self) -> dict:
        """The columns that name this case in a row (provenance and status aside)."""
        return {**self.work.describe(),
                "overrides": json.dumps(self.work.overrides, sort_keys=True),
                "mode": self.mode, "forward_batch": self.forward_work.batch,
                "compile": self.compile, "cuda_graphs": self.cuda_graphs}


def head(case: Case, measurement: str) -> dict:
    """A row's leading columns: provenance, the case, the measurement and the thread count."""
    return {**provenance(device_label(case.device), case.backend, case.dtype),
            **case.columns(), "measurement": measurement, "threads": torch.get_num_threads()}


#################################################################################
#                                   Steps                                       #
#################################################################################

def _compile(model: nn.Module) -> nn.Module:
    """`model` with each transformer block torch.compile'd in place (regional compilation: the
    blocks share one compiled graph, so compile time does not grow with depth; the embedders
    and the final layer stay eager). Dynamo's caches of earlier models are cleared first: each
    case builds a new model, and stale entries would count against the recompile limit."""
    torch.compiler.reset()
    for block in model.blocks:
        block.compile()
    return model


def prepare(case: Case) -> Step:
    """The model of `case` built on its device in its dtype with its backend, its inputs, and
    one step of its mode as a function of no arguments (compiled with `case.compile`; the
    first call then compiles)."""
    work = case.forward_work
    model = ptdit.build(work.config, device=case.device, dtype=case.dtype)
    set_backend(model, case.backend)
    inputs = example_inputs(model, work, generator=torch.Generator().manual_seed(0))
    if case.mode == "train":
        model.train()        # before compiling: dynamo's graphs are specialised to the mode
    forward = _compile(model) if case.compile else model
    if case.mode == "train":
        return _train_step(model, forward, inputs, capturable=case.cuda_graphs)

    def step() -> None:
        with torch.no_grad():
            forward(**inputs)
    return step


def _train_step(model: nn.Module, forward: Callable, inputs: dict, capturable: bool) -> Step:
    """One optimisation step of `model` (run as `forward`, e.g. compiled): MSE of the output
    against a fixed N(0, 1) target, AdamW (capturable for CUDA graphs)."""
    x = inputs["x"]
    out_dims = (x.shape[0], model.config.out_channels, *x.shape[2:])   # (B, 2C, [F,] H, W)
    target = torch.randn(out_dims, generator=torch.Generator().manual_seed(1)).to(x)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, capturable=capturable)

    def step() -> None:
        F.mse_loss(forward(**inputs), target).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)   # gradients live within a step, not between
    return step


#################################################################################
#                                   Timers                                      #
#################################################################################

def _time_cpu(step: Step, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _time_cuda(step: Step, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = _cuda_event(), _cuda_event()
        _cuda_synchronize()
        start.record()
        step()
        end.record()
        _cuda_synchronize()
        times.append(start.elapsed_time(end))
    return times


def time_step(step: Step, device: str, repeats: int, warmup: int = 0) -> list[float]:
    """Milliseconds of each of `repeats` calls of `step` on `device`, after `warmup` untimed
    ones: perf_counter on the CPU, CUDA events around each synchronised call on CUDA."""
    for _ in range(warmup):
        step()
    synchronize(device)
    timer = _time_cuda if device == "cuda" else _time_cpu
    return timer(step, repeats)


def first_call_s(step: Step, device: str) -> float:
    """Seconds of one call of `step`, synchronised (for a compiled step: compile + one step)."""
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    return time.perf_counter() - start


#################################################################################
#                                    Rows                                       #
#################################################################################

def costs(case: Case) -> dict:
    """The closed form's MACs of the step's forward, and the step's FLOPs by its flop model."""
    cf = complexity.closed_form(case.forward_work, case.dtype)
    flops = 2 * cf["total_gmacs"] * (3 if case.mode == "train" else 1)
    return {"params": cf["params"], "total_gmacs": cf["total_gmacs"],
            "linear_gmacs": cf["linear_gmacs"], "attention_gmacs": cf["attention_gmacs"],
            "forward_gmacs": cf["total_gmacs"], "flop_model": FLOP_MODELS[case.mode],
            "step_gflops": flops}


def stats(times_ms: list[float]) -> dict:
    """Median, interquartile range and minimum of per-step milliseconds."""
    q1, median, q3 = np.percentile(times_ms, [25, 50, 75])
    return {"latency_ms_median": float(median), "latency_ms_iqr": float(q3 - q1),
            "latency_ms_min": float(min(times_ms))}


def measure(case: Case, repeats: int = 10, warmup: int = 2) -> dict:
    """One latency row of `case`: `repeats` timed steps (`n`) after `warmup` untimed ones, the
    compile time apart (`compile_s`, empty without compile), the closed-form MACs and the
    achieved rate. A failed case is a row whose status says why ('oom', 'error: …')."""
    positive_int("repeats", repeats)
    if not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0:
        raise ValueError(f"warmup must be a non-negative integer, got {warmup!r}")
    row = {**head(case, "latency"), "n": repeats, "warmup": warmup, "compile_s": None,
           "latency_ms_median": None, "latency_ms_iqr": None, "latency_ms_min": None,
           **costs(case), "achieved_tflops": None}
    try:
        row.update(_timed(case, repeats, warmup))
        row["achieved_tflops"] = row["step_gflops"] / row["latency_ms_median"]
        row["status"] = "ok"
    except Exception as err:   # failure is data: the row says what went wrong
        row["status"] = status_of(err)
    finally:
        release(case.device)   # the model died with _timed's frame (or with `err`)
    return row


def _timed(case: Case, repeats: int, warmup: int) -> dict:
    step, compile_s = prepare(case), None
    if case.compile:
        compile_s = first_call_s(step, case.device)
    if case.cuda_graphs:
        step = _cuda_graph(step)
    return {"compile_s": compile_s, **stats(time_step(step, case.device, repeats, warmup))}
