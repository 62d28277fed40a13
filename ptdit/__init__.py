"""ptdit: reference DiT, PixArt-alpha and PT-DiT built from one set of layers.

    import ptdit
    model = ptdit.build("PT-DiT/XL", device="meta")   # any named model, any device
    ptdit.list_models()
    model = ptdit.load("DiT-XL-2-256x256.pt")          # any public checkpoint, format recognised
    work = ptdit.Workload("PT-DiT/XL", resolution=1024)
    out = model(**ptdit.example_inputs(model, work))
"""

from .configs import build, get_config, list_models
from .models import DiTConfig, PixArtConfig, PTDiTConfig
from .workload import Workload, example_inputs

__all__ = ["DiTConfig", "PixArtConfig", "PTDiTConfig", "Workload", "build", "example_inputs",
           "get_config", "list_models", "load"]


def __getattr__(name: str):
    # Checkpoint I/O (safetensors, converters) is imported on first use, not with ptdit.
    if name == "load":
        from .interop import load
        return load
    if name == "interop":
        import importlib
        return importlib.import_module(".interop", __name__)
    raise AttributeError(f"module 'ptdit' has no attribute {name!r}")
