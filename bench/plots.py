"""The `ptdit reproduce` plots, drawn from rows: each function takes a plot's curves (rows of
`bench.reproduce.curves`, one per point) and the published values, saves a PNG at `path` and
returns its Figure. They compute nothing, and use matplotlib's object-oriented API without
pyplot, so they need no backend and leave the global one as it is.
"""

from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

PANELS = (("linear-macs", "linear_gmacs"), ("macs", "total_gmacs"))   # convention, its column


def _models(curves: pd.DataFrame):
    """(color, model, its rows) per model, in the order the rows list them."""
    for i, (model, rows) in enumerate(curves.groupby("model", sort=False)):
        yield f"C{i}", model, rows


def _log_ticks(ax, values) -> None:
    """Label the x axis at `values` only (log scale)."""
    ax.set_xticks(values, [str(v) for v in values], minor=False)
    ax.xaxis.set_minor_formatter(NullFormatter())


def _save(fig: Figure, path: Path) -> Figure:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


def plot_resolution(curves: pd.DataFrame, published: pd.DataFrame, path: Path) -> Figure:
    """GMACs vs resolution, log-log, one panel per convention, paper values as markers."""
    fig = Figure(figsize=(12, 5))
    axes = fig.subplots(1, 2, sharey=True)
    resolutions = sorted(curves.resolution.unique())
    for ax, (convention, column) in zip(axes, PANELS):
        for color, model, rows in _models(curves):
            ax.plot(rows.resolution.to_numpy(), rows[column].to_numpy(), "-", color=color,
                    label=model)
            pts = published[(published.ptdit_model == model) & (published.latent_frames == 1)
                            & (published.convention == convention)]
            ax.plot(pts.resolution.astype(int), pts.value, "o", mfc="none", color=color)
        ax.set(xscale="log", yscale="log", xlabel="resolution (px)",
               title=f"{convention} ({column}); circles: published")
        _log_ticks(ax, resolutions)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("GMACs per image (batch 1; GFLOPs = 2×)")
    axes[0].legend(fontsize=8)
    return _save(fig, path)


def plot_attention_share(curves: pd.DataFrame, path: Path) -> Figure:
    """Attention products' share of total MACs vs tokens, images and video."""
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    for color, model, rows in _models(curves):
        for kind, style in (("image", "-o"), ("video", "--s")):
            line = rows[rows.kind == kind]
            label = kind if kind == "image" else f"{kind} {line.resolution.iloc[0]} px"
            ax.plot(line.tokens.to_numpy(), line.attention_pct.to_numpy(), style, color=color,
                    label=f"{model} ({label})", ms=4)
    ax.set(xscale="log", xlabel="tokens per sample", ylabel="attention products, % of total_gmacs",
           title="Attention share of compute (macs convention)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_video(curves: pd.DataFrame, published: pd.DataFrame, path: Path) -> Figure:
    """GMACs vs latent frames at one resolution, log-log: total (solid) and linear (dashed)."""
    fig = Figure(figsize=(7, 5))
    ax = fig.subplots()
    resolution = curves.resolution.iloc[0]
    frames = sorted(curves.latent_frames.unique())
    for color, model, rows in _models(curves):
        for column, style in (("total_gmacs", "-"), ("linear_gmacs", "--")):
            ax.plot(rows.latent_frames.to_numpy(), rows[column].to_numpy(), style, color=color,
                    label=f"{model} {column}")
        pts = published[(published.ptdit_model == model) & (published.resolution == resolution)
                        & (published.latent_frames > 1)]
        ax.plot(pts.latent_frames.astype(int), pts.value, "o", mfc="none", color=color)
    ax.set(xscale="log", yscale="log", xlabel="latent frames", ylabel="GMACs per video (batch 1)",
           title=f"Video at {resolution} px; circles: published (linear-macs)")
    _log_ticks(ax, frames)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
