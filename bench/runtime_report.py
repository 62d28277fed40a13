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
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ptdit import get_config

from . import plots as _plots
from .cases import (
    CASE,
    COLUMNS,
    KEY,
    LATENCY,
    MEASUREMENTS,
    MEMORY,
    NO_MACS,
    NO_SAVING,
    PAIRS,
    PROFILE_COLUMNS,
    PROVENANCE,
    SETUP,
    VARIANT,
)
from .markdown import runtime_markdown

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


# file -> (plot, the table it draws, what it needs)
PLOTS: dict[str, tuple[Callable, str, str]] = {
    "latency_vs_resolution.png": (_plots.plot_latency, "latency",
                                  "ok forward-mode image latency rows"),
    "speedup_measured_vs_predicted.png": (_plots.plot_speedups, "speedups",
                                          "a PT-DiT model and its baseline measured in one case"),
    "memory_vs_frames.png": (_plots.plot_memory, "memory",
                             "ok train- or forward-mode memory rows with latent_frames > 1"),
    "tflops_vs_resolution.png": (_plots.plot_tflops, "latency",
                                 "ok forward-mode image latency rows with achieved_tflops"),
}


#################################################################################
#                                 Checks, profiles                              #
#################################################################################

def check_rows(frame: pd.DataFrame) -> None:
    """ValueError unless `frame` holds a latency, memory or profile row (of any status): an
    empty report would read as if every case had been measured."""
    if frame.empty:
        raise ValueError("no rows to report")
    if "measurement" not in frame or not frame.measurement.isin(MEASUREMENTS).any():
        raise ValueError(f"no {', '.join(MEASUREMENTS[:-1])} or {MEASUREMENTS[-1]} rows among "
                         f"the {len(frame)} rows given")


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




def markdown(frame: pd.DataFrame, speedup: pd.DataFrame, plots: dict[str, bool]) -> str:
    """runtime.md from the rows, their speedups and which plots were drawn (file -> drawn);
    ValueError without runtime rows (`check_rows`)."""
    check_rows(frame)
    latency, memory = latest(measured(frame, "latency")), latest(measured(frame, "memory"))
    return runtime_markdown(normalise(frame), latency, memory, speedup, profiles(frame),
                            {name: (drawn, PLOTS[name][2]) for name, drawn in plots.items()})


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


def report_store(store: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """`ptdit report`: write_report of the runtime rows of `store` into `out_dir` (checked
    first); ValueError for a missing or empty store."""
    from .store import Store, check_writable_folder

    if not Path(store).is_file():
        raise ValueError(f"no results store at {store}; make one with `ptdit sweep "
                         f"FILE.toml --out {store}`")
    check_writable_folder(out_dir, "--out")
    frame = Store(store, "runtime").frame()
    if frame.empty:
        raise ValueError(f"no rows in {store}: nothing to report (fill it with `ptdit "
                         f"sweep FILE.toml --out {store}`)")
    return write_report(frame, out_dir)
