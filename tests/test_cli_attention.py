"""`ptdit attention`: the window-similarity analysis along a real sampling trajectory of the
quality sampler, rows through the store, figures from them, and a plain statement that the
weights are untrained."""

import json

import numpy as np
import pytest
import torch

import ptdit
from analysis.attention_maps import ModelCall, analyse, analyse_trajectory
from analysis.sampling import denoise, initial_noise, sample_generators
from bench.rows import check_row
from ptdit.cli import main

TINY = ["depth=2", "hidden_size=64", "num_heads=4"]


def test_the_command_writes_rows_figures_and_says_untrained(tmp_path, capsys):
    out = tmp_path / "att"
    assert main(["attention", "--model", "DiT-S/2", "--override", *TINY, "--resolution", "128",
                 "--sampler-steps", "6", "--window", "2", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "UNTRAINED" in printed and "within-window cosine" in printed
    rows = [json.loads(line) for line in (out / "attention.jsonl").read_text().splitlines()]
    for row in rows:
        check_row(row)
    assert {r["weights"] for r in rows} == {"untrained"}
    assert {r["step"] for r in rows} == {0, 3, 5}              # first, middle, last of 6
    assert {r["branch"] for r in rows} == {"cond", "uncond"}   # DiT samples guided
    assert {r["layer"] for r in rows} == {0, 1} and {r["head"] for r in rows} == {0, 1, 2, 3}
    assert {r["window"] for r in rows if r["metric"] == "cosine"} == {"2x2", "4x4"}
    assert {p.name for p in out.glob("*.png")} >= {"window_similarity_sizes.png",
                                                   "window_similarity_layer_timestep.png"}
    assert any(p.name.startswith("window_rows_") for p in out.glob("*.png"))   # Figure 3
    assert (out / "maps.npz").is_file()


def test_the_trajectory_is_the_samplers_own(tmp_path):
    """The maps analysed at a step are those of the sampler's forward at that step: the same
    statistics as analysing the recorded model inputs of an independent sampling run."""
    model = ptdit.build("DiT-S/2", depth=2, hidden_size=64, num_heads=4).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    rows, _ = analyse_trajectory(model, "3", resolution=64, steps=5, analyse_steps=[1, 4],
                                 cfg_scale=2.0, windows=[2])
    recorded = []
    generators = sample_generators(0, [0])
    noise = initial_noise(generators, (4, 8, 8))
    condition = {"y": torch.tensor([3, 1000])}
    with torch.no_grad():
        denoise(model, "ddpm", 5, noise, condition, cfg_scale=2.0, guidance_channels="3",
                generators=generators,
                on_step=lambda k, t, x, kw: recorded.append(ModelCall(x, dict(kw), k, float(t),
                                                                      cfg=True)))
    expected, _ = analyse(model, [c for c in recorded if c.step in (1, 4)], windows=[2])

    def table(rs):
        return sorted((r["layer"], r["head"], r["step"], r["branch"], r["metric"],
                       r.get("window"), r.get("distance"), r["value"]) for r in rs)
    got, want = table(rows), table(expected)
    assert [g[:-1] for g in got] == [w[:-1] for w in want]
    np.testing.assert_allclose([g[-1] for g in got], [w[-1] for w in want], rtol=1e-6)


def test_text_models_need_prompt_embeddings(tmp_path, capsys):
    assert main(["attention", "--model", "PixArt-XL/2", "--override", *TINY, "--resolution",
                 "128", "--out", str(tmp_path)]) == 2
    assert "--prompt-embeddings" in capsys.readouterr().err


def test_steps_outside_the_trajectory_are_refused(tmp_path, capsys):
    assert main(["attention", "--model", "DiT-S/2", "--override", *TINY, "--resolution", "128",
                 "--sampler-steps", "4", "--steps", "4", "--out", str(tmp_path)]) == 2
    assert "outside the trajectory's steps 0…3" in capsys.readouterr().err
