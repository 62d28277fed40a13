"""Where a step's time goes: torch.profiler over a few steps of a latency case, every operator's
self time put into a category, and the two categories the closed form counts MACs for joined
with them, so that a speedup that differs from the MAC prediction can be explained.

    rows = profile(Case(Workload("PT-DiT/B", 1024, overrides={"depth": 2})), steps=3)

Categories (`category_of`, by ATen operator name; first match wins):
- `gemm`: the linear layers and the patch-embed convolution (addmm, mm, convolutions);
- `attention`: fused attention kernels (SDPA flash / efficient / cuDNN / math-for-CPU), and the
  batched products and softmax of the `math` backend;
- `layout`: copies and gathers that move data without arithmetic (copy_, clone, cat, stack,
  index, gather, roll, …) — window partitions, the shifted-window gathers, F.linear's bias
  broadcast on the CPU;
- `norm`: layer norms; `elementwise`: activations, modulation, gates, residual adds, means;
- `optimizer`: every operator run inside the optimizer's step (train steps), and foreach
  kernels; `other`: everything else;
- `untraced`: the step's wall time outside any operator (Python, module calls, dispatch).
Times are self times (an operator's children are not counted twice), per step: CPU wall time of
the operator on the CPU, its kernels' device time on CUDA.

Rows (measurement `profile`): one per category (`level` = "category") with `profile_ms` per
step, its `share` of the step and `calls` per step; `gemm` and `attention` rows also carry the
closed form's MACs of that part of the step (`gmacs`; linear and attention MACs, ×3 for a train
step as in bench.latency) and the rate they ran at (`achieved_tflops`). Then the `top` operators
(`level` = "op"), each with its category. The profiler's own overhead inflates `step_ms` a
little; compare shares, and time with bench.latency.
"""

import re
import time
from collections import defaultdict

from torch.profiler import ProfilerActivity
from torch.profiler import profile as torch_profile

from ptdit import complexity
from ptdit.checks import positive_int

from .latency import Case, head, prepare, release, synchronize
from .rows import status_of

CATEGORIES = ("gemm", "attention", "layout", "norm", "elementwise", "optimizer", "other",
              "untraced")
_RULES = (   # (category, pattern on the ATen name without "aten::")
    ("attention", r"scaled_dot_product|flash_attention|efficient_attention|cudnn_attention"
                  r"|^bmm$|^baddbmm$|^_softmax$|^softmax$"),
    ("gemm", r"^addmm$|^mm$|^_?convolution$|^mkldnn_convolution$|^cudnn_convolution|^addmv$"
             r"|^_addmm_activation$"),
    ("optimizer", r"^_foreach_|^_fused_adamw"),
    ("layout", r"^copy_$|^clone$|^contiguous$|^cat$|^stack$|^index$|^index_select$|^gather$"
               r"|^_to_copy$|^roll$|^repeat$|^_unsafe_index|^index_put_?$|^scatter"
               r"|^_reshape_alias_copy$|^constant_pad_nd$|^fill_$|^zero_$"),
    ("norm", r"layer_norm|group_norm|rms_norm"),
    ("elementwise", r"^add_?$|^mul_?$|^sub_?$|^div_?$|^gelu|^silu|^sigmoid|^tanh|^addcmul_?$"
                    r"|^mean$|^sum$|^exp$|^cos$|^sin$|^masked_fill_?|^where$|^neg$|^rsub$"
                    r"|^pow$|^sqrt$|^rsqrt$|^threshold_backward$|^mse_loss"),
)


def category_of(op: str) -> str:
    """The category of an operator named e.g. 'aten::addmm' (non-ATen names: 'other')."""
    if not op.startswith("aten::"):
        return "other"
    name = op.removeprefix("aten::")
    for category, pattern in _RULES:
        if re.search(pattern, name):
            return category
    return "other"


def _self_ms(event, device: str) -> float:
    micros = event.self_device_time_total if device == "cuda" else event.self_cpu_time_total
    return micros / 1e3


def _category_macs(case: Case) -> dict[str, float]:
    cf = complexity.closed_form(case.forward_work, case.dtype)
    factor = 3 if case.mode == "train" else 1
    return {"gemm": cf["linear_gmacs"] * factor, "attention": cf["attention_gmacs"] * factor}


def profile(case: Case, steps: int = 3, warmup: int = 1, top: int = 12) -> list[dict]:
    """Rows of where the time of `steps` profiled steps of `case` went (after `warmup`); one
    row with the failure's status if the case fails."""
    positive_int("steps", steps)
    positive_int("top", top)
    base = {**head(case, "profile"), "steps": steps}
    try:
        ops, step_ms = _profiled(case, steps, warmup)
    except Exception as err:   # failure is data: the row says what went wrong
        return [{**base, "status": status_of(err)}]
    finally:
        release(case.device)
    return _rows(base, ops, step_ms, steps, _category_macs(case), top)


def _profiled(case: Case, steps: int, warmup: int
              ) -> tuple[dict[tuple[str, str], tuple[float, int]], float]:
    """(operator, category) -> (self ms, calls) over the profiled steps, and ms per step."""
    step = prepare(case)
    for _ in range(warmup + (1 if case.compile else 0)):   # compiling is no part of a step
        step()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if case.device == "cuda"
                                           else [])
    synchronize(case.device)
    with torch_profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            step()
        synchronize(case.device)
        wall_ms = (time.perf_counter() - start) * 1e3
    ops: dict[tuple[str, str], list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.name.startswith("aten::"):
            totals = ops[event.name, _category(event)]
            totals[0] += _self_ms(event, case.device)
            totals[1] += 1
    return {key: tuple(v) for key, v in ops.items()}, wall_ms / steps


def _category(event) -> str:
    """An operator's category; anything run inside an optimizer's step is `optimizer`."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer"
        parent = parent.cpu_parent
    return category_of(event.name)


def _rows(base: dict, ops: dict[tuple[str, str], tuple[float, int]], step_ms: float,
          steps: int, macs: dict[str, float], top: int) -> list[dict]:
    per_category: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0])
    for (_, category), (ms, calls) in ops.items():
        totals = per_category[category]
        totals[0] += ms / steps
        totals[1] += calls / steps
    traced = sum(ms for ms, _ in per_category.values())
    per_category["untraced"] = [max(step_ms - traced, 0.0), 0.0]
    rows = []
    for category in CATEGORIES:
        ms, calls = per_category.get(category, (0.0, 0.0))
        gmacs = macs.get(category)
        rate = 2 * gmacs / ms if gmacs is not None and ms > 0 else None   # GFLOP/ms = TFLOP/s
        rows.append({**base, "status": "ok", "level": "category", "name": category,
                     "category": category, "profile_ms": ms, "share": ms / step_ms,
                     "calls": calls, "step_ms": step_ms, "gmacs": gmacs,
                     "achieved_tflops": rate})
    ranked = sorted(ops.items(), key=lambda kv: -kv[1][0])[:top]
    for (op, category), (ms, calls) in ranked:
        rows.append({**base, "status": "ok", "level": "op", "name": op,
                     "category": category, "profile_ms": ms / steps,
                     "share": ms / steps / step_ms, "calls": calls / steps, "step_ms": step_ms,
                     "gmacs": None, "achieved_tflops": None})
    return rows
