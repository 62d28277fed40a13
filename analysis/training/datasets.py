"""Real image sets for training small models offline: built-in sets read from files that installed
packages ship, or a folder / .npz of the user's own images.

- `digits`: the UCI handwritten digits in scikit-learn's wheel (`sklearn.datasets.load_digits`:
  1,797 images of 8x8 pixels, values 0..16, 10 classes). Scaled to [0, 1], upsampled to
  `size` x `size` with torch's bilinear interpolation (align_corners=False, antialias off), mapped
  to [-1, 1]; 1 channel, labels 0..9. The split is fixed and does not depend on `seed`:
  scikit-learn's `train_test_split(test_size=0.2, stratify=labels, random_state=0)`, 1,437 train
  and 360 test images.
- `photos`: random square crops of the colour photographs bundled with scikit-learn,
  scikit-image and matplotlib (PHOTOS), read from the packages' folders with PIL (nothing
  downloads). The split is by photograph: PHOTOS_TEST never appear in train. Each of the `crops`
  crops of a split picks a photograph uniformly, a side that is a uniform fraction in `scale` of
  the photograph's short side and a uniform position, all drawn from
  `torch.Generator().manual_seed(seed)`; it is cut out, then resized to `size` x `size` with
  PIL's bicubic filter (which widens its support when shrinking, i.e. antialiased); 3 channels,
  no labels.
  Left out of skimage/data: the greyscale photographs (camera, coins, moon, page, text,
  clock_motion, cell, brick, grass, gravel, microaneurysms; the set is colour) and the synthetic
  or graphic images (color.png, a colour wheel; chessboard_RGB.png; logo.png; horse.png, a
  silhouette). The stereo pair motorcycle_left/right is in train together, so no view of a test
  scene is trained on.
- a folder: every image file (IMAGE_SUFFIXES, any sizes; hidden files and folders skipped),
  in sorted relative-path order, centre-cropped to a square and resized to `size` with PIL's
  bicubic filter. When every image sits in a subfolder of the root, the subfolders' names
  (sorted) are the classes (torchvision's ImageFolder convention), else the set is unconditional.
  Grey files (PIL modes 1, L, LA) give 1 channel, all others RGB (palettes expanded, alpha
  dropped); a folder mixing the two is refused.
- an .npz: uint8 images in `images` (or ADM's `arr_0`), (N, H, W, C) or (N, C, H, W) with C 1 or
  3, and optionally integer `labels` (N,); resized as a folder's images when not `size` x `size`.
Folders and .npz files are split by a fixed 10% test hold-out: the first max(1, round(N / 10))
indices of `torch.randperm(N)` under `torch.Generator().manual_seed(0)` are the test split.
Every set's `info` records what the numbers depend on: sources with their sha256, the split rule
and the sha256 of the split's indices (int64 little-endian, ascending; for `photos`, of its
photographs' names, one a line), crop settings, seed and the sha256 of the crop boxes.
"""

import hashlib
import importlib.metadata
import importlib.util
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch import Tensor

from ..hashing import file_sha256

DATASETS = ("digits", "photos")            # built-in names
SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp")
NPZ_KEYS = ("images", "arr_0")
GREY_MODES = ("1", "L", "LA")
HIGH_DEPTH_MODES = ("I", "F")              # PIL modes starting so: 16/32-bit integer or float
DIGITS_TEST_SIZE, DIGITS_SPLIT_SEED = 0.2, 0
HOLDOUT_FRACTION, HOLDOUT_SEED = 0.1, 0
# (distribution, import name, file inside the package): the colour photographs of `photos`
PHOTOS_TRAIN = (
    ("scikit-learn", "sklearn", "datasets/images/china.jpg"),
    ("scikit-image", "skimage", "data/astronaut.png"),
    ("scikit-image", "skimage", "data/coffee.png"),
    ("scikit-image", "skimage", "data/rocket.jpg"),
    ("scikit-image", "skimage", "data/motorcycle_left.png"),
    ("scikit-image", "skimage", "data/motorcycle_right.png"),
    ("scikit-image", "skimage", "data/hubble_deep_field.jpg"),
    ("scikit-image", "skimage", "data/retina.jpg"),
    ("scikit-image", "skimage", "data/ihc.png"),
)
PHOTOS_TEST = (
    ("scikit-learn", "sklearn", "datasets/images/flower.jpg"),
    ("scikit-image", "skimage", "data/chelsea.png"),
    ("matplotlib", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
)
BICUBIC = "PIL Image.resize BICUBIC (support widened when shrinking: antialiased)"


@dataclass(frozen=True)
class ImageSet:
    """A split of an image set, in memory.

    images: (N, C, H, W) float32 in [-1, 1], C 1 or 3, H = W = the `size` asked for.
    labels: (N,) int64 class ids in [0, num_classes), or None (unconditional).
    info: JSON-able record of the set: name, split, size, count, channels, preprocessing, sources
        with sha256, split rule and indices' sha256, crop settings.
    """
    images: Tensor
    labels: Tensor | None
    num_classes: int | None
    info: dict


def _indices_sha256(indices) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def _to_unit(pixels: np.ndarray) -> Tensor:
    """uint8 (N, H, W, C) -> float32 (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div(127.5).sub(1).contiguous()


def _square(image: Image.Image, size: int) -> Image.Image:
    """The centred square crop of `image` (side: the short side), resized to size x size."""
    side = min(image.width, image.height)
    left, top = (image.width - side) // 2, (image.height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((size, size), Image.BICUBIC)


def _split_info(rule: str, test: np.ndarray, chosen: np.ndarray, n: int) -> dict:
    return {"split_rule": rule, "train_count": n - len(test), "test_count": len(test),
            "test_indices_sha256": _indices_sha256(test),
            "split_indices_sha256": _indices_sha256(chosen)}


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------

def _digits(size: int, split: str) -> ImageSet:
    from sklearn import __version__ as sklearn_version
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    n = len(digits.target)
    train, test = train_test_split(np.arange(n), test_size=DIGITS_TEST_SIZE,
                                   stratify=digits.target, random_state=DIGITS_SPLIT_SEED)
    train, test = np.sort(train), np.sort(test)
    chosen = train if split == "train" else test
    pixels = torch.from_numpy(digits.images[chosen]).float().div(16)[:, None]  # (N, 1, 8, 8)
    images = F.interpolate(pixels, size=(size, size), mode="bilinear", align_corners=False,
                           antialias=False).mul(2).sub(1)                         # (N, 1, S, S)
    _, source = _package_file("scikit-learn", "sklearn", "datasets/data/digits.csv.gz", "digits")
    info = {"name": "digits", "split": split, "size": size, "count": len(chosen), "channels": 1,
            "num_classes": 10,
            "preprocessing": "sklearn load_digits 8x8 values 0..16 divided by 16, torch bilinear "
                             f"resize to {size}x{size} (align_corners=False, antialias off), "
                             "mapped to [-1, 1] as 2x - 1",
            "sources": [source],
            **_split_info(f"sklearn {sklearn_version} train_test_split(test_size="
                          f"{DIGITS_TEST_SIZE}, stratify=labels, random_state="
                          f"{DIGITS_SPLIT_SEED}); indices ascending", test, chosen, n)}
    labels = torch.from_numpy(digits.target[chosen]).long()
    return ImageSet(images.contiguous(), labels, 10, info)


# ----------------------------------------------------------------------------------------------
# photos
# ----------------------------------------------------------------------------------------------

def _package_file(distribution: str, package: str, relative: str,
                  dataset: str) -> tuple[Path, dict]:
    """Where a file that `package` ships lies, and its record (file, package version, sha256);
    FileNotFoundError naming the file when the installed version lacks it."""
    spec = importlib.util.find_spec(package)  # finds the folder without importing the package
    folder = Path(next(iter(spec.submodule_search_locations))) if spec else None
    try:
        version = importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        version = None
    if folder is None or not (folder / relative).is_file():
        where = f"{folder / relative}" if folder else f"{package} is not installed"
        raise FileNotFoundError(f"{dataset!r} needs {package}/{relative}, which {distribution} "
                                f"{version or '(not installed)'} does not ship ({where}); "
                                f"install the version in constraints.txt")
    path = folder / relative
    return path, {"file": f"{package}/{relative}", "package": f"{distribution} {version}",
                  "sha256": file_sha256(path)}


def _photos(size: int, split: str, seed: int, crops: int,
            scale: tuple[float, float]) -> ImageSet:
    files = [_package_file(*photo, "photos")
             for photo in (PHOTOS_TRAIN if split == "train" else PHOTOS_TEST)]
    sources, photos = [record for _, record in files], []
    for path, _ in files:
        with Image.open(path) as image:
            photos.append(image.convert("RGB"))
    short = torch.tensor([min(p.size) for p in photos], dtype=torch.float64)
    width = torch.tensor([p.width for p in photos], dtype=torch.float64)
    height = torch.tensor([p.height for p in photos], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    pick = torch.randint(len(photos), (crops,), generator=generator)
    fraction = scale[0] + (scale[1] - scale[0]) * torch.rand(crops, generator=generator,
                                                               dtype=torch.float64)
    side = (fraction * short[pick]).round().clamp(min=1)
    u = torch.rand(2, crops, generator=generator, dtype=torch.float64)
    left = (u[0] * (width[pick] - side + 1)).floor()   # uniform over the valid positions
    top = (u[1] * (height[pick] - side + 1)).floor()
    boxes = torch.stack([pick.double(), left, top, side], 1).long().numpy()  # (crops, 4)
    pixels = np.stack([np.asarray(photos[p].crop((x, y, x + s, y + s))
                                  .resize((size, size), Image.BICUBIC))
                       for p, x, y, s in boxes])                              # (N, S, S, 3)
    info = {"name": "photos", "split": split, "size": size, "count": crops, "channels": 3,
            "num_classes": None,
            "preprocessing": f"random square crops, resized to {size}x{size} with {BICUBIC}, "
                             "uint8 mapped to [-1, 1] as x / 127.5 - 1",
            "sources": sources,
            "split_rule": "by photograph: test = " + ", ".join(p[2].rsplit("/", 1)[1]
                                                               for p in PHOTOS_TEST),
            "split_indices_sha256": hashlib.sha256("\n".join(s["file"] for s in sources)
                                                   .encode()).hexdigest(),
            "crops": crops, "scale": list(scale), "seed": seed,
            "crop_rule": "photograph uniform; side = round(uniform(scale) x short side); "
                         "position uniform over the valid ones; drawn in that order from "
                         f"torch.Generator().manual_seed({seed}) (float64)",
            "crop_boxes_sha256": _indices_sha256(boxes.reshape(-1))}
    return ImageSet(_to_unit(pixels), None, None, info)


# ----------------------------------------------------------------------------------------------
# a folder or an .npz of the user's images
# ----------------------------------------------------------------------------------------------

def _holdout(n: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices, ascending: the fixed 10% hold-out of the module docstring."""
    if n < 2:
        raise ValueError(f"{what} holds {n} image; allowed: at least 2 (one is held out for the "
                         "test split)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(HOLDOUT_SEED)).numpy()
    n_test = max(1, round(n * HOLDOUT_FRACTION))
    return np.sort(order[n_test:]), np.sort(order[:n_test])


HOLDOUT_RULE = (f"torch.randperm(N) under torch.Generator().manual_seed({HOLDOUT_SEED}); its "
                f"first max(1, round(N x {HOLDOUT_FRACTION})) indices are the test split; "
                "indices ascending")


def _folder_files(root: Path) -> list[Path]:
    """Image files under `root`, in sorted relative-path order, hidden files and folders
    skipped."""
    files = [p for p in root.rglob("*")
             if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
             and not any(part.startswith(".") for part in p.relative_to(root).parts)]
    if not files:
        raise ValueError(f"folder {str(root)!r} holds no image files; allowed: files ending "
                         f"{', '.join(IMAGE_SUFFIXES)} (in it or in class subfolders)")
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _read(path: Path, size: int) -> tuple[np.ndarray, bytes]:
    """One image file as uint8 (size, size, C), C 1 or 3, and its bytes."""
    data = path.read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.mode.startswith(HIGH_DEPTH_MODES):
                raise ValueError(f"image file {str(path)!r} has PIL mode {image.mode!r} (16-bit "
                                 "or float); allowed: 8-bit images")
            image = image.convert("L" if image.mode in GREY_MODES else "RGB")
            pixels = np.asarray(_square(image, size))
    except (UnidentifiedImageError, OSError) as err:
        raise ValueError(f"image file {str(path)!r} cannot be read as an image: {err}") from err
    return pixels.reshape(size, size, -1), data


def _folder(root: Path, size: int, split: str) -> ImageSet:
    files = _folder_files(root)
    relative = [p.relative_to(root) for p in files]
    classes = (sorted({r.parts[0] for r in relative})
               if all(len(r.parts) > 1 for r in relative) else None)
    arrays, listing, first = [], hashlib.sha256(), {}
    for path, rel in zip(files, relative):
        pixels, data = _read(path, size)
        channels = pixels.shape[-1]
        first.setdefault(channels, rel.as_posix())
        if len(first) > 1:
            raise ValueError(f"folder {str(root)!r} mixes channel counts: {first[1]!r} is grey "
                             f"(1 channel) and {first[3]!r} is colour (3 channels); allowed: "
                             "all grey or all colour")
        listing.update(f"{rel.as_posix()}\t{hashlib.sha256(data).hexdigest()}\n".encode())
        arrays.append(pixels)
    train, test = _holdout(len(files), f"folder {str(root)!r}")
    chosen = train if split == "train" else test
    labels = (torch.tensor([classes.index(relative[i].parts[0]) for i in chosen])
              if classes else None)
    info = {"name": "folder", "split": split, "size": size, "count": len(chosen),
            "channels": arrays[0].shape[-1], "num_classes": len(classes) if classes else None,
            "classes": classes,
            "preprocessing": f"PIL decode ({'grey L' if 1 in first else 'RGB'}), centre square "
                             f"crop (short side), resized to {size}x{size} with {BICUBIC}, "
                             "uint8 mapped to [-1, 1] as x / 127.5 - 1",
            "sources": [{"path": str(root.resolve()), "files": len(files),
                         "listing_sha256": listing.hexdigest(),
                         "listing": "sha256 over 'relative path<TAB>file sha256' lines"}],
            **_split_info(HOLDOUT_RULE, test, chosen, len(files))}
    return ImageSet(_to_unit(np.stack([arrays[i] for i in chosen])), labels,
                    info["num_classes"], info)


def _npz_images(path: Path) -> tuple[np.ndarray, np.ndarray | None, str, str]:
    """(uint8 (N, H, W, C), labels or None, the key, the layout) of an image .npz."""
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in (*NPZ_KEYS, "labels") if k in f.files}
            keys = f.files
    except (OSError, EOFError, ValueError) as err:  # np.load's errors for a damaged file
        raise ValueError(f"{str(path)!r} cannot be read as an .npz: {err}") from err
    key = next((k for k in NPZ_KEYS if k in arrays), None)
    if key is None:
        raise ValueError(f"{str(path)!r} has no image array (keys: {', '.join(keys) or 'none'}); "
                         f"allowed: {' or '.join(map(repr, NPZ_KEYS))}, uint8 (N, H, W, C) or "
                         "(N, C, H, W) with C 1 or 3")
    images, labels = arrays[key], arrays.get("labels")
    what = f"{str(path)!r} {key}"
    if images.dtype != np.uint8:
        raise ValueError(f"{what} has dtype {images.dtype}; allowed: uint8 in [0, 255]")
    if images.ndim == 4 and images.shape[3] in (1, 3):
        layout = "NHWC"
    elif images.ndim == 4 and images.shape[1] in (1, 3):
        layout, images = "NCHW", images.transpose(0, 2, 3, 1)
    else:
        raise ValueError(f"{what} has shape {images.shape}; allowed: (N, H, W, C) or "
                         "(N, C, H, W) with C 1 or 3")
    if labels is not None and (labels.shape != images.shape[:1]
                               or labels.dtype.kind not in "iu" or (labels < 0).any()):
        raise ValueError(f"{str(path)!r} labels: shape {labels.shape} dtype {labels.dtype}; "
                         f"allowed: integers >= 0 of shape ({images.shape[0]},)")
    return images, labels, key, layout


def _npz(path: Path, size: int, split: str) -> ImageSet:
    images, labels, key, layout = _npz_images(path)
    n, height, width, channels = images.shape
    train, test = _holdout(n, f"{str(path)!r} {key}")
    chosen = train if split == "train" else test
    pixels = images[chosen]
    resized = (height, width) != (size, size)
    if resized:
        pixels = np.stack([np.asarray(_square(Image.fromarray(p.squeeze(-1) if channels == 1
                                                              else p), size))
                           for p in pixels]).reshape(len(chosen), size, size, channels)
    num_classes = int(labels.max()) + 1 if labels is not None else None
    info = {"name": "npz", "split": split, "size": size, "count": len(chosen),
            "channels": channels, "num_classes": num_classes,
            "preprocessing": (f"{key} uint8 {layout}"
                              + (f" {height}x{width}, centre square crop (short side), resized "
                                 f"to {size}x{size} with {BICUBIC}" if resized else "")
                              + ", mapped to [-1, 1] as x / 127.5 - 1"),
            "sources": [{"path": str(path.resolve()), "sha256": file_sha256(path)}],
            **_split_info(HOLDOUT_RULE, test, chosen, n)}
    labels = torch.from_numpy(labels[chosen].astype(np.int64)) if labels is not None else None
    return ImageSet(_to_unit(pixels), labels, num_classes, info)


# ----------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------

def load(source: str | os.PathLike, *, size: int, split: str = "train", seed: int = 0,
         crops: int = 2048, scale: tuple[float, float] = (0.25, 1.0)) -> ImageSet:
    """The `split` of an image set at `size` x `size` pixels (module docstring).

    source: a built-in name (DATASETS), a folder of images or an .npz path.
    size: pixels per side of the images returned.
    split: "train" or "test".
    seed, crops, scale: `photos` only: the crop generator's seed, the number of crops of the
        split, and the range of a crop's side as a fraction of its photograph's short side.
    """
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError(f"size {size!r}; allowed: a positive int (pixels per side)")
    if split not in SPLITS:
        raise ValueError(f"split {split!r}; allowed: {', '.join(SPLITS)}")
    if source == "digits":
        return _digits(size, split)
    if source == "photos":
        if not isinstance(crops, int) or isinstance(crops, bool) or crops < 1:
            raise ValueError(f"crops {crops!r}; allowed: a positive int (crops per split)")
        low, high = scale
        if not 0 < low <= high <= 1:
            raise ValueError(f"scale {tuple(scale)}; allowed: (low, high) with "
                             "0 < low <= high <= 1 (fractions of a photograph's short side)")
        return _photos(size, split, seed, crops, (float(low), float(high)))
    path = Path(source).expanduser()
    if path.is_dir():
        return _folder(path, size, split)
    if path.is_file() and path.suffix.lower() == ".npz":
        return _npz(path, size, split)
    raise ValueError(f"image set {str(source)!r} is neither a built-in set nor an existing "
                     f"folder or .npz file; allowed: {', '.join(DATASETS)}, a folder of images "
                     "or an .npz path")
