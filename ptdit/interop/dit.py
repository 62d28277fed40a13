"""DiT checkpoints: facebookresearch/DiT `.pt` files and diffusers' `DiTTransformer2DModel`.

Our DiT keeps the official parameter names, so the facebook format is the identity on keys; its
files hold no config, which is read off the shapes (heads excepted). diffusers renames every
module, splits the fused qkv projection and stores the timestep and class embedders once per
block (`transformer_blocks.i.norm1.emb`); its config.json carries the sizes and `norm_eps`.

The facebook files say nothing of num_heads, norm_eps, freq_shift, class_dropout_prob (which
decides whether the label table's last row is the null class) or an mlp_ratio that the MLP width
does not give exactly; export writes them to the sidecar `<file>.json`, import takes them from
there (or from `config=`) and checks them against the shapes.

Numerical differences of diffusers' DiTTransformer2DModel from the official DiT, both
reproducible here through DiTConfig:
- `norm_eps` (1e-5 by default there) sets the eps of each block's MLP-branch LayerNorm only;
  the attention-branch and final norms are 1e-6, as in the official code. It maps both ways.
- Timestep frequencies are max_period^(-i/127) there (downscale_freq_shift=1, hard-coded),
  max_period^(-i/128) in the official code (`freq_shift` 1 vs 0). Import gives freq_shift=1, so
  the model computes what the checkpoint computes in diffusers. Export of another freq_shift
  (an official DiT's 0) records it in config.json under EXTRA_KEY ("ptdit_config", which
  diffusers ignores and keeps), so ptdit reloads the same model; diffusers itself computes
  with its own frequencies, as for the public diffusers DiT, which holds the official weights.

Sources: facebookresearch/DiT models.py, train.py, sample.py (`find_model`: the "ema" entry
of training checkpoints); diffusers `dit_transformer_2d.py`, `attention.py`
(BasicTransformerBlock), `normalization.py` (AdaLayerNormZero), `embeddings.py`
(CombinedTimestepLabelEmbeddings) and `scripts/convert_dit_to_diffusers.py`.
"""

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from ..configs import MODELS
from ..layers import position_table
from ..models import DiTConfig
from .base import EXTRA_KEY, Format, StateDict, changed_fields, extra_fields, named_fields, unwrap
from .ptdit_format import typed_config

DIT_HEADS = {(e.config.depth, e.config.hidden_size): e.config.num_heads for e in MODELS.values()
             if isinstance(e.config, DiTConfig)}   # (depth, width) -> heads of the named DiTs


def require(state_dict: Mapping[str, Tensor], expected: set[str], what: str,
            optional: set[str] = frozenset()) -> None:
    """ValueError listing the missing and unexpected keys of a checkpoint, if any."""
    missing = sorted(expected - set(state_dict))
    unexpected = sorted(set(state_dict) - expected - set(optional))
    if missing or unexpected:
        lines = [f"{what}: the checkpoint does not match the expected keys"]
        if missing:
            lines.append(f"missing ({len(missing)}): {', '.join(missing)}")
        if unexpected:
            lines.append(f"unexpected ({len(unexpected)}): {', '.join(unexpected)}")
        raise ValueError("\n".join(lines))


def block_count(state_dict: Mapping[str, Tensor], prefix: str) -> int:
    """1 + the largest i of keys `{prefix}.i.…` (0 if none)."""
    ids = [int(k.split(".")[1]) for k in state_dict
           if k.startswith(prefix + ".") and k.split(".")[1].isdigit()]
    return max(ids, default=-1) + 1


def checked_config(cls, inferred: dict, overrides: dict | None, what: str):
    """`cls(**inferred, **overrides)`; overrides may only add fields the shapes cannot give."""
    overrides = dict(overrides or {})
    clash = {k: (v, overrides[k]) for k, v in inferred.items()
             if k in overrides and overrides[k] != v}
    if clash:
        raise ValueError(f"{what}: the given config disagrees with the checkpoint's shapes: "
                         + "; ".join(f"{k}: checkpoint {a}, given {b}"
                                     for k, (a, b) in clash.items()))
    return typed_config(cls, {**inferred, **overrides}, what)


def mlp_ratio_for(hidden: int, width: int, overrides: dict, what: str) -> float:
    """The MLP ratio of `hidden` MLP units at `width`: the given one (popped from `overrides`)
    when int(width·ratio) is `hidden` (a ratio such as 1/3 is not hidden / width), else
    hidden / width."""
    ratio = overrides.pop("mlp_ratio", None)
    if ratio is None:
        return hidden / width
    if (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
            or int(width * ratio) != hidden):
        raise ValueError(f"{what}: the given mlp_ratio {ratio!r} does not give the checkpoint's "
                         f"{hidden} MLP units at width {width} (int(width·mlp_ratio) must)")
    return ratio


def heads_for(depth: int, width: int, registry: dict, overrides: dict | None, what: str) -> int:
    """Attention heads (not in the shapes): given in `overrides`, else the named model's."""
    if overrides and "num_heads" in overrides:
        return overrides["num_heads"]
    if (depth, width) in registry:
        return registry[(depth, width)]
    raise ValueError(
        f"{what}: depth {depth}, width {width} matches no named model, and the number of "
        f"attention heads is not in the weights; load it with name= (a model of the same "
        f"size) or pass num_heads. Known sizes (depth, width): heads: {registry}")


#################################################################################
#                       facebookresearch/DiT .pt checkpoints                    #
#################################################################################

def dit_keys(depth: int) -> set[str]:
    """Every key of an official DiT state dict of `depth` blocks."""
    keys = {"pos_embed", "x_embedder.proj.weight", "x_embedder.proj.bias",
            "y_embedder.embedding_table.weight"}
    params = ("weight", "bias")
    keys |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in params}
    keys |= {f"final_layer.{m}.{p}" for m in ("linear", "adaLN_modulation.1") for p in params}
    keys |= {f"blocks.{i}.{m}.{p}" for i in range(depth) for p in params
             for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1")}
    return keys


def _detect_facebook(state_dict: Mapping[str, Tensor], config: dict | None) -> bool:
    keys = set(unwrap(state_dict))
    return {"pos_embed", "x_embedder.proj.weight", "y_embedder.embedding_table.weight",
            "t_embedder.mlp.0.weight", "blocks.0.attn.qkv.weight",
            "blocks.0.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.weight"} <= keys


# DiTConfig fields a facebook file cannot say; its sidecar holds them.
FACEBOOK_SIDECAR = ("num_heads", "mlp_ratio", "class_dropout_prob", "norm_eps", "freq_shift")
# Those the shapes never give (mlp_ratio they do, for the named models): load(name=) takes them
# from the named model where the sidecar and config= do not say them.
FACEBOOK_NAMED = ("num_heads", "class_dropout_prob", "norm_eps", "freq_shift")


def _facebook_to_ptdit(state_dict: Mapping[str, Tensor], config: dict | None
                       ) -> tuple[DiTConfig, StateDict]:
    """`config`: None, or DiTConfig fields the shapes cannot give (FACEBOOK_SIDECAR: the sidecar
    that export writes); the fields the shapes do give must agree with them."""
    what = "facebook DiT"
    sd = unwrap(state_dict)
    depth = block_count(sd, "blocks")
    require(sd, dit_keys(max(depth, 1)), what)
    overrides = dict(config or {})
    dropout = overrides.get("class_dropout_prob", 0.1)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)):
        raise ValueError(f"{what}: class_dropout_prob must be a number, got {dropout!r}")
    D, C, p = sd["x_embedder.proj.weight"].shape[:3]
    tokens = sd["pos_embed"].shape[1]
    grid = math.isqrt(tokens)
    if grid * grid != tokens:
        raise ValueError(f"{what}: pos_embed holds {tokens} positions, not a square grid")
    out_channels = sd["final_layer.linear.weight"].shape[0] // (p * p)
    if out_channels not in (C, 2 * C):
        raise ValueError(f"{what}: final layer predicts {out_channels} channels for {C} input "
                         f"channels; allowed: {C} or {2 * C} (learned sigma)")
    # the label table holds num_classes rows, and the null class's when class_dropout_prob > 0
    inferred = dict(depth=depth, hidden_size=D, patch_size=p, input_size=grid * p,
                    in_channels=C, learn_sigma=out_channels == 2 * C,
                    mlp_ratio=mlp_ratio_for(sd["blocks.0.mlp.fc1.weight"].shape[0], D, overrides,
                                            what),
                    num_classes=sd["y_embedder.embedding_table.weight"].shape[0] - (dropout > 0))
    inferred["num_heads"] = heads_for(depth, D, DIT_HEADS, overrides, what)
    return checked_config(DiTConfig, inferred, overrides, what), sd


def _facebook_from_ptdit(config: DiTConfig, state_dict: StateDict) -> tuple[StateDict, dict]:
    return dict(state_dict), {f: getattr(config, f) for f in FACEBOOK_SIDECAR}


FACEBOOK_DIT = Format(name="facebook-dit", family="DiT", detect=_detect_facebook,
                      to_ptdit=_facebook_to_ptdit, from_ptdit=_facebook_from_ptdit,
                      named=named_fields(FACEBOOK_NAMED))


#################################################################################
#                      diffusers DiTTransformer2DModel                          #
#################################################################################

DIFFUSERS_DIT_DEFAULTS = {  # DiTTransformer2DModel.__init__ defaults (diffusers 0.42)
    "num_attention_heads": 16, "attention_head_dim": 72, "in_channels": 4, "out_channels": None,
    "num_layers": 28, "attention_bias": True, "sample_size": 32, "patch_size": 2,
    "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero", "norm_elementwise_affine": False, "norm_eps": 1e-5,
}
_DIFFUSERS_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
# DiTConfig fields config.json cannot say: the values diffusers' DiT computes with. A model with
# other values records them under EXTRA_KEY.
DIFFUSERS_DIT_IMPLIED = {"freq_shift": 1, "class_dropout_prob": 0.1}
_EMB = "norm1.emb"  # per-block copy of the timestep and class embedders
_SHARED = {  # ours -> diffusers' name under transformer_blocks.i.norm1.emb
    **{f"t_embedder.mlp.{i}.{p}": f"timestep_embedder.linear_{j}.{p}"
       for i, j in ((0, 1), (2, 2)) for p in ("weight", "bias")},
    "y_embedder.embedding_table.weight": "class_embedder.embedding_table.weight",
}


def split_qkv(prefix: str, weight: Tensor, bias: Tensor, names=("to_q", "to_k", "to_v")
              ) -> StateDict:
    """A fused projection -> diffusers' separate ones (copies, so no two keys share memory)."""
    out = {}
    for name, w, b in zip(names, weight.chunk(len(names)), bias.chunk(len(names))):
        out[f"{prefix}.{name}.weight"] = w.clone()
        out[f"{prefix}.{name}.bias"] = b.clone()
    return out


def fuse(sd: StateDict, prefix: str, names=("to_q", "to_k", "to_v")) -> tuple[Tensor, Tensor]:
    """Pops diffusers' separate projections and concatenates them: (weight, bias)."""
    weight = torch.cat([sd.pop(f"{prefix}.{n}.weight") for n in names])
    bias = torch.cat([sd.pop(f"{prefix}.{n}.bias") for n in names])
    return weight, bias


def pop_linear(sd: StateDict, src: str, out: StateDict, dst: str) -> None:
    """Moves `src.weight` / `src.bias` of `sd` to `dst.weight` / `dst.bias` of `out`."""
    for p in ("weight", "bias"):
        out[f"{dst}.{p}"] = sd.pop(f"{src}.{p}")


def diffusers_config(config: dict | None, defaults: dict, classes: tuple[str, ...],
                     norm_type: str, what: str) -> dict:
    """config.json with the class defaults filled in; ValueError on what we cannot build."""
    if config is None:
        raise ValueError(f"{what}: a diffusers checkpoint needs its config.json")
    cfg = {**defaults, **{k: v for k, v in config.items() if not k.startswith("_")}}
    name = config.get("_class_name", classes[0])
    fixed = {"activation_fn": "gelu-approximate", "attention_bias": True,
             "norm_elementwise_affine": False, "norm_type": norm_type}
    wrong = {k: cfg[k] for k, v in fixed.items() if cfg[k] != v}
    if name not in classes or wrong:
        raise ValueError(f"{what}: unsupported config ({name} {wrong}); allowed: {classes[0]} "
                         f"with {fixed}")
    return cfg


def _detect_diffusers_dit(state_dict: Mapping[str, Tensor], config: dict | None) -> bool:
    keys = set(state_dict)
    if config is not None and config.get("_class_name") not in _DIFFUSERS_DIT_CLASSES + (None,):
        return False
    return {"pos_embed.proj.weight", "proj_out_1.weight", "proj_out_2.weight",
            f"transformer_blocks.0.{_EMB}.class_embedder.embedding_table.weight",
            "transformer_blocks.0.norm1.linear.weight"} <= keys


def _diffusers_dit_to_ptdit(state_dict: Mapping[str, Tensor], config: dict | None
                            ) -> tuple[DiTConfig, StateDict]:
    what = "diffusers DiTTransformer2DModel"
    cfg = diffusers_config(config, DIFFUSERS_DIT_DEFAULTS, _DIFFUSERS_DIT_CLASSES,
                           "ada_norm_zero", what)
    extra = extra_fields(config, tuple(DIFFUSERS_DIT_IMPLIED), what)
    dropout = extra.get("class_dropout_prob", 0.1)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or dropout <= 0:
        raise ValueError(f"{what}: {EXTRA_KEY} class_dropout_prob must be a positive number "
                         f"(the label table there always holds the null class), got {dropout!r}")
    depth, C = cfg["num_layers"], cfg["in_channels"]
    D = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    out_channels = cfg["out_channels"] or C
    if out_channels not in (C, 2 * C):
        raise ValueError(f"{what}: out_channels {out_channels} for in_channels {C}; allowed: "
                         f"{C} or {2 * C} (learned sigma)")
    sd = dict(state_dict)
    block = [f"{m}.{p}" for m in ("norm1.linear", "attn1.to_q", "attn1.to_k", "attn1.to_v",
                                  "attn1.to_out.0", "ff.net.0.proj", "ff.net.2")
             for p in ("weight", "bias")] + [f"{_EMB}.{e}" for e in _SHARED.values()]
    require(sd, {f"transformer_blocks.{i}.{k}" for i in range(depth) for k in block}
            | {f"{m}.{p}" for m in ("pos_embed.proj", "proj_out_1", "proj_out_2")
               for p in ("weight", "bias")}, what)

    out: StateDict = {}
    for ours, theirs in _SHARED.items():  # one copy per block there, one here: must agree
        copies = [sd.pop(f"transformer_blocks.{i}.{_EMB}.{theirs}") for i in range(depth)]
        differ = [i for i in range(1, depth) if not torch.equal(copies[i], copies[0])]
        if differ:
            raise ValueError(f"{what}: {_EMB}.{theirs} differs between transformer_blocks 0 and "
                             f"{differ}; our DiT has one timestep/class embedder for all blocks")
        out[ours] = copies[0]
    pop_linear(sd, "pos_embed.proj", out, "x_embedder.proj")
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}", f"blocks.{i}"
        pop_linear(sd, f"{src}.norm1.linear", out, f"{dst}.adaLN_modulation.1")
        out[f"{dst}.attn.qkv.weight"], out[f"{dst}.attn.qkv.bias"] = fuse(sd, f"{src}.attn1")
        pop_linear(sd, f"{src}.attn1.to_out.0", out, f"{dst}.attn.proj")
        pop_linear(sd, f"{src}.ff.net.0.proj", out, f"{dst}.mlp.fc1")
        pop_linear(sd, f"{src}.ff.net.2", out, f"{dst}.mlp.fc2")
    pop_linear(sd, "proj_out_1", out, "final_layer.adaLN_modulation.1")
    pop_linear(sd, "proj_out_2", out, "final_layer.linear")

    p = cfg["patch_size"]
    inferred = dict(
        depth=depth, hidden_size=D, num_heads=cfg["num_attention_heads"], patch_size=p,
        input_size=cfg["sample_size"], in_channels=C, learn_sigma=out_channels == 2 * C,
        mlp_ratio=out["blocks.0.mlp.fc1.weight"].shape[0] / D,
        num_classes=cfg["num_embeds_ada_norm"], norm_eps=cfg["norm_eps"])
    config_out = checked_config(DiTConfig, inferred, {**DIFFUSERS_DIT_IMPLIED, **extra}, what)
    grid = config_out.input_size // p
    weight = out["x_embedder.proj.weight"]
    out["pos_embed"] = position_table(D, None, grid, grid)[None].to(weight.dtype)
    return config_out, out


def _diffusers_dit_from_ptdit(config: DiTConfig, state_dict: StateDict
                              ) -> tuple[StateDict, dict]:
    what = "diffusers DiTTransformer2DModel"
    D = config.hidden_size
    if config.mlp_ratio != 4.0 or config.class_dropout_prob <= 0:
        raise ValueError(f"{what} has mlp_ratio 4 and a null class; this model has mlp_ratio "
                         f"{config.mlp_ratio}, class_dropout_prob {config.class_dropout_prob}")
    sd = dict(state_dict)
    sd.pop("pos_embed")  # diffusers recomputes its table
    out: StateDict = {}
    pop_linear(sd, "x_embedder.proj", out, "pos_embed.proj")
    emb = {theirs: sd.pop(ours) for ours, theirs in _SHARED.items()}
    for i in range(config.depth):
        src, dst = f"blocks.{i}", f"transformer_blocks.{i}"
        out |= {f"{dst}.{_EMB}.{k}": v.clone() for k, v in emb.items()}
        pop_linear(sd, f"{src}.adaLN_modulation.1", out, f"{dst}.norm1.linear")
        out |= split_qkv(f"{dst}.attn1", sd.pop(f"{src}.attn.qkv.weight"),
                         sd.pop(f"{src}.attn.qkv.bias"))
        pop_linear(sd, f"{src}.attn.proj", out, f"{dst}.attn1.to_out.0")
        pop_linear(sd, f"{src}.mlp.fc1", out, f"{dst}.ff.net.0.proj")
        pop_linear(sd, f"{src}.mlp.fc2", out, f"{dst}.ff.net.2")
    pop_linear(sd, "final_layer.adaLN_modulation.1", out, "proj_out_1")
    pop_linear(sd, "final_layer.linear", out, "proj_out_2")
    require(sd, set(), f"{what} export")   # nothing of ours may be left behind
    C = config.in_channels
    config_json = {
        "_class_name": "DiTTransformer2DModel",
        "num_attention_heads": config.num_heads, "attention_head_dim": D // config.num_heads,
        "in_channels": C, "out_channels": 2 * C if config.learn_sigma else C,
        "num_layers": config.depth, "dropout": 0.0, "norm_num_groups": 32,
        "attention_bias": True, "sample_size": config.input_size,
        "patch_size": config.patch_size, "activation_fn": "gelu-approximate",
        "num_embeds_ada_norm": config.num_classes, "upcast_attention": False,
        "norm_type": "ada_norm_zero", "norm_elementwise_affine": False,
        "norm_eps": config.norm_eps,
    }
    extra = changed_fields(config, DIFFUSERS_DIT_IMPLIED, tuple(DIFFUSERS_DIT_IMPLIED))
    if extra:
        config_json[EXTRA_KEY] = extra
    return out, config_json


DIFFUSERS_DIT = Format(name="diffusers-dit", family="DiT", detect=_detect_diffusers_dit,
                       to_ptdit=_diffusers_dit_to_ptdit, from_ptdit=_diffusers_dit_from_ptdit,
                       config_keys=frozenset({*DIFFUSERS_DIT_DEFAULTS, EXTRA_KEY}))
