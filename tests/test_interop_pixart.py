"""PixArt-α checkpoints: official `.pth` files and diffusers' PixArtTransformer2DModel.

Parity as in test_interop_dit.py: float64, every weight redrawn (scale tables, zero-initialised
cross-attention outputs and final layer included), diffusers' float32 islands lifted.
"""

import dataclasses

import pytest
import torch
from test_interop_dit import (  # noqa: F401
    TOL,
    assert_exact_round_trip,
    diffusers,
    float64_diffusers,  # (fixture)
    redraw,
)

from ptdit import PixArtConfig, get_config
from ptdit.interop.base import unwrap
from ptdit.interop.pixart import (
    DIFFUSERS_PIXART,
    OFFICIAL_PIXART,
    PIXART_RELEASES,
    default_interp_scale,
)
from ptdit.models import PixArt

SMALL = PixArtConfig(depth=2, hidden_size=48, num_heads=4, input_size=8, caption_channels=20,
                     model_max_length=6)
# (micro_condition, pos_interp_scale, norm_eps): a plain 256/512-like model and a 1024-MS-like one
VARIANTS = [(False, 1.0, 1e-6), (True, 2.0, 1e-5)]
SIZES = [(8, 8), (8, 16)]   # latent (height, width): configured square, and non-square


def pixart_inputs(batch: int, height: int, width: int, caption_channels: int, masked: bool):
    x = torch.randn(batch, 4, height, width, dtype=torch.float64)
    t = torch.rand(batch, dtype=torch.float64) * 1000
    text = torch.randn(batch, 5, caption_channels, dtype=torch.float64)
    mask = None
    if masked:
        mask = (torch.rand(batch, 5) < 0.6).long()
        mask[:, 0] = 1
    resolution = torch.tensor([[height * 8.0, width * 8.0]] * batch, dtype=torch.float64)
    aspect_ratio = resolution[:, :1] / resolution[:, 1:]
    return x, t, text, mask, resolution, aspect_ratio


def run_both(ours, theirs, micro: bool, height: int, width: int, masked: bool) -> float:
    x, t, text, mask, res, ar = pixart_inputs(2, height, width, ours.config.caption_channels,
                                              masked)
    cond = dict(resolution=res, aspect_ratio=ar) if micro else {}
    with torch.no_grad():
        a = ours(x, t, text, mask, **cond)
        b = theirs(x, text, t, added_cond_kwargs=cond or None,
                   encoder_attention_mask=mask).sample
    return (a - b).abs().max().item()


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("micro,scale,eps", VARIANTS)
def test_diffusers_to_ours_matches_diffusers(float64_diffusers, micro, scale, eps,  # noqa: F811
                                             height, width, masked):
    theirs = diffusers.PixArtTransformer2DModel(
        num_attention_heads=4, attention_head_dim=12, in_channels=4, out_channels=8,
        num_layers=2, cross_attention_dim=48, sample_size=8, caption_channels=20,
        interpolation_scale=scale, use_additional_conditions=micro, norm_eps=eps)
    redraw(theirs, keep=("pos_embed.pos_embed",))
    theirs = float64_diffusers(theirs)
    config, state_dict = DIFFUSERS_PIXART.to_ptdit(theirs.state_dict(), dict(theirs.config))
    assert (config.micro_condition, config.pos_interp_scale, config.norm_eps) == (micro, scale,
                                                                                  eps)
    ours = PixArt(config).double().eval()
    ours.load_state_dict(state_dict)
    diff = run_both(ours, theirs, micro, height, width, masked)
    print(f"diffusers->ours PixArt micro={micro} scale={scale} {height}x{width} "
          f"mask={masked}: max |diff| {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("masked", [False, True], ids=["no-mask", "mask"])
@pytest.mark.parametrize("height,width", SIZES)
@pytest.mark.parametrize("micro,scale,eps", VARIANTS)
def test_ours_to_diffusers_matches_ours(float64_diffusers, micro, scale, eps,  # noqa: F811
                                        height, width, masked):
    config = dataclasses.replace(SMALL, micro_condition=micro, pos_interp_scale=scale,
                                 norm_eps=eps, null_caption=False)
    ours = PixArt(config).double()
    redraw(ours)
    state_dict, config_json = DIFFUSERS_PIXART.from_ptdit(config, ours.state_dict())
    theirs = float64_diffusers(diffusers.PixArtTransformer2DModel.from_config(config_json))
    theirs.load_state_dict(state_dict)
    diff = run_both(ours.eval(), theirs, micro, height, width, masked)
    print(f"ours->diffusers PixArt micro={micro} scale={scale} {height}x{width} "
          f"mask={masked}: max |diff| {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("micro,scale", [(False, 1.0), (True, 2.0), (True, 3.0)])
@pytest.mark.parametrize("fmt", [OFFICIAL_PIXART, DIFFUSERS_PIXART], ids=lambda f: f.name)
def test_round_trip_is_exact(fmt, micro, scale):
    """Configs at non-default values, including those the format cannot say (official: the
    sidecar; diffusers: config.json's "ptdit_config"); 3.0 is no release's scale."""
    config = dataclasses.replace(SMALL, micro_condition=micro, pos_interp_scale=scale,
                                 norm_eps=1e-5, class_dropout_prob=0.2)
    if fmt is DIFFUSERS_PIXART:   # no null caption there; its length rides along
        config = dataclasses.replace(config, null_caption=False)
    else:                         # an MLP ratio the MLP width does not give: int(48·3.3) = 158
        config = dataclasses.replace(config, mlp_ratio=3.3)
    model = PixArt(config).double()
    redraw(model)
    assert_exact_round_trip(fmt, config, model)


def test_diffusers_drops_the_null_caption_with_a_warning():
    model = PixArt(SMALL)
    with pytest.warns(UserWarning, match=r"y_embedder.y_embedding \(6×20\) is dropped"):
        state_dict, config_json = DIFFUSERS_PIXART.from_ptdit(SMALL, model.state_dict())
    config, back = DIFFUSERS_PIXART.to_ptdit(state_dict, config_json)
    assert config == dataclasses.replace(SMALL, null_caption=False)
    assert back.keys() == model.state_dict().keys() - {"y_embedder.y_embedding"}


def test_official_file_loads(tmp_path):
    config = dataclasses.replace(SMALL, micro_condition=True, pos_interp_scale=2.0)
    model = PixArt(config)
    redraw(model)
    state_dict, _ = OFFICIAL_PIXART.from_ptdit(config, model.state_dict())
    assert state_dict["pos_embed"].shape == (1, 16, 48)
    torch.save({"state_dict": state_dict}, tmp_path / "PixArt-tiny.pth")
    loaded = torch.load(tmp_path / "PixArt-tiny.pth", weights_only=True)
    assert OFFICIAL_PIXART.detect(loaded, None)
    assert not DIFFUSERS_PIXART.detect(unwrap(loaded), None)
    back_config, back = OFFICIAL_PIXART.to_ptdit(loaded, {"num_heads": 4})
    assert back_config == config   # micro_condition, input_size and lewei scale read off the file
    with pytest.raises(ValueError, match="pos_interp_scale 1.0 does not match the stored"):
        OFFICIAL_PIXART.to_ptdit(loaded, {"num_heads": 4, "pos_interp_scale": 1.0})
    again = PixArt(back_config)
    again.load_state_dict(back)
    x, t, text, mask, res, ar = pixart_inputs(2, 8, 16, 20, True)
    args = (x.float(), t.float(), text.float(), mask)
    cond = dict(resolution=res.float(), aspect_ratio=ar.float())
    assert torch.equal(again.eval()(*args, **cond), model.eval()(*args, **cond))


def test_releases_and_registry_shapes():
    for name, release in PIXART_RELEASES.items():
        # the releases follow diffusers' default rule max(sample_size // 64, 1)
        assert release["pos_interp_scale"] == max(release["input_size"] // 64, 1)
        assert default_interp_scale(release["input_size"]) == release["pos_interp_scale"]
        named = get_config("PixArt-XL/2", input_size=release["input_size"],
                           pos_interp_scale=release["pos_interp_scale"],
                           micro_condition=release["micro_condition"])
        with torch.device("meta"):
            shapes = PixArt(named).state_dict()
        shapes["pos_embed"] = OFFICIAL_PIXART.from_ptdit(
            named, {"x_embedder.proj.weight": torch.zeros(1)})[0]["pos_embed"]
        config, _ = OFFICIAL_PIXART.to_ptdit(shapes, None)   # heads from the registry
        assert config == named, name


def test_rejects_foreign_truncated_and_missing_conditions():
    sd = PixArt(SMALL).state_dict()
    with pytest.raises(ValueError, match="input_size"):   # no pos_embed in our own dict
        OFFICIAL_PIXART.to_ptdit(sd, {"num_heads": 4})
    with pytest.raises(ValueError, match="name="):
        OFFICIAL_PIXART.to_ptdit(sd, {"input_size": 8})
    truncated = {k: v for k, v in sd.items() if not k.startswith("blocks.1.cross_attn")}
    with pytest.raises(ValueError, match="missing .*blocks.1.cross_attn.kv_linear.bias"):
        OFFICIAL_PIXART.to_ptdit(truncated, {"num_heads": 4, "input_size": 8})
    no_null = dataclasses.replace(SMALL, null_caption=False)
    theirs, config_json = DIFFUSERS_PIXART.from_ptdit(no_null, PixArt(no_null).state_dict())
    assert not OFFICIAL_PIXART.detect(theirs, None)
    assert not DIFFUSERS_PIXART.detect(sd, None)
    del theirs["transformer_blocks.1.attn2.to_v.weight"]
    with pytest.raises(ValueError, match="missing .*attn2.to_v.weight"):
        DIFFUSERS_PIXART.to_ptdit(theirs, config_json)

    micro = PixArt(dataclasses.replace(SMALL, micro_condition=True)).eval()
    x, t, text, mask, res, ar = pixart_inputs(2, 8, 8, 20, False)
    with pytest.raises(ValueError, match="micro_condition=True"):
        micro(x.float(), t, text.float())
    with pytest.raises(ValueError, match="micro_condition=False"):
        PixArt(SMALL)(x.float(), t, text.float(), resolution=res, aspect_ratio=ar)
    with pytest.raises(ValueError, match="divisible by 3"):
        dataclasses.replace(SMALL, hidden_size=64, micro_condition=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scale_is_read_off_a_half_precision_table(dtype):
    """The stored pos_embed is rounded to the checkpoint's dtype; the scale is still found."""
    config = dataclasses.replace(SMALL, pos_interp_scale=2.0)
    model = PixArt(config).to(dtype)
    state_dict, _ = OFFICIAL_PIXART.from_ptdit(config, model.state_dict())
    assert state_dict["pos_embed"].dtype == dtype
    assert OFFICIAL_PIXART.to_ptdit(state_dict, {"num_heads": 4})[0] == config
