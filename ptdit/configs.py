"""The registry: the papers' model names -> configurations with their provenance, and
`build(name, **overrides)`.

Each family's config dataclass sits at the top of its model file and holds the defaults;
`MODELS` lists, under the papers' names, only the fields that differ, and where each size is
published. Sources: DiT arXiv 2212.09748 (Table 1 / facebookresearch/DiT models.py),
PixArt-alpha arXiv 2310.00426 (PixArt_XL_2), PT-DiT arXiv 2409.04005 v2 Table 4, and the
released Qihoo-T2I 1B predictor config (Ascend/MindSpeed-MM).
"""

import dataclasses
import difflib
from typing import NamedTuple

import torch
from torch import nn

from .checks import check_fields, model_dtype
from .models import DiT, DiTConfig, PixArt, PixArtConfig, PTDiT, PTDiTConfig

MODEL_CLASSES = {DiTConfig: DiT, PixArtConfig: PixArt, PTDiTConfig: PTDiT}
CONFIG_CLASSES = {cls.family: cls for cls in MODEL_CLASSES}   # "DiT" -> DiTConfig, ...


class Entry(NamedTuple):
    """A named configuration and where it is published."""
    config: DiTConfig | PixArtConfig | PTDiTConfig
    source: str
    paper_params_m: float | None = None   # the parameter count the source prints, millions


_DIT_SIZES = {  # name: depth, width, heads, paper params (M, DiT Table 1)
    "S": (12, 384, 6, 33), "B": (12, 768, 12, 130), "L": (24, 1024, 16, 458),
    "XL": (28, 1152, 16, 675),
}
_PTDIT = "PT-DiT, arXiv 2409.04005 v2 Table 4"

MODELS: dict[str, Entry] = {
    **{f"DiT-{size}/{p}": Entry(DiTConfig(depth=d, hidden_size=w, num_heads=h, patch_size=p),
                                "DiT, arXiv 2212.09748", m)
       for size, (d, w, h, m) in _DIT_SIZES.items() for p in (2, 4, 8)},
    "PixArt-XL/2": Entry(PixArtConfig(), "PixArt-α, arXiv 2310.00426", 600.0),
    "PT-DiT/S-Class": Entry(PTDiTConfig(depth=10, hidden_size=288, num_heads=6,
                                        condition="class"), _PTDIT, 32.0),
    "PT-DiT/B": Entry(PTDiTConfig(depth=12, hidden_size=640, num_heads=10), _PTDIT, 144.0),
    "PT-DiT/L": Entry(PTDiTConfig(depth=28, hidden_size=864, num_heads=12), _PTDIT, 605.0),
    "PT-DiT/XL": Entry(PTDiTConfig(depth=28, hidden_size=1152, num_heads=16), _PTDIT, 1142.0),
    "PT-DiT/H": Entry(PTDiTConfig(depth=30, hidden_size=1440, num_heads=20), _PTDIT, 1795.0),
    "Qihoo-T2I-1B": Entry(PTDiTConfig(depth=28, hidden_size=1152, num_heads=16, window=(1, 8, 8)),
                          "Qihoo-T2X release (MindSpeed-MM, 1024-px predictor)", 1131.629216),
}


def list_models() -> list[str]:
    """Every named configuration, in registry order."""
    return list(MODELS)


def entry(name: str) -> Entry:
    """The registry entry of `name`; ValueError naming the nearest names on an unknown one."""
    if not isinstance(name, str) or name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.5) \
            if isinstance(name, str) else []
        hint = f"; nearest: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}. Known models: {', '.join(MODELS)}")
    return MODELS[name]


def get_config(name: str, **overrides):
    """The named configuration with `overrides` applied; ValueError on an unknown name or field."""
    config = entry(name).config
    check_fields(type(config), overrides, name)
    return dataclasses.replace(config, **overrides)


def model_class(config) -> type[nn.Module]:
    """The model class of a config instance."""
    if type(config) not in MODEL_CLASSES:
        raise ValueError(f"not a model config: {type(config).__name__}; allowed: "
                         f"{', '.join(c.__name__ for c in MODEL_CLASSES)}")
    return MODEL_CLASSES[type(config)]


def build(name, device=None, dtype: torch.dtype | str | None = None, seed: int | None = None,
          **overrides) -> nn.Module:
    """Builds a named model (or a config instance, with no overrides) in eval mode (call
    `.train()` to train: it turns on label and caption dropout). `device="meta"` allocates
    nothing (for counting, any size). `seed`: the initial weights are drawn from
    torch.manual_seed(seed), the same weights every time, and the global generator is left as
    it was; None draws from the global generator."""
    if seed is not None:
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"seed must be an int or None, got {seed!r}")
        cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(seed)
            return build(name, device, dtype, **overrides)
    if type(name) in MODEL_CLASSES:
        config = dataclasses.replace(name, **overrides) if overrides else name
        name = None
    else:
        config = get_config(name, **overrides)
    dtype = model_dtype(dtype)
    previous = torch.get_default_dtype()
    try:  # float64 models are built in float64, so fixed tables are not float32-rounded
        if dtype == torch.float64:
            torch.set_default_dtype(torch.float64)
        with torch.device(device or "cpu"):
            model = model_class(config)(config)
    finally:
        torch.set_default_dtype(previous)
    if dtype is not None:
        model = model.to(dtype)
    model.name = name
    return model.eval()
