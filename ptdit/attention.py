"""Attention for DiT, PixArt-alpha and PT-DiT: modules, backends, window layouts and masks.

Two modules cover every attention in the three models:
- `Attention`: self-attention with a fused qkv projection (timm / DiT names `qkv`, `proj`);
- `CrossAttention`: queries from one stream, keys/values from another (PixArt names `q_linear`,
  `kv_linear`, `proj`).
Each instance has a `kind` (global, proxy, proxy_cross, window, shift_window, text_cross) that
says which role it plays, a `backend` and an optional `observer`.

Backends (`BACKENDS`):
- `sdpa`: torch.nn.functional.scaled_dot_product_attention (the default; fused kernels);
- `math`: explicit softmax(q·kᵀ/√d + bias)·v, which hands the probabilities (rows, heads, Lq, Lk)
  to `observer(module, probs)` when one is set — for attention analysis.

Window attention never builds an N×N mask over the sample: PT-DiT keeps its tokens in a
window-major layout, so a window is a batch row and window attention is batched attention. The
shifted-window mask is per window, (windows, 1, w, w), an additive bias built once per shape
(PT-DiT repeats it over the batch once per shape, (B·windows, 1, w, w), for the 4-D fused
kernels: 4·B·windows·w² bytes in float32, e.g. 192 MiB per sample for 48 frames at 1024 px).
"""

from collections.abc import Callable
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor, nn

BACKENDS = ("sdpa", "math")
KINDS = ("global", "proxy", "proxy_cross", "window", "shift_window", "text_cross")
MASK_VALUE = -10000.0  # additive bias for masked keys, as the PT-DiT release and diffusers use

Observer = Callable[[nn.Module, Tensor], None]


#################################################################################
#                             Attention primitive                               #
#################################################################################

def attend(q: Tensor, k: Tensor, v: Tensor, bias: Tensor | None, backend: str,
           module: nn.Module | None = None, observer: Observer | None = None) -> Tensor:
    """softmax(q·kᵀ/√d + bias)·v over (..., heads, L, d); bias broadcasts to (..., heads, Lq, Lk).
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if backend == "math":
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if bias is not None:
            scores = scores + bias
        probs = scores.softmax(dim=-1)
        if observer is not None:
            observer(module, probs)
        return probs @ v
    raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")


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

    def heads(self, x: Tensor) -> Tensor:
        """(..., L, D) -> (..., H, L, d)."""
        return x.unflatten(-1, (self.num_heads, self.head_dim)).transpose(-3, -2)

    def merge(self, x: Tensor) -> Tensor:
        """(..., H, L, d) -> (..., L, D)."""
        return x.transpose(-3, -2).flatten(-2)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, heads={self.num_heads}, backend={self.backend}"


class Attention(_AttentionBase):
    """Multi-head self-attention over the last-but-one axis of (..., L, D)."""

    def __init__(self, dim: int, num_heads: int, kind: str = "global", qkv_bias: bool = True):
        super().__init__(dim, num_heads, kind)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, bias: Tensor | None = None) -> Tensor:
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim))
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)   # (..., H, L, d) each
        out = attend(q, k, v, bias, self.backend, self, self.observer)
        return self.proj(self.merge(out))


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
        out = attend(q, k, v, bias, self.backend, self, self.observer)
        return self.proj(self.merge(out))


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Switches every attention module of `model` to `backend` (in place); returns the model."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; allowed: {', '.join(BACKENDS)}")
    for m in model.modules():
        if isinstance(m, _AttentionBase):
            m.backend = backend
    return model


def attention_modules(model: nn.Module) -> dict[str, _AttentionBase]:
    """Qualified name -> attention module, in forward order within each block."""
    return {name: m for name, m in model.named_modules() if isinstance(m, _AttentionBase)}


def text_bias(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """(B, L) keep-mask (1 keeps) -> additive bias (B, 1, 1, L): 0 kept, -10000 dropped."""
    if mask is None:
        return None
    return ((1 - mask.to(dtype)) * MASK_VALUE)[:, None, None, :]


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


def _region_labels(n: int, c: int) -> Tensor:
    """Swin regions along an axis of length n, window c, shift s = c//2:
    [0, n-c), [n-c, n-s), [n-s, n)."""
    s = c // 2
    labels = torch.zeros(n, dtype=torch.int64)
    if s:
        labels[n - c:n - s] = 1
        labels[n - s:] = 2
    return labels


@lru_cache(maxsize=32)
def _shift_window_labels(grid: tuple[int, int, int], window: tuple[int, int, int]) -> Tensor:
    """(nW, N) Swin region label of every token of every shifted window (rolled grid, CPU)."""
    lf, lh, lw = (_region_labels(n, c) for n, c in zip(grid, window))
    label = lf[:, None, None] * 9 + lh[None, :, None] * 3 + lw[None, None, :]   # (F, H, W)
    label = window_partition(label[None, ..., None], window)                    # (1, T, 1)
    return label.reshape(-1, window[0] * window[1] * window[2])


def shift_window_bias(grid: tuple[int, int, int], window: tuple[int, int, int],
                      dtype: torch.dtype, device: torch.device | str) -> Tensor:
    """Additive mask (nW, 1, N, N) for shifted-window attention on the rolled grid: 0 where query
    and key lie in the same Swin region, -10000 elsewhere. Depends only on (grid, window)."""
    _check_divides(grid, window)
    N = window[0] * window[1] * window[2]
    if torch.device(device).type == "meta":  # shapes only: skip building the mask on the CPU
        return torch.empty(window_count(grid, window), 1, N, N, dtype=dtype, device=device)
    label = _shift_window_labels(tuple(grid), tuple(window)).to(device)
    allowed = label[:, :, None] == label[:, None, :]
    bias = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return bias.masked_fill_(~allowed, MASK_VALUE).unsqueeze(1)
