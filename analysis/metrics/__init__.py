"""Quality metrics of generated images, offline and sharded over torch.distributed ranks:
`fid.fid` (Fréchet Inception Distance) and `clip_score.clip_score`. Each returns one results
row (docs/results.md "Results rows") that records every setting that moves its number; the helpers
here build the part of the row they share."""

import os

from bench.rows import check_row, device_label, provenance

from ..hashing import file_sha256  # noqa: F401  (the metrics record their weights by it)
from ..images import Source, image_size, shard


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
