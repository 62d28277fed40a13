"""Input checks and latent-shape bookkeeping shared by the three models."""

from dataclasses import dataclass

import torch
from torch import Tensor

from ..checks import either, nearest_multiples

VAE_SPATIAL = 8   # pixels per latent pixel (SD / PixArt / Open-Sora-Plan VAEs)


@dataclass(frozen=True)
class LatentShape:
    """A latent batch: image (B, C, H, W) or video (B, C, F, H, W), and its token grid."""

    batch: int
    channels: int
    frames: int
    height: int
    width: int
    patch_size: int
    video: bool

    @property
    def grid(self) -> tuple[int, int, int]:
        """Token grid (F, H/p, W/p)."""
        return (self.frames, self.height // self.patch_size, self.width // self.patch_size)

    @property
    def tokens(self) -> int:
        F, h, w = self.grid
        return F * h * w

    def as_video(self, x: Tensor) -> Tensor:
        return x if self.video else x.unsqueeze(2)

    def restore(self, x: Tensor) -> Tensor:
        """(B, C, F, H, W) -> the caller's layout."""
        return x if self.video else x.squeeze(2)


def check_dtype(what: str, x: Tensor, dtype: torch.dtype) -> None:
    if x.dtype != dtype:
        raise ValueError(f"{what} are {x.dtype} but the model is {dtype}; cast them with "
                         f".to({dtype})")


def parse_latent(x: Tensor, in_channels: int, patch_size: int, multiple: tuple[int, int, int],
                 dtype: torch.dtype, unit: str = "window") -> LatentShape:
    """Checks a latent batch against the model: a tensor of the model's dtype, and a shape that
    `latent_shape` accepts."""
    if not isinstance(x, Tensor) or x.dim() not in (4, 5):
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"latents must be a (B, C, H, W) or (B, C, F, H, W) tensor, got "
                         f"{got}")
    check_dtype("latents", x, dtype)
    return latent_shape(tuple(x.shape), in_channels, patch_size, multiple, unit)


def latent_shape(dims: tuple[int, ...], in_channels: int, patch_size: int,
                 multiple: tuple[int, int, int], unit: str = "window") -> LatentShape:
    """Checks latent dims (B, C, H, W) or (B, C, F, H, W): channels, and a token grid that is a
    multiple of `multiple` (frames, rows, cols) — a window size, or `unit` = "windows per side"
    for PT-DiT's schedule. Messages give the nearest valid sizes in latent pixels and pixels."""
    if len(dims) not in (4, 5):
        raise ValueError(f"latents must be (B, C, H, W) or (B, C, F, H, W), got {dims}")
    video = len(dims) == 5
    B, C = dims[:2]
    F = dims[2] if video else 1
    H, W = dims[-2:]
    if C != in_channels:
        raise ValueError(f"latents have {C} channels; this model takes {in_channels}")
    if min(B, F, H, W) < 1:
        raise ValueError(f"latents must be non-empty, got shape {dims}")
    for name, n, m in (("height", H, multiple[1]), ("width", W, multiple[2])):
        step = patch_size * m
        if n % step:
            near = nearest_multiples(n, step)
            near_px = either(v * VAE_SPATIAL for v in near)
            raise ValueError(
                f"latent {name} {n} ({n * VAE_SPATIAL} px) is not divisible by patch {patch_size}"
                f" × {unit} {m} = {step}; allowed: multiples of {step} latent pixels "
                f"({step * VAE_SPATIAL} px); nearest valid: {either(near)} latent pixels "
                f"({near_px} px)")
    if F % multiple[0]:
        raise ValueError(
            f"{F} latent frames are not divisible by the temporal window {multiple[0]}; allowed: "
            f"multiples of {multiple[0]}; nearest valid: "
            f"{either(nearest_multiples(F, multiple[0]))}")
    return LatentShape(B, C, F, H, W, patch_size, video)


def check_timesteps(t: Tensor | float | list, batch: int, device: torch.device) -> Tensor:
    """(B,) timesteps; a number or 0-d tensor is broadcast to the batch."""
    if not isinstance(t, Tensor):
        try:
            t = torch.as_tensor(t, dtype=torch.float32, device=device)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(f"timesteps must be a number or a ({batch},) tensor, got "
                             f"{type(t).__name__} ({err})") from None
    if t.dim() == 0:
        return t.expand(batch)
    if t.shape != (batch,):
        raise ValueError(f"timesteps must have shape ({batch},) for a batch of {batch} "
                         f"(or be a scalar), got {tuple(t.shape)}")
    return t


def check_text(text: Tensor, mask: Tensor | None, batch: int, channels: int,
               dtype: torch.dtype) -> Tensor:
    """Caption features (B, L, channels) — or (B, 1, L, channels), PixArt's layout — and an
    optional (B, L) keep-mask tensor (bool, or 0/1 integers or floats: 1 keeps; the values are
    checked on CPU tensors only, as in check_labels); returns the features as (B, L, channels)."""
    if not isinstance(text, Tensor):
        raise ValueError(f"caption features must be a ({batch}, L, {channels}) tensor, got "
                         f"{type(text).__name__}")
    if text.dim() == 4 and text.shape[1] == 1:
        text = text.squeeze(1)
    if text.dim() != 3 or text.shape[0] != batch or text.shape[2] != channels:
        raise ValueError(f"caption features must have shape ({batch}, L, {channels}) for a batch "
                         f"of {batch}, got {tuple(text.shape)}")
    if text.shape[1] < 1:
        raise ValueError("captions must hold at least one token (L >= 1), got L = 0")
    check_dtype("caption features", text, dtype)
    if mask is not None and (not isinstance(mask, Tensor) or mask.shape != text.shape[:2]
                             or mask.dtype.is_complex):
        got = (f"{str(mask.dtype).removeprefix('torch.')} {tuple(mask.shape)}"
               if isinstance(mask, Tensor) else type(mask).__name__)
        raise ValueError(f"text mask must be a torch tensor of shape {tuple(text.shape[:2])} "
                         f"(batch, caption tokens), bool or 0/1 integers or floats, got {got}")
    if mask is not None and mask.device.type == "cpu" and not torch.compiler.is_compiling() \
            and ((mask != 0) & (mask != 1)).any():
        raise ValueError(f"text mask values must be 0 (drop) or 1 (keep), got "
                         f"{sorted(set(mask.flatten().tolist()))[:8]}")
    return text


def check_labels(y: Tensor, batch: int, num_labels: int) -> None:
    """(B,) integer class labels, each a row of the label table (0..num_labels-1; the last row
    is the null class when the model has one). The value range is checked on CPU tensors only:
    elsewhere it would cost a device sync per forward and break torch.compile graphs."""
    if not isinstance(y, Tensor) or y.shape != (batch,) or y.dtype not in (torch.int32,
                                                                            torch.int64):
        got = f"{y.dtype} {tuple(y.shape)}" if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"class labels must be an integer tensor of shape ({batch},) for a "
                         f"batch of {batch}, got {got}")
    if y.device.type == "cpu" and not torch.compiler.is_compiling() and \
            ((y < 0) | (y >= num_labels)).any():
        raise ValueError(f"class labels must lie in 0..{num_labels - 1}, got "
                         f"{sorted(set(y.tolist()))}")
