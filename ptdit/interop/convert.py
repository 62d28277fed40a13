"""`ptdit convert`: one checkpoint in any readable format to another format, every argument and
the destination checked before anything is loaded."""

import dataclasses
from pathlib import Path

from ..configs import get_config
from .load import check_destination, load, read_json, save, target_format
from .ptdit_format import registry_name


def convert(src, dst, to: str, *, source_format: str = "auto", name: str | None = None,
            dtype=None, config: str | Path | None = None, window=None,
            force: bool = False) -> str:
    """Converts `src` (a file or diffusers folder, `source_format` or recognised) into `dst` in
    the `to` format ('ptdit', 'diffusers', 'official'); `name`: the registry model it must be;
    `config`: the source's config JSON; `window`: a PT-DiT's window (frames, rows, cols) in the
    result (the weights do not depend on it). Returns a one-line description of what was
    written."""
    if name is not None:
        get_config(name)
    config_dict = None
    if config is not None:
        path = Path(config)
        if path.is_dir():
            raise ValueError(f"--config {path} is a folder; it must be a JSON file")
        if not path.is_file():
            raise ValueError(f"--config {path} does not exist; it must be a JSON file")
        config_dict = read_json(path, "the --config JSON")
    check_destination(dst, force)
    model = load(src, name=name, format=source_format, dtype=dtype, config=config_dict)
    if window is not None:
        if model.config.family != "PT-DiT":
            raise ValueError(f"--window sets a PT-DiT's window; {src} holds a "
                             f"{model.config.family} model")
        model.config = dataclasses.replace(model.config, window=tuple(window))
        model.name = registry_name(model.config)
    fmt = target_format(model.config.family, to)
    paths = save(model, dst, fmt.name, force=force)
    dtype = next(model.parameters()).dtype
    return (f"{src} -> {fmt.name} ({model.config.family}"
            f"{', ' + model.name if model.name else ''}, {str(dtype).removeprefix('torch.')}): "
            + ", ".join(str(p) for p in paths))
