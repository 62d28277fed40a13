"""analysis.training.study: the study file checked key by key, `ptdit study --smoke` end to end
on the shipped study (every arm trained in both regimes, evaluated, timed and analysed; the
report's files), a rerun that keeps everything, and an output folder of another study refused."""

import json
import math

import pytest

from analysis.training import study as studies
from analysis.training.harness import TrainOptions, train_flops_per_step
from analysis.training.study_report import final_table, rows
from bench.store import Store
from ptdit import get_config
from ptdit.cli import main

SHIPPED = "analysis/studies/digits.toml"
BASE = {"dataset": "digits", "size": 16, "regimes": {"tflop": 1.0, "seconds": 10.0},
        "arm": [{"name": "DiT", "model": "DiT-S/2"}]}


@pytest.mark.parametrize("change, message", [
    ({"colour": 1}, r"unknown key\(s\) colour; allowed: dataset"),
    ({"size": 0}, "size must be a positive number, got 0"),
    ({"regimes": {"tflop": 1.0}}, r"\[regimes\] needs `seconds`"),
    ({"regimes": {"tflop": -1.0, "seconds": 1.0}}, r"\[regimes\] tflop must be a positive"),
    ({"evaluate": {"samplez": 3}}, r"\[evaluate\] has unknown key\(s\) samplez; allowed: "
                                   "samples"),
    ({"arm": []}, r"\[\[arm\]\] must list at least one arm"),
    ({"arm": [{"name": "DiT"}]}, "arm 1 needs `name` and `model`"),
    ({"arm": [{"name": "A b", "model": "DiT-S/2"}, {"name": "a-B", "model": "DiT-S/2"}]},
     "arm names must differ"),
    ({"photos": {"arm": "PixArt", "steps": 3}}, r"\[photos\] takes `arm` \(one of DiT\)"),
])
def test_study_files_are_checked(change, message):
    with pytest.raises(ValueError, match=message):
        studies.parse({**BASE, **change}, "s.toml")


def test_the_shipped_study_file_parses_and_a_missing_file_is_one_line(tmp_path):
    study = studies.load(SHIPPED)
    assert [a.name for a in study.arms] == ["DiT", "PixArt-α", "PT-DiT", "PT-DiT without GIIM",
                                           "PT-DiT without shifted windows"]
    assert {k: study.model[k] for k in ("depth", "hidden_size", "num_heads", "patch_size")} \
        == {"depth": 4, "hidden_size": 128, "num_heads": 4, "patch_size": 2}
    with pytest.raises(ValueError, match="does not exist"):
        studies.load(tmp_path / "none.toml")
    (tmp_path / "bad.toml").write_text("size = [")
    with pytest.raises(ValueError, match="is not TOML"):
        studies.load(tmp_path / "bad.toml")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("study") / "out"
    assert main(["study", SHIPPED, "--out", str(out), "--smoke"]) == 0
    return out


def test_smoke_study_trains_scores_and_analyses_every_arm(smoke):
    study = studies.smoke(studies.load(SHIPPED))
    frame = rows(smoke)
    evaluations = frame[frame.kind == "evaluation"]
    points = study.regimes["evaluations"]
    assert len(evaluations) == len(study.arms) * (points + 1)
    for arm in study.arms:
        mine = evaluations[evaluations.arm == arm.name]
        flops = mine[mine.regime == "flops"].sort_values("point")
        # each point spends the largest whole number of steps within its share of the
        # budget, at the closed-form cost of the config the run trained
        folder = smoke / "runs" / f"{arm.slug}-flops"
        info = json.loads((folder / "ema.training.json").read_text())
        config = get_config(info["model"], **info["model_config"])
        per_step = train_flops_per_step(config, study.size, study.train["batch_size"],
                                        info["text_tokens"] or 0)
        for point, row in zip(range(1, points + 1), flops.itertuples()):
            budget = study.regimes["tflop"] * point / points * 1e12
            assert row.steps_done == math.floor(budget / per_step)
            assert row.train_tflop == pytest.approx(row.steps_done * per_step / 1e12)
        timed = mine[mine.regime == "time"].iloc[0]
        assert timed.train_wall_s >= study.regimes["seconds"]
    assert evaluations.fd.between(0, math.inf).all()
    assert evaluations.fd_floor.nunique() == 1 and 0 < evaluations.fd_floor.iloc[0] < 20
    assert evaluations.sample_accuracy.between(0, 1).all()
    assert (evaluations.latency_ms > 0).all()
    assert set(final_table(frame).regime) == {"equal FLOPs", "equal time"}


def test_smoke_study_analyses_attention_along_training(smoke):
    frame = rows(smoke)
    attention = frame[frame.kind == "attention"]
    dit = attention[attention.arm == "DiT"]
    assert set(zip(dit.weights, dit.point)) == {("untrained", 0), ("trained", 1),
                                               ("trained", 2)}
    assert set(dit.metric) >= {"cosine", "js_divergence_nats", "replacement_error"}
    assert (dit.attention == "global self-attention, 8x8 tokens").all()
    ptdit_rows = attention[attention.arm == "PT-DiT"]
    assert (ptdit_rows.attention == "proxy self-attention, 4x4 proxies").all()
    skipped = Store(smoke / "study.jsonl").frame()
    skipped = skipped[skipped.arm == "PT-DiT without GIIM"]
    skipped = skipped[skipped.kind == "attention"]
    assert len(skipped) == 3 and skipped.status.str.startswith("skipped: no attention").all()
    assert "DiT on photos" in set(attention.arm)
    assert set(dit.layer) == {0}          # the smoke study's models have one block
    for name in ("study.md", "study.csv", "attention.csv", "attention_layers.csv",
                 "fd_vs_tflop.png", "fd_vs_time.png",
                 "samples_grid.png", "similarity_vs_step.png"):
        assert (smoke / name).is_file(), name
    assert "fd_digits_classifier" in (smoke / "study.md").read_text()


def test_a_rerun_keeps_every_row_and_trains_nothing(smoke):
    before = (smoke / "study.jsonl").read_bytes()
    checkpoint = (smoke / "runs" / "dit-flops" / "checkpoint.pt").stat().st_mtime_ns
    assert main(["study", SHIPPED, "--out", str(smoke), "--smoke"]) == 0
    assert (smoke / "study.jsonl").read_bytes() == before
    assert (smoke / "runs" / "dit-flops" / "checkpoint.pt").stat().st_mtime_ns == checkpoint


def test_an_output_folder_of_another_study_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    Store(out / "study.jsonl", "study").append({"study": "another", "status": "ok"})
    assert main(["study", SHIPPED, "--out", str(out), "--smoke"]) == 2
    assert "holds another study's rows" in capsys.readouterr().err
    assert [json.loads(line)["study"] for line in (out / "study.jsonl").open()] == ["another"]


def test_study_options_reach_the_harness():
    study = studies.load(SHIPPED)
    options = studies._options(study, study.arms[0], budget_tflop=1.0)
    assert isinstance(options, TrainOptions)
    assert (options.batch_size, options.lr, options.seed) == (32, 2e-3, 0)
