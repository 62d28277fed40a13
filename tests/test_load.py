"""`ptdit.load`: recognises each checkpoint kind, builds the right model in the right dtype, and
fails with every offending key listed. Every checkpoint is built here; the network is blocked."""

import json
import socket

import pytest
import torch
from safetensors.torch import save_file

import ptdit
from ptdit.configs import DiTConfig, PixArtConfig
from ptdit.interop import FORMATS, from_official_ptdit, load, save
from ptdit.models import DiT, PixArt, PTDiT
from test_interop_ptdit import SMALL, inputs, release_checkpoint

DIT = DiTConfig(depth=2, hidden_size=32, num_heads=4, patch_size=2, input_size=8, num_classes=10)


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to reach the network")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def random_model(cls, config, dtype=torch.float32):
    torch.manual_seed(0)
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
    torch.manual_seed(0)
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
    model.name = "my-run"
    save(model, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors")
    assert type(loaded) is type(model) and loaded.config == model.config
    assert same_weights(loaded, model) and loaded.name == "my-run"


#################################################################################
#                                   Failures                                    #
#################################################################################

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


def test_every_format_is_registered():
    assert set(FORMATS) == {"facebook-dit", "diffusers-dit", "official-pixart",
                            "diffusers-pixart", "official-ptdit", "ptdit"}
    assert ptdit.load is load
