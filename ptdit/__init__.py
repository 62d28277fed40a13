"""ptdit: reference DiT, PixArt-alpha and PT-DiT built from one set of layers.

    import ptdit
    model = ptdit.build("PT-DiT/XL", device="meta")   # any named model, any device
    ptdit.list_models()
    model = ptdit.load("DiT-XL-2-256x256.pt")          # any public checkpoint, format recognised
"""

from .configs import DiTConfig, PixArtConfig, PTDiTConfig, build, get_config, list_models
from .interop import load

__all__ = ["DiTConfig", "PixArtConfig", "PTDiTConfig", "build", "get_config", "list_models",
           "load"]
