"""Figures of the window-similarity analysis, from rows and kept maps only."""

import numpy as np
import pandas as pd
import pytest
import torch
from matplotlib.figure import Figure

from analysis.attention_maps import AttentionMap, Key
from analysis.attention_plots import (
    plot_distance,
    plot_layer_timestep,
    plot_window_rows,
    plot_window_sizes,
    write_figures,
)
from analysis.window_similarity import METRICS, WindowStats, plan, to_rows
from bench.store import Store

GRID = (1, 8, 8)
TIMESTEPS = (900.0, 500.0, 100.0)


# tiny maps: OpenMP hand-offs cost more than the work
pytestmark = pytest.mark.usefixtures("one_thread")


def random_map(T: int = 64) -> torch.Tensor:
    return (torch.randn(T, T, dtype=torch.float64) * 2).softmax(-1)


@pytest.fixture
def rows() -> pd.DataFrame:
    """Rows of 3 layers × 2 heads × 3 steps × 2 branches of random maps, windows 2x2 and 4x4."""
    pairs = plan(GRID, [2, 4], max_pairs=30)
    stats = {}
    for layer in range(3):
        for head in range(2):
            for step, t in enumerate(TIMESTEPS):
                for branch in ("cond", "uncond"):
                    s = stats[Key("global", layer, head, step, t, branch)] = WindowStats(pairs)
                    s.add(random_map(), torch.randn(64, 4, dtype=torch.float64))
    return pd.DataFrame(to_rows(stats, {"model": "test", "tokens": 64}))


@pytest.fixture
def amap() -> AttentionMap:
    return AttentionMap(Key("global", 2, 1, 0, 900.0, "cond"), GRID,
                        random_map().float().numpy())


def test_window_rows_figure_shows_two_windows_rows(amap):
    fig = plot_window_rows(amap, (4, 4))
    assert isinstance(fig, Figure) and len(fig.axes) == 5              # 4 panels + colorbar
    near_stacked, far_stacked, near_tiles, far_tiles = (ax.images[0].get_array()
                                                        for ax in fig.axes[:4])
    centre = [(4 + y) * 8 + 4 + x for y in range(4) for x in range(4)]
    corner = [y * 8 + x for y in range(4) for x in range(4)]
    np.testing.assert_array_equal(near_stacked, amap.probs[centre])
    np.testing.assert_array_equal(far_stacked, amap.probs[corner])
    assert near_tiles.shape == (4 * 9 - 1, 4 * 9 - 1)
    np.testing.assert_array_equal(near_tiles[:8, 9:17], amap.probs[centre[1]].reshape(8, 8))
    with pytest.raises(ValueError, match="tile the 8x8 grid at least twice"):
        plot_window_rows(amap, (8, 8))


def test_layer_timestep_heatmap_is_the_mean_over_heads(rows):
    fig = plot_layer_timestep(rows, metric="cosine", window="4x4")
    assert len(fig.axes) == 2                                          # heatmap + colorbar
    ax = fig.axes[0]
    image = ax.images[0].get_array()
    assert image.shape == (3, 3)
    assert [t.get_text() for t in ax.get_xticklabels()] == ["900", "500", "100"]
    picked = rows[(rows.metric == "cosine") & (rows.window == "4x4") & (rows.branch == "cond")
                  & (rows.layer == 1) & (rows.timestep == 100.0)]
    assert image[1, 2] == pytest.approx(picked.value.mean())
    with pytest.raises(ValueError, match="no rows with"):
        plot_layer_timestep(rows, window="16x16")


def test_window_size_figure_has_each_metric_baselines_and_spread(rows):
    fig = plot_window_sizes(rows)
    assert len(fig.axes) == len(METRICS)
    cond = rows[(rows.metric == "cosine") & (rows.branch == "cond")]
    for ax in fig.axes:
        assert len(ax.lines) == 3                          # within, position-matched, random
        assert [t.get_text() for t in ax.get_xticklabels()] == ["2x2", "4x4"]
        assert ax.get_ylim()[0] == 0                      # the metric's range, not auto
    cosine = fig.axes[0]
    assert cosine.get_ylim() == pytest.approx((0, 1.02))
    assert cosine.lines[0].get_ydata()[1] == pytest.approx(cond[cond.window == "4x4"].value.mean())
    # the spread across (layer, head, step) streams: a 10-90 % band and min-max bars per series
    bands = [c for c in cosine.collections if type(c).__name__ == "FillBetweenPolyCollection"
             or type(c).__name__ == "PolyCollection"]
    assert len(bands) == 2
    four = cond[cond.window == "4x4"].value
    band = bands[0].get_paths()[0].vertices[:, 1]
    assert band.min() == pytest.approx(min(cond[cond.window == "2x2"].value.quantile(0.1),
                                           four.quantile(0.1)))
    bars = [c for c in cosine.collections if type(c).__name__ == "LineCollection"][0]
    assert bars.get_segments()[1][:, 1] == pytest.approx([four.min(), four.max()])


def test_distance_figure_has_a_curve_and_a_colour_per_layer():
    """12 layers: 12 curves, no colour repeated (matplotlib's default cycle repeats after 10)."""
    pairs = plan(GRID, [2], max_pairs=30)
    stats = {Key("global", layer, 0, 0, 500.0, "cond"): WindowStats(pairs) for layer in range(12)}
    for s in stats.values():
        s.add(random_map())
    fig = plot_distance(pd.DataFrame(to_rows(stats, {"model": "test"})))
    (ax,) = fig.axes
    assert len(ax.lines) == 12 + 1                         # 12 layers and the random level
    colours = {tuple(line.get_color()) for line in ax.lines[:12]}
    assert len(colours) == 12
    assert list(ax.lines[0].get_xdata()) == [1]


def test_every_figure_says_untrained_in_its_title(rows, amap, tmp_path):
    untrained = rows.assign(weights="untrained")
    titles = []
    for fig in (plot_window_sizes(untrained), plot_layer_timestep(untrained),
                plot_distance(untrained)):
        titles.append(" ".join([fig._suptitle.get_text() if fig._suptitle else ""]
                               + [ax.get_title() for ax in fig.axes]))
    assert all("UNTRAINED" in t for t in titles)
    trained = rows.assign(weights="trained")
    assert "UNTRAINED" not in plot_distance(trained).axes[0].get_title()
    assert "UNTRAINED" in plot_window_rows(amap, (4, 4), note="UNTRAINED (random) weights"
                                           )._suptitle.get_text()


def test_write_figures_from_stored_rows(rows, amap, tmp_path):
    store = Store(tmp_path / "rows.jsonl", table="attention")
    for row in rows.to_dict("records"):
        store.append(row)
    stored = pd.DataFrame(store.rows())
    paths = write_figures(stored, [amap], tmp_path / "figures")
    assert sorted(p.name for p in paths) == [
        "window_rows_global_L2_H1_S0_cond.png", "window_similarity_distance.png",
        "window_similarity_layer_timestep.png", "window_similarity_sizes.png"]
    for p in paths:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
