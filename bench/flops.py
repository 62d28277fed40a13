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

Counter traps handled here (shared/reference/environment.md §2, baselines_and_tools.md §B):
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

import functools
import platform
import subprocess
from pathlib import Path
import warnings
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
# Private, and the only private torch import of ptdit/bench: torch has no public hook that sees
# every aten op with its output (TorchFunctionMode sees Python-level calls, before SDPA and
# F.linear decompose into the mm/bmm whose outputs are the activations counted here), and
# FlopCounterMode itself is built on this class. If it moves, only _MacOutputs needs changing.
from torch.utils._python_dispatch import TorchDispatchMode

import ptdit
from ptdit import complexity
from ptdit.attention import BACKENDS, set_backend
from ptdit.models.inputs import VAE_SPATIAL, LatentShape

COUNTERS = ("analytic", "torch", "fvcore")
SCHEMA_VERSION = 1
MAC_OPS = (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.bmm,
           torch.ops.aten.baddbmm, torch.ops.aten.convolution)


#################################################################################
#                        Inputs and module categories                           #
#################################################################################

def example_inputs(model: nn.Module, shape: LatentShape, text_tokens: int,
                   device: str | torch.device = "meta") -> tuple[Tensor | None, ...]:
    """Fresh random positional forward inputs for `model` (empty tensors on meta), latents and
    captions in the model's dtype: latents (B, C, H, W) or (B, C, F, H, W), timesteps (B,), and
    captions (B, L, caption_channels) or labels (B,); for a micro-conditioned PixArt also
    text_mask None, resolution (B, 2) in pixels and aspect_ratio (B, 1) = height / width."""
    config, B = model.config, shape.batch
    dtype = next(model.parameters()).dtype
    dims = (B, shape.channels) + ((shape.frames,) if shape.video else ())
    x = torch.randn(*dims, shape.height, shape.width, device=device, dtype=dtype)
    t = torch.randint(0, 1000, (B,), device=device).float()
    if complexity.is_text_conditioned(config):
        cond = torch.randn(B, text_tokens, config.caption_channels, device=device, dtype=dtype)
    else:
        cond = torch.randint(0, config.num_classes, (B,), device=device)
    if not complexity.is_micro_conditioned(config):
        return x, t, cond
    pixels = [shape.height * VAE_SPATIAL, shape.width * VAE_SPATIAL]
    resolution = torch.tensor([pixels] * B, device=device, dtype=torch.float32)
    aspect_ratio = torch.full((B, 1), shape.height / shape.width, device=device)
    return x, t, cond, None, resolution, aspect_ratio


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


def count_torch(model: nn.Module, inputs: tuple) -> tuple[dict[str, int], int]:
    """(MACs per category, MAC-op output elements) by FlopCounterMode; any device."""
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_cpu_flops}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    outputs = _MacOutputs()
    with torch.no_grad(), counter, outputs:
        model(*inputs)
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


def count_fvcore(model: nn.Module, inputs: tuple) -> dict[str, int]:
    """MACs per category by fvcore's FlopCountAnalysis (JIT trace); any device. On meta the
    model's Conv2d layers are swapped for Conv2dAsLinear first (in place)."""
    if any(p.is_meta for p in model.parameters()):
        _convs_as_linear(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fvcore.nn import FlopCountAnalysis

        analysis = FlopCountAnalysis(model, inputs)
        analysis.set_op_handle(**_fvcore_handles())
        analysis.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        analysis.tracer_warnings("none")
        with torch.no_grad():
            inclusive = {name: int(v) for name, v in analysis.by_module().items()}
    return _split_by_category(inclusive, _categories(model))


#################################################################################
#                                  Rows                                         #
#################################################################################

@functools.cache
def _git_sha() -> str:
    """The commit of this code (not of the working directory), '+dirty' with local changes;
    'unknown' outside a git checkout (e.g. an installed wheel)."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5,
                              check=True, cwd=Path(__file__).resolve().parent).stdout.strip()
    try:
        sha = git("rev-parse", "--short=12", "HEAD")
        return sha + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment(device: str, backend: str, dtype: str = "float32") -> dict:
    """DESIGN.md's provenance fields of a row."""
    return {
        "schema_version": SCHEMA_VERSION,
        "git_sha": _git_sha(),
        "time_utc": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "host": platform.node(),
        "device": device,
        "torch": torch.__version__,
        "dtype": dtype,
        "backend": backend,
    }


def count(work: complexity.Workload, counter: str, backend: str = "sdpa",
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
    dtype = complexity.dtype_name(dtype)
    row = {**complexity.describe_workload(work), "counter": counter}
    if counter == "analytic":
        env = environment("none (closed form)", "any", dtype)
        return {**env, **row, **complexity.closed_form(work, dtype), "status": "ok"}
    env = environment("meta (shapes only)", backend, dtype)
    try:
        model = ptdit.build(work.name, device="meta", dtype=getattr(torch, dtype),
                            **work.overrides)
        set_backend(model, backend)
        inputs = example_inputs(model, work.shape, work.text_tokens)
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
    except Exception as err:   # failure is data: the row says what went wrong (STYLE.md §4)
        row["status"] = f"error: {type(err).__name__}: {err}"
    return {**env, **row}


def sweep(models: Iterable[str], resolutions: Iterable[int],
          frames: Iterable[int | None] = (None,), batch: int = 1,
          text_tokens: int = complexity.DEFAULT_TEXT_TOKENS,
          counters: Iterable[str] = ("analytic",), backend: str = "sdpa",
          dtype: str | torch.dtype = "float32", **overrides) -> Iterator[dict]:
    """Rows for every model × resolution × frames × counter; frames are latent frames (None: an
    image). Every request is validated (a ValueError raised) before the first count starts."""
    dtype = complexity.dtype_name(dtype)
    counters = list(counters)
    for c in counters:
        if c not in COUNTERS:
            raise ValueError(f"unknown counter {c!r}; allowed: {', '.join(COUNTERS)}")
    works = [complexity.workload(m, r, f, batch, text_tokens, **overrides)
             for m in models for r in resolutions for f in frames]
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    for work in works:
        for c in counters:
            yield count(work, c, backend, dtype)

