"""How each family's release samples, and the one place that turns a run's options (scheduler,
steps, guidance scale, guided channels; None: the family's) into checked settings, for
sampling, the attention analysis and the CLI alike. The null condition that guidance pairs with
the conditional rows is analysis.conditions'."""

import math
from typing import NamedTuple

SCHEDULERS = ("ddpm", "dpm", "flow")
GUIDANCE_CHANNELS = ("3", "all")
SCHEDULER_STEPS = {"ddpm": 250, "dpm": 20, "flow": 30}   # each release's step count
TRAIN_TIMESTEPS = 1000
FLOW_SHIFT = 1.0   # the released PT-DiT states none: diffusers' default, recorded in every row


class Recipe(NamedTuple):
    """How a family's release samples."""
    scheduler: str
    cfg_scale: float
    guidance_channels: str


FAMILY_RECIPES = {
    # DiT sample_ddp.py (its FID-50K: cfg 1.5, 250 IDDPM steps, guidance on 3 channels)
    "DiT": Recipe("ddpm", 1.5, "3"),
    # PixArt-alpha inference and PixArtAlphaPipeline: DPM-Solver, 20 steps, guidance 4.5
    "PixArt": Recipe("dpm", 4.5, "all"),
    # the released PT-DiT: rectified flow, 30 steps, cfg 4.0 (docs/ptdit_release.md)
    "PT-DiT": Recipe("flow", 4.0, "all"),
}


class Settings(NamedTuple):
    """A run's sampler settings, resolved and checked."""
    scheduler: str
    steps: int
    cfg_scale: float
    guidance_channels: str

    @property
    def guided(self) -> bool:
        """Whether each forward holds the null rows too (cfg_scale != 1)."""
        return self.cfg_scale != 1


def resolve(family: str, scheduler: str | None = None, steps: int | None = None,
            cfg_scale: float | None = None, guidance_channels: str | None = None) -> Settings:
    """The settings of a run of a `family` model: each option given, else the family's
    release's (FAMILY_RECIPES, SCHEDULER_STEPS); ValueError naming a bad one."""
    if family not in FAMILY_RECIPES:
        raise ValueError(f"no sampling recipe for family {family!r}; allowed: "
                         f"{', '.join(FAMILY_RECIPES)}")
    recipe = FAMILY_RECIPES[family]
    scheduler = scheduler or recipe.scheduler
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
    steps = SCHEDULER_STEPS[scheduler] if steps is None else steps
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be a positive int (sampler steps), got {steps!r}")
    cfg_scale = recipe.cfg_scale if cfg_scale is None else float(cfg_scale)
    if not math.isfinite(cfg_scale):
        raise ValueError(f"cfg_scale {cfg_scale} is not finite; allowed: a finite number (1: "
                         f"unguided; the family's: {recipe.cfg_scale})")
    guidance_channels = guidance_channels or recipe.guidance_channels
    if guidance_channels not in GUIDANCE_CHANNELS:
        raise ValueError(f"guidance_channels {guidance_channels!r}; allowed: "
                         f"{', '.join(GUIDANCE_CHANNELS)}")
    return Settings(scheduler, steps, cfg_scale, guidance_channels)
