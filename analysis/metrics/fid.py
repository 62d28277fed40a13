"""Fréchet Inception Distance, offline and sharded, with every setting that moves it recorded.

The metric is torchmetrics' `FrechetInceptionDistance` over torch-fidelity's TF-ported
Inception-v3 (pool3, 2048 features), loaded from a local file (`analysis.offline.INCEPTION`:
`--inception-weights` or $PTDIT_INCEPTION_WEIGHTS; nothing downloads). What moves FID:
- resize to 299x299: torch-fidelity's TF1-compatible bilinear by default (`antialias=False`,
  the path that matches the TensorFlow original); `antialias=True` is torch's antialiased
  bilinear, which torchmetrics >= 1.8 uses by default;
- quantisation: the network sees uint8 images (floats in [0, 1] are rounded to uint8 first);
- statistics: feature sums and Gram matrices in float64 (torchmetrics' states), and the
  distance in float64 (torchmetrics returns it in the features' dtype, so the features are cast
  to float64 before they reach it: `Float64Features`).
Reference statistics (mu, sigma, n) are computed once per reference set and cached in an .npz
(`<reference>.fid-stats.npz`, or in `cache_dir`) with the settings and what identifies the
set's contents: every file's name, size and mtime (hashed), and a sha256 over a deterministic
sample of the contents (a folder: up to 64 files spread over the sorted list; an .npz: 64
blocks spread over the file), so an image replaced by another of the same size and mtime
still invalidates the cache; a cache that differs in any of them is recomputed. An .npz with
`mu` and `sigma` (ADM's reference batches, e.g. VIRTUAL_imagenet256_labeled.npz) is used as
it is. Statistics read from a file or a cache are checked before the matrix square root (mu
(D,), sigma (D, D), finite, sigma symmetric): a NaN there would crash the linear algebra.
A distance below 0 (float rounding, e.g. a set against itself: -4e-21) is reported as 0, with
`fid_clamped` true and the raw value in `fid_raw`.
Under torch.distributed (torchrun: analysis.distributed starts the process group) each rank
reads its shard of the images (analysis.images) and torchmetrics sums the ranks' states
(dist_reduce_fx="sum"), so FID does not depend on the number of processes.
"""

import hashlib
import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from ptdit.checks import check_device

from ..distributed import process_group
from ..images import Source, count_images, image_names, quantisation, read_images, shard
from ..offline import INCEPTION
from . import file_sha256, result_row, source_name

FEATURE_DIM = 2048
RESIZE = {False: "torch-fidelity TF1-compatible bilinear to 299x299",
          True: "torch bilinear antialias to 299x299"}
STATISTICS_DTYPE = "float64"
CACHE_SUFFIX = ".fid-stats.npz"
CACHE_FORMAT = "ptdit fid-stats 2"   # 2: keyed on a content sample too
SAMPLED_FILES = 64                    # files of a reference folder whose bytes key the cache
SAMPLED_BLOCKS, BLOCK_BYTES = 64, 1 << 16   # blocks of a reference .npz that key the cache
SYMMETRY_TOLERANCE = 1e-6             # largest |sigma - sigma^T|, relative to max |sigma|
# the settings that statistics cached or precomputed by ptdit must share with the run using them
CACHE_SETTINGS = ("feature_extractor", "feature_dim", "resize", "antialias", "weights_sha256",
                  "statistics_dtype")
ADM_STATISTICS = "ADM precomputed statistics"
ADM_WARNING = ("{path}: using its precomputed mu/sigma (ADM reference batch); ADM computed them "
               "with TensorFlow's Inception graph on unresized float images, so FID against them "
               "is comparable with ADM/DiT numbers but not bit-identical to statistics that "
               "torch-fidelity's Inception computes")
NOMINAL_N = 2  # sums for statistics of unknown n: any n >= 2 gives back the same mu and sigma


class Float64Features(nn.Module):
    """`net`'s features in float64: torchmetrics casts the distance it computes in float64 back
    to the dtype of the features it was given."""

    def __init__(self, net: nn.Module, num_features: int):
        super().__init__()
        self.net, self.num_features = net, num_features

    def forward(self, images: Tensor) -> Tensor:
        return self.net(images).double()  # (N, 3, H, W) uint8 -> (N, D) float64


def _torchmetrics_version() -> str:
    import torchmetrics  # loaded by now; not before the weights check, which takes a moment
    return torchmetrics.__version__


def _dtype_of(module: nn.Module) -> str:
    parameter = next(module.parameters(), None)
    return "none" if parameter is None else str(parameter.dtype).removeprefix("torch.")


def fid_metric(*, inception_weights: str | os.PathLike | None = None, antialias: bool = False,
               device: str | torch.device = "cpu", extractor: nn.Module | None = None):
    """torchmetrics' FrechetInceptionDistance on `device` and the settings that move its value,
    as (metric, settings). The network is torch-fidelity's Inception-v3 from the local file
    `inception_weights` (else $PTDIT_INCEPTION_WEIGHTS), or `extractor`: a module mapping uint8
    (N, 3, H, W) to (N, D) features, with an int attribute `num_features` = D."""
    if extractor is None:
        weights = INCEPTION.path(inception_weights)  # before the imports, which take seconds
        from torchmetrics.image.fid import NoTrainInceptionV3
        try:
            net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FEATURE_DIM)],
                                     feature_extractor_weights_path=str(weights),
                                     antialias=antialias)
        except Exception as err:   # a damaged pickle raises almost any type
            raise ValueError(f"{INCEPTION.what} file {str(weights)!r} cannot be loaded as "
                             f"torch-fidelity's Inception state dict "
                             f"({INCEPTION.expected}): {err}") from err
        dim = FEATURE_DIM
        settings = {"feature_extractor": "torch-fidelity InceptionV3 (TF-ported FID weights, "
                                         "pool3)",
                    "resize": RESIZE[bool(antialias)], "antialias": bool(antialias),
                    "weights_file": str(weights), "weights_sha256": file_sha256(weights)}
    else:
        dim, net, cls = getattr(extractor, "num_features", None), extractor, type(extractor)
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"custom extractor {cls.__name__} has num_features={dim!r}; "
                             "allowed: a positive int, the feature dimension D of its (N, D) "
                             "output")
        settings = {"feature_extractor": f"custom {cls.__module__}.{cls.__qualname__}",
                    "resize": "none (custom extractor)", "antialias": None,
                    "weights_file": None, "weights_sha256": None}
    settings = {**settings, "feature_dim": dim, "statistics_dtype": STATISTICS_DTYPE}
    from torchmetrics.image.fid import FrechetInceptionDistance
    metric = FrechetInceptionDistance(feature=Float64Features(net, dim).eval(), normalize=False)
    return metric.to(device), settings


# ----------------------------------------------------------------------------------------------
# Reference statistics
# ----------------------------------------------------------------------------------------------

def _at_least_two(source: Source, what: str) -> int:
    n = count_images(source)
    if n < 2:
        raise ValueError(f"FID needs at least 2 {what} images to estimate a covariance, got {n} "
                         f"(from {source_name(source)}); FID-50K, the standard, uses 50,000 "
                         "samples")
    return n


def _npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as archive:
            return [n.removesuffix(".npy") for n in archive.namelist()]
    except zipfile.BadZipFile as err:
        raise ValueError(f"{str(path)!r} is not a readable .npz (zip) file: {err}") from err


def _is_statistics(reference: Source) -> bool:
    """Whether `reference` is an .npz of precomputed statistics (`mu` and `sigma`)."""
    if isinstance(reference, Tensor):
        return False
    path = Path(reference).expanduser()
    return (path.is_file() and path.suffix.lower() == ".npz"
            and {"mu", "sigma"} <= set(_npz_keys(path)))


def _read_statistics(path: Path) -> tuple[np.ndarray, np.ndarray, dict | None]:
    """(mu, sigma, ptdit's metadata or None) of a statistics .npz."""
    with np.load(path, allow_pickle=False) as f:
        meta = json.loads(str(f["meta"])) if "meta" in f.files else None
        return f["mu"].astype(np.float64), f["sigma"].astype(np.float64), meta


def _write_statistics(path: Path, mu: np.ndarray, sigma: np.ndarray, meta: dict) -> None:
    """Writes atomically (a reader never sees half a file); warns if the folder is read-only."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, mu=mu, sigma=sigma, meta=np.array(json.dumps(meta)))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        warnings.warn(f"could not cache FID reference statistics at {str(path)!r}: {err}",
                      stacklevel=3)


def _content_sample(path: Path, files: list[Path]) -> str:
    """sha256 over a deterministic sample of the set's bytes: a folder's files at up to
    SAMPLED_FILES positions spread over the sorted list (all of a smaller set), or an .npz's
    SAMPLED_BLOCKS blocks spread over the file (all of a smaller file)."""
    digest = hashlib.sha256()
    if path.is_file():
        size = path.stat().st_size
        with open(path, "rb") as f:
            if size <= SAMPLED_BLOCKS * BLOCK_BYTES:
                digest.update(f.read())
            else:
                for k in range(SAMPLED_BLOCKS):
                    f.seek(k * (size - BLOCK_BYTES) // (SAMPLED_BLOCKS - 1))
                    digest.update(f.read(BLOCK_BYTES))
        return digest.hexdigest()
    last = len(files) - 1
    picks = sorted({k * last // (SAMPLED_FILES - 1) for k in range(SAMPLED_FILES)})
    for i in picks if len(files) > SAMPLED_FILES else range(len(files)):
        digest.update(f"{files[i].name}\n".encode())
        digest.update(files[i].read_bytes())
    return digest.hexdigest()


def _stamp(path: Path) -> dict:
    """What identifies a reference set's contents: path, file count, bytes, a hash of every
    file's name, size and mtime, and a hash of a sample of the contents (_content_sample)."""
    files = [path] if path.is_file() else [path / name for name in image_names(path)]
    listing, total = hashlib.sha256(), 0
    for f in files:
        stat = f.stat()
        total += stat.st_size
        listing.update(f"{f.name}\t{stat.st_size}\t{stat.st_mtime_ns}\n".encode())
    return {"path": str(path.resolve()), "files": len(files), "bytes": total,
            "listing_sha256": listing.hexdigest(),
            "content_sha256": _content_sample(path, files)}


def check_statistics(mu: np.ndarray, sigma: np.ndarray, dim: int, what: str) -> None:
    """ValueError naming `what` unless mu is (dim,), sigma (dim, dim), both finite, and sigma
    symmetric (within SYMMETRY_TOLERANCE of its largest entry): what the matrix square root
    needs (NaN there crashes the linear algebra library, it does not raise)."""
    if mu.shape != (dim,) or sigma.shape != (dim, dim):
        raise ValueError(f"{what}: mu {mu.shape} and sigma {sigma.shape}; this feature "
                         f"extractor needs ({dim},) and ({dim}, {dim})")
    for name, array in (("mu", mu), ("sigma", sigma)):
        bad = int((~np.isfinite(array)).sum())
        if bad:
            raise ValueError(f"{what}: {name} holds {bad} NaN or infinite value"
                             f"{'s' if bad != 1 else ''}; FID needs finite statistics")
    scale = float(np.abs(sigma).max())
    asymmetry = float(np.abs(sigma - sigma.T).max())
    if asymmetry > SYMMETRY_TOLERANCE * max(scale, np.finfo(np.float64).tiny):
        raise ValueError(f"{what}: sigma is not symmetric (largest |sigma - sigma^T| "
                         f"{asymmetry:.3g}, entries up to {scale:.3g}); a covariance matrix "
                         "is symmetric")


def cache_path(reference: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the statistics of `reference` are cached: `<reference>.fid-stats.npz` beside it, or
    `<cache_dir>/<name>-<hash of its absolute path>.fid-stats.npz`."""
    path = Path(reference).expanduser().resolve()
    if cache_dir is None:
        return path.with_name(path.name + CACHE_SUFFIX)
    digest = hashlib.sha256(str(path).encode()).hexdigest()[:12]
    return Path(cache_dir).expanduser() / f"{path.name}-{digest}{CACHE_SUFFIX}"


def _features_statistics(metric, source: Source, batch_size: int, device) -> tuple:
    """(mu (D,), sigma (D, D), n) of `source`'s features, float64, summed over all ranks (each
    reads its shard); leaves `metric` reset."""
    for batch in read_images(source, batch_size=batch_size):
        metric.update(batch.to(device), real=True)
    with metric.sync_context():  # sums the ranks' states; nothing to do on one process
        n = int(metric.real_features_num_samples)
        total, gram = metric.real_features_sum.clone(), metric.real_features_cov_sum.clone()
    metric.reset()
    mu = total / n
    sigma = (gram - n * torch.outer(mu, mu)) / (n - 1)  # as torchmetrics' compute()
    return mu.cpu().numpy(), sigma.cpu().numpy(), n


def _reference(metric, settings: dict, reference: Source, *, batch_size: int, device,
               cache_dir) -> dict:
    """Reference statistics: mu, sigma (numpy float64), n (None if unknown), and where they came
    from (`reference`, `reference_path`, `reference_cache`)."""
    key = {k: settings[k] for k in CACHE_SETTINGS}
    dim = settings["feature_dim"]
    if _is_statistics(reference):
        path = Path(reference).expanduser()
        mu, sigma, meta = _read_statistics(path)
        check_statistics(mu, sigma, dim, f"FID reference statistics {str(path)!r}")
        if meta is None:
            warnings.warn(ADM_WARNING.format(path=path), stacklevel=3)
            kind, n = ADM_STATISTICS, None
        elif meta.get("settings") != key:
            raise ValueError(f"{str(path)!r} holds statistics computed with {meta.get('settings')}"
                             f"; this run uses {key}: pass the images they came from "
                             f"({meta.get('source', {}).get('path')}) instead")
        else:
            kind, n = "precomputed statistics (ptdit)", meta["n"]
        return {"mu": mu, "sigma": sigma, "n": n, "reference": kind,
                "reference_path": str(path), "reference_cache": None}
    _at_least_two(reference, "reference")
    if isinstance(reference, Tensor):
        mu, sigma, n = _features_statistics(metric, reference, batch_size, device)
        check_statistics(mu, sigma, dim, f"the features of the reference images "
                         f"({source_name(reference)}): is the feature extractor sound?")
        return {"mu": mu, "sigma": sigma, "n": n, "reference": "computed from images",
                "reference_path": source_name(reference), "reference_cache": None}
    path, cache = Path(reference).expanduser(), cache_path(reference, cache_dir)
    wanted = {"format": CACHE_FORMAT, "settings": key, "source": _stamp(path)}
    if cache.is_file():
        mu, sigma, meta = _read_statistics(cache)
        if meta is not None and {k: meta.get(k) for k in wanted} == wanted:
            check_statistics(mu, sigma, dim, f"cached FID statistics {str(cache)!r} (delete "
                             "the file to recompute them)")
            return {"mu": mu, "sigma": sigma, "n": meta["n"], "reference": "cached statistics",
                    "reference_path": str(path), "reference_cache": str(cache)}
    mu, sigma, n = _features_statistics(metric, path, batch_size, device)
    check_statistics(mu, sigma, dim, f"the features of the reference images {str(path)!r}: "
                     "is the feature extractor sound?")
    if shard()[0] == 0:
        _write_statistics(cache, mu, sigma, {**wanted, "n": n})
    return {"mu": mu, "sigma": sigma, "n": n, "reference": "computed from images",
            "reference_path": str(path), "reference_cache": str(cache)}


def reference_stats(reference: Source, *, inception_weights: str | os.PathLike | None = None,
                    batch_size: int = 50, device: str | torch.device = "cpu",
                    antialias: bool = False, cache_dir: str | os.PathLike | None = None,
                    extractor: nn.Module | None = None) -> dict:
    """The FID statistics of `reference` (a folder, an image .npz, a tensor, or an .npz with
    `mu`/`sigma`): mu (D,) and sigma (D, D) as float64 numpy arrays, n, where they came from,
    and the settings; computed once and cached as the module docstring says."""
    with process_group(check_device(device, "device")) as (_, _, device):
        metric, settings = fid_metric(inception_weights=inception_weights, antialias=antialias,
                                      device=device, extractor=extractor)
        return {**_reference(metric, settings, reference, batch_size=batch_size, device=device,
                             cache_dir=cache_dir), **settings}


def _load_reference(metric, mu: np.ndarray, sigma: np.ndarray, n: int | None) -> None:
    """Puts the reference statistics into the metric's real-feature sums, on rank 0 only: the
    ranks' states are summed before the distance is computed."""
    if shard()[0] != 0:
        return
    n = n or NOMINAL_N
    mu = torch.as_tensor(mu, dtype=torch.float64, device=metric.real_features_sum.device)
    sigma = torch.as_tensor(sigma, dtype=torch.float64, device=mu.device)
    metric.real_features_sum.copy_(n * mu)
    metric.real_features_cov_sum.copy_((n - 1) * sigma + n * torch.outer(mu, mu))
    metric.real_features_num_samples.fill_(n)


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------

def fid(samples: Source, reference: Source, *,
        inception_weights: str | os.PathLike | None = None, batch_size: int = 50,
        device: str | torch.device = "cpu", antialias: bool = False,
        cache_dir: str | os.PathLike | None = None, extractor: nn.Module | None = None) -> dict:
    """FID of `samples` against `reference`, as one results row.

    samples: a folder of images, an ADM-style .npz (`arr_0` uint8 (N, H, W, 3)) or a tensor
        (N, 3, H, W), uint8 or floats in [0, 1] (analysis.images).
    reference: the same kinds, or an .npz of precomputed `mu`/`sigma` (ADM reference batches).
    Returns the row: `fid`, `n_samples`, `n_reference` (None for ADM statistics), `reference`
    (computed / cached / ADM precomputed statistics), `reference_path`, `reference_cache`,
    `quantisation`, the settings (`feature_extractor`, `feature_dim`, `resize`, `antialias`,
    `weights_file`, `weights_sha256`, `statistics_dtype`), `fid_raw` and `fid_clamped` (the
    distance before clamping at 0, and whether it was below) and DESIGN's row fields. Under
    torchrun (WORLD_SIZE > 1) a process group is started if none runs (analysis.distributed).
    """
    n_samples = _at_least_two(samples, "sample")
    with process_group(check_device(device, "device")) as (_, _, device):
        metric, settings = fid_metric(inception_weights=inception_weights, antialias=antialias,
                                      device=device, extractor=extractor)
        ref = _reference(metric, settings, reference, batch_size=batch_size, device=device,
                         cache_dir=cache_dir)
        _load_reference(metric, ref["mu"], ref["sigma"], ref["n"])
        for batch in read_images(samples, batch_size=batch_size):
            metric.update(batch.to(device), real=False)
        with metric.sync_context():  # every rank sees the summed states, and so agrees
            finite = bool(torch.isfinite(metric.fake_features_sum).all()
                          and torch.isfinite(metric.fake_features_cov_sum).all())
        if not finite:
            raise ValueError(f"the features of the samples ({source_name(samples)}) hold NaN "
                             f"or infinite values: is the feature extractor sound "
                             f"({settings['weights_file'] or settings['feature_extractor']})?")
        raw = float(metric.compute())  # sums the ranks' states first
        row = result_row(metric="fid", samples=samples, device=device,
                         backend=f"torchmetrics {_torchmetrics_version()} "
                                 "FrechetInceptionDistance",
                         dtype=_dtype_of(metric.inception), batch=batch_size)
    return {**row, "fid": max(raw, 0.0), "fid_raw": raw, "fid_clamped": raw < 0,
            "n_samples": n_samples, "n_reference": ref["n"],
            "reference": ref["reference"], "reference_path": ref["reference_path"],
            "reference_cache": ref["reference_cache"], "quantisation": quantisation(samples),
            **settings}
