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


#################################################################################
#             Capture along real sampling trajectories, every architecture      #
#################################################################################

@pytest.mark.parametrize("family, conditions", [
    ("DiT", "2"), ("PT-DiT-class", "1"), ("PixArt", "prompts"), ("PT-DiT", "prompts")])
def test_capture_along_the_samplers_trajectory_for_each_architecture(family, conditions):
    """Several layers, heads and steps, with the guidance batch, along the family's own
    sampler (ddpm / dpm / flow) of a tiny model: every stream gets rows, both branches, and
    the analysed kind is the architecture's self-attention over all positions."""
    from analysis.conditions import make_prompts
    from conftest import small_model

    model = small_model(family, dtype=torch.float32,
                        **({"windows_per_side": 4} if family.startswith("PT-DiT") else {}))
    if conditions == "prompts":
        L, C = 6, model.config.caption_channels
        conditions = make_prompts(torch.randn(2, L, C), torch.ones(2, L),
                                  null_embedding=torch.randn(L, C), null_mask=torch.ones(L))
    rows, _ = analyse_trajectory(model, conditions, resolution=128, steps=4,
                                 analyse_steps=[0, 3], cfg_scale=3.0, samples=2, windows=[2],
                                 layers=[0, 1], heads=[0, 3])
    keys = {(r["kind"], r["layer"], r["head"], r["step"], r["branch"]) for r in rows}
    kind = "proxy" if family.startswith("PT-DiT") else "global"
    assert keys == {(kind, layer, h, s, b) for layer in (0, 1) for h in (0, 3) for s in (0, 3)
                    for b in ("cond", "uncond")}
    assert all(np.isfinite(r["value"]) for r in rows if r["metric"] == "cosine")
    assert {r["scheduler"] for r in rows} == {
        {"DiT": "ddpm", "PixArt": "dpm"}.get(family.split("-Class")[0], "flow")}


def test_capture_along_a_diffusers_pixart_sampling_loop():
    """A diffusers PixArtTransformer2DModel sampled with diffusers' DPM-Solver (guided), the
    reducing processor fed by Capture.begin before each of the loop's own forwards."""
    import diffusers

    from analysis.attention_maps import Capture
    from analysis.window_similarity import to_rows

    model = diffusers.PixArtTransformer2DModel(
        num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
        out_channels=8, sample_size=8, caption_channels=16, cross_attention_dim=16).eval()
    scheduler = diffusers.DPMSolverMultistepScheduler()
    scheduler.set_timesteps(3)
    text = torch.randn(2, 5, 16)                               # cond, then null caption
    x = torch.randn(1, 4, 8, 8)
    with Capture(model, windows=[2]) as capture, torch.no_grad():
        for step, t in enumerate(scheduler.timesteps):
            model_input = torch.cat([x, x])
            kwargs = {"timestep": t.expand(2), "encoder_hidden_states": text,
                      "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
            capture.begin(ModelCall(model_input, kwargs, step, float(t), cfg=True))
            cond, null = model(model_input, **kwargs).sample[:, :4].chunk(2)
            x = scheduler.step(null + 4.5 * (cond - null), t, x).prev_sample
        rows = to_rows(capture.stats)
    keys = {(r["layer"], r["head"], r["step"], r["branch"]) for r in rows}
    assert keys == {(layer, h, s, b) for layer in (0, 1) for h in (0, 1) for s in range(3)
                    for b in ("cond", "uncond")}
