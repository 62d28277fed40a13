"""Attention for DiT, PixArt-alpha and PT-DiT: modules, backends, window layouts and masks.

Two modules cover every attention in the three models:
- `Attention`: self-attention with a fused qkv projection (timm / DiT names `qkv`, `proj`);
- `CrossAttention`: queries from one stream, keys/values from another (PixArt names `q_linear`,
  `kv_linear`, `proj`).
Each instance has a `kind` (global, proxy, proxy_cross, window, shift_window, text_cross) that
says which role it plays, a `backend` and an optional `observer`.

Backends (`BACKENDS`, name -> function; `set_backend`, or `with attention_backend(model, name)`
for a block of code):
- `sdpa`: torch.nn.functional.scaled_dot_product_attention (the default; fused kernels);
- `math`: explicit softmax(q·kᵀ/√d + bias)·v, the only backend that forms the probabilities.
Observers (`with observe(model, fn)`) are called by `math` only, as `fn(call, probs)`: `call`
is an `AttentionCall` (qualified module name, kind, backend, and for window kinds the grid and
window of that call), `probs` is (rows, heads, Lq, Lk). Setting an observer on a module that
runs another backend warns rather than switching it, so a timed or counted run is never changed
behind its back.

Window attention never builds an N×N mask over the sample: PT-DiT keeps its tokens in a
window-major layout, so a window is a batch row and window attention is batched attention. The
shifted-window rule is written once, as an attention-gym mask function over (window row,
query, key) (`shift_window_mask_mod`); the additive bias (nW, 1, N, N) is its dense evaluation,
built once per shape and shared by every sample: rows arrive as (B, nW, N, D) and the bias
broadcasts over B (one 4-D SDPA call per sample keeps the fused kernel; see
`Attention.forward`). In float32 it takes 4·nW·N² bytes whatever the batch, e.g. 192 MiB for
48 latent frames at 1024 px.
"""

import warnings
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager
from functools import lru_cache, partial
from math import prod
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

KINDS = ("global", "proxy", "proxy_cross", "window", "shift_window", "text_cross")
MASK_VALUE = -10000.0  # additive bias for masked keys, as the PT-DiT release and diffusers use


class Windows(NamedTuple):
    """A token grid (F, h, w) cut into windows (c0, c1, c2), both in tokens."""
    grid: tuple[int, int, int]
    window: tuple[int, int, int]

    @property
    def num_windows(self) -> int:
        return window_count(self.grid, self.window)

    @property
    def window_tokens(self) -> int:
        return prod(self.window)


class AttentionCall(NamedTuple):
    """One attention call, as its observer sees it beside the probabilities (rows, H, Lq, Lk).
    Rows are sample-major: for window kinds, row r is window r % nW of sample r // nW (windows
    in raster order over the window grid, of the rolled grid for shift_window); otherwise row r
    is sample r."""
    name: str                                  # qualified name in the model, "blocks.3.attn"
    kind: str
    backend: str
    grid: tuple[int, int, int] | None          # window kinds: token grid (F, h, w)
    window: tuple[int, int, int] | None        # window kinds: window (c0, c1, c2) in tokens
    batch: int                                 # samples in the call


Observer = Callable[[AttentionCall, Tensor], None]


#################################################################################
#                             Attention primitive                               #
#################################################################################

def _sdpa(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, observe) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


def _math(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, observe) -> Tensor:
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    probs = scores.softmax(dim=-1)
    if observe is not None:
        observe(probs.reshape(-1, *probs.shape[-3:]))        # (rows, H, Lq, Lk)
    return probs @ v


# name -> fn(q, k, v, bias, observe): softmax(q·kᵀ/√d + bias)·v over (..., heads, L, d), with
# `observe(probs)` called on the probabilities (rows, heads, Lq, Lk) by backends that form them
BACKENDS: dict[str, Callable[..., Tensor]] = {"sdpa": _sdpa, "math": _math}


def check_backend(name) -> str:
    """`name` if it is a registered backend; ValueError naming the registered ones."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; allowed: {', '.join(BACKENDS)}")
    return name


def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, backend: str,
           observe: Callable[[Tensor], None] | None = None) -> Tensor:
    """softmax(q·kᵀ/√d + bias)·v over (..., heads, L, d) by the named backend; bias
    broadcasts to (..., heads, Lq, Lk); `observe` gets the probabilities (rows, heads, Lq, Lk)
    where the backend forms them (math)."""
    return BACKENDS[backend](q, k, v, bias, observe)


class _AttentionBase(nn.Module):
    def __init__(self, dim: int, num_heads: int, kind: str):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by {num_heads} heads")
        if kind not in KINDS:
            raise ValueError(f"unknown attention kind {kind!r}; allowed: {', '.join(KINDS)}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.kind = kind
        self.backend = "sdpa"
        self.observer: Observer | None = None
        self.qualified_name = ""        # set by name_attention_modules (observe calls it)
        self._warned_unobserved = False

    def heads(self, x: Tensor) -> Tensor:
        """(..., L, D) -> (..., H, L, d)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def merge(self, x: Tensor) -> Tensor:
        """(..., H, L, d) -> (..., L, D)."""
        return x.transpose(-3, -2).flatten(-2)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None,
               windows: Windows | None = None) -> Tensor:
        """`attend` by this module's backend; its observer gets this call's record."""
        return attend(q, k, v, bias, self.backend, self._observe(q, windows))

    def _observe(self, q: Tensor, windows: Windows | None) -> Callable[[Tensor], None] | None:
        if self.observer is None:
            return None
        if self.backend != "math":
            if not self._warned_unobserved:
                self._warned_unobserved = True
                warnings.warn(_unobserved([self.qualified_name or self.kind]), UserWarning,
                              stacklevel=3)
            return None
        rows = q.shape[:-3].numel()
        grid, window = windows if windows is not None else (None, None)
        batch = rows // windows.num_windows if windows is not None else rows
        call = AttentionCall(self.qualified_name, self.kind, self.backend, grid, window, batch)
        return partial(self.observer, call)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, heads={self.num_heads}, backend={self.backend}"


class Attention(_AttentionBase):
    """Multi-head self-attention over the last-but-one axis of (..., L, D)."""

    def __init__(self, dim: int, num_heads: int, kind: str = "global", qkv_bias: bool = True):
        super().__init__(dim, num_heads, kind)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bias: Tensor | None = None, windows: Windows | None = None
                ) -> Tensor:
        """x (..., L, D) -> (..., L, D); bias broadcasts to (..., H, L, L); `windows`: the grid
        and window a window kind's rows come from, for observers.

        A 4-D x (S, R, L, D) is S samples of R rows with a bias (R, 1, L, L) shared by the
        samples (PT-DiT's shifted windows). Math attends to it at once; the fused backends take
        one sample at a time, since 5-D SDPA has no fused kernel and no 4-D view of the S·R
        rows broadcasts a per-row bias. The loop runs through the projections too, so that
        autograd keeps no second copy of the attention output."""
        if x.dim() == 4 and self.backend != "math":
            return torch.stack([self._rows(xs, bias, windows) for xs in x])
        return self._rows(x, bias, windows)

    def _rows(self, x: Tensor, bias: Tensor | None, windows: Windows | None) -> Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)   # (..., H, L, d) each
        return self.proj(self.merge(self.attend(q, k, v, bias, windows)))


class CrossAttention(_AttentionBase):
    """Multi-head attention from x (..., Lq, D) to a context (..., Lk, D)."""

    def __init__(self, dim: int, num_heads: int, kind: str, qkv_bias: bool = True):
        super().__init__(dim, num_heads, kind)
        self.q_linear = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_linear = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, context: Tensor, bias: Tensor | None = None) -> Tensor:
        q = self.heads(self.q_linear(x))
        kv = self.kv_linear(context).unflatten(-1, (2, self.num_heads, self.head_dim))
        k, v = kv.movedim(-3, 0).transpose(-3, -2).unbind(0)
        return self.proj(self.merge(self.attend(q, k, v, bias)))


def text_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, L) keep-mask (1 keeps) -> additive bias (B, 1, 1, L): 0 kept, -10000 dropped."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * MASK_VALUE)[:, None, None, :]


#################################################################################
#                     Backends and observers of a whole model                   #
#################################################################################

def attention_modules(model: nn.Module) -> dict[str, _AttentionBase]:
    """Qualified name -> attention module, in forward order within each block."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _AttentionBase)}


def name_attention_modules(model: nn.Module) -> dict[str, _AttentionBase]:
    """Sets each attention module's `qualified_name` (what its observer's records carry) to its
    name in `model`; returns them by name."""
    modules = attention_modules(model)
    for name, m in modules.items():
        m.qualified_name = name
    return modules


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switches every attention module of `model` to `backend` (in place); returns the model."""
    check_backend(backend)
    for m in attention_modules(model).values():
        m.backend = backend
    return model


@contextmanager
def attention_backend(model: nn.Module, backend: str) -> Iterator[nn.Module]:
    """`with attention_backend(model, "math"):` runs the body with every attention module on
    `backend`, then gives each module back its own previous backend, even if the body raises."""
    check_backend(backend)
    previous = {m: m.backend for m in attention_modules(model).values()}
    set_backend(model, backend)
    try:
        yield model
    finally:
        for m, name in previous.items():
            m.backend = name


@contextmanager
def observe(model: nn.Module, observer: Observer, kinds: Collection[str] | None = None,
            names: Collection[str] | None = None) -> Iterator[dict[str, _AttentionBase]]:
    """`with observe(model, fn):` sets `observer` on the attention modules of `model` (those of
    `kinds` and `names`, if given) for the body, then restores each one's own; yields the
    observed modules by qualified name. Only math calls observers: modules on another backend
    are named in a UserWarning (enter `attention_backend(model, "math")` first)."""
    modules = name_attention_modules(model)
    _check_subset("kinds", kinds, KINDS)
    _check_subset("names", names, modules)
    chosen = {n: m for n, m in modules.items()
              if (kinds is None or m.kind in kinds) and (names is None or n in names)}
    if not chosen:
        present = ", ".join(sorted({m.kind for m in modules.values()})) or "none"
        raise ValueError(f"no attention module matches kinds={kinds}, names={names}; this "
                         f"model's kinds: {present}")
    idle = [n for n, m in chosen.items() if m.backend != "math"]
    if idle:
        warnings.warn(_unobserved(idle), UserWarning, stacklevel=3)
    previous = {m: m.observer for m in chosen.values()}
    try:
        for m in chosen.values():
            m.observer, m._warned_unobserved = observer, False
        yield chosen
    finally:
        for m, fn in previous.items():
            m.observer = fn


def _check_subset(what: str, given: Collection[str] | None, allowed: Collection[str]) -> None:
    unknown = [g for g in given or () if g not in allowed]
    if unknown:
        shown = ", ".join(list(allowed)[:8]) + (", …" if len(allowed) > 8 else "")
        raise ValueError(f"unknown attention module {what} {unknown}; allowed: {shown}")


def _unobserved(names: list[str]) -> str:
    shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
    return (f"attention observer set on {len(names)} module(s) not on the 'math' backend "
            f"({shown}), and only 'math' calls observers: use attention_backend(model, 'math')")


#################################################################################
#                      Window-major layout (PT-DiT)                             #
#################################################################################
# A sample's token grid (F, H, W) is cut into windows (c0, c1, c2). Window-major order lists the
# windows in raster order (frame-window, row-window, column-window) and, inside each, its tokens
# in raster order of their offsets — the layout of the released PT-DiT. A (B, T, D) tensor in
# this order viewed as (B·nW, N, D) holds one window per row.

def _check_divides(grid: tuple[int, ...], window: tuple[int, ...]) -> None:
    for n, c, axis in zip(grid, window, ("frames", "height", "width")):
        if n % c:
            raise ValueError(f"window {window} does not divide the token grid {grid} ({axis})")


def window_partition(x: Tensor, window: tuple[int, int, int]) -> Tensor:
    """(B, F, H, W, D) grid -> (B, nW·N, D) in window-major order."""
    B, Fr, H, W, D = x.shape
    c0, c1, c2 = window
    _check_divides((Fr, H, W), window)
    x = x.reshape(B, Fr // c0, c0, H // c1, c1, W // c2, c2, D)
    return x.permute(0, 1, 3, 5, 2, 4, 6, 7).reshape(B, -1, D)


def window_reverse(x: Tensor, grid: tuple[int, int, int], window: tuple[int, int, int]) -> Tensor:
    """(B, nW·N, D) window-major -> (B, F, H, W, D) grid; the inverse of window_partition."""
    B, _, D = x.shape
    Fr, H, W = grid
    c0, c1, c2 = window
    x = x.reshape(B, Fr // c0, H // c1, W // c2, c0, c1, c2, D)
    return x.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(B, Fr, H, W, D)


def window_order(grid: tuple[int, int, int], window: tuple[int, int, int]) -> Tensor:
    """Raster index of the token at each window-major position, (T,) int64."""
    raster = torch.arange(grid[0] * grid[1] * grid[2]).reshape(1, *grid, 1)
    return window_partition(raster, window).flatten()


def window_count(grid: tuple[int, int, int], window: tuple[int, int, int]) -> int:
    return (grid[0] // window[0]) * (grid[1] // window[1]) * (grid[2] // window[2])


def proxy_tokens(x: Tensor, window_tokens: int) -> Tensor:
    """(B, nW·N, D) window-major -> (B, nW, D): one proxy per window, the mean of its tokens."""
    B, T, D = x.shape
    return x.reshape(B, T // window_tokens, window_tokens, D).mean(dim=2)


def shift_amounts(window: tuple[int, int, int]) -> tuple[int, int, int]:
    """Half a window along each axis: the cyclic shift of the shifted-window branch."""
    return tuple(c // 2 for c in window)


def shift_windows(x: Tensor, grid: tuple[int, int, int], window: tuple[int, int, int],
                  inverse: bool = False) -> Tensor:
    """Window-major (B, T, D) -> the window-major layout of the grid rolled by -shift (+shift if
    `inverse`), so that shifted windows become rows of (B·nW, N, D)."""
    shifts = shift_amounts(window)
    if not inverse:
        shifts = tuple(-s for s in shifts)
    g = torch.roll(window_reverse(x, grid, window), shifts=shifts, dims=(1, 2, 3))
    return window_partition(g, window)


@lru_cache(maxsize=32)
def shift_permutation(grid: tuple[int, int, int], window: tuple[int, int, int]
                      ) -> tuple[Tensor, Tensor]:
    """(shift, unshift) index vectors (T,) on the CPU: `x[:, shift]` is `shift_windows(x)` and
    `x[:, unshift]` its inverse, as one gather each instead of reverse + roll + partition."""
    T = grid[0] * grid[1] * grid[2]
    positions = torch.arange(T).reshape(1, T, 1)
    shift = shift_windows(positions, grid, window).flatten()
    return shift, torch.argsort(shift)


#################################################################################
#                   Mask functions (attention-gym style)                        #
#################################################################################
# A mask_mod(b, h, q_idx, kv_idx) -> bool says which keys a query may see, elementwise over
# broadcast index tensors, as FlexAttention and attention-gym take it; `mask_bias` evaluates one
# densely into the additive bias the SDPA and math backends take.

MaskMod = Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]


def _unravel(index: Tensor, dims: tuple[int, int, int]) -> tuple[Tensor, Tensor, Tensor]:
    """Raster index over dims (a, b, c) -> its coordinates (i, j, k)."""
    return index // (dims[1] * dims[2]), index // dims[2] % dims[1], index % dims[2]


def shift_window_mask_mod(grid: tuple[int, int, int], window: tuple[int, int, int]) -> MaskMod:
    """Shifted-window attention on the grid rolled by -window//2, as mask_mod(b, h, q, kv): b is
    a window row of one sample (the window's raster index over the window grid), q and kv are
    token offsets in it (raster order inside the window), heads h do not matter. True where
    query and key were neighbours before the roll: on each axis, both or neither lies in the
    last half-window, whose tokens wrapped around (Swin's same-region rule)."""
    _check_divides(grid, window)
    counts = tuple(n // c for n, c in zip(grid, window))

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        same = []
        for w, q, kv, n, c in zip(_unravel(b, counts), _unravel(q_idx, window),
                                  _unravel(kv_idx, window), grid, window):
            wrapped = n - c // 2        # rolled coordinates from here on hold wrapped tokens
            same.append((w * c + q >= wrapped) == (w * c + kv >= wrapped))
        return same[0] & same[1] & same[2]

    mask_mod.__name__ = "shift_window_g{}x{}x{}_w{}x{}x{}".format(*grid, *window)
    return mask_mod


def mask_bias(mask_mod: MaskMod, rows: int, q_len: int, kv_len: int, dtype: torch.dtype,
              device: torch.device | str) -> Tensor:
    """`mask_mod` evaluated densely over b < rows as an additive bias (rows, 1, Lq, Lk), shared
    by the heads: 0 where it allows, -10000 elsewhere."""
    b, q, kv = (torch.arange(n, device=device) for n in (rows, q_len, kv_len))
    allowed = mask_mod(b[:, None, None], torch.zeros((), dtype=torch.int64, device=device),
                       q[None, :, None], kv[None, None, :])
    bias = torch.zeros(rows, q_len, kv_len, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed, MASK_VALUE).unsqueeze(1)


def shift_window_bias(grid: tuple[int, int, int], window: tuple[int, int, int],
                      dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Additive mask (nW, 1, N, N) for shifted-window attention on the rolled grid, the dense
    `shift_window_mask_mod`: 0 where query and key lie in the same Swin region, -10000
    elsewhere. Depends only on (grid, window), so every sample shares it."""
    N = prod(window)
    return mask_bias(shift_window_mask_mod(grid, window), window_count(grid, window), N, N,
                     dtype, device)
