"""Window similarity of attention rows: planted structure with known answers, the streamed
(chunked) reduction against a brute-force computation on the full stored maps, the pair plan."""

import math

import numpy as np
import pytest
import torch

import analysis.window_similarity as ws
from analysis.window_similarity import plan, to_rows, window_stats
from bench.store import Store


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny maps: OpenMP hand-offs cost more than the work


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
                                           ((2, 4, 4), [(2, 2, 2), (1, 2, 2)])])
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
    assert rows[(top, "cosine")]["baseline_distance_matched"] < 0.99
    assert rows[(top, "js_divergence_nats")]["baseline_distance_matched"] > 0.01


def test_mixture_rows_have_closed_form_similarity():
    """Row i = α·uniform(own 4x4 window) + (1-α)·δ_i: every pair in a window has
    <a_i, a_j> = (α² + 2α(1-α))/N, |a_i|² = that + (1-α)², closed-form JS, replacement error
    sqrt((1-α)²(1-1/N)/|a_i|²); rows of different windows have disjoint support (cosine 0,
    JS ln 2), so random pairs average cosine (N-1)/(T-1) of the window's."""
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
    assert four["cosine"]["baseline_distance_matched"] == pytest.approx(0, abs=1e-15)
    assert four["js_divergence_nats"]["baseline_distance_matched"] == pytest.approx(
        math.log(2), rel=1e-12)
    assert four["cosine"]["baseline_random"] == pytest.approx(cosine * (N - 1) / (T - 1),
                                                              rel=1e-12)


def test_distance_only_similarity_matches_its_baseline():
    """Rows = one kernel shifted to each query on a torus: every pair statistic depends on the
    offset alone, so within-window and distance-matched values are equal."""
    grid = (1, 8, 8)
    kernel = (torch.randn(8, 8, dtype=torch.float64) * 2).softmax(-1).flatten().view(8, 8)
    rows_ = [torch.roll(kernel, shifts=(y, x), dims=(0, 1)).flatten()
             for y in range(8) for x in range(8)]
    maps = torch.stack(rows_)[None]
    rows = by_window(to_rows({"k": window_stats(maps, plan(grid, [2, 4], max_pairs=None))}))
    for w in ("2x2", "4x4"):
        for metric in ("cosine", "js_divergence_nats", "replacement_error"):
            r = rows[(w, metric)]
            assert r["value"] == pytest.approx(r["baseline_distance_matched"], rel=1e-12)
    assert rows[("4x4", "cosine")]["value"] != pytest.approx(
        rows[("4x4", "cosine")]["baseline_random"], rel=1e-3)


#################################################################################
#                     Streamed reduction == full stored maps                    #
#################################################################################

def reference(maps: np.ndarray, values: np.ndarray, grid, window, distances) -> dict:
    """Brute force on the stored maps: every pair of every sample, numpy, JS as the mean of the
    two KL divergences to the mixture."""
    S, T, _ = maps.shape
    N = math.prod(window)
    coords = np.array(list(np.ndindex(*grid)))
    ids = window_ids(grid, window)
    I, J = np.triu_indices(T, 1)
    delta = coords[J] - coords[I]
    first = np.where(delta[:, 0] != 0, delta[:, 0],
                     np.where(delta[:, 1] != 0, delta[:, 1], delta[:, 2]))
    delta = np.where(first[:, None] < 0, -delta, delta)
    same = ids[I] == ids[J]

    def kl(p, m):
        return np.where(p > 0, p * np.log(np.where(p > 0, p, 1) / m), 0).sum(-1)
    a, b = maps[:, I], maps[:, J]                                    # (S, P, T)
    m = (a + b) / 2
    per_pair = {
        "cosine": (a * b).sum(-1) / np.linalg.norm(a, axis=-1) / np.linalg.norm(b, axis=-1),
        "js_divergence_nats": 0.5 * kl(a, m) + 0.5 * kl(b, m),
        "sq": ((a - b) ** 2).sum(-1),
        "sq_out": (((maps @ values)[:, I] - (maps @ values)[:, J]) ** 2).sum(-1)}
    keys = [tuple(d) for d in delta]

    def matched(x):
        total = weight = 0.0
        for d in set(k for k, s in zip(keys, same) if s):
            at = np.array([k == d for k in keys])
            if (at & ~same).any():
                n_within = (at & same).sum()
                total += n_within * x[:, at & ~same].mean()
                weight += n_within
        return total / weight

    out = {k: (x[:, same].mean(), matched(x), x.mean()) for k, x in per_pair.items()}
    norm2 = (maps**2).sum()
    out_norm2 = ((maps @ values) ** 2).sum()
    group = S * T * (N - 1) / (2 * N)
    for metric, key, total, rows in (("replacement_error", "sq", norm2, maps),
                                     ("output_error", "sq_out", out_norm2, maps @ values)):
        replaced = sum(((rows[:, ids == w] - rows[:, ids == w].mean(1, keepdims=True)) ** 2).sum()
                       for w in range(ids.max() + 1))
        out[metric] = tuple(math.sqrt(x / total) for x in
                            (replaced, group * out[key][1], group * out[key][2]))
    chebyshev = np.abs(coords[J] - coords[I]).max(1)
    out["curve"] = {d: per_pair["cosine"][:, chebyshev == d].mean() for d in distances}
    return out


@pytest.mark.parametrize("grid, window", [((1, 8, 8), (1, 4, 4)), ((2, 4, 4), (2, 2, 2)),
                                          ((1, 6, 4), (1, 3, 2))])
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
    expected = reference(maps.numpy(), values.numpy(), grid, window, pairs.distances)
    label = ws.window_label(window, grid)
    for metric in ws.METRICS:
        got = rows[(label, metric)]
        assert (got["value"], got["baseline_distance_matched"], got["baseline_random"]) == \
            pytest.approx(expected[metric], rel=1e-12, abs=1e-15), metric
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
        for column in ("value", "baseline_distance_matched", "baseline_random"):
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
    within, matched = p.within[0], p.matched[0]
    assert within.sampled and matched.sampled and p.random.sampled
    assert (ids[within.i] == ids[within.j]).all() and (within.i != within.j).all()
    offsets = (coords[matched.j] - coords[matched.i]).abs()
    assert (ids[matched.i] != ids[matched.j]).all()
    assert (offsets <= torch.tensor(window) - 1).all()
    assert (p.random.i != p.random.j).all()
    for d, pairs in zip(p.distances, p.by_distance):
        assert ((coords[pairs.j] - coords[pairs.i]).abs().amax(1) == d).all()
    assert p.distances == tuple(range(1, 8))
    again = plan(grid, [window], max_pairs=300, seed=1)
    assert torch.equal(again.matched[0].i, matched.i) and torch.equal(again.random.j,
                                                                      p.random.j)


def test_full_pair_counts():
    """Full enumeration: T(N-1)/2 pairs within windows, and the crossing pairs at the window's
    offsets; a one-window grid has no distance-matched pair (NaN baseline)."""
    p = plan((1, 8, 8), [4, 8], max_pairs=None)
    assert len(p.within[0]) == 64 * 15 // 2 and len(p.within[1]) == 64 * 63 // 2
    coords = ws._coords((1, 8, 8))
    ids = ws._window_ids(coords, (1, 8, 8), (1, 4, 4))
    delta = (coords[None] - coords[:, None]).abs()
    near = (delta <= 3).all(-1) & (delta.sum(-1) > 0)
    across = near & (ids[:, None] != ids[None, :])
    assert len(p.matched[0]) == int(across.sum()) // 2
    assert len(p.matched[1]) == 0
    rows = by_window(to_rows({"k": window_stats(random_maps(1, 64), p)}))
    assert math.isnan(rows[("8x8", "cosine")]["baseline_distance_matched"])
    assert ("4x4", "output_error") not in rows                  # no values, no output error


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
    assert {"window", "metric", "distance", "value", "baseline_distance_matched",
            "baseline_random", "n", "n_distance_matched", "n_random", "sampled",
            "status"} <= set(first)
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
