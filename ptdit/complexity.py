"""Closed-form cost of DiT, PixArt-alpha and PT-DiT: MACs per module category, parameters and
activation bytes of one forward pass, from the configuration alone (pure arithmetic, any size).

Counting convention (docs/complexity.md):
- A MAC is one multiply-accumulate. Linear layers count rows·in·out, the patch-embed Conv2d
  counts output positions·D·C·p², biases count nothing. Attention counts its two products,
  QKᵀ (Lq·Lk·d per head) and softmax(·)·V (Lq·Lk·d per head), densely: masked entries of the
  shifted-window bias are computed, so they are counted.
- Norms, softmax, GELU/SiLU, modulation, residual adds, proxy averaging, positions and
  embedding-table lookups are elementwise or free, and count 0 MACs in every convention.
- Conventions: `linear_gmacs` (the PT-DiT paper's figures: linear/conv layers only),
  `total_gmacs` = linear + attention (the DiT paper's Gflops), `total_gflops` = 2·total_gmacs.

Categories: linear layers split into attention projections (`attn_proj`: q/k/v/out of every
attention plus PT-DiT's zero-initialised `proxy_out` and `shift_out`), `mlp`, conditioning
(`cond`: timestep/label/caption embedders, PixArtMS's size and aspect-ratio embedders,
adaLN-single `t_block`, DiT's per-block adaLN) and `io` (patch embed and final layer);
attention products split by the module's `kind`.

Parameters are what `model.parameters()` holds (DiT's frozen position table included, as
non-trainable); buffers are not parameters (PixArt's null caption `y_embedding` is a buffer).

Activation bytes count the outputs of every MAC-counted operation as the unfused ("math")
attention backend materialises them: each linear/conv output, each QKᵀ score matrix and each
attention output, at the element size of the row's `dtype` (MACs and parameters do not depend
on it). `attn_scores_mib` is the score-matrix part, which fused SDPA never stores.
"""

import math
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .attention import KINDS
from .checks import dtype_name
from .models import DiTConfig, PixArtConfig
from .workload import DEFAULT_TEXT_TOKENS, Workload

LINEAR_CATEGORIES = ("attn_proj", "mlp", "cond", "io")
ATTENTION_CATEGORIES = KINDS
FREQUENCY_CHANNELS = 256    # sinusoidal timestep features fed to the timestep MLP


@dataclass(frozen=True)
class Linear:
    """A linear layer (or the patch-embed conv as one) applied to `rows` vectors."""
    category: str
    rows: int
    fan_in: int
    fan_out: int
    bias: bool = True


@dataclass(frozen=True)
class Products:
    """The QKᵀ and AV products of one attention call over `problems` independent sequences."""
    kind: str
    problems: int
    heads: int
    lq: int
    lk: int
    head_dim: int


@dataclass(frozen=True)
class Table:
    """Parameters that do no MACs: embedding tables, modulation tables, frozen positions."""
    numel: int
    trainable: bool = True


#################################################################################
#                     The layers of one forward pass, in order                  #
#################################################################################

def _self_attention(kind: str, problems: int, length: int, D: int, heads: int):
    rows = problems * length
    yield Linear("attn_proj", rows, D, 3 * D)
    yield Products(kind, problems, heads, length, length, D // heads)
    yield Linear("attn_proj", rows, D, D)


def _cross_attention(kind: str, problems: int, lq: int, lk: int, D: int, heads: int):
    yield Linear("attn_proj", problems * lq, D, D)
    yield Linear("attn_proj", problems * lk, D, 2 * D)
    yield Products(kind, problems, heads, lq, lk, D // heads)
    yield Linear("attn_proj", problems * lq, D, D)


def _mlp(rows: int, D: int, mlp_ratio: float):
    hidden = int(D * mlp_ratio)
    yield Linear("mlp", rows, D, hidden)
    yield Linear("mlp", rows, hidden, D)


def layers(work: Workload) -> Iterator[Linear | Products | Table]:
    """Every MAC-doing layer call and every MAC-free parameter of the forward pass."""
    c, s = work.config, work.shape
    B, T, D, H = s.batch, s.tokens, c.hidden_size, c.num_heads
    p, L = c.patch_size, work.text_tokens
    text = c.condition == "text"

    yield Linear("io", B * T, c.in_channels * p * p, D)                 # patch embed (Conv2d)
    yield Linear("cond", B, FREQUENCY_CHANNELS, D)                       # timestep MLP
    yield Linear("cond", B, D, D)
    if getattr(c, "micro_condition", False):   # PixArtMS: timestep MLPs at width D/3, per scalar
        for scalars in (2, 1):    # csize_embedder (height, width), ar_embedder (aspect ratio)
            yield Linear("cond", B * scalars, FREQUENCY_CHANNELS, D // 3)
            yield Linear("cond", B * scalars, D // 3, D // 3)
    if text:
        yield Linear("cond", B * L, c.caption_channels, D)               # caption MLP
        yield Linear("cond", B * L, D, D)
    else:
        yield Table((c.num_classes + (c.class_dropout_prob > 0)) * D)    # label table
    if not isinstance(c, DiTConfig):
        yield Linear("cond", B, D, 6 * D)                                # adaLN-single t_block

    for _ in range(c.depth):
        if isinstance(c, DiTConfig):
            yield Linear("cond", B, D, 6 * D)                            # per-block adaLN
            yield from _self_attention("global", B, T, D, H)
        elif isinstance(c, PixArtConfig):
            yield Table(6 * D)
            yield from _self_attention("global", B, T, D, H)
            yield from _cross_attention("text_cross", B, T, L, D, H)
        else:
            yield Table(6 * D)
            n = math.prod(work.window)
            M = T // n                                                   # proxies = windows
            if c.giim:
                yield from _self_attention("proxy", B, M, D, H)
                yield from _cross_attention("proxy_cross", B, T, M, D, H)
                yield Linear("attn_proj", B * T, D, D)                   # proxy_out
            yield from _self_attention("window", B * M, n, D, H)
            if c.shift_window:
                yield Table(3 * D)
                yield from _self_attention("shift_window", B * M, n, D, H)
                yield Linear("attn_proj", B * T, D, D)                   # shift_out
            if text:
                yield from _cross_attention("text_cross", B, T, L, D, H)
        yield from _mlp(B * T, D, c.mlp_ratio)

    if isinstance(c, DiTConfig):
        yield Linear("io", B, D, 2 * D)                                  # final adaLN
        yield Table(c.base_grid ** 2 * D, trainable=False)               # frozen pos_embed
    else:
        yield Table(2 * D)                                               # final table
    yield Linear("io", B * T, D, p * p * c.out_channels)


#################################################################################
#                                 Totals                                        #
#################################################################################

def macs(work: Workload) -> dict[str, int]:
    """Exact MACs per category: 'linear_<cat>' for LINEAR_CATEGORIES, 'attn_<kind>' for KINDS."""
    total = Counter({f"linear_{c}": 0 for c in LINEAR_CATEGORIES})
    total.update({f"attn_{k}": 0 for k in ATTENTION_CATEGORIES})
    for layer in layers(work):
        if isinstance(layer, Linear):
            total[f"linear_{layer.category}"] += layer.rows * layer.fan_in * layer.fan_out
        elif isinstance(layer, Products):
            qk = layer.problems * layer.heads * layer.lq * layer.lk * layer.head_dim
            total[f"attn_{layer.kind}"] += 2 * qk                       # QKᵀ + AV
    return dict(total)


def parameters(work: Workload) -> tuple[int, int]:
    """(all parameters, trainable parameters): what model.parameters() holds."""
    every = trainable = 0
    for layer in layers(work):
        if isinstance(layer, Linear):
            n = layer.fan_in * layer.fan_out + layer.fan_out * layer.bias
            every, trainable = every + n, trainable + n
        elif isinstance(layer, Table):
            every += layer.numel
            trainable += layer.numel * layer.trainable
    # `layers` lists calls, and every layer is called exactly once per forward pass.
    return every, trainable


def activation_elements(work: Workload) -> tuple[int, int]:
    """(all MAC-op output elements, attention-score elements) of one forward pass, as the math
    backend materialises them."""
    every = scores = 0
    for layer in layers(work):
        if isinstance(layer, Linear):
            every += layer.rows * layer.fan_out
        elif isinstance(layer, Products):
            s = layer.problems * layer.heads * layer.lq * layer.lk
            scores += s
            every += s + layer.problems * layer.heads * layer.lq * layer.head_dim
    return every, scores


def cost_columns(category_macs: dict[str, int]) -> dict[str, float]:
    """The GMAC columns of a row from per-category MACs, in every convention."""
    linear = sum(v for k, v in category_macs.items() if k.startswith("linear_"))
    attention = sum(v for k, v in category_macs.items() if k.startswith("attn_"))
    row = {f"{k}_gmacs": v / 1e9 for k, v in category_macs.items()}
    row["linear_gmacs"] = linear / 1e9
    row["attention_gmacs"] = attention / 1e9
    row["total_gmacs"] = (linear + attention) / 1e9
    row["total_gflops"] = 2 * row["total_gmacs"]
    return row


def closed_form(work: Workload, dtype: str | torch.dtype = "float32") -> dict:
    """The closed form's cost columns of a workload: parameters, GMACs per category and in every
    convention, and activation MiB at `dtype`'s element size."""
    dtype = dtype_name(dtype)
    every, trainable = parameters(work)
    act, scores = activation_elements(work)
    mib = getattr(torch, dtype).itemsize / 2**20
    return {
        "dtype": dtype,
        "params": every,
        "params_trainable": trainable,
        **cost_columns(macs(work)),
        "activation_mib": act * mib,
        "attn_scores_mib": scores * mib,
    }


def costs(name: str, resolution: int, frames: int | None = None, batch: int = 1,
          text_tokens: int = DEFAULT_TEXT_TOKENS, dtype: str | torch.dtype = "float32",
          window: tuple[int, int, int] | None = None, **overrides) -> dict:
    """One row of closed-form costs: shape columns and `closed_form`'s columns (activation MiB
    at `dtype`: float32, bfloat16, float16 or float64)."""
    work = Workload(name, resolution, frames, batch, text_tokens, window, overrides)
    return {**work.describe(), "counter": "analytic", **closed_form(work, dtype)}
