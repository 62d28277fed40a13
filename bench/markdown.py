"""Rendering: tidy rows (a pandas DataFrame) as a table, CSV, JSON or Markdown (`render`),
`ptdit reproduce`'s complexity.md from its comparison rows (`markdown`), and the runtime
report's runtime.md from its tables (`runtime_markdown`)."""

from collections.abc import Callable

import pandas as pd

from ptdit import list_models

from .cases import EXTRAS, NO_SAVING, PROFILE_CATEGORIES, SETUP, SHAPE, TARGET

FORMATS = ("table", "csv", "json", "markdown")
# columns a printed table leaves out: the same in every row, or too long for a terminal
PROVENANCE = ("schema_version", "git_sha", "time_utc", "host", "torch", "table")
TEXT_COLUMNS = ("overrides", "flop_model", "prediction")
FIGURE_CONVENTIONS = ("linear-macs", "macs")   # the conventions a published figure is compared in


def render(df: pd.DataFrame, fmt: str) -> str:
    """`df` as a plain table, CSV, JSON records or a Markdown table."""
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

def rows_table(rows: list[dict], fmt: str) -> str:
    """Runtime rows as `ptdit bench` / `ptdit sweep --dry-run` print them: tables leave out
    provenance, long text columns and a profile's operator rows."""
    df = pd.DataFrame([row for row in rows if row.get("level") != "op"])
    if fmt in ("table", "markdown"):
        df = df.drop(columns=[c for c in (*PROVENANCE, *TEXT_COLUMNS) if c in df])
    return render(df, fmt)


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
           "\"Gflops\"/\"GFLOPs\" are MACs (DiT: its issue #14; PT-DiT: inferred, "
           "docs/paper.md §5), so their values sit in `paper_gmacs` columns.", ""]

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


#################################################################################
#                       runtime.md (ptdit report, ptdit sweep)                  #
#################################################################################

def _num(value) -> str:
    if value is None or pd.isna(value):
        return ""
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def _ratio(value) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.3f}"


def _varying(rows: pd.DataFrame) -> list[str]:
    return [c for c in EXTRAS if rows[c].astype(str).nunique() > 1]


def _formatted(rows: pd.DataFrame, columns: list[str], formats: dict[str, Callable]) -> str:
    view = rows[columns].copy()
    for column, fmt in formats.items():
        if column in view:
            view[column] = view[column].map(fmt)
    return view.to_markdown(index=False)


def _by_setup(rows: pd.DataFrame, render: Callable[[pd.DataFrame], str]) -> list[str]:
    if rows.empty:
        return ["No rows.", ""]
    out = []
    for keys, g in rows.groupby(list(SETUP), sort=False, dropna=False):
        out += [f"### {' · '.join(map(str, keys))}", "", render(g), ""]
    return out


def _machines(rows: pd.DataFrame) -> list[str]:
    seen = rows[["device", "host", "torch", "git_sha"]].astype(str).drop_duplicates()
    return [f"- **{r.device}** on host `{r.host}`, torch {r.torch}, ptdit {r.git_sha}"
            for r in seen.itertuples()] or ["- no rows"]


def _target(speedup: pd.DataFrame) -> list[str]:
    ptdit, baseline, resolution, share = TARGET
    rows = speedup[(speedup.pair == f"{ptdit} vs {baseline}") & (speedup.resolution == resolution)
                   & (speedup.latent_frames == 1)].dropna(subset=["tflops_ratio"])
    head = (f"## Target: {ptdit}'s achieved TFLOP/s at {resolution} px ≥ {share:.0%} of "
            f"{baseline}'s")
    if rows.empty:
        return [head, "", f"Not measured: no case with ok latency rows (with achieved_tflops) of "
                f"both models at {resolution} px.", ""]
    lines = [f"- {' · '.join(str(getattr(r, c)) for c in SETUP)}, batch {r.batch}: "
             f"{r.ptdit_achieved_tflops:.4g} vs {r.baseline_achieved_tflops:.4g} TFLOP/s = "
             f"{r.tflops_ratio:.1%}: {'met' if r.tflops_ratio >= share else 'not met'}"
             for r in rows.itertuples()]
    return [head, "", *lines, ""]


def _header(rows: pd.DataFrame, superseded: int, vary: list[str]) -> list[str]:
    shared = ", ".join(f"{c} {rows[c].iloc[0]}" for c in EXTRAS if c not in vary and len(rows))
    return ["# Runtime: measured latency and memory", "",
            "Made by `bench.runtime_report.write_report` from the results rows of "
            f"`bench.latency` / `bench.memory`: {len(rows)} rows, {(rows.status == 'ok').sum()} "
            f"ok, {superseded} superseded by a later row of the same case. Measured on:", "",
            *_machines(rows), "",
            f"Shared by every row: {shared or 'nothing'}. Latency: median ± IQR over `n` timed "
            "runs after `warmup`, in ms. `total_gmacs`: closed-form MACs of the step's forward "
            "pass(es), `macs` convention (linear layers and attention products; FLOPs = 2 × "
            "MACs). A case is a device, dtype, mode, backend, compile, CUDA graphs, overrides, "
            "batch, resolution and latent frames; rows of different cases are never compared.",
            ""]


def _profile_formatted(rows: pd.DataFrame, vary: list[str]) -> str:
    columns = ["model", *SHAPE, *vary, "tokens", "step_ms",
               *[f"{c}_share" for c in PROFILE_CATEGORIES], "gemm_tflops", "attention_tflops"]
    formats = {c: _ratio for c in columns if c.endswith("_share")}
    return _formatted(rows, columns, formats | {c: _num for c in ("step_ms", "gemm_tflops",
                                                              "attention_tflops")})


def _speedup_formatted(rows: pd.DataFrame, vary: list[str]) -> str:
    columns = ["pair", *SHAPE, *vary, "baseline_latency_ms", "ptdit_latency_ms",
               "measured_speedup", "predicted_speedup", "realised_fraction",
               "baseline_achieved_tflops", "ptdit_achieved_tflops", "tflops_ratio", "note"]
    formats = {c: _num for c in columns if c.endswith(("_ms", "_tflops"))}
    formats |= {c: _ratio for c in ("measured_speedup", "predicted_speedup", "realised_fraction",
                                    "tflops_ratio")}
    return _formatted(rows, columns, formats)


def _latency_formatted(rows: pd.DataFrame, vary: list[str]) -> str:
    view = rows.sort_values(["model", "latent_frames", "resolution", "batch"], kind="stable")
    view = view.assign(latency_ms=[f"{_num(m)} ± {_num(q)}" for m, q in
                                   zip(view.latency_ms_median, view.latency_ms_iqr)])
    columns = ["model", *SHAPE, *vary, "tokens", "latency_ms", "n", "compile_s", "total_gmacs",
               "achieved_tflops"]
    return _formatted(view, columns, {c: _num for c in ("compile_s", "total_gmacs",
                                                    "achieved_tflops")})


def _memory_formatted(rows: pd.DataFrame, vary: list[str]) -> str:
    view = rows.sort_values(["model", "latent_frames", "resolution", "batch"], kind="stable")
    columns = ["model", *SHAPE, *vary, "tokens", "memory_method", "peak_mib", "reserved_mib",
               "baseline_mib", "predicted_activation_mib", "measured_over_predicted"]
    formats = {c: _num for c in columns if c.endswith("_mib")}
    return _formatted(view, columns, formats | {"measured_over_predicted": _ratio})


def runtime_markdown(rows: pd.DataFrame, latency: pd.DataFrame, memory: pd.DataFrame,
                     speedup: pd.DataFrame, profiled: pd.DataFrame,
                     plots: dict[str, tuple[bool, str]]) -> str:
    """runtime.md from the runtime report's tables: every row (normalised), the latest ok
    latency and memory rows, the speedups, the profiles, and each plot file -> (drawn, what it
    needs)."""
    superseded = (rows.status == "ok").sum() - len(latency) - len(memory)
    vary = _varying(rows)
    out = _header(rows, superseded, vary)
    out += ["## PT-DiT speedups", "",
            "`measured` = baseline / PT-DiT median latency; `predicted` = baseline / PT-DiT "
            "`total_gmacs`; `realised` = (1 − 1/measured) / (1 − 1/predicted), the share of the "
            f"predicted time saving measured (only where predicted > 1, else \"{NO_SAVING}\"); "
            "`tflops_ratio` = PT-DiT / baseline achieved TFLOP/s.", "",
            *_by_setup(speedup, lambda g: _speedup_formatted(g, vary)), *_target(speedup)]
    out += ["## Latency", "", *_by_setup(latency, lambda g: _latency_formatted(g, vary))]
    out += ["## Memory", "", "`measured_over_predicted` as the harness wrote it (measured over "
            "predicted activation MiB, by `memory_method`).", "",
            *_by_setup(memory, lambda g: _memory_formatted(g, vary))]
    if len(profiled):
        out += ["## Where the time goes (torch.profiler)", "",
                "`bench.profile`: each operator's self time per step, by category (`gemm`: "
                "linear layers and the patch conv; `attention`: attention kernels; `layout`: "
                "copies and gathers; `untraced`: outside any operator), as a share of the "
                "profiled step (`step_ms`, inflated a little by the profiler); `gemm_tflops` "
                "and `attention_tflops`: the closed form's linear and attention MACs of the "
                "step over the time of that category.", "",
                *_by_setup(profiled, lambda g: _profile_formatted(g, vary))]
    out += ["## Plots", "", *[f"- `{name}`" if drawn else
                              f"- `{name}`: skipped, no rows for it (needs {needs})"
                              for name, (drawn, needs) in plots.items()], ""]
    failed = rows[rows.status != "ok"]
    out += ["## Not measured (oom, skipped, error)", "",
            _formatted(failed, ["measurement", *SETUP, "model", *SHAPE, *vary, "status"], {})
            if len(failed) else "None: every row is ok.", ""]
    return "\n".join(out)
