"""A workload — one model at one input shape — and the forward inputs for it.

    work = Workload("PT-DiT/XL", resolution=1024, frames=None, batch=2)
    kwargs = example_inputs(model, work, generator=torch.Generator().manual_seed(0))
    out = model(**kwargs)

`Workload` is validated and resolved from shapes alone (no tensor is made): the config with its
overrides, the latent shape and token grid, PT-DiT's window. Every counter, timer and test
builds its inputs with `example_inputs`.
"""

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from . import checks
from .configs import MODEL_CLASSES, get_config
from .layers import compute_dtype
from .models.inputs import VAE_SPATIAL, LatentShape, latent_shape
from .models.ptdit import PTDiTConfig

DEFAULT_TEXT_TOKENS = 120   # T5 tokens of PixArt-alpha and PT-DiT (both papers' setting)


@dataclass(frozen=True)
class Workload:
    """A forward pass of `model` (a registry name, or a config instance) on an image of
    `resolution` pixels — a square side, or (height, width) — with latent sides of resolution / 8,
    or on video with `frames` latent frames (None: an image), `batch` samples and `text_tokens`
    caption tokens (text models; 0 is recorded for class models). `window` sets PT-DiT's window
    in tokens (frames, rows, cols); `overrides` other config fields. Raises ValueError with what
    is allowed."""
    model: object
    resolution: int | tuple[int, int]
    frames: int | None = None
    batch: int = 1
    text_tokens: int = DEFAULT_TEXT_TOKENS
    window: tuple[int, int, int] | None = None
    overrides: dict = field(default_factory=dict, hash=False)
    config: object = field(init=False, repr=False, compare=False)
    shape: LatentShape = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        config = self._config()
        checks.positive_int("batch", self.batch)
        height, width = self.pixels
        for label, px in (("resolution", height), ("resolution width", width)):
            checks.positive_int(label, px)
            if px % VAE_SPATIAL:
                near = checks.nearest_multiples(px, VAE_SPATIAL)
                raise ValueError(
                    f"{label} {px} px is not a multiple of the VAE factor {VAE_SPATIAL}; "
                    f"allowed: multiples of {VAE_SPATIAL} px; nearest valid: "
                    f"{checks.either(near)} px")
        if self.frames is not None:
            checks.positive_int("latent frames (None for an image)", self.frames)
        dims = (self.batch, config.in_channels) + (() if self.frames is None else
                                                   (self.frames,))
        dims += (height // VAE_SPATIAL, width // VAE_SPATIAL)
        multiple, unit = (config.grid_multiple(self.frames or 1)
                          if isinstance(config, PTDiTConfig) else ((1, 1, 1), "window"))
        try:    # the models' own checks, so the messages are the ones a forward pass gives
            shape = latent_shape(dims, config.in_channels, config.patch_size, multiple, unit)
        except ValueError as err:
            raise ValueError(f"{self.name} at {self.resolution} px: {err}") from None
        if config.condition == "text":
            checks.positive_int(f"text_tokens for {self.name}", self.text_tokens)
        else:
            object.__setattr__(self, "text_tokens", 0)
        object.__setattr__(self, "config", config)
        object.__setattr__(self, "shape", shape)
        if isinstance(config, PTDiTConfig):
            object.__setattr__(self, "window", config.window_for(shape.grid))

    def _config(self):
        overrides = dict(self.overrides)
        if self.window is not None:
            overrides["window"] = checks.window(self.window)
        if type(self.model) in MODEL_CLASSES:
            return dataclasses.replace(self.model, **overrides)
        config = get_config(self.model, **overrides)
        if self.window is not None and not isinstance(config, PTDiTConfig):
            raise ValueError(f"window applies to PT-DiT models; {self.model} is a "
                             f"{config.family} model")
        return config

    @property
    def pixels(self) -> tuple[int, int]:
        """(height, width) in pixels."""
        r = self.resolution
        if isinstance(r, (tuple, list)) and len(r) == 2:
            return tuple(r)
        if isinstance(r, (tuple, list)):
            raise ValueError(f"resolution must be a side or (height, width) in pixels, got {r!r}")
        return r, r

    @property
    def name(self) -> str:
        """The registry name, or '<family> (custom config)'."""
        return self.model if isinstance(self.model, str) else f"{self.model.family} (custom)"

    @property
    def tokens(self) -> int:
        return self.shape.tokens

    @property
    def latent_frames(self) -> int:
        """Latent frames, 1 for an image (as rows record it)."""
        return self.shape.frames

    @property
    def latent_dims(self) -> tuple[int, ...]:
        """(B, C, H, W) or (B, C, F, H, W)."""
        s = self.shape
        return (s.batch, s.channels) + ((s.frames,) if s.video else ()) + (s.height, s.width)

    def describe(self) -> dict:
        """The shape columns every row carries."""
        return {
            "model": self.name,
            "resolution": (self.resolution if isinstance(self.resolution, int)
                           else "{}x{}".format(*self.pixels)),
            "latent_frames": self.latent_frames,
            "tokens": self.tokens,
            "batch": self.batch,
            "text_tokens": self.text_tokens,
            "window": "x".join(map(str, self.window)) if self.window else "",
        }


def example_inputs(model: nn.Module, work: Workload, device=None, dtype=None,
                   generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The keyword arguments of `model`'s forward for `work`, drawn fresh from `generator`:
    latents `x` (B, C, H, W) / (B, C, F, H, W) ~ N(0, 1), timesteps `t` (B,) uniform in
    [0, 1000), and the condition — class labels `y` (B,) (`text` for PT-DiT/S-Class), or T5
    captions `text` (B, L, caption_channels) ~ N(0, 1) with a keep-mask `text_mask` (B, L) that
    keeps a random prefix of at least one token; PixArtMS also gets `resolution` (B, 2) in
    pixels and `aspect_ratio` (B, 1). Device and dtype default to the model's parameters';
    on `meta` nothing is drawn."""
    param = next(model.parameters())
    device = torch.device(device) if device is not None else param.device
    dtype = checks.model_dtype(dtype) or param.dtype
    config, s = model.config, work.shape
    B, L = s.batch, work.text_tokens
    meta = device.type == "meta"
    gen = None if meta else generator
    cpu = dict(device="cpu", generator=gen) if not meta else dict(device="meta")

    def normal(*size):
        return torch.randn(*size, dtype=torch.float32, **cpu).to(device, dtype)

    kwargs = {"x": normal(*work.latent_dims),   # timesteps at least float32, as the models embed
              "t": (torch.rand(B, dtype=torch.float64, **cpu) * 1000).to(device,
                                                                        compute_dtype(dtype))}
    if config.condition == "class":
        labels = torch.randint(0, config.num_classes, (B,), **cpu).to(device)
        kwargs["y" if config.family == "DiT" else "text"] = labels
        return kwargs
    kwargs["text"] = normal(B, L, config.caption_channels)
    kept = torch.randint(1, L + 1, (B, 1), **cpu)
    kwargs["text_mask"] = (torch.arange(L, device=kept.device) < kept).to(device, torch.int64)
    if getattr(config, "micro_condition", False):
        pixels = [s.height * VAE_SPATIAL, s.width * VAE_SPATIAL]
        kwargs["resolution"] = torch.tensor([pixels] * B, dtype=torch.float32, device=device)
        kwargs["aspect_ratio"] = torch.full((B, 1), s.height / s.width, device=device)
    return kwargs
