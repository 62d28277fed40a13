"""Figures of the window-similarity analysis, drawn from its rows (a DataFrame of
`analysis.window_similarity.to_rows` rows, e.g. read back from a results store) and kept maps
(`analysis.attention_maps.AttentionMap`, e.g. from `load_maps`). They compute nothing but means
of rows, and use matplotlib's object-oriented API without pyplot, so they need no backend and
leave the global one as it is. Each returns its Figure; `write_figures` saves them as PNGs.
"""

from math import prod
from pathlib import Path

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .attention_maps import AttentionMap
from .window_similarity import CURVE_METRIC, METRICS

LABELS = {"cosine": "cosine similarity", "js_divergence_nats": "JS divergence (nats)",
          "replacement_error": "row replacement error", "output_error": "output error (A·V)"}
# each metric's natural range: the axes are fixed to it, so figures compare at a glance
LIMITS = {"cosine": (0, 1.02), "js_divergence_nats": (0, np.log(2) * 1.02),
          "replacement_error": (0, 1.02), "output_error": (0, 1.02)}
UNTRAINED = "UNTRAINED (random) weights"
FIGURE_FILES = ("window_similarity_*.png", "window_rows_*.png")   # what write_figures writes


def _pick(rows: pd.DataFrame, **equal) -> pd.DataFrame:
    """The rows whose columns equal the given values."""
    mask = np.ones(len(rows), dtype=bool)
    for column, value in equal.items():
        mask &= (rows[column] == value).to_numpy()
    if not mask.any():
        raise ValueError(f"no rows with {equal}; the rows hold metrics "
                         f"{sorted(rows['metric'].unique())}, windows "
                         f"{sorted(rows['window'].dropna().unique())}")
    return rows[mask]


def _window_tokens(label: str) -> int:
    return prod(int(c) for c in label.split("x"))


def _default_window(rows: pd.DataFrame) -> str:
    windows = rows["window"].dropna().unique()
    return "4x4" if "4x4" in windows else sorted(windows, key=_window_tokens)[0]


def weights_note(rows: pd.DataFrame) -> str:
    """'UNTRAINED (random) weights' when any row says its weights are untrained, else ''."""
    untrained = "weights" in rows and (rows["weights"] == "untrained").any()
    return UNTRAINED if untrained else ""


def _title(rows: pd.DataFrame, branch: str) -> str:
    model = ", ".join(map(str, rows["model"].unique())) if "model" in rows else ""
    kind = ", ".join(map(str, rows["kind"].unique())) if "kind" in rows else ""
    title = f"{model} — {kind} attention, {branch} branch".strip(" —")
    note = weights_note(rows)
    return f"{title}\n{note}" if note else title


#################################################################################
#                       PT-DiT Figure 3, redone from kept maps                  #
#################################################################################

def _window_tokens_at(grid, window, corner) -> np.ndarray:
    """Raster indices of the tokens of the window whose top-left token is `corner` (y, x), frame
    0, in raster order inside the window."""
    _, _, w = grid
    ys = corner[0] + np.arange(window[0])
    xs = corner[1] + np.arange(window[1])
    return (ys[:, None] * w + xs[None, :]).ravel()


def _mosaic(rows: np.ndarray, grid, window) -> np.ndarray:
    """The rows (N, T) as frame-0 images (h, w), tiled window-shaped (c1 × c2) with NaN gaps."""
    _, h, w = grid
    c1, c2 = window
    out = np.full((c1 * (h + 1) - 1, c2 * (w + 1) - 1), np.nan)
    for n, row in enumerate(rows):
        y, x = divmod(n, c2)
        out[y * (h + 1):y * (h + 1) + h, x * (w + 1):x * (w + 1) + w] = row.reshape(-1, h, w)[0]
    return out


def plot_window_rows(amap: AttentionMap, window: tuple[int, int] = (4, 4),
                     near: tuple[int, int] | None = None, far: tuple[int, int] | None = None,
                     note: str = "") -> Figure:
    """PT-DiT's Figure 3 from one kept map: the attention rows of the tokens of one window
    (top) stacked — window tokens × all keys — and (bottom) each reshaped to the token grid and
    tiled in the window's shape, beside the same for a spatially distant window. `near`, `far`:
    the windows' top-left tokens (y, x) (default: the window holding the grid's centre, and
    the top-left window). One colour scale for all panels; video maps show frame 0. `note`
    (e.g. UNTRAINED) is added to the title."""
    grid = amap.grid
    _, h, w = grid
    c1, c2 = window
    if h % c1 or w % c2 or (h // c1) * (w // c2) < 2:
        raise ValueError(f"window {c1}x{c2} must tile the {h}x{w} grid at least twice; "
                         f"allowed: sides dividing {h} and {w}, smaller than the grid")
    near = near or ((h // 2) // c1 * c1, (w // 2) // c2 * c2)
    far = far or (0, 0)
    if near == far:
        far = (h - c1, w - c2)
    panels = [(corner, amap.probs[_window_tokens_at(grid, window, corner)])
              for corner in (near, far)]
    vmax = max(float(rows.max()) for _, rows in panels)
    fig = Figure(figsize=(11, 8))
    axes = fig.subplots(2, 2, gridspec_kw={"height_ratios": [1, 2]})
    for col, (corner, rows) in enumerate(panels):
        where = f"window at rows {corner[0]}–{corner[0] + c1 - 1}, cols {corner[1]}–" \
                f"{corner[1] + c2 - 1}"
        top, bottom = axes[0, col], axes[1, col]
        image = top.imshow(rows, aspect="auto", interpolation="nearest", vmin=0, vmax=vmax,
                           cmap="viridis")
        top.set(title=where, xlabel="key token (raster order)", ylabel="query in window")
        bottom.imshow(_mosaic(rows, grid, window), interpolation="nearest", vmin=0, vmax=vmax,
                      cmap="viridis")
        bottom.set(title=f"each query's row on the {h}x{w} grid", xticks=[], yticks=[])
    fig.colorbar(image, ax=axes.ravel().tolist(), label="attention probability", shrink=0.8)
    fig.suptitle(f"{amap.kind} attention, layer {amap.layer}, head {amap.head}, step "
                 f"{amap.step} (t = {amap.timestep:g}), {amap.branch}"
                 + (f"\n{note}" if note else ""))
    return fig


#################################################################################
#                            Figures from the rows                              #
#################################################################################

def plot_layer_timestep(rows: pd.DataFrame, metric: str = "cosine", window: str | None = None,
                        branch: str = "cond") -> Figure:
    """Heatmap of a window metric over layer × timestep (mean over heads), noisy timesteps
    left."""
    window = window or _default_window(rows)
    data = _pick(rows, metric=metric, window=window, branch=branch)
    table = data.pivot_table(index="layer", columns="timestep", values="value", aggfunc="mean")
    table = table[sorted(table.columns, reverse=True)]
    fig = Figure(figsize=(max(6.0, 2.5 + 0.5 * len(table.columns)),
                          max(4.0, 2.0 + 0.3 * len(table.index))))
    ax = fig.subplots()
    low, high = LIMITS.get(metric, (None, None))
    image = ax.imshow(table.to_numpy(), aspect="auto", interpolation="nearest", cmap="magma",
                      origin="lower", vmin=low, vmax=high)
    ax.set_xticks(range(len(table.columns)), [f"{t:g}" for t in table.columns], rotation=90)
    ax.set_yticks(range(len(table.index)), [str(i) for i in table.index])
    ax.set(xlabel="timestep", ylabel="layer",
           title=f"{LABELS.get(metric, metric)} within {window} windows\n{_title(data, branch)}")
    fig.colorbar(image, ax=ax, label="mean over heads")
    fig.tight_layout()
    return fig


def plot_window_sizes(rows: pd.DataFrame, branch: str = "cond") -> Figure:
    """Each window metric against window size: the mean over layers, heads and steps, with the
    spread of the per-(layer, head, step) values as a band (10th to 90th percentile) and their
    range as thin bars, beside the position-matched baseline (with its band) and the random
    baseline. Axes span each metric's natural range."""
    data = _pick(rows, branch=branch)
    metrics = [m for m in METRICS if m in set(data["metric"])]
    if not metrics:
        raise ValueError(f"no window metric among the rows; expected some of {METRICS}")
    fig = Figure(figsize=(4.2 * len(metrics), 4.0))
    axes = np.atleast_1d(fig.subplots(1, len(metrics)))
    series = (("value", "o-", "within window"),
              ("baseline_position_matched", "s--", "position-matched"),
              ("baseline_random", "^:", "random pairs"))
    for ax, metric in zip(axes, metrics):
        part = data[data["metric"] == metric]
        order = sorted(part["window"].unique(), key=_window_tokens)
        x = np.arange(len(order))
        for k, (column, style, label) in enumerate(series):
            grouped = part.groupby("window")[column]
            mean = grouped.mean().reindex(order).to_numpy(dtype=float)
            low, high = (grouped.quantile(q).reindex(order).to_numpy(dtype=float)
                         for q in (0.1, 0.9))
            lowest, highest = (grouped.min().reindex(order).to_numpy(dtype=float),
                               grouped.max().reindex(order).to_numpy(dtype=float))
            line, = ax.plot(x, mean, style, label=label)
            if column != "baseline_random":
                ax.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
                ax.vlines(x + (k - 1) * 0.06, lowest, highest, color=line.get_color(),
                          linewidth=0.8)
        ax.set_xticks(list(x), order)
        ax.set_ylim(*LIMITS.get(metric, (None, None)))
        ax.set(xlabel="window (tokens)", ylabel=LABELS[metric], title=LABELS[metric])
    axes[0].legend(fontsize="small")
    n = len(data[["layer", "head", "step"]].drop_duplicates()) if {"layer", "head", "step"} \
        <= set(data) else len(data)
    fig.suptitle(f"{_title(data, branch)}\nmean; band: 10–90th percentile, bars: range over "
                 f"{n} (layer, head, step) streams")
    fig.tight_layout()
    return fig


def plot_distance(rows: pd.DataFrame, branch: str = "cond") -> Figure:
    """Cosine similarity of attention rows against Chebyshev token distance, one line per layer
    (mean over heads and steps; one colour per layer from a sequential map, early layers dark),
    with the random-pair level."""
    data = _pick(rows, metric=CURVE_METRIC, branch=branch)
    fig = Figure(figsize=(6.5, 4.2))
    ax = fig.subplots()
    layers = sorted(data["layer"].unique())
    colours = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, max(len(layers), 2)))
    for colour, layer in zip(colours, layers):
        curve = data[data["layer"] == layer].groupby("distance")["value"].mean()
        ax.plot(curve.index, curve.to_numpy(), "o-", markersize=3, color=colour,
                label=f"layer {layer}")
    cosine = rows[(rows["metric"] == "cosine") & (rows["branch"] == branch)]
    if len(cosine):
        ax.axhline(cosine["baseline_random"].mean(), color="k", linestyle=":",
                   label="random pairs")
    ax.set_ylim(*LIMITS["cosine"])
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set(xlabel="Chebyshev distance (tokens)", ylabel="cosine similarity",
           title=_title(data, branch))
    ax.legend(fontsize="small", ncol=2 if len(layers) < 16 else 3)
    fig.tight_layout()
    return fig


def write_figures(rows: pd.DataFrame, maps: list[AttentionMap], out_dir: str | Path,
                  map_figures: int = 1) -> list[Path]:
    """Saves the figures as PNGs in `out_dir` (created): window sizes, layer × timestep and
    distance for the 'cond' branch, and Figure 3 for the first `map_figures` kept maps;
    returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = {"window_similarity_sizes.png": plot_window_sizes(rows),
               "window_similarity_layer_timestep.png": plot_layer_timestep(rows)}
    if (rows["metric"] == CURVE_METRIC).any():
        figures["window_similarity_distance.png"] = plot_distance(rows)
    for amap in maps[:map_figures]:
        _, h, w = amap.grid
        side = 4 if h % 4 == 0 and w % 4 == 0 and h * w >= 32 else 2
        name = (f"window_rows_{amap.kind}_L{amap.layer}_H{amap.head}_S{amap.step}_"
                f"{amap.branch}.png")
        figures[name] = plot_window_rows(amap, (side, side), note=weights_note(rows))
    paths = []
    for name, fig in figures.items():
        fig.savefig(out / name, dpi=110)
        paths.append(out / name)
    return paths
