"""What every checkpoint format provides: recognise itself, map to ptdit, map back.

A converter is a pure state-dict mapping plus a config mapping. It never builds a model or
touches files; `ptdit.interop.load` does that for all formats.
"""

from collections.abc import Callable, Mapping
from dataclasses import dataclass

from torch import Tensor

StateDict = dict[str, Tensor]


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
                None where the format is read-only.
    """

    name: str
    family: str
    detect: Callable[[Mapping[str, Tensor], dict | None], bool]
    to_ptdit: Callable[[StateDict, dict | None], tuple[object, StateDict]]
    from_ptdit: Callable[[object, StateDict], tuple[StateDict, dict | None]] | None = None
