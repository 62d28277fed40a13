"""The study's report: its rows (analysis.training.study) turned into tables, Markdown and
figures.

    tables = report("results/study")     # writes study.md, study.csv, attention.csv, figures

`final_table` is one row per arm and regime at the regime's end: training TFLOP, training wall
time, the loss, the Fréchet distance in the digits classifier's features with its floor, the
sample accuracy and the forward latency. `attention_table` is the window similarity of each
arm's trained and untrained weights, mean over the analysed steps, beside its baselines."""

import os
from pathlib import Path

import pandas as pd

from bench.store import Store

from .study_plots import plot_fd, plot_similarity, sample_grid

STUDY_ROWS = "study.jsonl"
REGIME_NAMES = {"flops": "equal FLOPs", "time": "equal time"}


def rows(out: str | os.PathLike) -> pd.DataFrame:
    """The study's ok rows, the latest of each (kind, arm, regime, point, weights, window,
    metric, step, layer)."""
    frame = Store(Path(out) / STUDY_ROWS, "study").frame()
    if frame.empty:
        raise ValueError(f"{out} holds no study rows ({STUDY_ROWS})")
    frame = frame[frame.status == "ok"]
    keys = [k for k in ("kind", "arm", "regime", "point", "weights", "window", "metric", "step",
                        "layer") if k in frame]
    return frame.drop_duplicates(subset=keys, keep="last")


def final_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per arm and regime, the last evaluation."""
    evaluations = frame[frame.kind == "evaluation"].sort_values("point")
    last = evaluations.groupby(["arm", "regime"], sort=False).tail(1)
    table = pd.DataFrame({
        "arm": last.arm, "regime": last.regime.map(REGIME_NAMES),
        "steps": last.steps_done.astype(int), "training TFLOP": last.train_tflop,
        "training time (s)": last.train_wall_s, "loss": last.loss, "FD": last.fd,
        "FD floor": last.fd_floor, "sample accuracy": last.sample_accuracy,
        "forward latency (ms, batch 1)": last.latency_ms,
        "sampling (ms / image)": 1000 * last.sample_s_per_image})
    order = {arm: i for i, arm in enumerate(frame.arm.unique())}
    return table.sort_values(["regime", "arm"], key=lambda c: c.map(order)
                             if c.name == "arm" else c).reset_index(drop=True)


def attention_table(frame: pd.DataFrame, metric: str = "cosine") -> pd.DataFrame:
    """Per arm, weights (untrained: the initialisation; trained: the last evaluation point)
    and window (smaller than the grid): `metric` within windows, its position-matched and
    random-pair baselines and the differences, mean over the analysed steps."""
    attention = frame[(frame.kind == "attention") & (frame.status == "ok")]
    attention = attention[attention.metric == metric] if "metric" in attention else attention
    if attention.empty:
        return pd.DataFrame()
    last = attention.groupby("arm").point.transform("max")
    attention = attention[(attention.weights == "untrained") | (attention.point == last)]
    # a window as large as the grid has no other windows: within = random, nothing to compare
    whole = attention.apply(lambda r: f", {r.window} " in f"{r.attention} ", axis=1)
    attention = attention[~whole]
    grouped = attention.groupby(["arm", "weights", "steps_done", "attention", "window"],
                                sort=False)[["within", "position_matched", "random_pairs"]]
    table = grouped.mean().reset_index()
    table["within − position-matched"] = table.within - table.position_matched
    table["within − random"] = table.within - table.random_pairs
    return table.rename(columns={"steps_done": "training steps"})


def layer_table(frame: pd.DataFrame, metric: str = "cosine") -> pd.DataFrame:
    """Per arm, weights, window, analysed step and layer: `metric` within windows and its two
    baselines (untrained, and trained at the last evaluation point), mean over heads and
    images: where in the network and when in sampling the windows' rows are alike."""
    attention = frame[(frame.kind == "attention") & (frame.status == "ok")]
    if attention.empty or "layer" not in attention:
        return pd.DataFrame()
    attention = attention[attention.metric == metric]
    last = attention.groupby("arm").point.transform("max")
    attention = attention[(attention.weights == "untrained") | (attention.point == last)]
    columns = ["arm", "weights", "steps_done", "window", "step", "timestep", "layer", "within",
               "position_matched", "random_pairs"]
    return attention[columns].rename(columns={"steps_done": "training steps",
                                              "step": "analysed step"}).reset_index(drop=True)


def _markdown_table(table: pd.DataFrame, digits: int = 3) -> str:
    return table.to_markdown(index=False, floatfmt=f".{digits}g")


def markdown(frame: pd.DataFrame, figures: dict[str, Path]) -> str:
    """study.md: what was run, the final table, the attention tables and the figures."""
    first = frame.iloc[0]
    lines = [f"# {first.study}", "",
             "Made by `ptdit study` (analysis/training/study.py) on "
             f"{first.host} ({first.device}), "
             f"torch {first.torch}, git {first.git_sha}. FD: Fréchet distance in the digits "
             "classifier's penultimate features (`fd_digits_classifier`, not FID); the floor is "
             "the FD of the test split against the train split. Training TFLOP: closed-form "
             "FLOPs (3 × forward, 2 per MAC). Times are this machine's.", "",
             "## Each arm at the end of each regime", "",
             _markdown_table(final_table(frame)), ""]
    for metric, what in (("cosine", "cosine similarity of attention rows (higher: more alike)"),
                         ("js_divergence_nats", "Jensen–Shannon divergence of attention rows, "
                                                "nats (lower: more alike)"),
                         ("replacement_error", "error of replacing each row by its window's "
                                               "mean row (lower: more redundant)"),
                         ("output_error", "error of the attention output (A·V) with each row "
                                          "replaced by its window's mean row")):
        table = attention_table(frame, metric)
        if not table.empty:
            lines += [f"## Window similarity: {what}", "",
                      "Mean over layers, heads, analysed steps and held-out images noised to "
                      "the sampler's timesteps; position-matched: pairs at the same offset and "
                      "edge distances in other windows (window-specific structure); random: "
                      "pairs anywhere on the grid (absolute redundancy).", "",
                      _markdown_table(table), ""]
    for name, path in figures.items():
        lines += [f"![{name}]({path.name})", ""]
    return "\n".join(lines)


def report(out: str | os.PathLike) -> dict[str, Path]:
    """Writes study.md, study.csv, attention.csv and the figures into `out`; returns them."""
    out = Path(out)
    frame = rows(out)
    evaluations = frame[frame.kind == "evaluation"]
    title = frame.study.iloc[0]
    figures = {"FD against training TFLOP": out / "fd_vs_tflop.png",
               "FD against training time": out / "fd_vs_time.png"}
    plot_fd(evaluations, "train_tflop", "training TFLOP", figures["FD against training TFLOP"],
            title)
    plot_fd(evaluations, "train_wall_s", "training time (s, this machine)",
            figures["FD against training time"], title)
    attention = frame[(frame.kind == "attention") & (frame.status == "ok")]
    if not attention.empty:
        figures["window similarity against training step"] = plot_similarity(
            attention, out / "similarity_vs_step.png", title)
    finals = evaluations.sort_values("point").groupby(["arm", "regime"], sort=False).tail(1)
    folders = {row.arm: Path(row.samples) for row in finals[finals.regime == "flops"]
               .itertuples()}
    figures["samples, one row per arm (equal FLOPs), in the table's order"] = sample_grid(
        folders, out / "samples_grid.png")
    written = {"study.md": out / "study.md", "study.csv": out / "study.csv",
               "attention.csv": out / "attention.csv",
               "attention_layers.csv": out / "attention_layers.csv", **figures}
    final_table(frame).to_csv(out / "study.csv", index=False)
    attention_table(frame).to_csv(out / "attention.csv", index=False)
    layer_table(frame).to_csv(out / "attention_layers.csv", index=False)
    (out / "study.md").write_text(markdown(frame, figures))
    return written
