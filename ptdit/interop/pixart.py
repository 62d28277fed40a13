"""PixArt-α checkpoints: the official `.pth` files and diffusers' `PixArtTransformer2DModel`.

Our PixArt keeps the official parameter names. The official files are {"state_dict": ...} and
also hold the sin-cos table `pos_embed` of the configured size (ours computes positions for
every input and drops it; it is written back on export) and, for the multi-scale 1024 model,
PixArtMS's `csize_embedder` / `ar_embedder` (our `micro_condition`). diffusers renames the
modules (`adaln_single`, `caption_projection`, `transformer_blocks.i.attn1/attn2`, `proj_out`,
`scale_shift_table`), splits the fused projections and drops the learned null caption
`y_embedder.y_embedding` (our `null_caption`; export to diffusers drops it with a warning).

Fields neither format says travel beside it: for the official files, whose only config is the
shapes, the sidecar `<file>.json` holds num_heads, norm_eps, pos_interp_scale, ... (checked
against the shapes and the stored pos_embed on import); diffusers' config.json carries
class_dropout_prob and model_max_length under EXTRA_KEY ("ptdit_config") when they differ
from the values import assumes.

Config correspondences: `sample_size` = our `input_size` (latent side the positions are defined
on), `interpolation_scale` = `pos_interp_scale` (PixArt's `lewei_scale`),
`use_additional_conditions` = `micro_condition`, `norm_eps` = `norm_eps` (the blocks' two
LayerNorms; the final one is 1e-6 in both).

Sources: PixArt-alpha/PixArt-alpha `diffusion/model/nets/PixArt.py`, `PixArtMS.py`,
`PixArt_blocks.py` (SizeEmbedder), `tools/convert_pixart_alpha_to_diffusers.py`,
`scripts/inference.py`; diffusers `pixart_transformer_2d.py`, `normalization.py`
(AdaLayerNormSingle), `embeddings.py` (PixArtAlphaCombinedTimestepSizeEmbeddings, PatchEmbed).
"""

import warnings
from collections.abc import Mapping

import torch
from torch import Tensor

from ..configs import MODELS
from ..layers import position_table
from ..models import PixArtConfig
from .base import EXTRA_KEY, Format, StateDict, changed_fields, extra_fields, unwrap
from .dit import (
    block_count,
    checked_config,
    diffusers_config,
    fuse,
    heads_for,
    mlp_ratio_for,
    pop_linear,
    require,
    split_qkv,
)

PIXART_HEADS = {(e.config.depth, e.config.hidden_size): e.config.num_heads
                for e in MODELS.values() if isinstance(e.config, PixArtConfig)}

# The released PixArt-α checkpoints. input_size: latent side (pixels / 8); pos_interp_scale:
# the `lewei_scale` the official inference scripts use per image size, {256: 1, 512: 1,
# 1024: 2} (PixArt-alpha scripts/inference.py and its siblings; diffusers' default
# max(sample_size // 64, 1) gives the same). diffusers' conversion script also declares
# {256: 0.5, ...} but never passes it to the model. micro_condition: the 1024 model is a
# PixArtMS; 256 and 512 are plain PixArt_XL_2.
PIXART_RELEASES = {
    "PixArt-XL-2-256x256": dict(input_size=32, pos_interp_scale=1.0, micro_condition=False),
    "PixArt-XL-2-512x512": dict(input_size=64, pos_interp_scale=1.0, micro_condition=False),
    "PixArt-XL-2-1024-MS": dict(input_size=128, pos_interp_scale=2.0, micro_condition=True),
}
_SCALES = (0.5, 1.0, 2.0, 4.0)  # lewei scales tried against a stored pos_embed


def default_interp_scale(input_size: int) -> float:
    """The release's interpolation scale for a latent side, else diffusers' rule."""
    for release in PIXART_RELEASES.values():
        if release["input_size"] == input_size:
            return release["pos_interp_scale"]
    return float(max(input_size // 64, 1))


def _pos_table(hidden_size: int, grid: int, scale: float) -> Tensor:
    """(1, grid², D) float64 table of a square grid at its own base size."""
    return position_table(hidden_size, None, grid, grid, scale=scale, base_size=grid)[None]


#################################################################################
#                        Official PixArt-α .pth checkpoints                     #
#################################################################################

_MS = {f"{e}.mlp.{i}.{p}" for e in ("csize_embedder", "ar_embedder") for i in (0, 2)
       for p in ("weight", "bias")}


def pixart_keys(depth: int, micro_condition: bool) -> set[str]:
    """Every parameter key of an official PixArt(MS) state dict (pos_embed, y_embedding aside)."""
    params = ("weight", "bias")
    keys = {f"{m}.{p}" for p in params for m in (
        "x_embedder.proj", "t_embedder.mlp.0", "t_embedder.mlp.2", "t_block.1",
        "y_embedder.y_proj.fc1", "y_embedder.y_proj.fc2", "final_layer.linear")}
    keys.add("final_layer.scale_shift_table")
    keys |= {f"blocks.{i}.scale_shift_table" for i in range(depth)}
    keys |= {f"blocks.{i}.{m}.{p}" for i in range(depth) for p in params for m in (
        "attn.qkv", "attn.proj", "cross_attn.q_linear", "cross_attn.kv_linear",
        "cross_attn.proj", "mlp.fc1", "mlp.fc2")}
    return keys | (_MS if micro_condition else set())


def _detect_official(state_dict: Mapping[str, Tensor], config: dict | None) -> bool:
    keys = set(unwrap(state_dict))
    return {"t_block.1.weight", "y_embedder.y_proj.fc1.weight", "blocks.0.scale_shift_table",
            "blocks.0.cross_attn.q_linear.weight", "final_layer.scale_shift_table"} <= keys


# PixArtConfig fields an official file cannot say (or, without a null caption, its length);
# its sidecar holds them.
OFFICIAL_SIDECAR = ("num_heads", "mlp_ratio", "class_dropout_prob", "norm_eps",
                    "pos_interp_scale", "model_max_length")


def _official_named(state_dict: Mapping[str, Tensor], config: dict | None,
                    named: PixArtConfig) -> tuple[dict, dict]:
    """For load(name=): the named model's fields the shapes never give (and its caption length
    when the file has no null caption to read it from) under the given config."""
    fields = ["num_heads", "class_dropout_prob", "norm_eps"]
    if "y_embedder.y_embedding" not in unwrap(state_dict):
        fields.append("model_max_length")
    return {**{f: getattr(named, f) for f in fields}, **(config or {})}, {}


def _official_to_ptdit(state_dict: Mapping[str, Tensor], config: dict | None
                       ) -> tuple[PixArtConfig, StateDict]:
    """`config`: None, or PixArtConfig fields the shapes cannot give (OFFICIAL_SIDECAR: the
    sidecar that export writes; input_size when the file has no pos_embed). The fields the
    shapes give must agree with them, and a given pos_interp_scale with the stored pos_embed."""
    what = "official PixArt-α"
    sd = unwrap(state_dict)
    depth = block_count(sd, "blocks")
    micro = "csize_embedder.mlp.0.weight" in sd
    require(sd, pixart_keys(max(depth, 1), micro), what,
            optional={"pos_embed", "y_embedder.y_embedding"})
    overrides = dict(config or {})
    D, C, p = sd["x_embedder.proj.weight"].shape[:3]
    out_channels = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if out_channels not in (C, 2 * C):
        raise ValueError(f"{what}: final layer predicts {out_channels} channels for {C} input "
                         f"channels; allowed: {C} or {2 * C} (learned sigma)")
    inferred = dict(depth=depth, hidden_size=D, patch_size=p, in_channels=C,
                    learn_sigma=out_channels == 2 * C,
                    mlp_ratio=mlp_ratio_for(sd["blocks.0.mlp.fc1.weight"].shape[0], D, overrides,
                                            what),
                    caption_channels=sd["y_embedder.y_proj.fc1.weight"].shape[1],
                    micro_condition=micro, null_caption="y_embedder.y_embedding" in sd)
    if inferred["null_caption"]:
        inferred["model_max_length"] = sd["y_embedder.y_embedding"].shape[0]
    inferred["num_heads"] = heads_for(depth, D, PIXART_HEADS, overrides, what)

    pos_embed = sd.pop("pos_embed", None)
    if pos_embed is not None:
        grid = round(pos_embed.shape[1] ** 0.5)
        if grid * grid != pos_embed.shape[1]:
            raise ValueError(f"{what}: pos_embed holds {pos_embed.shape[1]} positions, not a "
                             "square grid")
        inferred["input_size"] = grid * p
        if "pos_interp_scale" in overrides:
            _check_scale(pos_embed, D, grid, overrides["pos_interp_scale"], what)
        else:
            inferred["pos_interp_scale"] = _stored_scale(pos_embed, D, grid, p, what)
    elif "input_size" not in overrides:
        raise ValueError(f"{what}: the file has no pos_embed to read the configured size from; "
                         f"pass input_size (latent side: 32, 64 or 128 for the releases)")
    else:
        overrides.setdefault("pos_interp_scale", default_interp_scale(overrides["input_size"]))
    return checked_config(PixArtConfig, inferred, overrides, what), sd


def _is_table(pos_embed: Tensor, hidden_size: int, grid: int, scale: float) -> bool:
    """Whether the stored table is the sin-cos table of `scale`, up to its dtype's rounding."""
    atol = max(1e-5, torch.finfo(pos_embed.dtype).eps)
    table = _pos_table(hidden_size, grid, scale).to(pos_embed.device)
    return torch.allclose(pos_embed.double(), table, atol=atol, rtol=0)


def _stored_scale(pos_embed: Tensor, hidden_size: int, grid: int, patch_size: int,
                  what: str) -> float:
    """The lewei scale the stored sin-cos table was built with; the release's value is tried
    first."""
    for scale in (default_interp_scale(grid * patch_size), *_SCALES):
        if _is_table(pos_embed, hidden_size, grid, scale):
            return scale
    raise ValueError(f"{what}: pos_embed is no sin-cos table with interpolation scale in "
                     f"{_SCALES}; pass pos_interp_scale")


def _check_scale(pos_embed: Tensor, hidden_size: int, grid: int, scale, what: str) -> None:
    if (isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0
            or not _is_table(pos_embed, hidden_size, grid, scale)):
        raise ValueError(f"{what}: the given pos_interp_scale {scale!r} does not match the "
                         f"stored pos_embed (a sin-cos table of another scale); leave it out to "
                         f"read the scale off the table")


def _official_from_ptdit(config: PixArtConfig, state_dict: StateDict) -> tuple[StateDict, dict]:
    grid = config.input_size // config.patch_size
    weight = state_dict["x_embedder.proj.weight"]
    table = _pos_table(config.hidden_size, grid, config.pos_interp_scale)
    return ({**state_dict, "pos_embed": table.to(weight.dtype)},
            {f: getattr(config, f) for f in OFFICIAL_SIDECAR})


OFFICIAL_PIXART = Format(name="official-pixart", family="PixArt", detect=_detect_official,
                         to_ptdit=_official_to_ptdit, from_ptdit=_official_from_ptdit,
                         named=_official_named)


#################################################################################
#                      diffusers PixArtTransformer2DModel                       #
#################################################################################

DIFFUSERS_PIXART_DEFAULTS = {  # PixArtTransformer2DModel.__init__ defaults (diffusers 0.42)
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": 8,
    "num_layers": 28, "cross_attention_dim": 1152, "attention_bias": True, "sample_size": 128,
    "patch_size": 2, "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_single", "norm_elementwise_affine": False, "norm_eps": 1e-6,
    "interpolation_scale": None, "use_additional_conditions": None, "caption_channels": None,
}
_DIFFUSERS_PIXART_CLASSES = ("PixArtTransformer2DModel", "Transformer2DModel")

_TOP = {  # ours -> diffusers, outside the blocks (linears; weight and bias each)
    "x_embedder.proj": "pos_embed.proj",
    "t_embedder.mlp.0": "adaln_single.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "adaln_single.emb.timestep_embedder.linear_2",
    "t_block.1": "adaln_single.linear",
    "y_embedder.y_proj.fc1": "caption_projection.linear_1",
    "y_embedder.y_proj.fc2": "caption_projection.linear_2",
    "final_layer.linear": "proj_out",
}
_TOP_MS = {
    "csize_embedder.mlp.0": "adaln_single.emb.resolution_embedder.linear_1",
    "csize_embedder.mlp.2": "adaln_single.emb.resolution_embedder.linear_2",
    "ar_embedder.mlp.0": "adaln_single.emb.aspect_ratio_embedder.linear_1",
    "ar_embedder.mlp.2": "adaln_single.emb.aspect_ratio_embedder.linear_2",
}
_BLOCK = {"attn.proj": "attn1.to_out.0", "cross_attn.q_linear": "attn2.to_q",
          "cross_attn.proj": "attn2.to_out.0", "mlp.fc1": "ff.net.0.proj", "mlp.fc2": "ff.net.2"}
_NULL_CAPTION = "caption_projection.y_embedding"  # kept by early diffusers conversions
# PixArtConfig fields config.json cannot say, and the values import assumes; a model with other
# values records them under EXTRA_KEY.
DIFFUSERS_PIXART_IMPLIED = {"class_dropout_prob": 0.1, "model_max_length": 120}


def _diffusers_pixart_keys(depth: int, micro_condition: bool) -> set[str]:
    linears = [*_TOP.values(), *(_TOP_MS.values() if micro_condition else ())]
    keys = {f"{m}.{p}" for m in linears for p in ("weight", "bias")} | {"scale_shift_table"}
    block = [*_BLOCK.values(), "attn1.to_q", "attn1.to_k", "attn1.to_v", "attn2.to_k",
             "attn2.to_v"]
    keys |= {f"transformer_blocks.{i}.{m}.{p}" for i in range(depth) for m in block
             for p in ("weight", "bias")}
    return keys | {f"transformer_blocks.{i}.scale_shift_table" for i in range(depth)}


def _detect_diffusers_pixart(state_dict: Mapping[str, Tensor], config: dict | None) -> bool:
    if config is not None and config.get("_class_name") not in _DIFFUSERS_PIXART_CLASSES + (None,):
        return False
    keys = set(state_dict)
    if "transformer_blocks.0.proxy_attn1.to_q.weight" in keys:  # the PT-DiT release grew from
        return False                                              # these keys: not PixArt
    return {"adaln_single.linear.weight", "caption_projection.linear_1.weight", "proj_out.weight",
            "transformer_blocks.0.scale_shift_table",
            "transformer_blocks.0.attn2.to_q.weight"} <= keys


def _diffusers_pixart_to_ptdit(state_dict: Mapping[str, Tensor], config: dict | None
                               ) -> tuple[PixArtConfig, StateDict]:
    what = "diffusers PixArtTransformer2DModel"
    cfg = diffusers_config(config, DIFFUSERS_PIXART_DEFAULTS, _DIFFUSERS_PIXART_CLASSES,
                           "ada_norm_single", what)
    depth, C, sample_size = cfg["num_layers"], cfg["in_channels"], cfg["sample_size"]
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    out_channels = cfg["out_channels"] or C
    if cfg["caption_channels"] is None or cfg["cross_attention_dim"] != D:
        raise ValueError(f"{what}: ours projects captions (caption_channels set) to the model "
                         f"width; got caption_channels {cfg['caption_channels']}, "
                         f"cross_attention_dim {cfg['cross_attention_dim']} for width {D}")
    if out_channels not in (C, 2 * C):
        raise ValueError(f"{what}: out_channels {out_channels} for in_channels {C}; allowed: "
                         f"{C} or {2 * C} (learned sigma)")
    extra = extra_fields(config, tuple(DIFFUSERS_PIXART_IMPLIED), what)
    micro = cfg["use_additional_conditions"]
    micro = sample_size == 128 if micro is None else micro   # diffusers' rule
    scale = cfg["interpolation_scale"]
    scale = max(sample_size // 64, 1) if scale is None else scale
    sd = dict(state_dict)
    require(sd, _diffusers_pixart_keys(depth, micro), what, optional={_NULL_CAPTION})

    out: StateDict = {}
    for ours, theirs in {**_TOP, **(_TOP_MS if micro else {})}.items():
        pop_linear(sd, theirs, out, ours)
    out["final_layer.scale_shift_table"] = sd.pop("scale_shift_table")
    null_caption = sd.pop(_NULL_CAPTION, None)
    if null_caption is not None:
        out["y_embedder.y_embedding"] = null_caption
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"blocks.{i}"
        out[f"{dst}.scale_shift_table"] = sd.pop(f"{src}.scale_shift_table")
        out[f"{dst}.attn.qkv.weight"], out[f"{dst}.attn.qkv.bias"] = fuse(sd, f"{src}.attn1")
        kv = fuse(sd, f"{src}.attn2", names=("to_k", "to_v"))
        out[f"{dst}.cross_attn.kv_linear.weight"], out[f"{dst}.cross_attn.kv_linear.bias"] = kv
        for ours, theirs in _BLOCK.items():
            pop_linear(sd, f"{src}.{theirs}", out, f"{dst}.{ours}")

    inferred = dict(
        depth=depth, hidden_size=D, num_heads=cfg["num_attention_heads"],
        patch_size=cfg["patch_size"], input_size=sample_size, in_channels=C,
        mlp_ratio=out["blocks.0.mlp.fc1.weight"].shape[0] / D,
        caption_channels=cfg["caption_channels"], learn_sigma=out_channels == 2 * C,
        pos_interp_scale=float(scale), norm_eps=cfg["norm_eps"], micro_condition=micro,
        null_caption=null_caption is not None)
    if null_caption is not None:
        inferred["model_max_length"] = null_caption.shape[0]
    implied = {k: v for k, v in DIFFUSERS_PIXART_IMPLIED.items() if k not in inferred}
    return checked_config(PixArtConfig, inferred, {**implied, **extra}, what), out


def _diffusers_pixart_from_ptdit(config: PixArtConfig, state_dict: StateDict
                                 ) -> tuple[StateDict, dict]:
    """Refuses mlp_ratio ≠ 4. diffusers' model has no learned null caption: a model with one
    (null_caption=True) loses `y_embedder.y_embedding`, with a UserWarning, and reloads with
    null_caption=False (guidance then needs the empty prompt's T5 features, as diffusers'
    pipeline uses)."""
    what = "diffusers PixArtTransformer2DModel"
    if config.mlp_ratio != 4.0:
        raise ValueError(f"{what} has mlp_ratio 4; this model has {config.mlp_ratio}")
    sd = dict(state_dict)
    if sd.pop("y_embedder.y_embedding", None) is not None:
        warnings.warn(f"{what} has no learned null caption: y_embedder.y_embedding "
                      f"({config.model_max_length}×{config.caption_channels}) is dropped, and "
                      f"the converted model reloads with null_caption=False", stacklevel=3)
    out: StateDict = {}
    for ours, theirs in {**_TOP, **(_TOP_MS if config.micro_condition else {})}.items():
        pop_linear(sd, ours, out, theirs)
    out["scale_shift_table"] = sd.pop("final_layer.scale_shift_table")
    for i in range(config.depth):
        src, dst = f"blocks.{i}", f"transformer_blocks.{i}"
        out[f"{dst}.scale_shift_table"] = sd.pop(f"{src}.scale_shift_table")
        out |= split_qkv(f"{dst}.attn1", sd.pop(f"{src}.attn.qkv.weight"),
                         sd.pop(f"{src}.attn.qkv.bias"))
        out |= split_qkv(f"{dst}.attn2", sd.pop(f"{src}.cross_attn.kv_linear.weight"),
                         sd.pop(f"{src}.cross_attn.kv_linear.bias"), names=("to_k", "to_v"))
        for ours, theirs in _BLOCK.items():
            pop_linear(sd, f"{src}.{ours}", out, f"{dst}.{theirs}")
    require(sd, set(), f"{what} export")   # nothing of ours may be left behind
    D, C = config.hidden_size, config.in_channels
    config_json = {
        "_class_name": "PixArtTransformer2DModel",
        "num_attention_heads": config.num_heads, "attention_head_dim": D // config.num_heads,
        "in_channels": C, "out_channels": 2 * C if config.learn_sigma else C,
        "num_layers": config.depth, "dropout": 0.0, "norm_num_groups": 32,
        "cross_attention_dim": D, "attention_bias": True, "sample_size": config.input_size,
        "patch_size": config.patch_size, "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": 1000, "upcast_attention": False, "norm_type": "ada_norm_single",
        "norm_elementwise_affine": False, "norm_eps": config.norm_eps,
        "interpolation_scale": config.pos_interp_scale,
        "use_additional_conditions": config.micro_condition,
        "caption_channels": config.caption_channels, "attention_type": "default",
    }
    extra = changed_fields(config, DIFFUSERS_PIXART_IMPLIED, tuple(DIFFUSERS_PIXART_IMPLIED))
    if extra:
        config_json[EXTRA_KEY] = extra
    return out, config_json


DIFFUSERS_PIXART = Format(name="diffusers-pixart", family="PixArt",
                          detect=_detect_diffusers_pixart, to_ptdit=_diffusers_pixart_to_ptdit,
                          from_ptdit=_diffusers_pixart_from_ptdit,
                          config_keys=frozenset({*DIFFUSERS_PIXART_DEFAULTS, EXTRA_KEY}))
