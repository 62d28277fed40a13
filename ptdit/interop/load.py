"""`ptdit.load`: any supported checkpoint file or diffusers folder -> a ptdit model; `save` back.

Reads locally only; nothing is ever downloaded.
"""

import argparse
import dataclasses
import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..configs import get_config
from .base import EXTRA_KEY, WRAPPERS, Format, StateDict, unwrap
from .dit import DIFFUSERS_DIT, FACEBOOK_DIT
from .official_ptdit import OFFICIAL_PTDIT
from .pixart import DIFFUSERS_PIXART, OFFICIAL_PIXART
from .ptdit_format import (
    CONFIG_CLASSES,
    PTDIT,
    RESOLUTION_FIELDS,
    check_floating,
    instantiate,
    layers,
    metadata,
    read_metadata,
    registry_name,
)

FORMATS: dict[str, Format] = {f.name: f for f in (FACEBOOK_DIT, DIFFUSERS_DIT, OFFICIAL_PIXART,
                                                  DIFFUSERS_PIXART, OFFICIAL_PTDIT, PTDIT)}

TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")
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

READABLE = (f"a PyTorch checkpoint ({', '.join(TORCH_SUFFIXES)}), a safetensors file or a "
            f"diffusers folder")


def _damaged(path: Path, kind: str, err: Exception) -> ValueError:
    return ValueError(f"{path}: not a readable {kind} ({path.stat().st_size} bytes: truncated, "
                      f"partly downloaded or not a {kind} at all): {type(err).__name__}: {err}; "
                      f"allowed: {READABLE}")


def _path(path) -> Path:
    if not isinstance(path, (str, os.PathLike)) or str(path) == "":
        raise ValueError(f"a checkpoint path is needed ({READABLE}), got {path!r}")
    return Path(path)


def read_json(path: Path, what: str) -> dict:
    """A JSON object from `path`; ValueError naming the file when it is not one."""
    try:
        obj = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: {what} is not valid JSON ({err})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    return obj


def _read_torch(path: Path) -> StateDict:
    try:
        # facebookresearch/DiT training checkpoints keep their argparse arguments under "args"
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True,
                             mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as err:
        if "Unsupported global" in str(err):
            raise ValueError(f"{path}: holds objects other than tensors, which a weights-only "
                             f"load refuses ({err})") from None
        raise _damaged(path, "torch checkpoint", err) from None
    except Exception as err:   # unpickling other bytes fails anyhow: KeyError, IndexError, ...
        raise _damaged(path, "torch checkpoint", err) from None
    if isinstance(obj, Mapping):
        obj = unwrap(obj)
    if not isinstance(obj, Mapping) or not all(isinstance(v, Tensor) for v in obj.values()):
        kind = type(obj).__name__
        raise ValueError(f"{path}: expected a state dict (or one under {', '.join(WRAPPERS)}), "
                         f"got a {kind}" + (f" with keys {', '.join(list(obj)[:8])}"
                                            if isinstance(obj, Mapping) else ""))
    return dict(obj)


def _read_safetensors(path: Path) -> tuple[StateDict, dict | None]:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        state_dict = load_file(str(path))
    except (SafetensorError, OSError) as err:
        raise _damaged(path, "safetensors file", err) from None
    try:
        return state_dict, read_metadata(meta)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None


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
    config = read_json(config_path, "the diffusers config")
    for suffix in (".safetensors", ".bin"):
        single = folder / f"{DIFFUSERS_WEIGHTS}{suffix}"
        index = folder / f"{DIFFUSERS_WEIGHTS}{suffix}.index.json"
        if single.is_file():
            return _read_weights(single)[0], config
        if index.is_file():
            weight_map = read_json(index, "the shard index").get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index}: the shard index has no weight_map object")
            shards = sorted(set(weight_map.values()))
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


def _flat(config: dict) -> dict:
    """A release inference JSON ({"predictor": ..., EXTRA_KEY: ...}) as one flat predictor."""
    if not isinstance(config.get("predictor"), dict):
        return config
    return {**config["predictor"], **{k: v for k, v in config.items() if k == EXTRA_KEY}}


def read_checkpoint(path: str | Path, config: dict | None = None) -> tuple[StateDict, dict | None]:
    """(state dict, config) of a file or diffusers folder. For a folder the config is its
    config.json, updated with `config`; for a ptdit-format file, its metadata (which says all;
    `config` is refused); for another file, the sidecar JSON beside it updated with `config`,
    else `config`, else None."""
    path = _path(path)
    if config is not None and not isinstance(config, Mapping):
        raise ValueError(f"config must be a dict, got {type(config).__name__}")
    if not path.exists():
        raise ValueError(f"checkpoint {path} does not exist")
    if path.is_dir():
        state_dict, found = _read_diffusers(path)
        check_floating(state_dict, str(path))
        return state_dict, found | dict(config or {})
    state_dict, found = _read_weights(path)
    check_floating(state_dict, str(path))
    if found is not None:
        if config:
            raise ValueError(f"{path} is a ptdit-format file, whose metadata holds its config; "
                             f"config= does not apply (given: {', '.join(config)})")
        return state_dict, found
    if not sidecar(path).is_file():
        return state_dict, None if config is None else dict(config)
    own = read_json(sidecar(path), "the sidecar config")
    return state_dict, own if config is None else {**_flat(own), **_flat(dict(config))}


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


def _check_family(family: str, named, name: str, source: str) -> None:
    if family not in ("any", named.family):
        raise ValueError(f"{source} holds a {family} model; {name} is {named.family}")


def _check_name(config, named, name: str, source: str):
    """The registry config `named` (of `name`) at the checkpoint's resolution
    (RESOLUTION_FIELDS), when the checkpoint has that model's layers."""
    _check_family(config.family, named, name, source)
    ours, theirs = layers(config), layers(named)
    diff = [f"{k}: checkpoint {ours[k]!r}, {name} {theirs[k]!r}" for k in ours
            if ours[k] != theirs[k]]
    if diff:
        raise ValueError(f"{source} is not {name}: " + "; ".join(diff))
    return dataclasses.replace(named, **{k: getattr(config, k) for k in RESOLUTION_FIELDS
                                         if hasattr(config, k)})


def _check_folder_config(config: Mapping | None, fmt: Format, source: str) -> None:
    """config= for a diffusers folder may set only the config.json keys the format reads."""
    if fmt.config_keys is None:
        return
    unknown = sorted(set(config or {}) - fmt.config_keys)
    if unknown:
        raise ValueError(
            f"{source}: config= key(s) {', '.join(unknown)} are not {fmt.name} config.json keys; "
            f"allowed: {', '.join(sorted(fmt.config_keys))}. ptdit config fields that "
            f"config.json cannot say go under {EXTRA_KEY!r}, e.g. "
            f'{{"{EXTRA_KEY}": {{"freq_shift": 0}}}} for a DiT')


def load(path_or_dir: str | Path, name: str | None = None, format: str = "auto",
         dtype: torch.dtype | None = None, config: dict | None = None) -> nn.Module:
    """Loads any supported checkpoint into the matching ptdit model (eval mode, on the CPU).

    Args:
        path_or_dir: a .safetensors / .pt / .pth / .bin / .ckpt file, or a diffusers folder
            (config.json + diffusion_pytorch_model[.safetensors|.bin|*.index.json]).
        name: a registry name whose layers the checkpoint must have (its configured resolution,
            `input_size` / `pos_interp_scale`, may differ: DiT-XL-2-512x512.pt is DiT-XL/2);
            the model gets that name. Checked first (an unknown name fails before any file is
            read). The fields the file cannot say and its config does not give come from the
            named model (a facebook DiT's or official PixArt's num_heads, ...; for an official
            PT-DiT without its predictor JSON, num_heads, window and the EXTRA_FIELDS).
            By default the matching registry name, if any.
        format: "auto" (recognise from keys and config) or one of FORMATS.
        dtype: the model dtype, a floating torch dtype or its name ("float32", "bfloat16",
            "float16", "float64"); default the checkpoint's (no silent down-cast).
        config: the checkpoint's own config, for files that do not carry one. Official PT-DiT:
            the release's predictor JSON (the dict, or the whole inference JSON). facebook DiT
            and official PixArt: the config fields the shapes cannot give ({"num_heads": 16}).
            It updates the sidecar `<file>.json` beside the file, if any (`save` and `ptdit
            convert --to official` write the fields the format cannot say there); what
            neither gives the converter infers from the shapes (official PT-DiT:
            official_ptdit.infer_predictor states the rule). For a diffusers folder it updates
            config.json and may set only the config.json keys the format reads, ptdit fields
            config.json cannot say under "ptdit_config" ({"ptdit_config": {"freq_shift": 0}}).
            A ptdit-format file carries its config, and refuses this.
    """
    named = None if name is None else get_config(name)   # ValueError with the nearest names
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; allowed: auto, {', '.join(FORMATS)}")
    path = _path(path_or_dir)
    state_dict, found = read_checkpoint(path, config)
    fmt = detect_format(state_dict, found, str(path)) if format == "auto" else FORMATS[format]
    if path.is_dir():
        _check_folder_config(config, fmt, str(path))
    source = f"{path} ({fmt.name})"
    # a sidecar that is not a config (a training log, ...) must be named in the error
    side = sidecar(path)
    note = (f"\n({side} was read as the checkpoint's sidecar config: the JSON beside "
            f"{path.name} with the same name)"
            if path.is_file() and side.is_file() and (found or {}).get("format") != "ptdit"
            else "")
    if named is not None:
        _check_family(fmt.family, named, name, str(path))
    fields = {}
    try:
        if named is not None and fmt.named is not None:
            found, fields = fmt.named(state_dict, found, named)
            source = f"{path} ({fmt.name}, read as {name})"
        family_config, ptdit_state_dict = fmt.to_ptdit(state_dict, found)
        family_config = dataclasses.replace(family_config, **fields)
    except ValueError as err:
        raise ValueError(f"{source}: {err}{note}") from None
    if named is not None:
        family_config = _check_name(family_config, named, name, str(path))
    return instantiate(family_config, ptdit_state_dict, dtype=dtype, name=name, source=source)


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


def check_destination(path: str | Path, force: bool = False) -> None:
    """ValueError unless `path` can be written: it must not exist (unless `force`), and its
    nearest existing folder must take a new file (missing folders between are created on
    writing). Tried with a temporary file, since permissions do not say (root, /proc,
    read-only mounts). `ptdit convert` checks this before it loads anything."""
    path = Path(path)
    if path.exists() and not force:
        raise ValueError(f"{path} exists; pass --force (force=True) to overwrite")
    if path.is_file() and not os.access(path, os.W_OK):
        raise ValueError(f"{path}: cannot overwrite it (no write permission)")
    folder = path if path.is_dir() else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ValueError(f"{path} cannot be written: {folder} is a file, not a folder")
    try:
        handle, probe = tempfile.mkstemp(dir=folder, prefix=".ptdit-write-check-")
    except OSError as err:
        raise ValueError(f"{path} cannot be written: {folder} takes no new files "
                         f"({type(err).__name__}: {err.strerror})") from None
    os.close(handle)
    os.unlink(probe)


def _check_model(model) -> None:
    """ValueError unless `model` is a ptdit model holding real weights."""
    config = getattr(model, "config", None)
    if not isinstance(model, nn.Module) or type(config) not in CONFIG_CLASSES.values():
        raise ValueError(f"save writes ptdit models (DiT, PixArt, PT-DiT, from ptdit.build or "
                         f"ptdit.load), whose .config is their family's config; got a "
                         f"{type(model).__name__}" + ("" if config is None else
                                                      f" with a {type(config).__name__} config"))
    meta = [k for k, v in model.state_dict().items() if v.is_meta]
    if meta:
        raise ValueError(f"the model is on the meta device (shapes only, no weights: "
                         f"{len(meta)} tensors, e.g. {meta[0]}); build or load it on a real "
                         "device (device='cpu') to save it")


def _tensors(state_dict: Mapping[str, Tensor]) -> StateDict:
    # safetensors refuses views that share storage (split projections): give each its own
    return {k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}


def _save_file(tensors: StateDict, path: Path, meta: dict | None = None) -> None:
    """safetensors' save_file, which writes a private (0600) file, then the mode open() gives."""
    save_file(tensors, str(path), metadata=meta)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save(model: nn.Module, path: str | Path, format: str = "ptdit",
         force: bool = False) -> list[Path]:
    """Writes `model` in `format` as safetensors; returns the paths written.

    "ptdit": one .safetensors file whose metadata holds family and config (reloads alone); its
    name is the model's registry name (registry_name), if any.
    "diffusers-*": a folder with config.json and diffusion_pytorch_model.safetensors.
    Any other format: one .safetensors file, plus the sidecar `<file>.json`: the official PT-DiT
    predictor JSON, or for facebook DiT and official PixArt the config fields their files
    cannot say (`load` reads it back).
    An existing destination is refused unless `force`; so is a file path for a folder format,
    a folder for a file format and a destination that cannot be written (check_destination);
    so is a model that is not a ptdit model or has no weights (built on the meta device).
    """
    _check_model(model)
    if format not in FORMATS:
        raise ValueError(f"unknown format {format!r}; allowed: {', '.join(FORMATS)}")
    fmt = FORMATS[format]
    if fmt.from_ptdit is None:
        raise ValueError(f"the {fmt.name} format is read-only")
    if fmt.family not in ("any", model.config.family):
        raise ValueError(f"the {fmt.name} format holds {fmt.family} models, not "
                         f"{model.config.family}")
    path = Path(path)
    folder = fmt.name.startswith("diffusers")
    if folder and (path.suffix in (".safetensors", ".json", *TORCH_SUFFIXES) or path.is_file()):
        raise ValueError(f"{path}: the {fmt.name} format is a folder (config.json + "
                         f"{DIFFUSERS_WEIGHTS}.safetensors); give a folder path, not a file")
    if not folder and path.is_dir():
        raise ValueError(f"{path} is a folder; the {fmt.name} format is one .safetensors file: "
                         "give a file path")
    if not folder and path.suffix != ".safetensors":
        raise ValueError(f"{path}: the file must end in .safetensors")
    check_destination(path, force)
    state_dict, config = fmt.from_ptdit(model.config, model.state_dict())
    if folder:
        paths = [path / "config.json", path / f"{DIFFUSERS_WEIGHTS}.safetensors"]
    else:
        paths = [path] + ([sidecar(path)] if config is not None and fmt is not PTDIT else [])
    existing = [p for p in (path, *paths) if p.exists()]
    if existing and not force:
        raise ValueError(f"{existing[0]} exists; pass --force (force=True) to overwrite")
    tensors = _tensors(state_dict)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if folder:
            path.mkdir(exist_ok=True)
            paths[0].write_text(json.dumps(config, indent=2) + "\n")
            _save_file(tensors, paths[1])
        elif fmt is PTDIT:
            _save_file(tensors, path, metadata(config, registry_name(model.config)))
        else:
            _save_file(tensors, path)
            if config is not None:
                paths[1].write_text(json.dumps(config, indent=2) + "\n")
    except (OSError, SafetensorError) as err:
        raise ValueError(f"{path}: cannot write the {fmt.name} checkpoint "
                         f"({type(err).__name__}: {err})") from None
    return paths

