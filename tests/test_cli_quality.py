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
            "--resolution", "16", "--class-labels", "0-3", "--num", "4", "--steps", "3",
            "--batch-size", "2", "--out", str(out), "--npz"]
    assert main(args) == 0
    names = sorted(p.name for p in out.glob("*.png"))
    assert names == [f"{i:06d}.png" for i in range(4)]
    first = np.asarray(Image.open(out / names[0]))
    assert first.shape == (16, 16, 3) and first.dtype == np.uint8
    assert np.load(out / "samples.npz")["arr_0"].shape == (4, 16, 16, 3)
    (sampled,) = rows(out / "samples.jsonl")
    assert sampled["status"] == "ok" and sampled["scheduler"] == "ddpm"
    assert sampled["checkpoint"] == "untrained"

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
      "--num", "1", "--out", "OUT"], "--vae", "PTDIT_VAE"),
])
def test_missing_weights_fail_naming_the_flag_and_variable(tmp_path, monkeypatch, capsys,
                                                           command, flag, variable):
    monkeypatch.delenv(variable, raising=False)
    argv = [str(tmp_path / a) if a.isupper() else a for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert flag in err and variable in err and "https://" in err
    assert not (tmp_path / "OUT").exists()
