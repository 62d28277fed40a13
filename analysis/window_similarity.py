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

Each against two baselines:
- distance-matched: token pairs at exactly the offsets the window's pairs have, but lying in
  different windows, weighted so that every offset counts as often as among the window's pairs;
  a difference from the within-window value is an effect of the window boundary itself (for a
  model that knows no windows, such as DiT or PixArt, there should be none);
- random: pairs of distinct tokens drawn uniformly from the whole grid.
The two errors are pair statistics too (Σ_{i∈w} |a_i - ā|² = (1/N) Σ_{i<j∈w} |a_i - a_j|² for a
window of N tokens), so their baselines are the errors of groups of N tokens whose pairs are
distance-matched or random: sqrt(T(N-1)/(2N) · mean |a_i - a_j|² / Σ_i |a_i|²) per sample.
And `cosine_vs_distance`: mean cosine over all pairs at Chebyshev distance d = max(|Δf|, |Δy|,
|Δx|) in tokens (frames count like rows and columns), d = 1 … `max_distance` (default: the
largest window side - 1, so the curve covers every offset a window holds).

Pair sets are enumerated in full while they hold at most `max_pairs` pairs, and otherwise drawn
once per grid from a seeded generator (uniform within-window pairs; offsets drawn by their
within-window frequency and a crossing anchor for each; uniform random pairs; uniform pairs per
distance), so every head, layer, step and branch is measured on the same pairs. Rows say
`sampled` and `n` (pairs evaluated). The replacement errors' within-window values are always
exact (window means are cheap). A map costs O(T²) for its row norms, entropies and window
means plus O(pairs · T) for the pairs: about 4 s for one 4096-token map at the default
`max_pairs` on one CPU core (16 MiB of float64 per chunk at most besides the map).

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
class Plan:
    """The pairs every map of one token grid is measured on (see `plan`)."""
    grid: Grid
    windows: tuple[Grid, ...]
    orders: tuple[Tensor, ...]        # per window: (T,) raster index at each window-major place
    within: tuple[PairSet, ...]       # per window: pairs inside one window
    matched: tuple[PairSet, ...]      # per window: distance-matched pairs across windows
    random: PairSet
    distances: tuple[int, ...]        # Chebyshev distances of the curve
    by_distance: tuple[PairSet, ...]

    @property
    def tokens(self) -> int:
        return prod(self.grid)

    @property
    def labels(self) -> list[str]:
        return [window_label(w, self.grid) for w in self.windows]


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


def _matched(grid: Grid, window: Grid, coords: Tensor, max_pairs: int | None,
             gen: torch.Generator) -> PairSet:
    """Pairs across windows at the offsets of the window's pairs. In full: every crossing pair at
    offset δ weighted n_within(δ) / n_across(δ); sampled: offsets drawn ∝ n_within(δ), then a
    uniform crossing pair at each. Offsets that never cross a boundary are left out."""
    deltas = _canonical_offsets([c - 1 for c in window])
    n_windows = prod(n // c for n, c in zip(grid, window))
    n_within = n_windows * (torch.tensor(window) - deltas.abs()).prod(dim=1)
    n_across = _pairs_at(grid, deltas) - n_within
    keep = n_across > 0
    deltas, n_within, n_across = deltas[keep], n_within[keep], n_across[keep]
    ids = _window_ids(coords, grid, window)
    if len(deltas) == 0:
        empty = torch.zeros(0, dtype=torch.int64)
        return PairSet(empty, empty, torch.zeros(0, dtype=torch.float64), False)

    def crossing(delta):
        a, b = _anchors(coords, grid, delta)
        across = ids[_raster(a, grid)] != ids[_raster(b, grid)]
        return a[across], b[across]

    if max_pairs is None or int(n_across.sum()) <= max_pairs:
        parts = [crossing(d) for d in deltas]
        weight = torch.cat([torch.full((len(a),), float(nw) / float(nx), dtype=torch.float64)
                            for (a, _), nw, nx in zip(parts, n_within, n_across)])
        return _from_coords(torch.cat([a for a, _ in parts]), torch.cat([b for _, b in parts]),
                            grid, weight)
    drawn = torch.multinomial(n_within.double(), max_pairs, replacement=True, generator=gen)
    a_parts, b_parts = [], []
    for k, count in zip(*torch.unique(drawn, return_counts=True)):
        a, b = crossing(deltas[k])
        pick = _uniform(gen, len(a), int(count))
        a_parts.append(a[pick])
        b_parts.append(b[pick])
    return _from_coords(torch.cat(a_parts), torch.cat(b_parts), grid, sampled=True)


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
         max_distance: int | None = None, seed: int = 0, warn: bool = True) -> Plan:
    """The pair plan of a token grid (F, h, w): windows (sides, (h, w) or (f, h, w) in tokens;
    None: DEFAULT_WINDOWS) that tile it — the others are skipped with a UserWarning naming them,
    and a ValueError says so when none tiles it —, pair sets enumerated in full up to
    `max_pairs` pairs each (None: always in full) and sampled above, with `seed`."""
    grid = tuple(int(n) for n in grid)
    if len(grid) != 3 or min(grid) < 1:
        raise ValueError(f"a token grid is (frames, rows, cols) of positive sizes, got {grid!r}")
    if max_pairs is not None and max_pairs < 1:
        raise ValueError(f"max_pairs must be a positive number of pairs or None, got {max_pairs}")
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
    matched = tuple(_matched(grid, w, coords, max_pairs, gen) for w in kept)
    random = _random(grid, max_pairs, gen)
    if max_distance is None:
        max_distance = max(max(w) for w in kept) - 1
    curve = [(d, _at_distance(grid, d, coords, max_pairs, gen))
             for d in range(1, min(max_distance, max(grid) - 1) + 1)]
    curve = [(d, s) for d, s in curve if s is not None]
    return Plan(grid, tuple(kept), orders, within, matched, random,
                tuple(d for d, _ in curve), tuple(s for _, s in curve))


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


class WindowStats:
    """Float64 sums and weights of the window statistics of one stream of maps (e.g. one layer,
    head, step and branch) on one plan; `add` maps as they come, `summary` reads the means."""

    def __init__(self, plan: Plan):
        self.plan = plan
        n, n_d = len(plan.windows), len(plan.distances)
        self.samples = 0
        self.has_values: bool | None = None
        self.norm2 = _zeros()                        # Σ_i |a_i|²
        self.out_norm2 = _zeros()                    # Σ_i |o_i|²
        self.replaced = _zeros(n)                    # Σ_w |A_w - Ā_w|²
        self.out_replaced = _zeros(n)                # Σ_w |O_w - Ō_w|²
        # weighted sums of (cosine, JS, |a_i - a_j|², |o_i - o_j|²) per set, and the weights
        self.within, self.within_w = _zeros(n, 4), _zeros(n)
        self.matched, self.matched_w = _zeros(n, 4), _zeros(n)
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
        for rows in _chunks(T, T):
            a = A[rows].double()
            norm[rows] = a.square().sum(dim=1).sqrt()
            negentropy[rows] = torch.xlogy(a, a).sum(dim=1)
            if O is not None:
                O[rows] = a @ V.double()
        self.norm2 += norm.square().sum().cpu()
        if O is not None:
            self.out_norm2 += O.square().sum().cpu()
        for k, (window, order) in enumerate(zip(plan.windows, plan.orders)):
            N, order = prod(window), order.to(device)
            for ws in _chunks(T // N, N * T):                  # a few whole windows at a time
                rows = A[order[ws.start * N:ws.stop * N]].double().view(-1, N, T)
                self.replaced[k] += (rows - rows.mean(dim=1, keepdim=True)).square().sum().cpu()
            if O is not None:
                o = O[order].view(-1, N, O.shape[1])
                self.out_replaced[k] += (o - o.mean(dim=1, keepdim=True)).square().sum().cpu()
        state = (A, O, norm, negentropy)
        for k in range(len(plan.windows)):
            self.within[k] += _pair_sums(state, plan.within[k])
            self.within_w[k] += plan.within[k].weight.sum()
            self.matched[k] += _pair_sums(state, plan.matched[k])
            self.matched_w[k] += plan.matched[k].weight.sum()
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
            inside = _mean(self.within[k], self.within_w[k])
            across = _mean(self.matched[k], self.matched_w[k])
            n_within, n_matched = S * len(plan.within[k]), S * len(plan.matched[k])
            sampled = plan.within[k].sampled or plan.matched[k].sampled or plan.random.sampled
            measures = {m: Measure(inside[c], across[c], rand[c], n_within, n_matched, n_random,
                                   sampled) for c, m in enumerate(METRICS[:2])}
            group = S * T * (N - 1) / (2 * N)           # (1/N) × within pairs, all samples
            errors = [("replacement_error", 2, self.norm2, self.replaced[k])]
            if self.has_values:
                errors.append(("output_error", 3, self.out_norm2, self.out_replaced[k]))
            for metric, c, norm2, replaced in errors:
                measures[metric] = Measure(
                    _sqrt_ratio(float(replaced), norm2), _sqrt_ratio(group * across[c], norm2),
                    _sqrt_ratio(group * rand[c], norm2), S * T * (N - 1) // 2, n_matched,
                    n_random, plan.matched[k].sampled or plan.random.sampled)
            windows.append((plan.labels[k], measures))
        curve = [(d, Measure(_mean(self.curve[k], self.curve_w[k]), math.nan, math.nan,
                             S * len(pairs), 0, 0, pairs.sampled))
                 for k, (d, pairs) in enumerate(zip(plan.distances, plan.by_distance))]
        return {"windows": windows, "curve": curve}


class Measure(NamedTuple):
    """One statistic: its value, its baselines, and the pairs behind each."""
    value: float
    distance_matched: float
    random: float
    n: int
    n_distance_matched: int
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
    return math.sqrt(x / total) if total > 0 and not math.isnan(x) else math.nan


def _pair_sums(state, pairs: PairSet, cosine_only: bool = False) -> Tensor:
    """Weighted sums over `pairs` of (cosine, JS in nats, |a_i - a_j|², |o_i - o_j|²), float64
    on the CPU (the last 0 without values; only the first with `cosine_only`)."""
    A, O, norm, negentropy = state
    T = A.shape[1]
    out = torch.zeros(4, dtype=torch.float64)
    if len(pairs) == 0:
        return out
    device = A.device
    for sl in _chunks(len(pairs), 2 * T):
        i, j = pairs.i[sl].to(device), pairs.j[sl].to(device)
        w = pairs.weight[sl].to(device)
        a, b = A[i].double(), A[j].double()
        cos = (a * b).sum(dim=1) / (norm[i] * norm[j])
        out[0] += (w * cos).sum().cpu()
        if cosine_only:
            continue
        m = (a + b) * 0.5
        js = 0.5 * (negentropy[i] + negentropy[j]) - torch.xlogy(m, m).sum(dim=1)
        out[1] += (w * js).sum().cpu()
        out[2] += (w * (a - b).square().sum(dim=1)).sum().cpu()
        if O is not None:
            out[3] += (w * (O[i] - O[j]).square().sum(dim=1)).sum().cpu()
    return out


def window_stats(probs: Tensor, plan_: Plan, values: Tensor | None = None) -> WindowStats:
    """The statistics of stored maps (S, T, T) (and values (S, T, d)) in one call."""
    stats = WindowStats(plan_)
    stats.add(probs, values)
    return stats


#################################################################################
#                                  Tidy rows                                    #
#################################################################################

def to_rows(stats: Mapping[Hashable, WindowStats], meta: Mapping | None = None) -> list[dict]:
    """Tidy rows of every stream: `meta`'s fields (model, checkpoint, weights, resolution,
    tokens, …), the key's fields (a NamedTuple's, e.g. kind, layer, head, step, timestep,
    branch; a plain key becomes `key`), then grid ('64x64'), map_tokens, window ('4x4', or
    '1x4x4' on video grids; None on curve rows), metric, distance (curve rows), value,
    baseline_distance_matched, baseline_random, n (pairs), n_distance_matched, n_random,
    sampled, status. Ready for bench.store.Store once the caller adds provenance
    (bench.rows.provenance)."""
    rows = []
    for key, st in stats.items():
        fields = key._asdict() if hasattr(key, "_asdict") else {"key": key}
        base = {**(meta or {}), **fields, "grid": grid_label(st.plan.grid),
                "map_tokens": st.plan.tokens}
        summary = st.summary()
        for label, measures in summary["windows"]:
            for metric, m in measures.items():
                rows.append(_row(base, label, metric, None, m))
        for d, m in summary["curve"]:
            rows.append(_row(base, None, CURVE_METRIC, d, m))
    return rows


def _row(base: dict, window: str | None, metric: str, distance: int | None, m: Measure) -> dict:
    curve = distance is not None
    return {**base, "window": window, "metric": metric, "distance": distance, "value": m.value,
            "baseline_distance_matched": None if curve else m.distance_matched,
            "baseline_random": None if curve else m.random, "n": m.n,
            "n_distance_matched": None if curve else m.n_distance_matched,
            "n_random": None if curve else m.n_random, "sampled": m.sampled, "status": "ok"}
