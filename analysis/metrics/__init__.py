"""Quality metrics of generated images, offline and sharded over torch.distributed ranks:
`fid.fid` (Fréchet Inception Distance) and `clip_score.clip_score`. Each returns one results
row (DESIGN.md "Results rows") that records every setting that moves its number; the helpers
here build the part of the row they share."""

import functools
import hashlib
import os
from pathlib import Path

from bench.rows import check_row, device_label, provenance

from ..images import Source, image_size, shard


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256 (hex), computed once per process per (path, size, mtime)."""
    path = Path(path).resolve()
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


def source_name(source: Source) -> str:
    """What a row says the images were: the path, or 'tensor (N, 3, H, W) dtype'."""
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return f"tensor {tuple(source.shape)} {str(source.dtype).removeprefix('torch.')}"


def result_row(*, metric: str, samples: Source, device: str, backend: str, dtype: str,
               batch: int) -> dict:
    """The shared fields of a metric's row: provenance, DESIGN's row fields (model, tokens and
    latent frames are unknown here: None; resolution is the side of square samples, else None),
    the samples' pixel size and the number of ranks."""
    height, width = image_size(samples)
    row = {**provenance(device_label(device), backend, dtype),
           "model": None, "resolution": height if height == width else None,
           "latent_frames": None, "tokens": None, "batch": batch, "status": "ok",
           "metric": metric, "samples_path": source_name(samples),
           "image_height_px": height, "image_width_px": width, "world_size": shard()[1]}
    check_row(row)
    return row
