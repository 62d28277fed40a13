"""Leaf validators shared by every entry point (configs, shapes, costs, checkpoint metadata).

Each check raises a ValueError that says what was given, what is allowed and, for sizes, the
nearest valid values. Nothing here imports the rest of ptdit.
"""

import dataclasses
import math
import re
from collections.abc import Iterable

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
DEVICE_NAMES = ("cpu", "cuda", "cuda:N")


def model_dtype(dtype) -> torch.dtype | None:
    """A model dtype given as a floating torch.dtype or its name (None stays None)."""
    if dtype is None:
        return None
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in DTYPES:
        return DTYPES[dtype.removeprefix("torch.")]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise ValueError(f"dtype {dtype!r} is not a model dtype; allowed: {', '.join(DTYPES)} "
                     "(as names or torch dtypes)")


def dtype_name(dtype) -> str:
    """'float32', 'bfloat16', 'float16' or 'float64' for a name or torch dtype."""
    return str(model_dtype(dtype)).removeprefix("torch.")


def nearest_multiples(value: int, *multiples: int) -> tuple[int, ...]:
    """The positive common multiples of `multiples` on either side of `value` (one when the
    lower is 0): every value returned satisfies every divisibility rule at once."""
    step = math.lcm(*multiples)
    lo = value // step * step
    return (step,) if lo <= 0 else (lo, lo + step)


def either(values: Iterable) -> str:
    """'a or b' for hints."""
    return " or ".join(str(v) for v in values)


def is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value) -> bool:
    """A finite int or float (bools are not numbers here)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def positive_int(label: str, value) -> int:
    if not is_int(value) or value < 1:
        raise ValueError(f"{label} must be a positive integer, got {value!r}")
    return value


def positive(config, *names: str, number: bool = False) -> None:
    """Each field a positive integer (or, with `number`, a positive finite number)."""
    for name in names:
        value = getattr(config, name)
        ok = is_number(value) if number else is_int(value)
        if not ok or value <= 0:
            kind = "number (finite)" if number else "integer"
            raise ValueError(f"{name} must be a positive {kind}, got {value!r}")


def probability(config, name: str) -> None:
    value = getattr(config, name)
    if not is_number(value) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


def flags(config, *names: str) -> None:
    """Each field a real bool (a string 'no' or an int 1 is refused, not taken as true)."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")


def one_of(config, name: str, allowed: tuple) -> None:
    value = getattr(config, name)
    if isinstance(value, bool) or value not in allowed:
        raise ValueError(f"{name} must be {either(map(repr, allowed))}, got {value!r}")


def check_sizes(config, width_multiple: int) -> None:
    """What every family's config shares: positive sizes, a width the heads divide and the
    sin-cos positions can split (`width_multiple`: 4 for 2-D tables, 16 for 3-D), an MLP of at
    least one unit, a finite MLP ratio and a dropout probability."""
    positive(config, "depth", "hidden_size", "num_heads", "patch_size", "in_channels")
    positive(config, "mlp_ratio", number=True)
    probability(config, "class_dropout_prob")
    flags(config, "learn_sigma")
    D, heads = config.hidden_size, config.num_heads
    if D % heads or D % width_multiple:
        rule = (f"divisible by {heads} heads" if D % heads else
                f"a multiple of {width_multiple} for the sin-cos positions")
        raise ValueError(f"width {D} is not {rule}; allowed: multiples of "
                         f"{math.lcm(heads, width_multiple)} ({heads} heads, and "
                         f"{width_multiple} for the sin-cos positions); nearest valid: "
                         f"{either(nearest_multiples(D, heads, width_multiple))}")
    if int(D * config.mlp_ratio) < 1:
        raise ValueError(f"mlp_ratio {config.mlp_ratio} gives an MLP of int({D} × "
                         f"{config.mlp_ratio}) = 0 units; allowed: mlp_ratio >= {1 / D:.3g} "
                         f"for width {D}")


def latent_size(config) -> None:
    """input_size (the configured latent side) must be a positive multiple of the patch."""
    positive(config, "input_size")
    if config.input_size % config.patch_size:
        raise ValueError(f"input_size {config.input_size} is not a multiple of patch "
                         f"{config.patch_size}; nearest valid: "
                         f"{either(nearest_multiples(config.input_size, config.patch_size))}")


def window(value) -> tuple[int, int, int]:
    """A window (frames, rows, cols) in tokens: three positive ints."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ValueError(f"window must be three positive ints (frames, rows, cols), got "
                         f"{value!r}")
    window = tuple(value)
    if len(window) != 3 or not all(is_int(c) and c >= 1 for c in window):
        raise ValueError(f"window must be three positive ints (frames, rows, cols), got "
                         f"{value!r}")
    return window


def check_fields(config_class: type, fields, label: str) -> None:
    """ValueError naming the fields a config dataclass does not have, and those it has."""
    known = {f.name for f in dataclasses.fields(config_class)}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise ValueError(f"{label} has no option(s) {', '.join(unknown)}; "
                         f"allowed: {', '.join(sorted(known))}")


def check_device(device: str | torch.device, flag: str = "--device") -> torch.device:
    """`device` as a torch.device if it can run here: 'cpu', 'cuda' (the current GPU; under
    torchrun, LOCAL_RANK's) or 'cuda:N'. A one-line ValueError naming `flag` otherwise, never a
    silent fall back to the CPU."""
    text = str(device)
    if not re.fullmatch(r"cpu|cuda(:\d+)?", text):
        raise ValueError(f"{flag} {text!r} is not a device this command runs on; allowed: "
                         f"{', '.join(DEVICE_NAMES)} (nearest: cpu)")
    device = torch.device(text)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{flag} {text} was asked for but CUDA is not available here "
                             f"(torch.cuda.is_available() is False; torch "
                             f"{torch.__version__}, CUDA {torch.version.cuda or 'none'}); run "
                             f"on a machine with a GPU or give {flag} cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"{flag} {text}: this machine has {count} CUDA device"
                             f"{'s' if count != 1 else ''}; allowed: cuda:0 … cuda:{count - 1}")
    return device
