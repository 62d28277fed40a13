"""Kept attention maps: the stream `Key` a statistic pools (kind, layer, head, step, timestep,
branch), one kept map (`AttentionMap`: a Key, its grid and probabilities) and their file, one
compressed .npz (`save_maps`, `load_maps`)."""

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np


class Key(NamedTuple):
    """Which stream of maps a statistic pools: the rows' key columns."""
    kind: str
    layer: int
    head: int
    step: int
    timestep: float
    branch: str


@dataclass(frozen=True)
class AttentionMap:
    """One kept map: probs (L, L) float32 over `grid` (F, h, w) in raster order, of stream
    `key`."""
    key: Key
    grid: tuple[int, int, int]
    probs: np.ndarray

    kind = property(lambda self: self.key.kind)
    layer = property(lambda self: self.key.layer)
    head = property(lambda self: self.key.head)
    step = property(lambda self: self.key.step)
    timestep = property(lambda self: self.key.timestep)
    branch = property(lambda self: self.key.branch)


def save_maps(maps: Iterable[AttentionMap], path: str | Path) -> Path:
    """Writes kept maps to one compressed .npz: arrays map_0, map_1, … and their keys and grids
    as JSON in `index`."""
    maps = list(maps)
    index = [{**m.key._asdict(), "grid": list(m.grid)} for m in maps]
    path = Path(path)
    np.savez_compressed(path, index=np.array(json.dumps(index)),
                        **{f"map_{i}": m.probs for i, m in enumerate(maps)})
    return path


def load_maps(path: str | Path) -> list[AttentionMap]:
    """The maps `save_maps` wrote."""
    with np.load(path, allow_pickle=False) as data:
        index = json.loads(str(data["index"]))
        return [AttentionMap(Key(**{k: v for k, v in fields.items() if k != "grid"}),
                             tuple(fields["grid"]), data[f"map_{i}"])
                for i, fields in enumerate(index)]


__all__ = ["AttentionMap", "Key", "load_maps", "save_maps"]
