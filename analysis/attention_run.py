"""One window-similarity analysis run, as `ptdit attention` and the attention notebook make it:
analyse a model's self-attention along its sampling trajectory or on noised real images
(analysis.attention_sources), append the rows with provenance to OUT/attention.jsonl, keep the
maps of Figure 3 in OUT/maps.npz, draw the figures, and summarise per analysed step.

    result = run(ptdit.build("DiT-S/2"), class_conditions("207"), out="att", resolution=256)
    print(result.text())          # per step: within-window vs position-matched vs random
    result.frame()                # the rows as a DataFrame

A folder that already holds an analysis is refused unless `force`, which replaces it once the
new analysis has finished (a failed run leaves the old one as it was).
"""

import os
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from torch import nn

from bench.rows import device_label, provenance
from bench.store import Store

from . import sampling
from .attention_maps import AttentionMap, save_maps
from .attention_plots import FIGURE_FILES, write_figures
from .attention_sources import VAE_SPATIAL, analyse_images, analyse_trajectory
from .window_similarity import DEFAULT_MAX_PAIRS, QUESTIONS

ROWS, MAPS = "attention.jsonl", "maps.npz"
UNTRAINED = ("UNTRAINED (random) weights: these numbers describe the architecture at "
             "initialisation, not a model that learned anything; give a checkpoint for the real "
             "analysis")


def default_steps(steps: int) -> list[int]:
    """The steps analysed by default: the first (pure noise), the middle and the last."""
    return sorted({0, steps // 2, steps - 1})


@dataclass
class Result:
    """What a run made: its rows, kept maps, figure files and output folder."""
    rows: list[dict]
    maps: list[AttentionMap]
    out: Path
    figures: list[Path] = field(default_factory=list)

    def frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.rows)

    @property
    def trained(self) -> bool:
        return all(row.get("weights") == "trained" for row in self.rows)

    def summary(self, metric: str = "cosine", branch: str = "cond") -> pd.DataFrame:
        """Per analysed step (and its timestep) and window: the metric within windows, its
        position-matched and random baselines and the matched share, mean over layers and
        heads (rows whose status is ok); then the mean over steps."""
        frame = self.frame()
        frame = frame[(frame.metric == metric) & (frame.branch == branch)
                      & (frame.status == "ok")]
        columns = ["value", "baseline_position_matched", "baseline_random",
                   "position_matched_fraction"]
        per_step = frame.groupby(["step", "timestep", "window"], sort=False)[columns].mean()
        overall = frame.groupby("window", sort=False)[columns].mean()
        overall.index = pd.MultiIndex.from_tuples([("mean", "", w) for w in overall.index],
                                                  names=per_step.index.names)
        table = pd.concat([per_step.sort_index(level=0, sort_remaining=False), overall])
        table.columns = ["within window", "position-matched", "random pairs", "matched share"]
        return table

    def text(self) -> str:
        """What `ptdit attention` prints."""
        frame = self.frame()
        bad = frame[frame.status != "ok"]
        lines = [f"ptdit attention: {'trained weights' if self.trained else UNTRAINED}",
                 f"{len(frame)} rows in {self.out / ROWS}; figures: "
                 f"{', '.join(p.name for p in self.figures) or 'none'}",
                 f"source: {frame.source.iloc[0]}"]
        if len(bad):
            lines.append(f"{len(bad)} rows are not ok ({bad.status.iloc[0]}); the means "
                         "below leave them out")
        lines += [f"within vs random pairs — {QUESTIONS['baseline_random']};",
                  f"within vs position-matched — {QUESTIONS['baseline_position_matched']}.",
                  "Mean over layers and heads, conditional branch, per analysed step:"]
        for metric in ("cosine", "replacement_error"):
            if (frame.metric == metric).any():
                lines += ["", metric,
                          self.summary(metric).to_string(float_format=lambda v: f"{v:.4f}")]
        return "\n".join(lines)


def existing(out: Path) -> list[Path]:
    """The files of an earlier analysis in `out`."""
    if not out.is_dir():
        return []
    names = {ROWS, MAPS}
    return sorted(p for p in out.iterdir() if p.name in names
                  or any(p.match(pattern) for pattern in FIGURE_FILES))


def run(model: nn.Module, conditions, *, out: str | os.PathLike, resolution: int,
        frames: int | None = None, images=None, vae=None, scheduler: str | None = None,
        steps: int = 25, analyse_steps=None, cfg_scale: float | None = None, seed: int = 0,
        samples: int = 1, windows=None, layers=None, heads=None, headwise: bool = False,
        max_pairs: int | None = DEFAULT_MAX_PAIRS, edge_margin=None,
        checkpoint: str | os.PathLike | None = None, init_seed: int | None = None,
        force: bool = False, figures: bool = True) -> Result:
    """Analyses `model` (see the module docstring) and writes the run into `out`.

    images: None for the sampling trajectory (its latents are resolution / the factor of `vae`
    on a side: 8 without one, 1 for analysis.sampling.PixelSpace), else a folder / .npz of real
    images (the first `samples`), encoded by `vae` (an AutoencoderKL) or in pixel space
    without one.
    steps: the sampler's step count; analyse_steps: which of them (default_steps). The rest
    as analyse_trajectory / analyse_images and window_similarity.plan. checkpoint: the weights'
    file (None: untrained, built with `init_seed`, recorded). force: replace an earlier
    analysis in `out`."""
    out = Path(out)
    earlier = existing(out)
    if earlier and not force:
        rows = len(Store(out / ROWS, table="attention")) if (out / ROWS).is_file() else 0
        raise ValueError(f"{out} already holds an attention analysis ({rows} rows in {ROWS}, "
                         f"{len(earlier)} files): give another output folder, or --force "
                         "(force=True) to replace it")
    analyse_steps = default_steps(steps) if analyse_steps is None else analyse_steps
    shown_layer, shown_head, shown_step = _figure_three(model, layers, heads, analyse_steps)

    def keep(key) -> bool:   # Figure 3: one layer, head and step, both branches
        return (key.layer, key.head, key.step) == (shown_layer, shown_head, shown_step)

    trained = checkpoint is not None
    meta = {"checkpoint": str(checkpoint) if trained else "untrained",
            "weights": "trained" if trained else "untrained",
            "init_seed": None if trained else init_seed}
    options = dict(scheduler=scheduler, steps=steps, analyse_steps=analyse_steps,
                   cfg_scale=cfg_scale, seed=seed, samples=samples, meta=meta, windows=windows,
                   layers=layers, heads=heads, keep_maps=keep, max_pairs=max_pairs,
                   edge_margin=edge_margin, headwise=headwise)
    if images is None:     # the trajectory's latent grid: resolution / the VAE's factor
        factor = VAE_SPATIAL if vae is None else sampling.vae_factor(vae)
        rows, maps = analyse_trajectory(model, conditions, resolution=resolution, frames=frames,
                                        factor=factor, **options)
    else:
        if frames is not None:
            raise ValueError("real images are analysed as images: drop frames (--frames)")
        pixels = vae is None or isinstance(vae, sampling.PixelSpace)
        rows, maps = analyse_images(model, conditions, images, resolution=resolution,
                                    vae=None if pixels else vae, **options)
    parameter = next(model.parameters())
    head = provenance(device_label(parameter.device),
                      "headwise recompute" if headwise else "math",
                      str(parameter.dtype).removeprefix("torch."))
    rows = [{**head, **row} for row in rows]
    for path in earlier:                  # the new analysis is complete: replace the old one
        path.unlink()
    store = Store(out / ROWS, table="attention")
    with store.lock():
        rows = store.extend(rows)
    result = Result(rows, maps, out)
    if maps:
        save_maps(maps, out / MAPS)
    if figures:
        result.figures = write_figures(result.frame(), maps, out)
    return result


def _figure_three(model: nn.Module, layers, heads, steps) -> tuple[int, int, int]:
    """The layer (the middle analysed one), head (the first) and step (the last) whose maps are
    kept for Figure 3."""
    depth = len(model.blocks) if hasattr(model, "blocks") else len(
        getattr(model, "transformer_blocks", []))
    layers = sorted(layers) if layers else list(range(depth))
    return layers[len(layers) // 2], (sorted(heads) if heads else [0])[0], max(steps)


__all__ = ["MAPS", "ROWS", "Result", "default_steps", "existing", "run"]
