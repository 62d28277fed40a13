"""`ptdit convert` and `ptdit.interop.save`: every writable format round-trips exactly."""

import dataclasses
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ptdit.cli import main
from ptdit.configs import DiTConfig, PixArtConfig
from ptdit.interop import FORMATS, from_official_ptdit, load, save
from ptdit.interop.official_ptdit import POS_BUFFER
from ptdit.models import DiT, PixArt
from test_interop_ptdit import SMALL, release_checkpoint
from test_load import random_model, same_weights

DIT = DiTConfig(depth=2, hidden_size=32, num_heads=4, patch_size=2, input_size=8, num_classes=10)
PIXART = PixArtConfig(depth=2, hidden_size=32, num_heads=2, input_size=8, caption_channels=12,
                      model_max_length=4)


def model_of(family: str, fmt: str = "ptdit"):
    if family == "DiT":
        return random_model(DiT, DIT)
    if family == "PixArt" and fmt == "diffusers-pixart":   # diffusers has no null caption
        return random_model(PixArt, dataclasses.replace(PIXART, null_caption=False,
                                                        model_max_length=120))
    if family == "PixArt":
        return random_model(PixArt, PIXART)
    return from_official_ptdit(release_checkpoint(SMALL, dtype=torch.float32), SMALL)


def target(tmp_path, fmt: str):
    return tmp_path / ("folder" if fmt.startswith("diffusers") else "out.safetensors")


WRITABLE = [(name, fam) for name, f in FORMATS.items() if f.from_ptdit is not None
            for fam in (["DiT", "PixArt", "PT-DiT"] if f.family == "any" else [f.family])]


@pytest.mark.parametrize("fmt, family", WRITABLE)
def test_ours_format_ours_is_exact(tmp_path, fmt, family):
    model = model_of(family, fmt)
    save(model, target(tmp_path, fmt), fmt)
    heads = {"num_heads": model.config.num_heads}
    config = heads if fmt in ("facebook-dit", "official-pixart") else None
    loaded = load(target(tmp_path, fmt), format="auto", config=config)
    assert type(loaded) is type(model) and loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


#################################################################################
#                                   The CLI                                     #
#################################################################################

def test_cli_official_ptdit_to_ptdit_and_back(tmp_path, capsys):
    sd = release_checkpoint(SMALL, dtype=torch.float32)
    save_file(sd, tmp_path / "qihoo.safetensors")
    (tmp_path / "qihoo.json").write_text(json.dumps(SMALL))
    assert main(["convert", str(tmp_path / "qihoo.safetensors"),
                 str(tmp_path / "ours.safetensors"), "--to", "ptdit"]) == 0
    assert "-> ptdit (PT-DiT, float32)" in capsys.readouterr().out
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        assert f.metadata()["family"] == "PT-DiT"
    assert main(["convert", str(tmp_path / "ours.safetensors"),
                 str(tmp_path / "again.safetensors"), "--to", "official"]) == 0
    again = load_file(tmp_path / "again.safetensors")
    assert json.loads((tmp_path / "again.json").read_text()) == SMALL
    assert set(again) == set(sd)
    assert all(torch.equal(again[k], sd[k]) for k in sd if k != POS_BUFFER)
    assert (again[POS_BUFFER] - sd[POS_BUFFER]).abs().max() < 1e-6


def test_cli_facebook_dit_to_diffusers_and_back(tmp_path):
    model = random_model(DiT, DIT)
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    (tmp_path / "heads.json").write_text(json.dumps({"num_heads": 4}))
    assert main(["convert", str(tmp_path / "dit.pt"), str(tmp_path / "hf"), "--to", "diffusers",
                 "--config", str(tmp_path / "heads.json")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["_class_name"] == (
        "DiTTransformer2DModel")
    assert main(["convert", str(tmp_path / "hf"), str(tmp_path / "fb.safetensors"),
                 "--to", "official"]) == 0
    assert same_weights(load(tmp_path / "fb.safetensors", config={"num_heads": 4}), model)


def test_cli_dtype(tmp_path):
    save_file(release_checkpoint(SMALL, dtype=torch.float32), tmp_path / "q.safetensors")
    (tmp_path / "q.json").write_text(json.dumps(SMALL))
    assert main(["convert", str(tmp_path / "q.safetensors"), str(tmp_path / "b.safetensors"),
                 "--to", "official", "--dtype", "bfloat16"]) == 0
    assert {v.dtype for v in load_file(tmp_path / "b.safetensors").values()} == {torch.bfloat16}


def test_cli_refusals(tmp_path, capsys):
    save_file(release_checkpoint(SMALL, dtype=torch.float32), tmp_path / "q.safetensors")
    (tmp_path / "q.json").write_text(json.dumps(SMALL))
    src, dst = str(tmp_path / "q.safetensors"), str(tmp_path / "o.safetensors")
    assert main(["convert", src, str(tmp_path / "hf"), "--to", "diffusers"]) == 2
    assert "PT-DiT has no diffusers format; allowed --to: ptdit, official" in (
        capsys.readouterr().err)
    assert main(["convert", src, dst, "--to", "ptdit"]) == 0
    assert main(["convert", src, dst, "--to", "ptdit"]) == 2
    assert "exists; pass --force" in capsys.readouterr().err
    assert main(["convert", src, dst, "--to", "ptdit", "--force"]) == 0
    assert main(["convert", src, str(tmp_path / "o.pt"), "--to", "ptdit"]) == 2
    assert main(["convert", str(tmp_path / "missing.pt"), dst, "--to", "ptdit"]) == 2
    assert main(["convert", src, dst, "--to", "ptdit", "--force", "--name", "PT-DiT/B"]) == 2
    assert "is not PT-DiT/B" in capsys.readouterr().err
