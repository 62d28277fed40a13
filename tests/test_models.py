"""The three models: parameter counts, official names, batch independence, shapes, bad input."""

import json
import pathlib

import pytest
import torch

import ptdit
from bench.catalog import describe
from ptdit.attention import attention_backend, observe

from conftest import SMALL, Ops, condition, forward_inputs, randomize, small_model

# Every key and shape of the released 1B checkpoint (docs/ptdit_release.md §1).
RELEASE_KEYS = pathlib.Path(__file__).parent / "data" / "official_ptdit_1b_keys.json"

# Parameters (M) of the official facebookresearch/DiT models, measured with its models.py
# (docs/baselines.md §1.2; the frozen pos_embed counted, as the official code does).
DIT_PARAMS_M = {
    "DiT-S/8": 33.15, "DiT-S/4": 32.95, "DiT-S/2": 32.96, "DiT-B/8": 130.88, "DiT-B/4": 130.48,
    "DiT-B/2": 130.51, "DiT-L/8": 458.59, "DiT-L/4": 458.05, "DiT-L/2": 458.10,
    "DiT-XL/8": 675.68, "DiT-XL/4": 675.07, "DiT-XL/2": 675.13,
}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", DIT_PARAMS_M)
def test_dit_parameters_match_official(name):
    assert abs(n_params(ptdit.build(name, device="meta")) / 1e6 / DIT_PARAMS_M[name] - 1) < 5e-4


def test_dit_frozen_position_table_is_a_parameter_as_in_the_official_code():
    model = ptdit.build("DiT-XL/2", device="meta")
    assert not model.pos_embed.requires_grad and model.pos_embed.shape == (1, 256, 1152)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    assert frozen == 256 * 1152
    assert ptdit.build("DiT-XL/2", device="meta", input_size=64).pos_embed.shape[1] == 1024


def test_pixart_parameters():
    # measured on the official-structure PixArtTransformer2DModel (docs/baselines.md §2.4)
    assert abs(n_params(ptdit.build("PixArt-XL/2", device="meta")) / 1e6 / 610.9 - 1) < 1e-4


def test_qihoo_1b_matches_the_release_exactly():
    release = json.loads(RELEASE_KEYS.read_text())
    model = ptdit.build("Qihoo-T2I-1B", device="meta")
    assert n_params(model) == release["total_parameters"] == 1_131_629_216
    ours_per_module = {  # release submodule -> ours (names differ; the interop maps keys)
        "scale_shift_table": "scale_shift_table", "proxy_scale_shift_table":
        "shift_scale_shift_table", "proxy_attn1": "proxy_attn", "attn1": "attn",
        "pvisual_attn2": "proxy_cross_attn", "attn2": "cross_attn", "attn3": "shift_attn",
        "linear_2": "shift_out", "ff": "mlp", "linear_1_visual": "proxy_out"}
    block = model.blocks[0]
    for theirs, count in release["parameters_per_transformer_block_by_submodule"].items():
        part = getattr(block, ours_per_module[theirs])
        got = part.numel() if isinstance(part, torch.nn.Parameter) else n_params(part)
        assert got == count, theirs
    assert n_params(block) == release["parameters_per_transformer_block"]
    top = release["parameters_by_top_level_module"]
    assert n_params(model.x_embedder) == top["pos_embed"]
    assert n_params(model.t_embedder) + n_params(model.t_block) == top["adaln_single"]
    assert n_params(model.y_embedder) == top["caption_projection"]
    assert n_params(model.final_layer) == top["proj_out"] + top["scale_shift_table"]


def test_ptdit_xl_within_one_percent_of_table_4_and_others_shown_beside_it():
    assert abs(n_params(ptdit.build("PT-DiT/XL", device="meta")) / 1142e6 - 1) < 0.01
    for name, ours in (("PT-DiT/B", 153.8), ("PT-DiT/L", 637.7), ("PT-DiT/H", 1890.7)):
        row = describe(name)   # the released block at Table 4's widths
        assert abs(row["params_m"] - ours) < 0.1
        assert row["params_diff_pct"] == pytest.approx(
            100 * (row["params_m"] / row["paper_params_m"] - 1), abs=0.01)


def test_official_dit_parameter_names():
    names = set(ptdit.build("DiT-S/8", device="meta", depth=1).state_dict())
    expected = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
                "y_embedder.embedding_table.weight", "final_layer.linear.weight",
                "final_layer.linear.bias", "final_layer.adaLN_modulation.1.weight",
                "final_layer.adaLN_modulation.1.bias"}
    expected |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    expected |= {f"blocks.0.{m}.{p}" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2",
                                               "adaLN_modulation.1") for p in ("weight", "bias")}
    assert names == expected


def test_official_pixart_parameter_names():
    names = set(ptdit.build("PixArt-XL/2", device="meta", depth=1).state_dict())
    expected = {"x_embedder.proj.weight", "x_embedder.proj.bias", "t_block.1.weight",
                "t_block.1.bias", "y_embedder.y_embedding", "final_layer.linear.weight",
                "final_layer.linear.bias", "final_layer.scale_shift_table",
                "blocks.0.scale_shift_table"}
    expected |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    expected |= {f"y_embedder.y_proj.{m}.{p}" for m in ("fc1", "fc2") for p in ("weight", "bias")}
    expected |= {f"blocks.0.{m}.{p}" for m in (
        "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear", "cross_attn.proj",
        "mlp.fc1", "mlp.fc2") for p in ("weight", "bias")}
    assert names == expected


def test_layer_norms_have_no_affine_and_eps_1e6():
    for name in ("DiT-S/8", "PixArt-XL/2", "PT-DiT/B"):
        norms = [m for m in ptdit.build(name, device="meta").modules()
                 if isinstance(m, torch.nn.LayerNorm)]
        assert norms and all(not m.elementwise_affine and m.eps == 1e-6 for m in norms)


@pytest.mark.parametrize("family", ["DiT", "PixArt", "PT-DiT", "PT-DiT-class"])
@pytest.mark.parametrize("video", [False, True])
def test_batch_equals_samples_one_at_a_time(family, video):
    """Different timesteps and conditions per sample: no sample leaks into another (the
    released PT-DiT mixes samples' modulation here; ours must not)."""
    model = small_model(family)
    shape = (2, 4, 8, 16, 16) if video else (2, 4, 16, 32)
    x = torch.randn(*shape, dtype=torch.float64)
    t = torch.tensor([17.0, 801.0], dtype=torch.float64)
    cond = condition(model, 2)
    with torch.no_grad():
        batched = model(x, t, *cond)
        for i in range(2):
            single = model(x[i:i + 1], t[i:i + 1], *(c[i:i + 1] for c in cond))
            assert (batched[i:i + 1] - single).abs().max() <= 1e-10
    assert batched.shape == (shape[0], 8, *shape[2:])
    assert batched.std() > 1e-3  # the random weights make every branch contribute


def test_zero_initialised_proxy_and_shift_projections_change_nothing():
    """With proxy_out and shift_out at zero (their init), the GIIM and shifted-window branches
    are exactly the identity: equal to the model built without them."""
    full = small_model("PT-DiT")
    for block in full.blocks:
        for layer in (block.proxy_out, block.shift_out):
            torch.nn.init.zeros_(layer.weight)
            torch.nn.init.zeros_(layer.bias)
    bare = ptdit.build("PT-DiT/XL", dtype=torch.float64, giim=False, shift_window=False,
                       **SMALL["PT-DiT"][1])
    missing, unexpected = bare.load_state_dict(full.state_dict(), strict=False)
    assert not missing and unexpected  # bare lacks exactly the branch weights
    x, t, *cond = forward_inputs(full, (2, 4, 32, 32))
    with torch.no_grad():
        assert torch.equal(full(x, t, *cond), bare(x, t, *cond))
        randomize(full.blocks[0].shift_out)  # and the branch does act once trained
        assert (full(x, t, *cond) - bare(x, t, *cond)).abs().max() > 1e-6


def test_new_ptdit_has_identity_branches_at_init():
    """As released: both branch-closing projections start at zero in every block."""
    model = ptdit.build("PT-DiT/S-Class", depth=3)
    for block in model.blocks:
        for layer in (block.proxy_out, block.shift_out):
            assert layer.weight.abs().max() == 0 and layer.bias.abs().max() == 0


@pytest.mark.parametrize("family", ["DiT", "PixArt", "PT-DiT"])
def test_math_backend_matches_sdpa_in_whole_models(family):
    model = small_model(family)
    x, t, *cond = forward_inputs(model, (2, 4, 16, 16))
    kinds = []
    with torch.no_grad():
        ref = model(x, t, *cond)
        with attention_backend(model, "math"), observe(model, lambda call, probs:
                                                       kinds.append(call.kind)):
            assert (model(x, t, *cond) - ref).abs().max() <= 1e-10
    expected = {"DiT": {"global"}, "PixArt": {"global", "text_cross"},
                "PT-DiT": {"proxy", "proxy_cross", "window", "shift_window", "text_cross"}}
    assert set(kinds) == expected[family]


def meta_inputs(model, shape):
    x = torch.empty(shape, device="meta")
    t = torch.empty(shape[0], device="meta")
    cfg = model.config
    if cfg.family == "DiT" or getattr(cfg, "condition", "text") == "class":
        return x, t, torch.zeros(shape[0], dtype=torch.int64, device="meta")
    return x, t, torch.empty(shape[0], 120, cfg.caption_channels, device="meta")


# Shapes on meta: one block, as every block of a model is the same; the shape logic (patching,
# position tables, window schedule, unpatchify) sits around the blocks.

@pytest.mark.parametrize("name", ptdit.list_models())
def test_every_model_runs_on_meta_at_256_to_2048_px(name):
    model = ptdit.build(name, device="meta", depth=1)
    for px in (256, 512, 1024, 2048):
        out = model(*meta_inputs(model, (1, 4, px // 8, px // 8)))
        assert out.shape == (1, 8, px // 8, px // 8)


@pytest.mark.parametrize("name", ["DiT-XL/2", "PixArt-XL/2", "PT-DiT/XL", "PT-DiT/H"])
@pytest.mark.parametrize("frames,px", [(4, 256), (16, 512), (48, 256), (48, 1024)])
def test_video_shapes_on_meta(name, frames, px):
    model = ptdit.build(name, device="meta", depth=1)
    out = model(*meta_inputs(model, (1, 4, frames, px // 8, px // 8)))
    assert out.shape == (1, 8, frames, px // 8, px // 8)


@pytest.mark.parametrize("name", ["DiT-S/2", "DiT-S/4", "DiT-S/8", "PT-DiT/S-Class"])
def test_small_named_models_run_on_cpu(name):
    model = ptdit.build(name).eval()
    randomize(model, std=0.02)
    x = torch.randn(2, 4, 32, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([3.0, 999.0]), torch.randint(0, 1000, (2,)))
    assert out.shape == (2, 8, 32, 32) and torch.isfinite(out).all()


def test_ptdit_b_text_model_runs_on_cpu():
    model = randomize(ptdit.build("PT-DiT/B", depth=2).eval(), std=0.02)
    x = torch.randn(1, 4, 4, 32, 32)
    with torch.no_grad():
        out = model(x, torch.tensor([500.0]), torch.randn(1, 120, 4096), torch.ones(1, 120))
    assert out.shape == (1, 8, 4, 32, 32) and torch.isfinite(out).all()


def test_window_schedule_follows_the_paper():
    cfg = ptdit.get_config("PT-DiT/XL")
    for px, window in ((256, (1, 2, 2)), (512, (1, 4, 4)), (1024, (1, 8, 8)),
                       (2048, (1, 16, 16))):
        assert cfg.window_for((1, px // 16, px // 16)) == window
    assert cfg.window_for((48, 32, 32)) == (4, 4, 4)
    assert cfg.window_for((1, 32, 64)) == (1, 4, 8)            # non-square: 8x8 windows
    assert ptdit.get_config("Qihoo-T2I-1B").window_for((1, 16, 16)) == (1, 8, 8)
    assert ptdit.get_config("PT-DiT/XL", window=(2, 4, 4)).window_for((8, 64, 64)) == (2, 4, 4)


def test_explicit_window_overrides_the_schedule():
    """The window each window-kind attention call ran with, as its call record says: the
    override, not the schedule's (2x2 windows per side of an 8x8 grid: 4x4 tokens)."""
    x, t, *cond = forward_inputs(small_model("PT-DiT"), (1, 4, 16, 16))
    used = {}
    for window in ((1, 4, 2), None):
        model = small_model("PT-DiT", window=window)
        calls = []
        with torch.no_grad(), attention_backend(model, "math"), \
                observe(model, lambda call, probs, calls=calls: calls.append((call, probs.shape)),
                        kinds=["window", "shift_window"]):
            model(x, t, *cond)
        assert {call.grid for call, _ in calls} == {(1, 8, 8)}
        used[window] = {(call.window, shape[-1]) for call, shape in calls}
    assert used[(1, 4, 2)] == {((1, 4, 2), 8)}                 # keys per row: 4·2 tokens
    assert used[None] == {((1, 4, 4), 16)}


def test_four_and_five_dimensional_images_agree():
    model = small_model("PT-DiT")
    x = torch.randn(1, 4, 16, 16, dtype=torch.float64)
    t = torch.tensor([250.0], dtype=torch.float64)
    cond = condition(model, 1)
    with torch.no_grad():
        assert torch.equal(model(x, t, *cond), model(x[:, :, None], t, *cond)[:, :, 0])


# ---------------------------------------------------------------------- bad input ---------

def test_unknown_model_names_the_nearest():
    with pytest.raises(ValueError, match=r"unknown model 'DiT-XL2'.*nearest: DiT-XL/2"):
        ptdit.build("DiT-XL2")
    with pytest.raises(ValueError, match=r"has no option\(s\) widht; allowed: .*hidden_size"):
        ptdit.build("DiT-S/2", device="meta", widht=3)


def test_several_proxies_per_window_are_refused():
    with pytest.raises(ValueError, match=r"proxies_per_window=4 is not supported.*Allowed: 1"):
        ptdit.build("PT-DiT/XL", device="meta", proxies_per_window=4)


@pytest.mark.parametrize("name,hw,match", [
    ("DiT-XL/2", (33, 32), r"latent height 33 \(264 px\) is not divisible by patch 2.*nearest "
                           r"valid: 32 or 34"),
    ("DiT-S/8", (32, 20), r"latent width 20 .*multiples of 8 latent pixels.*nearest valid: 16 "
                          r"or 24"),
    ("PT-DiT/XL", (40, 40), r"latent height 40 \(320 px\) is not divisible by patch 2 × "
                            r"windows per side 8 = 16.*nearest valid: 32 or 48 latent pixels "
                            r"\(256 or 384 px\)"),
    ("PT-DiT/XL", (32, 33), r"latent width 33 .*nearest valid: 32 or 48 latent pixels"),
    ("Qihoo-T2I-1B", (32, 40), r"latent width 40 .* patch 2 × window 8 = 16.*nearest valid: "
                               r"32 or 48"),
])
def test_resolution_the_grid_does_not_divide(name, hw, match):
    model = ptdit.build(name, device="meta")
    with pytest.raises(ValueError, match=match):
        model(*meta_inputs(model, (1, 4, *hw)))


def test_frames_the_temporal_window_does_not_divide():
    model = ptdit.build("PT-DiT/XL", device="meta")
    with pytest.raises(ValueError, match=r"6 latent frames are not divisible by the temporal "
                                         r"window 4.*nearest valid: 4 or 8"):
        model(*meta_inputs(model, (1, 4, 6, 32, 32)))


@pytest.mark.parametrize("family", ["DiT", "PixArt", "PT-DiT"])
def test_empty_and_odd_inputs(family):
    model = small_model(family)
    x = torch.randn(1, 4, 16, 16, dtype=torch.float64)
    cond = condition(model, 1)
    with torch.no_grad():   # a Python number is a timestep for the whole batch
        assert torch.equal(model(x, 500.0, *cond),
                           model(x, torch.tensor([500.0], dtype=torch.float64), *cond))
    with pytest.raises(ValueError, match=r"timesteps must be a number or a \(1,\) tensor"):
        model(x, "late", *cond)
    with pytest.raises(ValueError, match=r"latents must be non-empty"):
        model(torch.randn(1, 4, 0, 16, 16, dtype=torch.float64), 1.0, *cond)
    with pytest.raises(ValueError, match=r"latents must be non-empty"):
        model(torch.randn(1, 4, 0, 0, dtype=torch.float64), 1.0, *cond)
    if len(cond) == 2:
        with pytest.raises(ValueError, match=r"at least one token"):
            model(x, 1.0, cond[0][:, :0], None)


@pytest.mark.parametrize("name,override,match", [
    ("DiT-S/2", dict(depth=0), r"depth must be a positive integer, got 0"),
    ("DiT-S/2", dict(depth=2.5), r"depth must be a positive integer, got 2.5"),
    ("DiT-S/2", dict(num_heads=6.0), r"num_heads must be a positive integer"),
    ("DiT-S/2", dict(mlp_ratio=0), r"mlp_ratio must be a positive number"),
    ("DiT-S/2", dict(class_dropout_prob=-1), r"class_dropout_prob must be a probability"),
    ("DiT-S/2", dict(input_size=33), r"input_size 33 is not a multiple of patch 2; nearest valid: "
                                     r"32 or 34"),
    ("DiT-S/8", dict(input_size=4), r"input_size 4 is not a multiple of patch 8"),
    ("PT-DiT/XL", dict(windows_per_side=2.5), r"windows_per_side must be a positive integer"),
    ("DiT-S/2", dict(num_heads=5), r"width 384 is not divisible by 5 heads"),
    ("PixArt-XL/2", dict(hidden_size=1150, num_heads=2), r"multiple of 4 .*nearest valid: 1148"),
    ("PT-DiT/XL", dict(hidden_size=1160, num_heads=8), r"multiple of 16 .*1152 or 1168"),
    ("PT-DiT/XL", dict(windows_per_side=0), r"windows_per_side must be a positive integer"),
    ("PT-DiT/XL", dict(temporal_window=0), r"temporal_window must be a positive integer"),
    ("PT-DiT/XL", dict(window=(True, 2, 2)), r"window must be three positive ints"),
    ("PT-DiT/XL", dict(condition="image"), r"condition must be 'text' or 'class'"),
    # configs that used to build and give all-NaN outputs, zero-width layers or raw errors
    ("DiT-S/2", dict(norm_eps=float("nan")), r"norm_eps must be a positive number \(finite\)"),
    ("PixArt-XL/2", dict(pos_interp_scale=float("nan")), r"pos_interp_scale must be a positive"),
    ("PT-DiT/XL", dict(pos_interp_scale=float("inf")), r"pos_interp_scale must be a positive"),
    ("DiT-S/2", dict(freq_shift=128), r"freq_shift must be 0 or 1, got 128"),
    ("DiT-S/2", dict(mlp_ratio=0.001), r"mlp_ratio 0.001 gives an MLP of .* = 0 units; allowed: "
                                       r"mlp_ratio >= 0.0026"),
    ("DiT-S/2", dict(mlp_ratio=float("inf")), r"mlp_ratio must be a positive number"),
    ("DiT-S/2", dict(class_dropout_prob=float("nan")), r"class_dropout_prob must be a probab"),
    ("PT-DiT/XL", dict(window=4), r"window must be three positive ints .*got 4"),
    ("PT-DiT/XL", dict(window="1x8x8"), r"window must be three positive ints"),
    ("DiT-S/2", dict(learn_sigma="no"), r"learn_sigma must be True or False, got 'no'"),
    ("PT-DiT/XL", dict(giim=1), r"giim must be True or False, got 1"),
    ("PixArt-XL/2", dict(micro_condition="yes"), r"micro_condition must be True or False"),
    # a hint satisfies every rule at once: multiples of lcm(7 heads, 16)
    ("PT-DiT/XL", dict(num_heads=7), r"width 1152 is not divisible by 7 heads; allowed: "
                                     r"multiples of 112 .*nearest valid: 1120 or 1232"),
])
def test_bad_configurations(name, override, match):
    with pytest.raises(ValueError, match=match):
        ptdit.build(name, device="meta", **override)


def test_dtype_names_and_bad_dtypes():
    assert ptdit.build("DiT-S/8", device="meta", dtype="bfloat16").pos_embed.dtype == \
        torch.bfloat16
    with pytest.raises(ValueError, match=r"dtype torch.int64 is not a model dtype; allowed: "
                                         r"float32, bfloat16, float16, float64"):
        ptdit.build("DiT-S/8", device="meta", dtype=torch.int64)


def test_labels_must_be_rows_of_the_label_table():
    """Without label dropout there is no null class: label num_classes is out of range."""
    with_null = small_model("DiT", num_classes=10)
    without = small_model("DiT", num_classes=10, class_dropout_prob=0.0)
    x = torch.randn(1, 4, 16, 16, dtype=torch.float64)
    with torch.no_grad():
        with_null(x, 1.0, torch.tensor([10]))                    # the null class
    with pytest.raises(ValueError, match=r"class labels must lie in 0..9, got \[10\]"):
        without(x, 1.0, torch.tensor([10]))
    with pytest.raises(ValueError, match=r"class labels must be an integer tensor .* got list"):
        without(x, 1.0, [3])
    with pytest.raises(ValueError, match=r"latents must be a .* tensor, got list"):
        without([[0.0]], 1.0, torch.tensor([3]))


def test_caption_features_must_be_a_tensor():
    model = small_model("PixArt")
    with pytest.raises(ValueError, match=r"caption features must be a \(1, L, 24\) tensor, got "
                                         r"NoneType"):
        model(torch.randn(1, 4, 16, 16, dtype=torch.float64), 1.0, None)


def test_dit_classifier_free_guidance_as_the_official_sampler():
    """forward_with_cfg: conditional half first, guidance on the first three channels only."""
    model = small_model("DiT")
    half = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    x = torch.cat([half, torch.randn_like(half)])        # the second half is ignored
    t = torch.tensor([300.0, 300.0, 300.0, 300.0], dtype=torch.float64)
    y = torch.tensor([3, 7, 1000, 1000])
    with torch.no_grad():
        out = model.forward_with_cfg(x, t, y, cfg_scale=4.0)
        both = model(torch.cat([half, half]), t, y)
    cond, uncond = both[:2], both[2:]
    guided = uncond[:, :3] + 4.0 * (cond[:, :3] - uncond[:, :3])
    assert torch.allclose(out[:2, :3], guided, rtol=0, atol=1e-12)
    assert torch.equal(out[:2, :3], out[2:, :3])
    assert torch.equal(out[:, 3:], both[:, 3:])


def test_models_are_built_for_inference():
    """build() returns eval mode: no label or caption dropout, so calls are deterministic."""
    model = ptdit.build("DiT-S/8")
    x, t, y = torch.randn(8, 4, 32, 32), torch.rand(8) * 999, torch.randint(0, 1000, (8,))
    with torch.no_grad():
        assert not model.training and torch.equal(model(x, t, y), model(x, t, y))


@pytest.mark.parametrize("family", ["DiT", "PixArt", "PT-DiT"])
def test_per_shape_tables_are_never_stale(family):
    """Positions, masks and window gathers are cached per shape: a model used at several
    shapes, batch sizes and dtypes in turn gives what a fresh model gives at each."""
    model = small_model(family)
    runs = [((2, 4, 16, 16), torch.float64), ((2, 4, 16, 32), torch.float64),
            ((3, 4, 4, 16, 16), torch.float64), ((1, 4, 16, 16), torch.float64),
            ((1, 4, 16, 16), torch.float32), ((2, 4, 16, 16), torch.float64)]
    with torch.no_grad():
        for shape, dtype in runs:
            model.to(dtype)
            fresh = small_model(family, dtype=dtype)
            fresh.load_state_dict(model.state_dict())
            x, t, *cond = forward_inputs(model, shape, dtype)
            assert torch.equal(model(x, t, *cond), fresh(x, t, *cond))


@pytest.mark.parametrize("family", ["DiT", "PixArt", "PT-DiT"])
def test_training_after_inference_mode_validation(family):
    """Tables cached while validating under torch.inference_mode() serve training afterwards."""
    model = small_model(family)
    x, t, *cond = forward_inputs(model, (2, 4, 16, 16))
    with torch.inference_mode():
        model(x, t, *cond)
    model.train()
    model(x, t, *cond).square().mean().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_window_attention_runs_as_fused_sdpa_over_window_rows():
    """Window attention hands SDPA 4-D (windows, heads, N, d) problems, the layout the fused
    kernels take; the observer sees (B·nW, heads, N, N) probabilities."""
    model = small_model("PT-DiT", dtype=torch.float32, giim=False, shift_window=False,
                        condition="class", num_classes=10)
    x = torch.randn(2, 4, 16, 32)
    with torch.no_grad(), Ops() as ops:
        model(x, torch.rand(2) * 1000, torch.randint(0, 10, (2,)))
    assert "aten._scaled_dot_product_flash_attention_for_cpu" in ops.seen
    assert "aten.bmm" not in ops.seen          # no fallback to the math path
    shapes = []
    with torch.no_grad(), attention_backend(model, "math"), \
            observe(model, lambda call, probs: shapes.append(tuple(probs.shape)),
                    names=["blocks.0.attn"]):
        model(x, torch.rand(2) * 1000, torch.randint(0, 10, (2,)))
    assert shapes == [(2 * 4, 4, 32, 32)]      # grid 8x16, 2x2 windows of 4x8 tokens


@pytest.mark.parametrize("family", ["DiT", "PixArt", "PT-DiT", "PT-DiT-class"])
def test_batch_and_condition_mismatches(family):
    model = small_model(family)
    x, t, *cond = forward_inputs(model, (2, 4, 16, 16))
    with pytest.raises(ValueError, match=r"timesteps must have shape \(2,\)"):
        model(x, t[:1], *cond)
    with pytest.raises(ValueError, match=r"for a batch of 2"):
        model(x, t, *(c[:1] for c in cond))
    with pytest.raises(ValueError, match=r"latents have 3 channels; this model takes 4"):
        model(x[:, :3], t, *cond)
    with pytest.raises(ValueError, match=r"latents are torch.float32 but the model is "
                                         r"torch.float64; cast them with .to\(torch.float64\)"):
        model(x.float(), t, *cond)
    if len(cond) == 2:
        with pytest.raises(ValueError, match=r"caption features are torch.float32"):
            model(x, t, cond[0].float(), cond[1])
        with torch.no_grad():   # PixArt's (B, 1, L, C) caption layout is accepted too
            assert torch.equal(model(x, t, cond[0][:, None], cond[1]), model(x, t, *cond))
        with pytest.raises(ValueError, match=r"text mask must be a torch tensor of shape "
                                             r"\(2, 6\)"):
            model(x, t, cond[0], cond[1][:, :5])
        with pytest.raises(ValueError, match=r"caption features must have shape \(2, L, 24\)"):
            model(x, t, cond[0][..., :20], cond[1])


def test_a_seed_builds_the_same_weights_and_leaves_the_global_generator_alone():
    before = torch.random.get_rng_state()
    a = ptdit.build("DiT-S/2", depth=1, hidden_size=64, num_heads=4, seed=3)
    assert torch.equal(torch.random.get_rng_state(), before)
    b = ptdit.build("DiT-S/2", depth=1, hidden_size=64, num_heads=4, seed=3)
    c = ptdit.build("DiT-S/2", depth=1, hidden_size=64, num_heads=4, seed=4)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(x, y), name
    assert any(not torch.equal(x, z) for x, z in zip(a.parameters(), c.parameters()))
    with pytest.raises(ValueError, match="seed must be an int"):
        ptdit.build("DiT-S/2", seed=1.5)
