"""The exact gate's table: parameters and MACs per category of every named model at the sizes
its papers report, from the closed form (ptdit.complexity), plus a few small cases counted on
the built model by FlopCounterMode, so that a model change the closed form does not follow
moves the table too.

    table(CASES)   # {"PT-DiT/XL @1024px": {"tokens": 4096, "params": …, "linear_mlp_macs": …}}
    gate.diff(gate.read_json(BASELINE)["cases"], table(BASELINE_CASES))   # [] if nothing moved
"""

from pathlib import Path
from typing import NamedTuple

import ptdit
from bench.flops import count_torch
from ptdit import Workload, complexity, example_inputs

BASELINE = Path(__file__).with_name("baselines") / "exact.json"


class Case(NamedTuple):
    """A named model at `resolution` px, `frames` latent frames (None: an image), with config
    `overrides` as sorted (field, value) pairs."""
    model: str
    resolution: int
    frames: int | None = None
    overrides: tuple[tuple[str, object], ...] = ()

    @property
    def key(self) -> str:
        """How the table and its diff name the case: 'PT-DiT/XL @512px, 48 latent frames'."""
        key = f"{self.model} @{self.resolution}px"
        if self.frames is not None:
            key += f", {self.frames} latent frames"
        if self.overrides:
            key += " (" + ", ".join(f"{k}={v}" for k, v in self.overrides) + ")"
        return key

    def workload(self) -> Workload:
        return Workload(self.model, self.resolution, self.frames, overrides=dict(self.overrides))


def _sizes() -> list[Case]:
    """The papers' sizes of every named model (bench/published.csv, docs/paper.md)."""
    cases = []
    for name in ptdit.list_models():
        if name.startswith("DiT-"):              # DiT Table 4 (256 px) and XL/2 at 512 px
            resolutions = (256, 512)
        elif name == "PixArt-XL/2":              # PixArt-α 256-1024; PT-DiT Fig. 2 to 2048
            resolutions = (256, 512, 1024, 2048)
        elif name == "PT-DiT/S-Class":           # the ImageNet ablations (256), and 512
            resolutions = (256, 512)
        else:                                    # PT-DiT Figs. 2, 8; the release at 1024
            resolutions = (256, 512, 1024, 2048)
        cases += [Case(name, r) for r in resolutions]
    for name in ("PT-DiT/XL", "PT-DiT/H"):       # video, 48 latent frames (Fig. 9 left)
        cases += [Case(name, r, 48) for r in (256, 512, 1024)]
    # Qihoo-T2V is PT-DiT/XL: T2V training at 256 and 512 px with 96 frames (24 latent frames at
    # the 4x temporal VAE); T2MV's 512x512x24 multi-view videos at 24 latent frames.
    cases += [Case("PT-DiT/XL", r, 24) for r in (256, 512)]
    return cases


CASES = _sizes()
# Counted by FlopCounterMode on the built model too: one per family and the video path, small
# enough for every `make test` (a few seconds, most of it the counter's first call).
COUNTED = [
    Case("DiT-S/8", 256),
    Case("PixArt-XL/2", 256, overrides=(("depth", 2),)),
    Case("PT-DiT/S-Class", 256),
    Case("PT-DiT/XL", 256, 8, overrides=(("depth", 2),)),
]
BASELINE_CASES = list(dict.fromkeys(CASES + COUNTED))    # the baseline's rows


def _fields(work: Workload, macs: dict[str, int], params: tuple[int, int]) -> dict:
    return {"tokens": work.tokens, "window": work.describe()["window"],
            "params": params[0], "params_trainable": params[1],
            **{f"{category}_macs": n for category, n in macs.items()}}


def closed_form(work: Workload) -> dict:
    """The case's fields by the closed form: tokens, window, parameters, MACs per category."""
    return _fields(work, complexity.macs(work), complexity.parameters(work))


def counted(work: Workload) -> dict:
    """The same fields counted on the model built on meta (FlopCounterMode, model.parameters)."""
    model = ptdit.build(work.config, device="meta")
    per_category, _ = count_torch(model, example_inputs(model, work))
    other = per_category.pop("other")
    if other:
        raise AssertionError(f"{work.name}: {other} MACs outside the known categories")
    params = (sum(p.numel() for p in model.parameters()),
              sum(p.numel() for p in model.parameters() if p.requires_grad))
    return _fields(work, per_category, params)


def table(cases: list[Case], count=closed_form) -> dict[str, dict]:
    """Case key -> fields, by `count` (closed_form or counted)."""
    return {case.key: count(case.workload()) for case in cases}


def document(cases: dict[str, dict]) -> dict:
    """The baseline file's content."""
    return {"about": "Parameters and MACs per category of every named model at its papers' "
                     "sizes (ptdit.complexity closed form); bench/regression/test_exact.py "
                     "fails on any change. Regenerate deliberately with `make baseline` "
                     "(docs/regression.md).",
            "cases": cases}
