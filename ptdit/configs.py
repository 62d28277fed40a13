"""Named configurations of DiT, PixArt-alpha and PT-DiT, and `build(name, **overrides)`.

One dataclass per family holds the defaults; `MODELS` lists, under the papers' names, only the
fields that differ. Sources: DiT arXiv 2212.09748 (Table 1 / facebookresearch/DiT models.py),
PixArt-alpha arXiv 2310.00426 (PixArt_XL_2), PT-DiT arXiv 2409.04005 v2 Table 4, and the
released Qihoo-T2I 1B predictor config (Ascend/MindSpeed-MM).
"""

import dataclasses
import difflib
from dataclasses import dataclass

import torch
from torch import nn


def _positive(config, *names: str, number: type | tuple = int) -> None:
    """ValueError unless each field is a positive `number` (ints by default; bools are not)."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, number) or value <= 0:
            kind = "integer" if number is int else "number"
            raise ValueError(f"{name} must be a positive {kind}, got {value!r}")


def _probability(config, name: str) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def _latent_size(config) -> None:
    """input_size (the configured latent side) must be a positive multiple of the patch."""
    _positive(config, "input_size")
    if config.input_size % config.patch_size:
        raise ValueError(f"input_size {config.input_size} is not a multiple of patch "
                         f"{config.patch_size}; nearest valid: "
                         f"{nearest_multiples(config.input_size, config.patch_size)}")


def check_sizes(config, width_multiple: int) -> None:
    """The sizes every family shares: positive, heads divide the width, and a width the sin-cos
    positions can split (`width_multiple`: 4 for 2-D tables, 16 for 3-D)."""
    _positive(config, "depth", "hidden_size", "num_heads", "patch_size", "in_channels")
    _positive(config, "mlp_ratio", number=(int, float))
    _probability(config, "class_dropout_prob")
    D, heads = config.hidden_size, config.num_heads
    if D % heads:
        raise ValueError(f"width {D} is not divisible by {heads} heads; widths that are: "
                         f"{nearest_multiples(D, heads)}")
    if D % width_multiple:
        raise ValueError(f"width {D} must be a multiple of {width_multiple} for the sin-cos "
                         f"positions; nearest valid: {nearest_multiples(D, width_multiple)}")


@dataclass(frozen=True, kw_only=True)
class DiTConfig:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int
    input_size: int = 32            # latent side of the configured image (256 px / 8)
    in_channels: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    # eps of each block's MLP-branch LayerNorm (norm2): the one LayerNorm diffusers' DiT
    # `norm_eps` sets (default 1e-5 there); norm1 and the final norm are 1e-6 in both codes.
    norm_eps: float = 1e-6
    # Timestep frequencies max_period^(-i/(128 - freq_shift)): 0 in the official DiT, 1 in
    # diffusers' DiTTransformer2DModel (downscale_freq_shift=1, hard-coded there).
    freq_shift: int = 0
    source: str = "DiT, arXiv 2212.09748"
    paper_params_m: float | None = None

    family = "DiT"

    def attention_layout(self) -> str:
        return "global self-attention"

    def __post_init__(self):
        check_sizes(self, 4)
        _positive(self, "num_classes")
        _positive(self, "norm_eps", number=(int, float))
        _latent_size(self)


@dataclass(frozen=True, kw_only=True)
class PixArtConfig:
    depth: int = 28
    hidden_size: int = 1152
    num_heads: int = 16
    patch_size: int = 2
    input_size: int = 32            # latent side the positions are defined on (base_size·p)
    in_channels: int = 4
    mlp_ratio: float = 4.0
    caption_channels: int = 4096    # T5-XXL
    model_max_length: int = 120     # T5 tokens; also the length of the learned null caption
    class_dropout_prob: float = 0.1
    learn_sigma: bool = True
    pos_interp_scale: float = 1.0   # PixArt's lewei_scale / diffusers' interpolation_scale
    norm_eps: float = 1e-6          # eps of the blocks' LayerNorms (diffusers' `norm_eps`)
    # PixArtMS micro-conditioning (the 1024-MS release): `csize_embedder` and `ar_embedder`
    # embed the image size (height, width) and aspect ratio, D/3 per scalar, added to t.
    micro_condition: bool = False
    null_caption: bool = True       # learned null caption `y_embedding` (diffusers drops it)
    source: str = "PixArt-α, arXiv 2310.00426"
    paper_params_m: float | None = None

    family = "PixArt"

    def attention_layout(self) -> str:
        return "global self-attention + text cross-attention"

    def __post_init__(self):
        check_sizes(self, 4)
        _positive(self, "caption_channels", "model_max_length")
        _positive(self, "norm_eps", number=(int, float))
        _positive(self, "pos_interp_scale", number=(int, float))
        _latent_size(self)
        if self.micro_condition and self.hidden_size % 3:
            raise ValueError(
                f"micro_condition needs a width divisible by 3 (size and aspect-ratio embedders "
                f"are D/3 wide each), got {self.hidden_size}; nearest valid: "
                f"{nearest_multiples(self.hidden_size, 3)}")


@dataclass(frozen=True, kw_only=True)
class PTDiTConfig:
    depth: int
    hidden_size: int
    num_heads: int
    patch_size: int = 2
    in_channels: int = 4
    mlp_ratio: float = 4.0
    learn_sigma: bool = True
    condition: str = "text"         # "text": T5 cross-attention; "class": label added to t
    caption_channels: int = 4096
    num_classes: int = 1000
    class_dropout_prob: float = 0.1
    # Window = proxy pooling window, in tokens (frames, rows, cols). None follows the paper's
    # schedule: `windows_per_side`² windows over the token grid, `temporal_window` latent frames.
    window: tuple[int, int, int] | None = None
    windows_per_side: int = 8
    temporal_window: int = 4
    proxies_per_window: int = 1
    giim: bool = True               # proxy self-attention + proxy→token cross-attention
    shift_window: bool = True
    pos_interp_scale: float = 1.0
    source: str = "PT-DiT, arXiv 2409.04005 v2 Table 4"
    paper_params_m: float | None = None

    family = "PT-DiT"

    def attention_layout(self) -> str:
        if self.window is not None:
            window = "window {}x{}x{}".format(*self.window)
        else:
            n = self.windows_per_side
            window = f"{n}x{n} windows/frame, {self.temporal_window} frames/window"
        parts = ["proxy self", "proxy->token cross"] if self.giim else []
        parts += ["window"] + (["shifted window"] if self.shift_window else [])
        parts += ["text cross"] if self.condition == "text" else []
        return " + ".join(parts) + f" ({window})"

    def __post_init__(self):
        check_sizes(self, 16)   # 3-D positions: D/4 temporal, 3D/8 per spatial axis
        _positive(self, "caption_channels", "num_classes", "windows_per_side", "temporal_window")
        _positive(self, "pos_interp_scale", number=(int, float))
        if self.condition not in ("text", "class"):
            raise ValueError(f"condition must be 'text' or 'class', got {self.condition!r}")
        if self.proxies_per_window != 1:
            raise ValueError(
                f"proxies_per_window={self.proxies_per_window} is not supported: PT-DiT uses one "
                "proxy (the window mean) per window; the release's strided several-proxy "
                "variant (proxy_compress_ratios < compress_ratios) is not part of the paper. "
                "Allowed: 1")
        if self.window is not None:
            window = tuple(self.window)
            if len(window) != 3 or any(isinstance(c, bool) or not isinstance(c, int) or c < 1
                                       for c in window):
                raise ValueError(f"window must be three positive ints (frames, rows, cols), got "
                                 f"{self.window!r}")
            object.__setattr__(self, "window", window)

    def grid_multiple(self, frames: int) -> tuple[tuple[int, int, int], str]:
        """What a token grid of `frames` frames must be a multiple of (frames, rows, cols), and
        what that is ("window", or the schedule's "windows per side")."""
        if self.window is not None:
            return self.window, "window"
        n = self.windows_per_side
        return (1 if frames == 1 else self.temporal_window, n, n), "windows per side"

    def window_for(self, grid: tuple[int, int, int]) -> tuple[int, int, int]:
        """The window (frames, rows, cols) in tokens for a token grid (F, H, W) that is a
        multiple of `grid_multiple(F)` (the models check that first, with messages in pixels)."""
        if self.window is not None:
            return self.window
        F, H, W = grid
        (tf, n, _), _ = self.grid_multiple(F)
        if F % tf or H % n or W % n:
            raise ValueError(f"token grid {grid} does not split into the schedule's {n}x{n} "
                             f"windows of {tf} frames; pass window=(f, h, w) explicitly")
        return (tf, H // n, W // n)


def nearest_multiples(value: int, multiple: int) -> str:
    """The positive multiples of `multiple` on either side of `value`: 'a or b' (or 'b')."""
    lo = value // multiple * multiple
    return f"{lo + multiple}" if lo == 0 else f"{lo} or {lo + multiple}"


_DIT_SIZES = {  # name: depth, width, heads, paper params (M, DiT Table 1)
    "S": (12, 384, 6, 33), "B": (12, 768, 12, 130), "L": (24, 1024, 16, 458),
    "XL": (28, 1152, 16, 675),
}

MODELS: dict[str, object] = {
    **{f"DiT-{size}/{p}": DiTConfig(depth=d, hidden_size=w, num_heads=h, patch_size=p,
                                    paper_params_m=m)
       for size, (d, w, h, m) in _DIT_SIZES.items() for p in (2, 4, 8)},
    "PixArt-XL/2": PixArtConfig(paper_params_m=600.0),
    "PT-DiT/S-Class": PTDiTConfig(depth=10, hidden_size=288, num_heads=6, condition="class",
                                  paper_params_m=32.0),
    "PT-DiT/B": PTDiTConfig(depth=12, hidden_size=640, num_heads=10, paper_params_m=144.0),
    "PT-DiT/L": PTDiTConfig(depth=28, hidden_size=864, num_heads=12, paper_params_m=605.0),
    "PT-DiT/XL": PTDiTConfig(depth=28, hidden_size=1152, num_heads=16, paper_params_m=1142.0),
    "PT-DiT/H": PTDiTConfig(depth=30, hidden_size=1440, num_heads=20, paper_params_m=1795.0),
    "Qihoo-T2I-1B": PTDiTConfig(depth=28, hidden_size=1152, num_heads=16, window=(1, 8, 8),
                                source="Qihoo-T2X release (MindSpeed-MM, 1024-px predictor)",
                                paper_params_m=1131.629216),
}


def list_models() -> list[str]:
    """Every named configuration, in registry order."""
    return list(MODELS)


def get_config(name: str, **overrides):
    """The named configuration with `overrides` applied; ValueError on an unknown name or field."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, MODELS, n=3, cutoff=0.5)
        hint = f"; nearest: {', '.join(close)}" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}. Known models: {', '.join(MODELS)}")
    config = MODELS[name]
    check_fields(type(config), overrides, name)
    return dataclasses.replace(config, **overrides)


def check_fields(config_class: type, fields, label: str) -> None:
    """ValueError naming the fields a config class does not have, and those it has."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{label} has no option(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(known))}")


def describe(name: str) -> dict:
    """One row about a named model: sizes, attention layout, parameters ours vs published."""
    config = get_config(name)
    model = build(name, device="meta")
    params = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    paper = config.paper_params_m
    return {
        "model": name,
        "family": config.family,
        "params_m": round(params / 1e6, 3),
        "paper_params_m": paper,
        "params_diff_pct": None if paper is None else round(100 * (params / 1e6 / paper - 1), 2),
        "frozen_params_m": round(frozen / 1e6, 3),
        "depth": config.depth,
        "width": config.hidden_size,
        "heads": config.num_heads,
        "head_dim": config.hidden_size // config.num_heads,
        "patch": config.patch_size,
        "condition": getattr(config, "condition", "class" if config.family == "DiT" else "text"),
        "attention": config.attention_layout(),
        "source": config.source,
    }


def model_class(config) -> type[nn.Module]:
    from .models import DiT, PixArt, PTDiT
    return {DiTConfig: DiT, PixArtConfig: PixArt, PTDiTConfig: PTDiT}[type(config)]


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}


def model_dtype(dtype) -> torch.dtype | None:
    """A model dtype given as a floating torch.dtype or its name (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype {dtype!r} is not a model dtype; allowed: {', '.join(DTYPES)} "
                     "(as names or torch dtypes)")


def build(name: str, device=None, dtype: torch.dtype | str | None = None,
          **overrides) -> nn.Module:
    """Builds a named model in eval mode (call `.train()` to train: it turns on label and
    caption dropout). `device="meta"` allocates nothing (for counting, any size)."""
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
