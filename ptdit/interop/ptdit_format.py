"""ptdit's own checkpoint format, and building a ptdit model from (config, ptdit state dict).

The format is a safetensors file whose metadata holds everything needed to rebuild the model:
`{"format": "ptdit", "family": "PT-DiT", "config": "<the config dataclass as JSON>",
"name": "<registry name or empty>"}`. Tensors carry ptdit's own parameter names.
"""

import dataclasses
import json
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from ..configs import (DiTConfig, PixArtConfig, PTDiTConfig, check_fields, get_config,
                       list_models, model_class)
from .base import Format, StateDict

CONFIG_CLASSES = {"DiT": DiTConfig, "PixArt": PixArtConfig, "PT-DiT": PTDiTConfig}
PROVENANCE_FIELDS = ("source", "paper_params_m")  # describe a config, not the architecture


def config_to_dict(config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(family: str, fields: Mapping) -> object:
    """The family's config dataclass from a dict of its fields (as written by config_to_dict)."""
    if family not in CONFIG_CLASSES:
        raise ValueError(f"unknown model family {family!r}; allowed: {', '.join(CONFIG_CLASSES)}")
    cls = CONFIG_CLASSES[family]
    check_fields(cls, fields, f"{family} config")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()}
    return cls(**fields)


def architecture(config) -> dict:
    """The config's fields that shape the network (everything but provenance)."""
    return {k: v for k, v in config_to_dict(config).items() if k not in PROVENANCE_FIELDS}


def registry_name(config) -> str | None:
    """The registry name whose configuration builds the same network, if any."""
    for name in list_models():
        named = get_config(name)
        if type(named) is type(config) and architecture(named) == architecture(config):
            return name
    return None


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

    The model takes the checkpoint's dtype (see checkpoint_dtype) unless `dtype` is given.
    Raises ValueError listing every missing key, unexpected key and shape mismatch at once.
    """
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
        fields = json.loads(fields)
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


def read_metadata(meta: Mapping[str, str] | None) -> dict | None:
    """The ptdit config dict from safetensors metadata, or None when the file is not ours."""
    if not meta or meta.get("format") != "ptdit":
        return None
    return {"format": "ptdit", "family": meta.get("family"),
            "config": json.loads(meta.get("config", "{}")), "name": meta.get("name") or None}
