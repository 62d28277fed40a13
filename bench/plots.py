"""Every figure of bench, drawn from rows: `ptdit reproduce`'s (each takes a plot's curves —
rows of `bench.reproduce.curves`, one per point — and the published values) and the runtime
report's (latency, achieved rate, memory, speedups; from its tables). Each saves a PNG at
`path` and returns its Figure (None, and no file, when it has no rows). They compute nothing,
and use matplotlib's object-oriented API without pyplot, so they need no backend and leave the
global one as it is.
"""

from collections.abc import Iterator
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from .cases import SERIES, SETUP

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


#################################################################################
#                      The runtime report's plots (ptdit report)                #
#################################################################################

def _panels(rows: pd.DataFrame, by=("device", "dtype")) -> list[tuple[str, pd.DataFrame]]:
    return [(" · ".join(map(str, keys)), g)
            for keys, g in rows.groupby(list(by), sort=False, dropna=False)]


def _series(rows: pd.DataFrame, x: str, extras: tuple[str, ...]
            ) -> Iterator[tuple[str, pd.DataFrame]]:
    """(label, its rows sorted by `x`) per model, split further by whatever else varies within
    that model's rows, which the label then names."""
    for model, m in rows.groupby("model", sort=False):
        vary = [c for c in extras if m[c].astype(str).nunique() > 1]
        for keys, g in m.groupby(vary, sort=False, dropna=False) if vary else [((), m)]:
            named = ", ".join(f"{c} {v}" for c, v in zip(vary, keys))
            yield (f"{model} ({named})" if named else model), g.sort_values(x, kind="stable")


def _draw(panels: list, x: str, y: str, path: Path, xlabel: str, ylabel: str, title: str,
          yscale: str = "log", extras: tuple[str, ...] = SERIES) -> Figure | None:
    """One axes per panel, one line per series of `y` against `x`; None (no file) if no panel."""
    if not panels:
        return None
    fig = Figure(figsize=(6.5 * len(panels), 5))
    for ax, (name, rows) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        for label, line in _series(rows, x, extras):
            ax.plot(line[x].to_numpy(), line[y].to_numpy(), "-o", ms=4, label=label)
        ax.set(xscale="log", yscale=yscale, xlabel=xlabel, ylabel=ylabel,
               title=f"{title}\n{name}")
        _log_ticks(ax, sorted(rows[x].unique()))
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    return _save(fig, path)


def _forward_images(latency: pd.DataFrame) -> pd.DataFrame:
    return latency[(latency["mode"] == "forward") & (latency.latent_frames == 1)]


def plot_latency(latency: pd.DataFrame, path: Path) -> Figure | None:
    """Median forward latency vs resolution, log-log, one line per model, a panel per device
    and dtype (images, forward mode); None and no file without such rows."""
    return _draw(_panels(_forward_images(latency)), "resolution", "latency_ms_median", path,
                 "resolution (px)", "median latency (ms)", "Forward latency, images")


def plot_tflops(latency: pd.DataFrame, path: Path) -> Figure | None:
    """Achieved TFLOP/s (the rows' own) vs resolution, one line per model, a panel per device
    and dtype (images, forward mode); None and no file without such rows."""
    rows = _forward_images(latency).dropna(subset=["achieved_tflops"])
    return _draw(_panels(rows), "resolution", "achieved_tflops", path, "resolution (px)",
                 "achieved TFLOP/s (2 × total_gmacs / median)", "Achieved rate, images",
                 yscale="linear")


def plot_memory(memory: pd.DataFrame, path: Path) -> Figure | None:
    """Peak MiB vs latent frames per model (the PT-DiT paper's training-memory figure): train
    mode where a panel has it, else forward; None and no file without video rows."""
    panels = []
    for name, rows in _panels(memory):
        mode = next((m for m in ("train", "forward") if (rows["mode"] == m).any()), None)
        rows = rows[rows["mode"] == mode]
        if (rows.latent_frames > 1).any():
            panels.append((f"{name} · {mode}", rows))
    return _draw(panels, "latent_frames", "peak_mib", path, "latent frames", "peak memory (MiB)",
                 "Peak memory vs frames", yscale="linear", extras=("resolution",) + SERIES)


def plot_speedups(speedup: pd.DataFrame, path: Path) -> Figure | None:
    """Measured vs predicted speedup, one marker series per pair and setup, each point
    labelled by its resolution (and frames), with the y = x line; None and no file if empty."""
    rows = speedup.dropna(subset=["measured_speedup", "predicted_speedup"])
    if rows.empty:
        return None
    fig = Figure(figsize=(7, 6))
    ax = fig.subplots()
    setups = rows.groupby(list(SETUP), sort=False, dropna=False).ngroups
    for keys, g in rows.groupby(["pair", *SETUP], sort=False, dropna=False):
        label = keys[0] + (f" ({' · '.join(map(str, keys[1:]))})" if setups > 1 else "")
        ax.plot(g.predicted_speedup.to_numpy(), g.measured_speedup.to_numpy(), "o", label=label)
        for r in g.itertuples():
            frames = f" × {r.latent_frames} f" if r.latent_frames > 1 else ""
            ax.annotate(f"{r.resolution} px{frames}", (r.predicted_speedup, r.measured_speedup),
                        textcoords="offset points", xytext=(4, 4), fontsize=7)
    ends = [0, max(rows.predicted_speedup.max(), rows.measured_speedup.max()) * 1.1]
    ax.plot(ends, ends, "k--", lw=1, label="y = x (all predicted saving realised)")
    ax.set(xlim=ends, ylim=ends, xlabel="predicted speedup (baseline / PT-DiT total_gmacs)",
           ylabel="measured speedup (baseline / PT-DiT median latency)",
           title="PT-DiT vs baseline: measured vs predicted")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)
