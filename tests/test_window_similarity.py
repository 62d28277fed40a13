"""Window similarity of attention rows: planted structure with known answers, the streamed
(chunked) reduction against a brute-force computation on the full stored maps, the pair plan."""

import math

import numpy as np
import pytest
import torch

import analysis.window_similarity as ws
from analysis.window_similarity import plan, to_rows, window_stats
from bench.store import Store

# tiny maps: OpenMP hand-offs cost more than the work
pytestmark = pytest.mark.usefixtures("one_thread")


def random_maps(samples: int, T: int, sharpness: float = 2.0) -> torch.Tensor:
    return (torch.randn(samples, T, T, dtype=torch.float64) * sharpness).softmax(dim=-1)


def by_window(rows: list[dict]) -> dict:
    """(window, metric) -> row, and ('curve', d) -> row."""
    out = {}
    for r in rows:
        out[("curve", r["distance"]) if r["distance"] is not None
            else (r["window"], r["metric"])] = r
    return out


def window_ids(grid, window) -> np.ndarray:
    coords = np.array(list(np.ndindex(*grid)))
    return np.ravel_multi_index((coords // np.array(window)).T,
                                [n // c for n, c in zip(grid, window)])


#################################################################################
#                               Planted structure                               #
#################################################################################

@pytest.mark.parametrize("grid, windows", [((1, 8, 8), [2, 4]),
                                           ((2, 8, 8), [(2, 2, 2), (1, 2, 2)])])
@pytest.mark.parametrize("max_pairs", [None, 40])
def test_identical_rows_within_windows(grid, windows, max_pairs):
    """Rows equal inside each of the largest windows (so in the nested smaller ones too):
    cosine 1, JS 0, both replacement errors 0; the baselines see different rows."""
    T = math.prod(grid)
    largest = max((ws.as_window(w) for w in windows), key=math.prod)
    ids = torch.from_numpy(window_ids(grid, largest))
    templates = (torch.randn(int(ids.max()) + 1, T, dtype=torch.float64) * 2).softmax(-1)
    maps = templates[ids][None]                                       # (1, T, T)
    values = torch.randn(1, T, 5, dtype=torch.float64)
    rows = by_window(to_rows({"k": window_stats(maps, plan(grid, windows, max_pairs=max_pairs),
                                                values)}))
    for w in [ws.window_label(ws.as_window(w), grid) for w in windows]:
        assert rows[(w, "cosine")]["value"] == pytest.approx(1, abs=1e-12)
        assert rows[(w, "js_divergence_nats")]["value"] == pytest.approx(0, abs=1e-12)
        assert rows[(w, "replacement_error")]["value"] == pytest.approx(0, abs=1e-12)
        assert rows[(w, "output_error")]["value"] == pytest.approx(0, abs=1e-12)
        assert rows[(w, "cosine")]["baseline_random"] < 0.99
        assert rows[(w, "replacement_error")]["baseline_random"] > 0.01
        assert rows[(w, "cosine")]["sampled"] == (max_pairs is not None)
    top = ws.window_label(largest, grid)
    assert rows[(top, "cosine")]["position_matched_fraction"] > 0
    assert rows[(top, "cosine")]["baseline_position_matched"] < 0.99
    assert rows[(top, "js_divergence_nats")]["baseline_position_matched"] > 0.01


def test_mixture_rows_have_closed_form_similarity():
    """Row i = α·uniform(own 4x4 window) + (1-α)·δ_i: every pair in a window has
    <a_i, a_j> = (α² + 2α(1-α))/N, |a_i|² = that + (1-α)², closed-form JS, replacement error
    sqrt((1-α)²(1-1/N)/|a_i|²); rows of different windows have disjoint support (cosine 0,
    JS ln 2), so random pairs average cosine (N-1)/(T-1) of the window's, and the
    position-matched baseline is the matched share f at cosine 0 and the rest at the pairs'
    own values."""
    grid, N, T = (1, 8, 8), 16, 64
    alpha = float(torch.rand(()) * 0.6 + 0.2)
    ids = torch.from_numpy(window_ids(grid, (1, 4, 4)))
    same = (ids[:, None] == ids[None, :]).double()
    maps = (alpha * same / N + (1 - alpha) * torch.eye(T, dtype=torch.float64))[None]
    rows = by_window(to_rows({"k": window_stats(maps, plan(grid, [2, 4], max_pairs=None))}))

    dot = (alpha**2 + 2 * alpha * (1 - alpha)) / N
    norm2 = dot + (1 - alpha) ** 2
    cosine = dot / norm2

    def entropy(p):
        return -sum(x * math.log(x) for x in p)
    own, other = alpha / N + 1 - alpha, alpha / N
    mix = alpha / N + (1 - alpha) / 2
    js = (entropy([mix, mix] + [other] * (N - 2))
          - entropy([own] + [other] * (N - 1)))
    for w in ("2x2", "4x4"):                 # pairs of a 2x2 window lie in one 4x4 window too
        assert rows[(w, "cosine")]["value"] == pytest.approx(cosine, rel=1e-12)
        assert rows[(w, "js_divergence_nats")]["value"] == pytest.approx(js, rel=1e-12)
    four = {m: rows[("4x4", m)] for m in ("cosine", "js_divergence_nats", "replacement_error")}
    assert four["replacement_error"]["value"] == pytest.approx(
        math.sqrt((1 - alpha) ** 2 * (1 - 1 / N) / norm2), rel=1e-12)
    f = four["cosine"]["position_matched_fraction"]
    assert 0 < f < 1
    assert four["cosine"]["baseline_position_matched"] == pytest.approx((1 - f) * cosine,
                                                                        rel=1e-12)
    assert four["js_divergence_nats"]["baseline_position_matched"] == pytest.approx(
        f * math.log(2) + (1 - f) * js, rel=1e-12)
    # the errors keep each pair's own norms: |a_i - a_j|² = 2|a|²(1 - cos), cos 0 when matched
    mean_sq = 2 * norm2 * (f + (1 - f) * (1 - cosine))
    assert four["replacement_error"]["baseline_position_matched"] == pytest.approx(
        math.sqrt(T * (N - 1) / (2 * N) * mean_sq / (T * norm2)), rel=1e-12)
    assert four["cosine"]["baseline_random"] == pytest.approx(cosine * (N - 1) / (T - 1),
                                                              rel=1e-12)


def test_distance_only_similarity_matches_its_baseline():
    """Rows = one kernel shifted to each query on a torus: every pair statistic depends on the
    offset alone, so within-window and position-matched values are equal."""
    grid = (1, 8, 8)
    kernel = (torch.randn(8, 8, dtype=torch.float64) * 2).softmax(-1).flatten().view(8, 8)
    rows_ = [torch.roll(kernel, shifts=(y, x), dims=(0, 1)).flatten()
             for y in range(8) for x in range(8)]
    maps = torch.stack(rows_)[None]
    rows = by_window(to_rows({"k": window_stats(maps, plan(grid, [2, 4], max_pairs=None))}))
    for w in ("2x2", "4x4"):
        for metric in ("cosine", "js_divergence_nats", "replacement_error"):
            r = rows[(w, metric)]
            assert r["value"] == pytest.approx(r["baseline_position_matched"], rel=1e-12)
    assert rows[("4x4", "cosine")]["value"] != pytest.approx(
        rows[("4x4", "cosine")]["baseline_random"], rel=1e-3)


#################################################################################
#                     Streamed reduction == full stored maps                    #
#################################################################################

def position_classes(grid, window, margin, I, J, coords) -> list[tuple]:
    """Each pair's position class, computed directly: canonical offset, then per axis the
    distances to the first and last edge, capped at the margin."""
    out = []
    for i, j in zip(I, J):
        d = coords[j] - coords[i]
        nonzero = d[d != 0]
        if nonzero[0] < 0:
            d = -d
        low = np.minimum(np.minimum(coords[i], coords[j]), margin)
        high = np.minimum(np.array(grid) - 1 - np.maximum(coords[i], coords[j]), margin)
        out.append((tuple(d), tuple(low), tuple(high)))
    return out


def reference(maps: np.ndarray, values: np.ndarray, grid, window, distances, margin) -> dict:
    """Brute force on the stored maps: every pair of every sample, numpy, JS as the mean of the
    two KL divergences to the mixture; the position-matched baseline pair by pair: a
    within-window pair takes the mean over the crossing pairs of its class (itself if none),
    and the errors its own row norms with that class's cosine."""
    S, T, _ = maps.shape
    N = math.prod(window)
    coords = np.array(list(np.ndindex(*grid)))
    ids = window_ids(grid, window)
    I, J = np.triu_indices(T, 1)
    same = ids[I] == ids[J]
    classes = position_classes(grid, window, np.array(margin), I, J, coords)

    def kl(p, m):
        return np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / m), 0).sum(-1)
    outs = maps @ values
    a, b = maps[:, I], maps[:, J]                                    # (S, P, T)
    m = (a + b) / 2
    norm, out_norm = np.linalg.norm(maps, axis=-1), np.linalg.norm(outs, axis=-1)   # (S, T)
    per_pair = {
        "cosine": (a * b).sum(-1) / norm[:, I] / norm[:, J],
        "js_divergence_nats": 0.5 * kl(a, m) + 0.5 * kl(b, m),
        "sq": ((a - b) ** 2).sum(-1),
        "sq_out": ((outs[:, I] - outs[:, J]) ** 2).sum(-1),
        "out_cosine": (outs[:, I] * outs[:, J]).sum(-1) / out_norm[:, I] / out_norm[:, J]}
    extent = np.array(window) - 1
    members = {}                                                     # class -> crossing pairs
    for p, (c, s) in enumerate(zip(classes, same)):
        if not s and (np.abs(np.array(c[0])) <= extent).all():
            members.setdefault(c, []).append(p)
    inside = np.nonzero(same)[0]
    partner = {p: members.get(classes[p], [p]) for p in inside}

    def matched_mean(x):                                             # per sample, per pair
        return np.stack([x[:, partner[p]].mean(1) for p in inside], axis=1)
    cos_hat = matched_mean(per_pair["cosine"])
    js_hat = matched_mean(per_pair["js_divergence_nats"])
    out_hat = matched_mean(per_pair["out_cosine"])
    ni, nj = norm[:, I[inside]], norm[:, J[inside]]
    oi, oj = out_norm[:, I[inside]], out_norm[:, J[inside]]
    matched = {"cosine": cos_hat.mean(), "js_divergence_nats": js_hat.mean(),
               "sq": (ni**2 + nj**2 - 2 * ni * nj * cos_hat).mean(),
               "sq_out": (oi**2 + oj**2 - 2 * oi * oj * out_hat).mean()}
    if all(partner[p] == [p] for p in inside):                      # nothing to compare with
        matched = dict.fromkeys(matched, math.nan)
    out = {k: (per_pair[k][:, same].mean(), matched[k], per_pair[k].mean()) for k in matched}
    norm2 = (maps**2).sum()
    out_norm2 = (outs ** 2).sum()
    group = S * T * (N - 1) / (2 * N)
    for metric, key, total, rows in (("replacement_error", "sq", norm2, maps),
                                     ("output_error", "sq_out", out_norm2, outs)):
        replaced = sum(((rows[:, ids == w] - rows[:, ids == w].mean(1, keepdims=True)) ** 2).sum()
                       for w in range(ids.max() + 1))
        out[metric] = tuple(math.sqrt(x / total) for x in
                            (replaced, group * out[key][1], group * out[key][2]))
    chebyshev = np.abs(coords[J] - coords[I]).max(1)
    out["curve"] = {d: per_pair["cosine"][:, chebyshev == d].mean() for d in distances}
    return out


@pytest.mark.parametrize("grid, window", [((1, 8, 8), (1, 4, 4)), ((2, 8, 8), (2, 2, 2)),
                                          ((1, 6, 4), (1, 3, 2)), ((2, 4, 4), (2, 2, 2))])
def test_streamed_equals_brute_force_on_stored_maps(grid, window, monkeypatch):
    """Maps fed one sample at a time through chunks of a few rows and pairs give what a brute
    force over every pair of the stored maps gives, to float64 rounding."""
    T = math.prod(grid)
    maps, values = random_maps(3, T), torch.randn(3, T, 4, dtype=torch.float64)
    monkeypatch.setattr(ws, "CHUNK_ELEMENTS", 3 * T + 1)         # chunks of 1 to 3 rows/pairs
    pairs = plan(grid, [window], max_pairs=None)
    stats = ws.WindowStats(pairs)
    for s in range(3):
        stats.add(maps[s], values[s])
    rows = by_window(to_rows({"k": stats}))
    expected = reference(maps.numpy(), values.numpy(), grid, window, pairs.distances,
                         pairs.edge_margin)
    label = ws.window_label(window, grid)
    for metric in ws.METRICS:
        got = rows[(label, metric)]
        assert (got["value"], got["baseline_position_matched"], got["baseline_random"]) == \
            pytest.approx(expected[metric], rel=1e-12, abs=1e-15, nan_ok=True), metric
    for d, value in expected["curve"].items():
        assert rows[("curve", d)]["value"] == pytest.approx(value, rel=1e-12)


def test_sampled_plan_streams_like_one_call(monkeypatch):
    """With sampled pairs, pieces and chunks do not change the numbers either."""
    grid, T = (1, 8, 8), 64
    maps, values = random_maps(4, T), torch.randn(4, T, 3, dtype=torch.float64)
    pairs = plan(grid, [2, 4, 8], max_pairs=25, seed=3)
    whole = to_rows({"k": window_stats(maps, pairs, values)})
    monkeypatch.setattr(ws, "CHUNK_ELEMENTS", 2 * T)
    pieces = ws.WindowStats(pairs)
    pieces.add(maps[:1], values[:1])
    pieces.add(maps[1:], values[1:])
    streamed = to_rows({"k": pieces})
    assert any(r["sampled"] for r in whole)
    for a, b in zip(whole, streamed):
        for column in ("value", "baseline_position_matched", "baseline_random"):
            if a[column] is not None and not math.isnan(a[column]):
                assert b[column] == pytest.approx(a[column], rel=1e-12)


#################################################################################
#                                   Pair plan                                   #
#################################################################################

def test_sampled_pairs_are_what_their_sets_say():
    grid, window = (1, 32, 32), (1, 8, 8)
    p = plan(grid, [window], max_pairs=300, seed=1)
    coords = ws._coords(grid)
    ids = ws._window_ids(coords, grid, window)
    within, matches = p.within[0], p.matches[0]
    assert within.sampled and matches.pairs.sampled and p.random.sampled
    assert (ids[within.i] == ids[within.j]).all() and (within.i != within.j).all()
    # each within pair's matches: itself, or pairs across windows in its position class
    margin = np.array(p.edge_margin)
    classes = position_classes(grid, window, margin, within.i.numpy(), within.j.numpy(),
                               coords.numpy())
    partners = position_classes(grid, window, margin, matches.pairs.i.numpy(),
                                matches.pairs.j.numpy(), coords.numpy())
    alone = 0
    for k, g in enumerate(matches.pair_group.tolist()):
        assert partners[k] == classes[g]
        crossing = bool(ids[matches.pairs.i[k]] != ids[matches.pairs.j[k]])
        if not crossing:                                    # the within pair itself
            assert (matches.pairs.i[k], matches.pairs.j[k]) == (within.i[g], within.j[g])
            alone += 1
    assert 0 < alone < len(within)
    assert torch.equal(matches.group, torch.arange(len(within)))
    weights = torch.zeros(matches.groups, dtype=torch.float64)
    assert torch.allclose(weights.index_add_(0, matches.pair_group, matches.pairs.weight),
                          torch.ones(matches.groups, dtype=torch.float64))
    assert (p.random.i != p.random.j).all()
    for d, pairs in zip(p.distances, p.by_distance):
        assert ((coords[pairs.j] - coords[pairs.i]).abs().amax(1) == d).all()
    assert p.distances == tuple(range(1, 8))
    again = plan(grid, [window], max_pairs=300, seed=1)
    assert torch.equal(again.matches[0].pairs.i, matches.pairs.i)
    assert torch.equal(again.random.j, p.random.j)


def test_full_pair_counts():
    """Full enumeration: T(N-1)/2 pairs within windows, and as matches every crossing pair whose
    position class holds a within-window pair; a one-window grid has nothing to match (NaN
    baseline, fraction 0)."""
    p = plan((1, 8, 8), [4, 8], max_pairs=None)
    assert len(p.within[0]) == 64 * 15 // 2 and len(p.within[1]) == 64 * 63 // 2
    coords = ws._coords((1, 8, 8)).numpy()
    ids = window_ids((1, 8, 8), (1, 4, 4))
    I, J = np.triu_indices(64, 1)
    classes = position_classes((1, 8, 8), (1, 4, 4), np.array(p.edge_margin), I, J, coords)
    near = (np.abs(coords[I] - coords[J]) <= 3).all(1)
    inside = {c for c, s in zip(classes, ids[I] == ids[J]) if s}
    crossing = [c for c, s, n in zip(classes, ids[I] == ids[J], near) if not s and n]
    matched = [c for c in crossing if c in inside]
    lone = sum(1 for c, s in zip(classes, ids[I] == ids[J]) if s and c not in set(crossing))
    assert len(p.matches[0].pairs) == len(matched) + lone
    assert p.matches[0].fraction == pytest.approx(1 - lone / len(p.within[0]), rel=1e-12)
    assert p.matches[1].fraction == 0
    rows = by_window(to_rows({"k": window_stats(random_maps(1, 64), p)}))
    assert math.isnan(rows[("8x8", "cosine")]["baseline_position_matched"])
    assert ("4x4", "output_error") not in rows                  # no values, no output error


#################################################################################
#           Window-free attention: no window effect; windowed: a clear one      #
#################################################################################

def kernel_maps(grid, kind: str, scale: float, bonus: float = 0.0, window=None) -> torch.Tensor:
    """(1, T, T) attention of a kernel of the token distance on the bounded grid, rows
    normalised over the grid: 'gauss' exp(-d²/2σ²), 'exp' exp(-d/ℓ); `bonus` adds to the
    logits of keys in the query's own `window` (a model that knows windows)."""
    c = np.array(list(np.ndindex(*grid)), dtype=np.float64)
    d2 = ((c[:, None] - c[None]) ** 2).sum(-1)
    logits = -d2 / (2 * scale**2) if kind == "gauss" else -np.sqrt(d2) / scale
    if bonus:
        ids = window_ids(grid, window)
        logits = logits + bonus * (ids[:, None] == ids[None, :])
    return torch.from_numpy(logits).softmax(-1)[None]


def stationary_values(grid, features: int = 12, seed: int = 0) -> torch.Tensor:
    """(1, T, 2·features) values whose Gram matrix depends on the token offset alone (cos and
    sin of random frequencies), so that A·V knows no position either."""
    c = torch.tensor(list(np.ndindex(*grid)), dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    phase = c @ (torch.randn(3, features, dtype=torch.float64, generator=generator) * 0.7)
    return torch.cat([phase.cos(), phase.sin()], dim=1)[None]


def offset_matched_baseline(maps: torch.Tensor, grid, window) -> float:
    """The cosine baseline matched on offset alone (pairs across windows at each offset of the
    window's pairs, weighted as often as the offset occurs inside windows): biased at edges."""
    A = maps[0].numpy()
    coords = np.array(list(np.ndindex(*grid)))
    ids = window_ids(grid, window)
    I, J = np.triu_indices(len(A), 1)
    norm = np.linalg.norm(A, axis=1)
    cos = (A[I] * A[J]).sum(1) / norm[I] / norm[J]
    delta = coords[J] - coords[I]
    first = np.where(delta[:, 0] != 0, delta[:, 0], np.where(delta[:, 1] != 0, delta[:, 1],
                                                             delta[:, 2]))
    keys = [tuple(d) for d in np.where(first[:, None] < 0, -delta, delta)]
    same = ids[I] == ids[J]
    total = weight = 0.0
    for key in {k for k, s in zip(keys, same) if s}:
        at = np.array([k == key for k in keys])
        if (at & ~same).any():
            total += (at & same).sum() * cos[at & ~same].mean()
            weight += (at & same).sum()
    return total / weight


WINDOW_FREE = [("gauss", 1.0), ("gauss", 2.0), ("exp", 1.0), ("exp", 2.0)]


@pytest.mark.parametrize("grid", [(1, 16, 16), (1, 16, 32), (4, 16, 16)],
                         ids=["square", "rectangular", "video"])
@pytest.mark.parametrize("kind, scale", WINDOW_FREE, ids=[f"{k}{s:g}" for k, s in WINDOW_FREE])
def test_window_free_kernels_show_no_window_effect(grid, kind, scale):
    """Attention that knows no windows — a Gaussian or exponential kernel of the token distance,
    truncated at the grid's edges — gives within-window values equal to the position-matched
    baseline within ±1e-3 for every window size and attention-row metric (cosine, JS,
    replacement error), where the offset-only baseline is off by up to a few hundredths. The
    output error depends on the values too: smooth values turn the row's edge truncation into a
    change of the output's direction that reaches beyond the edge margin, ±2e-3 here (±1e-2 for
    the heavy-tailed exponential kernel, ℓ = 2; values of 12 random frequencies, 12 draws seen
    within half of that)."""
    maps, values = kernel_maps(grid, kind, scale), stationary_values(grid)
    windows = [(1, 2, 2), (1, 4, 4), (1, 8, 8)] + ([(2, 4, 4), (4, 4, 4)] if grid[0] > 1 else [])
    p = plan(grid, windows, max_pairs=40_000)
    assert not any(m.pairs.sampled or w.sampled for w, m in zip(p.within, p.matches))
    rows = to_rows({"k": window_stats(maps, p, values)})
    for row in (r for r in rows if r["window"] is not None):
        assert row["position_matched_fraction"] > 0.3
        tolerance = 1e-3
        if row["metric"] == "output_error":
            tolerance = 1e-2 if kind == "exp" and scale > 1 else 2e-3
        assert row["value"] == pytest.approx(row["baseline_position_matched"],
                                             abs=tolerance), row


def test_the_offset_only_baseline_was_biased_where_this_one_is_not():
    grid, window = (1, 16, 16), (1, 8, 8)
    maps = kernel_maps(grid, "gauss", 3.0)
    row = by_window(to_rows({"k": window_stats(maps, plan(grid, [window], max_pairs=40_000))}))
    cosine = row[("8x8", "cosine")]
    assert cosine["value"] - offset_matched_baseline(maps, grid, window) > 0.02
    assert cosine["value"] == pytest.approx(cosine["baseline_position_matched"], abs=1e-3)


@pytest.mark.parametrize("grid", [(1, 16, 16), (4, 16, 16)])
def test_a_model_that_knows_windows_shows_the_effect(grid):
    """The same kernel with a logit bonus for keys in the query's own 4x4 window: within-window
    rows become clearly more alike than the position-matched baseline (and the errors
    smaller), and a sampled plan sees the same within its sampling error."""
    window = (1, 4, 4)
    maps = kernel_maps(grid, "gauss", 2.0, bonus=1.0, window=window)
    exact = by_window(to_rows({"k": window_stats(maps, plan(grid, [window], max_pairs=40_000))}))
    sampled = by_window(to_rows({"k": window_stats(maps, plan(grid, [window], max_pairs=2000,
                                                              seed=5))}))
    label = ws.window_label(window, grid)
    cosine, error = exact[(label, "cosine")], exact[(label, "replacement_error")]
    assert cosine["value"] - cosine["baseline_position_matched"] > 0.1
    assert error["baseline_position_matched"] - error["value"] > 0.1
    assert cosine["baseline_position_matched"] > cosine["baseline_random"]
    assert sampled[(label, "cosine")]["sampled"]
    assert sampled[(label, "cosine")]["baseline_position_matched"] == pytest.approx(
        cosine["baseline_position_matched"], abs=0.03)


def test_edge_margin_is_checked_and_recorded():
    p = plan((2, 16, 32), [4], max_pairs=100)
    assert p.edge_margin == (1, 4, 8)
    assert plan((1, 16, 16), [4], max_pairs=100, edge_margin=6).edge_margin == (6, 6, 6)
    row = to_rows({"k": window_stats(random_maps(1, 256), plan((1, 16, 16), [4],
                                                               max_pairs=100, edge_margin=3))})[0]
    assert row["edge_margin"] == "3x3x3"
    for bad in (0, (1, 2), -1, 2.5, True):
        with pytest.raises(ValueError, match="edge_margin is a positive number of tokens"):
            plan((1, 16, 16), [4], edge_margin=bad)


def test_windows_that_do_not_tile_are_skipped_or_refused():
    with pytest.warns(UserWarning, match="16x16 do not divide the token grid 8x12"):
        p = plan((1, 8, 12), [2, 4, 16], max_pairs=10)
    assert p.labels == ["2x2", "4x4"]
    with pytest.raises(ValueError, match="no window of.*tiles the token grid 6x6.*3x3"):
        plan((1, 6, 6), [4, 5])
    with pytest.raises(ValueError, match="holds one token"):
        plan((1, 4, 4), [1])
    assert plan((4, 4, 4), [(2, 2, 2), 2], max_pairs=10).labels == ["2x2x2", "1x2x2"]


def test_rows_schema_and_store_round_trip(tmp_path):
    p = plan((1, 8, 8), [2, 4], max_pairs=50)
    stats = {("a", 1): window_stats(random_maps(2, 64), p, torch.randn(2, 64, 3,
                                                                      dtype=torch.float64))}
    rows = to_rows(stats, {"model": "m", "tokens": 64})
    assert len(rows) == 2 * 4 + len(p.distances)
    first = rows[0]
    assert list(first)[:4] == ["model", "tokens", "key", "grid"]
    assert {"window", "metric", "distance", "value", "baseline_position_matched",
            "baseline_random", "n", "n_position_matched", "n_random",
            "position_matched_fraction", "edge_margin", "random_pairs", "question_random",
            "question_position_matched", "sampled", "maps", "status"} <= set(first)
    assert "within-window pairs included" in first["random_pairs"]
    assert first["question_random"].startswith("absolute redundancy")
    assert first["question_position_matched"].startswith("window-specific structure")
    assert first["n"] == 2 * 50 and first["grid"] == "8x8" and first["map_tokens"] == 64
    curve = [r for r in rows if r["metric"] == ws.CURVE_METRIC]
    assert [r["distance"] for r in curve] == [1, 2, 3] and curve[0]["window"] is None
    store = Store(tmp_path / "rows.jsonl")
    for r in rows:
        store.append(r)
    back = store.rows()
    assert back[0]["value"] == pytest.approx(rows[0]["value"], rel=1e-15)
    assert back[-1]["baseline_random"] is None


def test_maps_of_the_wrong_shape_are_refused():
    stats = ws.WindowStats(plan((1, 4, 4), [2], max_pairs=None))
    with pytest.raises(ValueError, match=r"maps must be \(S, 16, 16\)"):
        stats.add(random_maps(1, 9))
    stats.add(random_maps(1, 16))
    with pytest.raises(ValueError, match="always or never with values"):
        stats.add(random_maps(1, 16), torch.randn(1, 16, 2, dtype=torch.float64))


def test_non_finite_maps_make_rows_that_are_not_ok():
    maps = random_maps(2, 64)
    maps[1, 5, 7] = float("nan")
    rows = to_rows({"k": window_stats(maps, plan((1, 8, 8), [4], max_pairs=None))})
    assert all(r["status"] == "error: 1 of 2 attention maps held NaN or Inf" for r in rows)
    fine = to_rows({"k": window_stats(maps[:1], plan((1, 8, 8), [4], max_pairs=None))})
    assert all(r["status"] == "ok" and r["maps"] == 1 for r in fine)
