"""`ptdit attention`: the window-similarity analysis along a real sampling trajectory of the
quality sampler, rows through the store, figures from them, and a plain statement that the
weights are untrained."""

import json

import numpy as np
import pytest
import torch

import ptdit
from analysis.attention_sources import analyse_trajectory
from analysis.capture import analyse
from analysis.model_calls import ModelCall
from analysis.sampling import denoise, initial_noise, sample_generators
from bench.rows import check_row
from ptdit.cli import main

TINY = ["depth=2", "hidden_size=64", "num_heads=4"]


def test_the_command_writes_rows_figures_and_says_untrained(tmp_path, capsys):
    out = tmp_path / "att"
    assert main(["attention", "--model", "DiT-S/2", "--override", *TINY, "--resolution", "128",
                 "--sampler-steps", "6", "--window-sides", "2", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "UNTRAINED" in printed and "position-matched" in printed
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
                 "--sampler-steps", "4", "--analyse-steps", "4", "--out", str(tmp_path)]) == 2
    assert "outside the sampler's steps 0…3" in capsys.readouterr().err


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

    from analysis.capture import Capture
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


#################################################################################
#                 Reruns, seeds, summaries, bad flags, real images              #
#################################################################################

ATTENTION = ["attention", "--model", "DiT-S/2", "--override", *TINY, "--resolution", "64",
             "--sampler-steps", "4", "--window-sides", "2", "4"]


def stored(out) -> list[dict]:
    return [json.loads(line) for line in (out / "attention.jsonl").read_text().splitlines()]


def test_untrained_weights_come_from_a_recorded_seed(tmp_path):
    """Two runs without a checkpoint build the same weights (--init-seed, default --seed), so
    they give the same numbers; the seed is in every row; another seed gives other weights."""
    first, second, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert main([*ATTENTION, "--out", str(first)]) == 0
    assert main([*ATTENTION, "--out", str(second)]) == 0
    assert main([*ATTENTION, "--init-seed", "7", "--out", str(other)]) == 0
    a, b, c = stored(first), stored(second), stored(other)
    assert {r["init_seed"] for r in a} == {0} and {r["init_seed"] for r in c} == {7}
    assert [r["value"] for r in a] == [r["value"] for r in b]
    assert [r["value"] for r in a] != [r["value"] for r in c]


def test_a_rerun_into_the_same_folder_is_refused_unless_forced(tmp_path, capsys):
    out = tmp_path / "att"
    assert main([*ATTENTION, "--out", str(out)]) == 0
    rows = len(stored(out))
    capsys.readouterr()
    assert main([*ATTENTION, "--out", str(out)]) == 2
    assert "already holds an attention analysis" in capsys.readouterr().err
    assert len(stored(out)) == rows                                 # nothing appended
    assert main([*ATTENTION, "--analyse-steps", "1", "--out", str(out), "--force"]) == 0
    assert {r["step"] for r in stored(out)} == {1}                  # replaced, not appended
    assert len(list(out.glob("window_rows_*.png"))) == 1


def test_the_summary_is_per_analysed_step(tmp_path, capsys):
    assert main([*ATTENTION, "--out", str(tmp_path / "att")]) == 0
    printed = capsys.readouterr().out
    table = printed[printed.index("\ncosine\n"):printed.index("\nreplacement_error\n")]
    for step in ("0 ", "2 ", "3 ", "mean"):
        assert f"\n{step}" in table
    assert "within window" in table and "position-matched" in table and "random pairs" in table


@pytest.mark.parametrize("flags, message", [
    (["--sampler-steps", "0"], "argument --sampler-steps: '0' is not a positive integer"),
    (["--num-samples", "0"], "argument --num-samples: '0' is not a positive integer"),
    (["--cfg-scale", "nan"], "argument --cfg-scale: 'nan' is not a finite number"),
    (["--edge-margin", "0"], "argument --edge-margin: '0' is not a positive integer"),
    (["--vae", "somewhere"], "--vae encodes the real images of --images")])
def test_bad_flags_are_one_line_errors(flags, message, tmp_path, capsys):
    out = tmp_path / "never"
    assert main([*ATTENTION, *flags, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


def test_non_finite_attention_makes_the_command_fail(tmp_path, monkeypatch, capsys):
    """A model whose weights hold a NaN (head 0's queries first, then every latent): the rows of
    the maps that hold NaN are not ok, the others are, and the command exits 1."""
    from analysis import commands

    build = commands.build_model

    def broken(*args, **kwargs):
        model = build(*args, **kwargs)
        with torch.no_grad():
            model.blocks[0].attn.qkv.weight[0, 0] = float("nan")
        return model
    monkeypatch.setattr(commands, "build_model", broken)
    out = tmp_path / "att"
    assert main([*ATTENTION, "--out", str(out)]) == 1
    rows = stored(out)
    bad = [r for r in rows if r["status"] != "ok"]
    assert {r["status"] for r in bad} == {"error: 1 of 1 attention maps held NaN or Inf"}
    assert {(r["step"], r["head"]) for r in rows if r["status"] == "ok"} == {
        (0, 1), (0, 2), (0, 3)}
    assert "rows are not ok" in capsys.readouterr().out


def write_images(folder, n: int, size=(40, 52)) -> None:
    from PIL import Image
    folder.mkdir()
    generator = torch.Generator().manual_seed(3)
    for i in range(n):
        pixels = torch.randint(0, 256, (*size, 3), dtype=torch.uint8, generator=generator)
        Image.fromarray(pixels.numpy()).save(folder / f"{i:03d}.png")


def test_noised_real_images_through_a_vae(tmp_path, capsys):
    """--images with --vae: the images are encoded, noised to the sampler's timesteps at the
    analysed steps, and analysed like the trajectory (same columns, source says so)."""
    from diffusers import AutoencoderKL

    AutoencoderKL(block_out_channels=(8, 16, 16, 16), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4,
                  norm_num_groups=8, sample_size=64).save_pretrained(tmp_path / "vae")
    write_images(tmp_path / "images", 3)
    out = tmp_path / "att"
    assert main([*ATTENTION, "--images", str(tmp_path / "images"), "--vae",
                 str(tmp_path / "vae"), "--num-samples", "2", "--out", str(out)]) == 0
    rows = stored(out)
    assert {r["source"] for r in rows} == {
        f"noised images: 2 image(s) of {tmp_path / 'images'}, encoded by {tmp_path / 'vae'}"}
    assert {r["step"] for r in rows} == {0, 2, 3} and {r["branch"] for r in rows} == {
        "cond", "uncond"}
    assert {(r["resolution"], r["tokens"]) for r in rows} == {(64, 16)}
    assert {r["grid"] for r in rows} == {"4x4"}
    assert "noised images" in capsys.readouterr().out


def test_noised_images_match_an_independent_noising(tmp_path):
    """analyse_images feeds the model q(x_t | x_0) of the encoded image at the sampler's
    timesteps with sample 0's seeded noise: the same rows as `analyse` on calls built by hand."""
    from analysis.attention_sources import analyse_images, clean_latents
    from analysis.sampling import make_scheduler

    model = ptdit.build("DiT-S/2", depth=2, hidden_size=64, num_heads=4, in_channels=3,
                        learn_sigma=False).eval()
    write_images(tmp_path / "images", 1, size=(32, 32))
    rows, _ = analyse_images(model, "5", tmp_path / "images", resolution=32, steps=10,
                             analyse_steps=[4], cfg_scale=1.0, windows=[2])
    x0, factor, _ = clean_latents(tmp_path / "images", 1, 32, None, 3)
    assert factor == 1 and x0.shape == (1, 3, 32, 32)
    scheduler = make_scheduler("ddpm")
    scheduler.set_timesteps(10)
    t = scheduler.timesteps[4]
    noise = initial_noise(sample_generators(0, [0]), (3, 32, 32))
    x_t = scheduler.add_noise(x0, noise, t.reshape(1))
    call = ModelCall(x_t, {"t": t.float().reshape(1), "y": torch.tensor([5])}, 4, float(t))
    expected, _ = analyse(model, [call], windows=[2], factor=1)
    assert {r["resolution"] for r in rows} == {32}
    got = sorted((r["layer"], r["head"], r["metric"], str(r["window"]), r["value"])
                 for r in rows)
    want = sorted((r["layer"], r["head"], r["metric"], str(r["window"]), r["value"])
                  for r in expected)
    assert [g[:-1] for g in got] == [w[:-1] for w in want]
    np.testing.assert_allclose([g[-1] for g in got], [w[-1] for w in want], rtol=1e-5)


def test_real_images_need_a_vae_for_latent_models(tmp_path, capsys):
    write_images(tmp_path / "images", 1)
    assert main([*ATTENTION, "--images", str(tmp_path / "images"), "--out",
                 str(tmp_path / "att")]) == 2
    assert "give a VAE to encode the images (--vae)" in capsys.readouterr().err


def test_the_trajectory_stops_after_the_last_analysed_step():
    """Steps after the last analysed one change no map: the sampler is not run past it."""
    model = ptdit.build("DiT-S/2", depth=2, hidden_size=64, num_heads=4, seed=0).eval()
    forwards = []
    model.register_forward_hook(lambda *_: forwards.append(1))
    rows, _ = analyse_trajectory(model, "3", resolution=64, steps=10, analyse_steps=[1],
                                 windows=[2])
    assert len(forwards) == 2 and {r["step"] for r in rows} == {1}
