"""DiT checkpoints: facebook `.pt` files and diffusers' DiTTransformer2DModel, both directions.

Parity runs in float64 on small random models whose every weight is redrawn (adaLN-Zero's zero
layers would hide whole branches). diffusers computes two steps in float32 even in a float64
model: the timestep sinusoid (`get_timestep_embedding`) and the patch embedder's position table
(`PatchEmbed` casts it with `.float()`). The fixture `float64_diffusers` lifts those two islands
to float64 with diffusers' own formulas, so what remains is the architecture and the mapping,
compared at 1e-10.
"""

import argparse
import dataclasses
import json
import math
import os
import types

import pytest
import torch

from ptdit import DiTConfig, get_config
from ptdit.interop import load, save
from ptdit.interop.base import unwrap
from ptdit.interop.dit import DIFFUSERS_DIT, FACEBOOK_DIT
from ptdit.models import DiT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
diffusers = pytest.importorskip("diffusers")
embeddings = pytest.importorskip("diffusers.models.embeddings")

TOL = 1e-10
SMALL = DiTConfig(depth=2, hidden_size=32, num_heads=4, patch_size=2, input_size=8,
                  num_classes=10)


def redraw(model: torch.nn.Module, std: float = 0.1, keep: tuple[str, ...] = ()) -> None:
    """Every parameter and floating buffer ~ N(0, std²), except the names in `keep`."""
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if t.is_floating_point() and name not in keep:
                t.copy_(torch.randn_like(t) * std)


def timestep_embedding_f64(timesteps, embedding_dim, flip_sin_to_cos=False,
                           downscale_freq_shift=1, scale=1, max_period=10000):
    """diffusers' get_timestep_embedding, computed in float64 instead of float32."""
    half = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float64,
                                                     device=timesteps.device)
    emb = torch.exp(exponent / (half - downscale_freq_shift))
    emb = scale * timesteps[:, None].double() * emb[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return emb


def patch_embed_f64(self, latent):
    """diffusers' PatchEmbed.forward (sin-cos branch) without its float32 cast of the table."""
    h, w = latent.shape[-2] // self.patch_size, latent.shape[-1] // self.patch_size
    x = self.proj(latent).flatten(2).transpose(1, 2)
    table = embeddings.get_2d_sincos_pos_embed(
        x.shape[-1], (h, w), base_size=self.base_size,
        interpolation_scale=self.interpolation_scale, device=x.device)
    return x + table.to(x.dtype)[None]


@pytest.fixture
def float64_diffusers(monkeypatch):
    """Returns a function that lifts a diffusers model's float32 islands to float64."""
    monkeypatch.setattr(embeddings, "get_timestep_embedding", timestep_embedding_f64)

    def lift(model):
        model.pos_embed.forward = types.MethodType(patch_embed_f64, model.pos_embed)
        return model.double().eval()
    return lift


class _Captured(Exception):
    pass


def final_tokens(model: torch.nn.Module, layer: torch.nn.Module, *args) -> torch.Tensor:
    """The output of `layer` (the last linear, (B, T, p·p·C)) when `model(*args)` runs; stops
    there, since diffusers' DiT unpatchify assumes a square token grid."""
    captured = {}

    def hook(module, inputs, output):
        captured["tokens"] = output
        raise _Captured

    handle = layer.register_forward_hook(hook)
    try:
        model(*args)
    except _Captured:
        pass
    finally:
        handle.remove()
    return captured["tokens"]


def diffusers_dit(norm_eps: float = 1e-5):
    return diffusers.DiTTransformer2DModel(
        num_attention_heads=4, attention_head_dim=8, in_channels=4, out_channels=8,
        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=norm_eps)


def share_block_embedders(model) -> None:
    """diffusers draws each block's copy of the timestep/class embedders separately; a converted
    checkpoint has one copy repeated, as here."""
    first = model.transformer_blocks[0].norm1.emb
    for block in model.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(first.state_dict())


def float64_dit(config: DiTConfig) -> DiT:
    """A float64 DiT with random weights and its sin-cos table computed in float64 (one built in
    float32 and cast keeps a float32-rounded table)."""
    model = DiT(config).double()
    model.initialize_weights()
    redraw(model, keep=("pos_embed",))   # the frozen sin-cos table stays a sin-cos table
    return model


def inputs(batch: int, height: int, width: int, num_classes: int):
    x = torch.randn(batch, 4, height, width, dtype=torch.float64)
    t = torch.rand(batch, dtype=torch.float64) * 1000
    y = torch.randint(0, num_classes + 1, (batch,))   # the null class included
    return x, t, y


# Latent sizes: the configured square one (stored table), a larger square and a non-square one.
# Off the configured size, coordinates are i·base/n; diffusers (like the official MAE-style code)
# computes them in float32, exact here because n/base is a power of two.
SIZES = [(8, 8), (16, 16), (8, 16)]


@pytest.mark.parametrize("height,width", SIZES)
def test_diffusers_to_ours_matches_diffusers(tmp_path, float64_diffusers, height, width):
    """Through the public API: the diffusers folder as saved, loaded by ptdit.load."""
    theirs = diffusers_dit()
    redraw(theirs, keep=("pos_embed.pos_embed",))
    share_block_embedders(theirs)
    theirs = float64_diffusers(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    ours = load(tmp_path / "hf")
    config = ours.config
    assert (config.norm_eps, config.freq_shift) == (1e-5, 1)   # what diffusers computes
    assert {p.dtype for p in ours.parameters()} == {torch.float64}

    x, t, y = inputs(2, height, width, config.num_classes)
    with torch.no_grad():
        a = final_tokens(ours, ours.final_layer, x, t, y)
        b = final_tokens(theirs, theirs.proj_out_2, x, t, y)
        diff = (a - b).abs().max().item()
        print(f"diffusers->ours DiT {height}x{width}: max |diff| {diff:.2e}")
        assert diff <= TOL
        if height == width:
            assert (ours(x, t, y) - theirs(x, t, y).sample).abs().max() <= TOL


@pytest.mark.parametrize("height,width", SIZES)
def test_ours_to_diffusers_matches_ours(tmp_path, float64_diffusers, height, width):
    """Through the public API: ptdit.interop.save, then diffusers' from_pretrained."""
    ours = float64_dit(dataclasses.replace(SMALL, norm_eps=1e-5, freq_shift=1)).eval()
    save(ours, tmp_path / "hf", "diffusers-dit")
    theirs = float64_diffusers(diffusers.DiTTransformer2DModel.from_pretrained(
        tmp_path / "hf", torch_dtype=torch.float64))

    x, t, y = inputs(3, height, width, SMALL.num_classes)
    with torch.no_grad():
        a = final_tokens(ours, ours.final_layer, x, t, y)
        b = final_tokens(theirs, theirs.proj_out_2, x, t, y)
    diff = (a - b).abs().max().item()
    print(f"ours->diffusers DiT {height}x{width}: max |diff| {diff:.2e}")
    assert diff <= TOL


def test_diffusers_config_round_trip():
    _, config_json = DIFFUSERS_DIT.from_ptdit(SMALL, DiT(SMALL).state_dict())
    theirs = diffusers.DiTTransformer2DModel.from_config(config_json)
    assert theirs.config.norm_eps == SMALL.norm_eps
    assert theirs.transformer_blocks[0].norm3.eps == SMALL.norm_eps
    assert set(theirs.state_dict()) == set(DIFFUSERS_DIT.from_ptdit(
        SMALL, DiT(SMALL).state_dict())[0])


def test_diffusers_keeps_what_config_json_cannot_say(tmp_path):
    """freq_shift 0 (the official DiT's) and another class dropout ride in config.json under
    "ptdit_config": diffusers builds the model and ignores the key, and keeps it through its
    own save_pretrained; ptdit reloads the same config."""
    config = dataclasses.replace(SMALL, freq_shift=0, class_dropout_prob=0.25)
    _, config_json = DIFFUSERS_DIT.from_ptdit(config, DiT(config).state_dict())
    assert config_json["ptdit_config"] == {"freq_shift": 0, "class_dropout_prob": 0.25}
    assert "ptdit_config" not in DIFFUSERS_DIT.from_ptdit(
        dataclasses.replace(SMALL, freq_shift=1), DiT(SMALL).state_dict())[1]
    model = float64_dit(config)
    save(model, tmp_path / "ours", "diffusers-dit")
    theirs = diffusers.DiTTransformer2DModel.from_pretrained(tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "theirs")
    assert json.loads((tmp_path / "theirs" / "config.json").read_text())["ptdit_config"] == (
        config_json["ptdit_config"])
    back = load(tmp_path / "theirs", dtype=torch.float64)
    assert back.config == config


@pytest.mark.parametrize("fmt", [FACEBOOK_DIT, DIFFUSERS_DIT], ids=lambda f: f.name)
def test_round_trip_is_exact(fmt):
    """Configs at non-default values, including the fields the format cannot say."""
    if fmt is DIFFUSERS_DIT:
        config = dataclasses.replace(SMALL, norm_eps=1e-5, freq_shift=0, class_dropout_prob=0.3)
    else:   # no null class, and an MLP ratio the MLP width does not give (int(32·3.3) = 105)
        config = dataclasses.replace(SMALL, norm_eps=1e-5, freq_shift=1, class_dropout_prob=0.0,
                                     mlp_ratio=3.3, learn_sigma=False)
    assert_exact_round_trip(fmt, config, float64_dit(config))


def assert_exact_round_trip(fmt, config, model):
    """ours -> fmt (through JSON, as on disk) -> ours gives the same config and tensors."""
    state_dict, config_json = fmt.from_ptdit(config, model.state_dict())
    assert fmt.detect(state_dict, config_json)
    back_config, back = fmt.to_ptdit(state_dict, json.loads(json.dumps(config_json)))
    assert back_config == config
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_facebook_sidecar_is_checked_against_the_shapes():
    config = dataclasses.replace(SMALL, class_dropout_prob=0.0)
    sd, sidecar = FACEBOOK_DIT.from_ptdit(config, DiT(config).state_dict())
    assert FACEBOOK_DIT.to_ptdit(sd, sidecar)[0].num_classes == 10
    # without the sidecar the table's last row would be read as the null class
    assert FACEBOOK_DIT.to_ptdit(sd, {"num_heads": 4})[0].num_classes == 9
    for bad, word in (({"mlp_ratio": 3.0}, "mlp_ratio"), ({"num_heads": 5}, "heads"),
                      ({"num_classes": 11}, "num_classes"), ({"norm_eps": "1e-5"}, "norm_eps"),
                      ({"class_dropout_prob": "0"}, "class_dropout_prob"),
                      ({"bogus_field": 1}, "bogus_field")):
        with pytest.raises(ValueError, match=word):
            FACEBOOK_DIT.to_ptdit(sd, {**sidecar, **bad})


@pytest.mark.parametrize("wrap", ["raw", "ema", "training"])
def test_facebook_file_loads(tmp_path, wrap):
    model = DiT(SMALL)
    redraw(model, keep=("pos_embed",))
    sd = model.state_dict()
    args = argparse.Namespace(model="DiT-S/2", image_size=64, num_classes=10, epochs=1400,
                              global_batch_size=256, results_dir="results", vae="ema")
    obj = {"raw": sd, "ema": {"ema": sd},   # train.py's checkpoint: args is a Namespace
           "training": {"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "ema": sd,
                        "opt": {}, "args": args}}[wrap]
    torch.save(obj, tmp_path / "DiT-tiny.pt")
    assert same_state(load(tmp_path / "DiT-tiny.pt", config={"num_heads": 4}), model)
    with torch.serialization.safe_globals([argparse.Namespace]):
        loaded = torch.load(tmp_path / "DiT-tiny.pt", weights_only=True)

    assert FACEBOOK_DIT.detect(loaded, None)
    assert not DIFFUSERS_DIT.detect(unwrap(loaded), None)
    config, state_dict = FACEBOOK_DIT.to_ptdit(loaded, {"num_heads": 4})
    assert config == SMALL
    again = DiT(config).eval()
    again.load_state_dict(state_dict)
    x, t, y = inputs(2, 8, 8, SMALL.num_classes)
    x, t = x.float(), t.float()
    assert torch.equal(again(x, t, y), model.eval()(x, t, y))


def same_state(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_facebook_infers_registry_heads_and_sizes():
    for name, input_size in (("DiT-XL/2", 32), ("DiT-XL/2", 64), ("DiT-S/8", 32)):
        named = get_config(name, input_size=input_size)
        with torch.device("meta"):
            shapes = DiT(named).state_dict()      # the released files' keys and shapes
        config, _ = FACEBOOK_DIT.to_ptdit(shapes, None)
        assert config == named


def test_facebook_rejects_foreign_and_truncated():
    sd = DiT(SMALL).state_dict()
    with pytest.raises(ValueError, match="name="):   # heads unknown for this size
        FACEBOOK_DIT.to_ptdit(sd, None)
    truncated = {k: v for k, v in sd.items() if k != "blocks.1.mlp.fc2.weight"}
    with pytest.raises(ValueError, match="missing .*blocks.1.mlp.fc2.weight"):
        FACEBOOK_DIT.to_ptdit(truncated, {"num_heads": 4})
    extra = {**sd, "blocks.0.attn.q_norm.weight": torch.zeros(8)}
    with pytest.raises(ValueError, match="unexpected .*q_norm"):
        FACEBOOK_DIT.to_ptdit(extra, {"num_heads": 4})
    with pytest.raises(ValueError, match="num_classes: checkpoint 10, given 1000"):
        FACEBOOK_DIT.to_ptdit(sd, {"num_heads": 4, "num_classes": 1000})
    foreign, _ = DIFFUSERS_DIT.from_ptdit(SMALL, sd)
    assert not FACEBOOK_DIT.detect(foreign, None)
    assert not FACEBOOK_DIT.detect({"weight": torch.zeros(1)}, None)


def test_diffusers_rejects_unshared_embedders_and_bad_input():
    theirs = diffusers_dit()
    redraw(theirs)          # each block's embedder copy drawn apart
    with pytest.raises(ValueError, match="differs between transformer_blocks 0 and"):
        DIFFUSERS_DIT.to_ptdit(theirs.state_dict(), dict(theirs.config))
    share_block_embedders(theirs)
    sd = theirs.state_dict()
    with pytest.raises(ValueError, match="config.json"):
        DIFFUSERS_DIT.to_ptdit(sd, None)
    truncated = {k: v for k, v in sd.items() if not k.startswith("transformer_blocks.1.ff")}
    with pytest.raises(ValueError, match="missing .*transformer_blocks.1.ff.net.2.bias"):
        DIFFUSERS_DIT.to_ptdit(truncated, dict(theirs.config))
    assert not DIFFUSERS_DIT.detect(DiT(SMALL).state_dict(), None)
    assert not DIFFUSERS_DIT.detect(sd, {"_class_name": "PixArtTransformer2DModel"})
