"""Window, shifted-window and proxy attention against dense references, in float64."""

import math

import pytest
import torch
import torch.nn.functional as F

from ptdit import attention as A
from ptdit.attention import Attention, CrossAttention

from conftest import randomize

GRIDS = [  # (token grid (F, H, W), window (c0, c1, c2))
    ((1, 8, 8), (1, 4, 4)),
    ((1, 6, 10), (1, 2, 5)),      # non-square grid, non-square window, odd window side
    ((4, 4, 6), (2, 2, 3)),       # video: temporal windows and a temporal shift
    ((8, 4, 4), (4, 2, 2)),
]


def dense_reference(x, attn: Attention, allowed):
    """Explicit float64 attention over all T tokens of (B, T, D) with a (T, T) bool mask."""
    B, T, D = x.shape
    H = attn.num_heads
    q, k, v = F.linear(x, attn.qkv.weight, attn.qkv.bias).split(D, dim=-1)
    q, k, v = (z.reshape(B, T, H, D // H).permute(0, 2, 1, 3) for z in (q, k, v))
    scores = q @ k.transpose(-1, -2) / (D // H) ** 0.5
    scores = scores.masked_fill(~allowed, float("-inf"))
    out = (scores.softmax(-1) @ v).permute(0, 2, 1, 3).reshape(B, T, D)
    return F.linear(out, attn.proj.weight, attn.proj.bias)


def coords(grid):
    """(T, 3) raster coordinates (f, h, w) of a token grid."""
    Fr, H, W = grid
    f, h, w = torch.meshgrid(torch.arange(Fr), torch.arange(H), torch.arange(W), indexing="ij")
    return torch.stack([f.flatten(), h.flatten(), w.flatten()], dim=1)


def make_attention(D=32, heads=4, kind="window"):
    return randomize(Attention(D, heads, kind=kind).double(), std=0.3)


@pytest.mark.parametrize("grid,window", GRIDS)
def test_window_order_places_each_token_in_its_window(grid, window):
    order = A.window_order(grid, window)                        # raster index per position
    c = coords(grid)[order]                                     # coordinates in window-major order
    N = window[0] * window[1] * window[2]
    pos = torch.arange(len(order))
    wf, wh, ww = (g // w for g, w in zip(grid, window))
    win = (c[:, 0] // window[0]) * wh * ww + (c[:, 1] // window[1]) * ww + c[:, 2] // window[2]
    off = (c[:, 0] % window[0]) * window[1] * window[2] + (c[:, 1] % window[1]) * window[2] \
        + c[:, 2] % window[2]
    assert torch.equal(pos // N, win) and torch.equal(pos % N, off)
    assert torch.equal(torch.sort(order).values, torch.arange(len(order)))


@pytest.mark.parametrize("grid,window", GRIDS)
def test_partition_and_reverse_are_inverse(grid, window):
    x = torch.randn(2, *grid, 5, dtype=torch.float64)
    assert torch.equal(A.window_reverse(A.window_partition(x, window), grid, window), x)


@pytest.mark.parametrize("grid,window", GRIDS)
def test_window_attention_equals_dense_block_diagonal(grid, window):
    attn = make_attention()
    B, T, N = 2, grid[0] * grid[1] * grid[2], window[0] * window[1] * window[2]
    x = torch.randn(B, T, 32, dtype=torch.float64)               # raster order
    order = A.window_order(grid, window)
    xw = x[:, order]                                             # window-major
    ours = attn(xw.view(B, T // N, N, 32)).view(B, T, 32)
    c = coords(grid)
    win = [c[:, i] // window[i] for i in range(3)]
    same = torch.ones(T, T, dtype=torch.bool)
    for w in win:
        same &= w[:, None] == w[None, :]
    ref = dense_reference(x, attn, same)[:, order]
    assert (ours - ref).abs().max() <= 1e-10


@pytest.mark.parametrize("grid,window", GRIDS)
def test_shifted_window_attention_equals_dense_on_rolled_grid(grid, window):
    """Reference: roll the raster grid, dense attention where two tokens share a rolled window
    and were neighbours before the roll (neither or both wrapped around on each axis)."""
    attn = make_attention(kind="shift_window")
    B, T, N = 2, grid[0] * grid[1] * grid[2], window[0] * window[1] * window[2]
    x = torch.randn(B, *grid, 32, dtype=torch.float64)
    shift = tuple(c // 2 for c in window)   # Swin / the release: roll by half a window

    # ours: window-major stream -> rolled windows -> masked window attention -> unrolled
    xw = A.window_partition(x, window)
    bias = A.shift_window_bias(grid, window, torch.float64, "cpu")
    assert bias.shape == (T // N, 1, N, N)
    h = A.shift_windows(xw, grid, window).view(B, T // N, N, 32)
    h = attn(h, bias).view(B, T, 32)
    ours = A.window_reverse(A.shift_windows(h, grid, window, inverse=True), grid, window)

    rolled = torch.roll(x, shifts=tuple(-s for s in shift), dims=(1, 2, 3)).reshape(B, T, 32)
    c = coords(grid)
    allowed = torch.ones(T, T, dtype=torch.bool)
    for i in range(3):
        wrapped = c[:, i] + shift[i] >= grid[i]        # rolled position holds a wrapped token
        same_window = c[:, i] // window[i]
        allowed &= same_window[:, None] == same_window[None, :]
        allowed &= wrapped[:, None] == wrapped[None, :]
    ref = dense_reference(rolled, attn, allowed).reshape(B, *grid, 32)
    ref = torch.roll(ref, shifts=shift, dims=(1, 2, 3))
    assert (ours - ref).abs().max() <= 1e-10


def test_shift_mask_splits_only_last_windows():
    grid, window = (1, 8, 8), (1, 4, 4)
    bias = A.shift_window_bias(grid, window, torch.float64, "cpu")[:, 0]
    masked = (bias < 0).flatten(1).any(1)
    # window grid 2x2: only the last row or last column of windows mixes regions
    assert masked.tolist() == [False, True, True, True]
    assert set(bias.unique().tolist()) == {0.0, A.MASK_VALUE}
    assert torch.all(bias.diagonal(dim1=1, dim2=2) == 0)   # every query sees itself


@pytest.mark.parametrize("grid,window", GRIDS)
def test_shift_mask_mod_equals_dense_rule_on_rolled_grid(grid, window):
    """The mask function over (window row, query, key) on broadcast index grids, against the
    rule stated on the whole rolled grid: same window, and on each axis both or neither token
    wrapped around."""
    shift, T, N = A.shift_amounts(window), grid[0] * grid[1] * grid[2], math.prod(window)
    c = coords(grid)[A.window_order(grid, window)]             # window-major rolled coordinates
    wrapped = c + torch.tensor(shift) >= torch.tensor(grid)
    allowed = (wrapped[:, None] == wrapped[None, :]).all(-1)   # (T, T)
    rows = torch.arange(T).view(-1, N)                         # positions of each window row
    reference = allowed[rows[:, :, None], rows[:, None, :]]     # (nW, N, N)
    mask_mod = A.shift_window_mask_mod(grid, window)
    b, q, kv = torch.arange(T // N), torch.arange(N), torch.arange(N)
    ours = mask_mod(b[:, None, None], torch.tensor(0), q[None, :, None], kv[None, None, :])
    assert torch.equal(ours, reference)
    assert mask_mod.__name__ == "shift_window_g{}x{}x{}_w{}x{}x{}".format(*grid, *window)
    bias = A.shift_window_bias(grid, window, torch.float64, "cpu")
    assert torch.equal(bias[:, 0] == 0, reference)


def test_shift_mask_on_meta_has_its_shape_only():
    bias = A.shift_window_bias((48, 64, 64), (4, 8, 8), torch.bfloat16, "meta")
    assert bias.is_meta and bias.shape == (768, 1, 256, 256) and bias.dtype == torch.bfloat16


def test_shift_mask_is_built_per_shape():
    a = A.shift_window_bias((1, 8, 8), (1, 4, 4), torch.float32, "cpu")
    b = A.shift_window_bias((1, 8, 12), (1, 4, 4), torch.float32, "cpu")
    assert a.shape == (4, 1, 16, 16) and b.shape == (6, 1, 16, 16)


@pytest.mark.parametrize("grid,window", GRIDS)
def test_proxy_token_is_window_mean(grid, window):
    x = torch.randn(3, *grid, 7, dtype=torch.float64)
    proxies = A.proxy_tokens(A.window_partition(x, window), window[0] * window[1] * window[2])
    c0, c1, c2 = window
    for wi, (f, h, w) in enumerate(
            (f, h, w) for f in range(grid[0] // c0) for h in range(grid[1] // c1)
            for w in range(grid[2] // c2)):
        block = x[:, f * c0:(f + 1) * c0, h * c1:(h + 1) * c1, w * c2:(w + 1) * c2]
        assert torch.allclose(proxies[:, wi], block.mean(dim=(1, 2, 3)), rtol=0, atol=1e-12)


def test_math_backend_equals_sdpa_and_observes_probabilities():
    attn = make_attention(kind="global")
    cross = randomize(CrossAttention(32, 4, kind="text_cross").double(), std=0.3)
    x, ctx = torch.randn(2, 9, 32, dtype=torch.float64), torch.randn(2, 5, 32, dtype=torch.float64)
    keep = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
    bias = A.text_bias(keep, torch.float64)
    ref_self, ref_cross = attn(x), cross(x, ctx, bias)
    seen = []
    A.set_backend(attn, "math")
    A.set_backend(cross, "math")
    attn.observer = cross.observer = lambda call, probs: seen.append((call, probs))
    assert (attn(x) - ref_self).abs().max() <= 1e-12
    assert (cross(x, ctx, bias) - ref_cross).abs().max() <= 1e-12
    (c1, p1), (c2, p2) = seen
    assert c1 == A.AttentionCall("", "global", "math", None, None, 2)   # unnamed: no model
    assert (c2.kind, p1.shape, p2.shape) == ("text_cross", (2, 4, 9, 9), (2, 4, 9, 5))
    assert torch.allclose(p1.sum(-1), torch.ones(2, 4, 9, dtype=torch.float64))
    assert p2[1, :, :, 1:].max() < 1e-300          # dropped caption tokens get no attention


def test_window_calls_carry_their_grid_and_window():
    attn = make_attention(kind="shift_window")
    A.set_backend(attn, "math")
    grid, window = (4, 4, 6), (2, 2, 3)
    windows = A.Windows(grid, window)
    assert (windows.num_windows, windows.window_tokens) == (8, 12)
    seen = []
    attn.observer = lambda call, probs: seen.append((call, probs.shape))
    attn(torch.randn(3, 8, 12, 32, dtype=torch.float64),
         A.shift_window_bias(grid, window, torch.float64, "cpu"), windows)
    assert seen == [(A.AttentionCall("", "shift_window", "math", grid, window, 3),
                     (3 * 8, 4, 12, 12))]


def test_bad_backend_and_divisibility_are_refused():
    with pytest.raises(ValueError, match="allowed: sdpa, math"):
        A.set_backend(make_attention(), "flash")
    with pytest.raises(ValueError, match=r"does not divide the token grid"):
        A.window_partition(torch.randn(1, 1, 6, 6, 2), (1, 4, 4))
