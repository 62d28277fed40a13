"""Reading and checking the image sets that FID and CLIP score take.

An image set is one of:
- a folder of image files (png, jpg, jpeg, webp, bmp; other files are ignored), read in sorted
  file-name order. PIL decodes each file and converts it to RGB (`convert("RGB")`), so
  grayscale, palette and RGBA files count as RGB, as in torch-fidelity and clean-fid; 16-bit and
  float files are refused. All images of a set share one size.
- an ADM-style `.npz` whose `arr_0` is uint8 (N, H, W, 3): memory-mapped when stored
  uncompressed (`np.savez`, as ADM and DiT write them) and read by slices, else streamed
  through the decompressor; never loaded whole (50K x 256 x 256 x 3 is 9.8 GB).
- an in-memory tensor (N, 3, H, W): uint8 in [0, 255], or floating in [0, 1], which is quantised
  to uint8 as round(255 * x).

Batches come out as uint8 torch tensors (B, 3, H, W), the layout torchmetrics takes. Under
torch.distributed each rank reads only its shard, the images whose index i has
i % world_size == rank, so the features of every image are computed exactly once.
"""

import os
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .distributed import current

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".webp")
NPZ_KEY = "arr_0"
UINT8_INPUT = "uint8 input"
FLOAT_INPUT = "float [0, 1] input quantised to uint8 as round(255 * x)"

Source = str | os.PathLike | torch.Tensor


def shard() -> tuple[int, int]:
    """(rank, world_size) of this process: (0, 1) unless a process group runs (started by
    analysis.distributed.process_group under torchrun, or by the caller)."""
    return current()


def check_images(images: torch.Tensor, what: str = "images") -> torch.Tensor:
    """Checks an in-memory batch (N, 3, H, W), uint8 in [0, 255] or floating in [0, 1]; returns
    it unchanged. Raises ValueError saying what was given and what is allowed."""
    if not isinstance(images, torch.Tensor):
        raise ValueError(f"{what}: expected a torch.Tensor (N, 3, H, W) or a path, got "
                         f"{type(images).__name__}")
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"{what}: shape {tuple(images.shape)}; allowed: (N, 3, H, W) with 3 "
                         "(RGB) channels first")
    if images.dtype == torch.uint8:
        return images
    if not images.is_floating_point():
        raise ValueError(f"{what}: dtype {images.dtype}; allowed: torch.uint8 in [0, 255] or a "
                         "floating dtype in [0, 1]")
    if not torch.isfinite(images).all():
        raise ValueError(f"{what}: has NaN or infinite values; allowed: floats in [0, 1]")
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise ValueError(f"{what}: floating values span [{low:g}, {high:g}]; allowed: [0, 1] "
                         "(or uint8 in [0, 255]); map [-1, 1] model output with (x + 1) / 2")
    return images


def quantisation(source: Source) -> str:
    """How `source` becomes the uint8 images the metrics see."""
    if isinstance(source, torch.Tensor) and source.is_floating_point():
        return FLOAT_INPUT
    return UINT8_INPUT


def _to_uint8(batch: torch.Tensor) -> torch.Tensor:
    return batch if batch.dtype == torch.uint8 else (batch * 255).round().to(torch.uint8)


# ----------------------------------------------------------------------------------------------
# Folders
# ----------------------------------------------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    files = sorted((p for p in folder.iterdir()
                    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES), key=lambda p: p.name)
    if not files:
        raise ValueError(f"image folder {str(folder)!r} holds no image files; allowed suffixes: "
                         f"{', '.join(IMAGE_SUFFIXES)}")
    return files


def _read_file(path: Path) -> np.ndarray:
    """One image file as uint8 (H, W, 3)."""
    try:
        with Image.open(path) as image:
            if image.mode.startswith(("I", "F")):
                raise ValueError(f"image file {str(path)!r} has PIL mode {image.mode!r} (16-bit "
                                 "or float); allowed: 8-bit images (uint8)")
            return np.asarray(image.convert("RGB"))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image file {str(path)!r} cannot be read as an image: {err}") from err


# ----------------------------------------------------------------------------------------------
# ADM-style .npz
# ----------------------------------------------------------------------------------------------

def _npz_layout(path: Path) -> tuple[zipfile.ZipInfo, tuple, np.dtype, int]:
    """arr_0's zip entry, shape, dtype and the byte offset of its data inside the entry; checks
    that it is uint8 (N, H, W, 3)."""
    try:
        archive = zipfile.ZipFile(path)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{str(path)!r} is not a readable .npz (zip) file: {err}") from err
    with archive:
        name = NPZ_KEY + ".npy"
        if name not in archive.namelist():
            keys = ", ".join(n.removesuffix(".npy") for n in archive.namelist()) or "none"
            raise ValueError(f"{str(path)!r} has no {NPZ_KEY!r} array (keys: {keys}); an image "
                             f".npz holds uint8 images (N, H, W, 3) in {NPZ_KEY!r}, as ADM's "
                             "sample and reference batches do")
        info = archive.getinfo(name)
        with archive.open(info) as entry:
            version = np.lib.format.read_magic(entry)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read_header(entry)
            offset = entry.tell()
    what = f"{str(path)!r} {NPZ_KEY}"
    if dtype != np.uint8:
        raise ValueError(f"{what} has dtype {dtype}; allowed: uint8 in [0, 255]")
    if len(shape) != 4 or shape[-1] != 3:
        hint = (" (channels first? the layout is NHWC)" if len(shape) == 4 and shape[1] == 3
                else "")
        raise ValueError(f"{what} has shape {shape}; allowed: (N, H, W, 3) uint8 RGB "
                         f"images{hint}")
    if fortran:
        raise ValueError(f"{what} is stored in Fortran order; allowed: C order (np.savez)")
    return info, shape, dtype, offset


def _npz_chunks(path: Path, rows: int) -> Iterator[np.ndarray]:
    """arr_0 in consecutive chunks of `rows` images (<= rows, H, W, 3), lazily."""
    info, shape, dtype, offset = _npz_layout(path)
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:  # the local header's extra field may differ from the index
            f.seek(info.header_offset + 26)
            name_len, extra_len = np.frombuffer(f.read(4), "<u2")
        start = info.header_offset + 30 + int(name_len) + int(extra_len) + offset
        array = np.memmap(path, dtype=dtype, mode="r", offset=start, shape=shape)
        for i in range(0, shape[0], rows):
            yield array[i:i + rows]
        return
    row_bytes = int(np.prod(shape[1:]))
    with zipfile.ZipFile(path) as archive, archive.open(info) as entry:
        entry.read(offset)
        for i in range(0, shape[0], rows):
            n = min(rows, shape[0] - i)
            yield np.frombuffer(entry.read(n * row_bytes), dtype).reshape(n, *shape[1:])


# ----------------------------------------------------------------------------------------------
# Any image set
# ----------------------------------------------------------------------------------------------

def _existing(path: str | os.PathLike) -> Path:
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"image set {str(path)!r} does not exist; allowed: a folder of image "
                         f"files ({', '.join(IMAGE_SUFFIXES)}), an .npz with uint8 {NPZ_KEY} "
                         "(N, H, W, 3), or a tensor (N, 3, H, W)")
    if path.is_file() and path.suffix.lower() != ".npz":
        raise ValueError(f"image set {str(path)!r} is a {path.suffix or 'suffix-less'} file; "
                         f"allowed: a folder of image files or an .npz with {NPZ_KEY}")
    return path


def count_images(source: Source) -> int:
    """The number of images in `source` (all shards)."""
    if isinstance(source, torch.Tensor):
        return check_images(source).shape[0]
    path = _existing(source)
    return _npz_layout(path)[1][0] if path.is_file() else len(_image_files(path))


def image_size(source: Source) -> tuple[int, int]:
    """(H, W) of the images of `source` (of its first file, for a folder)."""
    if isinstance(source, torch.Tensor):
        return tuple(check_images(source).shape[2:])
    path = _existing(source)
    if path.is_file():
        return tuple(_npz_layout(path)[1][1:3])
    first = _image_files(path)[0]
    try:
        with Image.open(first) as image:
            return image.height, image.width
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image file {str(first)!r} cannot be read as an image: {err}") from err


def image_names(source: Source) -> list[str]:
    """The images' names in reading order: file names for a folder, "000000", "000001", … (the
    index) for an .npz or a tensor."""
    if isinstance(source, torch.Tensor) or _existing(source).is_file():
        return [f"{i:06d}" for i in range(count_images(source))]
    return [p.name for p in _image_files(Path(source).expanduser())]


def read_images(source: Source, *, batch_size: int, rank: int | None = None,
                world_size: int | None = None) -> Iterator[torch.Tensor]:
    """This rank's shard of `source` (indices i with i % world_size == rank; rank and world_size
    default to torch.distributed's) in index order, as uint8 batches (<= batch_size, 3, H, W).
    Raises ValueError naming the file or array that is not a valid image set."""
    if batch_size < 1:
        raise ValueError(f"batch_size {batch_size}; allowed: >= 1")
    if rank is None or world_size is None:
        rank, world_size = shard()
    chunk = batch_size * world_size  # each chunk gives this rank at most batch_size images
    if isinstance(source, torch.Tensor):
        images = check_images(source)
        for i in range(rank, images.shape[0], chunk):
            yield _to_uint8(images[i:i + chunk:world_size]).contiguous()
        return
    path = _existing(source)
    if path.is_file():
        for rows in _npz_chunks(path, chunk):
            if len(rows) > rank:
                batch = np.array(rows[rank::world_size])  # reads just this rank's rows
                yield torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()
        return
    files, size = _image_files(path), None
    for i in range(rank, len(files), chunk):
        arrays = []
        for file in files[i:i + chunk:world_size]:
            array = _read_file(file)
            size = size or (array.shape[:2], file.name)
            if array.shape[:2] != size[0]:
                raise ValueError(f"image file {str(file)!r} is {array.shape[1]}x{array.shape[0]}"
                                 f" (WxH); the set's images must share one size, and "
                                 f"{size[1]!r} is {size[0][1]}x{size[0][0]}")
            arrays.append(array)
        yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()
