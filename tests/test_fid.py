"""analysis.metrics.fid: the Fréchet distance of known Gaussians through torchmetrics, exactly
the sample-statistics closed form; independent of batch size and of the number of processes;
the reference cached and ADM statistics used as they are; what the network is fed (TF1 bilinear
or antialiased resize); torch-fidelity's Inception loaded from a local file end to end; missing
weights and bad input refused at once, with no network call."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy import linalg
from torch import nn

from analysis.metrics import fid as fid_module
from analysis.metrics.fid import cache_path, fid, fid_metric, reference_stats

from conftest import modules_at_failure

DIM, SIDE = 4, 4  # features stored in the first 8 * DIM bytes of 3 x SIDE x SIDE images


class Decode(nn.Module):
    """A feature extractor that reads back the float64 vector stored in each image's first
    bytes, so the features of `encode(z)` are exactly z."""

    def __init__(self, dim: int = DIM):
        super().__init__()
        self.num_features = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:  # (N, 3, S, S) -> (N, D) float64
        flat = images.reshape(len(images), -1)[:, :8 * self.num_features]
        return flat.contiguous().view(torch.float64)


class DecodeAgain(Decode):
    """The same features under another name: a different feature extractor to the cache."""


class Pixels(nn.Module):
    """Features: the mean of each channel, float64."""
    num_features = 3

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        assert images.dtype == torch.uint8  # what the metric is fed
        return images.double().mean((2, 3))


def encode(z: torch.Tensor, side: int = SIDE) -> torch.Tensor:
    """uint8 images (N, 3, side, side) holding z (N, D) float64 in their first bytes, random
    pixels after."""
    data = z.contiguous().view(torch.uint8).reshape(len(z), -1)
    images = torch.randint(0, 256, (len(z), 3 * side * side), dtype=torch.uint8)
    images[:, :data.shape[1]] = data
    return images.reshape(len(z), 3, side, side)


def gaussian(n: int, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """n draws (n, D) float64 of N(mu, sigma)."""
    return mu + torch.randn(n, len(mu), dtype=torch.float64) @ torch.linalg.cholesky(sigma).T


def with_moments(n: int, mu: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """n points (n, D) float64 whose sample mean is exactly mu and whose (n - 1)-normalised
    sample covariance is exactly sigma: random points, centred and whitened, then coloured."""
    z = torch.randn(n, len(mu), dtype=torch.float64)
    z = z - z.mean(0)
    white = torch.linalg.solve_triangular(torch.linalg.cholesky(z.T @ z / (n - 1)), z.T,
                                          upper=False).T
    return mu + white @ torch.linalg.cholesky(sigma).T


def random_gaussian(dim: int = DIM) -> tuple[torch.Tensor, torch.Tensor]:
    a = torch.randn(dim, dim, dtype=torch.float64)
    return torch.randn(dim, dtype=torch.float64), a @ a.T / dim + 0.5 * torch.eye(dim)


def frechet(mu1, sigma1, mu2, sigma2) -> float:
    """The closed form, float64, with scipy's matrix square root."""
    mu1, sigma1, mu2, sigma2 = (np.asarray(x, dtype=np.float64)
                                for x in (mu1, sigma1, mu2, sigma2))
    root = linalg.sqrtm(sigma1 @ sigma2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1 + sigma2 - 2 * root))


def sample_frechet(z1: torch.Tensor, z2: torch.Tensor) -> float:
    """The closed form on the sample means and (n - 1)-normalised covariances."""
    z1, z2 = z1.numpy(), z2.numpy()
    return frechet(z1.mean(0), np.cov(z1, rowvar=False), z2.mean(0), np.cov(z2, rowvar=False))


def write_pngs(folder, images: torch.Tensor) -> None:
    folder.mkdir()
    for i, image in enumerate(images):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")


@pytest.fixture
def two_sets():
    """(samples z2, reference z1): draws of two random Gaussians, as features."""
    (mu1, s1), (mu2, s2) = random_gaussian(), random_gaussian()
    return gaussian(257, mu2, s2), gaussian(301, mu1, s1)


# ----------------------------------------------------------------------------------------------
# The distance
# ----------------------------------------------------------------------------------------------

def test_fid_is_the_closed_form_of_known_gaussians():
    """Features whose sample mean and covariance are exactly those of two known Gaussians: the
    FID is the Fréchet distance of the Gaussians themselves, in closed form."""
    (mu1, s1), (mu2, s2) = random_gaussian(), random_gaussian()
    z1, z2 = with_moments(301, mu1, s1), with_moments(257, mu2, s2)
    row = fid(encode(z2), encode(z1), extractor=Decode(), batch_size=64)
    assert row["fid"] == pytest.approx(frechet(mu1, s1, mu2, s2), rel=1e-9)
    assert row["n_samples"] == 257 and row["n_reference"] == 301


def test_fid_does_not_depend_on_batch_size(two_sets):
    samples, reference = encode(two_sets[0]), encode(two_sets[1])
    values = [fid(samples, reference, extractor=Decode(), batch_size=b)["fid"]
              for b in (3, 7, 1000)]
    assert values == pytest.approx([values[0]] * 3, rel=1e-9)
    assert values[0] == pytest.approx(sample_frechet(two_sets[1], two_sets[0]), rel=1e-9)


def test_float_samples_are_rounded_to_uint8_first():
    images = torch.rand(12, 3, 8, 8, dtype=torch.float64)
    reference = torch.randint(0, 256, (9, 3, 8, 8), dtype=torch.uint8)
    row = fid(images, reference, extractor=Pixels(), batch_size=5)
    same = fid((images * 255).round().to(torch.uint8), reference, extractor=Pixels())
    assert row["fid"] == pytest.approx(same["fid"], rel=1e-12)
    assert row["quantisation"] == "float [0, 1] input quantised to uint8 as round(255 * x)"
    assert same["quantisation"] == "uint8 input"


def test_row_records_the_settings_and_designs_fields(two_sets):
    row = fid(encode(two_sets[0]), encode(two_sets[1]), extractor=Decode())
    for field in ("schema_version", "git_sha", "time_utc", "host", "device", "torch", "dtype",
                  "backend", "model", "resolution", "latent_frames", "tokens", "batch",
                  "status"):
        assert field in row
    assert row["status"] == "ok" and row["metric"] == "fid" and row["resolution"] == SIDE
    assert row["statistics_dtype"] == "float64" and row["feature_dim"] == DIM
    assert row["feature_extractor"] == "custom test_fid.Decode"
    assert row["reference"] == "computed from images" and row["world_size"] == 1
    json.dumps(row, allow_nan=False)  # a results-store row


# ----------------------------------------------------------------------------------------------
# Reference statistics: files, cache, ADM
# ----------------------------------------------------------------------------------------------

def test_folder_and_npz_sets_give_the_tensor_value_and_the_cache_is_reused(tmp_path, two_sets):
    samples, reference = encode(two_sets[0]), encode(two_sets[1])
    write_pngs(tmp_path / "ref", reference)
    np.savez(tmp_path / "samples.npz", samples.permute(0, 2, 3, 1).numpy())
    expected = sample_frechet(two_sets[1], two_sets[0])

    first = fid(tmp_path / "samples.npz", tmp_path / "ref", extractor=Decode(), batch_size=16)
    assert first["fid"] == pytest.approx(expected, rel=1e-9)
    assert first["reference"] == "computed from images"
    assert first["reference_cache"] == str(tmp_path / "ref.fid-stats.npz")
    again = fid(tmp_path / "samples.npz", tmp_path / "ref", extractor=Decode())
    assert again["reference"] == "cached statistics"
    assert again["fid"] == pytest.approx(first["fid"], rel=1e-12)

    extra = encode(two_sets[1][:1])[0].permute(1, 2, 0).numpy()
    Image.fromarray(extra).save(tmp_path / "ref" / "99999.png")  # the set changed: recompute
    grown = fid(tmp_path / "samples.npz", tmp_path / "ref", extractor=Decode())
    assert grown["reference"] == "computed from images" and grown["n_reference"] == 302
    assert fid(tmp_path / "samples.npz", tmp_path / "ref",
               extractor=Decode())["reference"] == "cached statistics"
    other = fid(tmp_path / "samples.npz", tmp_path / "ref", extractor=DecodeAgain())
    assert other["reference"] == "computed from images"  # another extractor: not that cache


def test_cache_dir_and_reference_stats(tmp_path, two_sets):
    reference = encode(two_sets[1])
    write_pngs(tmp_path / "ref", reference)
    stats = reference_stats(tmp_path / "ref", extractor=Decode(), cache_dir=tmp_path / "cache")
    cache = cache_path(tmp_path / "ref", tmp_path / "cache")
    assert stats["reference_cache"] == str(cache) and cache.parent == tmp_path / "cache"
    z = two_sets[1].numpy()
    np.testing.assert_allclose(stats["mu"], z.mean(0), rtol=1e-12)
    np.testing.assert_allclose(stats["sigma"], np.cov(z, rowvar=False), rtol=1e-10, atol=1e-13)
    assert stats["n"] == 301 and stats["mu"].dtype == np.float64

    # the cache file itself is a reference, for these settings only
    row = fid(encode(two_sets[0]), cache, extractor=Decode())
    assert row["reference"] == "precomputed statistics (ptdit)"
    assert row["fid"] == pytest.approx(sample_frechet(two_sets[1], two_sets[0]), rel=1e-9)
    with pytest.raises(ValueError, match="statistics computed with .*DecodeAgain"):
        fid(encode(two_sets[0]), cache, extractor=DecodeAgain())


def test_adm_reference_statistics_are_used_as_they_are(tmp_path, two_sets):
    mu, sigma = random_gaussian()
    path = tmp_path / "VIRTUAL_ref.npz"
    np.savez(path, encode(two_sets[1]).permute(0, 2, 3, 1).numpy(), mu=mu.numpy(),
             sigma=sigma.numpy())
    with pytest.warns(UserWarning, match="ADM computed them with TensorFlow"):
        row = fid(encode(two_sets[0]), path, extractor=Decode())
    z = two_sets[0].numpy()
    assert row["fid"] == pytest.approx(frechet(mu, sigma, z.mean(0), np.cov(z, rowvar=False)),
                                       rel=1e-9)
    assert row["reference"] == "ADM precomputed statistics" and row["n_reference"] is None
    np.savez(path, mu=mu[:3].numpy(), sigma=sigma[:3, :3].numpy())
    with pytest.raises(ValueError, match=r"needs \(4,\) and \(4, 4\)"):
        fid(encode(two_sets[0]), path, extractor=Decode())


# ----------------------------------------------------------------------------------------------
# Processes
# ----------------------------------------------------------------------------------------------

def _fid_worker(rank, world_size, init, samples, reference, cache_dir, out):
    torch.distributed.init_process_group("gloo", init_method=init, rank=rank,
                                         world_size=world_size)
    try:
        row = fid(samples, reference, extractor=Decode(), batch_size=5, cache_dir=cache_dir)
        (out / f"rank{rank}.json").write_text(json.dumps(row))
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.slow  # two fresh interpreters import torch and torchmetrics: 20-50 s on 2 cores
def test_fid_does_not_depend_on_the_number_of_processes(tmp_path, two_sets):
    samples, reference = encode(two_sets[0]), encode(two_sets[1])  # 257 and 301: odd shards
    np.savez(tmp_path / "samples.npz", samples.permute(0, 2, 3, 1).numpy())
    write_pngs(tmp_path / "ref", reference)
    one = fid(tmp_path / "samples.npz", tmp_path / "ref", extractor=Decode(),
              cache_dir=tmp_path / "cache1")

    torch.multiprocessing.spawn(_fid_worker, nprocs=2, args=(
        2, f"file://{tmp_path}/rendezvous", tmp_path / "samples.npz", tmp_path / "ref",
        tmp_path / "cache2", tmp_path))
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for row in rows:
        assert row["world_size"] == 2 and row["n_samples"] == 257 and row["n_reference"] == 301
        assert row["fid"] == pytest.approx(one["fid"], rel=1e-9)
    # the reference statistics summed over both shards, cached once by rank 0
    one_cache, two_cache = (np.load(cache_path(tmp_path / "ref", tmp_path / d))
                            for d in ("cache1", "cache2"))
    np.testing.assert_allclose(two_cache["sigma"], one_cache["sigma"], rtol=1e-10, atol=1e-13)
    assert list((tmp_path / "cache2").iterdir()) == [cache_path(tmp_path / "ref",
                                                                tmp_path / "cache2")]


# ----------------------------------------------------------------------------------------------
# torch-fidelity's Inception: what it is fed, and its weights from a local file
# ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def inception_weights(tmp_path_factory):
    """torch-fidelity's FID Inception-v3 with its own random initialisation, saved as the state
    dict it loads (built with its weights loading switched off: nothing downloads)."""
    import torch_fidelity.feature_extractor_inceptionv3 as tfi
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tfi, "load_state_dict_from_url", lambda *args, **kwargs: {})
        patch.setattr(tfi.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        net = tfi.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "weights-inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


class Fed(Exception):
    """Raised by the hook on Inception's first layer once it has recorded its input."""


@pytest.mark.parametrize("antialias", [False, True])
def test_inception_is_fed_the_documented_resize(inception_weights, antialias):
    from torch_fidelity.interpolate_compat_tensorflow import (
        interpolate_bilinear_2d_like_tensorflow1x,
    )

    metric, settings = fid_metric(inception_weights=inception_weights, antialias=antialias)
    fed = []

    def record(module, args):
        fed.append(args[0])
        raise Fed

    metric.inception.net.Conv2d_1a_3x3.register_forward_pre_hook(record)
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    with pytest.raises(Fed):
        metric.update(images, real=False)
    tf1 = interpolate_bilinear_2d_like_tensorflow1x(images.float(), size=(299, 299),
                                                    align_corners=False)
    smooth = F.interpolate(images.float(), size=(299, 299), mode="bilinear",
                           align_corners=False, antialias=True)
    expected, other = (smooth, tf1) if antialias else (tf1, smooth)
    assert fed[0].shape == (2, 3, 299, 299)
    assert torch.equal(fed[0], (expected - 128) / 128)
    assert not torch.allclose(fed[0], (other - 128) / 128, atol=1e-3)
    assert settings["antialias"] is antialias
    assert settings["resize"] == ("torch bilinear antialias to 299x299" if antialias
                                  else "torch-fidelity TF1-compatible bilinear to 299x299")


def torch_fidelity_features(weights, images: torch.Tensor) -> np.ndarray:
    """(N, 2048) float64 features from torch-fidelity's own extractor and forward."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(weights))
    with torch.no_grad():
        return net(images)[0].double().numpy()


def test_inception_weights_come_from_the_local_file(inception_weights):
    metric, settings = fid_metric(inception_weights=inception_weights)
    saved = torch.load(inception_weights)
    loaded = metric.inception.net.state_dict()
    assert loaded.keys() == saved.keys()
    assert all(torch.equal(saved[k], v) for k, v in loaded.items())
    assert settings["weights_file"] == str(inception_weights)
    assert settings["weights_sha256"] == hashlib.sha256(inception_weights.read_bytes()).hexdigest()


# Inception-v3 forwards and torchmetrics' eigenvalues of a 2048 x 2048 product: minutes on 2 cores
@pytest.mark.slow
def test_fid_with_torch_fidelitys_inception_end_to_end(inception_weights):
    """The features are torch-fidelity's own (its extractor and forward, same weights file), and
    the distance their closed form."""
    samples = torch.randint(0, 256, (2, 3, 48, 48), dtype=torch.uint8)
    reference = torch.randint(0, 256, (3, 3, 40, 40), dtype=torch.uint8)
    row = fid(samples, reference, inception_weights=inception_weights, batch_size=8)
    f_s, f_r = (torch_fidelity_features(inception_weights, x) for x in (samples, reference))
    assert np.isfinite(f_s).all() and f_s.std() > 0
    (n_s, n_r), x_s, x_r = (len(f_s), len(f_r)), f_s - f_s.mean(0), f_r - f_r.mean(0)
    # S = X^T X / (n - 1) has rank < n: tr sqrt(S_r S_s) is the nuclear norm of X_r X_s^T, scaled
    root_trace = (np.linalg.svd(x_r @ x_s.T, compute_uv=False).sum()
                  / np.sqrt((n_r - 1) * (n_s - 1)))
    expected = (((f_s.mean(0) - f_r.mean(0)) ** 2).sum() + (x_s ** 2).sum() / (n_s - 1)
                + (x_r ** 2).sum() / (n_r - 1) - 2 * root_trace)
    assert row["fid"] == pytest.approx(expected, rel=1e-4)
    assert row["feature_dim"] == 2048 and row["antialias"] is False
    assert row["dtype"] == "float32" and row["n_samples"] == 2 and row["n_reference"] == 3
    assert row["feature_extractor"].startswith("torch-fidelity InceptionV3")


# ----------------------------------------------------------------------------------------------
# Refusals
# ----------------------------------------------------------------------------------------------



def test_missing_inception_weights_fail_at_once_naming_file_source_and_flag(tmp_path,
                                                                             monkeypatch,
                                                                             no_network):
    monkeypatch.delenv("PTDIT_INCEPTION_WEIGHTS", raising=False)
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(FileNotFoundError) as err:
        fid(images, images, inception_weights=None)
    for part in ("weights-inception-2015-12-05-6726825d.pth",
                 "github.com/toshas/torch-fidelity/releases", "--inception-weights",
                 "PTDIT_INCEPTION_WEIGHTS"):
        assert part in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        fid(images, images, inception_weights=tmp_path / "nowhere.pth")
    assert no_network == []


def test_missing_inception_weights_fail_before_the_network_code_is_imported(monkeypatch):
    """The weights check comes before torchmetrics and torch-fidelity are imported (seconds)."""
    monkeypatch.delenv("PTDIT_INCEPTION_WEIGHTS", raising=False)
    error, imported = modules_at_failure("""
        import torch
        from analysis.metrics.fid import fid
        images = torch.zeros(3, 3, 8, 8, dtype=torch.uint8)
        fid(images, images, inception_weights=None)""")
    assert error.startswith("FileNotFoundError(") and "--inception-weights" in error
    assert "analysis" in imported and not imported & {"torchmetrics", "torch_fidelity"}


def test_a_broken_weights_file_is_named(tmp_path, no_network):
    path = tmp_path / "weights.pth"
    path.write_bytes(bytes(torch.randint(0, 256, (256,)).tolist()))
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match="weights.pth' cannot be loaded"):
        fid(images, images, inception_weights=path)
    assert no_network == []


def test_fewer_than_two_images_on_either_side_are_refused(two_sets):
    samples, reference = encode(two_sets[0]), encode(two_sets[1])
    with pytest.raises(ValueError, match="at least 2 sample images .* got 1 .*50,000"):
        fid(samples[:1], reference, extractor=Decode())
    with pytest.raises(ValueError, match="at least 2 reference images .* got 1"):
        fid(samples, reference[:1], extractor=Decode())


def test_bad_images_and_extractors_are_refused(two_sets, tmp_path):
    reference = encode(two_sets[1])
    with pytest.raises(ValueError, match="dtype torch.int64"):
        fid(reference.long(), reference, extractor=Decode())
    with pytest.raises(ValueError, match=r"allowed: \[0, 1\]"):
        fid(reference.float(), reference, extractor=Decode())
    with pytest.raises(ValueError, match="does not exist"):
        fid(tmp_path / "nowhere", reference, extractor=Decode())

    class Anonymous(nn.Module):
        def forward(self, images):
            return images.double().mean((2, 3))
    with pytest.raises(ValueError, match="num_features=None; allowed: a positive int"):
        fid(reference, reference, extractor=Anonymous())


def test_statistics_are_float64_sums(two_sets):
    metric, _ = fid_metric(extractor=Decode())
    for name in ("real_features_sum", "real_features_cov_sum", "fake_features_sum",
                 "fake_features_cov_sum"):
        assert getattr(metric, name).dtype == torch.float64
    assert fid_module.Float64Features(Pixels(), 3)(encode(two_sets[0])).dtype == torch.float64


# ----------------------------------------------------------------------------------------------
# Statistics checked before the square root; the clamp at 0; the cache keyed on contents
# ----------------------------------------------------------------------------------------------

def statistics_file(path, mu, sigma, meta=None):
    extra = {} if meta is None else {"meta": np.array(json.dumps(meta))}
    np.savez(path, mu=mu, sigma=sigma, **extra)
    return path


@pytest.mark.parametrize("damage, message", [
    (lambda mu, sigma: mu.__setitem__(1, np.nan), "mu holds 1 NaN or infinite value"),
    (lambda mu, sigma: sigma.__setitem__((2, 3), np.inf), "sigma holds 1 NaN or infinite"),
    (lambda mu, sigma: sigma.__setitem__((0, 3), sigma[3, 0] + 1), "sigma is not symmetric"),
])
def test_bad_reference_statistics_are_refused_naming_the_file(tmp_path, two_sets, damage,
                                                              message):
    mu, sigma = (x.numpy().copy() for x in random_gaussian())
    damage(mu, sigma)
    path = statistics_file(tmp_path / "VIRTUAL_ref.npz", mu, sigma)
    with pytest.raises(ValueError, match=f"VIRTUAL_ref.npz'.*: {message}"):
        fid(encode(two_sets[0]), path, extractor=Decode())


def test_bad_cached_statistics_are_refused_naming_the_cache(tmp_path, two_sets):
    write_pngs(tmp_path / "ref", encode(two_sets[1]))
    fid(encode(two_sets[0]), tmp_path / "ref", extractor=Decode())
    cache = cache_path(tmp_path / "ref")
    with np.load(cache) as f:
        meta, mu, sigma = json.loads(str(f["meta"])), f["mu"].copy(), f["sigma"].copy()
    sigma[0, 0] = np.nan
    statistics_file(cache, mu, sigma, meta)
    with pytest.raises(ValueError, match="cached FID statistics .*ref.fid-stats.npz.*sigma "
                                         "holds 1 NaN"):
        fid(encode(two_sets[0]), tmp_path / "ref", extractor=Decode())


def test_a_negative_distance_is_clamped_at_zero_and_said(two_sets, monkeypatch):
    import torchmetrics.image.fid as tm_fid

    images = encode(two_sets[0])
    row = fid(images, images, extractor=Decode())
    assert row["fid"] == max(row["fid_raw"], 0.0) >= 0
    assert row["fid_clamped"] is (row["fid_raw"] < 0) and abs(row["fid_raw"]) < 1e-9
    monkeypatch.setattr(tm_fid, "_compute_fid",
                        lambda *args: torch.tensor(-4e-21, dtype=torch.float64))
    row = fid(images, images, extractor=Decode())
    assert (row["fid"], row["fid_raw"], row["fid_clamped"]) == (0.0, -4e-21, True)


def test_the_cache_notices_an_image_replaced_with_the_same_size_and_mtime(tmp_path, two_sets):
    """BMP files of one size have one byte count: a replaced image keeps the file's size, and
    os.utime puts its mtime back; only the contents tell."""
    folder = tmp_path / "ref"
    folder.mkdir()
    reference = encode(two_sets[1][:40])
    for i, image in enumerate(reference):
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i:03d}.bmp")
    first = fid(encode(two_sets[0]), folder, extractor=Decode())
    assert fid(encode(two_sets[0]), folder, extractor=Decode())["reference"] == \
        "cached statistics"
    victim = folder / f"{int(torch.randint(0, 40, ())):03d}.bmp"
    stat = victim.stat()
    replacement = encode(torch.randn(1, DIM, dtype=torch.float64) * 3)[0]
    Image.fromarray(replacement.permute(1, 2, 0).numpy()).save(victim)
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (victim.stat().st_size, victim.stat().st_mtime_ns) == (stat.st_size,
                                                                   stat.st_mtime_ns)
    again = fid(encode(two_sets[0]), folder, extractor=Decode())
    assert again["reference"] == "computed from images" and again["fid"] != first["fid"]


def test_the_cache_notices_changed_bytes_inside_a_reference_npz(tmp_path, two_sets):
    path = tmp_path / "ref.npz"
    np.savez(path, encode(two_sets[1]).permute(0, 2, 3, 1).numpy())
    fid(encode(two_sets[0]), path, extractor=Decode())
    stat, data = path.stat(), bytearray(path.read_bytes())
    data[-200] ^= 0xFF                                    # one byte of the last image
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fid(encode(two_sets[0]), path, extractor=Decode())["reference"] == \
        "computed from images"


def test_an_empty_inception_weights_file_says_so(tmp_path, no_network):
    (tmp_path / "weights.pth").write_bytes(b"")
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"weights.pth' .*is empty \(0 bytes\)"):
        fid(images, images, inception_weights=tmp_path / "weights.pth")
