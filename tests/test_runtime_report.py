"""bench.runtime_report: speedups and realised fractions from synthetic rows of known numbers,
cases never mixed, failed rows listed but never compared, plots that draw the rows' values."""

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from bench import plots
from bench import runtime_report as rr
from bench.rows import SCHEMA_VERSION, check_row
from bench.store import Store

REPO = Path(__file__).resolve().parents[1]


def row(model: str, measurement: str = "latency", status: str = "ok", **fields) -> dict:
    """One results row as the runtime harness writes it; `fields` override the defaults."""
    resolution = fields.get("resolution", 1024)
    out = {"schema_version": SCHEMA_VERSION, "git_sha": "0123456789ab",
           "time_utc": "2025-01-01T00:00:00Z", "host": "bench-host", "device": "NVIDIA H200",
           "torch": "2.14.1", "dtype": "bf16",
           "backend": "sdpa", "model": model, "resolution": resolution, "latent_frames": 1,
           "tokens": (resolution // 16) ** 2, "batch": 1, "text_tokens": 120,
           "window": [1, 4, 4] if model.startswith("PT-DiT") else None, "status": status,
           "measurement": measurement, "mode": "forward", "forward_batch": 1, "compile": False,
           "cuda_graphs": False, "threads": 16}
    if measurement == "latency":
        out |= {"latency_ms_median": 100.0, "latency_ms_iqr": 2.0, "latency_ms_min": 98.0,
                "n": 20, "warmup": 3, "compile_s": None, "total_gmacs": 100.0,
                "achieved_tflops": 2.0}
    else:
        out |= {"memory_method": "cuda-peak", "peak_mib": 1000.0, "reserved_mib": 1200.0,
                "baseline_mib": 10.0, "predicted_activation_mib": 900.0,
                "measured_over_predicted": 1.1}
    return out | fields


def timed(model: str, ms: float, gmacs: float, tflops: float = 1.0, **fields) -> dict:
    return row(model, latency_ms_median=ms, total_gmacs=gmacs, achieved_tflops=tflops, **fields)


def frame(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


def drawn(ax) -> dict[str, tuple[list, list]]:
    """The labelled lines of an axes: label -> (x data, y data)."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_synthetic_rows_carry_the_design_fields():
    check_row(row("PT-DiT/XL"))
    check_row(row("PT-DiT/XL", "memory"))


def test_speedup_and_realised_fraction_by_hand():
    s = rr.speedups(frame(timed("PixArt-XL/2", 300.0, 400.0, tflops=100.0),
                          timed("PT-DiT/XL", 200.0, 200.0, tflops=80.0)))
    assert len(s) == 1
    line = s.iloc[0]
    assert (line.pair, line.ptdit_model, line.baseline_model) == (
        "PT-DiT/XL vs PixArt-XL/2", "PT-DiT/XL", "PixArt-XL/2")
    assert line.measured_speedup == pytest.approx(1.5)
    assert line.predicted_speedup == pytest.approx(2.0)
    assert line.realised_fraction == pytest.approx((1 - 1 / 1.5) / (1 - 1 / 2))
    assert line.realised_fraction == pytest.approx(2 / 3)
    assert (line.baseline_achieved_tflops, line.ptdit_achieved_tflops) == (100.0, 80.0)
    assert line.tflops_ratio == pytest.approx(0.8)
    assert line.note == ""


@pytest.mark.parametrize("ptdit_gmacs", [300.0, 200.0])    # more MACs, equal MACs
def test_no_saving_predicted_gives_nan_and_the_note(ptdit_gmacs):
    s = rr.speedups(frame(timed("DiT-XL/2", 100.0, 200.0), timed("PT-DiT/XL", 125.0, ptdit_gmacs)))
    line = s.iloc[0]
    assert line.pair == "PT-DiT/XL vs DiT-XL/2"
    assert line.measured_speedup == pytest.approx(0.8)
    assert line.predicted_speedup == pytest.approx(200.0 / ptdit_gmacs)
    assert math.isnan(line.realised_fraction)
    assert line.note == rr.NO_SAVING == "no saving predicted"


def test_every_pair_is_matched_when_present():
    s = rr.speedups(frame(timed("PixArt-XL/2", 400.0, 800.0), timed("DiT-XL/2", 300.0, 600.0),
                          timed("DiT-B/2", 100.0, 100.0), timed("PT-DiT/XL", 200.0, 400.0),
                          timed("PT-DiT/L", 100.0, 200.0), timed("PT-DiT/B", 50.0, 50.0),
                          timed("DiT-S/2", 10.0, 10.0)))
    by = s.set_index("pair").measured_speedup.to_dict()
    assert by == {"PT-DiT/XL vs PixArt-XL/2": 2.0, "PT-DiT/L vs PixArt-XL/2": 4.0,
                  "PT-DiT/B vs DiT-B/2": 2.0, "PT-DiT/XL vs DiT-XL/2": 1.5}
    assert s.predicted_speedup.tolist() == s.measured_speedup.tolist()
    assert s.realised_fraction.tolist() == [1.0] * 4


@pytest.mark.parametrize("column, other", [
    ("device", "cpu (16 threads)"), ("dtype", "fp32"), ("mode", "cfg"), ("backend", "math"),
    ("compile", True), ("cuda_graphs", True), ("overrides", {"depth": 4}),
    ("overrides", '{"depth": 4}'), ("batch", 4), ("resolution", 2048), ("latent_frames", 4)])
def test_pairs_never_cross_cases(column, other):
    base = timed("PixArt-XL/2", 300.0, 400.0)
    s = rr.speedups(frame(base, timed("PT-DiT/XL", 200.0, 200.0, **{column: other})))
    assert s.empty
    s = rr.speedups(frame(base, timed("PT-DiT/XL", 200.0, 200.0),
                          timed("PixArt-XL/2", 600.0, 400.0, **{column: other}),
                          timed("PT-DiT/XL", 200.0, 200.0, **{column: other})))
    assert sorted(s.measured_speedup) == [1.5, 3.0]


def test_overrides_match_as_dict_or_json_and_are_carried():
    s = rr.speedups(frame(timed("PixArt-XL/2", 300.0, 400.0, overrides={"depth": 4, "a": 1}),
                          timed("PT-DiT/XL", 200.0, 200.0, overrides='{"a": 1, "depth": 4}'),
                          timed("PixArt-XL/2", 90.0, 400.0), timed("PT-DiT/XL", 30.0, 200.0)))
    assert sorted(zip(s.overrides, s.measured_speedup)) == [('{"a": 1, "depth": 4}', 1.5),
                                                           ("{}", 3.0)]


def test_captions_match_between_text_models_only():
    s = rr.speedups(frame(timed("PixArt-XL/2", 300.0, 400.0, text_tokens=300),
                          timed("PT-DiT/XL", 200.0, 200.0, text_tokens=120),
                          timed("DiT-XL/2", 400.0, 400.0, text_tokens=None)))
    assert s.pair.tolist() == ["PT-DiT/XL vs DiT-XL/2"]


def test_the_latest_rerun_of_a_case_is_used():
    s = rr.speedups(frame(timed("PixArt-XL/2", 300.0, 400.0),
                          timed("PT-DiT/XL", 100.0, 200.0, time_utc="2025-01-01T00:00:00Z"),
                          timed("PT-DiT/XL", 200.0, 200.0, time_utc="2025-02-01T00:00:00Z"),
                          timed("PT-DiT/XL", 150.0, 200.0, time_utc="2025-01-15T00:00:00Z")))
    assert s.measured_speedup.tolist() == [1.5]


def failing_rows() -> pd.DataFrame:
    return frame(timed("PixArt-XL/2", 300.0, 400.0), timed("PT-DiT/XL", 200.0, 200.0),
                 row("PixArt-XL/2", status="oom", resolution=4096, latency_ms_median=None),
                 timed("PT-DiT/XL", 900.0, 800.0, resolution=4096),
                 row("PT-DiT/XL", status="skipped: no flex backend", resolution=2048),
                 timed("PixArt-XL/2", 800.0, 900.0, resolution=2048),
                 row("PT-DiT/L", "memory", status="error: RuntimeError: boom", resolution=512))


def test_failed_rows_are_listed_but_never_compared(tmp_path):
    s = rr.speedups(failing_rows())
    assert s.resolution.tolist() == [1024]
    paths = rr.write_report(failing_rows(), tmp_path)
    md = paths["runtime.md"].read_text()
    failed = md.split("## Not measured")[1]
    for status in ("| oom ", "| skipped: no flex backend ", "| error: RuntimeError: boom "):
        assert status in failed
    assert "4096" in failed and "2048" in failed and "PT-DiT/L" in failed
    assert "4096" not in md.split("## Latency")[0].split("## PT-DiT speedups")[1]
    latency = pd.read_csv(paths["latency.csv"])
    assert sorted(latency.resolution) == [1024, 1024, 2048, 4096]


def report_rows() -> pd.DataFrame:
    """Two models at three resolutions (forward images), rows the latency plots must not draw
    (cfg, video), and memory rows over frames in train and forward mode."""
    rows = []
    for model, scale in (("PixArt-XL/2", 3.0), ("PT-DiT/XL", 2.0)):
        for res in (512, 1024, 2048):
            ms, gmacs = scale * res / 100, scale ** 2 * res
            rows.append(timed(model, ms, gmacs, tflops=scale * res / 1000, resolution=res))
        rows.append(timed(model, 1.0, 1.0, mode="cfg", resolution=512))
        rows.append(timed(model, 1.0, 1.0, latent_frames=4, resolution=512))
        for frames in (1, 4, 8):
            for mode, mib in (("train", 1000.0), ("forward", 10.0)):
                rows.append(row(model, "memory", mode=mode, latent_frames=frames, resolution=512,
                                peak_mib=mib * scale * frames))
    rows.append(row("PT-DiT/XL", "memory", device="cpu (2 threads)", mode="forward",
                    latent_frames=8, resolution=512, peak_mib=77.0, reserved_mib=None))
    rows.append(row("PT-DiT/XL", "memory", device="cpu (2 threads)", mode="forward",
                    latent_frames=16, resolution=512, peak_mib=99.0, reserved_mib=None))
    return frame(*rows)


def test_latency_and_tflops_plots_draw_the_rows(tmp_path):
    rows = rr.latest(rr.measured(report_rows(), "latency"))
    fig = plots.plot_latency(rows, tmp_path / "l.png")
    assert len(fig.axes) == 1 and (tmp_path / "l.png").exists()
    assert drawn(fig.axes[0]) == {
        "PixArt-XL/2": ([512, 1024, 2048], [15.36, 30.72, 61.44]),
        "PT-DiT/XL": ([512, 1024, 2048], [10.24, 20.48, 40.96])}
    assert fig.axes[0].get_xscale() == fig.axes[0].get_yscale() == "log"
    fig = plots.plot_tflops(rows, tmp_path / "t.png")
    assert drawn(fig.axes[0]) == {"PixArt-XL/2": ([512, 1024, 2048], [1.536, 3.072, 6.144]),
                                  "PT-DiT/XL": ([512, 1024, 2048], [1.024, 2.048, 4.096])}


def test_memory_plot_takes_train_mode_where_present(tmp_path):
    fig = plots.plot_memory(rr.latest(rr.measured(report_rows(), "memory")), tmp_path / "m.png")
    gpu, cpu = fig.axes
    assert gpu.get_title().endswith("NVIDIA H200 · bf16 · train")
    assert drawn(gpu) == {"PixArt-XL/2": ([1, 4, 8], [3000.0, 12000.0, 24000.0]),
                          "PT-DiT/XL": ([1, 4, 8], [2000.0, 8000.0, 16000.0])}
    assert cpu.get_title().endswith("cpu (2 threads) · bf16 · forward")
    assert drawn(cpu) == {"PT-DiT/XL": ([8, 16], [77.0, 99.0])}


def test_speedup_plot_draws_measured_against_predicted(tmp_path):
    s = rr.speedups(report_rows())
    fig = plots.plot_speedups(s, tmp_path / "s.png")
    lines = drawn(fig.axes[0])
    forward = lines.pop("PT-DiT/XL vs PixArt-XL/2 (NVIDIA H200 · bf16 · forward)")
    cfg = lines.pop("PT-DiT/XL vs PixArt-XL/2 (NVIDIA H200 · bf16 · cfg)")
    by_mode = {m: (list(g.predicted_speedup), list(g.measured_speedup))
               for m, g in s.groupby("mode")}
    assert (forward, cfg) == (by_mode["forward"], by_mode["cfg"])
    assert forward == ([2.25, 2.25, 2.25, 1.0], [1.5, 1.5, 1.5, 1.0])
    ((x, y),) = lines.values()
    assert x == y    # the y = x line
    texts = [t.get_text() for t in fig.axes[0].texts]
    assert texts == ["512 px", "512 px", "1024 px", "2048 px", "512 px × 4 f"]


def test_plots_without_rows_are_skipped_and_said(tmp_path):
    rows = frame(timed("PixArt-XL/2", 300.0, 400.0), timed("PT-DiT/B", 1.0, 1.0, mode="train"),
                 row("PT-DiT/XL", "memory"))     # memory of images only
    paths = rr.write_report(rows, tmp_path)
    assert "memory_vs_frames.png" not in paths and not (tmp_path / "memory_vs_frames.png").exists()
    assert "speedup_measured_vs_predicted.png" not in paths
    assert "latency_vs_resolution.png" in paths
    md = paths["runtime.md"].read_text()
    assert "- `memory_vs_frames.png`: skipped, no rows for it" in md
    assert "- `speedup_measured_vs_predicted.png`: skipped, no rows for it" in md
    assert plots.plot_memory(rr.measured(rows, "memory"), tmp_path / "m.png") is None
    assert not (tmp_path / "m.png").exists()


def test_write_report_writes_every_file_it_returns(tmp_path):
    paths = rr.write_report(report_rows(), tmp_path / "out")
    assert set(paths) == {"runtime.md", "speedups.csv", "latency.csv", "memory.csv",
                          *rr.PLOTS}
    assert sorted((tmp_path / "out").iterdir()) == sorted(paths.values())
    assert all(p.stat().st_size > 0 for p in paths.values())
    md = paths["runtime.md"].read_text()
    assert md.startswith("# Runtime")
    assert "- **NVIDIA H200** on host `bench-host`, torch 2.14.1" in md
    assert "### NVIDIA H200 · bf16 · forward" in md
    assert "| PT-DiT/XL vs PixArt-XL/2 |" in md and "| 15.36 ± 2 " in md
    assert "PT-DiT/XL's achieved TFLOP/s at 2048 px" in md and "66.7%: not met" in md
    speedup = pd.read_csv(paths["speedups.csv"])
    saving = speedup.predicted_speedup > 1
    assert saving.sum() == 3 and speedup[~saving].realised_fraction.isna().all()
    assert speedup[saving].realised_fraction.tolist() == pytest.approx(
        [(1 - 1 / 1.5) / (1 - 1 / 2.25)] * 3)
    assert (speedup[~saving].note == rr.NO_SAVING).all() and speedup[saving].note.isna().all()


def test_no_runtime_rows_is_an_error_not_an_all_ok_report(tmp_path):
    out = tmp_path / "report"
    with pytest.raises(ValueError, match="^no rows to report$"):
        rr.write_report(pd.DataFrame(), out)
    flops = pd.DataFrame([{"model": "DiT-S/2", "counter": "analytic", "status": "ok"}] * 3)
    with pytest.raises(ValueError, match="^no latency, memory or profile rows among the 3 rows "
                       "given$"):
        rr.write_report(flops, out)
    with pytest.raises(ValueError, match="^no rows to report$"):
        rr.markdown(pd.DataFrame(), pd.DataFrame(), {})
    assert not out.exists()
    failed = frame(row("DiT-S/2", status="oom"))     # a failed row is a report, not "all ok"
    text = rr.write_report(failed, out)["runtime.md"].read_text()
    assert "every row is ok" not in text and "| oom" in text


def test_report_leaves_the_matplotlib_backend_alone(tmp_path):
    store = Store(tmp_path / "rows.jsonl")
    for r in report_rows().to_dict("records"):
        store.append({k: v for k, v in r.items() if not (isinstance(v, float) and math.isnan(v))})
    script = ("import sys, matplotlib\n"
              "matplotlib.use('svg')\n"
              "before = matplotlib.get_backend()\n"
              "from bench import runtime_report\n"
              "from bench.store import Store\n"
              "paths = runtime_report.write_report(Store(sys.argv[1]).frame(), sys.argv[2])\n"
              "print(before, matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules, "
              "len(paths))\n")
    done = subprocess.run([sys.executable, "-c", script, str(store.path), str(tmp_path / "out")],
                          cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["svg", "svg", "False", str(4 + len(rr.PLOTS))]


def test_rows_without_macs_predict_nothing():
    s = rr.speedups(frame(timed("PixArt-XL/2", 300.0, None), timed("PT-DiT/XL", 200.0, 200.0)))
    line = s.iloc[0]
    assert line.measured_speedup == pytest.approx(1.5)
    assert math.isnan(line.predicted_speedup) and math.isnan(line.realised_fraction)
    assert line.note == rr.NO_MACS
