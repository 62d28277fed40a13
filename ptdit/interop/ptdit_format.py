"""ptdit's own checkpoint format, and building a ptdit model from (config, ptdit state dict).

The format is a safetensors file whose metadata holds everything needed to rebuild the model:
`{"format": "ptdit", "family": "PT-DiT", "config": "<the config dataclass as JSON>",
"name": "<registry name or empty>"}`. Tensors carry ptdit's own parameter names. The name is
informative only: a loaded model is named by `registry_name` of its config.
"""

import dataclasses
import json
import types
import typing
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..checks import check_fields, model_dtype
from ..configs import CONFIG_CLASSES, get_config, list_models, model_class
from .base import Format, StateDict

# Provenance that files written before it moved to the registry carry among the fields.
LEGACY_FIELDS = ("source", "paper_params_m")
# The configured latent size and its position interpolation: they set the stored position
# table (DiT) or the positions' scale, not the layers; a registry name stands for any of them
# (DiT-XL/2 at 256 and at 512 px).
RESOLUTION_FIELDS = ("input_size", "pos_interp_scale")

def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def _type_ok(value, kind) -> bool:
    """Whether a JSON value fits a config annotation (int, float, bool, str, tuple, unions)."""
    if isinstance(kind, types.UnionType):
        return any(_type_ok(value, k) for k in typing.get_args(kind))
    kind = typing.get_origin(kind) or kind
    if kind is float:   # JSON may write a float as an int
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


def typed_config(cls: type, fields: Mapping, what: str):
    """`cls(**fields)`, with a ValueError naming an unknown field or one whose value does not
    fit its annotation (the config then checks the values)."""
    check_fields(cls, fields, what)
    for f in dataclasses.fields(cls):
        if f.name in fields and not isinstance(f.type, str) and not _type_ok(fields[f.name],
                                                                             f.type):
            kind = getattr(f.type, "__name__", str(f.type))
            raise ValueError(f"{what}: {f.name} must be {kind}, got {fields[f.name]!r}")
    try:
        return cls(**fields)
    except TypeError as err:
        raise ValueError(f"{what}: bad config field ({err})") from None


def config_from_dict(family: str, fields: Mapping) -> object:
    """The family's config dataclass from a dict of its fields (as written by config_to_dict)."""
    if not isinstance(family, str) or family not in CONFIG_CLASSES:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(CONFIG_CLASSES)}")
    if not isinstance(fields, Mapping):
        raise ValueError(f"a {family} config must be a JSON object of its fields, got "
                         f"{type(fields).__name__} {fields!r:.80}")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()
              if k not in LEGACY_FIELDS}
    return typed_config(CONFIG_CLASSES[family], fields, f"{family} config")


def layers(config) -> dict:
    """The config's fields without RESOLUTION_FIELDS: what a registry name stands for."""
    return {k: v for k, v in config_to_dict(config).items() if k not in RESOLUTION_FIELDS}


def registry_name(config) -> str | None:
    """The registry name whose configuration has the same layers (any configured resolution),
    if any."""
    for name in list_models():
        named = get_config(name)
        if type(named) is type(config) and layers(named) == layers(config):
            return name
    return None


def check_floating(state_dict: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """ValueError naming the first tensor that is not floating-point (an int32 weight, ...):
    every weight of every supported format is."""
    other = [k for k in sorted(state_dict) if not state_dict[k].is_floating_point()]
    if other:
        k, more = other[0], f" (and {len(other) - 1} more)" if len(other) > 1 else ""
        raise ValueError(f"{source}: weight {k}{more} is "
                         f"{str(state_dict[k].dtype).removeprefix('torch.')}; checkpoints hold "
                         "floating-point weights (float32, bfloat16, float16, float64)")


def checkpoint_dtype(state_dict: Mapping[str, Tensor]) -> torch.dtype:
    """The floating tensors' dtype; when they are mixed, the widest, so nothing is rounded."""
    dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    if not dtypes:
        raise ValueError("the checkpoint holds no floating-point tensors")
    return max(dtypes, key=lambda d: (torch.finfo(d).bits, torch.finfo(d).max))


def _describe_mismatch(missing, unexpected, mismatched, source: str) -> str:
    lines = [f"{source} does not match the model it describes:"]
    if missing:
        lines.append(f"  missing keys ({len(missing)}): {', '.join(missing)}")
    if unexpected:
        lines.append(f"  unexpected keys ({len(unexpected)}): {', '.join(unexpected)}")
    for key, got, want in mismatched:
        lines.append(f"  shape mismatch {key}: checkpoint {got}, model {want}")
    lines.append("  (a truncated file, a checkpoint of another model, or a wrong config / "
                 "format=: pass the matching config= or format=)")
    return "\n".join(lines)


def instantiate(config, state_dict: StateDict, dtype: torch.dtype | None = None,
                name: str | None = None, source: str = "checkpoint") -> nn.Module:
    """Builds the model for `config` on the meta device and assigns `state_dict` to it.

    The model takes the checkpoint's dtype (see checkpoint_dtype) unless `dtype` is given (a
    torch dtype or its name, see ptdit.configs.DTYPES). It is named `name`, else by
    `registry_name(config)`.
    Raises ValueError listing every missing key, unexpected key and shape mismatch at once.
    """
    dtype = model_dtype(dtype)
    with torch.device("meta"):
        model = model_class(config)(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [(k, tuple(state_dict[k].shape), tuple(expected[k].shape))
                  for k in sorted(set(expected) & set(state_dict))
                  if state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        raise ValueError(_describe_mismatch(missing, unexpected, mismatched, source))
    check_floating(state_dict, source)
    dtype = dtype or checkpoint_dtype(state_dict)
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    left = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    if left:
        raise ValueError(f"{source}: tensors left unloaded (not in any state dict): "
                         f"{', '.join(left)}")
    model.name = name if name is not None else registry_name(config)
    return model.eval()


#################################################################################
#                               The "ptdit" format                              #
#################################################################################

def _detect(state_dict: Mapping[str, Tensor], config: dict | None) -> bool:
    return config is not None and config.get("format") == "ptdit"


def _to_ptdit(state_dict: StateDict, config: dict | None) -> tuple[object, StateDict]:
    if config is None or "family" not in config or "config" not in config:
        raise ValueError("a ptdit-format checkpoint needs its metadata (format, family, config)")
    fields = config["config"]
    if isinstance(fields, str):
        fields = _json(fields, "config")
    return config_from_dict(config["family"], fields), dict(state_dict)


def _from_ptdit(config, state_dict: StateDict) -> tuple[StateDict, dict]:
    return dict(state_dict), {"format": "ptdit", "family": config.family,
                              "config": config_to_dict(config)}


PTDIT = Format(name="ptdit", family="any", detect=_detect, to_ptdit=_to_ptdit,
               from_ptdit=_from_ptdit)


def metadata(config: dict, name: str | None) -> dict[str, str]:
    """The safetensors metadata (str -> str) of a ptdit-format file."""
    return {"format": "ptdit", "family": config["family"],
            "config": json.dumps(config["config"]), "name": name or ""}


def _json(text: str, field: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"the ptdit metadata field {field!r} is not valid JSON ({err}): "
                         f"{text!r:.80}") from None


def read_metadata(meta: Mapping[str, str] | None) -> dict | None:
    """The ptdit config dict from safetensors metadata, or None when the file is not ours."""
    if not meta or meta.get("format") != "ptdit":
        return None
    return {"format": "ptdit", "family": meta.get("family"),
            "config": _json(meta.get("config", "{}"), "config"), "name": meta.get("name") or None}
