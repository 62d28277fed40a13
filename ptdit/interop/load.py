"""`ptdit.load`: any supported checkpoint file or diffusers folder -> a ptdit model; `save` back.

Reads locally only; nothing is ever downloaded.
"""

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..configs import get_config
from .base import Format, StateDict
from .dit import DIFFUSERS_DIT, FACEBOOK_DIT
from .official_ptdit import OFFICIAL_PTDIT
from .pixart import DIFFUSERS_PIXART, OFFICIAL_PIXART
from .ptdit_format import PTDIT, architecture, instantiate, metadata, read_metadata

FORMATS: dict[str, Format] = {f.name: f for f in (FACEBOOK_DIT, DIFFUSERS_DIT, OFFICIAL_PIXART,
                                                  DIFFUSERS_PIXART, OFFICIAL_PTDIT, PTDIT)}

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
WRAPPERS = ("ema", "state_dict", "model", "module")  # as DiT's and PixArt's samplers unwrap
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model"

# `ptdit convert --to` target -> Format name, per family.
TARGETS = {
    "ptdit": {"DiT": "ptdit", "PixArt": "ptdit", "PT-DiT": "ptdit"},
    "diffusers": {"DiT": "diffusers-dit", "PixArt": "diffusers-pixart"},
    "official": {"DiT": "facebook-dit", "PixArt": "official-pixart", "PT-DiT": "official-ptdit"},
}


#################################################################################
#                                  Reading                                      #
#################################################################################

def _read_torch(path: Path) -> StateDict:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True,
                         mmap=zipfile.is_zipfile(path))
    except (RuntimeError, pickle.UnpicklingError, EOFError, OSError) as err:
        raise ValueError(f"{path}: not a readable weights-only torch checkpoint ({err})") from err
    for key in WRAPPERS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        kind = type(obj).__name__
        raise ValueError(f"{path}: expected a state dict (or one under {', '.join(WRAPPERS)}), "
                         f"got a {kind}" + (f" with keys {', '.join(list(obj)[:8])}"
                                            if isinstance(obj, Mapping) else ""))
    return dict(obj)


def _read_safetensors(path: Path) -> tuple[StateDict, dict | None]:
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    return load_file(str(path)), read_metadata(meta)


def _read_weights(path: Path) -> tuple[StateDict, dict | None]:
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path), None
    raise ValueError(f"{path}: unknown checkpoint type {path.suffix!r}; allowed: .safetensors, "
                     f"{', '.join(TORCH_SUFFIXES)} or a diffusers folder (config.json + "
                     f"{DIFFUSERS_WEIGHTS}.*)")


def _read_diffusers(folder: Path) -> tuple[StateDict, dict]:
    if not (folder / "config.json").is_file() and (folder / "transformer/config.json").is_file():
        folder = folder / "transformer"                      # a pipeline folder
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ValueError(f"{folder}: a diffusers folder needs config.json beside "
                         f"{DIFFUSERS_WEIGHTS}.safetensors (or .bin)")
    config = json.loads(config_path.read_text())
    for suffix in (".safetensors", ".bin"):
        single = folder / f"{DIFFUSERS_WEIGHTS}{suffix}"
        index = folder / f"{DIFFUSERS_WEIGHTS}{suffix}.index.json"
        if single.is_file():
            return _read_weights(single)[0], config
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state_dict = {}
            for shard in shards:
                state_dict |= _read_weights(folder / shard)[0]
            return state_dict, config
    raise ValueError(f"{folder}: no {DIFFUSERS_WEIGHTS}.safetensors, .bin or sharded index "
                     "beside config.json")


def sidecar(path: Path) -> Path:
    """Where a checkpoint file's own config lives: the same name with .json (`ckpt.json` for
    `ckpt.safetensors`). The official PT-DiT release's predictor JSON goes there."""
    return path.with_suffix(".json")


def read_checkpoint(path: str | Path, config: dict | None = None) -> tuple[StateDict, dict | None]:
    """(state dict, config) of a file or diffusers folder. For a folder the config is its
    config.json, updated with `config`; for a file, its ptdit metadata (which says all), else
    `config`, else the sidecar JSON beside it, else None."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.is_dir():
        state_dict, found = _read_diffusers(path)
        return state_dict, found | (config or {})
    state_dict, found = _read_weights(path)
    if found is not None:
        return state_dict, found
    if config is None and sidecar(path).is_file():
        config = json.loads(sidecar(path).read_text())
    return state_dict, config


#################################################################################
#                                 Detecting                                     #
#################################################################################

def detect_format(state_dict: Mapping[str, Tensor], config: dict | None,
                  source: str = "checkpoint") -> Format:
    """The one format that recognises this checkpoint; ValueError when none or several do.

    Two rules come first: a file whose metadata names the ptdit format is that; and diffusers
    formats are candidates only with a diffusers config.json (one with `_class_name`), other
    formats only without one (diffusers PixArt's keys are a subset of the PT-DiT release's).
    """
    if PTDIT.detect(state_dict, config):
        return PTDIT
    diffusers = config is not None and "_class_name" in config
    candidates = [f for f in FORMATS.values()
                  if f is not PTDIT and f.name.startswith("diffusers") == diffusers]
    matches = [f for f in candidates if f.detect(state_dict, config)]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        sample = ", ".join(sorted(state_dict)[:8])
        tried = ", ".join(f.name for f in candidates)
        raise ValueError(f"{source}: no known checkpoint format recognises it (tried {tried}); "
                         f"{len(state_dict)} keys, e.g. {sample}. "
                         "Pass format= to force one and see which keys differ.")
    names = ", ".join(f.name for f in matches)
    raise ValueError(f"{source}: several formats recognise it ({names}); pass format= to choose")


def _check_name(config, name: str | None, source: str):
    """The registry config when `name` is given and builds the same network."""
    if name is None:
        return config
    named = get_config(name)
    if type(named) is not type(config):
        raise ValueError(f"{source} holds a {config.family} model; {name} is {named.family}")
    ours, theirs = architecture(config), architecture(named)
    diff = [f"{k}: checkpoint {ours[k]!r}, {name} {theirs[k]!r}" for k in ours
            if ours[k] != theirs[k]]
    if diff:
        raise ValueError(f"{source} is not {name}: " + "; ".join(diff))
    return named


def load(path_or_dir: str | Path, name: str | None = None, format: str = "auto",
         dtype: torch.dtype | None = None, config: dict | None = None) -> nn.Module:
    """Loads any supported checkpoint into the matching ptdit model (eval mode, on the CPU).

    Args:
        path_or_dir: a .safetensors / .pt / .pth / .bin / .ckpt file, or a diffusers folder
            (config.json + diffusion_pytorch_model[.safetensors|.bin|*.index.json]).
        name: a registry name the checkpoint must match (its model gets that name); by default
            the matching registry name, if any.
        format: "auto" (recognise from keys and config) or one of FORMATS.
        dtype: the model dtype; default the checkpoint's (no silent down-cast).
        config: the checkpoint's own config, for files that do not carry one. Official PT-DiT:
            the release's predictor JSON (the dict, or the whole inference JSON). facebook DiT
            and official PixArt: the config fields the shapes cannot give ({"num_heads": 16}).
            By default read from the sidecar `<file>.json` beside the file (`ptdit convert
            --to official` writes the PT-DiT predictor there); else the converter infers it
            from the shapes (official PT-DiT: official_ptdit.infer_predictor states the rule).
            For a diffusers folder it updates config.json.
    """
    path = Path(path_or_dir)
    state_dict, found = read_checkpoint(path, config)
    if format == "auto":
        fmt = detect_format(state_dict, found, str(path))
    elif format in FORMATS:
        fmt = FORMATS[format]
    else:
        raise ValueError(f"unknown format {format!r}; allowed: auto, {', '.join(FORMATS)}")
    family_config, ptdit_state_dict = fmt.to_ptdit(state_dict, found)
    family_config = _check_name(family_config, name, str(path))
    stored_name = found.get("name") if fmt is PTDIT and found else None
    return instantiate(family_config, ptdit_state_dict, dtype=dtype, name=name or stored_name,
                       source=f"{path} ({fmt.name})")


#################################################################################
#                                  Writing                                      #
#################################################################################

def target_format(family: str, to: str) -> Format:
    """The Format for `ptdit convert --to {ptdit,diffusers,official}` of a model family."""
    if to not in TARGETS:
        raise ValueError(f"unknown target {to!r}; allowed: {', '.join(TARGETS)}")
    if family not in TARGETS[to]:
        allowed = [t for t, fams in TARGETS.items() if family in fams]
        raise ValueError(f"{family} has no {to} format; allowed --to: {', '.join(allowed)}")
    name = TARGETS[to][family]
    if name not in FORMATS:
        raise ValueError(f"the {name} converter is not available in this installation")
    return FORMATS[name]


def _tensors(state_dict: Mapping[str, Tensor]) -> StateDict:
    # safetensors refuses views that share storage (split projections): give each its own
    return {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}


def save(model: nn.Module, path: str | Path, format: str = "ptdit",
         force: bool = False) -> list[Path]:
    """Writes `model` in `format` as safetensors; returns the paths written.

    "ptdit": one .safetensors file whose metadata holds family and config (reloads alone).
    "diffusers-*": a folder with config.json and diffusion_pytorch_model.safetensors.
    Any other format: one .safetensors file, plus its config as the sidecar `<file>.json` when
    the format has one (the official PT-DiT predictor JSON).
    An existing destination is refused unless `force`.
    """
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; allowed: {', '.join(FORMATS)}")
    fmt = FORMATS[format]
    if fmt.from_ptdit is None:
        raise ValueError(f"the {fmt.name} format is read-only")
    if fmt.family not in ("any", model.config.family):
        raise ValueError(f"the {fmt.name} format holds {fmt.family} models, not "
                         f"{model.config.family}")
    state_dict, config = fmt.from_ptdit(model.config, model.state_dict())
    path = Path(path)
    folder = fmt.name.startswith("diffusers")
    if folder:
        paths = [path / "config.json", path / f"{DIFFUSERS_WEIGHTS}.safetensors"]
    else:
        if path.suffix != ".safetensors":
            raise ValueError(f"{path}: the file must end in .safetensors")
        paths = [path] + ([sidecar(path)] if config is not None and fmt is not PTDIT else [])
    existing = [p for p in (path, *paths) if p.exists()]
    if existing and not force:
        raise ValueError(f"{existing[0]} exists; pass --force (force=True) to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    if folder:
        path.mkdir(exist_ok=True)
        paths[0].write_text(json.dumps(config, indent=2) + "\n")
        save_file(_tensors(state_dict), str(paths[1]))
    elif fmt is PTDIT:
        save_file(_tensors(state_dict), str(path),
                  metadata=metadata(config, getattr(model, "name", None)))
    else:
        save_file(_tensors(state_dict), str(path))
        if config is not None:
            paths[1].write_text(json.dumps(config, indent=2) + "\n")
    return paths

