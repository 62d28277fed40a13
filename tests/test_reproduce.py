"""bench.reproduce, bench.markdown.markdown, bench.plots and bench/published.csv: the papers'
figures against our counts, and the plots drawn from the curves' rows."""

import re
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import ptdit
from bench import markdown, plots, reproduce
from bench.rows import check_row
from bench.store import Store
from ptdit import complexity as cx
from ptdit.cli import main

PUBLISHED = reproduce.load_published()
REPO = Path(__file__).resolve().parents[1]


def block_linear_d2(name: str) -> float:
    """Linear MACs per token per block in D², summed by hand from complexity.layers(): layers
    that run on proxies or caption tokens only are constant in tokens and drop out."""
    c = ptdit.get_config(name)
    attention = 3 + 1                       # qkv, proj: DiT/PixArt global, PT-DiT window
    mlp = 2 * c.mlp_ratio                   # fc1 D·rD, fc2 rD·D
    if name.startswith("DiT-"):
        return attention + mlp
    text_cross = 1 + 1                      # q, out (k/v run on the caption)
    if name.startswith("PixArt-"):
        return attention + text_cross + mlp
    proxy = (1 + 1 + 1) if c.giim else 0    # proxy-cross q and out, proxy_out
    shift = (3 + 1 + 1) if c.shift_window else 0   # shifted-window qkv, proj, shift_out
    text_cross *= c.condition == "text"
    return proxy + attention + shift + text_cross + mlp


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """One `reproduce.run` for the tests that read its files: (folder, returned Markdown)."""
    out = tmp_path_factory.mktemp("complexity")
    return out, reproduce.run(out)


def published(figure, model=None):
    rows = PUBLISHED[PUBLISHED.figure_or_table == figure]
    return rows if model is None else rows[rows.ptdit_model == model]


def test_published_rows_cite_their_source():
    for column in ("source", "paper_version", "figure_or_table", "model", "convention", "unit"):
        assert (PUBLISHED[column].str.len() > 0).all(), column
    ours = PUBLISHED[PUBLISHED.ptdit_model.str.len() > 0]
    for name in ours.ptdit_model:
        for part in name.split(" vs "):
            assert part in ptdit.list_models()


@pytest.mark.parametrize("row", list(published("Table 4").itertuples()),
                         ids=lambda r: f"{r.model}@{r.resolution}")
def test_dit_table4(row):
    ours = cx.costs(row.ptdit_model, int(row.resolution))["total_gmacs"]
    # 0.2%, or half a unit of the printed last digit where that is looser (0.36 for S/8)
    assert abs(ours / row.value - 1) <= reproduce.printed_tolerance(row.printed, row.value)


def test_dit_table4_is_complete():
    assert len(published("Table 4")) == 13
    assert set(published("Table 4").ptdit_model) == {m for m in ptdit.list_models()
                                                     if m.startswith("DiT-")}


def test_pixart_linear_only_figures():
    rows = published("Fig. 2", "PixArt-XL/2")
    assert list(rows.value) == [142.8, 542.5, 2141.2, 8536.1]
    for row in rows.itertuples():
        ours = cx.costs("PixArt-XL/2", int(row.resolution), text_tokens=120)["linear_gmacs"]
        assert abs(ours / row.value - 1) <= 0.002


def test_ptdit_figures_imply_fewer_linear_macs_than_the_block():
    coef = reproduce.implied_coefficients(PUBLISHED).set_index(["model", "video"])
    assert (coef.ours_coef_d2.round(9) == 22).all()
    assert coef.paper_coef_d2.between(16.3, 16.6).all()
    for model, ours in coef.ours_coef_d2.droplevel("video").items():
        assert ours == pytest.approx(block_linear_d2(model), abs=1e-6)


@pytest.mark.parametrize("name, per_token", [("PT-DiT/XL", 22), ("PixArt-XL/2", 14),
                                              ("DiT-XL/2", 12)])
@pytest.mark.parametrize("overrides", [{}, dict(learn_sigma=False), dict(in_channels=16)])
def test_block_coefficient_subtracts_the_closed_form_io(name, per_token, overrides):
    """The patch embed and final layer come from the closed form, so the block coefficient is
    exact whatever learn_sigma and in_channels are (the final layer's width follows both)."""
    points = [(r, None, reproduce.cost(name, r, **overrides)["linear_gmacs"])
              for r in (256, 512, 1024)]
    coef = reproduce.per_token_coefficient(name, points, **overrides)
    assert coef == pytest.approx(per_token, abs=1e-6)
    assert block_linear_d2(name) == per_token
    assert reproduce.block_coefficient(name, **overrides) == pytest.approx(per_token, abs=1e-6)


def test_notes_state_the_block_coefficient_of_the_closed_form():
    """22·D², 14·D² and 12·D² in the notes and Markdown are computed, and equal the layers'
    sum (an image and a video point each: None and 48 latent frames)."""
    df = reproduce.compare(PUBLISHED)
    has = df.note.str.extract(r"the released block, and ours, has ([\d.]+)·D²")[0].dropna()
    assert len(has) > 0
    for i, value in has.items():
        assert value == f"{block_linear_d2(df.ptdit_model[i]):.2f}"
    text = markdown.markdown(df, PUBLISHED, reproduce.block_coefficients())
    said = re.search(r"PT-DiT/XL has (\d+)·D² linear MACs against PixArt-XL/2's (\d+)·D² and "
                     r"DiT-XL/2's (\d+)·D²", text)
    assert said and [int(k) for k in said.groups()] == [
        block_linear_d2(m) for m in ("PT-DiT/XL", "PixArt-XL/2", "DiT-XL/2")]
    one = PUBLISHED[(PUBLISHED.figure_or_table == "Fig. 2")
                    & (PUBLISHED.ptdit_model == "PT-DiT/L") & (PUBLISHED.resolution == 512)]
    single = reproduce.compare(one)
    note = single[single.convention == "linear-macs"].note.iloc[0]
    assert note.startswith("a single point")
    assert f"the released block's {block_linear_d2('PT-DiT/L'):.0f}·D² " in note


def test_eq4_ratios():
    rows = {int(row["resolution"]): row for row in reproduce.eq4_rows(PUBLISHED)}
    ours = {r: round(row["ours"], 1) for r, row in rows.items()}
    assert ours == {256: 34.4, 512: 9.8, 1024: 4.7, 2048: 3.5}
    assert rows[2048]["paper_value"] == 2.3      # the paper's value, not its Eq. 4's
    assert all(row["note"].startswith("our counts equal Eq. 4") for row in rows.values())


def test_matched_width_says_what_its_sign_means():
    rows = pd.DataFrame(reproduce.matched_width_rows())
    assert (rows.unit == "%").all() and rows.paper_value.isna().all()
    assert (rows.ours - 100 * (1 - rows.ptdit_gmacs / rows.base_gmacs)).abs().max() < 1e-9
    low = rows[(rows.resolution == 256) & (rows.convention == "linear-macs")]
    assert (low.ours < 0).all() and low.note.str.contains("(costlier)", regex=False).all()
    text = markdown.markdown(reproduce.compare(PUBLISHED), PUBLISHED,
                           reproduce.block_coefficients())
    table = text[text.index("## Matched width"):]
    assert "reduction_pct" in table and "negative = it costs more" in table
    assert "| ours " not in table


def test_headline_claim_as_published_and_like_for_like():
    rows = pd.DataFrame(reproduce.claim_rows(PUBLISHED))
    dit = rows[(rows.ptdit_model == "PT-DiT/B vs DiT-B/2") & (rows.paper_convention ==
                                                             "reduction")]
    b = cx.costs("PT-DiT/B", 1024)
    d = cx.costs("DiT-B/2", 1024)
    by = dict(zip(dit.convention, dit.ours))
    assert by["as published (linear-macs vs macs)"] == pytest.approx(
        100 * (1 - b["linear_gmacs"] / d["total_gmacs"]))
    assert by["macs (like for like)"] == pytest.approx(
        100 * (1 - b["total_gmacs"] / d["total_gmacs"]))
    assert by["linear-macs (like for like)"] == pytest.approx(
        100 * (1 - b["linear_gmacs"] / d["linear_gmacs"]))


def test_run_writes_everything(reproduced):
    tmp_path, text = reproduced
    df = pd.read_csv(tmp_path / "complexity.csv")
    for column in ("source", "model", "resolution", "latent_frames", "convention",
                   "paper_value", "ours", "rel_diff", "note"):
        assert column in df.columns
    compared = df.dropna(subset=["paper_value"])
    assert (compared.rel_diff - (compared.ours / compared.paper_value - 1)).abs().max() < 1e-12
    assert compared.note.notna().all()
    video = df[(df.latent_frames == 48) & (df.convention == "linear-macs")]
    assert set(video.ptdit_model) == {"PT-DiT/XL", "PT-DiT/H"}
    figures = compared[compared.convention.isin(["macs", "linear-macs"])]
    assert (figures.unit == "GMACs").all()
    assert figures.printed_unit.isin(["Gflops", "GFLOPs"]).all()
    assert set(df.unit) == {"GMACs", "%"}
    assert (tmp_path / "complexity.md").read_text().strip() == text.strip()
    for plot in reproduce.PLOTS:
        assert (tmp_path / f"{plot}.png").read_bytes()[:4] == b"\x89PNG"   # CSVs: the next test


def test_curve_csvs_hold_the_curves_of_the_closed_form(reproduced):
    out, _ = reproduced
    points = reproduce.curves()
    assert set(points["plot"]) == set(reproduce.PLOTS)
    written = pd.concat([pd.read_csv(out / f"{plot}.csv")
                         .assign(plot=plot) for plot in reproduce.PLOTS], ignore_index=True)
    pd.testing.assert_frame_equal(written[points.columns], points, check_exact=True)
    for row in points.iloc[::9].itertuples():
        frames = None if row.kind == "image" else row.latent_frames
        c = cx.costs(row.model, row.resolution, frames)
        assert (row.latent_frames, row.tokens) == (c["latent_frames"], c["tokens"])
        if row.plot == "attention_share":
            assert row.attention_pct == 100 * c["attention_gmacs"] / c["total_gmacs"]
        else:
            assert (row.linear_gmacs, row.total_gmacs) == (c["linear_gmacs"], c["total_gmacs"])
    images = points[points.kind == "image"]
    assert (images.latent_frames == 1).all()


def drawn(ax) -> dict[str, tuple[list, list]]:
    """The labelled lines of an axes (the curves; published markers have no label)."""
    return {line.get_label(): (list(line.get_xdata()), list(line.get_ydata()))
            for line in ax.get_lines() if not line.get_label().startswith("_")}


def test_plots_draw_exactly_the_rows_they_are_given(tmp_path, monkeypatch):
    points = reproduce.curves()
    rows = {plot: reproduce.plot_curves(points, plot) for plot in reproduce.PLOTS}
    monkeypatch.setattr(cx, "costs", None)    # a plot that computed a cost would fail here

    fig = plots.plot_resolution(rows["gflops_vs_resolution"], PUBLISHED, tmp_path / "r.png")
    models = rows["gflops_vs_resolution"].groupby("model", sort=False)
    for ax, (convention, column) in zip(fig.axes, plots.PANELS):
        assert drawn(ax) == {m: (list(g.resolution), list(g[column])) for m, g in models}
        markers = [list(line.get_ydata()) for line in ax.get_lines()
                   if line.get_label().startswith("_")]
        assert markers == [list(PUBLISHED[(PUBLISHED.ptdit_model == m)
                                          & (PUBLISHED.latent_frames == 1)
                                          & (PUBLISHED.convention == convention)].value)
                           for m, _ in models]

    fig = plots.plot_attention_share(rows["attention_share"], tmp_path / "a.png")
    want = {}
    for (model, kind), g in rows["attention_share"].groupby(["model", "kind"]):
        label = "image" if kind == "image" else "video 512 px"
        want[f"{model} ({label})"] = (list(g.tokens), list(g.attention_pct))
    assert drawn(fig.axes[0]) == want

    fig = plots.plot_video(rows["video_vs_frames"], PUBLISHED, tmp_path / "v.png")
    assert drawn(fig.axes[0]) == {
        f"{m} {column}": (list(g.latent_frames), list(g[column]))
        for m, g in rows["video_vs_frames"].groupby("model")
        for column in ("total_gmacs", "linear_gmacs")}
    for name in ("r", "a", "v"):
        assert (tmp_path / f"{name}.png").read_bytes()[:4] == b"\x89PNG"


def test_reproduce_leaves_the_matplotlib_backend_alone(tmp_path):
    script = ("import sys, matplotlib\n"
              "matplotlib.use('svg')\n"
              "from bench import reproduce\n"
              "reproduce.run(sys.argv[1])\n"
              "print(matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path)], cwd=REPO,
                          capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["svg", "False"]


def test_cli_reproduce_prints_the_table(tmp_path, capsys, reproduced):
    assert main(["reproduce", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "DiT paper, Table 4" in out and "| DiT-XL/2 |" in out
    assert (tmp_path / "out" / "complexity.csv").read_text() == \
        (reproduced[0] / "complexity.csv").read_text()              # what reproduce.run writes


def test_reproduce_refuses_an_empty_out(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["reproduce", "--out", ""]) == 2
    assert "--out is empty" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_reproduce_writes_its_cost_rows_through_the_store(tmp_path):
    store = Store(tmp_path / "costs.jsonl")
    reproduce.run(tmp_path / "out", store)
    df = store.frame()
    assert df.status.eq("ok").all() and not df.duplicated(["model", "resolution",
                                                           "latent_frames"]).any()
    check_row(df.iloc[0].to_dict())
    row = df[(df.model == "PT-DiT/XL") & (df.resolution == 1024) & (df.latent_frames == 1)]
    assert row.total_gmacs.item() == cx.costs("PT-DiT/XL", 1024)["total_gmacs"]
    assert set(df.model) >= set(reproduce.PLOT_MODELS)
