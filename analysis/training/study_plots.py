"""Figures of the equal-compute study (analysis.training.study): the Fréchet distance in the
digits classifier's features against training TFLOP and against wall-clock time, one line per
arm, with the floor (test split against train split) drawn across; window similarity against
training steps beside its baselines; and a grid of samples per arm. They
draw what the study's rows hold and measure nothing, on their own Figure objects (the global
pyplot backend is left as it is)."""

from pathlib import Path

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from PIL import Image


def _save(fig: Figure, path: Path) -> Figure:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return fig


def plot_fd(evaluations: pd.DataFrame, x: str, xlabel: str, path: Path, title: str) -> Figure:
    """FD against `x` (a column of the evaluation rows: train_tflop or train_wall_s), one line
    per arm and regime (solid: equal FLOPs; dashed: equal time), the floor dotted."""
    fig = Figure(figsize=(6.4, 4.2))
    ax = fig.subplots()
    colours = dict(zip(evaluations.arm.unique(), matplotlib.colormaps["tab10"].colors))
    for (arm, regime), rows in evaluations.groupby(["arm", "regime"], sort=False):
        rows = rows.sort_values(x)
        ax.plot(rows[x], rows.fd, marker="o", color=colours[arm],
                linestyle="-" if regime == "flops" else "--",
                label=f"{arm} ({'equal FLOPs' if regime == 'flops' else 'equal time'})")
    floor = evaluations.fd_floor.dropna()
    if len(floor):
        ax.axhline(floor.iloc[0], color="grey", linestyle=":", label="floor: test vs train split")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("FD in the digits classifier's features (lower is better)")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return _save(fig, path)


def plot_similarity(attention: pd.DataFrame, path: Path, title: str, metric: str = "cosine",
                    window: str | None = None) -> Path:
    """Window similarity (`metric`, mean over layers, heads and analysed steps) against
    training steps, one panel per arm: within windows, the position-matched baseline and
    random pairs; step 0 is the untrained initialisation. `window`: the smallest if None."""
    rows = attention[attention.metric == metric]
    window = window or sorted(rows.window.unique(), key=lambda w: int(w.split("x")[0]))[0]
    rows = rows[rows.window == window]
    arms = list(rows.arm.unique())
    fig = Figure(figsize=(3.2 * len(arms), 3.2))
    axes = fig.subplots(1, len(arms), sharey=True, squeeze=False)[0]
    for ax, arm in zip(axes, arms):
        mine = rows[rows.arm == arm].groupby("steps_done")[
            ["within", "position_matched", "random_pairs"]].mean().sort_index()
        for column, style, name in (("within", "-o", "within windows"),
                                    ("position_matched", "--s", "position-matched pairs"),
                                    ("random_pairs", ":^", "random pairs")):
            ax.plot(mine.index, mine[column], style, label=name)
        ax.set_title(arm, fontsize=9)
        ax.set_xlabel("training steps (0: untrained)")
    axes[0].set_ylabel(f"{metric} of attention rows, {window} windows")
    axes[0].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    _save(fig, path)
    return path


def sample_grid(folders: dict[str, Path], path: Path, per_arm: int = 20,
                scale: int = 2) -> Path:
    """One PNG: a row of the first `per_arm` samples of each arm (its folder of PNGs), arms in
    order, each image enlarged `scale` times (nearest neighbour); the arm names are left to the
    report that shows it."""
    rows = []
    for folder in folders.values():
        files = sorted(Path(folder).glob("*.png"))[:per_arm]
        images = [np.asarray(Image.open(f).convert("RGB")) for f in files]
        if not images:
            continue
        h, w, _ = images[0].shape
        row = np.full((h + 2, per_arm * (w + 2), 3), 255, dtype=np.uint8)
        for i, image in enumerate(images):
            row[1:h + 1, i * (w + 2) + 1:i * (w + 2) + 1 + w] = image
        rows.append(row)
    grid = np.concatenate(rows, axis=0)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid).resize((grid.shape[1] * scale, grid.shape[0] * scale),
                                 Image.NEAREST).save(path)
    return path
