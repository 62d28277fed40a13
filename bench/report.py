"""Render tidy rows (a pandas DataFrame) as a table, CSV, JSON or Markdown, and write
`ptdit reproduce`'s complexity.md from its comparison rows (`markdown`)."""

import pandas as pd

from ptdit import list_models

FORMATS = ("table", "csv", "json", "markdown")
FIGURE_CONVENTIONS = ("linear-macs", "macs")   # the conventions a published figure is compared in


def render(df: pd.DataFrame, fmt: str) -> str:
    if fmt == "table":
        return df.to_string(index=False)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        return df.to_json(orient="records", indent=1)
    if fmt == "markdown":
        return df.to_markdown(index=False)
    raise ValueError(f"unknown format {fmt!r}; allowed: {', '.join(FORMATS)}")


#################################################################################
#                         complexity.md (ptdit reproduce)                       #
#################################################################################

def _pct(x) -> str:
    return "" if x is None or pd.isna(x) else f"{100 * x:+.2f}%"


def markdown(df: pd.DataFrame, published: pd.DataFrame, block_coefs: dict[str, float]) -> str:
    """complexity.md from the comparison rows (`bench.reproduce.compare`) and the published
    values: one table per comparison, then the reasons and what was not compared. `block_coefs`
    maps PT-DiT/XL, PixArt-XL/2 and DiT-XL/2 to their linear MACs per token per block in units
    of D² (`bench.reproduce.block_coefficients`)."""
    out = ["# Complexity: the papers' figures vs ptdit's exact counts", "",
           "Made by `ptdit reproduce`. Ours: `ptdit.complexity` closed form, batch 1, one forward "
           "pass, no CFG, 120 T5 tokens (width 4096) for text models, resolution in pixels (VAE "
           "8×), video in latent frames. The closed form equals FlopCounterMode and fvcore "
           "exactly on the real modules (tests/test_flops.py). Conventions: `linear-macs` = "
           "linear/conv layers only (the PT-DiT paper's figures, inferred); `macs` = linear + "
           "attention products QKᵀ and AV (the DiT paper's Gflops); FLOPs = 2 × MACs. Norms and "
           "elementwise ops count 0. `rel_diff` = ours / paper − 1. Both papers' printed "
           "\"Gflops\"/\"GFLOPs\" are MACs (DiT: its issue #14; PT-DiT: inferred, paper.md "
           "§3.5), so their values sit in `paper_gmacs` columns.", ""]

    dit = df[df.source == "DiT"]
    out += ["## DiT paper, Table 4 (its \"Gflops\" are MACs; 256 px unless stated)", "",
            _table(dit.rename(columns={"paper_value": "paper_gmacs",
                                       "ours": "ours_total_gmacs"}),
                   ["model", "resolution", "paper_gmacs", "ours_total_gmacs", "rel_diff",
                    "note"]),
            f"\n{dit.note.str.contains('agrees').sum()} of {len(dit)} agree within 0.2% or the "
            f"table's printed rounding; largest |rel diff| {100 * dit.rel_diff.abs().max():.2f}%"
            f" ({dit.loc[dit.rel_diff.abs().idxmax(), 'model']}).", ""]

    for title, video in (("PT-DiT paper, image figures (v2 Figs. 2, 8)", False),
                         ("PT-DiT paper, video figures (48 latent frames)", True)):
        fig = df[(df.source == "PT-DiT") & df.convention.isin(FIGURE_CONVENTIONS)
                 & ((df.latent_frames > 1) == video)]
        wide = _wide(fig)
        out += [f"## {title}", "", wide.to_markdown(index=False), ""]

    pct = {"paper_value": "paper_pct", "ours": "ours_pct"}
    eq4 = df[df.convention == "attention-ratio"].rename(columns=pct)
    out += ["## Eq. 4: PT-DiT attention products as % of global self-attention", "",
            _table(eq4, ["resolution", "tokens", "paper_pct", "ours_pct", "note"]), ""]

    claims = df[(df.source != "ours (no published value)")
                & df.paper_convention.isin(["reduction", "ratio"])].rename(columns=pct)
    out += ["## Headline claims, recomputed", "",
            "`reduction` = 100·(1 − a / b) %, `ratio` = 100·a / b %, for the pair \"a vs b\".", "",
            _table(claims, ["paper_version", "figure_or_table", "ptdit_model", "resolution",
                            "paper_convention", "paper_pct", "convention", "ours_pct", "note"]),
            ""]

    matched = df[df.figure_or_table == "matched width"].rename(columns={"ours": "reduction_pct"})
    cheaper = matched[matched.reduction_pct > 0]
    cheaper = ", ".join(f"{c} from {int(g.resolution.min())} px"
                        for c, g in cheaper.groupby("convention", sort=False)) or "nowhere"
    out += ["## Matched width (D = 1152, 28 blocks): PT-DiT/XL vs each base, ours only", "",
            "`reduction_pct` = 100·(1 − PT-DiT/XL / base): positive = PT-DiT/XL costs less, "
            "negative = it costs more (−63% is 1.63× the base's MACs). Per token and block "
            f"PT-DiT/XL has {_d2(block_coefs, 'PT-DiT/XL')} linear MACs against PixArt-XL/2's "
            f"{_d2(block_coefs, 'PixArt-XL/2')} and DiT-XL/2's {_d2(block_coefs, 'DiT-XL/2')}, "
            "and saves on attention products only as global attention grows with tokens²; here "
            f"it costs less in: {cheaper}.", "",
            _table(matched, ["model", "resolution", "convention", "ptdit_gmacs", "base_gmacs",
                             "reduction_pct"]), ""]

    skipped = published[~published.ptdit_model.isin(set(list_models()))
                        & ~published.ptdit_model.str.contains(" vs ")]
    out += ["## Published but not compared", "",
            _table(skipped.rename(columns={"value": "paper_value", "unit": "printed_unit"}),
                   ["paper_version", "figure_or_table", "model", "resolution", "latent_frames",
                    "paper_value", "printed_unit", "note"]), ""]
    return "\n".join(out)


def _d2(block_coefs: dict[str, float], model: str) -> str:
    return f"{block_coefs[model]:.0f}·D²"


def _table(df: pd.DataFrame, columns: list[str]) -> str:
    view = df[columns].copy()
    if "rel_diff" in view:
        view["rel_diff"] = view["rel_diff"].map(_pct)
    for column in ("ours_total_gmacs", "ours_pct", "reduction_pct", "ptdit_gmacs", "base_gmacs"):
        if column in view:
            view[column] = view[column].map(
                lambda v: f"{v:.3f}" if abs(v) < 10 else f"{v:.2f}" if abs(v) < 1000
                else f"{v:.1f}")
    return view.to_markdown(index=False)


def _wide(fig: pd.DataFrame) -> pd.DataFrame:
    """One line per published value: ours in the paper's convention and in full."""
    lines = []
    for _, g in fig.groupby(["figure_or_table", "model", "resolution", "latent_frames",
                             "paper_version"], sort=False):
        by = {r.convention: r for r in g.itertuples()}
        lin, full = by["linear-macs"], by["macs"]
        own = by[lin.paper_convention]
        lines.append({"figure": lin.figure_or_table, "paper model": lin.model,
                      "ours": lin.ptdit_model, "res": lin.resolution, "frames": lin.latent_frames,
                      "paper_gmacs": lin.paper_value, "paper conv.": lin.paper_convention,
                      "ours linear_gmacs": round(lin.ours, 1), "rel (linear)": _pct(lin.rel_diff),
                      "ours total_gmacs": round(full.ours, 1), "rel (total)": _pct(full.rel_diff),
                      "note": own.note})
    return pd.DataFrame(lines)
