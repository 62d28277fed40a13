"""analysis.training.datasets: the built-in digits and photos sets, folders and .npz files:
shapes, ranges,
fixed splits, the recorded info, and every refusal."""

import hashlib
import json

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.training import datasets
from analysis.training.datasets import DATASETS, ImageSet, load

# sha256 of the digits test indices (int64 little-endian, ascending) that scikit-learn's
# train_test_split(test_size=0.2, stratify=y, random_state=0) gives: a changed split fails here
DIGITS_TEST_SHA256 = "2fbaae31b8c6aad12464a07771b64269876d904bfed86f77a63c8265fa201621"


def sha(indices) -> str:
    return hashlib.sha256(np.asarray(indices, dtype="<i8").tobytes()).hexdigest()


def bilinear_2x(image: np.ndarray) -> np.ndarray:
    """Reference: (h, w) upsampled 2x, bilinear with half-pixel centres and edges clamped
    (torch's align_corners=False)."""
    def axis(n):
        src = np.clip((np.arange(2 * n) + 0.5) / 2 - 0.5, 0, n - 1)
        low = np.floor(src).astype(int)
        high = np.minimum(low + 1, n - 1)
        return low, high, src - low
    (r0, r1, fr), (c0, c1, fc) = axis(image.shape[0]), axis(image.shape[1])
    rows = image[r0] * (1 - fr)[:, None] + image[r1] * fr[:, None]
    return rows[:, c0] * (1 - fc) + rows[:, c1] * fc


# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sklearn_digits():
    from sklearn.datasets import load_digits
    return load_digits()


def test_digits_shapes_range_and_labels(sklearn_digits):
    train, test = load("digits", size=16), load("digits", size=16, split="test")
    assert isinstance(train, ImageSet) and train.num_classes == test.num_classes == 10
    assert train.images.shape == (1437, 1, 16, 16) and test.images.shape == (360, 1, 16, 16)
    assert train.images.dtype == torch.float32 and train.labels.dtype == torch.int64
    assert train.labels.shape == (1437,) and test.labels.shape == (360,)
    for s in (train, test):
        assert s.images.min() == -1 and s.images.max() == 1
    # the split is stratified: each class's test share is 20% of it, to the nearest image
    totals = np.bincount(sklearn_digits.target)
    assert np.abs(test.labels.bincount(minlength=10).numpy() - 0.2 * totals).max() <= 1
    assert (train.labels.bincount(minlength=10) + test.labels.bincount(minlength=10)).tolist() \
        == totals.tolist()


def test_digits_pixels_against_sklearn(sklearn_digits):
    """The split's images are load_digits' images at the recorded indices: at size 8 exactly
    x / 8 - 1, at 16 the 2x bilinear upsampling of them."""
    from sklearn.model_selection import train_test_split
    _, test_idx = train_test_split(np.arange(1797), test_size=0.2,
                                   stratify=sklearn_digits.target, random_state=0)
    test_idx = np.sort(test_idx)
    at8, at16 = load("digits", size=8, split="test"), load("digits", size=16, split="test")
    raw = sklearn_digits.images[test_idx]
    np.testing.assert_array_equal(at8.images[:, 0].numpy(), (raw / 8 - 1).astype(np.float32))
    assert at8.labels.tolist() == sklearn_digits.target[test_idx].tolist()
    expected = np.stack([bilinear_2x(image / 16) * 2 - 1 for image in raw])
    np.testing.assert_allclose(at16.images[:, 0].numpy(), expected, atol=1e-6)
    assert at8.info["test_indices_sha256"] == sha(test_idx) == DIGITS_TEST_SHA256


def test_digits_split_fixed_across_seeds_and_calls():
    first = load("digits", size=8, split="test", seed=0)
    again, other_seed = load("digits", size=8, split="test"), load("digits", size=8,
                                                                      split="test", seed=7)
    for s in (again, other_seed):
        assert torch.equal(s.images, first.images) and torch.equal(s.labels, first.labels)
        assert s.info == first.info
    train = load("digits", size=8, seed=3)
    assert train.info["test_indices_sha256"] == first.info["test_indices_sha256"]
    assert train.info["split_indices_sha256"] != first.info["split_indices_sha256"]
    assert (train.info["train_count"], train.info["test_count"]) == (1437, 360)
    assert "random_state=0" in train.info["split_rule"] and "stratify" in train.info["split_rule"]
    assert json.loads(json.dumps(train.info)) == train.info
    assert train.info["sources"][0]["file"] == "sklearn/datasets/data/digits.csv.gz"
    assert len(train.info["sources"][0]["sha256"]) == 64
    assert "bilinear" in train.info["preprocessing"] and "antialias off" in \
        train.info["preprocessing"]


# ----------------------------------------------------------------------------------------------
# photos
# ----------------------------------------------------------------------------------------------

def test_photos_shapes_and_seeds():
    a = load("photos", size=12, crops=20, seed=1)
    assert a.images.shape == (20, 3, 12, 12) and a.images.dtype == torch.float32
    assert a.labels is None and a.num_classes is None
    assert -1 <= a.images.min() < a.images.max() <= 1
    same, other = load("photos", size=12, crops=20, seed=1), load("photos", size=12, crops=20,
                                                                     seed=2)
    assert torch.equal(same.images, a.images) and same.info == a.info
    assert not torch.equal(other.images, a.images)
    assert other.info["crop_boxes_sha256"] != a.info["crop_boxes_sha256"]
    assert (a.info["seed"], a.info["crops"], a.info["scale"]) == (1, 20, [0.25, 1.0])
    assert "BICUBIC" in a.info["preprocessing"] and json.loads(json.dumps(a.info)) == a.info


def test_photos_test_photographs_never_in_train():
    train, test = load("photos", size=8, crops=4), load("photos", size=8, crops=4, split="test")
    train_files = {s["file"] for s in train.info["sources"]}
    test_files = {s["file"] for s in test.info["sources"]}
    assert len(train_files) == 9 and len(test_files) == 3 and not train_files & test_files
    assert all(len(s["sha256"]) == 64 for s in train.info["sources"] + test.info["sources"])
    # both views of the stereo pair lie on one side
    assert {"skimage/data/motorcycle_left.png", "skimage/data/motorcycle_right.png"} <= train_files


def test_photos_crops_are_whole_short_side_squares_of_test_photographs():
    """With scale (1, 1) every crop is a short-side square at one of the valid positions of one
    photograph: each test crop equals one such PIL crop of a test photograph, computed here."""
    size = 10
    candidates = []
    for path in (datasets._package_file(*photo, "photos")[0] for photo in datasets.PHOTOS_TEST):
        with Image.open(path) as image:
            image = image.convert("RGB")
        side = min(image.size)
        for x in range(image.width - side + 1):
            for y in range(image.height - side + 1):
                crop = image.crop((x, y, x + side, y + side)).resize((size, size), Image.BICUBIC)
                candidates.append(np.asarray(crop))
    candidates = torch.from_numpy(np.stack(candidates)).permute(0, 3, 1, 2).float() / 127.5 - 1
    test = load("photos", size=size, crops=12, split="test", scale=(1.0, 1.0), seed=5)
    for crop in test.images:
        assert (candidates == crop).flatten(1).all(1).any()


def test_photos_missing_bundled_file(monkeypatch):
    missing = ("scikit-image", "skimage", "data/no_such_photo.png")
    monkeypatch.setattr(datasets, "PHOTOS_TEST", datasets.PHOTOS_TEST + (missing,))
    with pytest.raises(FileNotFoundError, match=r"skimage/data/no_such_photo\.png.*scikit-image"):
        load("photos", size=8, crops=2, split="test")


@pytest.mark.parametrize("kwargs, match", [
    (dict(crops=0), r"crops 0; allowed: a positive int"),
    (dict(crops=2.5), r"crops 2\.5; allowed"),
    (dict(scale=(0.0, 1.0)), r"scale \(0\.0, 1\.0\); allowed: .*0 < low <= high <= 1"),
    (dict(scale=(0.8, 0.5)), r"scale \(0\.8, 0\.5\)"),
    (dict(scale=(0.5, 1.5)), r"scale \(0\.5, 1\.5\)"),
])
def test_photos_bad_crop_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        load("photos", size=8, **kwargs)


# ----------------------------------------------------------------------------------------------
# folders and .npz files
# ----------------------------------------------------------------------------------------------

def write_png(path, pixels: np.ndarray):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)


def as_unit(pixels: np.ndarray) -> torch.Tensor:
    """uint8 (N, H, W, C) -> (N, C, H, W) in [-1, 1], the reference for exact round trips."""
    return torch.from_numpy(pixels.astype(np.float32) / 127.5 - 1).permute(0, 3, 1, 2)


def test_folder_round_trip_and_holdout(tmp_path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (12, 6, 6, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        write_png(tmp_path / f"img{i:02d}.png", p)
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden").mkdir()
    write_png(tmp_path / ".hidden" / "skip.png", pixels[0])
    train, test = load(tmp_path, size=6), load(str(tmp_path), size=6, split="test")
    order = torch.randperm(12, generator=torch.Generator().manual_seed(0)).numpy()
    test_idx, train_idx = np.sort(order[:1]), np.sort(order[1:])   # round(12 / 10) = 1 held out
    assert torch.equal(train.images, as_unit(pixels[train_idx]))
    assert torch.equal(test.images, as_unit(pixels[test_idx]))
    assert train.labels is None and train.num_classes is None
    assert train.info["test_indices_sha256"] == test.info["test_indices_sha256"] == sha(test_idx)
    assert (train.info["count"], test.info["count"], train.info["channels"]) == (11, 1, 3)
    assert train.info["sources"][0]["files"] == 12 and "seed(0)" in train.info["split_rule"]
    assert json.loads(json.dumps(train.info)) == train.info


def test_folder_resizes_centre_square_bicubic(tmp_path):
    rng = np.random.default_rng(1)
    wide, tall = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((10, 16), (14, 10)))
    write_png(tmp_path / "a.png", wide)
    write_png(tmp_path / "b.png", tall)
    expected = [Image.fromarray(wide).crop((3, 0, 13, 10)),      # the centred squares
                Image.fromarray(tall).crop((0, 2, 10, 12))]
    expected = np.stack([np.asarray(e.resize((5, 5), Image.BICUBIC)) for e in expected])
    held = torch.randperm(2, generator=torch.Generator().manual_seed(0)).tolist()
    for split, index in (("test", held[0]), ("train", held[1])):
        got = load(tmp_path, size=5, split=split)
        assert got.images.shape == (1, 1, 5, 5)   # grey files give one channel
        assert torch.equal(got.images, as_unit(expected[[index], ..., None]))


def test_folder_subfolders_are_classes(tmp_path):
    rng = np.random.default_rng(2)
    pixels = rng.integers(0, 256, (20, 4, 4, 3), dtype=np.uint8)
    names = ["zebra", "ant", "moth"]
    truth = {}
    for i, p in enumerate(pixels):
        write_png(tmp_path / names[i % 3] / f"{i:02d}.png", p)
        truth[p.tobytes()] = sorted(names).index(names[i % 3])
    for split in ("train", "test"):
        s = load(tmp_path, size=4, split=split)
        assert s.num_classes == 3 and s.info["classes"] == ["ant", "moth", "zebra"]
        got = ((s.images + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
        assert [truth[g.tobytes()] for g in got] == s.labels.tolist()
    write_png(tmp_path / "loose.png", pixels[0])   # one image at the root: unconditional
    loose = load(tmp_path, size=4)
    assert loose.labels is None and loose.num_classes is None and loose.info["count"] == 19


def test_npz_round_trip_layouts_labels_and_resize(tmp_path):
    rng = np.random.default_rng(3)
    nhwc = rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8)
    labels = rng.integers(0, 4, 10)
    np.savez(tmp_path / "a.npz", arr_0=nhwc)
    np.savez(tmp_path / "b.npz", images=nhwc.transpose(0, 3, 1, 2), labels=labels)
    a, b = load(tmp_path / "a.npz", size=4), load(tmp_path / "b.npz", size=4)
    train_idx = np.sort(torch.randperm(10, generator=torch.Generator().manual_seed(0))
                        .numpy()[1:])
    assert torch.equal(a.images, as_unit(nhwc[train_idx])) and torch.equal(b.images, a.images)
    assert a.labels is None and b.labels.tolist() == labels[train_idx].tolist()
    assert b.num_classes == labels.max() + 1 and b.labels.dtype == torch.int64
    assert a.info["preprocessing"].startswith("arr_0 uint8 NHWC")
    assert b.info["preprocessing"].startswith("images uint8 NCHW")
    assert len(a.info["sources"][0]["sha256"]) == 64
    assert json.loads(json.dumps(b.info)) == b.info
    grey = rng.integers(0, 256, (10, 6, 8, 1), dtype=np.uint8)
    np.savez(tmp_path / "grey.npz", images=grey)
    small = load(tmp_path / "grey.npz", size=3, split="test")
    held = np.sort(torch.randperm(10, generator=torch.Generator().manual_seed(0)).numpy()[:1])
    expected = Image.fromarray(grey[held[0], :, :, 0]).crop((1, 0, 7, 6)).resize((3, 3),
                                                                                Image.BICUBIC)
    assert torch.equal(small.images, as_unit(np.asarray(expected)[None, ..., None]))


# ----------------------------------------------------------------------------------------------
# refusals
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, -3, 2.5, True, "32"])
def test_bad_size(size):
    with pytest.raises(ValueError, match=r"size .*; allowed: a positive int"):
        load("digits", size=size)


def test_bad_split():
    with pytest.raises(ValueError, match=r"split 'val'; allowed: train, test"):
        load("digits", size=8, split="val")


def test_unknown_name(tmp_path):
    with pytest.raises(ValueError, match=r"'mnist' .*allowed: digits, photos, a folder of "
                                         r"images or an \.npz path"):
        load("mnist", size=8)
    assert DATASETS == ("digits", "photos")
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"x\.png' is neither"):   # a file, but not an .npz
        load(tmp_path / "x.png", size=8)


def test_folder_refusals(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=r"empty' holds no image files; allowed: .*\.png"):
        load(empty, size=8)
    mixed = tmp_path / "mixed"
    write_png(mixed / "a.png", np.zeros((4, 4, 3), np.uint8))
    write_png(mixed / "b.png", np.zeros((4, 4, 3), np.uint8))
    write_png(mixed / "c.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match=r"mixes channel counts: 'c\.png' is grey .* 'a\.png' "
                                         r"is colour"):
        load(mixed, size=4)
    broken = tmp_path / "broken"
    write_png(broken / "a.png", np.zeros((4, 4, 3), np.uint8))
    (broken / "b.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ValueError, match=r"b\.jpg' cannot be read as an image"):
        load(broken, size=4)
    deep = tmp_path / "deep"
    deep.mkdir()
    Image.fromarray(np.zeros((4, 4), np.uint16)).save(deep / "a.png")
    with pytest.raises(ValueError, match=r"a\.png' has PIL mode 'I;16'"):
        load(deep, size=4)
    single = tmp_path / "single"
    write_png(single / "a.png", np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"holds 1 image; allowed: at least 2"):
        load(single, size=4)


def test_npz_refusals(tmp_path):
    np.savez(tmp_path / "keys.npz", pictures=np.zeros((2, 4, 4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"no image array \(keys: pictures\); allowed: 'images' "
                                         r"or 'arr_0'"):
        load(tmp_path / "keys.npz", size=4)
    np.savez(tmp_path / "float.npz", images=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(ValueError, match=r"dtype float32; allowed: uint8"):
        load(tmp_path / "float.npz", size=4)
    np.savez(tmp_path / "shape.npz", images=np.zeros((2, 4, 4, 2), np.uint8))
    with pytest.raises(ValueError, match=r"shape \(2, 4, 4, 2\); allowed: \(N, H, W, C\)"):
        load(tmp_path / "shape.npz", size=4)
    np.savez(tmp_path / "labels.npz", images=np.zeros((3, 4, 4, 3), np.uint8),
             labels=np.array([0, 1]))
    with pytest.raises(ValueError, match=r"labels: shape \(2,\) .*allowed: integers >= 0 of "
                                         r"shape \(3,\)"):
        load(tmp_path / "labels.npz", size=4)
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"bad\.npz' cannot be read as an \.npz"):
        load(tmp_path / "bad.npz", size=4)
