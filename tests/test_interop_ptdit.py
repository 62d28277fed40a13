"""The official PT-DiT release <-> ptdit: key layout, config mapping, and the forward pass.

The reference below is written from docs/ptdit_release.md ("spec") alone: plain float64
functions over a state dict in the RELEASE's key layout, with its raster -> window-major layout,
its roll, its -1·10000 shifted-window mask, its (B·nW)-row modulation tiling including the
batch-mixing quirk (§9.1, `quirk=True`), and its transposed non-square positions (§9.4,
`transposed=True`). Our model must equal it with the quirk off and positions untransposed
(identical to the release whenever a batch shares one timestep and the grid is square).
"""

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ptdit
from ptdit.attention import (
    proxy_tokens,
    shift_window_bias,
    shift_windows,
    window_order,
    window_partition,
    window_reverse,
)
from ptdit.interop import OFFICIAL_PTDIT, from_official_ptdit, to_official_ptdit
from ptdit.interop.official_ptdit import (
    POS_BUFFER,
    infer_predictor,
    ptdit_config,
    to_ptdit_state_dict,
)
from ptdit.interop.ptdit_format import registry_name
from ptdit.layers import unpatchify

# Every key and shape of the released 1B checkpoint (docs/ptdit_release.md §1).
RELEASE_KEYS = json.loads(
    (Path(__file__).parent / "data" / "official_ptdit_1b_keys.json").read_text())

# The 1B predictor, scaled down: D = 2 × 8, 2 blocks, 12 caption channels, 4×4-token windows.
SMALL = {**RELEASE_KEYS["constructor_kwargs"], "num_heads": 2, "head_dim": 8, "num_layers": 2,
         "caption_channels": 12, "cross_attention_dim": 16,
         "compress_ratios": [1, 4, 4], "proxy_compress_ratios": [1, 4, 4]}
VIDEO = {**SMALL, "compress_ratios": [2, 4, 4], "proxy_compress_ratios": [2, 4, 4], "frame": 2}
TOL = 1e-10


#################################################################################
#                Reference: the release's forward pass, from the spec           #
#################################################################################

def sincos(k: int, u: torch.Tensor) -> torch.Tensor:
    """Spec §4.2: [sin(u·ω), cos(u·ω)], ω_i = 10000^(−i/(k/2))."""
    omega = 10000.0 ** (-torch.arange(k // 2, dtype=torch.float64) / (k / 2))
    a = u.to(torch.float64)[:, None] * omega[None]
    return torch.cat([a.sin(), a.cos()], dim=1)


def release_positions(D: int, frames: int, Hn: int, Wn: int, interp: float = 1.0,
                      transposed: bool = True) -> torch.Tensor:
    """(F, Hn·Wn, D): D/4 temporal channels, then 3D/8 for the first and 3D/8 for the second
    spatial coordinate. Square grids: column then row. transposed: m mod Hn, m div Hn (§9.4)."""
    m = torch.arange(Hn * Wn)
    first, second = (m % Hn, m // Hn) if transposed else (m % Wn, m // Wn)
    spatial = torch.cat([sincos(3 * D // 8, first / interp), sincos(3 * D // 8, second / interp)],
                        dim=1)
    temporal = sincos(D // 4, torch.arange(frames))
    return torch.cat([temporal[:, None].expand(frames, Hn * Wn, D // 4),
                      spatial[None].expand(frames, Hn * Wn, 3 * D // 4)], dim=-1)


def window_major_index(grid, c) -> torch.Tensor:
    """Raster index of the token at each window-major position (spec §3), by enumeration."""
    Fr, H, W = grid
    idx = []
    for fw in range(Fr // c[0]):
        for hw in range(H // c[1]):
            for ww in range(W // c[2]):
                for x in range(c[0]):
                    for y in range(c[1]):
                        for z in range(c[2]):
                            f, h, w = fw * c[0] + x, hw * c[1] + y, ww * c[2] + z
                            idx.append((f * H + h) * W + w)
    return torch.tensor(idx)


def to_window_major(x, idx):
    """(B, T, D) raster -> window-major."""
    return x[:, idx]


def to_raster(x, idx):
    out = torch.empty_like(x)
    out[:, idx] = x
    return out


def region_labels(n: int, c: int) -> list[int]:
    """Spec §6.5: regions [0, n−c), [n−c, n−s), [n−s, n) with s = c//2; one region if s = 0."""
    s = c // 2
    if s == 0:
        return [0] * n
    return [0 if i < n - c else 1 if i < n - s else 2 for i in range(n)]


def release_mask(grid, c) -> torch.Tensor:
    """(nW, N, N) of 0 / −1 on the rolled grid: −1 where query and key labels differ."""
    lf, lh, lw = (region_labels(n, k) for n, k in zip(grid, c))
    labels = torch.tensor([[[9 * a + 3 * b + e for e in lw] for b in lh] for a in lf])
    idx = window_major_index(grid, c)
    N = c[0] * c[1] * c[2]
    lab = labels.flatten()[idx].reshape(-1, N)
    return torch.where(lab[:, :, None] == lab[:, None, :], 0.0, -1.0).to(torch.float64)


def linear(sd, name, x):
    return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]


def layer_norm(x, eps=1e-6):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def attention(sd, name, x, ctx, heads, bias=None):
    """Spec §6.0 (diffusers Attention): q from x, k/v from ctx, bias (rows, Lq, Lk) per head."""
    q, k, v = (linear(sd, f"{name}.to_{n}", s) for n, s in (("q", x), ("k", ctx), ("v", ctx)))
    rows, Lq, D = q.shape
    d = D // heads
    q, k, v = (t.reshape(rows, -1, heads, d).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    if bias is not None:
        scores = scores + bias[:, None]
    out = scores.softmax(-1) @ v
    return linear(sd, f"{name}.to_out.0", out.transpose(1, 2).reshape(rows, Lq, D))


def release_forward(sd, pred, x, t, text, keep=None, quirk=True, transposed=True, record=None):
    """The release's forward pass (spec §2–§7) in float64. x: (B, C, F, H, W)."""
    record = {} if record is None else record
    heads, D, p = pred["num_heads"], pred["num_heads"] * pred["head_dim"], pred["patch_size"]
    c = tuple(pred["compress_ratios"])
    out_ch = pred["out_channels"]
    B, C, Fr, H, W = x.shape
    grid = (Fr, H // p, W // p)
    Hn, Wn = grid[1:]
    nW = (Fr // c[0]) * (Hn // c[1]) * (Wn // c[2])
    N = c[0] * c[1] * c[2]
    idx = window_major_index(grid, c)

    # §4: patchify per frame, add positions, go window-major
    h = F.conv2d(x.transpose(1, 2).reshape(B * Fr, C, H, W), sd["pos_embed.proj.weight"],
                 sd["pos_embed.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2).reshape(B, Fr, Hn * Wn, D)
    h = h + release_positions(D, Fr, Hn, Wn, max(pred["sample_size"] // 64, 1), transposed)
    X = to_window_major(h.reshape(B, Fr * Hn * Wn, D), idx).reshape(B * nW, N, D)
    record["embedded"] = X

    # §5: conditioning
    freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float64) / 128)
    s = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], dim=1)
    e = linear(sd, "adaln_single.emb.timestep_embedder.linear_2",
               F.silu(linear(sd, "adaln_single.emb.timestep_embedder.linear_1", s)))
    t6 = linear(sd, "adaln_single.linear", F.silu(e)).reshape(B, 6, D)
    y = linear(sd, "caption_projection.linear_2",
               F.gelu(linear(sd, "caption_projection.linear_1", text), approximate="tanh"))
    text_bias = None if keep is None else ((1 - keep) * -10000.0)[:, None, :]     # (B, 1, L)
    mask = release_mask(grid, c).repeat(B, 1, 1) * 10000.0                        # (B·nW, N, N)
    record["shift_mask"] = mask
    rows = torch.arange(B * nW)
    sample = rows % B if quirk else rows // nW   # §9.1: the release tiles "batch, nW times"
    shifts = tuple(k // 2 for k in c)

    def grid_of(stream):
        return to_raster(stream.reshape(B, nW * N, D), idx).reshape(B, *grid, D)

    def windows_of(g):
        return to_window_major(g.reshape(B, -1, D), idx).reshape(B * nW, N, D)

    for i in range(pred["num_layers"]):
        pre = f"transformer_blocks.{i}."
        m6 = (sd[pre + "scale_shift_table"][None] + t6)[sample][:, :, None]       # (B·nW,6,1,D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = m6.unbind(1)
        # §6.1–6.3: proxies, proxy self-attention, proxy -> visual cross-attention
        P = X.reshape(B, nW, N, D).mean(2)
        record[f"{i}.proxies"] = P
        Pn = layer_norm(P)
        P = P + attention(sd, pre + "proxy_attn1", Pn, Pn, heads)
        record[f"{i}.proxies_attended"] = P
        cross = attention(sd, pre + "pvisual_attn2", layer_norm(X).reshape(B, nW * N, D),
                          layer_norm(P), heads)
        X = X + linear(sd, pre + "linear_1_visual", cross).reshape(B * nW, N, D)
        # §6.4: window attention
        a = layer_norm(X) * (1 + scale_msa) + shift_msa
        record[f"{i}.attn1_in"] = a
        X = X + gate_msa * attention(sd, pre + "attn1", a, a, heads)
        # §6.5: shifted windows
        if pred["shift_window"]:
            m3 = (sd[pre + "proxy_scale_shift_table"][None] + t6[:, :3])[sample][:, :, None]
            S = windows_of(torch.roll(grid_of(X), [-k for k in shifts], dims=(1, 2, 3)))
            a = layer_norm(S) * (1 + m3[:, 1]) + m3[:, 0]
            record[f"{i}.attn3_in"] = a
            A = attention(sd, pre + "attn3", a, a, heads, bias=mask)
            A = windows_of(torch.roll(grid_of(A), list(shifts), dims=(1, 2, 3)))
            X = X + linear(sd, pre + "linear_2", m3[:, 2] * A)
        # §6.6: text cross-attention, §6.7: feed-forward
        X = X + attention(sd, pre + "attn2", X.reshape(B, nW * N, D), y, heads,
                          bias=text_bias).reshape(B * nW, N, D)
        a = layer_norm(X) * (1 + scale_mlp) + shift_mlp
        record[f"{i}.ff_in"] = a
        ff = linear(sd, pre + "ff.net.2", F.gelu(linear(sd, pre + "ff.net.0.proj", a),
                                                  approximate="tanh"))
        X = X + gate_mlp * ff
        record[f"{i}.out"] = X

    # §7: final layer (per sample), unpatchify
    shift, scale = (sd["scale_shift_table"][None] + e[:, None]).unbind(1)
    Z = linear(sd, "proj_out", layer_norm(X.reshape(B, nW * N, D)) * (1 + scale[:, None])
               + shift[:, None])
    record["final"] = Z
    Z = to_raster(Z, idx).reshape(B, Fr, Hn, Wn, p, p, out_ch)
    return Z.permute(0, 6, 1, 2, 4, 3, 5).reshape(B, out_ch, Fr, Hn * p, Wn * p)


#################################################################################
#                   A scaled-down checkpoint in the release's layout            #
#################################################################################

def release_checkpoint(pred, std=0.2, dtype=torch.float64) -> dict:
    """Every key of official_ptdit_1b_keys.json with the 1B sizes scaled to `pred`, drawn
    afresh."""
    D = pred["num_heads"] * pred["head_dim"]
    size = {1152: D, 4608: 4 * D, 6912: 6 * D, 4096: pred["caption_channels"]}
    entries = RELEASE_KEYS["state_dict"]
    block = [e for e in entries if e["key"].startswith("transformer_blocks.0.")]
    top = [e for e in entries if not e["key"].startswith("transformer_blocks.")]
    sd = {}
    for e in top + [{**e, "key": e["key"].replace(".0.", f".{i}.", 1)}
                    for i in range(pred["num_layers"]) for e in block]:
        if e["key"] == POS_BUFFER:
            side = pred["sample_size"] // pred["patch_size"]
            table = release_positions(D, pred["frame"], side, side,
                                      max(pred["sample_size"] // 64, 1))
            sd[e["key"]] = table[None].to(dtype)
        else:
            shape = [size.get(n, n) for n in e["shape"]]
            sd[e["key"]] = (torch.randn(shape, dtype=torch.float64) * std).to(dtype)
    return sd


def inputs(pred, B=2, frames=None, hw=(16, 16), L=5, equal_t=True, keep=False):
    Fr = frames or 1
    x = torch.randn(B, pred["in_channels"], Fr, *hw, dtype=torch.float64)
    t = torch.full((B,), 637.0, dtype=torch.float64) if equal_t else (
        torch.tensor([37.0, 912.5, 400.0, 5.0][:B], dtype=torch.float64))
    text = torch.randn(B, L, pred["caption_channels"], dtype=torch.float64)
    mask = None
    if keep:
        mask = torch.ones(B, L, dtype=torch.float64)
        mask[0, 3:] = 0
        mask[-1, 1:] = 0
    return x, t, text, mask


@pytest.fixture(scope="module")
def release():
    sd = release_checkpoint(SMALL)
    return sd, from_official_ptdit(sd, SMALL)


def max_diff(a, b) -> float:
    return (a - b).abs().max().item()


#################################################################################
#                                 Key layout                                    #
#################################################################################

def test_release_block_keys_are_uniform():
    """The scaled checkpoint repeats block 0's keys; check the 1B file does the same."""
    keys = [e["key"] for e in RELEASE_KEYS["state_dict"]]
    per_block = [{k.split(".", 2)[2] for k in keys if k.startswith(f"transformer_blocks.{i}.")}
                 for i in range(28)]
    assert all(b == per_block[0] for b in per_block)
    assert len(keys) == RELEASE_KEYS["num_state_dict_entries"]


def test_1b_state_dict_matches_release_key_for_key():
    model = ptdit.build("Qihoo-T2I-1B", device="meta")
    sd, predictor = to_official_ptdit(model)
    want = {e["key"]: e["shape"] for e in RELEASE_KEYS["state_dict"]}
    assert {k: list(v.shape) for k, v in sd.items()} == want
    assert predictor == RELEASE_KEYS["constructor_kwargs"]
    params = sum(v.numel() for k, v in sd.items() if k != POS_BUFFER)
    assert params == RELEASE_KEYS["total_parameters"]
    assert registry_name(ptdit_config(predictor)) == "Qihoo-T2I-1B"


def test_1b_position_buffer_is_the_release_formula():
    model = ptdit.build("Qihoo-T2I-1B", device="meta")
    table = to_official_ptdit(model)[0][POS_BUFFER]
    assert table.dtype == torch.float32
    assert max_diff(table[0].double(), release_positions(1152, 1, 16, 16)) < 1e-6


def test_detects_release_checkpoints_only():
    sd = release_checkpoint(SMALL)
    assert OFFICIAL_PTDIT.detect(sd, None)
    ours = ptdit.build("PT-DiT/B", device="meta").state_dict()
    assert not OFFICIAL_PTDIT.detect(ours, None)


@pytest.mark.parametrize("extra", [{}, {"class_dropout_prob": 0.0, "num_classes": 7,
                                      "windows_per_side": 2, "temporal_window": 2}],
                         ids=["release-fields", "fields-the-release-cannot-say"])
def test_round_trip_ours_official_ours_is_exact(extra):
    config = dataclasses.replace(ptdit_config(SMALL), **extra)
    model = ptdit.configs.model_class(config)(config).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()                          # zero-init linears too
    sd, predictor = to_official_ptdit(model)
    assert (predictor == SMALL) == (not extra)   # else {"predictor": SMALL, "ptdit_config": …}
    back = from_official_ptdit(sd, predictor)
    assert back.config == config
    theirs, ours = back.state_dict(), model.state_dict()
    assert list(theirs) == list(ours)
    assert all(torch.equal(theirs[k], ours[k]) and theirs[k].dtype == ours[k].dtype
               for k in ours)


def test_round_trip_official_ours_official_is_exact():
    sd = release_checkpoint(SMALL)
    model = from_official_ptdit(sd, SMALL)
    again, predictor = to_official_ptdit(model)
    assert predictor == SMALL
    assert set(again) == set(sd)
    assert all(torch.equal(again[k], sd[k]) for k in sd if k != POS_BUFFER)
    assert max_diff(again[POS_BUFFER], sd[POS_BUFFER]) < 1e-14       # same formula, re-derived


def test_mismatched_keys_are_all_reported():
    sd = release_checkpoint(SMALL)
    sd["transformer_blocks.0.attn1.norm_q.weight"] = torch.zeros(8)
    del sd["transformer_blocks.1.attn3.to_k.weight"]
    ours = to_ptdit_state_dict(sd)
    assert "transformer_blocks.0.attn1.norm_q.weight" in ours
    assert "blocks.1.shift_attn.qkv.weight" not in ours
    assert "transformer_blocks.1.attn3.to_q.weight" in ours     # left for "unexpected"
    sd["transformer_blocks.0.linear_2.bias"] = torch.zeros(15)
    with pytest.raises(ValueError) as err:
        from_official_ptdit(sd, SMALL)
    msg = str(err.value)             # in the release's names, all problems at once
    assert "missing keys (1): transformer_blocks.1.attn3.to_k.weight" in msg
    assert "unexpected keys (1): transformer_blocks.0.attn1.norm_q.weight" in msg
    assert "transformer_blocks.0.linear_2.bias: checkpoint (15,), expected (16,)" in msg


#################################################################################
#                                 Config mapping                                #
#################################################################################

def test_config_mapping():
    config = ptdit_config(SMALL)
    assert (config.hidden_size, config.num_heads, config.depth) == (16, 2, 2)
    assert config.window == (1, 4, 4) and config.learn_sigma and config.shift_window
    assert config.pos_interp_scale == 1.0 and config.caption_channels == 12
    assert not ptdit_config({**SMALL, "out_channels": 4}).learn_sigma
    assert ptdit_config({**SMALL, "sample_size": 256}).pos_interp_scale == 4.0
    assert ptdit_config({"predictor": SMALL}) == config                 # whole inference JSON
    assert ptdit_config({**SMALL, "dropout": 0.1, "upcast_attention": True}) == config


@pytest.mark.parametrize("field, value", [
    ("norm_eps", 1e-5), ("norm_elementwise_affine", True), ("attention_bias", False),
    ("activation_fn", "geglu"), ("norm_type", "ada_norm"), ("cross_attention_dim", 12),
    ("sample_size", 128), ("proxy_compress_ratios", [1, 2, 2]), ("out_channels", 5),
    ("compress_ratios", [1, 4]), ("flash_attention", True),
])
def test_refuses_unsupported_config(field, value):
    with pytest.raises(ValueError, match=field):
        ptdit_config({**SMALL, field: value})


def test_fields_the_release_cannot_say_ride_beside_it():
    extra = {"num_classes": 7, "windows_per_side": 2}
    config = ptdit_config({"predictor": SMALL, "ptdit_config": extra})
    assert (config.num_classes, config.windows_per_side) == (7, 2)
    assert ptdit_config({**SMALL, "ptdit_config": extra}) == config
    with pytest.raises(ValueError, match="ptdit_config field.* depth cannot be set there"):
        ptdit_config({"predictor": SMALL, "ptdit_config": {"depth": 3}})
    with pytest.raises(ValueError, match="windows_per_side must be a positive"):
        ptdit_config({"predictor": SMALL, "ptdit_config": {"windows_per_side": 0}})
    with pytest.raises(ValueError, match="class_dropout_prob must be float, got '0.1'"):
        ptdit_config({"predictor": SMALL, "ptdit_config": {"class_dropout_prob": "0.1"}})


def test_refuses_missing_field():
    with pytest.raises(ValueError, match="compress_ratios"):
        ptdit_config({k: v for k, v in SMALL.items() if k != "compress_ratios"})


def test_q0_is_ignored_as_in_the_release():
    assert ptdit_config({**SMALL, "proxy_compress_ratios": [4, 4, 4]}).window == (1, 4, 4)


def test_infers_config_from_shapes():
    pred = {**SMALL, "num_heads": 2, "head_dim": 72, "cross_attention_dim": 144,
            "compress_ratios": [1, 8, 8], "proxy_compress_ratios": [1, 8, 8], "num_layers": 1}
    sd = release_checkpoint(pred)
    assert infer_predictor(sd) == pred
    with pytest.raises(ValueError, match="head_dim"):
        infer_predictor(release_checkpoint(SMALL))


def test_refuses_what_the_release_cannot_express():
    for overrides, word in (({"condition": "class"}, "condition"), ({"giim": False}, "giim"),
                            ({"window": None}, "window")):
        model = ptdit.build("PT-DiT/B", device="meta", **{"window": (1, 8, 8), **overrides})
        with pytest.raises(ValueError, match=word):
            to_official_ptdit(model)


#################################################################################
#                              Forward-pass parity                              #
#################################################################################

CASES = {  # name: (predictor, input options, pass 4-D)
    "image-4d": (SMALL, {}, True),
    "image-5d": (SMALL, {}, False),
    "image-keep-mask": (SMALL, {"keep": True}, True),
    "video": (VIDEO, {"frames": 4, "keep": True}, False),
    "batch-3-wide": (SMALL, {"B": 3, "hw": (16, 24)}, True),
}


@pytest.mark.parametrize("case", CASES)
def test_forward_equals_release(case):
    pred, options, four_d = CASES[case]
    sd = release_checkpoint(pred)
    model = from_official_ptdit(sd, pred)
    x, t, text, keep = inputs(pred, **options)
    square = x.shape[-1] == x.shape[-2]
    want = release_forward(sd, pred, x, t, text, keep, quirk=True, transposed=square)
    with torch.no_grad():
        got = model(x[:, :, 0] if four_d else x, t, text, keep)
    assert got.dtype == torch.float64
    assert got.shape == (want[:, :, 0] if four_d else want).shape
    assert max_diff(got, want[:, :, 0] if four_d else want) <= TOL


def test_distinct_timesteps_are_batch_correct(release):
    sd, model = release
    x, t, text, keep = inputs(SMALL, B=3, equal_t=False, keep=True)
    with torch.no_grad():
        got = model(x, t, text, keep)
    correct = release_forward(sd, SMALL, x, t, text, keep, quirk=False)
    quirky = release_forward(sd, SMALL, x, t, text, keep, quirk=True)
    assert max_diff(got, correct) <= TOL
    assert max_diff(got, quirky) > 1e-3
    with torch.no_grad():
        alone = torch.cat([model(x[i:i + 1], t[i:i + 1], text[i:i + 1], keep[i:i + 1])
                           for i in range(3)])
    assert max_diff(got, alone) <= TOL


def test_non_square_positions_fix_the_release_transposition(release):
    sd, model = release
    x, t, text, _ = inputs(SMALL, hw=(16, 24))
    with torch.no_grad():
        got = model(x, t, text)
    assert max_diff(got, release_forward(sd, SMALL, x, t, text, transposed=False)) <= TOL
    assert max_diff(got, release_forward(sd, SMALL, x, t, text, transposed=True)) > 1e-3


#################################################################################
#                            Sub-steps of the spec                              #
#################################################################################

def _hooked_forward(model, x, t, text, keep=None):
    """Our model's intermediates under the reference's names (via forward hooks)."""
    seen = {}
    handles = []

    def pre(name, index=0):
        def hook(module, args):
            seen[name] = args[index]
            if name.endswith("attn3_in"):
                seen[name.replace("attn3_in", "shift_bias")] = args[1]
        return hook

    def post(name):
        def hook(module, args, out):
            seen[name] = out
        return hook

    handles.append(model.blocks[0].register_forward_pre_hook(pre("embedded")))
    handles.append(model.final_layer.register_forward_hook(post("final")))
    for i, block in enumerate(model.blocks):
        handles += [block.norm_proxy.register_forward_pre_hook(pre(f"{i}.proxies")),
                    block.proxy_attn.register_forward_hook(post(f"{i}.proxy_attn_out")),
                    block.attn.register_forward_pre_hook(pre(f"{i}.attn1_in")),
                    block.shift_attn.register_forward_pre_hook(pre(f"{i}.attn3_in")),
                    block.mlp.register_forward_pre_hook(pre(f"{i}.ff_in")),
                    block.register_forward_hook(post(f"{i}.out"))]
    try:
        with torch.no_grad():
            out = model(x, t, text, keep)
    finally:
        for h in handles:
            h.remove()
    return out, seen


def test_every_sub_step_matches_release(release):
    """Patchify + positions + window order, proxy pooling, proxy attention, both modulated
    attention inputs, the shifted-window mask, the MLP input, each block, the final layer."""
    sd, model = release
    x, t, text, keep = inputs(SMALL, keep=True)
    ref = {}
    release_forward(sd, SMALL, x, t, text, keep, record=ref)
    _, ours = _hooked_forward(model, x, t, text, keep)
    B, nW, N, D = 2, 4, 16, 16
    diffs = {"embedded": max_diff(ours["embedded"].reshape(B * nW, N, D), ref["embedded"]),
             "final": max_diff(ours["final"], ref["final"])}
    for i in range(2):
        diffs[f"{i}.proxies"] = max_diff(ours[f"{i}.proxies"], ref[f"{i}.proxies"])
        diffs[f"{i}.proxy_attn"] = max_diff(ours[f"{i}.proxies"] + ours[f"{i}.proxy_attn_out"],
                                            ref[f"{i}.proxies_attended"])
        for name in ("attn1_in", "attn3_in", "out"):
            diffs[f"{i}.{name}"] = max_diff(ours[f"{i}.{name}"].reshape(B * nW, N, D),
                                            ref[f"{i}.{name}"])
        diffs[f"{i}.ff_in"] = max_diff(ours[f"{i}.ff_in"].reshape(B * nW, N, D),
                                       ref[f"{i}.ff_in"])
        bias = ours[f"{i}.shift_bias"][:, 0].repeat(B, 1, 1)   # (B·nW, N, N), as released
        diffs[f"{i}.shift_mask"] = max_diff(bias, ref["shift_mask"])
    assert max(diffs.values()) <= TOL, diffs


def test_proxy_pooling_is_the_window_mean():
    grid, window = (4, 8, 12), (2, 4, 4)
    g = torch.randn(2, *grid, 3, dtype=torch.float64)
    proxies = proxy_tokens(window_partition(g, window), 2 * 4 * 4)
    f, h, w = torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij")
    k = 0
    for fw in range(2):
        for hw in range(2):
            for ww in range(3):
                inside = (f // 2 == fw) & (h // 4 == hw) & (w // 4 == ww)
                assert max_diff(proxies[:, k], g[:, inside].mean(1)) < 1e-14
                k += 1


@pytest.mark.parametrize("grid, window", [((1, 8, 8), (1, 4, 4)), ((4, 8, 12), (2, 4, 4)),
                                          ((3, 6, 10), (3, 3, 5))])
def test_window_order_is_release_window_major(grid, window):
    assert torch.equal(window_order(grid, window), window_major_index(grid, window))
    x = torch.randn(1, *grid, 2)
    assert torch.equal(window_reverse(window_partition(x, window), grid, window), x)


@pytest.mark.parametrize("window", [(1, 4, 4), (2, 4, 6), (3, 2, 4), (4, 4, 4)])
def test_roll_amounts(window):
    """The shifted layout's first window starts at token (c0//2, c1//2, c2//2) (roll by −c//2)."""
    grid = tuple(2 * c for c in window)
    coords = torch.stack(torch.meshgrid(*(torch.arange(n) for n in grid), indexing="ij"), -1)
    rolled = shift_windows(window_partition(coords[None], window), grid, window)
    first = rolled[0, 0].tolist()
    assert first == [c // 2 for c in window]
    expected = torch.roll(coords, [-(c // 2) for c in window], dims=(0, 1, 2))
    assert torch.equal(window_reverse(rolled, grid, window)[0], expected)
    back = shift_windows(rolled, grid, window, inverse=True)
    assert torch.equal(back, window_partition(coords[None], window))


@pytest.mark.parametrize("grid, window", [((1, 8, 8), (1, 4, 4)), ((4, 12, 8), (2, 4, 4)),
                                          ((2, 6, 10), (1, 3, 5))])
def test_shift_mask_regions(grid, window):
    """−10000 exactly where the spec's region labels differ; only last row/col/slab windows."""
    bias = shift_window_bias(grid, window, torch.float64, "cpu")[:, 0]
    want = release_mask(grid, window) * 10000.0
    assert torch.equal(bias, want)
    nf, nh, nw = (n // c for n, c in zip(grid, window))
    for k, masked in enumerate((bias != 0).flatten(1).any(1).tolist()):
        fw, hw, ww = k // (nh * nw), k // nw % nh, k % nw
        last = (fw == nf - 1 and window[0] > 1) or (hw == nh - 1 and window[1] > 1) or (
            ww == nw - 1 and window[2] > 1)
        assert masked == last
    # the corner window of a 2-D grid holds 4 regions: each token sees only its own quarter
    if window[0] == 1 and window[1] % 2 == 0 and window[2] % 2 == 0:
        allowed = (bias[-1] == 0).sum().item()
        assert allowed == 4 * ((window[1] // 2) * (window[2] // 2)) ** 2


def test_modulation_rows_act_where_the_release_applies_them():
    """Perturbing any one row of the 6×D, 3×D (shifted branch) or final 2×D table moves our
    output exactly as it moves the release's."""
    pred = {**SMALL, "num_layers": 1}
    base = release_checkpoint(pred)
    x, t, text, _ = inputs(pred)
    with torch.no_grad():
        plain = from_official_ptdit(base, pred)(x, t, text)
    for table, rows in (("transformer_blocks.0.scale_shift_table", 6),
                        ("transformer_blocks.0.proxy_scale_shift_table", 3),
                        ("scale_shift_table", 2)):
        for r in range(rows):
            sd = dict(base)
            sd[table] = sd[table].clone()
            sd[table][r] += torch.linspace(-1, 1, 16, dtype=torch.float64)
            with torch.no_grad():
                got = from_official_ptdit(sd, pred)(x, t, text)
            want = release_forward(sd, pred, x, t, text)
            assert max_diff(got, want) <= TOL, (table, r)
            assert max_diff(got, plain) > 1e-4, (table, r)


def test_unpatchify_order():
    """Token (f, h, w) at its window-major position, entry (pr·p + pc)·C + ch, lands at output
    pixel (h·p + pr, w·p + pc) of frame f, channel ch."""
    grid, window, p, C = (2, 4, 6), (2, 2, 3), 2, 3
    T = grid[0] * grid[1] * grid[2]
    idx = window_major_index(grid, window)
    z = torch.arange(T * p * p * C, dtype=torch.float64).reshape(1, T, p * p * C)
    out = unpatchify(window_reverse(z, grid, window).flatten(1, 3), grid, p, C)
    assert out.shape == (1, C, grid[0], grid[1] * p, grid[2] * p)
    for pos in range(T):
        r = idx[pos].item()
        f, h, w = r // (grid[1] * grid[2]), r // grid[2] % grid[1], r % grid[2]
        for pr in range(p):
            for pc in range(p):
                for ch in range(C):
                    assert out[0, ch, f, h * p + pr, w * p + pc] == z[0, pos, (pr * p + pc) * C
                                                                      + ch]


@pytest.mark.parametrize("grid", [(1, 8, 8), (3, 4, 4), (1, 4, 6), (2, 6, 4)])
def test_positions(release, grid):
    """Square: the release's table; non-square: the release's formula without §9.4."""
    _, model = release
    window = (1, 2, 2)
    F_, Hn, Wn = grid
    _, positions = model.layout(grid, window, torch.zeros((), dtype=torch.float64))
    ours = window_reverse(positions, grid, window).reshape(F_, Hn * Wn, -1)
    assert max_diff(ours, release_positions(16, F_, Hn, Wn, transposed=False)) < 1e-14
    transposed = release_positions(16, F_, Hn, Wn, transposed=True)
    if Hn == Wn:
        assert max_diff(ours, transposed) < 1e-14
    else:
        assert max_diff(ours, transposed) > 0.1


#################################################################################
#                                    Dtypes                                     #
#################################################################################

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_model_takes_the_checkpoint_dtype(dtype):
    model = from_official_ptdit(release_checkpoint(SMALL, dtype=dtype), SMALL)
    assert {p.dtype for p in model.parameters()} == {dtype}


def test_dtype_can_be_asked_for():
    model = from_official_ptdit(release_checkpoint(SMALL, dtype=torch.bfloat16), SMALL,
                                dtype=torch.float32)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
