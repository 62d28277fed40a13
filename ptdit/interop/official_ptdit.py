"""The released PT-DiT / Qihoo-T2X checkpoint (`PTDiTDiffuser` of Ascend/MindSpeed-MM) <-> ptdit.

The release's forward pass is specified in docs/ptdit_release.md ("spec" below); its 1B keys are
listed in tests/data/official_ptdit_1b_keys.json. Our PT-DiT computes the same function
(with batch-correct modulation, so it equals the release whenever the timesteps of a batch are
equal) under DiT/PixArt names. Which release attention is which (spec §6):

    proxy_attn1    proxy self-attention (6.2)        -> proxy_attn
    pvisual_attn2  proxy -> token cross-attention    -> proxy_cross_attn, closed by
    linear_1_visual                                  -> proxy_out
    attn1          window self-attention (6.4)       -> attn
    attn3          shifted-window attention (6.5)    -> shift_attn, closed by
    linear_2                                         -> shift_out
    attn2          text cross-attention (6.6)        -> cross_attn
    ff.net.0.proj / ff.net.2                         -> mlp.fc1 / mlp.fc2
    proxy_scale_shift_table (the shifted branch's)   -> shift_scale_shift_table

The release's q, k, v projections are fused here: qkv = [q; k; v] (self), kv = [k; v] (cross).
Its `pos_embed.pos_embed` buffer (the sin-cos table for sample_size/frame) is dropped on the way
in, since ptdit computes positions per input, and recomputed by the same formula on the way out.

Our config fields the predictor cannot say (class_dropout_prob, num_classes, windows_per_side,
temporal_window) travel, when they differ from our defaults, beside the predictor in the form of
the release's whole inference JSON: {"predictor": {...}, "ptdit_config": {...}} (EXTRA_KEY);
the release reads only "predictor".
"""

import dataclasses
import math
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..layers import position_table
from ..models import PTDiT, PTDiTConfig
from .base import EXTRA_KEY, Format, StateDict, changed_fields, extra_fields
from .ptdit_format import instantiate, typed_config

POS_BUFFER = "pos_embed.pos_embed"

# The released 1B predictor ("predictor" of examples/qihoo_t2x/inference_model_image.json).
RELEASE_1B_PREDICTOR = {
    "num_heads": 16, "head_dim": 72, "in_channels": 4, "out_channels": 8, "num_layers": 28,
    "dropout": 0.0, "norm_num_groups": 32, "cross_attention_dim": 1152, "attention_bias": True,
    "sample_size": 32, "frame": 1, "patch_size": 2, "activation_fn": "gelu-approximate",
    "num_embeds_ada_norm": 1000, "upcast_attention": False, "norm_type": "ada_norm_single",
    "norm_elementwise_affine": False, "norm_eps": 1e-6, "attention_type": "default",
    "caption_channels": 4096, "compress_ratios": [1, 8, 8], "proxy_compress_ratios": [1, 8, 8],
    "shift_window": True,
}

REQUIRED = ("num_heads", "head_dim", "num_layers", "in_channels", "out_channels", "patch_size",
            "caption_channels", "cross_attention_dim", "compress_ratios", "proxy_compress_ratios",
            "shift_window", "sample_size", "norm_eps", "norm_elementwise_affine",
            "attention_bias", "activation_fn")

# Fields whose only supported value is the release's (anything else is another network).
FIXED = {
    "norm_eps": 1e-6,
    "norm_elementwise_affine": False,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "norm_type": "ada_norm_single",
}

# Fields the release accepts but that do not change its inference forward pass.
IGNORED = {
    "dropout": "dropout is off at inference",
    "num_embeds_ada_norm": "unused by the release",
    "norm_num_groups": "unused by the release",
    "attention_type": "unused by the release",
    "upcast_attention": "unused by the release",
    "frame": "only sizes the stored position buffer; positions are computed per input",
    "model_id": "pipeline bookkeeping",
    "dtype": "the checkpoint's tensors decide the dtype",
    "from_pretrained": "pipeline bookkeeping",
}

# PTDiTConfig fields the predictor cannot say, with the values it implies (our defaults).
EXTRA_FIELDS = {f.name: f.default for f in dataclasses.fields(PTDiTConfig) if f.name in (
    "class_dropout_prob", "num_classes", "windows_per_side", "temporal_window")}

HEAD_DIM_WHEN_INFERRED = 72  # the release's head_dim; head count is not visible in the shapes


#################################################################################
#                                 Config mapping                                #
#################################################################################

def _refuse(field: str, value, supported: str) -> ValueError:
    return ValueError(f"official PT-DiT config: {field}={value!r} is not supported; "
                      f"supported: {supported}")


def ptdit_config(predictor: Mapping) -> PTDiTConfig:
    """Our PTDiTConfig for a release "predictor" JSON (dict, or the whole inference JSON that
    holds it under "predictor"); ValueError names any field we do not support, its value and
    what is supported. Fields in IGNORED are accepted and unused; EXTRA_KEY's are applied."""
    extra = extra_fields(predictor, tuple(EXTRA_FIELDS), "official PT-DiT config")
    predictor = dict(predictor.get("predictor", predictor))
    predictor.pop(EXTRA_KEY, None)
    unknown = sorted(set(predictor) - set(REQUIRED) - set(FIXED) - set(IGNORED))
    if unknown:
        raise ValueError(f"official PT-DiT config: unknown field(s) {', '.join(unknown)}; "
                         f"known: {', '.join(sorted({*REQUIRED, *FIXED, *IGNORED}))}")
    missing = [k for k in REQUIRED if k not in predictor]
    if missing:
        raise ValueError(f"official PT-DiT config: missing field(s) {', '.join(missing)} "
                         "(the release's predictor JSON carries them all)")
    for field, value in FIXED.items():
        if predictor.get(field, value) != value:
            raise _refuse(field, predictor[field], repr(value))

    heads, head_dim = int(predictor["num_heads"]), int(predictor["head_dim"])
    D = heads * head_dim
    if predictor["cross_attention_dim"] != D:
        raise _refuse("cross_attention_dim", predictor["cross_attention_dim"],
                      f"num_heads × head_dim = {D}")
    if D % 16:
        raise _refuse("num_heads × head_dim", D, "a multiple of 16 (3-D sin-cos positions)")
    C, out = predictor["in_channels"], predictor["out_channels"]
    if out not in (C, 2 * C):
        raise _refuse("out_channels", out, f"in_channels ({C}) or 2·in_channels ({2 * C})")
    window = tuple(int(c) for c in predictor["compress_ratios"])
    if len(window) != 3 or min(window) < 1:
        raise _refuse("compress_ratios", predictor["compress_ratios"], "three positive ints")
    proxy = [int(q) for q in predictor["proxy_compress_ratios"]]
    # q0 is ignored by the release (spec §8, §9.3): proxies always span all c0 frames.
    if len(proxy) != 3 or proxy[1:] != list(window[1:]):
        raise _refuse("proxy_compress_ratios", predictor["proxy_compress_ratios"],
                      f"equal to compress_ratios {list(window)} (one proxy, the window mean, per "
                      "window; several strided proxies per window are not supported)")
    sample_size = predictor["sample_size"]
    if not isinstance(sample_size, int) or sample_size < 1 or sample_size == 128:
        raise _refuse("sample_size", sample_size, "a positive int other than 128 (128 switches "
                      "on PixArt's resolution/aspect-ratio micro-conditions)")
    config = PTDiTConfig(
        depth=int(predictor["num_layers"]), hidden_size=D, num_heads=heads,
        patch_size=int(predictor["patch_size"]), in_channels=C, learn_sigma=out == 2 * C,
        condition="text", caption_channels=int(predictor["caption_channels"]), window=window,
        shift_window=bool(predictor["shift_window"]),
        pos_interp_scale=float(max(sample_size // 64, 1)))
    return typed_config(PTDiTConfig, {**dataclasses.asdict(config), **extra},
                        f"official PT-DiT config ({EXTRA_KEY})")


def release_sample_size(config: PTDiTConfig) -> int:
    """A release sample_size whose interpolation scale max(s // 64, 1) is ours."""
    scale = config.pos_interp_scale
    if scale == 1:
        return 32
    if scale != int(scale) or scale < 1:
        raise ValueError(f"pos_interp_scale={scale} has no release equivalent; the release's "
                         "scale is max(sample_size // 64, 1): allowed 1, 2, 3, …")
    size = 64 * int(scale)
    return size + config.patch_size if size == 128 else size  # 128 means micro-conditions


def predictor_json(config: PTDiTConfig) -> dict:
    """The release's predictor JSON for our config (refuses what the release cannot express)."""
    problems = []
    if config.condition != "text":
        problems.append(f"condition={config.condition!r} (the release is text-conditional)")
    if not config.giim:
        problems.append("giim=False (the release always has proxy tokens)")
    if config.window is None:
        problems.append("window=None (the release needs explicit compress_ratios; pass window=)")
    if config.mlp_ratio != 4.0:
        problems.append(f"mlp_ratio={config.mlp_ratio} (the release's feed-forward is 4·D)")
    if problems:
        raise ValueError("cannot write the official PT-DiT format: " + "; ".join(problems))
    D, heads, C = config.hidden_size, config.num_heads, config.in_channels
    return {
        **RELEASE_1B_PREDICTOR,
        "num_heads": heads, "head_dim": D // heads, "in_channels": C,
        "out_channels": 2 * C if config.learn_sigma else C, "num_layers": config.depth,
        "cross_attention_dim": D, "sample_size": release_sample_size(config),
        "frame": config.window[0], "patch_size": config.patch_size,
        "caption_channels": config.caption_channels, "compress_ratios": list(config.window),
        "proxy_compress_ratios": list(config.window), "shift_window": config.shift_window,
    }


def infer_predictor(state_dict: Mapping[str, Tensor], num_heads: int | None = None) -> dict:
    """A predictor JSON read off the checkpoint's shapes, for files that come without one.

    Rule: width, input channels and patch from `pos_embed.proj.weight` (D, C, p, p); output
    channels from `proj_out.weight` (p·p·out, D); caption channels from
    `caption_projection.linear_1.weight`; depth from the block indices; shift_window from the
    presence of `attn3`; sample_size and frame from the position buffer (1, frame, (s/p)², D)
    when present. Not visible in shapes, hence `num_heads` when given (a named model's), else
    the release's head_dim 72 (so num_heads = D / 72); and the release's
    compress_ratios = proxy_compress_ratios = [1, 8, 8] and fixed fields (norm_eps 1e-6, …).
    Pass the predictor JSON when these differ.
    """
    try:
        D, C, p, _ = state_dict["pos_embed.proj.weight"].shape
        out = state_dict["proj_out.weight"].shape[0] // (p * p)
        caption = state_dict["caption_projection.linear_1.weight"].shape[1]
    except KeyError as err:
        raise ValueError(f"cannot infer the official PT-DiT config: key {err} is missing; pass "
                         "the predictor JSON (config=, or <file>.json beside the file)") from None
    if num_heads is not None and D % num_heads:
        raise ValueError(f"width {D} is not divisible by {num_heads} heads")
    if num_heads is None and D % HEAD_DIM_WHEN_INFERRED:
        raise ValueError(f"cannot infer the head count of width {D}: not a multiple of the "
                         f"release's head_dim {HEAD_DIM_WHEN_INFERRED}; pass name= (a registry "
                         "PT-DiT of this size) or the predictor JSON (config=, or <file>.json "
                         "beside the file)")
    head_dim = D // num_heads if num_heads is not None else HEAD_DIM_WHEN_INFERRED
    blocks = {int(k.split(".")[1]) for k in state_dict if k.startswith("transformer_blocks.")}
    sample_size, frame = 32, 1
    if POS_BUFFER in state_dict:
        _, frame, tokens, _ = state_dict[POS_BUFFER].shape
        sample_size = math.isqrt(tokens) * p
    return {
        **RELEASE_1B_PREDICTOR,
        "num_heads": D // head_dim, "head_dim": head_dim,
        "in_channels": C, "out_channels": out, "num_layers": max(blocks, default=-1) + 1,
        "cross_attention_dim": D, "sample_size": sample_size, "frame": frame, "patch_size": p,
        "caption_channels": caption,
        "shift_window": any(".attn3." in k for k in state_dict),
    }


#################################################################################
#                                  Key mapping                                  #
#################################################################################

_TOP = {  # release module -> ptdit module (weight and bias)
    "pos_embed.proj": "x_embedder.proj",
    "adaln_single.emb.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "adaln_single.emb.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "adaln_single.linear": "t_block.1",
    "caption_projection.linear_1": "y_embedder.y_proj.fc1",
    "caption_projection.linear_2": "y_embedder.y_proj.fc2",
    "proj_out": "final_layer.linear",
}
_TOP_TABLES = {"scale_shift_table": "final_layer.scale_shift_table"}
_BLOCK = {  # release module -> ptdit module inside a block (weight and bias)
    "proxy_attn1.to_out.0": "proxy_attn.proj",
    "pvisual_attn2.to_q": "proxy_cross_attn.q_linear",
    "pvisual_attn2.to_out.0": "proxy_cross_attn.proj",
    "linear_1_visual": "proxy_out",
    "attn1.to_out.0": "attn.proj",
    "attn3.to_out.0": "shift_attn.proj",
    "linear_2": "shift_out",
    "attn2.to_q": "cross_attn.q_linear",
    "attn2.to_out.0": "cross_attn.proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
_BLOCK_TABLES = {"scale_shift_table": "scale_shift_table",
                 "proxy_scale_shift_table": "shift_scale_shift_table"}
_FUSED = {  # ptdit fused projection -> release projections, in concatenation order
    "proxy_attn.qkv": ("proxy_attn1.to_q", "proxy_attn1.to_k", "proxy_attn1.to_v"),
    "proxy_cross_attn.kv_linear": ("pvisual_attn2.to_k", "pvisual_attn2.to_v"),
    "attn.qkv": ("attn1.to_q", "attn1.to_k", "attn1.to_v"),
    "shift_attn.qkv": ("attn3.to_q", "attn3.to_k", "attn3.to_v"),
    "cross_attn.kv_linear": ("attn2.to_k", "attn2.to_v"),
}
_SUFFIXES = (".weight", ".bias")


def _renames(depth: int) -> dict[str, str]:
    """Every one-to-one release key -> ptdit key for `depth` blocks."""
    names = {f"{a}{s}": f"{b}{s}" for a, b in _TOP.items() for s in _SUFFIXES} | _TOP_TABLES
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        names |= {f"{src}{a}{s}": f"{dst}{b}{s}" for a, b in _BLOCK.items() for s in _SUFFIXES}
        names |= {src + a: dst + b for a, b in _BLOCK_TABLES.items()}
    return names


def _depth(keys, prefix: str) -> int:
    return max((int(k.split(".")[1]) for k in keys if k.startswith(prefix)), default=-1) + 1


def to_ptdit_state_dict(state_dict: Mapping[str, Tensor]) -> StateDict:
    """Release keys -> ptdit keys. Keys it cannot map keep their names (so that loading reports
    them as unexpected); the position buffer is dropped."""
    rest = {k: v for k, v in state_dict.items() if k != POS_BUFFER}
    depth = _depth(rest, "transformer_blocks.")
    out = {}
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for fused, parts in _FUSED.items():
            for s in _SUFFIXES:
                keys = [f"{src}{part}{s}" for part in parts]
                if all(k in rest for k in keys) and len({rest[k].shape[1:] for k in keys}) == 1:
                    out[f"{dst}{fused}{s}"] = torch.cat([rest.pop(k) for k in keys])
    for theirs, ours in _renames(depth).items():
        if theirs in rest:
            out[ours] = rest.pop(theirs)
    return out | rest


def from_ptdit_state_dict(state_dict: Mapping[str, Tensor], config: PTDiTConfig) -> StateDict:
    """ptdit keys -> release keys, with the release's position buffer for its sample_size/frame.

    Splitting a fused projection gives views; callers that serialise should make them contiguous.
    """
    rest = dict(state_dict)
    out = {}
    for i in range(config.depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for fused, parts in _FUSED.items():
            for s in _SUFFIXES:
                key = f"{dst}{fused}{s}"
                if key in rest:
                    out |= dict(zip((f"{src}{p}{s}" for p in parts),
                                    rest.pop(key).chunk(len(parts))))
    for theirs, ours in _renames(config.depth).items():
        if ours in rest:
            out[theirs] = rest.pop(ours)
    if rest:
        raise ValueError(f"keys with no official PT-DiT equivalent: {', '.join(sorted(rest))}")
    out[POS_BUFFER] = release_position_buffer(config, like=out["pos_embed.proj.weight"])
    return out


def release_position_buffer(config: PTDiTConfig, like: Tensor) -> Tensor:
    """The release's stored table (1, frame, (s/p)², D) for its sample_size s and frame."""
    side = release_sample_size(config) // config.patch_size
    frames = config.window[0]
    table = position_table(config.hidden_size, frames, side, side,
                           scale=config.pos_interp_scale)
    device = "cpu" if like.is_meta else like.device
    return table.reshape(1, frames, side * side, -1).to(like.dtype).to(device)


#################################################################################
#                              The Format and entry                             #
#################################################################################

_MARKERS = (".proxy_attn1.", ".pvisual_attn2.", ".linear_1_visual.", ".proxy_scale_shift_table")


def _detect(state_dict: Mapping[str, Tensor], config: dict | None) -> bool:
    return any(k.startswith("transformer_blocks.") and any(m in k for m in _MARKERS)
               for k in state_dict)


def expected_shapes(config: PTDiTConfig) -> dict[str, tuple[int, ...]]:
    """Every release key and its shape for `config` (the position buffer excepted)."""
    with torch.device("meta"):
        model = PTDiT(config)
    sd = from_ptdit_state_dict(model.state_dict(), config)
    return {k: tuple(v.shape) for k, v in sd.items() if k != POS_BUFFER}


def check_keys(state_dict: Mapping[str, Tensor], config: PTDiTConfig) -> None:
    """ValueError listing, in the release's names, every missing key, unexpected key and shape
    mismatch of a release checkpoint against `config`."""
    expected = expected_shapes(config)
    given = {k: tuple(v.shape) for k, v in state_dict.items() if k != POS_BUFFER}
    missing = sorted(set(expected) - set(given))
    unexpected = sorted(set(given) - set(expected))
    mismatched = [f"{k}: checkpoint {given[k]}, expected {expected[k]}"
                  for k in sorted(set(given) & set(expected)) if given[k] != expected[k]]
    if missing or unexpected or mismatched:
        lines = [f"official PT-DiT checkpoint does not match its config ({config.depth} blocks, "
                 f"width {config.hidden_size}, window {config.window}):"]
        if missing:
            lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
        lines += [f"  shape mismatch {m}" for m in mismatched]
        lines.append("  (a truncated file, or a predictor JSON of another model: pass the "
                     "matching one as config= or <file>.json)")
        raise ValueError("\n".join(lines))


def _to_ptdit(state_dict: StateDict, config: dict | None) -> tuple[PTDiTConfig, StateDict]:
    ours = ptdit_config(config if config is not None else infer_predictor(state_dict))
    check_keys(state_dict, ours)
    return ours, to_ptdit_state_dict(state_dict)


def _named(state_dict: StateDict, config: dict | None, named: PTDiTConfig
           ) -> tuple[dict | None, dict]:
    """For load(name=) of a file without its predictor JSON: the predictor read off the shapes
    with the named model's head count (and window, if it has one); the named model's window
    (None: the paper's schedule) and EXTRA_FIELDS then replace the release's guesses. A given
    predictor says all (the name is then checked against it)."""
    if config is not None:
        return config, {}
    predictor = infer_predictor(state_dict, num_heads=named.num_heads)
    if named.window is not None:
        predictor |= {"compress_ratios": list(named.window),
                      "proxy_compress_ratios": list(named.window)}
    return predictor, {f: getattr(named, f) for f in ("window", *EXTRA_FIELDS)}


def sidecar_json(config: PTDiTConfig) -> dict:
    """The predictor JSON, or {"predictor": ..., EXTRA_KEY: ...} when our config has fields
    the predictor cannot say (EXTRA_FIELDS) at other values than their defaults."""
    predictor = predictor_json(config)
    extra = changed_fields(config, EXTRA_FIELDS, tuple(EXTRA_FIELDS))
    return {"predictor": predictor, EXTRA_KEY: extra} if extra else predictor


def _from_ptdit(config: PTDiTConfig, state_dict: StateDict) -> tuple[StateDict, dict]:
    sidecar = sidecar_json(config)   # first: it names what the release cannot express
    return from_ptdit_state_dict(state_dict, config), sidecar


OFFICIAL_PTDIT = Format(name="official-ptdit", family="PT-DiT", detect=_detect,
                        to_ptdit=_to_ptdit, from_ptdit=_from_ptdit, named=_named)


def from_official_ptdit(state_dict: Mapping[str, Tensor], config: Mapping | None = None,
                        dtype: torch.dtype | None = None) -> nn.Module:
    """Our PTDiT holding a release checkpoint, in the checkpoint's dtype (or `dtype`).

    Args:
        state_dict: the release's state dict (keys as in official_ptdit_1b_keys.json).
        config: the release's "predictor" JSON as a dict (or the whole inference JSON); None
            infers it from the shapes (see infer_predictor).
    """
    ours, sd = _to_ptdit(dict(state_dict), None if config is None else dict(config))
    return instantiate(ours, sd, dtype=dtype, source="official PT-DiT checkpoint")


def to_official_ptdit(model: nn.Module) -> tuple[StateDict, dict]:
    """The release's state dict and predictor JSON for one of our PT-DiT models (see
    sidecar_json: wrapped with EXTRA_KEY when the predictor cannot say the whole config)."""
    if not isinstance(model.config, PTDiTConfig):
        raise ValueError(f"the official PT-DiT format holds PT-DiT models, not "
                         f"{model.config.family}")
    return _from_ptdit(model.config, model.state_dict())
