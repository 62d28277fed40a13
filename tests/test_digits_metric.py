"""analysis.metrics.digits: the digits classifier (accuracy, determinism, cache) and
fd_digits_classifier against torchmetrics used directly and against numpy/scipy."""

import json

import numpy as np
import pytest
import scipy.linalg
import torch
from safetensors import safe_open

from analysis.hashing import tensors_sha256
from analysis.metrics import digits
from analysis.sample_writer import to_uint8, write_png
from analysis.training.datasets import load
from bench.rows import check_row


@pytest.fixture(scope="module")
def made():
    """The 32-px classifier, trained once for this file (about 5 s)."""
    return digits.make_classifier(32)


@pytest.fixture(scope="module")
def split():
    return {s: load("digits", size=32, split=s) for s in ("train", "test")}


def frechet(a: np.ndarray, b: np.ndarray) -> float:
    """Reference Fréchet distance between two feature sets (N, D), with scipy's sqrtm."""
    mu_a, mu_b = a.mean(0), b.mean(0)
    sigma_a, sigma_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(sigma_a @ sigma_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a + sigma_b - 2 * root))


def features(model, images) -> np.ndarray:
    with torch.no_grad():
        return model.features(images).double().numpy()


# ----------------------------------------------------------------------------------------------
# The classifier
# ----------------------------------------------------------------------------------------------

def test_classifier_accuracy_and_info(made, split):
    model, info = made
    test = split["test"]
    with torch.no_grad():
        predicted = model(test.images).argmax(1).numpy()
    assert info["test_accuracy"] >= 0.97
    assert info["test_accuracy"] == (predicted == test.labels.numpy()).mean()
    assert (info["epochs"], info["seed"], info["size"]) == (digits.EPOCHS, 0, 32)
    assert (info["train_count"], info["test_count"]) == (1437, 360)
    assert info["weights_sha256"] == tensors_sha256(model)
    assert not model.training
    x = test.images[:5]
    assert model.features(x).shape == (5, digits.FEATURE_DIM) and model(x).shape == (5, 10)


def test_make_is_deterministic_and_leaves_global_state():
    torch.manual_seed(123)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    a, info_a = digits.make_classifier(16, epochs=1)
    assert torch.equal(torch.get_rng_state(), state) and torch.get_num_threads() == threads
    b, info_b = digits.make_classifier(16, epochs=1)
    c, _ = digits.make_classifier(16, seed=1, epochs=1)
    for name, tensor in a.state_dict().items():
        assert torch.equal(tensor, b.state_dict()[name]), name
    assert info_a == info_b
    assert not all(torch.equal(t, c.state_dict()[n]) for n, t in a.state_dict().items())


def test_cache_round_trip(made, tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(digits, "make_classifier",
                        lambda size, seed=0: calls.append(size) or made)
    model = digits.classifier(32, cache_dir=tmp_path)
    assert tensors_sha256(model) == made[1]["weights_sha256"] and not model.training
    path = tmp_path / "digits_classifier_32px.safetensors"
    assert calls == [32] and path.is_file() and list(tmp_path.iterdir()) == [path]
    with safe_open(path, "pt") as f:
        assert json.loads(f.metadata()["info"]) == made[1]
    again = digits.classifier(32, cache_dir=tmp_path, make=False)
    assert calls == [32] and not again.training
    for name, tensor in made[0].state_dict().items():
        assert torch.equal(again.state_dict()[name], tensor)
    monkeypatch.setenv("PTDIT_CACHE", str(tmp_path))
    assert tensors_sha256(digits.classifier(32, make=False)) == made[1]["weights_sha256"]
    assert digits.main_make(32, tmp_path / "other")["path"] == str(
        tmp_path / "other" / "digits_classifier_32px.safetensors")


def test_unwritable_cache_warns_and_still_gives_the_classifier(made, tmp_path, monkeypatch):
    monkeypatch.setattr(digits, "make_classifier", lambda size, seed=0: made)
    (tmp_path / "a_file").write_text("")
    with pytest.warns(UserWarning, match=r"could not cache the digits classifier"):
        model = digits.classifier(32, cache_dir=tmp_path / "a_file" / "cache")
    assert model is made[0]


def test_missing_cache_without_make_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"digits_classifier_24px\.safetensors.*"
                                                r"`ptdit digits-classifier --size 24`"):
        digits.classifier(24, cache_dir=tmp_path, make=False)


def test_cache_refuses_a_damaged_or_foreign_file(made, tmp_path):
    path = digits.cache_file(32, tmp_path)
    path.write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match=r"cannot be read .*ptdit digits-classifier --size 32"):
        digits.classifier(32, cache_dir=tmp_path)
    digits._write(path, made[0], {**made[1], "size": 16})
    with pytest.raises(ValueError, match=r"at size 16; this code reads .* at size 32"):
        digits.classifier(32, cache_dir=tmp_path)


# ----------------------------------------------------------------------------------------------
# The Fréchet distance
# ----------------------------------------------------------------------------------------------

def test_fd_equals_torchmetrics_and_scipy(made, split, one_thread):
    from torchmetrics.image.fid import FrechetInceptionDistance
    model = made[0]
    samples = split["test"].images.flip(3)   # mirrored digits: a wrong distribution
    row = digits.fd_digits(samples, classifier=model)
    direct = FrechetInceptionDistance(feature=digits.DigitsFeatures(model), normalize=True)
    direct.update(split["train"].images, real=True)
    direct.update(samples, real=False)
    assert row["fd"] == pytest.approx(float(direct.compute()), rel=1e-9)
    reference = frechet(features(model, samples), features(model, split["train"].images))
    assert row["fd"] == pytest.approx(reference, rel=1e-6)
    check_row(row)
    assert row["metric"] == "fd_digits_classifier" and "fid" not in row
    assert (row["n_samples"], row["n_reference"], row["n_floor"]) == (360, 1437, 360)
    assert row["reference"] == "digits train" and row["sample_accuracy"] is None
    assert (row["classifier_sha256"], row["size"]) == (made[1]["weights_sha256"], 32)


def test_floor_is_positive_and_below_noise(made, split, one_thread):
    model = made[0]
    noise = torch.rand(360, 3, 32, 32) * 2 - 1
    row = digits.fd_digits(noise, classifier=model)
    floor = frechet(features(model, split["test"].images), features(model, split["train"].images))
    assert row["fd_floor"] == pytest.approx(floor, rel=1e-6)
    assert 0 < row["fd_floor"] < row["fd"]
    half = split["train"].images[split["train"].labels < 5]   # half the classes: far off
    assert digits.fd_digits(half, classifier=model)["fd"] > 5 * row["fd_floor"]


def test_sample_accuracy_of_the_test_split_is_the_test_accuracy(made, split, one_thread):
    test = split["test"]
    row = digits.fd_digits(test.images, labels=test.labels, classifier=made[0], reference="test")
    assert row["sample_accuracy"] == row["classifier_test_accuracy"] == made[1]["test_accuracy"]
    assert abs(row["fd_raw"]) < 1e-6 and row["fd"] >= 0 and row["reference"] == "digits test"
    assert row["fd_floor"] == pytest.approx(frechet(features(made[0], test.images),
                                                    features(made[0], split["train"].images)),
                                            rel=1e-6)


def test_png_folder_matches_its_pixels_as_a_tensor(made, split, tmp_path, one_thread):
    """A folder as `ptdit sample` writes it (RGB PNGs) scores as its quantised pixels do."""
    images = split["test"].images[:100].repeat(1, 3, 1, 1)
    pixels = to_uint8(images)                                    # (N, H, W, 3) uint8
    for i, p in enumerate(pixels):
        write_png(tmp_path / f"{i:06d}.png", p)
    quantised = torch.from_numpy(pixels).permute(0, 3, 1, 2).float() / 127.5 - 1
    from_folder = digits.fd_digits(tmp_path, classifier=made[0])
    from_tensor = digits.fd_digits(quantised, classifier=made[0])
    assert from_folder["fd"] == pytest.approx(from_tensor["fd"], rel=1e-9)
    assert from_folder["samples_path"] == str(tmp_path) and from_folder["n_samples"] == 100


def test_samples_of_another_size_are_resized(made, split, one_thread):
    big = load("digits", size=64, split="test").images
    row = digits.fd_digits(big, classifier=made[0])
    resized = torch.nn.functional.interpolate(big, size=(32, 32), mode="bilinear",
                                              align_corners=False, antialias=True)
    reference = frechet(features(made[0], resized), features(made[0], split["train"].images))
    assert row["fd"] == pytest.approx(reference, rel=1e-6)
    assert (row["image_height_px"], row["resolution"]) == (64, 64)


@pytest.mark.parametrize("samples, kwargs, match", [
    (torch.zeros(4, 1, 32, 32), dict(reference="val"), r"reference 'val'; allowed: train, test"),
    (torch.zeros(4, 1, 32, 32), dict(size=8), r"size 8; allowed: an int >= 16"),
    (torch.full((4, 1, 32, 32), 2.0), {}, r"span \[2, 2\]; allowed: \[-1, 1\]"),
    (torch.zeros(4, 2, 32, 32), {}, r"\(4, 2, 32, 32\) .*allowed: float \(N, C, H, W\)"),
    (torch.zeros(4, 1, 32, 16), {}, r"32x16 \(HxW\); allowed: square"),
    (torch.zeros(1, 1, 32, 32), {}, r"1 image; allowed: at least 2"),
    (torch.zeros(4, 1, 32, 32), dict(labels=torch.tensor([0, 1, 2])),
     r"labels: \(3,\) .*allowed: integer class ids in \[0, 10\) of shape \(4,\)"),
    (torch.zeros(4, 1, 32, 32), dict(labels=torch.tensor([0, 1, 2, 10])), r"labels: \(4,\)"),
    (torch.zeros(4, 1, 32, 32), dict(batch_size=0), r"batch_size 0; allowed: a positive int"),
])
def test_fd_refusals(made, samples, kwargs, match):
    with pytest.raises(ValueError, match=match):
        digits.fd_digits(samples, classifier=made[0], **kwargs)


def test_fd_refuses_a_classifier_off_the_cpu():
    on_meta = digits.DigitsClassifier().to("meta")
    with pytest.raises(ValueError, match=r"classifier on meta; allowed: a CPU module"):
        digits.fd_digits(torch.zeros(4, 1, 32, 32), classifier=on_meta)
