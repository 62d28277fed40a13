"""Bad input found by trying the suite as a new user would: each ends in a ValueError (exit 2 for
`ptdit convert`) that names the item and what is allowed."""

import os
import re

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ptdit
from ptdit.cli import main
from ptdit.interop import FORMATS, save

from conftest import small_model

READABLE = ("allowed: a PyTorch checkpoint (.pt, .pth, .bin, .ckpt), a safetensors file or a "
            "diffusers folder")
FLOATING = "checkpoints hold floating-point weights (float32, bfloat16, float16, float64)"
WEIGHT = "x_embedder.proj.weight"
INT32 = re.escape(f"weight {WEIGHT} is int32; {FLOATING}")


def tiny(name: str, **kwargs) -> torch.nn.Module:
    return ptdit.build(name, depth=1, hidden_size=64, num_heads=4, **kwargs).eval()


def tiny_text(family: str) -> torch.nn.Module:
    extra = {"windows_per_side": 2} if family == "PT-DiT/XL" else {}
    return tiny(family, caption_channels=24, **extra)


def convert(src, tmp_path, capsys) -> tuple[int, str]:
    code = main(["convert", str(src), str(tmp_path / "out.safetensors"), "--to", "ptdit"])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("name", ["x.pt", "x.pth", "x.bin", "x.ckpt", "x.safetensors"])
def test_junk_file_is_no_checkpoint(tmp_path, capsys, name):
    for text in ("hello", "ab", "hello world\n"):
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(ValueError, match="not a readable") as err:
            ptdit.load(path)
        assert str(path) in str(err.value) and READABLE in str(err.value)
        code, stderr = convert(path, tmp_path, capsys)
        assert code == 2 and stderr.startswith("ptdit convert: error:"), stderr
        assert str(path) in stderr and READABLE in stderr
        assert not (tmp_path / "out.safetensors").exists()


def _int32(state_dict: dict) -> dict:
    return {**state_dict, WEIGHT: state_dict[WEIGHT].to(torch.int32)}


def test_int32_weight_in_a_ptdit_file(tmp_path, capsys):
    save(small_model("DiT", dtype=torch.float32), tmp_path / "ok.safetensors")
    with safe_open(str(tmp_path / "ok.safetensors"), framework="pt") as f:
        meta = f.metadata()
    path = tmp_path / "int.safetensors"
    save_file(_int32(load_file(tmp_path / "ok.safetensors")), path, metadata=meta)
    with pytest.raises(ValueError, match=INT32) as err:
        ptdit.load(path)
    assert str(path) in str(err.value)
    code, stderr = convert(path, tmp_path, capsys)
    assert code == 2 and f"{path}: weight {WEIGHT} is int32; {FLOATING}" in stderr, stderr


def test_int32_weight_in_a_facebook_dit_file(tmp_path, capsys):
    model = small_model("DiT", dtype=torch.float32)
    state_dict, config = FORMATS["facebook-dit"].from_ptdit(model.config, model.state_dict())
    path = tmp_path / "int.pt"
    torch.save(_int32(state_dict), path)
    with pytest.raises(ValueError, match=INT32) as err:
        ptdit.load(path, config=config)
    assert str(path) in str(err.value)


def test_int32_weight_in_a_diffusers_folder(tmp_path):
    # the converter concatenates q, k and v: an int32 one must not be promoted silently
    folder = tmp_path / "hf"
    save(small_model("DiT", dtype=torch.float32), folder, "diffusers-dit")
    weights = folder / "diffusion_pytorch_model.safetensors"
    state_dict = load_file(weights)
    key = "transformer_blocks.0.attn1.to_q.weight"
    save_file({**state_dict, key: state_dict[key].to(torch.int32)}, weights)
    with pytest.raises(ValueError, match=re.escape(f"weight {key} is int32; {FLOATING}")) as err:
        ptdit.load(folder)
    assert str(folder) in str(err.value)


@pytest.mark.parametrize("path", [None, ""])
def test_load_needs_a_path(path):
    with pytest.raises(ValueError, match=f"a checkpoint path is needed \\(a PyTorch checkpoint "
                                         f".*diffusers folder\\), got {path!r}"):
        ptdit.load(path)


def test_build_none_is_an_unknown_model():
    with pytest.raises(ValueError, match="unknown model None. Known models: DiT-S/2, .*PT-DiT/XL"):
        ptdit.build(None)


def _text_inputs():
    return torch.randn(1, 4, 16, 16), torch.rand(1) * 999, torch.randn(1, 6, 24)


@pytest.mark.parametrize("family", ["PixArt-XL/2", "PT-DiT/XL"])
def test_text_mask_must_be_a_b_by_l_tensor(family):
    model = tiny_text(family)
    x, t, text = _text_inputs()
    keep = torch.rand(1, 6) < 0.8
    keep[0, 0], keep[0, -1] = True, False   # one kept token, one dropped
    wrong = {"list": keep.int().tolist(), "ndarray": keep.numpy(),
             "float32 (1, 5)": keep[:, :5].float(), "int64 (6,)": keep[0].long()}
    for got, mask in wrong.items():
        message = ("text mask must be a torch tensor of shape (1, 6) (batch, caption tokens), "
                   f"bool or 0/1 integers or floats, got {got}")
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            model(x, t, text, mask)
    with pytest.raises(ValueError, match=r"text mask values must be 0 \(drop\) or 1 \(keep\), "
                                         r"got \[0.5, 1.0\]"):
        model(x, t, text, torch.where(keep, 1.0, 0.5))
    with torch.no_grad():
        outs = [model(x, t, text, m) for m in (keep, keep.int(), keep.long(), keep.float())]
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_forward_with_cfg_needs_an_even_batch():
    model = tiny("DiT-S/2")
    for B in (1, 3):
        x, t = torch.randn(B, 4, 16, 16), torch.rand(B) * 999
        y = torch.randint(0, 1000, (B,))
        with pytest.raises(ValueError, match="forward_with_cfg takes the conditional half then "
                                             f"the null-class half: an even batch, got {B}$"):
            model.forward_with_cfg(x, t, y, 4.0)


@pytest.mark.parametrize("fmt", ["ptdit", "facebook-dit", "diffusers-dit"])
def test_saved_files_respect_the_umask(tmp_path, fmt):
    umask = os.umask(0)
    os.umask(umask)
    dst = tmp_path / ("hf" if fmt.startswith("diffusers") else "dit.safetensors")
    paths = save(small_model("DiT", dtype=torch.float32), dst, fmt)
    assert any(p.suffix == ".safetensors" for p in paths)
    for p in paths:
        assert p.stat().st_mode & 0o777 == 0o666 & ~umask, (p, oct(p.stat().st_mode))
    paths = save(small_model("DiT", dtype=torch.float32), dst, fmt, force=True)  # overwritten
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~umask for p in paths)


def test_saved_file_mode_follows_another_umask(tmp_path):
    old = os.umask(0o027)
    try:
        path = save(small_model("DiT", dtype=torch.float32), tmp_path / "dit.safetensors")[0]
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("family", ["DiT-S/2", "PixArt-XL/2"])
def test_numpy_latents_are_refused(family):
    model = tiny("DiT-S/2") if family == "DiT-S/2" else tiny_text(family)
    x, t, text = _text_inputs()
    cond = torch.randint(0, 1000, (1,)) if family == "DiT-S/2" else text
    with pytest.raises(ValueError, match=r"latents must be a \(B, C, H, W\) or \(B, C, F, H, W\) "
                                         r"tensor, got ndarray"):
        model(x.numpy(), t, cond)
