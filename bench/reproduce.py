"""`ptdit reproduce`: the papers' complexity figures next to our closed-form counts.

Reads the published numbers from bench/published.csv (one row per printed value, citing the
figure or table and the paper version) and writes, to an output folder:
- complexity.csv: one row per (published value, convention of ours), with rel_diff = ours/paper − 1
  and a note saying why the two differ where they do; `unit` is the unit of both `paper_value`
  and `ours` as compared (GMACs, or % for ratios and reductions), `printed_unit` the paper's label
  (the DiT paper's "Gflops" and the PT-DiT paper's "GFLOPs" are MACs, docs/paper.md §5);
- complexity.md: the same as Markdown tables (bench.markdown.markdown), plus the headline claims,
  the Eq. 4 ratios and the matched-width comparisons (ours only);
- gflops_vs_resolution, attention_share, video_vs_frames: each plot's curves as a CSV (`curves`,
  one row per point) beside its PNG (bench.plots draws them from those rows).

Our numbers are ptdit.complexity's closed form (batch 1, one forward pass, no CFG, 120 T5 tokens
for text models); tests/test_flops.py checks it equals FlopCounterMode and fvcore exactly.
"""

from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from bench import markdown, plots
from bench.rows import provenance
from bench.store import Store, check_writable
from ptdit import complexity, get_config, list_models

PUBLISHED = Path(__file__).with_name("published.csv")
DEFAULT_OUT = Path("results/complexity")
CONVENTION_COLUMN = {"linear-macs": "linear_gmacs", "macs": "total_gmacs"}
GIIM_TCM = ("attn_proxy_gmacs", "attn_proxy_cross_gmacs", "attn_window_gmacs",
            "attn_shift_window_gmacs")
MATCH_REL = 0.002   # "agrees" threshold (0.2%), loosened to the printed rounding where coarser
MATCHED_BASES = ("PixArt-XL/2", "DiT-XL/2")   # at PT-DiT/XL's width and depth
PLOT_MODELS = ("DiT-B/2", "DiT-XL/2", "PixArt-XL/2", "PT-DiT/B", "PT-DiT/L", "PT-DiT/XL",
               "PT-DiT/H")
SHARE_MODELS = ("DiT-XL/2", "PixArt-XL/2", "PT-DiT/XL", "Qihoo-T2I-1B")
VIDEO_MODELS = ("DiT-XL/2", "PixArt-XL/2", "PT-DiT/XL", "PT-DiT/H")
PLOT_RESOLUTIONS = (256, 512, 1024, 2048, 4096)
VIDEO_RESOLUTION = 512
SHARE_FRAMES = (4, 8, 16, 32, 64)
VIDEO_FRAMES = (4, 8, 16, 32, 48, 64, 128, 256)
PLOTS = ("gflops_vs_resolution", "attention_share", "video_vs_frames")   # PNG and CSV names


def load_published(path: Path = PUBLISHED) -> pd.DataFrame:
    """The published values; `value` is also kept as printed (`printed`) for its rounding."""
    df = pd.read_csv(path, dtype={"value": str, "resolution": "Int64", "latent_frames": "Int64"},
                     keep_default_na=False, na_values={"resolution": [""],
                                                       "latent_frames": [""]})
    df["printed"] = df["value"]
    df["value"] = df["value"].astype(float)
    return df


def printed_tolerance(printed: str, value: float) -> float:
    """Relative tolerance of a printed value: 0.2%, or half a unit of its last digit if looser."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return max(MATCH_REL, 0.5 * 10**-decimals / value)


@cache
def cost(model: str, resolution: int, frames: int | None = None, **overrides) -> dict:
    """Closed-form row, batch 1, 120 text tokens; frames=None is an image."""
    return complexity.costs(model, resolution, frames, **overrides)


def _frames(latent_frames) -> int | None:
    """A row's latent_frames (1 for an image, as published.csv and complexity.csv write it)."""
    return None if int(latent_frames) == 1 else int(latent_frames)


def _video(latent_frames) -> bool:
    return _frames(latent_frames) is not None


#################################################################################
#                  Why the PT-DiT figures differ: implied coefficients          #
#################################################################################

def per_token_coefficient(model: str, points: list[tuple[int, int | None, float]],
                          **overrides) -> float:
    """Linear MACs per token per block, in units of D², implied by (resolution, latent frames or
    None for an image, linear GMACs) points: the least-squares slope over tokens of the GMACs
    less the closed form's patch embed and final layer (`linear_io`, outside the blocks) at each
    point, divided by depth·D². Constant terms (proxies, text, embedders) drop out of the
    slope."""
    rows = [(cost(model, r, f, **overrides), gmacs) for r, f, gmacs in points]
    tokens = [c["tokens"] for c, _ in rows]
    blocks = [(gmacs - c["linear_io_gmacs"]) * 1e9 for c, gmacs in rows]
    slope = np.polyfit(np.array(tokens, dtype=float), np.array(blocks), 1)[0]
    c = get_config(model, **overrides)
    return slope / (c.depth * c.hidden_size**2)


def block_coefficient(model: str, **overrides) -> float:
    """The closed form's own linear MACs per token per block, in units of D²: the slope of
    `per_token_coefficient` between its 256 and 512 px images."""
    points = [(r, None, cost(model, r, **overrides)["linear_gmacs"]) for r in (256, 512)]
    return per_token_coefficient(model, points, **overrides)


def block_coefficients() -> dict[str, float]:
    """`block_coefficient` of PT-DiT/XL and of its matched-width bases (complexity.md)."""
    return {model: block_coefficient(model) for model in ("PT-DiT/XL", *MATCHED_BASES)}


def implied_coefficients(published: pd.DataFrame) -> pd.DataFrame:
    """Per PT-DiT model and image/video: the coefficient implied by the paper and by ours."""
    rows = []
    pt = published[(published.convention == "linear-macs")
                   & published.ptdit_model.str.startswith("PT-DiT")]
    for (model, video), group in pt.groupby([pt.ptdit_model, pt.latent_frames.map(_video)]):
        group = group.drop_duplicates("resolution")
        if len(group) < 2:
            continue
        paper, ours = [], []
        for r in group.itertuples():
            res, frames = int(r.resolution), _frames(r.latent_frames)
            paper.append((res, frames, r.value))
            ours.append((res, frames, cost(model, res, frames)["linear_gmacs"]))
        rows.append({"model": model, "video": video, "points": len(group),
                     "paper_coef_d2": per_token_coefficient(model, paper),
                     "ours_coef_d2": per_token_coefficient(model, ours)})
    return pd.DataFrame(rows, columns=["model", "video", "points", "paper_coef_d2",
                                       "ours_coef_d2"])


#################################################################################
#                               Comparison rows                                 #
#################################################################################

def _row(p, convention: str, ours: float, note: str, **extra) -> dict:
    return {"source": p.source, "paper_version": p.paper_version,
            "figure_or_table": p.figure_or_table, "model": p.model,
            "ptdit_model": p.ptdit_model, "resolution": p.resolution,
            "latent_frames": p.latent_frames, "paper_convention": p.convention,
            "convention": convention, "paper_value": p.value, "ours": ours,
            "unit": "%" if p.unit == "%" else "GMACs", "printed_unit": p.unit,
            "rel_diff": ours / p.value - 1, "note": note, **extra}


def figure_rows(published: pd.DataFrame, coefficients: pd.DataFrame) -> list[dict]:
    """Per-model published values vs ours, in the paper's convention and (PT-DiT paper) in full."""
    rows = []
    known = set(list_models())
    figures = published[published.ptdit_model.isin(known)
                        & published.convention.isin(list(CONVENTION_COLUMN))]
    for p in figures.itertuples():
        c = cost(p.ptdit_model, int(p.resolution), _frames(p.latent_frames))
        conventions = [p.convention] + ([] if p.source == "DiT" else
                                        [k for k in CONVENTION_COLUMN if k != p.convention])
        for convention in conventions:
            ours = c[CONVENTION_COLUMN[convention]]
            rel = ours / p.value - 1
            agrees = abs(rel) <= printed_tolerance(p.printed, p.value)
            rows.append(_row(p, convention, ours,
                             _figure_note(p, convention, c, rel, agrees, coefficients),
                             text_tokens=c["text_tokens"], tokens=c["tokens"]))
    return rows


def _figure_note(p, convention, c, rel, agrees, coefficients) -> str:
    ambiguous = "ambiguous label; " if "AMBIGUOUS" in p.note else ""
    if convention != p.convention:
        if convention == "macs":
            return (f"{ambiguous}the paper's value (inferred {p.convention}) excludes the "
                    f"{c['attention_gmacs']:.1f} G attention products that this count includes")
        return (f"{ambiguous}the paper's value (inferred {p.convention}) includes attention "
                f"products; linear layers alone give this")
    if agrees:
        return f"{ambiguous}agrees within {100 * printed_tolerance(p.printed, p.value):.2g}%"
    if p.ptdit_model.startswith("PT-DiT") and convention == "linear-macs":
        match = coefficients[(coefficients.model == p.ptdit_model)
                             & (coefficients.video == _video(p.latent_frames))]
        if len(match):
            k = match.iloc[0]
            return (f"{ambiguous}the paper's {p.ptdit_model} values imply "
                    f"{k.paper_coef_d2:.2f}·D² linear MACs per token per block (slope over its "
                    f"{k.points} points); the released block, and ours, has "
                    f"{k.ours_coef_d2:.2f}·D² (docs/paper.md §5)")
        return (f"{ambiguous}a single point: the paper's PT-DiT figures imply fewer per-token "
                f"linear MACs than the released block's "
                f"{block_coefficient(p.ptdit_model):.0f}·D² (docs/paper.md §5)")
    if convention == "macs" and p.ptdit_model.startswith("DiT"):
        return (f"{ambiguous}closer to our full count than to linear-only "
                f"({c['linear_gmacs']:.1f}); the remaining {100 * rel:+.1f}% is unexplained")
    return f"{ambiguous}differs by {100 * rel:+.2f}%"


def _pair(ptdit_model: str) -> tuple[str, str]:
    a, b = ptdit_model.split(" vs ")
    return a, b


def eq4_rows(published: pd.DataFrame) -> list[dict]:
    """Eq. 4: PT-DiT's GIIM+TCM attention products as a % of global self-attention's 2N²D."""
    rows = []
    for p in published[published.convention == "attention-ratio"].itertuples():
        a, b = _pair(p.ptdit_model)
        ca, cb = cost(a, int(p.resolution)), cost(b, int(p.resolution))
        ours = 100 * sum(ca[k] for k in GIIM_TCM) / cb["attn_global_gmacs"]
        P = int(np.prod([int(s) for s in ca["window"].split("x")]))
        N = ca["tokens"]
        formula = 100 * (1 / P**2 + 1 / P + 2 * P / N)    # the paper's Eq. 4 over its Eq. 3
        same = abs(ours - formula) < 1e-9 * formula
        note = (f"our counts {'equal' if same else 'differ from'} Eq. 4 evaluated at P={P}, "
                f"N={N} ({formula:.1f}%)"
                + ("" if abs(formula - p.value) < 0.1 else
                   f"; the paper's {p.value}% does not follow from its own Eq. 4"))
        rows.append(_row(p, "attention-ratio", ours, note, tokens=N))
    return rows


def claim_rows(published: pd.DataFrame) -> list[dict]:
    """Headline claims recomputed as published and like for like in each convention."""
    rows = []
    claims = published[published.convention.isin(["reduction", "ratio"])
                       & published.ptdit_model.str.contains(" vs ")]
    for p in claims.itertuples():
        a, b = _pair(p.ptdit_model)
        ca, cb = cost(a, int(p.resolution)), cost(b, int(p.resolution))
        b_published = "macs" if b.startswith("DiT") else "linear-macs"
        variants = {}
        if b_published != "linear-macs":
            variants["as published (linear-macs vs macs)"] = (ca["linear_gmacs"],
                                                              cb["total_gmacs"])
        variants |= {f"{k} (like for like)": (ca[col], cb[col])
                     for k, col in CONVENTION_COLUMN.items()}
        for convention, (x, y) in variants.items():
            ours = 100 * (1 - x / y) if p.convention == "reduction" else 100 * x / y
            rows.append(_row(p, convention, ours, f"{a} {x:.1f} vs {b} {y:.1f} GMACs"))
    return rows


def matched_width_rows(resolutions=(256, 512, 1024, 2048)) -> list[dict]:
    """PT-DiT/XL against PixArt-XL/2 and DiT-XL/2 (all D=1152, 28 blocks): ours only. `ours` is
    the reduction in % (100·(1 − PT-DiT/XL / base)): negative means PT-DiT/XL costs more."""
    rows = []
    for base in MATCHED_BASES:
        for r in resolutions:
            a, b = cost("PT-DiT/XL", r), cost(base, r)
            for convention, col in CONVENTION_COLUMN.items():
                ratio = a[col] / b[col]
                rows.append({"source": "ours (no published value)", "paper_version": "",
                             "figure_or_table": "matched width", "model": f"PT-DiT/XL vs {base}",
                             "ptdit_model": f"PT-DiT/XL vs {base}", "resolution": r,
                             "latent_frames": 1, "paper_convention": "",
                             "convention": convention, "paper_value": None,
                             "ours": 100 * (1 - ratio), "unit": "%", "printed_unit": "",
                             "rel_diff": None, "ptdit_gmacs": a[col], "base_gmacs": b[col],
                             "note": f"reduction_pct = 100·(1 − ratio); PT-DiT/XL {a[col]:.1f} "
                                     f"vs {base} {b[col]:.1f} GMACs: ratio {ratio:.2f} "
                                     f"({'cheaper' if ratio < 1 else 'costlier'})"})
    return rows


def compare(published: pd.DataFrame) -> pd.DataFrame:
    """Every comparison row (complexity.csv)."""
    coefficients = implied_coefficients(published)
    rows = (figure_rows(published, coefficients) + eq4_rows(published) + claim_rows(published)
            + matched_width_rows())
    return pd.DataFrame(rows)


#################################################################################
#                          The plots' curves and run                            #
#################################################################################

def _point(plot: str, model: str, resolution: int, frames: int | None, values) -> dict:
    c = cost(model, resolution, frames)
    return {"plot": plot, "model": model, "kind": "image" if frames is None else "video",
            "resolution": resolution, "latent_frames": c["latent_frames"], "tokens": c["tokens"],
            **values(c)}


def _gmacs(c: dict) -> dict:
    return {column: c[column] for column in CONVENTION_COLUMN.values()}


def _attention_pct(c: dict) -> dict:
    return {"attention_pct": 100 * c["attention_gmacs"] / c["total_gmacs"]}


def curves() -> pd.DataFrame:
    """Every point of every curve the plots draw, closed form, one row each: `plot` names the
    PNG; linear_gmacs and total_gmacs (gflops_vs_resolution, video_vs_frames) or attention_pct,
    the attention products' % of total_gmacs (attention_share)."""
    rows = [_point("gflops_vs_resolution", model, r, None, _gmacs)
            for model in PLOT_MODELS for r in PLOT_RESOLUTIONS]
    for model in SHARE_MODELS:
        rows += [_point("attention_share", model, r, None, _attention_pct)
                 for r in PLOT_RESOLUTIONS]
        rows += [_point("attention_share", model, VIDEO_RESOLUTION, f, _attention_pct)
                 for f in SHARE_FRAMES]
    rows += [_point("video_vs_frames", model, VIDEO_RESOLUTION, f, _gmacs)
             for model in VIDEO_MODELS for f in VIDEO_FRAMES]
    return pd.DataFrame(rows)


def plot_curves(curves: pd.DataFrame, plot: str) -> pd.DataFrame:
    """One plot's rows of `curves` with the columns it uses (its CSV)."""
    rows = curves[curves["plot"] == plot].drop(columns="plot")
    return rows.dropna(axis="columns", how="all").reset_index(drop=True)


def cost_rows(df: pd.DataFrame, points: pd.DataFrame) -> list[dict]:
    """The closed-form rows behind the comparison and the curves, one per distinct (model,
    resolution, latent frames), with the results rows' provenance fields."""
    known = set(list_models())
    cases = {(m, int(r), int(f)) for m, r, f in zip(df.ptdit_model, df.resolution,
                                                    df.latent_frames) if m in known}
    cases |= {(m, int(r), int(f)) for m, r, f in zip(points.model, points.resolution,
                                                     points.latent_frames)}
    env = provenance("none (closed form)", "any", "float32")
    return [{**env, **cost(m, r, _frames(f)), "status": "ok"} for m, r, f in sorted(cases)]


def run(out_dir: Path = DEFAULT_OUT, store: str | Path | Store | None = None) -> str:
    """Writes complexity.csv, complexity.md and each plot's PNG and CSV to `out_dir`, and, with
    a `store` (a path, checked and locked, or a Store), appends the closed-form rows used
    (`cost_rows`); returns the Markdown."""
    if store is not None and not isinstance(store, Store):
        store = Store(check_writable(store, "--store"), "complexity").check()
        with store.lock():
            return run(out_dir, store)
    if str(out_dir).strip() == "":
        raise ValueError("--out is empty; give a folder (it is created if missing)")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a folder (it is created if missing)")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"cannot create the output folder {out_dir}: {err.strerror}") from None
    published = load_published()
    df = compare(published)
    df.to_csv(out_dir / "complexity.csv", index=False)
    text = markdown.markdown(df, published, block_coefficients())
    (out_dir / "complexity.md").write_text(text + "\n")
    points = curves()
    by_plot = {plot: plot_curves(points, plot) for plot in PLOTS}
    for plot, rows in by_plot.items():
        rows.to_csv(out_dir / f"{plot}.csv", index=False)
    plots.plot_resolution(by_plot["gflops_vs_resolution"], published,
                          out_dir / "gflops_vs_resolution.png")
    plots.plot_attention_share(by_plot["attention_share"], out_dir / "attention_share.png")
    plots.plot_video(by_plot["video_vs_frames"], published, out_dir / "video_vs_frames.png")
    if store is not None:
        for row in cost_rows(df, points):
            store.append(row)
    return text
