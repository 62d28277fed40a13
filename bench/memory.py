"""Peak memory of one step (bench.latency's cases) on CUDA and on the CPU, as results rows
beside the closed form's prediction.

    row = measure(Case(Workload("PT-DiT/XL", 512, frames=16), mode="train"))

Both methods measure the step after one untimed step: the first faults in code pages and lazy
buffers (CUDA workspaces, thread pools) and creates AdamW's state, which then sits in the
baseline (a train step frees its gradients at its end, so they are in the step's peak).
`peak_mib` is the step's high-water mark above the baseline, `baseline_mib` what was held before
it (model, inputs, optimiser state). The method is named in every row (`memory_method`):

- `cuda-max-allocated`: after the warm-up step, empty the caching allocator, read
  memory_allocated() and memory_reserved(), reset the peak stats, run the step and read
  max_memory_allocated() and max_memory_reserved(): `peak_mib` and `reserved_mib` are each peak
  minus its own value before, `baseline_mib` the allocated bytes before.
- `cpu-subprocess-vmhwm`: each case runs in a fresh process (forked from a multiprocessing
  forkserver that has imported torch and ptdit and run nothing, so no earlier case's heap is
  inherited). It builds the model and inputs, runs the warm-up step, hands freed heap back to
  the kernel (glibc malloc_trim, so the step cannot reuse pages the baseline already counts),
  then resets the kernel's resident high-water mark by writing "5" to /proc/self/clear_refs
  (Linux >= 4.0; checked: VmHWM must fall to VmRSS) and reads VmRSS as `baseline_mib`; after
  the step, `peak_mib` = VmHWM - baseline. Without the reset the high-water mark (VmHWM, or
  ru_maxrss) is the process's lifetime peak, which the build or the warm-up step may have set
  above anything the step reaches. `reserved_mib` is empty on the CPU.

The prediction (`prediction` says what it counts): `predicted_activation_mib` is the closed
form's `activation_mib` of the step's forward at `forward_batch` and the row's dtype (every
MAC-op output as the math backend materialises them), less its `attn_scores_mib` on the sdpa
backend, whose fused kernels never store the score matrices; for train, `predicted_state_mib`
adds the gradients (trainable parameters × element size; AdamW's moments, made by the warm-up
step, are in the baseline). `measured_over_predicted` = peak_mib / (activation + state). A
forward under no_grad frees each block's activations as it goes, so its ratio falls with depth
(about 1 at depth 1); a train step holds them all for backward, with elementwise intermediates
the closed form omits (about 1.5 on the CPU sweep).
"""

import ctypes
import functools
import gc
import multiprocessing
import re
from pathlib import Path

import torch

from ptdit import complexity

from .latency import Case, head, prepare, release, synchronize
from .rows import status_of

MIB = 2**20
METHODS = {True: "cuda-max-allocated", False: "cpu-subprocess-vmhwm"}   # by: on CUDA?
PREDICTION = {
    "forward": "activation_mib of one forward (upper bound under no_grad)",
    "cfg": "activation_mib of one forward at 2 x batch (upper bound under no_grad)",
    "train": "activation_mib of the forward (held for backward) + gradients",
}


#################################################################################
#                                 CUDA calls                                    #
#################################################################################

def _cuda_memory() -> tuple[int, int]:
    """(allocated, reserved) bytes now."""
    return torch.cuda.memory_allocated(), torch.cuda.memory_reserved()


def _cuda_peak_memory() -> tuple[int, int]:
    """(allocated, reserved) high-water bytes since the last reset."""
    return torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()


def _cuda_reset_peak() -> None:
    torch.cuda.reset_peak_memory_stats()


def measure_cuda(case: Case, factory=prepare) -> dict:
    """`cuda-max-allocated`: the step's peak allocated and reserved MiB above what was held
    before it, after one warm-up step."""
    step = factory(case)
    step()
    synchronize(case.device)
    release(case.device)
    allocated, reserved = _cuda_memory()
    _cuda_reset_peak()
    step()
    synchronize(case.device)
    peak_allocated, peak_reserved = _cuda_peak_memory()
    return {"baseline_mib": allocated / MIB,
            "peak_mib": (peak_allocated - allocated) / MIB,
            "reserved_mib": (peak_reserved - reserved) / MIB}


#################################################################################
#                           CPU: a fresh process per case                       #
#################################################################################

def _status_kib(field: str) -> int:
    """A VmRSS / VmHWM line of /proc/self/status, in KiB."""
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE).group(1))


def _trim_heap() -> None:
    """Hands glibc's free heap pages back to the kernel (no-op without glibc)."""
    libc = ctypes.CDLL(None)          # the symbols the process has loaded, libc's among them
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def reset_high_water() -> int:
    """Resets the resident high-water mark (VmHWM) to the resident size now and returns it in
    bytes; RuntimeError where the kernel does not support it."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as err:
        raise RuntimeError(f"cannot reset the peak RSS through /proc/self/clear_refs ({err}): "
                           "CPU memory rows need Linux >= 4.0") from err
    rss, hwm = _status_kib("VmRSS"), _status_kib("VmHWM")
    if hwm > rss + 1024:   # VmRSS is sampled after VmHWM; 1 MiB of slack for a page fault
        raise RuntimeError(f"writing 5 to /proc/self/clear_refs left VmHWM at {hwm} kB above "
                           f"VmRSS {rss} kB: this kernel does not reset the peak RSS")
    return rss * 1024


def high_water() -> int:
    """The resident high-water mark (VmHWM) in bytes."""
    return _status_kib("VmHWM") * 1024


def _child(case: Case, factory, threads: int, conn) -> None:
    """In the fresh process: warm-up step, reset, the measured step; sends back (status,
    baseline bytes, peak bytes)."""
    torch.set_num_threads(threads)
    try:
        step = factory(case)
        step()
        gc.collect()
        _trim_heap()
        baseline = reset_high_water()
        step()
        conn.send(("ok", baseline, high_water()))
    except Exception as err:   # sent back as the row's status
        conn.send((status_of(err), None, None))


@functools.cache
def _forkserver():
    context = multiprocessing.get_context("forkserver")
    # torch._dynamo too: building a model imports it (torch.compiler.disable in ptdit.layers),
    # which would cost every child seconds
    context.set_forkserver_preload(["bench.memory", "torch._dynamo"])
    return context


def measure_cpu(case: Case, factory=prepare) -> dict:
    """`cpu-subprocess-vmhwm`: the step's peak RSS above the RSS before it, in a fresh process
    (`factory(case)` builds the step there; it must be picklable, i.e. a module-level
    function). A killed child (the kernel's OOM killer, say) is an error row naming the
    signal."""
    context = _forkserver()
    receive, send = context.Pipe(duplex=False)
    child = context.Process(target=_child, args=(case, factory, torch.get_num_threads(), send))
    child.start()
    send.close()
    try:
        status, baseline, peak = receive.recv()
    except EOFError:
        child.join()
        raise RuntimeError(f"the memory subprocess of {case.label} died with exit code "
                           f"{child.exitcode} (negative: killed by that signal; -9 is what "
                           "the kernel's OOM killer sends)") from None
    finally:   # also on Ctrl-C: no child outlives its case
        if child.is_alive():
            child.kill()
        child.join()
    return {"status": status,
            "baseline_mib": None if baseline is None else baseline / MIB,
            "peak_mib": None if peak is None else (peak - baseline) / MIB,
            "reserved_mib": None}


#################################################################################
#                                    Rows                                       #
#################################################################################

def prediction(case: Case) -> dict:
    """The closed form's activation MiB of the case, and for train its gradients' MiB."""
    cf = complexity.closed_form(case.forward_work, case.dtype)
    grads = cf["params_trainable"] * getattr(torch, case.dtype).itemsize / MIB
    fused = case.backend != "math"
    what = PREDICTION[case.mode] + (", attention scores excluded (fused SDPA never stores "
                                    "them)" if fused else "")
    return {"predicted_activation_mib": cf["activation_mib"] - fused * cf["attn_scores_mib"],
            "predicted_state_mib": grads if case.mode == "train" else 0.0,
            "prediction": what, "params": cf["params"]}


def measure(case: Case, factory=prepare) -> dict:
    """One memory row of `case` (eager: compile and CUDA graphs are latency options), by the
    device's method. A failed case is a row whose status says why ('oom', 'error: …')."""
    if case.compile or case.cuda_graphs:
        raise ValueError(f"memory rows measure eager steps; {case.label} asks for compile or "
                         "cuda_graphs, which apply to latency rows")
    cuda = case.device == "cuda"
    row = {**head(case, "memory"), "warmup": 1, "memory_method": METHODS[cuda],
           "baseline_mib": None, "peak_mib": None, "reserved_mib": None, **prediction(case),
           "measured_over_predicted": None}
    try:
        row.update(measure_cuda(case, factory) if cuda else measure_cpu(case, factory))
        row.setdefault("status", "ok")
    except Exception as err:   # failure is data: the row says what went wrong
        row["status"] = status_of(err)
    finally:
        release(case.device)
    if row["status"] == "ok":
        predicted = row["predicted_activation_mib"] + row["predicted_state_mib"]
        row["measured_over_predicted"] = row["peak_mib"] / predicted
    return row
