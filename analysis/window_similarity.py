"""How alike the attention rows of tokens in one spatial window are: PT-DiT's premise in numbers.

PT-DiT replaces the tokens of a window by one proxy, which assumes that those tokens attend
almost identically. Given self-attention probabilities A (T, T) over a token grid (F, h, w) in
raster order (row i: the distribution over all T keys of query token i), and windows (c0, c1, c2)
tiling the grid, this module measures, per window size:

- `cosine`: mean cosine similarity <a_i, a_j> / (|a_i| |a_j|) over unordered pairs of distinct
  tokens i, j of the same window;
- `js_divergence_nats`: mean Jensen-Shannon divergence between those rows, natural log (nats,
  0 … ln 2): JS(p, q) = H(m) - (H(p) + H(q)) / 2 with m = (p + q) / 2, 0·log 0 = 0;
- `replacement_error`: sqrt(Σ_w |A_w - Ā_w|²_F / Σ_w |A_w|²_F): each row replaced by its
  window's mean row (what one proxy per window assumes), pooled over all windows (and samples);
- `output_error`: the same for the attention output O = A·V per head (T, d):
  sqrt(Σ_w |(A_w - Ā_w)V|²_F / |AV|²_F); needs the values V.

Two comparisons, answering two different questions:
- absolute redundancy — are a window's rows alike at all? The values themselves (an error of 0
  and a cosine of 1 are what one proxy per window assumes), beside `baseline_random`: the same
  statistic over pairs of distinct tokens drawn uniformly from the whole grid, within-window
  pairs included.
- window-specific structure — are a window's rows more alike than rows of tokens equally far
  apart and equally placed, but in different windows? `baseline_position_matched`: each
  within-window pair is compared with pairs in other windows (crossing a window boundary) that
  share its offset and its distance to every grid edge, counted per axis and side up to
  `edge_margin` tokens (a distance of the margin or more counts as "far from that edge"). On a
  bounded grid edge rows are truncated and differ from interior rows, and windows are aligned
  with the edges, so the pairs of a window touch the edges more often than pairs that cross a
  boundary at the same offset: a baseline matched on offset alone shows a window effect of a
  few hundredths of cosine for attention that knows no windows (a Gaussian kernel). A
  within-window pair whose position class holds no crossing pair (near an edge, a crossing pair
  along that axis cannot exist) is its own baseline, so it adds nothing to the difference;
  `position_matched_fraction` is the share of within-window pairs that have a match, and
  value − baseline_position_matched is that fraction times the window effect on matched pairs
  (never inflated by edges). For the two errors the baseline keeps each within-window pair's
  own row norms and takes only the angle between the rows (the cosine) from its matches:
  |a_i − a_j|² = |a_i|² + |a_j|² − 2|a_i||a_j|·cos, since row norms vary with the distance to
  the edges far beyond the margin. The default margin is a quarter of each grid side; on
  window-free kernels (Gaussian up to σ = 2 tokens, exponential up to ℓ = 2 tokens) on square,
  rectangular and video grids of 16- and 32-token sides the difference stays within ±1e-3
  (the output error, which depends on the values too: ±2e-3, and ±1e-2 for the heavy-tailed
  ℓ = 2 kernel), tests/test_window_similarity.py;
  edge effects that reach further need a larger margin, at the cost of a smaller matched
  fraction.
The two errors are pair statistics too (Σ_{i∈w} |a_i - ā|² = (1/N) Σ_{i<j∈w} |a_i - a_j|² for a
window of N tokens), so their baselines are the errors of groups of N tokens with the baseline's
pair dissimilarity: sqrt(T(N-1)/(2N) · mean |a_i - a_j|² / Σ_i |a_i|²) per sample.
And `cosine_vs_distance`: mean cosine over all pairs at Chebyshev distance d = max(|Δf|, |Δy|,
|Δx|) in tokens (frames count like rows and columns), d = 1 … `max_distance` (default: the
largest window side - 1, so the curve covers every offset a window holds).

Pair sets are enumerated in full while they hold at most `max_pairs` pairs, and otherwise drawn
once per grid from a seeded generator (uniform within-window pairs; for each, matches drawn
uniformly from its position class; uniform random pairs; uniform pairs per distance), so every
head, layer, step and branch is measured on the same pairs. Rows say `sampled` and `n` (pairs
evaluated). The replacement errors' within-window values are always exact (window means are
cheap). A map costs O(T²) for its row norms, entropies and window means plus O(pairs · T) for
the pairs.

Statistics are float64 sums with their weights, fed one map at a time (`WindowStats.add`) and
reduced in chunks of rows and pairs: feeding a map whole or in pieces, in any chunk size, gives
the same numbers as computing on the full stored maps, to float64 rounding.
"""

import math
import warnings
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import NamedTuple

import torch
from torch import Tensor

from ptdit.attention import window_order

METRICS = ("cosine", "js_divergence_nats", "replacement_error", "output_error")
CURVE_METRIC = "cosine_vs_distance"
DEFAULT_WINDOWS = (2, 4, 8, 16)        # square windows 2x2 … 16x16, one frame
DEFAULT_MAX_PAIRS = 2048
CHUNK_ELEMENTS = 1 << 19               # float64 elements per gathered array (4 MiB)

Grid = tuple[int, int, int]


#################################################################################
#                               Windows and grids                               #
#################################################################################

def as_window(window: int | Sequence[int]) -> Grid:
    """A window in tokens as (frames, rows, cols): s -> (1, s, s), (h, w) -> (1, h, w)."""
    if isinstance(window, int):
        window = (1, window, window)
    window = tuple(window)
    if len(window) == 2:
        window = (1, *window)
    if len(window) != 3 or not all(isinstance(c, int) and c >= 1 for c in window):
        raise ValueError(f"a window is a side s, (rows, cols) or (frames, rows, cols) of positive "
                         f"integers, got {window!r}")
    return window


def window_label(window: Grid, grid: Grid) -> str:
    """'4x4' on an image grid (one frame), '1x4x4' on a video grid."""
    return "x".join(map(str, window if grid[0] > 1 else window[1:]))


def grid_label(grid: Grid) -> str:
    return window_label(grid, grid)


def tiling_windows(grid: Grid, windows: Iterable | None = None) -> tuple[list[Grid], list[Grid]]:
    """(windows that tile `grid`, windows that do not divide it), windows in tokens; None means
    DEFAULT_WINDOWS. A window as large as the grid tiles it (one window, no distance-matched
    baseline)."""
    kept, skipped = [], []
    windows = DEFAULT_WINDOWS if windows is None else windows
    for w in dict.fromkeys(as_window(w) for w in windows):
        if prod(w) < 2:
            raise ValueError(f"window {w} holds one token: no pairs to compare; use sides >= 2")
        (kept if all(n % c == 0 for n, c in zip(grid, w)) else skipped).append(w)
    return kept, skipped


def _coords(grid: Grid) -> Tensor:
    """(T, 3) int64 coordinates (f, y, x) of the tokens in raster order."""
    axes = [torch.arange(n) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)


def _raster(coords: Tensor, grid: Grid) -> Tensor:
    return (coords[:, 0] * grid[1] + coords[:, 1]) * grid[2] + coords[:, 2]


def _window_ids(coords: Tensor, grid: Grid, window: Grid) -> Tensor:
    counts = [n // c for n, c in zip(grid, window)]
    w = coords // torch.tensor(window)
    return (w[:, 0] * counts[1] + w[:, 1]) * counts[2] + w[:, 2]


def _canonical_offsets(extent: Sequence[int]) -> Tensor:
    """(K, 3) offsets δ with |δ_a| <= extent_a, one of each ±δ pair (first nonzero positive)."""
    axes = [torch.arange(-e, e + 1) for e in extent]
    d = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(-1, 3)
    first = torch.where(d[:, 0] != 0, d[:, 0], torch.where(d[:, 1] != 0, d[:, 1], d[:, 2]))
    return d[first > 0]


def _pairs_at(grid: Grid, delta: Tensor) -> Tensor:
    """Ordered pairs (i, i + δ) inside the grid, per offset: (K,) int64."""
    return (torch.tensor(grid) - delta.abs()).clamp(min=0).prod(dim=-1)


def _anchors(coords: Tensor, grid: Grid, delta: Tensor) -> tuple[Tensor, Tensor]:
    """Coordinates c (n, 3) with c + δ inside the grid, and c + δ."""
    moved = coords + delta
    inside = ((moved >= 0) & (moved < torch.tensor(grid))).all(dim=1)
    return coords[inside], moved[inside]


#################################################################################
#                                   Pair plan                                   #
#################################################################################

@dataclass(frozen=True)
class PairSet:
    """Token pairs (i, j) (raster indices, (n,) int64 each) with float64 weights: a weighted mean
    over them estimates the set's mean; `sampled` when they are a sample of it."""
    i: Tensor
    j: Tensor
    weight: Tensor
    sampled: bool

    def __len__(self) -> int:
        return len(self.i)


@dataclass(frozen=True)
class Matches:
    """The position-matched baseline of one window size. Within-window pair p (of the plan's
    `within` set) belongs to match group `group[p]`; `pairs` are the groups' members (crossing
    pairs of the same position class, or p itself when its class has none), `pair_group` their
    groups, their weights summing to 1 in each group. `fraction`: share of all within-window
    pairs whose position class holds crossing pairs."""
    group: Tensor
    pairs: PairSet
    pair_group: Tensor
    groups: int
    fraction: float


@dataclass(frozen=True)
class Plan:
    """The pairs every map of one token grid is measured on (see `plan`)."""
    grid: Grid
    windows: tuple[Grid, ...]
    edge_margin: Grid
    orders: tuple[Tensor, ...]        # per window: (T,) raster index at each window-major place
    within: tuple[PairSet, ...]       # per window: pairs inside one window
    matches: tuple[Matches, ...]      # per window: position-matched pairs across windows
    random: PairSet
    distances: tuple[int, ...]        # Chebyshev distances of the curve
    by_distance: tuple[PairSet, ...]

    @property
    def tokens(self) -> int:
        return prod(self.grid)

    @property
    def labels(self) -> list[str]:
        return [window_label(w, self.grid) for w in self.windows]


def default_edge_margin(grid: Grid) -> Grid:
    """A quarter of each grid side (at least 1 token): how far from an edge a pair's position
    is told apart (see the module docstring)."""
    return tuple(max(1, n // 4) for n in grid)


def _uniform(gen: torch.Generator, n: int, size: int) -> Tensor:
    return torch.randint(0, n, (size,), generator=gen)


def _from_coords(a: Tensor, b: Tensor, grid: Grid, weight: Tensor | None = None,
                 sampled: bool = False) -> PairSet:
    weight = torch.ones(len(a), dtype=torch.float64) if weight is None else weight
    return PairSet(_raster(a, grid), _raster(b, grid), weight, sampled)


def _within(grid: Grid, window: Grid, order: Tensor, max_pairs: int | None,
            gen: torch.Generator) -> PairSet:
    N = prod(window)
    by_window = order.view(-1, N)                                   # (nW, N) raster indices
    total = by_window.shape[0] * N * (N - 1) // 2
    if max_pairs is None or total <= max_pairs:
        ti, tj = torch.triu_indices(N, N, 1)
        i, j = by_window[:, ti].flatten(), by_window[:, tj].flatten()
        return PairSet(i, j, torch.ones(len(i), dtype=torch.float64), False)
    w = _uniform(gen, by_window.shape[0], max_pairs)
    p = _uniform(gen, N, max_pairs)
    q = (p + 1 + _uniform(gen, N - 1, max_pairs)) % N              # distinct from p, uniform
    return PairSet(by_window[w, p], by_window[w, q], torch.ones(max_pairs, dtype=torch.float64),
                   True)


class _Classes:
    """Position classes of token pairs on one grid for one window's offsets: a pair's class is
    its canonical offset δ (|δ_a| < window side) and, per axis, its distances to both edges
    capped at the edge margin. Codes are int64, one per class."""

    def __init__(self, grid: Grid, window: Grid, margin: Grid):
        self.grid, self.margin = torch.tensor(grid), torch.tensor(margin)
        self.extent = torch.tensor(window) - 1
        self.radix = self.margin + 1

    def offset(self, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(δ, a, b) with the pair ordered so that δ = b - a is canonical (first nonzero > 0)."""
        delta = b - a
        first = torch.where(delta[:, 0] != 0, delta[:, 0],
                            torch.where(delta[:, 1] != 0, delta[:, 1], delta[:, 2]))
        flip = (first < 0)[:, None]
        return torch.where(flip, -delta, delta), torch.where(flip, b, a), torch.where(flip, a, b)

    def code(self, a: Tensor, b: Tensor) -> Tensor:
        """(n,) class codes of the pairs with coordinates a, b (n, 3), any order."""
        delta, a, b = self.offset(a, b)
        low = torch.minimum(a, b).clamp(max=self.margin)                   # to the first edge
        high = (self.grid - 1 - torch.maximum(a, b)).clamp(max=self.margin)  # to the last edge
        code = torch.zeros(len(a), dtype=torch.int64)
        for axis in range(3):
            code = code * (2 * self.extent[axis] + 1) + delta[:, axis] + self.extent[axis]
        for axis in range(3):
            code = (code * self.radix[axis] + low[:, axis]) * self.radix[axis] + high[:, axis]
        return code


def _crossing(grid: Grid, window: Grid, coords: Tensor, ids: Tensor, classes: _Classes,
              wanted: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Every pair across a window boundary at one of the window's offsets whose class code is
    in `wanted` (sorted): raster i, j and code, sorted by code."""
    i_parts, j_parts, code_parts = [], [], []
    for delta in _canonical_offsets([c - 1 for c in window]):
        a, b = _anchors(coords, grid, delta)
        across = ids[_raster(a, grid)] != ids[_raster(b, grid)]
        a, b = a[across], b[across]
        code = classes.code(a, b)
        keep = torch.isin(code, wanted)
        i_parts.append(_raster(a[keep], grid))
        j_parts.append(_raster(b[keep], grid))
        code_parts.append(code[keep])
    code, order = torch.sort(torch.cat(code_parts), stable=True)
    return torch.cat(i_parts)[order], torch.cat(j_parts)[order], code


def _matches(grid: Grid, window: Grid, order: Tensor, within: PairSet, coords: Tensor,
             margin: Grid, max_pairs: int | None, gen: torch.Generator) -> Matches:
    """The match groups of `within`'s pairs (see Matches and the module docstring). In full,
    one group per position class: all its crossing pairs, each weighted 1 / their number.
    Sampled (more pairs than `max_pairs`): one group per within-window pair, holding
    max(1, max_pairs // len(within)) pairs drawn uniformly from its class. Either way a
    within-window pair whose class has no crossing pair is a group of its own, holding itself."""
    classes = _Classes(grid, window, margin)
    N = prod(window)
    ti, tj = torch.triu_indices(N, N, 1)
    by_window = order.view(-1, N)
    every = classes.code(coords[by_window[:, ti].flatten()], coords[by_window[:, tj].flatten()])
    class_codes, n_within = torch.unique(every, return_counts=True)
    ids = _window_ids(coords, grid, window)
    x_i, x_j, x_code = _crossing(grid, window, coords, ids, classes, class_codes)
    matched_codes, n_across = torch.unique_consecutive(x_code, return_counts=True)
    matched_share = n_within[torch.isin(class_codes, matched_codes)].sum()
    fraction = float(matched_share) / float(n_within.sum())

    code = classes.code(coords[within.i], coords[within.j])          # the within pairs' classes
    slot = torch.searchsorted(matched_codes, code).clamp(max=max(len(matched_codes) - 1, 0))
    has = (matched_codes[slot] == code) if len(matched_codes) else torch.zeros_like(code,
                                                                                   dtype=bool)
    alone = torch.nonzero(~has).flatten()                            # their own baseline
    exact = not within.sampled and (max_pairs is None
                                    or len(x_code) + len(alone) <= max_pairs)
    if exact:
        group = torch.where(has, slot, 0)
        group[alone] = len(matched_codes) + torch.arange(len(alone))
        pair_group = torch.repeat_interleave(torch.arange(len(matched_codes)), n_across)
        weight = (1 / n_across.double())[pair_group]
        pairs_i, pairs_j = x_i, x_j
    else:
        draws = max(1, (max_pairs or len(within)) // max(1, len(within)))
        group = torch.arange(len(within))
        matched = torch.nonzero(has).flatten()
        start = torch.cumsum(n_across, 0) - n_across                 # first pair of each class
        first, count = start[slot[matched]], n_across[slot[matched]]
        offset = (torch.rand(len(matched), draws, generator=gen, dtype=torch.float64)
                  * count[:, None]).long()                           # uniform in the class
        picked = (first[:, None] + offset).flatten()
        pair_group = matched.repeat_interleave(draws)
        pairs_i, pairs_j = x_i[picked], x_j[picked]
        weight = torch.full((len(picked),), 1 / draws, dtype=torch.float64)
    pairs_i = torch.cat([pairs_i, within.i[alone]])
    pairs_j = torch.cat([pairs_j, within.j[alone]])
    pair_group = torch.cat([pair_group, group[alone]])
    weight = torch.cat([weight, torch.ones(len(alone), dtype=torch.float64)])
    groups = int(group.max()) + 1 if len(group) else 0
    return Matches(group, PairSet(pairs_i, pairs_j, weight, not exact), pair_group, groups,
                   fraction)


def _random(grid: Grid, max_pairs: int | None, gen: torch.Generator) -> PairSet:
    T = prod(grid)
    if max_pairs is None or T * (T - 1) // 2 <= max_pairs:
        i, j = torch.triu_indices(T, T, 1)
        return PairSet(i, j, torch.ones(len(i), dtype=torch.float64), False)
    i = _uniform(gen, T, max_pairs)
    j = (i + 1 + _uniform(gen, T - 1, max_pairs)) % T                 # distinct from i, uniform
    return PairSet(i, j, torch.ones(max_pairs, dtype=torch.float64), True)


def _at_distance(grid: Grid, d: int, coords: Tensor, max_pairs: int | None,
                 gen: torch.Generator) -> PairSet | None:
    """All pairs at Chebyshev distance d, or a uniform sample of them; None if there are none."""
    deltas = _canonical_offsets([min(d, n - 1) for n in grid])
    deltas = deltas[deltas.abs().amax(dim=1) == d]
    counts = _pairs_at(grid, deltas)
    deltas, counts = deltas[counts > 0], counts[counts > 0]
    if len(deltas) == 0:
        return None
    if max_pairs is None or int(counts.sum()) <= max_pairs:
        parts = [_anchors(coords, grid, delta) for delta in deltas]
        return _from_coords(torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts]),
                            grid)
    delta = deltas[torch.multinomial(counts.double(), max_pairs, replacement=True,
                                     generator=gen)]                 # (n, 3) ∝ pairs at δ
    low = (-delta).clamp(min=0)
    high = torch.tensor(grid) - delta.clamp(min=0)                   # anchors in [low, high)
    a = low + (torch.rand(delta.shape, generator=gen, dtype=torch.float64)
               * (high - low)).long()
    return _from_coords(a, a + delta, grid, sampled=True)


def plan(grid: Grid, windows: Iterable | None = None, *, max_pairs: int | None = DEFAULT_MAX_PAIRS,
         max_distance: int | None = None, edge_margin: int | Sequence[int] | None = None,
         seed: int = 0, warn: bool = True) -> Plan:
    """The pair plan of a token grid (F, h, w): windows (sides, (h, w) or (f, h, w) in tokens;
    None: DEFAULT_WINDOWS) that tile it — the others are skipped with a UserWarning naming them,
    and a ValueError says so when none tiles it —, pair sets enumerated in full up to
    `max_pairs` pairs each (None: always in full) and sampled above, with `seed`;
    `edge_margin`: tokens, one for every axis or (frames, rows, cols) (None:
    default_edge_margin)."""
    grid = tuple(int(n) for n in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"a token grid is (frames, rows, cols) of positive sizes, got {grid!r}")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be a positive number of pairs or None, got {max_pairs}")
    margin = _edge_margin(grid, edge_margin)
    kept, skipped = tiling_windows(grid, windows)
    if not kept:
        raise ValueError(f"no window of {[window_label(w, grid) for w in skipped]} tiles the "
                         f"token grid {grid_label(grid)}: each side must divide the grid's; "
                         f"allowed e.g. {_divisor_windows(grid)}")
    if skipped and warn:
        warnings.warn(f"windows {', '.join(window_label(w, grid) for w in skipped)} do not divide "
                      f"the token grid {grid_label(grid)} and are skipped", UserWarning,
                      stacklevel=2)
    gen = torch.Generator().manual_seed(seed)
    coords = _coords(grid)
    orders = tuple(window_order(grid, w) for w in kept)
    within = tuple(_within(grid, w, o, max_pairs, gen) for w, o in zip(kept, orders))
    matches = tuple(_matches(grid, w, o, pairs, coords, margin, max_pairs, gen)
                    for w, o, pairs in zip(kept, orders, within))
    random = _random(grid, max_pairs, gen)
    if max_distance is None:
        max_distance = max(max(w) for w in kept) - 1
    curve = [(d, _at_distance(grid, d, coords, max_pairs, gen))
             for d in range(1, min(max_distance, max(grid) - 1) + 1)]
    curve = [(d, s) for d, s in curve if s is not None]
    return Plan(grid, tuple(kept), margin, orders, within, matches, random,
                tuple(d for d, _ in curve), tuple(s for _, s in curve))


def _edge_margin(grid: Grid, margin: int | Sequence[int] | None) -> Grid:
    if margin is None:
        return default_edge_margin(grid)
    margins = (margin,) * 3 if not isinstance(margin, (list, tuple)) else tuple(margin)
    if len(margins) != 3 or not all(isinstance(m, int) and not isinstance(m, bool) and m >= 1
                                    for m in margins):
        raise ValueError(f"edge_margin is a positive number of tokens, or one per axis (frames, "
                         f"rows, cols), got {margin!r}; default for the grid "
                         f"{grid_label(grid)}: {default_edge_margin(grid)}")
    return margins


def _divisor_windows(grid: Grid) -> str:
    sides = [s for s in range(2, 17) if grid[1] % s == 0 and grid[2] % s == 0]
    return ", ".join(f"{s}x{s}" for s in sides) or "none square: pass (rows, cols)"


#################################################################################
#                              Streaming statistics                             #
#################################################################################

def _chunks(n: int, width: int):
    step = max(1, CHUNK_ELEMENTS // max(1, width))
    for start in range(0, n, step):
        yield slice(start, min(n, start + step))


class _State(NamedTuple):
    """One map A (T, T), its output O = A·V (T, d) or None, and per-token row norms |a_i|,
    Σ_k a_ik log a_ik and output norms |o_i| (None without values)."""
    A: Tensor
    O: Tensor | None
    norm: Tensor
    negentropy: Tensor
    out_norm: Tensor | None


class WindowStats:
    """Float64 sums and weights of the window statistics of one stream of maps (e.g. one layer,
    head, step and branch) on one plan; `add` maps as they come, `summary` reads the means."""

    def __init__(self, plan: Plan):
        self.plan = plan
        n, n_d = len(plan.windows), len(plan.distances)
        self.samples = 0
        self.non_finite = 0                          # maps holding NaN or Inf
        self.has_values: bool | None = None
        self.norm2 = _zeros()                        # Σ_i |a_i|²
        self.out_norm2 = _zeros()                    # Σ_i |o_i|²
        self.replaced = _zeros(n)                    # Σ_w |A_w - Ā_w|²
        self.out_replaced = _zeros(n)                # Σ_w |O_w - Ō_w|²
        # weighted sums of (cosine, JS, |a_i - a_j|², |o_i - o_j|²) per set, and the weights
        self.within, self.within_w = _zeros(n, 4), _zeros(n)
        self.matched = _zeros(n, 4)                  # weights: the within pairs'
        self.random, self.random_w = _zeros(4), _zeros()
        self.curve, self.curve_w = _zeros(n_d), _zeros(n_d)

    def add(self, probs: Tensor, values: Tensor | None = None) -> None:
        """Adds maps probs (S, T, T) or (T, T) — rows are distributions over keys, tokens in
        raster order of the plan's grid — and optionally their values (S, T, d) or (T, d)."""
        T = self.plan.tokens
        if probs.dim() == 2:
            probs = probs[None]
            values = None if values is None else values[None]
        if probs.dim() != 3 or probs.shape[1:] != (T, T):
            raise ValueError(f"maps must be (S, {T}, {T}) for the token grid "
                             f"{grid_label(self.plan.grid)}, got {tuple(probs.shape)}")
        if values is not None and (values.dim() != 3 or values.shape[:2] != probs.shape[:2]):
            raise ValueError(f"values must be ({len(probs)}, {T}, d) beside maps of "
                             f"{tuple(probs.shape)}, got {tuple(values.shape)}")
        if self.has_values is not None and self.has_values != (values is not None):
            raise ValueError("a stream of maps is added either always or never with values")
        self.has_values = values is not None
        for s in range(len(probs)):
            self._add_one(probs[s], None if values is None else values[s])
            self.samples += 1

    def _add_one(self, A: Tensor, V: Tensor | None) -> None:
        """One map A (T, T) and its values V (T, d) or None."""
        T, plan, device = A.shape[0], self.plan, A.device
        norm = torch.empty(T, dtype=torch.float64, device=device)          # |a_i|
        negentropy = torch.empty(T, dtype=torch.float64, device=device)    # Σ_k a_ik log a_ik
        O = None if V is None else torch.empty(T, V.shape[1], dtype=torch.float64,
                                               device=device)              # A·V (T, d)
        finite = True
        for rows in _chunks(T, T):
            a = A[rows].double()
            finite = finite and bool(a.isfinite().all())
            norm[rows] = a.square().sum(dim=1).sqrt()
            negentropy[rows] = torch.xlogy(a, a).sum(dim=1)
            if O is not None:
                O[rows] = a @ V.double()
        self.non_finite += not (finite and (V is None or bool(V.isfinite().all())))
        self.norm2 += norm.square().sum().cpu()
        out_norm = None
        if O is not None:
            out_norm = O.square().sum(dim=1).sqrt()
            self.out_norm2 += out_norm.square().sum().cpu()
        for k, (window, order) in enumerate(zip(plan.windows, plan.orders)):
            N, order = prod(window), order.to(device)
            for ws in _chunks(T // N, N * T):                  # a few whole windows at a time
                rows = A[order[ws.start * N:ws.stop * N]].double().view(-1, N, T)
                self.replaced[k] += (rows - rows.mean(dim=1, keepdim=True)).square().sum().cpu()
            if O is not None:
                o = O[order].view(-1, N, O.shape[1])
                self.out_replaced[k] += (o - o.mean(dim=1, keepdim=True)).square().sum().cpu()
        state = _State(A, O, norm, negentropy, out_norm)
        for k in range(len(plan.windows)):
            self.within[k] += _pair_sums(state, plan.within[k])
            self.within_w[k] += plan.within[k].weight.sum()
            self.matched[k] += _matched_sums(state, plan.within[k], plan.matches[k])
        self.random += _pair_sums(state, plan.random)
        self.random_w += plan.random.weight.sum()
        for k, pairs in enumerate(plan.by_distance):
            self.curve[k] += _pair_sums(state, pairs, cosine_only=True)[0]
            self.curve_w[k] += pairs.weight.sum()

    def summary(self) -> dict:
        """{"windows": [(label, {metric: Measure})], "curve": [(d, Measure)]}: the means, with
        NaN where a set is empty (a grid of one window has no boundary to cross)."""
        plan, S, T = self.plan, self.samples, self.plan.tokens
        rand = _mean(self.random, self.random_w)
        n_random = S * len(plan.random)
        windows = []
        for k, window in enumerate(plan.windows):
            N = prod(window)
            matches = plan.matches[k]
            inside = _mean(self.within[k], self.within_w[k])
            if matches.fraction > 0:
                matched = _mean(self.matched[k], self.within_w[k])
            else:                                   # no pair to compare with: no baseline
                matched = [math.nan] * 4
            n_within, n_matched = S * len(plan.within[k]), S * len(matches.pairs)
            sampled = plan.within[k].sampled or matches.pairs.sampled or plan.random.sampled
            measures = {m: Measure(inside[c], matched[c], rand[c], n_within, n_matched, n_random,
                                   sampled) for c, m in enumerate(METRICS[:2])}
            group = S * T * (N - 1) / (2 * N)           # (1/N) × within pairs, all samples
            errors = [("replacement_error", 2, self.norm2, self.replaced[k])]
            if self.has_values:
                errors.append(("output_error", 3, self.out_norm2, self.out_replaced[k]))
            for metric, c, norm2, replaced in errors:
                measures[metric] = Measure(
                    _sqrt_ratio(float(replaced), norm2), _sqrt_ratio(group * matched[c], norm2),
                    _sqrt_ratio(group * rand[c], norm2), S * T * (N - 1) // 2, n_matched,
                    n_random, sampled)
            windows.append((plan.labels[k], measures))
        curve = [(d, Measure(_mean(self.curve[k], self.curve_w[k]), math.nan, math.nan,
                             S * len(pairs), 0, 0, pairs.sampled))
                 for k, (d, pairs) in enumerate(zip(plan.distances, plan.by_distance))]
        return {"windows": windows, "curve": curve}


class Measure(NamedTuple):
    """One statistic: its value, its baselines, and the pairs behind each."""
    value: float
    position_matched: float
    random: float
    n: int
    n_position_matched: int
    n_random: int
    sampled: bool


def _zeros(*shape: int) -> Tensor:
    return torch.zeros(shape, dtype=torch.float64)


def _mean(sums: Tensor, weight: Tensor) -> list[float] | float:
    """sums / weight, elementwise (a list, or a float for a 0-d sum); NaN for no weight."""
    w = float(weight)
    means = (sums / w).tolist() if w > 0 else torch.full_like(sums, math.nan).tolist()
    return means


def _sqrt_ratio(x: float, total: Tensor) -> float:
    total = float(total)
    return math.sqrt(max(x, 0.0) / total) if total > 0 and not math.isnan(x) else math.nan


def _pair_values(state: _State, i: Tensor, j: Tensor, cosine_only: bool = False) -> Tensor:
    """(n, 5) float64 per pair: cosine, JS in nats, |a_i - a_j|², |o_i - o_j|² and the cosine
    of the outputs (the last two 0 without values; only the first column is filled with
    `cosine_only`)."""
    A, O, norm, negentropy, out_norm = state
    out = torch.zeros(len(i), 5, dtype=torch.float64, device=A.device)
    a, b = A[i].double(), A[j].double()
    out[:, 0] = (a * b).sum(dim=1) / (norm[i] * norm[j])
    if cosine_only:
        return out
    m = (a + b) * 0.5
    out[:, 1] = 0.5 * (negentropy[i] + negentropy[j]) - torch.xlogy(m, m).sum(dim=1)
    out[:, 2] = (a - b).square().sum(dim=1)
    if O is not None:
        out[:, 3] = (O[i] - O[j]).square().sum(dim=1)
        out[:, 4] = (O[i] * O[j]).sum(dim=1) / (out_norm[i] * out_norm[j])
    return out


def _pair_sums(state: _State, pairs: PairSet, cosine_only: bool = False) -> Tensor:
    """Weighted sums over `pairs` of (cosine, JS in nats, |a_i - a_j|², |o_i - o_j|²), float64
    on the CPU (the last 0 without values; only the first with `cosine_only`)."""
    T = state.A.shape[1]
    out = torch.zeros(4, dtype=torch.float64)
    device = state.A.device
    for sl in _chunks(len(pairs), 2 * T):
        i, j = pairs.i[sl].to(device), pairs.j[sl].to(device)
        w = pairs.weight[sl].to(device)
        out += (w[:, None] * _pair_values(state, i, j, cosine_only)[:, :4]).sum(dim=0).cpu()
    return out


def _matched_sums(state: _State, within: PairSet, matches: Matches) -> Tensor:
    """The position-matched baseline's sums over the within pairs (their weights): the mean
    cosine and JS of each pair's match group, and |a_i|² + |a_j|² - 2|a_i||a_j|·cos (likewise
    for the outputs) with the pair's own norms and the group's cosine."""
    T, device = state.A.shape[1], state.A.device
    means = torch.zeros(matches.groups, 3, dtype=torch.float64, device=device)
    pairs = matches.pairs
    for sl in _chunks(len(pairs), 2 * T):
        values = _pair_values(state, pairs.i[sl].to(device), pairs.j[sl].to(device))
        weighted = pairs.weight[sl].to(device)[:, None] * values[:, [0, 1, 4]]
        means.index_add_(0, matches.pair_group[sl].to(device), weighted)
    out = torch.zeros(4, dtype=torch.float64)
    norm, out_norm = state.norm, state.out_norm
    for sl in range(0, len(within), CHUNK_ELEMENTS):
        sl = slice(sl, sl + CHUNK_ELEMENTS)
        i, j = within.i[sl].to(device), within.j[sl].to(device)
        w = within.weight[sl].to(device)
        cos, js, out_cos = means[matches.group[sl].to(device)].unbind(dim=1)
        terms = [cos, js, norm[i].square() + norm[j].square() - 2 * norm[i] * norm[j] * cos]
        if out_norm is not None:
            terms.append(out_norm[i].square() + out_norm[j].square()
                         - 2 * out_norm[i] * out_norm[j] * out_cos)
        else:
            terms.append(torch.zeros_like(cos))
        out += (w[:, None] * torch.stack(terms, dim=1)).sum(dim=0).cpu()
    return out


def window_stats(probs: Tensor, plan_: Plan, values: Tensor | None = None) -> WindowStats:
    """The statistics of stored maps (S, T, T) (and values (S, T, d)) in one call."""
    stats = WindowStats(plan_)
    stats.add(probs, values)
    return stats


#################################################################################
#                                  Tidy rows                                    #
#################################################################################

RANDOM_PAIRS = "uniform pairs of distinct tokens of the whole grid, within-window pairs included"
QUESTIONS = {
    "baseline_random": "absolute redundancy: are the rows of a window alike at all (value vs "
                       "random pairs; the errors: what one proxy per window loses)",
    "baseline_position_matched": "window-specific structure: are the rows of a window more "
                                 "alike than rows at the same offset and edge distances in "
                                 "other windows",
}


def to_rows(stats: Mapping[Hashable, WindowStats], meta: Mapping | None = None) -> list[dict]:
    """Tidy rows of every stream: `meta`'s fields (model, checkpoint, weights, resolution,
    tokens, …), the key's fields (a NamedTuple's, e.g. kind, layer, head, step, timestep,
    branch; a plain key becomes `key`), then grid ('64x64'), map_tokens, window ('4x4', or
    '1x4x4' on video grids; None on curve rows), metric, distance (curve rows), value,
    baseline_position_matched, baseline_random, n (pairs), n_position_matched, n_random,
    position_matched_fraction, edge_margin (tokens, frames x rows x cols), random_pairs,
    question_random, question_position_matched (which question each comparison answers),
    sampled, maps, status ('ok'; 'error: …' when the value is not finite). Ready for
    bench.store.Store once the caller adds provenance (bench.rows.provenance)."""
    rows = []
    for key, st in stats.items():
        fields = key._asdict() if hasattr(key, "_asdict") else {"key": key}
        base = {**(meta or {}), **fields, "grid": grid_label(st.plan.grid),
                "map_tokens": st.plan.tokens}
        bad = (f"error: {st.non_finite} of {st.samples} attention maps held NaN or Inf"
               if st.non_finite else None)
        summary = st.summary()
        for k, (label, measures) in enumerate(summary["windows"]):
            window = {"position_matched_fraction": st.plan.matches[k].fraction,
                      "edge_margin": "x".join(map(str, st.plan.edge_margin))}
            for metric, m in measures.items():
                rows.append(_row(base, label, metric, None, m, window, st.samples, bad))
        for d, m in summary["curve"]:
            rows.append(_row(base, None, CURVE_METRIC, d, m, {}, st.samples, bad))
    return rows


def _row(base: dict, window: str | None, metric: str, distance: int | None, m: Measure,
         window_fields: dict, maps: int, bad: str | None) -> dict:
    curve = distance is not None
    status = bad or ("ok" if math.isfinite(m.value) else
                     "error: non-finite value (the attention maps hold NaN or Inf)")
    return {**base, "window": window, "metric": metric, "distance": distance, "value": m.value,
            "baseline_position_matched": None if curve else m.position_matched,
            "baseline_random": None if curve else m.random, "n": m.n,
            "n_position_matched": None if curve else m.n_position_matched,
            "n_random": None if curve else m.n_random,
            "position_matched_fraction": window_fields.get("position_matched_fraction"),
            "edge_margin": window_fields.get("edge_margin"),
            "random_pairs": None if curve else RANDOM_PAIRS,
            "question_random": None if curve else QUESTIONS["baseline_random"],
            "question_position_matched": (None if curve
                                          else QUESTIONS["baseline_position_matched"]),
            "sampled": m.sampled, "maps": maps, "status": status}
