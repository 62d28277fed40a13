"""ptdit.complexity: the closed form against the built modules and the papers' own formulas."""

import math

import pytest
import torch

import ptdit
from ptdit import Workload
from ptdit import complexity as cx

MODELS = ptdit.list_models()


def workload(name, resolution, frames=None, batch=1, text_tokens=120, **overrides):
    return Workload(name, resolution, frames, batch, text_tokens, overrides=overrides)


@pytest.mark.parametrize("name", MODELS)
def test_parameters_equal_the_built_model(name):
    model = ptdit.build(name, device="meta")
    every, trainable = cx.parameters(workload(name, 256))
    assert every == sum(p.numel() for p in model.parameters())
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name, overrides", [
    ("PixArt-XL/2", dict(micro_condition=True)),            # PixArtMS size/aspect embedders
    ("PixArt-XL/2", dict(null_caption=False)),              # the null caption is a buffer
    ("PixArt-XL/2", dict(micro_condition=True, null_caption=False, learn_sigma=False)),
    ("DiT-S/2", dict(input_size=64, class_dropout_prob=0.0, mlp_ratio=2.7)),
    ("PT-DiT/S-Class", dict(giim=False, shift_window=False, num_classes=10)),
    ("PT-DiT/B", dict(condition="class", caption_channels=1024, learn_sigma=False)),
])
def test_parameters_equal_the_built_model_with_overrides(name, overrides):
    model = ptdit.build(name, device="meta", **overrides)
    every, trainable = cx.parameters(workload(name, 256, **overrides))
    assert every == sum(p.numel() for p in model.parameters())
    assert trainable == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_micro_condition_adds_the_size_embedders():
    """PixArtMS: csize (height, width) and ar (aspect ratio) embedders, each the timestep MLP at
    width D/3 (256 -> D/3 -> D/3), run on 2 and 1 scalars per sample."""
    D, batch = 1152, 3
    plain = cx.costs("PixArt-XL/2", 1024, batch=batch)
    ms = cx.costs("PixArt-XL/2", 1024, batch=batch, micro_condition=True)
    per_scalar_macs = 256 * D // 3 + (D // 3) ** 2
    assert ms["params"] - plain["params"] == 2 * (per_scalar_macs + 2 * D // 3) == 493_056
    assert ms["params"] == 611_349_152
    assert round((ms["linear_cond_gmacs"] - plain["linear_cond_gmacs"]) * 1e9) == \
        3 * batch * per_scalar_macs
    assert ms["attention_gmacs"] == plain["attention_gmacs"]


@pytest.mark.parametrize("dtype, size", [("float32", 4), ("bfloat16", 2), ("float16", 2),
                                         ("float64", 8), (torch.bfloat16, 2)])
def test_dtype_scales_activations_only(dtype, size):
    base = cx.costs("PT-DiT/B", 512, frames=4)
    row = cx.costs("PT-DiT/B", 512, frames=4, dtype=dtype)
    assert row["dtype"] == str(dtype).removeprefix("torch.")
    assert base["dtype"] == "float32"
    assert row["activation_mib"] == base["activation_mib"] * size / 4
    assert row["attn_scores_mib"] == base["attn_scores_mib"] * size / 4
    assert {k: v for k, v in row.items() if k not in ("dtype", "activation_mib",
                                                      "attn_scores_mib")} == \
        {k: v for k, v in base.items() if k not in ("dtype", "activation_mib",
                                                    "attn_scores_mib")}


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("resolution, text_tokens", [(256, 1), (1024, 300)])
def test_conventions_are_consistent(name, resolution, text_tokens):
    row = cx.costs(name, resolution, text_tokens=text_tokens)
    linear = sum(row[f"linear_{c}_gmacs"] for c in cx.LINEAR_CATEGORIES)
    attention = sum(row[f"attn_{k}_gmacs"] for k in cx.ATTENTION_CATEGORIES)
    assert row["linear_gmacs"] == pytest.approx(linear, rel=1e-12)
    assert row["attention_gmacs"] == pytest.approx(attention, rel=1e-12)
    assert row["total_gmacs"] == pytest.approx(linear + attention, rel=1e-12)
    assert row["total_gflops"] == 2 * row["total_gmacs"]


@pytest.mark.parametrize("name", MODELS)
def test_macs_are_linear_in_batch(name):
    batch = 7
    one = cx.macs(workload(name, 512, frames=8, batch=1))
    many = cx.macs(workload(name, 512, frames=8, batch=batch))
    assert many == {k: batch * v for k, v in one.items()}


@pytest.mark.parametrize("resolution", [256, 512, 1024, 2048])
def test_global_attention_is_eq3(resolution):
    """Eq. 3: 2·N²·D per block for global self-attention (DiT)."""
    c = ptdit.get_config("DiT-XL/2")
    work = workload("DiT-XL/2", resolution)
    N = work.shape.tokens
    assert cx.macs(work)["attn_global"] == c.depth * 2 * N * N * c.hidden_size


@pytest.mark.parametrize("resolution", [256, 512, 1024, 2048])
def test_ptdit_attention_is_eq4(resolution):
    """Eq. 4: 2·(1/P² + 1/P + 2P/N)·N²·D per block for proxy SA + proxy CA + WSA + SWSA."""
    c = ptdit.get_config("PT-DiT/XL")
    work = workload("PT-DiT/XL", resolution)
    N, P = work.shape.tokens, math.prod(work.window)
    m = cx.macs(work)
    giim_tcm = m["attn_proxy"] + m["attn_proxy_cross"] + m["attn_window"] + m["attn_shift_window"]
    # 2·(N/P)²·D + 2·N²/P·D + 4·N·P·D, all integers
    assert giim_tcm == c.depth * (2 * (N // P) ** 2 + 2 * N * N // P + 4 * N * P) * c.hidden_size
    assert m["attn_text_cross"] == c.depth * 2 * N * 120 * c.hidden_size


def test_block_linear_coefficients():
    """Per block and token: PixArt 14·D² (+2·D² per text token), PT-DiT 22·D²
    (docs/paper.md §5)."""
    for name, per_token in (("PixArt-XL/2", 14), ("PT-DiT/XL", 22)):
        c = ptdit.get_config(name)
        a, b = cx.macs(workload(name, 512)), cx.macs(workload(name, 1024))
        block = ("linear_attn_proj", "linear_mlp")
        slope = sum(b[k] - a[k] for k in block) / (4096 - 1024)
        assert slope == per_token * c.depth * c.hidden_size**2
    base = cx.macs(workload("PixArt-XL/2", 256, text_tokens=120))
    more = cx.macs(workload("PixArt-XL/2", 256, text_tokens=121))
    D = 1152
    assert more["linear_attn_proj"] - base["linear_attn_proj"] == 28 * 2 * D * D
    assert more["linear_cond"] - base["linear_cond"] == 4096 * D + D * D


def test_class_models_ignore_text_tokens():
    assert cx.costs("DiT-B/2", 256, text_tokens=7) == cx.costs("DiT-B/2", 256)
    assert cx.costs("PT-DiT/S-Class", 256)["text_tokens"] == 0


def test_instant_at_any_size():
    row = cx.costs("PT-DiT/H", 4096, frames=256)
    assert row["tokens"] == 256 * 256 * 256
    assert row["latent_frames"] == 256 and row["window"] == "4x32x32"
    assert row["total_gmacs"] > row["linear_gmacs"] > 0


def test_window_override():
    default = cx.costs("PT-DiT/XL", 1024)
    fixed = cx.costs("PT-DiT/XL", 1024, window=(1, 4, 4))
    assert (default["window"], fixed["window"]) == ("1x8x8", "1x4x4")
    assert fixed["attn_window_gmacs"] == default["attn_window_gmacs"] / 4
    assert fixed["linear_mlp_gmacs"] == default["linear_mlp_gmacs"]


@pytest.mark.parametrize("kwargs, message", [
    (dict(name="PT-DiT/XXL", resolution=256), "nearest: PT-DiT/XL"),
    (dict(name="DiT-XL/2", resolution=260), "nearest valid: 256 or 264 px"),
    (dict(name="DiT-XL/2", resolution=264), "not divisible by patch 2"),
    (dict(name="PT-DiT/XL", resolution=320), "(256 or 384 px)"),
    (dict(name="PT-DiT/XL", resolution=256, frames=6), "temporal window 4"),
    (dict(name="DiT-XL/2", resolution=256, frames=0), "positive integer"),
    (dict(name="DiT-XL/2", resolution=256, frames=-4), "positive integer"),
    (dict(name="DiT-XL/2", resolution=256, batch=0), "batch must be a positive integer"),
    (dict(name="DiT-XL/2", resolution=-256), "resolution must be a positive integer"),
    (dict(name="PixArt-XL/2", resolution=256, text_tokens=0), "text_tokens"),
    (dict(name="DiT-XL/2", resolution=256, window=(1, 2, 2)), "no option(s) window"),
    (dict(name="DiT-XL/2", resolution=256, dtype="int8"), "allowed: float32, bfloat16"),
    (dict(name="PixArt-XL/2", resolution=256, hidden_size=1024, num_heads=16,
          micro_condition=True), "divisible by 3"),
])
def test_bad_input_raises_with_what_is_allowed(kwargs, message):
    name, resolution = kwargs.pop("name"), kwargs.pop("resolution")
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        cx.costs(name, resolution, **kwargs)
