"""The three architectures, one file each: DiT, PixArt-alpha, PT-DiT."""

from .dit import DiT
from .pixart import PixArt
from .ptdit import PTDiT

__all__ = ["DiT", "PixArt", "PTDiT"]
