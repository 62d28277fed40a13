"""bench.reproduce and bench/published.csv: the papers' figures against our counts."""

import pandas as pd
import pytest

import ptdit
from bench import reproduce
from ptdit import complexity as cx
from ptdit.cli import main

PUBLISHED = reproduce.load_published()


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


@pytest.mark.parametrize("name, per_token", [("PT-DiT/XL", 22), ("PixArt-XL/2", 14),
                                              ("DiT-XL/2", 12)])
@pytest.mark.parametrize("overrides", [{}, dict(learn_sigma=False), dict(in_channels=16)])
def test_block_coefficient_subtracts_the_closed_form_io(name, per_token, overrides):
    """The patch embed and final layer come from the closed form, so the block coefficient is
    exact whatever learn_sigma and in_channels are (the final layer's width follows both)."""
    points = [(r, 1, reproduce.cost(name, r, **overrides)["linear_gmacs"])
              for r in (256, 512, 1024)]
    coef = reproduce.per_token_coefficient(name, points, **overrides)
    assert coef == pytest.approx(per_token, abs=1e-6)


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
    text = reproduce.markdown(reproduce.compare(PUBLISHED), PUBLISHED)
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


def test_run_writes_everything(tmp_path):
    text = reproduce.run(tmp_path)
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
    for png in ("gflops_vs_resolution.png", "attention_share.png", "video_vs_frames.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_reproduce_prints_the_table(tmp_path, capsys):
    assert main(["reproduce", "--out", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "DiT paper, Table 4" in out and "| DiT-XL/2 |" in out
    assert (tmp_path / "out" / "complexity.csv").exists()
