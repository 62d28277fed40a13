"""FLOP/MAC counting on the real module graph, by category, in the closed form's conventions.

Three counters produce the same row columns (ptdit.complexity.cost_columns):
- `analytic`: ptdit.complexity, pure arithmetic from the config;
- `torch`: torch.utils.flop_counter.FlopCounterMode (2·MAC per matmul, halved here) on the
  meta device, with its per-module breakdown;
- `fvcore`: fvcore's FlopCountAnalysis (1·MAC) on the meta device, with handles for what it
  skips or miscounts (below), and `by_module()` for the breakdown.

Both counters run on `meta` tensors: no memory, no compute, any size. Per-category MACs come
from each counter's per-module totals: a module's own MACs are its total minus its children's,
and each module maps to a category by where it sits (`category_of`).

Counter traps handled here (docs/baselines.md §4):
- FlopCounterMode counts SDPA as 0 on real CPU tensors (`_scaled_dot_product_flash_attention_
  for_cpu` is not in its registry): `custom_mapping` adds it. On meta, SDPA runs its math path
  (bmm) and is counted without help.
- fvcore skips `aten::scaled_dot_product_attention` (handle added), counts `aten::layer_norm` at
  5 per element (handle returns 0: norms are not MACs in any convention here) and prices the
  single-operand `einsum` of `unpatchify` — a pure permutation — at half its elements (handle
  returns 0 for one operand, fvcore's own count otherwise).

The counted model is built on `meta` in the row's dtype, with the forward inputs it requires
(PixArtMS's image size and aspect ratio included), so any config override counts as built.
"""

import warnings
from collections.abc import Collection, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Private, and the only private torch import of ptdit/bench: torch has no public hook that sees
# every aten op with its output (TorchFunctionMode sees Python-level calls, before SDPA and
# F.linear decompose into the mm/bmm whose outputs are the activations counted here), and
# FlopCounterMode itself is built on this class. If it moves, only _MacOutputs needs changing.
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

import ptdit
from ptdit import Workload, complexity, example_inputs
from ptdit.attention import check_backend, set_backend
from ptdit.checks import dtype_name
from ptdit.workload import DEFAULT_TEXT_TOKENS

from .rows import device_label, provenance

COUNTERS = ("analytic", "torch", "fvcore")
MAC_OPS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
           torch.ops.aten.baddbmm, torch.ops.aten.convolution)


#################################################################################
#                               Module categories                               #
#################################################################################

def category_of(name: str, module: nn.Module, parent: nn.Module | None) -> str:
    """The cost category of a module's *own* MACs (children excluded), by where it sits:
    'attn_<kind>' for an attention module's products, 'linear_<category>' for layers, and
    'other' for anything the closed form does not expect to do MACs."""
    if hasattr(module, "kind"):
        return f"attn_{module.kind}"
    if not isinstance(module, (nn.Linear, nn.Conv2d, Conv2dAsLinear)):
        return "other"
    leaf = name.rsplit(".", 1)[-1]
    if hasattr(parent, "kind") or leaf in ("proxy_out", "shift_out"):
        return "linear_attn_proj"
    if ".mlp." in f".{name}." and name.startswith("blocks."):
        return "linear_mlp"
    if name.startswith(("x_embedder.", "final_layer.")):
        return "linear_io"
    if name.startswith(("t_embedder.", "y_embedder.", "t_block.", "csize_embedder.",
                        "ar_embedder.")) or "adaLN_modulation" in name:
        return "linear_cond"
    return "other"


def _categories(model: nn.Module) -> dict[str, str]:
    """Qualified module name ('' for the root) -> category."""
    modules = dict(model.named_modules())
    return {name: category_of(name, m, modules.get(name.rpartition(".")[0]) if name else None)
            for name, m in modules.items()}


def _split_by_category(inclusive: dict[str, int], categories: dict[str, str]) -> dict[str, int]:
    """Per-module inclusive counts -> per-category counts of each module's own work."""
    own = dict(inclusive)
    for name, count in inclusive.items():
        if name:
            parent = name.rpartition(".")[0]
            own[parent] = own.get(parent, 0) - count
    out = {f"linear_{c}": 0 for c in complexity.LINEAR_CATEGORIES}
    out.update({f"attn_{k}": 0 for k in complexity.ATTENTION_CATEGORIES})
    out["other"] = 0
    for name, count in own.items():
        out[categories.get(name, "other")] += count
    return out


#################################################################################
#                                 Counters                                      #
#################################################################################

def _sdpa_cpu_flops(q, k, v, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(q, k, v)


class _MacOutputs(TorchDispatchMode):
    """Sums the output elements of every MAC-doing aten op (the closed form's activations)."""

    def __init__(self):
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket in MAC_OPS:
            self.elements += out.numel()
        return out


def count_torch(model: nn.Module, inputs: dict) -> tuple[dict[str, int], int]:
    """(MACs per category, MAC-op output elements) by FlopCounterMode; any device."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    outputs = _MacOutputs()
    with torch.no_grad(), counter, outputs:
        model(**inputs)
    root = type(model).__name__
    inclusive = {}
    for name, per_op in counter.get_flop_counts().items():
        if name == "Global":
            continue
        name = name.removeprefix(root).removeprefix(".")
        flops = sum(per_op.values())
        if flops % 2:
            raise AssertionError(f"odd FLOP count {flops} in {name}: not 2·MAC")
        inclusive[name] = flops // 2
    inclusive.setdefault("", 0)
    if inclusive[""] != counter.get_total_flops() // 2:
        raise AssertionError("FlopCounterMode counted work outside the model")
    return _split_by_category(inclusive, _categories(model)), outputs.elements


def _fvcore_handles() -> dict:
    from fvcore.nn.jit_handles import einsum_flop_jit, get_shape

    def sdpa(inputs, outputs) -> int:
        q, k, v = (get_shape(x) for x in inputs[:3])
        rows = 1
        for n in q[:-1]:
            rows *= n
        return rows * k[-2] * (q[-1] + v[-1])                   # QKᵀ + AV, in MACs

    def einsum(inputs, outputs):
        if len(list(inputs[1].node().inputs())) == 1:           # a permutation: no MACs
            return 0
        return einsum_flop_jit(inputs, outputs)

    return {"aten::scaled_dot_product_attention": sdpa, "aten::layer_norm": lambda i, o: 0,
            "aten::einsum": einsum}


class Conv2dAsLinear(nn.Module):
    """A non-overlapping Conv2d (stride = kernel, no padding) as patchify + linear: the same
    weights, output and MACs. fvcore's JIT trace cannot run torch's Python meta kernel for
    convolution (its shape checks see traced sizes), so fvcore counts the patch embed this way."""

    def __init__(self, conv: nn.Conv2d):
        super().__init__()
        if conv.stride != conv.kernel_size or any(conv.padding) or conv.groups != 1:
            raise ValueError(f"only non-overlapping convolutions have a linear form: {conv}")
        self.weight, self.bias, self.kernel_size = conv.weight, conv.bias, conv.kernel_size

    def forward(self, x: Tensor) -> Tensor:
        """(N, C, H, W) -> (N, D, H/kh, W/kw)."""
        N, C, H, W = x.shape
        kh, kw = self.kernel_size
        x = x.reshape(N, C, H // kh, kh, W // kw, kw).permute(0, 2, 4, 1, 3, 5).flatten(3)
        return F.linear(x, self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)


def _convs_as_linear(model: nn.Module) -> nn.Module:
    """Swaps every Conv2d of `model` for its Conv2dAsLinear (in place); returns the model."""
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d):
            parent, _, leaf = name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, Conv2dAsLinear(module))
    return model


def count_fvcore(model: nn.Module, inputs: dict) -> dict[str, int]:
    """MACs per category by fvcore's FlopCountAnalysis (JIT trace); any device. On meta the
    model's Conv2d layers are swapped for Conv2dAsLinear first (in place)."""
    if any(p.is_meta for p in model.parameters()):
        _convs_as_linear(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        # traced with positional inputs: example_inputs keeps the forward's argument order
        analysis = FlopCountAnalysis(model, tuple(inputs.values()))
        analysis.set_op_handle(**_fvcore_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        with torch.no_grad():
            inclusive = {name: int(v) for name, v in analysis.by_module().items()}
    return _split_by_category(inclusive, _categories(model))


#################################################################################
#                                  Rows                                         #
#################################################################################

def count(work: Workload, counter: str, backend: str = "sdpa",
          dtype: str | torch.dtype = "float32") -> dict:
    """One row for a validated workload: the counter's MACs per category, in every convention.

    `torch` and `fvcore` count the model built on meta in `dtype`. Every row reports parameters
    (counted on the built model for `torch`/`fvcore`) and activation MiB at `dtype`'s element
    size: `torch` counts the activation elements itself (outputs of every MAC op, SDPA as its
    math path on meta), `fvcore` leaves them empty. Bytes are elements × the element size, as in
    the closed form: on meta, torch's SDPA math path upcasts half/bfloat16 products to float32,
    which no fused kernel stores. A failed count is a row whose `status` says why (`error: …`)."""
    if counter not in COUNTERS:
        raise ValueError(f"unknown counter {counter!r}; allowed: {', '.join(COUNTERS)}")
    dtype = dtype_name(dtype)
    row = {**work.describe(), "counter": counter}
    if counter == "analytic":
        env = provenance("none (closed form)", "any", dtype)
        return {**env, **row, **complexity.closed_form(work, dtype), "status": "ok"}
    env = provenance(device_label("meta"), backend, dtype)
    try:
        model = ptdit.build(work.config, device="meta", dtype=dtype)
        model.name = work.name
        set_backend(model, backend)
        inputs = example_inputs(model, work)
        params = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        act = None
        if counter == "torch":
            per_category, elements = count_torch(model, inputs)
            act = elements * getattr(torch, dtype).itemsize / 2**20
        else:
            per_category = count_fvcore(model, inputs)
        other = per_category.pop("other")
        if other:
            raise RuntimeError(f"{other} MACs outside the known module categories")
        row.update(params=params, params_trainable=trainable,
                   **complexity.cost_columns(per_category), activation_mib=act,
                   attn_scores_mib=None, status="ok")
    except Exception as err:   # failure is data: the row says what went wrong
        row["status"] = f"error: {type(err).__name__}: {err}"
    return {**env, **row}


KEY = ("model", "resolution", "latent_frames", "batch", "text_tokens", "window", "counter",
       "backend", "dtype")   # the columns that name one count in a store


def workloads(models: Iterable[str], resolutions: Iterable[int],
              frames: Iterable[int | None] = (None,), batch: int = 1,
              text_tokens: int = DEFAULT_TEXT_TOKENS,
              window: tuple[int, int, int] | None = None, **overrides) -> list[Workload]:
    """Every model × resolution × frames (latent frames; None: an image), each validated (a
    ValueError raised) before anything is counted."""
    return [Workload(m, r, f, batch, text_tokens, window, overrides)
            for m in models for r in resolutions for f in frames]


def key(work: Workload, counter: str, backend: str, dtype: str) -> tuple:
    """The KEY values of the row `count(work, counter, backend, dtype)` gives."""
    shape = work.describe()
    fields = {**shape, "counter": counter, "dtype": dtype_name(dtype),
              "backend": "any" if counter == "analytic" else backend}
    return tuple(fields[k] for k in KEY)


def sweep(works: Iterable[Workload], counters: Iterable[str] = ("analytic",),
          backend: str = "sdpa", dtype: str | torch.dtype = "float32",
          skip: Collection[tuple] = ()) -> Iterator[dict]:
    """A row per workload × counter, as each count finishes, leaving out the cases whose `key`
    is in `skip` (those a store already holds). Arguments are checked before the first count."""
    counters, dtype = list(counters), dtype_name(dtype)
    for c in counters:
        if c not in COUNTERS:
            raise ValueError(f"unknown counter {c!r}; allowed: {', '.join(COUNTERS)}")
    check_backend(backend)
    for work in works:
        for c in counters:
            if key(work, c, backend, dtype) not in skip:
                yield count(work, c, backend, dtype)


def run(models: Iterable[str], resolutions: Iterable, frames: Iterable[int] | None = None,
        batch: int = 1, text_tokens: int = DEFAULT_TEXT_TOKENS,
        window: tuple[int, int, int] | None = None, counters: Iterable[str] = ("analytic",),
        backend: str = "sdpa", dtype: str = "float32", store=None) -> list[dict]:
    """`ptdit flops`: a row per model × resolution × frames × counter. With `store` (a path:
    checked, then locked for the run) each row is appended as it finishes, the cases it already
    holds are not counted again, and the rows returned are every case asked for, stored
    earlier or now."""
    from .store import Store, check_writable

    works = workloads(models, resolutions, frames or (None,), batch, text_tokens,
                      tuple(window) if window else None)
    counters = list(counters)
    if store is None:
        return list(sweep(works, counters, backend, dtype))
    store = Store(check_writable(store, "--store"), "flops")
    with store.lock():
        for row in sweep(works, counters, backend, dtype, skip=store.done(KEY)):
            store.append(row)
        stored = store.latest(KEY)
    return [stored[key(w, c, backend, dtype)] for w in works for c in counters]


def table(rows: list[dict], fmt: str) -> str:
    """The rows as `ptdit flops` prints them: tables leave out provenance and the categories
    that are zero in every row."""
    import pandas as pd

    from .markdown import PROVENANCE, render

    df = pd.DataFrame(rows)
    if fmt in ("table", "markdown"):
        zero = [c for c in df.columns if c.startswith(("linear_", "attn_"))
                and c.endswith("_gmacs") and not df[c].fillna(0).any()]
        df = df.drop(columns=[c for c in (*PROVENANCE, *zero) if c in df])
    return render(df, fmt)
