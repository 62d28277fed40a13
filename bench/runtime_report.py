"""The runtime report: the latency and memory rows of `bench.latency` / `bench.memory` (a
DataFrame, e.g. `Store(path).frame()`) as CSV, Markdown and PNG, with PT-DiT's measured speedup
over each baseline beside the speedup its MACs predict. Nothing here measures: every number is
a row's own, or arithmetic on two rows of one case. The plots use matplotlib's object API without
pyplot, so they need no backend and leave the global one as it is.

A case is one (device, dtype, mode, backend, compile, cuda_graphs, overrides, batch, resolution,
latent_frames); rows of different cases are never compared. Where a case and model were measured
more than once, the latest row (`time_utc`) is used and the others are counted as superseded.

    write_report(Store("results/runtime.jsonl", "runtime").frame(), "results/runtime")
"""

import json
import math
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import NullFormatter

from ptdit import get_config

# (PT-DiT model, its baseline, why the pair)
PAIRS = (("PT-DiT/XL", "PixArt-XL/2", "matched width and depth"),
         ("PT-DiT/L", "PixArt-XL/2", "the paper's pair (0.6B each)"),
         ("PT-DiT/B", "DiT-B/2", "the paper's pair (0.14B vs 0.13B)"),
         ("PT-DiT/XL", "DiT-XL/2", "matched width and depth, class-conditioned base"))
# the issue's target: PT-DiT/XL's achieved TFLOP/s at 2048 px at least 80% of PixArt-XL/2's
TARGET = ("PT-DiT/XL", "PixArt-XL/2", 2048, 0.8)

SETUP = ("device", "dtype", "mode")              # one Markdown table per setup
EXTRAS = ("backend", "compile", "cuda_graphs", "overrides")   # the rest of a case's setup
SHAPE = ("resolution", "latent_frames", "batch")
CASE = SETUP + EXTRAS + SHAPE
VARIANT = ("text_tokens", "window")              # model inputs that may differ within a case
SERIES = EXTRAS + ("batch",) + VARIANT           # what splits a plot's model into lines
PROVENANCE = ("host", "torch", "git_sha", "time_utc")
LATENCY = ("latency_ms_median", "latency_ms_iqr", "latency_ms_min", "n", "warmup", "compile_s",
           "total_gmacs", "achieved_tflops")
MEMORY = ("memory_method", "peak_mib", "reserved_mib", "baseline_mib", "predicted_activation_mib",
          "measured_over_predicted")
KEY = ("model",) + CASE + VARIANT + ("tokens", "forward_batch", "threads")
COLUMNS = ("measurement", "status") + KEY + PROVENANCE + LATENCY + MEMORY
PROFILE_CATEGORIES = ("gemm", "attention", "layout", "norm", "elementwise", "optimizer", "other",
                      "untraced")   # bench.profile.CATEGORIES
PROFILE_COLUMNS = ("model", *CASE, *VARIANT, "tokens", "threads", "step_ms",
                   *[f"{c}_share" for c in PROFILE_CATEGORIES], "gemm_tflops",
                   "attention_tflops")
MEASUREMENTS = ("latency", "memory", "profile")   # bench.sweep.MEASUREMENTS
NO_SAVING = "no saving predicted"
NO_MACS = "no total_gmacs in a row"


#################################################################################
#                                 Rows and cases                                #
#################################################################################

def _overrides(value) -> str:
    """A row's `overrides` (dict, JSON string or missing) as one canonical JSON string."""
    if isinstance(value, str):
        value = json.loads(value) if value.strip() else {}
    if value is None or (isinstance(value, float) and math.isnan(value)):
        value = {}
    return json.dumps(value, sort_keys=True)


def _hashable(value):
    return tuple(value) if isinstance(value, (list, np.ndarray)) else value


def normalise(frame: pd.DataFrame) -> pd.DataFrame:
    """The runtime rows of `frame` with every column this report reads (missing ones empty),
    `overrides` canonical and list-valued cells (a window) as tuples, so cases compare."""
    rows = frame.reindex(columns=list(dict.fromkeys([*COLUMNS, *frame.columns])))
    rows = rows[rows.measurement.isin(["latency", "memory"])].copy()
    rows["overrides"] = rows.overrides.map(_overrides).astype(object)
    rows["window"] = rows.window.map(_hashable).astype(object)
    return rows.reset_index(drop=True)


def measured(frame: pd.DataFrame, measurement: str) -> pd.DataFrame:
    """The ok rows of one measurement, every one (all reruns kept)."""
    rows = normalise(frame)
    return rows[(rows.measurement == measurement) & (rows.status == "ok")].reset_index(drop=True)


def latest(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per model, case and variant: the latest by `time_utc` (stable for ties)."""
    ordered = rows.sort_values("time_utc", kind="stable", na_position="first")
    return ordered.drop_duplicates(list(("model",) + CASE + VARIANT), keep="last")


#################################################################################
#                                   Speedups                                    #
#################################################################################

def _text_conditioned(model: str) -> bool:
    return get_config(model).condition == "text"


def _side(rows: pd.DataFrame, model: str, prefix: str) -> pd.DataFrame:
    measures = ("latency_ms_median", "total_gmacs", "achieved_tflops")
    side = rows[rows.model == model][list(CASE + VARIANT + ("tokens",) + measures)]
    return side.rename(columns={"latency_ms_median": f"{prefix}_latency_ms",
                                "total_gmacs": f"{prefix}_total_gmacs",
                                "achieved_tflops": f"{prefix}_achieved_tflops"})


def _pair(rows: pd.DataFrame, ptdit: str, baseline: str, why: str) -> pd.DataFrame:
    """PT-DiT's rows joined to the baseline's of the same case (and caption length, where both
    take captions); PT-DiT's windows each get a line."""
    captions = _text_conditioned(ptdit) and _text_conditioned(baseline)
    on = list(CASE) + ["text_tokens"] * captions
    unmatched = ["window", "tokens"] + ["text_tokens"] * (not captions)
    base = _side(rows, baseline, "baseline").drop(columns=unmatched)
    both = _side(rows, ptdit, "ptdit").merge(base, on=on)
    both.insert(0, "pair", f"{ptdit} vs {baseline}")
    both.insert(1, "ptdit_model", ptdit)
    both.insert(2, "baseline_model", baseline)
    both.insert(3, "why", why)
    return both


def realised_fraction(measured_speedup: float, predicted_speedup: float) -> float:
    """The share of the predicted time saving that was measured: (1 − 1/m) / (1 − 1/p), only
    where a saving is predicted (p > 1); NaN otherwise."""
    if not predicted_speedup > 1:
        return math.nan
    return (1 - 1 / measured_speedup) / (1 - 1 / predicted_speedup)


def speedups(frame: pd.DataFrame) -> pd.DataFrame:
    """PT-DiT's measured and MAC-predicted speedup over its baselines (`PAIRS`), one line per
    case both were measured in (ok latency rows, the latest of each)."""
    rows = latest(measured(frame, "latency"))
    pairs = [_pair(rows, *pair) for pair in PAIRS]
    out = pd.concat(pairs, ignore_index=True)
    out["measured_speedup"] = out.baseline_latency_ms / out.ptdit_latency_ms
    out["predicted_speedup"] = out.baseline_total_gmacs / out.ptdit_total_gmacs
    out["realised_fraction"] = [realised_fraction(m, p) for m, p in
                                zip(out.measured_speedup, out.predicted_speedup)]
    out["tflops_ratio"] = out.ptdit_achieved_tflops / out.baseline_achieved_tflops
    out["note"] = np.select([out.predicted_speedup > 1, out.predicted_speedup.isna()],
                            ["", NO_MACS], NO_SAVING)
    return out.sort_values(list(SETUP) + ["pair", "latent_frames", "resolution"], kind="stable",
                           ignore_index=True)


#################################################################################
#                                     Plots                                     #
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


def _log_ticks(ax, values) -> None:
    """Label the x axis at `values` only (log scale)."""
    ax.set_xticks(values, [str(v) for v in values], minor=False)
    ax.xaxis.set_minor_formatter(NullFormatter())


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


def _save(fig: Figure, path: Path) -> Figure:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return fig


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


# file -> (plot, the table it draws, what it needs)
PLOTS: dict[str, tuple[Callable, str, str]] = {
    "latency_vs_resolution.png": (plot_latency, "latency", "ok forward-mode image latency rows"),
    "speedup_measured_vs_predicted.png": (plot_speedups, "speedups",
                                          "a PT-DiT model and its baseline measured in one case"),
    "memory_vs_frames.png": (plot_memory, "memory",
                             "ok train- or forward-mode memory rows with latent_frames > 1"),
    "tflops_vs_resolution.png": (plot_tflops, "latency",
                                 "ok forward-mode image latency rows with achieved_tflops"),
}


#################################################################################
#                                    Markdown                                   #
#################################################################################

def _num(value) -> str:
    if value is None or pd.isna(value):
        return ""
    return f"{value:.4g}" if abs(value) < 1000 else f"{value:.0f}"


def _ratio(value) -> str:
    return "" if value is None or pd.isna(value) else f"{value:.3f}"


def _varying(rows: pd.DataFrame) -> list[str]:
    return [c for c in EXTRAS if rows[c].astype(str).nunique() > 1]


def _table(rows: pd.DataFrame, columns: list[str], formats: dict[str, Callable]) -> str:
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


def check_rows(frame: pd.DataFrame) -> None:
    """ValueError unless `frame` holds a latency, memory or profile row (of any status): an
    empty report would read as if every case had been measured."""
    if frame.empty:
        raise ValueError("no rows to report")
    if "measurement" not in frame or not frame.measurement.isin(MEASUREMENTS).any():
        raise ValueError(f"no {', '.join(MEASUREMENTS[:-1])} or {MEASUREMENTS[-1]} rows among "
                         f"the {len(frame)} rows given")


def markdown(frame: pd.DataFrame, speedup: pd.DataFrame, plots: dict[str, bool]) -> str:
    """runtime.md from the rows, their speedups and which plots were drawn (file -> drawn);
    ValueError without runtime rows (`check_rows`)."""
    check_rows(frame)
    rows = normalise(frame)
    latency, memory = latest(measured(frame, "latency")), latest(measured(frame, "memory"))
    superseded = (rows.status == "ok").sum() - len(latency) - len(memory)
    vary = _varying(rows)
    out = _header(rows, superseded, vary)
    out += ["## PT-DiT speedups", "",
            "`measured` = baseline / PT-DiT median latency; `predicted` = baseline / PT-DiT "
            "`total_gmacs`; `realised` = (1 − 1/measured) / (1 − 1/predicted), the share of the "
            f"predicted time saving measured (only where predicted > 1, else \"{NO_SAVING}\"); "
            "`tflops_ratio` = PT-DiT / baseline achieved TFLOP/s.", "",
            *_by_setup(speedup, lambda g: _speedup_table(g, vary)), *_target(speedup)]
    out += ["## Latency", "", *_by_setup(latency, lambda g: _latency_table(g, vary))]
    out += ["## Memory", "", "`measured_over_predicted` as the harness wrote it (measured over "
            "predicted activation MiB, by `memory_method`).", "",
            *_by_setup(memory, lambda g: _memory_table(g, vary))]
    profiled = profiles(frame)
    if len(profiled):
        out += ["## Where the time goes (torch.profiler)", "",
                "`bench.profile`: each operator's self time per step, by category (`gemm`: "
                "linear layers and the patch conv; `attention`: attention kernels; `layout`: "
                "copies and gathers; `untraced`: outside any operator), as a share of the "
                "profiled step (`step_ms`, inflated a little by the profiler); `gemm_tflops` "
                "and `attention_tflops`: the closed form's linear and attention MACs of the "
                "step over the time of that category.", "",
                *_by_setup(profiled, lambda g: _profile_table(g, vary))]
    out += ["## Plots", "", *[f"- `{name}`" if drawn else
                              f"- `{name}`: skipped, no rows for it (needs {PLOTS[name][2]})"
                              for name, drawn in plots.items()], ""]
    failed = rows[rows.status != "ok"]
    out += ["## Not measured (oom, skipped, error)", "",
            _table(failed, ["measurement", *SETUP, "model", *SHAPE, *vary, "status"], {})
            if len(failed) else "None: every row is ok.", ""]
    return "\n".join(out)


def profiles(frame: pd.DataFrame) -> pd.DataFrame:
    """The `bench.profile` category rows of `frame`, one line per profiled case (the latest):
    each category's share of the step, and the achieved TFLOP/s of its GEMMs and attention."""
    if "measurement" not in frame or "level" not in frame:
        return pd.DataFrame(columns=PROFILE_COLUMNS)
    rows = frame[(frame.measurement == "profile") & (frame.status == "ok")
                 & (frame.level == "category")].copy()
    if rows.empty:
        return pd.DataFrame(columns=PROFILE_COLUMNS)
    rows["overrides"] = rows.overrides.map(_overrides).astype(object)
    rows["window"] = rows.window.map(_hashable).astype(object)
    case = [c for c in ("model", *CASE, *VARIANT, "tokens", "threads") if c in rows]
    rows = rows.sort_values("time_utc", kind="stable").drop_duplicates(case + ["name"],
                                                                       keep="last")
    lines = []
    for keys, run in rows.groupby(case, dropna=False, sort=False):   # a profiled case each
        line = dict(zip(case, keys), step_ms=run.step_ms.iloc[0])
        for r in run.itertuples():
            line[f"{r.name}_share"] = r.share
            if r.name in ("gemm", "attention"):
                line[f"{r.name}_tflops"] = r.achieved_tflops
        lines.append(line)
    out = pd.DataFrame(lines)
    return out.reindex(columns=[c for c in PROFILE_COLUMNS if c in out or c in case])


def _profile_table(rows: pd.DataFrame, vary: list[str]) -> str:
    columns = ["model", *SHAPE, *vary, "tokens", "step_ms",
               *[f"{c}_share" for c in PROFILE_CATEGORIES], "gemm_tflops", "attention_tflops"]
    formats = {c: _ratio for c in columns if c.endswith("_share")}
    return _table(rows, columns, formats | {c: _num for c in ("step_ms", "gemm_tflops",
                                                              "attention_tflops")})


def _speedup_table(rows: pd.DataFrame, vary: list[str]) -> str:
    columns = ["pair", *SHAPE, *vary, "baseline_latency_ms", "ptdit_latency_ms",
               "measured_speedup", "predicted_speedup", "realised_fraction",
               "baseline_achieved_tflops", "ptdit_achieved_tflops", "tflops_ratio", "note"]
    formats = {c: _num for c in columns if c.endswith(("_ms", "_tflops"))}
    formats |= {c: _ratio for c in ("measured_speedup", "predicted_speedup", "realised_fraction",
                                    "tflops_ratio")}
    return _table(rows, columns, formats)


def _latency_table(rows: pd.DataFrame, vary: list[str]) -> str:
    view = rows.sort_values(["model", "latent_frames", "resolution", "batch"], kind="stable")
    view = view.assign(latency_ms=[f"{_num(m)} ± {_num(q)}" for m, q in
                                   zip(view.latency_ms_median, view.latency_ms_iqr)])
    columns = ["model", *SHAPE, *vary, "tokens", "latency_ms", "n", "compile_s", "total_gmacs",
               "achieved_tflops"]
    return _table(view, columns, {c: _num for c in ("compile_s", "total_gmacs",
                                                    "achieved_tflops")})


def _memory_table(rows: pd.DataFrame, vary: list[str]) -> str:
    view = rows.sort_values(["model", "latent_frames", "resolution", "batch"], kind="stable")
    columns = ["model", *SHAPE, *vary, "tokens", "memory_method", "peak_mib", "reserved_mib",
               "baseline_mib", "predicted_activation_mib", "measured_over_predicted"]
    formats = {c: _num for c in columns if c.endswith("_mib")}
    return _table(view, columns, formats | {"measured_over_predicted": _ratio})


#################################################################################
#                                     Files                                     #
#################################################################################

def write_report(frame: pd.DataFrame, out_dir: str | Path) -> dict[str, Path]:
    """Writes runtime.md, speedups.csv, latency.csv, memory.csv (every ok row, reruns included)
    and the plots that have rows into `out_dir`; returns file name -> path of what it wrote.
    ValueError, and nothing written, without runtime rows (`check_rows`)."""
    check_rows(frame)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {"speedups": speedups(frame),
              "latency": measured(frame, "latency")[list(KEY + LATENCY + PROVENANCE)],
              "memory": measured(frame, "memory")[list(KEY + MEMORY + PROVENANCE)],
              "profile": profiles(frame)}
    written = {}
    for name, table in tables.items():
        if name == "profile" and table.empty:
            continue
        written[f"{name}.csv"] = out_dir / f"{name}.csv"
        table.to_csv(written[f"{name}.csv"], index=False)
    drawn = {}
    for name, (plot, source, _) in PLOTS.items():
        used = tables[source] if source == "speedups" else latest(tables[source])
        drawn[name] = plot(used, out_dir / name) is not None
        if drawn[name]:
            written[name] = out_dir / name
    written["runtime.md"] = out_dir / "runtime.md"
    written["runtime.md"].write_text(markdown(frame, tables["speedups"], drawn))
    return written
