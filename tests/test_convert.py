"""`ptdit convert` and `ptdit.interop.save`: every writable format round-trips exactly."""

import dataclasses
import importlib
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_interop_ptdit import SMALL, release_checkpoint
from test_load import random_model, same_weights, tiny_registry  # noqa: F401 (fixture)

from ptdit import DiTConfig, PixArtConfig
from ptdit.cli import main
from ptdit.interop import FORMATS, load, save
from ptdit.interop.official_ptdit import POS_BUFFER, ptdit_config
from ptdit.models import DiT, PixArt, PTDiT

from conftest import condition

DIT = DiTConfig(depth=2, hidden_size=32, num_heads=4, patch_size=2, input_size=8, num_classes=10)

# Configs away from every default, including the fields each format cannot say (they travel in
# a sidecar or under config.json's "ptdit_config"), and heads no registry size implies.
# mlp_ratio 3.3 is not the MLP width over the model width (int(32·3.3) = 105, 105/32 ≠ 3.3).
ODD_DIT = dict(depth=2, hidden_size=32, num_heads=2, patch_size=2, input_size=8, num_classes=10,
               learn_sigma=False, norm_eps=1e-5)
ODD = {
    "DiT": DiTConfig(**ODD_DIT, class_dropout_prob=0.0, freq_shift=1, mlp_ratio=3.3),
    # diffusers: mlp_ratio 4 and a null class only; freq_shift 0 is the one it cannot say
    "DiT-diffusers": DiTConfig(**ODD_DIT, class_dropout_prob=0.25, freq_shift=0),
    "PixArt": PixArtConfig(depth=2, hidden_size=48, num_heads=2, input_size=8,
                           caption_channels=12, model_max_length=4, learn_sigma=False,
                           micro_condition=True, pos_interp_scale=3.0, norm_eps=1e-5,
                           class_dropout_prob=0.2, mlp_ratio=3.3),
    # diffusers: mlp_ratio 4, no null caption (its length still rides along)
    "PixArt-diffusers": PixArtConfig(depth=2, hidden_size=48, num_heads=2, input_size=8,
                                     caption_channels=12, model_max_length=4, learn_sigma=False,
                                     micro_condition=True, pos_interp_scale=3.0, norm_eps=1e-5,
                                     class_dropout_prob=0.2, null_caption=False),
    "PT-DiT": dataclasses.replace(ptdit_config(SMALL), learn_sigma=False, shift_window=False,
                                  pos_interp_scale=2.0, class_dropout_prob=0.0, num_classes=7,
                                  windows_per_side=2, temporal_window=2),
}


def model_of(family: str, fmt: str = "ptdit"):
    key = f"{family}-diffusers" if fmt.startswith("diffusers") else family
    return random_model({"DiT": DiT, "PixArt": PixArt, "PT-DiT": PTDiT}[family], ODD[key]).eval()


def outputs(model) -> torch.Tensor:
    """The model's output for fresh random inputs (drawn from one generator, so that calling
    it twice draws the same)."""
    x = torch.randn(2, 4, 16, 16)
    t = torch.rand(2) * 1000
    kwargs = {}
    if getattr(model.config, "micro_condition", False):
        resolution = torch.tensor([[128.0, 96.0]] * 2)
        kwargs = dict(resolution=resolution, aspect_ratio=resolution[:, :1] / resolution[:, 1:])
    with torch.no_grad():
        return model(x, t, *condition(model, 2, dtype=torch.float32), **kwargs)


def target(tmp_path, fmt: str):
    return tmp_path / ("folder" if fmt.startswith("diffusers") else "out.safetensors")


WRITABLE = [(name, fam) for name, f in FORMATS.items() if f.from_ptdit is not None
            for fam in (["DiT", "PixArt", "PT-DiT"] if f.family == "any" else [f.family])]


@pytest.mark.parametrize("fmt, family", WRITABLE)
def test_ours_format_ours_is_exact(tmp_path, fmt, family):
    """Through files, with nothing but what save wrote: the same config (architecture), the
    same tensors bit for bit and the same outputs."""
    model = model_of(family, fmt)
    save(model, target(tmp_path, fmt), fmt)
    loaded = load(target(tmp_path, fmt), format="auto")
    assert type(loaded) is type(model)
    assert loaded.config == model.config
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    seed = int(torch.randint(2**62, ()))
    torch.manual_seed(seed)
    want = outputs(model)
    torch.manual_seed(seed)
    assert torch.equal(outputs(loaded), want)


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


def test_cli_damaged_sources_exit_2(tmp_path, capsys):
    """Truncated files and broken JSON end in `ptdit convert: error:` naming the file, exit 2."""
    model = random_model(DiT, DIT)
    save(model, tmp_path / "ok.safetensors")
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    dst = str(tmp_path / "out.safetensors")
    cases = []
    for suffix in ("safetensors", "pt"):
        data = (tmp_path / f"ok.{suffix}").read_bytes()
        header = 8 + int.from_bytes(data[:8], "little") if suffix == "safetensors" else 64
        for cut in (0, header, len(data) // 2):
            path = tmp_path / f"cut{cut}.{suffix}"
            path.write_bytes(data[:cut])
            cases.append((path, ["--config", str(tmp_path / "heads.json")], "truncated"))
    (tmp_path / "heads.json").write_text('{"num_heads": 4}')
    (tmp_path / "broken.json").write_text('{"num_heads": ')
    cases.append((tmp_path / "ok.pt", ["--config", str(tmp_path / "broken.json")],
                  "broken.json: the --config JSON is not valid JSON"))
    (tmp_path / "side.pt").write_bytes((tmp_path / "ok.pt").read_bytes())
    (tmp_path / "side.json").write_text("{")
    cases.append((tmp_path / "side.pt", [], "side.json: the sidecar config is not valid JSON"))
    for src, extra, message in cases:
        assert main(["convert", str(src), dst, "--to", "ptdit", *extra]) == 2, src
        err = capsys.readouterr().err
        assert err.startswith("ptdit convert: error:") and message in err, err
        assert str(src) in err or "json" in message


def test_cli_refuses_a_file_for_a_folder_format_and_vice_versa(tmp_path, capsys):
    model = random_model(DiT, DIT)
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    (tmp_path / "dit.json").write_text(json.dumps({"num_heads": 4}))
    src = str(tmp_path / "dit.pt")
    for force in ([], ["--force"]):
        assert main(["convert", src, str(tmp_path / "hf.safetensors"), "--to", "diffusers",
                     *force]) == 2
        assert "the diffusers-dit format is a folder (config.json + " in capsys.readouterr().err
        assert not (tmp_path / "hf.safetensors").exists()
    (tmp_path / "dir.safetensors").mkdir()
    for to in ("ptdit", "official"):
        assert main(["convert", src, str(tmp_path / "dir.safetensors"), "--to", to,
                     "--force"]) == 2
        assert "is a folder; the" in capsys.readouterr().err
    assert main(["convert", src, str(tmp_path / "hf"), "--to", "diffusers"]) == 0


def test_cli_name_gives_the_heads(tmp_path, capsys, tiny_registry):  # noqa: F811 (fixture)
    model = random_model(DiT, DIT)
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    src, dst = str(tmp_path / "dit.pt"), str(tmp_path / "o.safetensors")
    assert main(["convert", src, dst, "--to", "ptdit"]) == 2
    assert "load it with name=" in capsys.readouterr().err
    assert main(["convert", src, dst, "--to", "ptdit", "--name", "DiT-tiny"]) == 0
    assert "(DiT, DiT-tiny, float32)" in capsys.readouterr().out
    assert same_weights(load(dst), model)
    # an unknown name is refused first, before the (missing) source is read
    assert main(["convert", str(tmp_path / "missing.pt"), dst, "--to", "ptdit", "--force",
                 "--name", "DiT-XL/3"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'DiT-XL/3'; nearest: " in err and "does not exist" not in err


def test_cli_config_must_be_a_json_file(tmp_path, capsys):
    (tmp_path / "cfg").mkdir()
    assert main(["convert", str(tmp_path / "x.pt"), str(tmp_path / "o.safetensors"), "--to",
                 "ptdit", "--config", str(tmp_path / "cfg")]) == 2
    assert f"--config {tmp_path / 'cfg'} is a folder; it must be a JSON file" in (
        capsys.readouterr().err)


def test_cli_window(tmp_path, capsys):
    """A registry-style PT-DiT (window=None, the paper's schedule) goes to the official format
    with --window; the weights are the same, only the window (compress_ratios) is set."""
    model = random_model(PTDiT, dataclasses.replace(ptdit_config(SMALL), window=None))
    save(model, tmp_path / "m.safetensors")
    src, dst = str(tmp_path / "m.safetensors"), str(tmp_path / "o.safetensors")
    assert main(["convert", src, dst, "--to", "official"]) == 2
    assert "pass window=" in capsys.readouterr().err
    assert main(["convert", src, dst, "--to", "official", "--window", "1", "2", "4"]) == 0
    assert json.loads((tmp_path / "o.json").read_text())["compress_ratios"] == [1, 2, 4]
    back = load(dst)
    assert back.config == dataclasses.replace(model.config, window=(1, 2, 4))
    assert same_weights(back, model)
    assert main(["convert", src, str(tmp_path / "w.safetensors"), "--to", "ptdit",
                 "--window", "2", "4", "4"]) == 0
    assert load(tmp_path / "w.safetensors").config.window == (2, 4, 4)
    assert main(["convert", src, dst, "--to", "ptdit", "--force", "--window", "0", "4", "4"]
                ) == 2
    assert "argument --window: '0' is not a positive integer" in capsys.readouterr().err
    torch.save(random_model(DiT, DIT).state_dict(), tmp_path / "dit.pt")
    (tmp_path / "dit.json").write_text(json.dumps({"num_heads": 4}))
    assert main(["convert", str(tmp_path / "dit.pt"), dst, "--to", "ptdit", "--force",
                 "--window", "1", "2", "2"]) == 2
    assert "--window sets a PT-DiT's window; " in capsys.readouterr().err


def test_cli_unwritable_destinations_exit_2(tmp_path, capsys):
    """Refused before loading (the source here does not even exist), as an error naming DST."""
    missing = str(tmp_path / "missing.pt")
    (tmp_path / "file").write_text("")
    for dst, to in (("/proc/x.safetensors", "official"), ("/proc/d", "diffusers"),
                    ("/proc/missing/x.safetensors", "ptdit"),
                    (str(tmp_path / "file" / "x.safetensors"), "ptdit")):
        assert main(["convert", missing, dst, "--to", to]) == 2, dst
        err = capsys.readouterr().err
        assert err.startswith(f"ptdit convert: error: {dst} cannot be written: "), err
    # missing folders that can be made are made
    torch.save(random_model(DiT, DIT).state_dict(), tmp_path / "dit.pt")
    (tmp_path / "dit.json").write_text(json.dumps({"num_heads": 4}))
    assert main(["convert", str(tmp_path / "dit.pt"), str(tmp_path / "new/sub/o.safetensors"),
                 "--to", "ptdit"]) == 0


def test_save_names_the_path_when_writing_fails(tmp_path, monkeypatch):
    load_module = importlib.import_module("ptdit.interop.load")   # the name `load` is the function

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(load_module, "save_file", full)
    with pytest.raises(ValueError, match="o.safetensors: cannot write the ptdit checkpoint "
                       r"\(OSError: \[Errno 28\] No space left on device\)"):
        save(random_model(DiT, DIT), tmp_path / "o.safetensors")
    with pytest.raises(ValueError, match="/proc/x.safetensors cannot be written: /proc takes no "
                       "new files"):
        save(random_model(DiT, DIT), "/proc/x.safetensors")
