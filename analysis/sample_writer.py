"""Where samples go: PNGs named by sample index, written atomically, and ADM's .npz.

- An image is `{index:06d}.png`; a video sample is one PNG per frame, `{index:06d}-{f:03d}.png`.
- Each PNG is written to `<name>.tmp` and renamed over its final name (os.replace), so a killed
  run leaves finished PNGs whole and no half-written file under a final name; a sample is
  finished when all its PNGs exist, decode, and have the expected size.
- Pixels: decoder output x in [-1, 1] -> uint8 as DiT's sample_ddp.py does,
  clamp(127.5·x + 128, 0, 255) truncated, i.e. (x/2 + 0.5)·255 rounded half up.
- `samples.npz` holds `arr_0`, uint8 (N, H, W, 3) for images, (N, F, H, W, 3) for video, in
  index order: the ADM evaluation-suite layout that DiT's FID numbers use.
"""

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

NPZ_NAME = "samples.npz"


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) decoder output in [-1, 1] -> uint8 (B, H, W, 3), rounded half up."""
    pixels = torch.clamp(127.5 * images.float() + 128.0, 0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def png_names(index: int, frames: int | None) -> list[str]:
    """The PNG file names of one sample (one per frame for video, frames=None: an image)."""
    if frames is None:
        return [f"{index:06d}.png"]
    return [f"{index:06d}-{f:03d}.png" for f in range(frames)]


def write_png(path: Path, pixels: np.ndarray) -> None:
    """Writes (H, W, 3) uint8 as a PNG atomically (temporary file, then rename)."""
    tmp = path.with_name(path.name + ".tmp")
    Image.fromarray(pixels).save(tmp, format="PNG")
    os.replace(tmp, path)


def write_sample(out: Path, index: int, frames: int | None, pixels: np.ndarray) -> None:
    """Writes one sample: (H, W, 3) for an image, (F, H, W, 3) for video."""
    for name, image in zip(png_names(index, frames), pixels if frames else [pixels]):
        write_png(out / name, image)


def _valid_png(path: Path, size: tuple[int, int]) -> bool:
    """Whether `path` is a whole RGB PNG of (height, width) `size`."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or image.mode != "RGB" or image.size != size[::-1]:
                return False
            image.load()   # decodes every row: a truncated file fails here
        return True
    except (OSError, ValueError, SyntaxError):
        return False


def finished(out: Path, index: int, frames: int | None, size: tuple[int, int]) -> bool:
    """Whether every PNG of sample `index` is in `out`, whole and of `size` (H, W)."""
    return all(_valid_png(out / name, size) for name in png_names(index, frames))


def read_sample(out: Path, index: int, frames: int | None) -> np.ndarray:
    """One sample's pixels back: (H, W, 3), or (F, H, W, 3) for video."""
    images = [np.asarray(Image.open(out / name).convert("RGB"))
              for name in png_names(index, frames)]
    return images[0] if frames is None else np.stack(images)


def write_npz(out: Path, indices: range, frames: int | None, size: tuple[int, int]) -> Path:
    """Writes `out/samples.npz` (arr_0 uint8, index order) from the PNGs of `indices`;
    RuntimeError naming the samples that are missing."""
    missing = [i for i in indices if not finished(out, i, frames, size)]
    if missing:
        raise RuntimeError(f"cannot write {out / NPZ_NAME}: {len(missing)} samples missing or "
                           f"damaged in {out}, first {missing[:5]}")
    arr = np.stack([read_sample(out, i, frames) for i in indices])
    path, tmp = out / NPZ_NAME, out / (NPZ_NAME + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, arr_0=arr)
    os.replace(tmp, path)
    return path
