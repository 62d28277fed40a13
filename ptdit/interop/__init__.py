"""Checkpoint interoperability: every public DiT, PixArt-alpha and PT-DiT release <-> ptdit.

    import ptdit
    model = ptdit.load("DiT-XL-2-256x256.pt")            # format and model recognised
    ptdit.interop.save(model, "dit.safetensors")          # ptdit's own format (reloads alone)

One converter per source format (a `Format`: pure state-dict and config mappings); `load`
reads files and diffusers folders, recognises the format and builds the model; `save` writes any
format whose target is public, with the config fields the format cannot say beside it (the
sidecar `<file>.json`, or "ptdit_config" in a diffusers config.json), so that ours -> format ->
ours is exact.
"""

from .base import Format
from .load import FORMATS, detect_format, load, read_checkpoint, save, target_format
from .official_ptdit import OFFICIAL_PTDIT, from_official_ptdit, to_official_ptdit
from .ptdit_format import PTDIT

__all__ = ["FORMATS", "Format", "OFFICIAL_PTDIT", "PTDIT", "detect_format", "from_official_ptdit",
           "load", "read_checkpoint", "save", "target_format", "to_official_ptdit"]
