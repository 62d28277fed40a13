"""Where samples go: PNGs named by sample index, written atomically, and ADM's .npz.

- An image is `{index:06d}.png`; a video sample is one PNG per frame, `{index:06d}-{f:03d}.png`.
- Each PNG is written to `<name>.tmp` and renamed over its final name (os.replace), so a killed
  run leaves finished PNGs whole and no half-written file under a final name; a sample is
  finished when all its PNGs exist, decode, and have the expected size.
- Pixels: decoder output x in [-1, 1] -> uint8 as DiT's sample_ddp.py does,
  clamp(127.5·x + 128, 0, 255) truncated, i.e. (x/2 + 0.5)·255 rounded half up. A 1-channel
  image (a grey pixel-space model's) is written as grey: an RGB PNG with three equal channels.
- `samples.npz` holds `arr_0`, uint8 (N, H, W, 3) for images, (N, F, H, W, 3) for video, in
  index order: the ADM evaluation-suite layout that DiT's FID numbers use.
- `run.json` records the settings that make the pixels (model and weights, scheduler, steps,
  guidance, seed, conditions, resolution, frames, VAE, dtype), written atomically before the
  first PNG. A resumed run must match it field by field, so a folder never mixes the samples
  of two settings; how many samples, the first index, the batch size and the device may differ
  (they move pixels by float rounding at most).
"""

import json
import os
import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

NPZ_NAME = "samples.npz"
RUN_FILE = "run.json"
RUN_FORMAT = "ptdit sample run 1"
PNG_NAME = re.compile(r"(\d{6,})(-\d{3})?\.png")


def to_uint8(images: Tensor) -> np.ndarray:
    """(B, 3, H, W) decoder output in [-1, 1] -> uint8 (B, H, W, 3), rounded half up; a
    1-channel (B, 1, H, W) grey image gets its value in all three channels."""
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (B, 3, H, W) RGB or (B, 1, H, W) grey, got "
                         f"{tuple(images.shape)}")
    images = images.expand(-1, 3, -1, -1)
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


#################################################################################
#                 run.json: the settings the folder's samples were made with    #
#################################################################################

def _short(value) -> str:
    text = json.dumps(value, sort_keys=True)
    if isinstance(value, str) and re.fullmatch(r"[0-9a-f]{64}", value):
        return value[:12] + "…"                       # a sha256
    return text if len(text) <= 60 else text[:57] + "…"


def _differences(old, new, name: str = "") -> list[str]:
    """'field: old → new' for each field (nested: 'model_config.depth') that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        return [d for key in sorted(set(old) | set(new), key=str)
                for d in _differences(old.get(key), new.get(key),
                                      f"{name}.{key}" if name else str(key))]
    return [] if old == new else [f"{name}: {_short(old)} → {_short(new)}"]


def check_run(out: Path, settings: dict) -> str | None:
    """None if samples made with `settings` may go into `out` (a folder without samples, or
    one whose run.json records the same settings); else a one-line reason naming each
    setting that differs (old → new)."""
    record = out / RUN_FILE
    hint = "give another --out (or remove the folder)"
    if not record.is_file():
        made = next((p.name for p in out.glob("*.png") if PNG_NAME.fullmatch(p.name)), None)
        if made:
            return (f"{out} holds samples ({made}, …) but no {RUN_FILE} recording the settings "
                    f"that made them, so they cannot be resumed safely: {hint}")
        return None
    try:
        old = json.loads(record.read_text(encoding="utf-8"))
        old_settings = old["settings"] if old.get("format") == RUN_FORMAT else None
    except (ValueError, TypeError, KeyError, AttributeError):
        old_settings = None
    if not isinstance(old_settings, dict):
        return (f"{record} is not a ptdit sample record ({RUN_FORMAT!r} with 'settings'): {hint}")
    plain = json.loads(json.dumps(settings))      # tuples as lists, as the file holds them
    changed = _differences(old_settings, plain)
    if changed:
        return (f"{out} holds samples made with other settings ({'; '.join(changed)}); "
                f"resuming would mix them: {hint}")
    return None


def write_run(out: Path, settings: dict, about: dict) -> None:
    """Writes out/run.json ({format, settings, about}) atomically, unless it is there."""
    record = out / RUN_FILE
    if record.is_file():
        return
    tmp = out / (RUN_FILE + ".tmp")
    tmp.write_text(json.dumps({"format": RUN_FORMAT, "settings": settings, "about": about},
                              indent=1, sort_keys=True) + "\n")
    os.replace(tmp, record)


def remove_temporaries(out: Path, mine) -> int:
    """Removes the `<name>.png.tmp` files a killed run left for sample indices in `mine` (a
    container of ints); returns how many."""
    removed = 0
    for tmp in out.glob("*.png.tmp"):
        match = PNG_NAME.fullmatch(tmp.name.removesuffix(".tmp"))
        if match and int(match.group(1)) in mine:
            tmp.unlink(missing_ok=True)
            removed += 1
    return removed
