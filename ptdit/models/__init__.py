"""The three architectures, one file each (config dataclass on top): DiT, PixArt-alpha, PT-DiT."""

from .dit import DiT, DiTConfig
from .pixart import PixArt, PixArtConfig
from .ptdit import PTDiT, PTDiTConfig

__all__ = ["DiT", "DiTConfig", "PixArt", "PixArtConfig", "PTDiT", "PTDiTConfig"]
