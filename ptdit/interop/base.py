"""What every checkpoint format provides: recognise itself, map to ptdit, map back.

A converter is a pure state-dict mapping plus a config mapping. It never builds a model or
touches files; `ptdit.interop.load` does that for all formats.

Config fields a format cannot say (DiT's timestep `freq_shift` in a diffusers config.json, the
head count of a facebook DiT file, ...) travel beside it, so that ours -> format -> ours gives
the same config: in a config of the format's own (diffusers config.json, the PT-DiT predictor
JSON) under the key EXTRA_KEY, and for formats with no config as the sidecar `<file>.json` of
ptdit config fields. The converters read them back and check them against the shapes.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

StateDict = dict[str, Tensor]

EXTRA_KEY = "ptdit_config"  # {ptdit config field: value} a format's own config cannot say

# Entries of a loaded checkpoint that hold the weights, in the order tried. facebookresearch/DiT
# training checkpoints hold {"model", "ema", "opt", "args"}, of which its sampler uses "ema"
# (the released files are that EMA state dict itself); PixArt-α files are {"state_dict": ...},
# which its inference scripts use (its training checkpoints add "state_dict_ema", unused there);
# "model" and "module" are other trainers' wrappers. No format keeps its weights under a key
# another format prefers, so this one order serves DiT, PixArt and PT-DiT files alike.
WRAPPERS = ("ema", "state_dict", "model", "module")


@dataclass(frozen=True)
class Format:
    """One checkpoint format.

    name:       short id used by `ptdit convert --to` and `ptdit.load(format=...)`,
                e.g. "facebook-dit", "diffusers-dit", "official-pixart", "diffusers-pixart",
                "official-ptdit", "ptdit".
    family:     "DiT", "PixArt" or "PT-DiT" (the ptdit model family it maps to).
    detect:     (state_dict, config_or_None) -> bool; recognises the format from its keys
                (and config.json / predictor JSON where the format has one).
    to_ptdit:   (state_dict, config_or_None) -> (ptdit config dataclass, ptdit state dict).
    from_ptdit: (ptdit config dataclass, ptdit state dict) -> (state dict, config dict or None);
                None where the format is read-only. The config dict is the format's own
                (config.json, predictor JSON) or, for formats without one, the sidecar.
    config_keys: the config.json keys a diffusers format reads (and so the only keys
                `load(folder, config=...)` may set); None where the converter checks its config.
    named:      (state_dict, config_or_None, registry config) -> (config, fields), for
                `load(name=...)` of a format whose files cannot say every field: `config`
                completed with what the named model says and neither the shapes nor `config`
                give (its head count, ...), for to_ptdit; `fields`, ptdit config fields to set
                on to_ptdit's result (what it could only guess). None where the format's own
                config says all.
    """

    name: str
    family: str
    detect: Callable[[Mapping[str, Tensor], dict | None], bool]
    to_ptdit: Callable[[StateDict, dict | None], tuple[object, StateDict]]
    from_ptdit: Callable[[object, StateDict], tuple[StateDict, dict | None]] | None = None
    config_keys: frozenset[str] | None = None
    named: Callable[[StateDict, dict | None, object], tuple[dict | None, dict]] | None = None


def unwrap(obj: Mapping) -> StateDict:
    """The weights of a loaded checkpoint: the first entry of WRAPPERS that holds a mapping,
    else `obj` itself (a new dict either way)."""
    for key in WRAPPERS:
        if key in obj and isinstance(obj[key], Mapping):
            return dict(obj[key])
    return dict(obj)


def named_fields(fields: tuple[str, ...]):
    """A Format.named for formats whose config is a dict of ptdit fields (a sidecar): the
    named model's `fields` under the given config."""
    def named(state_dict: StateDict, config: dict | None, registry_config) -> tuple[dict, dict]:
        return {**{f: getattr(registry_config, f) for f in fields}, **(config or {})}, {}
    return named


def extra_fields(config: Mapping | None, allowed: tuple[str, ...], what: str) -> dict:
    """The ptdit fields under EXTRA_KEY of a format's config; ValueError on any other field."""
    extra = (config or {}).get(EXTRA_KEY) or {}
    if not isinstance(extra, Mapping):
        raise ValueError(f"{what}: {EXTRA_KEY} must be a JSON object of ptdit config fields, "
                         f"got {extra!r}")
    unknown = sorted(set(extra) - set(allowed))
    if unknown:
        raise ValueError(f"{what}: {EXTRA_KEY} field(s) {', '.join(unknown)} cannot be set "
                         f"there; allowed: {', '.join(allowed)}")
    return dict(extra)


def changed_fields(config, defaults: Mapping, fields: tuple[str, ...]) -> dict:
    """{field: value} of the `fields` of a config dataclass that differ from `defaults`."""
    return {f: getattr(config, f) for f in fields if getattr(config, f) != defaults[f]}
