"""The README's quality sequence through the `ptdit` command — sample → FID → CLIP score — with
tiny random-weight networks in local files (a diffusers VAE folder, torch-fidelity's Inception,
a clip-anytorch CLIP), and the loud offline errors."""

import json

import clip
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from ptdit.cli import main

TINY = ["depth=1", "hidden_size=64", "num_heads=4"]
CLIP_TINY = dict(embed_dim=32, image_resolution=32, vision_layers=2, vision_width=64,
                 vision_patch_size=8, context_length=77, vocab_size=49408,
                 transformer_width=64, transformer_heads=1, transformer_layers=2)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Local files for every network of the sequence, with random weights."""
    root = tmp_path_factory.mktemp("weights")
    AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                  norm_num_groups=8, sample_size=32).save_pretrained(root / "vae")
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    with pytest.MonkeyPatch.context() as patch:   # build the net without its download
        patch.setattr(tfi, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), root / "inception.pth")
    torch.save(clip.model.CLIP(**CLIP_TINY).state_dict(), root / "clip.pt")
    return root


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_sample_then_fid_then_clip_score(tmp_path, weights, capsys):
    out = tmp_path / "samples"
    args = ["sample", "--model", "DiT-S/2", "--override", *TINY, "--vae", str(weights / "vae"),
            "--resolution", "16", "--class-labels", "0-3", "--num-samples", "4",
            "--sampler-steps", "3",
            "--batch-size", "2", "--out", str(out), "--npz"]
    assert main(args) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(4)]
    first = np.asarray(Image.open(out / names[0]))
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8
    assert np.load(out / "samples.npz")["arr_0"].shape == (4, 16, 16, 3)
    (sampled,) = rows(out / "samples.jsonl")
    assert sampled["status"] == "ok" and sampled["scheduler"] == "ddpm"
    assert sampled["checkpoint"] == "untrained" and sampled["init_seed"] == 0
    assert sampled["table"] == "samples" and sampled["world_size"] == 1
    assert json.loads((out / "run.json").read_text())["settings"]["weights"] == \
        {"untrained": True, "init_seed": 0}

    mtimes = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert main(args) == 0                                    # rerun: nothing redone
    assert {p: p.stat().st_mtime_ns for p in out.glob("*.png")} == mtimes

    reference = tmp_path / "reference"
    reference.mkdir()
    for i in range(5):
        pixels = torch.randint(0, 256, (16, 16, 3), dtype=torch.uint8).numpy()
        Image.fromarray(pixels).save(reference / f"{i}.png")
    store = tmp_path / "quality.jsonl"
    assert main(["fid", str(out), str(reference), "--inception-weights",
                 str(weights / "inception.pth"), "--store", str(store)]) == 0
    (fid,) = rows(store)
    assert fid["metric"] == "fid" and np.isfinite(fid["fid"]) and fid["fid"] > 0
    assert fid["fid_raw"] == fid["fid"] and fid["fid_clamped"] is False
    assert (fid["n_samples"], fid["n_reference"], fid["antialias"]) == (4, 5, False)

    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\na dog on a tree\na red car\na small house\n")
    assert main(["clip-score", str(out), str(captions), "--clip-weights",
                 str(weights / "clip.pt"), "--store", str(store)]) == 0
    clip_row = rows(store)[1]
    assert clip_row["metric"] == "clip_score" and clip_row["n_pairs"] == 4
    assert 0 <= clip_row["clip_score"] <= 100
    assert "clip_score" in capsys.readouterr().out


@pytest.mark.parametrize("command, flag, variable", [
    (["fid", "SAMPLES", "SAMPLES"], "--inception-weights", "PTDIT_INCEPTION_WEIGHTS"),
    (["clip-score", "SAMPLES", "CAPTIONS"], "--clip-weights", "PTDIT_CLIP_WEIGHTS"),
    (["sample", "--model", "DiT-S/2", "--resolution", "256", "--class-labels", "0",
      "--num-samples", "1", "--out", "OUT"], "--vae", "PTDIT_VAE"),
])
def test_missing_weights_fail_naming_the_flag_and_variable(tmp_path, monkeypatch, capsys,
                                                           command, flag, variable):
    monkeypatch.delenv(variable, raising=False)
    argv = [str(tmp_path / a) if a.isupper() else a for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and variable in err and "https://" in err
    assert not (tmp_path / "OUT").exists()


SAMPLE = ["sample", "--model", "DiT-S/2", "--override", *TINY, "--resolution", "16",
          "--class-labels", "0-3", "--sampler-steps", "1", "--scheduler", "flow"]


def one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"ptdit {command}: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("old, new, theirs", [("--num", "--num-samples", "--numa-binding"),
                                               ("--start", "--first-index", "--start-method")])
def test_old_sample_flags_are_an_error_naming_the_new_flag(tmp_path, capsys, old, new, theirs):
    assert main([*SAMPLE, "--num-samples", "2", "--out", str(tmp_path / "out"), old, "2"]) == 2
    err = one_line_error(capsys, "sample")
    assert f"{old} was renamed {new}" in err and "torchrun" in err and theirs in err
    assert main([*SAMPLE, "--num-samples", "2", "--first-ind", "3", "--out",
                 str(tmp_path / "out")]) == 2         # no prefix stands for a flag
    assert "unrecognized arguments: --first-ind 3" in capsys.readouterr().err
    assert main([*SAMPLE, "--num-samp", "2", "--out", str(tmp_path / "out")]) == 2
    assert "unrecognized arguments: --num-samp 2" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


CUDA_ABSENT = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


@pytest.mark.parametrize("device, message", [
    ("foo", "--device 'foo' is not a device.*allowed: cpu, cuda, cuda:N"),
    pytest.param("cuda", "--device cuda was asked for but CUDA is not available",
                 marks=CUDA_ABSENT)])
@pytest.mark.parametrize("command", [
    [*SAMPLE, "--num-samples", "1", "--out", "OUT"], ["fid", "OUT", "OUT"],
    ["clip-score", "OUT", "OUT"]])
def test_devices_are_checked_before_anything_else(tmp_path, capsys, device, message, command):
    argv = [str(tmp_path / a) if a == "OUT" else a for a in command]
    assert main([*argv, "--device", device]) == 2
    import re
    assert re.search(message, one_line_error(capsys, command[0]))
    assert not (tmp_path / "OUT").exists()


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_non_finite_cfg_scale_is_refused(tmp_path, weights, capsys, value):
    argv = [*SAMPLE, "--vae", str(weights / "vae"), "--num-samples", "1", "--out",
            str(tmp_path / "out"), f"--cfg-scale={value}"]
    assert main(argv) == 2
    assert f"argument --cfg-scale: '{value}' is not a finite number" in one_line_error(
        capsys, "sample")
    assert not (tmp_path / "out").exists()


def test_a_sample_that_turns_non_finite_exits_1_without_its_png(tmp_path, weights,
                                                                monkeypatch, capsys):
    from analysis import commands

    real = commands.build_model

    def poisoned(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.final_layer.linear.weight[0, 0] = float("inf")
        return model
    monkeypatch.setattr(commands, "build_model", poisoned)
    out = tmp_path / "out"
    assert main([*SAMPLE, "--vae", str(weights / "vae"), "--num-samples", "2", "--out",
                 str(out)]) == 1
    (row,) = rows(out / "samples.jsonl")
    assert row["status"].startswith("error: non-finite") and "first index 0" in row["status"]
    assert not list(out.glob("*.png"))


def test_untrained_weights_are_drawn_under_the_init_seed(monkeypatch):
    from analysis.commands import build_model, init_seed_of
    from ptdit.cli import build_parser

    def weights(*extra):
        args = build_parser().parse_args([*SAMPLE, "--num-samples", "1", "--out", "o", *extra])
        seed = init_seed_of(args.checkpoint, args.init_seed, args.seed)
        return build_model(args.model, None, args.override, seed).state_dict()

    state = torch.random.get_rng_state()
    first, again = weights("--seed", "5"), weights("--init-seed", "5", "--seed", "9")
    other = weights("--seed", "6")
    assert torch.equal(torch.random.get_rng_state(), state)   # the global RNG is untouched
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)


@pytest.mark.parametrize("where", ["sample", "fid", "clip-score"])
def test_unwritable_outputs_fail_before_any_work(tmp_path, weights, capsys, where):
    """An output under a file: a one-line error naming the flag, before the VAE, Inception or
    CLIP is loaded (their weights are missing here: the output check comes first)."""
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    images = tmp_path / "images"
    images.mkdir()
    argv = {"sample": [*SAMPLE, "--num-samples", "1", "--vae", str(tmp_path / "no-vae"),
                       "--out", str(blocker / "out")],
            "fid": ["fid", str(images), str(images), "--inception-weights",
                    str(weights / "inception.pth"), "--store", str(blocker / "rows.jsonl")],
            "clip-score": ["clip-score", str(images), str(tmp_path / "captions.txt"),
                           "--clip-weights", str(weights / "clip.pt"), "--store",
                           str(blocker / "rows.jsonl")]}[where]
    assert main(argv) == 2
    err = one_line_error(capsys, where)
    assert ("--out" if where == "sample" else "--store") in err and "is a file" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "images"]


def test_failed_runs_leave_no_new_folders(tmp_path, weights, capsys):
    out = tmp_path / "new" / "dir"
    assert main([*SAMPLE[:-6], "--class-labels", "0-99999999999", "--sampler-steps", "1",
                 "--vae", str(weights / "vae"), "--num-samples", "1", "--out", str(out)]) == 2
    assert "out of range for DiT" in one_line_error(capsys, "sample")
    store = tmp_path / "rows" / "fid.jsonl"
    assert main(["fid", str(tmp_path / "no-samples"), str(tmp_path / "no-reference"),
                 "--inception-weights", str(weights / "inception.pth"), "--store",
                 str(store)]) == 2
    assert "does not exist" in one_line_error(capsys, "fid")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_text_file_as_prompt_embeddings_is_named(tmp_path, weights, capsys):
    (tmp_path / "prompts.pt").write_text("a red cat\n")
    argv = ["sample", "--model", "PT-DiT/XL", "--override", *TINY, "caption_channels=24",
            "windows_per_side=2", "--resolution", "16", "--vae", str(weights / "vae"),
            "--prompt-embeddings", str(tmp_path / "prompts.pt"), "--num-samples", "1",
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    assert "prompts.pt' cannot be read" in one_line_error(capsys, "sample")
    assert not (tmp_path / "out").exists()


def test_a_non_finite_override_is_refused(tmp_path, weights, capsys):
    assert main([*SAMPLE, "--override", "mlp_ratio=nan", "--vae", str(weights / "vae"),
                 "--num-samples", "1", "--out", str(tmp_path / "out")]) == 2
    assert "argument --override: 'mlp_ratio=nan': mlp_ratio must be finite" in one_line_error(
        capsys, "sample")
    assert not (tmp_path / "out").exists()
