"""`ptdit.load`: recognises each checkpoint kind, builds the right model in the right dtype, and
fails with every offending key listed. Every checkpoint is built here; the network is blocked."""

import dataclasses
import json
import socket

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from test_interop_ptdit import SMALL, inputs, release_checkpoint

import ptdit
from ptdit.configs import MODELS, Entry
from ptdit.interop import FORMATS, from_official_ptdit, load, save
from ptdit.interop.base import unwrap
from ptdit.interop.official_ptdit import ptdit_config
from ptdit.interop.ptdit_format import metadata
from ptdit.models import DiT, DiTConfig, PixArt, PixArtConfig, PTDiT

DIT = DiTConfig(depth=2, hidden_size=32, num_heads=4, patch_size=2, input_size=8, num_classes=10)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def random_model(cls, config, dtype=torch.float32):
    model = cls(config).to(dtype)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:            # keep frozen tables (DiT's positions) as they are
                p.copy_(torch.randn_like(p) * 0.1)
    return model


def same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)


#################################################################################
#                              Recognising formats                              #
#################################################################################

def test_facebook_dit_file(tmp_path):
    model = random_model(DiT, DIT)
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    loaded = load(tmp_path / "dit.pt", config={"num_heads": 4})
    assert isinstance(loaded, DiT) and loaded.config == DIT and same_weights(loaded, model)
    # a training checkpoint: the sampler's "ema" entry; heads from the sidecar JSON
    torch.save({"model": {}, "ema": model.state_dict(), "opt": {}}, tmp_path / "train.pt")
    (tmp_path / "train.json").write_text(json.dumps({"num_heads": 4}))
    assert same_weights(load(tmp_path / "train.pt"), model)


def test_diffusers_folder(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    theirs = diffusers.DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    # converted DiTs hold one embedder copied into every block; a random init does not
    theirs.transformer_blocks[1].norm1.emb.load_state_dict(
        theirs.transformer_blocks[0].norm1.emb.state_dict())
    theirs.save_pretrained(tmp_path / "single")
    theirs.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    assert list((tmp_path / "sharded").glob("*.index.json"))
    one, two = load(tmp_path / "single"), load(tmp_path / "sharded")
    assert isinstance(one, DiT) and same_weights(one, two)
    assert (one.config.depth, one.config.hidden_size, one.config.num_heads) == (2, 32, 2)
    assert one.config.num_classes == 10 and one.config.learn_sigma
    sd = theirs.state_dict()
    assert torch.equal(one.state_dict()["blocks.1.mlp.fc2.weight"],
                       sd["transformer_blocks.1.ff.net.2.weight"])
    # config= sets config.json keys; ptdit fields go under "ptdit_config"; nothing is ignored
    assert load(tmp_path / "single", config={"norm_eps": 1e-6}).config.norm_eps == 1e-6
    official = load(tmp_path / "single", config={"ptdit_config": {"freq_shift": 0}})
    assert (one.config.freq_shift, official.config.freq_shift) == (1, 0)
    for bad in ({"freq_shift": 0}, {"bogus_field": 1}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} are not diffusers-dit "
                           "config.json keys; allowed: .*num_layers.*ptdit_config"):
            load(tmp_path / "single", config=bad)
    with pytest.raises(ValueError, match="ptdit_config field.* depth cannot be set there; "
                       "allowed: freq_shift, class_dropout_prob"):
        load(tmp_path / "single", config={"ptdit_config": {"depth": 3}})


def test_official_ptdit_file_with_sidecar_predictor(tmp_path):
    sd = release_checkpoint(SMALL, dtype=torch.float32)
    save_file(sd, tmp_path / "qihoo.safetensors")
    (tmp_path / "qihoo.json").write_text(json.dumps({"predictor": SMALL}))  # the inference JSON
    model = load(tmp_path / "qihoo.safetensors")
    assert isinstance(model, PTDiT) and model.config.window == (1, 4, 4)
    assert same_weights(model, from_official_ptdit(sd, SMALL))
    x, t, text, _ = inputs(SMALL)
    with torch.no_grad():
        assert model(x.float(), t.float(), text.float()).shape == (2, 8, 1, 16, 16)


def test_config_argument_updates_the_sidecar(tmp_path):
    """A sidecar beside the file, and config= on top: the given fields win, the rest stay."""
    model = random_model(DiT, DiTConfig(**{**DIT.__dict__, "num_heads": 2,
                                           "class_dropout_prob": 0.0, "norm_eps": 1e-5}))
    save(model, tmp_path / "fb.safetensors", "facebook-dit")
    assert load(tmp_path / "fb.safetensors").config == model.config
    loaded = load(tmp_path / "fb.safetensors", config={"freq_shift": 1})
    assert loaded.config == DiTConfig(**{**model.config.__dict__, "freq_shift": 1})
    # the release's whole inference JSON as the sidecar; a flat predictor field updates it
    save_file(release_checkpoint(SMALL, dtype=torch.float32), tmp_path / "q.safetensors")
    (tmp_path / "q.json").write_text(json.dumps({"predictor": SMALL, "ae": {"from": "x"},
                                                 "ptdit_config": {"num_classes": 5}}))
    assert load(tmp_path / "q.safetensors").config.num_classes == 5
    again = load(tmp_path / "q.safetensors", config={"ptdit_config": {"windows_per_side": 2}})
    assert (again.config.num_classes, again.config.windows_per_side) == (1000, 2)
    with pytest.raises(ValueError, match="num_heads × head_dim = 16"):
        load(tmp_path / "q.safetensors", config={"cross_attention_dim": 8})


def test_official_ptdit_torch_file_with_config_argument(tmp_path):
    sd = release_checkpoint(SMALL, dtype=torch.float32)
    torch.save(sd, tmp_path / "qihoo.pth")
    with pytest.raises(ValueError, match="head_dim"):     # D=16: heads not inferable
        load(tmp_path / "qihoo.pth")
    assert same_weights(load(tmp_path / "qihoo.pth", config=SMALL),
                        from_official_ptdit(sd, SMALL))


def test_official_ptdit_config_inferred_from_shapes(tmp_path):
    pred = {**SMALL, "num_heads": 2, "head_dim": 72, "cross_attention_dim": 144,
            "compress_ratios": [1, 8, 8], "proxy_compress_ratios": [1, 8, 8], "num_layers": 1}
    save_file(release_checkpoint(pred, dtype=torch.float32), tmp_path / "wide.safetensors")
    model = load(tmp_path / "wide.safetensors")
    assert (model.config.num_heads, model.config.hidden_size) == (2, 144)


@pytest.mark.parametrize("family", ["DiT", "PixArt", "PT-DiT"])
def test_ptdit_format_reloads_alone(tmp_path, family):
    model = {"DiT": lambda: random_model(DiT, DIT),
             "PixArt": lambda: random_model(PixArt, PixArtConfig(
                 depth=1, hidden_size=32, num_heads=2, input_size=8, caption_channels=12,
                 model_max_length=4)),
             "PT-DiT": lambda: from_official_ptdit(release_checkpoint(SMALL), SMALL)}[family]()
    save(model, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors")
    assert type(loaded) is type(model) and loaded.config == model.config
    assert same_weights(loaded, model) and loaded.name is None
    with pytest.raises(ValueError, match="metadata holds its config; config= does not apply"):
        load(tmp_path / "m.safetensors", config={"num_heads": 4})


def test_a_name_is_the_registry_name_of_the_architecture(tmp_path):
    """build() names an overridden model after its registry entry; save and load name it by
    its architecture instead, so a 2-block DiT-S/8 does not come back as DiT-S/8."""
    small = ptdit.build("DiT-S/8", depth=2, input_size=16)
    assert small.name == "DiT-S/8"
    save(small, tmp_path / "small.safetensors")
    assert load(tmp_path / "small.safetensors").name is None
    with safe_open(str(tmp_path / "small.safetensors"), "pt") as f:
        assert f.metadata()["name"] == ""
    # a stored name is not trusted either
    save_file(small.state_dict(), tmp_path / "liar.safetensors",
              metadata=metadata(FORMATS["ptdit"].from_ptdit(small.config, {})[1], "DiT-S/8"))
    assert load(tmp_path / "liar.safetensors").name is None
    with pytest.raises(ValueError, match="is not DiT-S/8: depth: checkpoint 2, DiT-S/8 12"):
        load(tmp_path / "small.safetensors", name="DiT-S/8")


def test_a_name_allows_another_resolution(tmp_path):
    """DiT-XL-2-512x512.pt is DiT-XL/2 at input_size 64: the name check leaves the configured
    resolution out (here DiT-S/8, the same situation at a smaller size)."""
    model = ptdit.build("DiT-S/8", input_size=64, dtype=torch.bfloat16)
    torch.save(model.state_dict(), tmp_path / "DiT-S-8-512x512.pt")
    for name in ("DiT-S/8", None):
        loaded = load(tmp_path / "DiT-S-8-512x512.pt", name=name)
        assert loaded.name == "DiT-S/8" and loaded.config.input_size == 64
        assert same_weights(loaded, model)
    assert load(tmp_path / "DiT-S-8-512x512.pt", name="DiT-S/8").config == model.config
    with pytest.raises(ValueError, match="is not DiT-B/8: hidden_size: checkpoint 384, "
                       "DiT-B/8 768"):
        load(tmp_path / "DiT-S-8-512x512.pt", name="DiT-B/8")


@pytest.fixture
def tiny_registry(monkeypatch):
    """Registry entries of checkpoint sizes whose head count the weights cannot give: DIT's
    (depth, width) is no named DiT's, SMALL's width is no multiple of the release's head_dim."""
    entries = {"DiT-tiny": DIT,
               "PT-DiT/tiny": dataclasses.replace(ptdit_config(SMALL), window=None),
               "Qihoo-tiny": ptdit_config(SMALL)}
    for name, config in entries.items():
        monkeypatch.setitem(MODELS, name, Entry(config, "a test checkpoint size"))
    return entries


def test_a_name_gives_what_the_file_cannot_say(tmp_path, tiny_registry):
    model = random_model(DiT, DIT)
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    with pytest.raises(ValueError, match="load it with name="):
        load(tmp_path / "dit.pt")
    loaded = load(tmp_path / "dit.pt", name="DiT-tiny")
    assert loaded.name == "DiT-tiny" and loaded.config == DIT and same_weights(loaded, model)
    # what the file's own config says wins, and is then checked against the name
    with pytest.raises(ValueError, match="is not DiT-tiny: num_heads: checkpoint 2, DiT-tiny 4"):
        load(tmp_path / "dit.pt", name="DiT-tiny", config={"num_heads": 2})
    with pytest.raises(ValueError, match="holds a DiT model; PixArt-XL/2 is PixArt"):
        load(tmp_path / "dit.pt", name="PixArt-XL/2")

    # an official PT-DiT without its predictor JSON: heads and window from the name
    sd = release_checkpoint(SMALL, dtype=torch.float32)
    save_file(sd, tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="head_dim"):
        load(tmp_path / "q.safetensors")
    for name, config in tiny_registry.items():
        if name == "DiT-tiny":
            continue
        loaded = load(tmp_path / "q.safetensors", name=name)
        assert loaded.name == name and loaded.config == config
        assert same_weights(loaded, from_official_ptdit(sd, SMALL))
    with pytest.raises(ValueError, match="not divisible by 6 heads"):
        load(tmp_path / "q.safetensors", name="PT-DiT/S-Class")


def test_an_unknown_name_fails_before_any_file_is_read(tmp_path):
    with pytest.raises(ValueError, match="unknown model 'DiT-XL/3'; nearest: .*DiT-XL/2"):
        load(tmp_path / "nothing.pt", name="DiT-XL/3")


def test_one_unwrapping_for_every_format():
    """Training checkpoints: DiT's sampler takes "ema", PixArt's scripts "state_dict"; the
    converters unwrap as load does."""
    sd = random_model(DiT, DIT).state_dict()
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    for wrapped in (sd, {"model": other, "ema": sd, "opt": {}}, {"state_dict": sd,
                    "state_dict_ema": other}, {"model": sd}, {"module": sd}):
        assert unwrap(wrapped) == sd
        assert FORMATS["facebook-dit"].detect(wrapped, None)
        assert FORMATS["facebook-dit"].to_ptdit(wrapped, {"num_heads": 4})[1].keys() == sd.keys()
    pixart = random_model(PixArt, PixArtConfig(depth=1, hidden_size=32, num_heads=2,
                                               input_size=8, caption_channels=12,
                                               model_max_length=4))
    official = FORMATS["official-pixart"].from_ptdit(pixart.config, pixart.state_dict())[0]
    assert FORMATS["official-pixart"].detect({"ema": official}, None)


#################################################################################
#                                   Failures                                    #
#################################################################################

def test_a_sidecar_that_is_no_config_is_named(tmp_path):
    torch.save(random_model(DiT, DIT).state_dict(), tmp_path / "dit.pt")
    (tmp_path / "dit.json").write_text(json.dumps({"epochs": 10, "lr": 1e-4}))   # a log
    with pytest.raises(ValueError) as err:
        load(tmp_path / "dit.pt", config={"num_heads": 4})      # config= updates the sidecar
    msg = str(err.value)
    assert "has no option(s) epochs, lr" in msg
    assert f"{tmp_path / 'dit.json'} was read as the checkpoint's sidecar config" in msg


def test_save_refuses_what_is_no_ptdit_model(tmp_path):
    with pytest.raises(ValueError, match="the model is on the meta device .*no weights"):
        save(ptdit.build("DiT-S/8", device="meta"), tmp_path / "m.safetensors")
    with pytest.raises(ValueError, match="save writes ptdit models .* got a Linear"):
        save(torch.nn.Linear(2, 2), tmp_path / "m.safetensors")
    assert not list(tmp_path.iterdir())

def test_truncated_file_lists_missing_keys(tmp_path):
    sd = release_checkpoint(SMALL, dtype=torch.float32)
    for key in ("transformer_blocks.1.ff.net.2.weight", "proj_out.bias"):
        del sd[key]
    save_file(sd, tmp_path / "cut.safetensors")
    with pytest.raises(ValueError) as err:
        load(tmp_path / "cut.safetensors", config=SMALL)
    assert "missing keys (2): proj_out.bias, transformer_blocks.1.ff.net.2.weight" in str(
        err.value)


def test_truncated_dit_file_lists_missing_keys(tmp_path):
    sd = random_model(DiT, DIT).state_dict()
    del sd["blocks.1.mlp.fc1.bias"]
    torch.save(sd, tmp_path / "cut.pt")
    with pytest.raises(ValueError, match="blocks.1.mlp.fc1.bias"):
        load(tmp_path / "cut.pt", config={"num_heads": 4})


def test_shape_mismatch_is_listed(tmp_path):
    sd = release_checkpoint(SMALL, dtype=torch.float32)
    sd["transformer_blocks.0.attn1.to_k.weight"] = torch.zeros(16, 8)
    sd["caption_projection.linear_1.bias"] = torch.zeros(17)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(ValueError) as err:
        load(tmp_path / "bad.safetensors", config=SMALL)
    msg = str(err.value)
    assert "transformer_blocks.0.attn1.to_k.weight: checkpoint (16, 8), expected (16, 16)" in msg
    assert "caption_projection.linear_1.bias: checkpoint (17,), expected (16,)" in msg


def test_foreign_file_is_refused_with_the_formats_tried(tmp_path):
    save_file({"encoder.conv.weight": torch.zeros(3, 3), "decoder.bias": torch.zeros(3)},
              tmp_path / "vae.safetensors")
    with pytest.raises(ValueError) as err:
        load(tmp_path / "vae.safetensors")
    msg = str(err.value)
    assert "no known checkpoint format" in msg and "encoder.conv.weight" in msg
    assert all(name in msg for name in ("facebook-dit", "official-pixart", "official-ptdit"))
    with pytest.raises(ValueError) as err:                  # forced: every key is listed
        load(tmp_path / "vae.safetensors", format="official-ptdit", config=SMALL)
    msg = str(err.value)
    assert "unexpected keys (2): decoder.bias, encoder.conv.weight" in msg
    assert "missing keys" in msg and "proj_out.weight" in msg


def test_bad_paths_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load(tmp_path / "nothing.pt")
    (tmp_path / "w.npz").write_bytes(b"")
    with pytest.raises(ValueError, match="unknown checkpoint type"):
        load(tmp_path / "w.npz")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable"):
        load(tmp_path / "junk.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="config.json"):
        load(tmp_path / "empty")
    save_file(release_checkpoint(SMALL, dtype=torch.float32), tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="unknown format"):
        load(tmp_path / "q.safetensors", format="onnx", config=SMALL)


def test_name_is_checked(tmp_path):
    save_file(release_checkpoint(SMALL, dtype=torch.float32), tmp_path / "q.safetensors")
    with pytest.raises(ValueError, match="not Qihoo-T2I-1B: depth: checkpoint 2"):
        load(tmp_path / "q.safetensors", name="Qihoo-T2I-1B", config=SMALL)
    with pytest.raises(ValueError, match="holds a PT-DiT model; DiT-S/2 is DiT"):
        load(tmp_path / "q.safetensors", name="DiT-S/2", config=SMALL)


def test_damaged_files_name_the_file(tmp_path):
    """Truncated safetensors and torch files at several lengths, broken JSON: ValueError naming
    the file and what is wrong, never a raw library error."""
    model = random_model(DiT, DIT)
    save(model, tmp_path / "ok.safetensors")
    torch.save(model.state_dict(), tmp_path / "ok.pt")
    blob = (tmp_path / "ok.safetensors").read_bytes()
    header_only = 8 + int.from_bytes(blob[:8], "little")
    pt = (tmp_path / "ok.pt").read_bytes()
    for name, data, cut in [("st", blob, 0), ("st", blob, 5), ("st", blob, header_only),
                            ("st", blob, len(blob) // 2), ("st", blob, len(blob) - 1),
                            ("pt", pt, 0), ("pt", pt, 100), ("pt", pt, len(pt) // 2),
                            ("pt", pt, len(pt) - 1)]:
        path = tmp_path / f"cut{cut}.{'safetensors' if name == 'st' else 'pt'}"
        path.write_bytes(data[:cut])
        kind = "safetensors file" if name == "st" else "torch checkpoint"
        with pytest.raises(ValueError, match=f"{path}: not a readable {kind} \\({cut} bytes: "
                           "truncated"):
            load(path, config={"num_heads": 4})

    (tmp_path / "ok.json").write_text('{"num_heads": 4,')           # a sidecar, cut short
    with pytest.raises(ValueError, match=f"{tmp_path / 'ok.json'}: the sidecar config is not "
                       "valid JSON"):
        load(tmp_path / "ok.pt")
    (tmp_path / "ok.json").write_text('[4]')
    with pytest.raises(ValueError, match="the sidecar config must be a JSON object, got list"):
        load(tmp_path / "ok.pt")

    save(model, tmp_path / "hf", "diffusers-dit")
    (tmp_path / "hf" / "config.json").write_text('{"_class_name": "DiTTransformer2DModel"')
    with pytest.raises(ValueError, match="config.json: the diffusers config is not valid JSON"):
        load(tmp_path / "hf")


@pytest.mark.parametrize("field, value, message", [
    ("config", "{not json", "the ptdit metadata field 'config' is not valid JSON"),
    ("config", "[1, 2]", "a DiT config must be a JSON object of its fields, got list"),
    ("config", "4", "a DiT config must be a JSON object of its fields, got int"),
    ("config", {"depth": "2"}, "DiT config: depth must be int, got '2'"),
    ("config", {"norm_eps": "x"}, "DiT config: norm_eps must be float, got 'x'"),
    ("config", {"bogus_field": 1}, "DiT config has no option.* bogus_field"),
    ("family", "Unet", "unknown model family 'Unet'"),
])
def test_bad_ptdit_metadata(tmp_path, field, value, message):
    model = random_model(DiT, DIT)
    meta = metadata(FORMATS["ptdit"].from_ptdit(model.config, {})[1], None)
    if isinstance(value, dict):
        value = json.dumps({**json.loads(meta["config"]), **value})
    save_file(model.state_dict(), tmp_path / "m.safetensors", metadata={**meta, field: value})
    with pytest.raises(ValueError, match=f"m.safetensors.*{message}"):
        load(tmp_path / "m.safetensors")


def test_bad_config_field_types(tmp_path):
    sd = release_checkpoint(SMALL, dtype=torch.float32)
    model = from_official_ptdit(sd, SMALL)
    config = dict(json.loads(metadata(FORMATS["ptdit"].from_ptdit(model.config, {})[1],
                                      None)["config"]))
    for bad, word in (({"window": 5}, "window"), ({"norm_eps": 1e-5}, "norm_eps"),
                      ({"shift_window": "yes"}, "shift_window must be bool"),
                      ({"depth": 2.0}, "depth must be int")):
        meta = {"format": "ptdit", "family": "PT-DiT", "config": json.dumps({**config, **bad})}
        save_file(model.state_dict(), tmp_path / "m.safetensors", metadata=meta)
        with pytest.raises(ValueError, match=word):
            load(tmp_path / "m.safetensors")


#################################################################################
#                                    Dtypes                                     #
#################################################################################

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_dtype_preserved(tmp_path, dtype):
    save_file(release_checkpoint(SMALL, dtype=dtype), tmp_path / "q.safetensors")
    model = load(tmp_path / "q.safetensors", config=SMALL)
    assert {p.dtype for p in model.parameters()} == {dtype}
    torch.save(random_model(DiT, DIT, dtype).state_dict(), tmp_path / "dit.pt")
    assert {p.dtype for p in load(tmp_path / "dit.pt", config={"num_heads": 4}).parameters()
            } == {dtype}


def test_dtype_asked_for(tmp_path):
    save_file(release_checkpoint(SMALL, dtype=torch.bfloat16), tmp_path / "q.safetensors")
    model = load(tmp_path / "q.safetensors", config=SMALL, dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    model = load(tmp_path / "q.safetensors", config=SMALL, dtype="float16")
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    for bad in (torch.int64, "half", "cuda", torch.complex64, 16):
        with pytest.raises(ValueError, match="is not a model dtype; allowed: float32, bfloat16, "
                           "float16, float64"):
            load(tmp_path / "q.safetensors", config=SMALL, dtype=bad)


def test_every_format_is_registered():
    assert set(FORMATS) == {"facebook-dit", "diffusers-dit", "official-pixart",
                            "diffusers-pixart", "official-ptdit", "ptdit"}
    assert ptdit.load is load
