"""Model calls for the attention analysis: one forward `model(x, **kwargs)` with the denoising
step it belongs to (`ModelCall`), and clean latents noised to chosen timesteps the way each
family's training noises them (`noised_inputs`).

    calls = noised_inputs(x0, [999, 500, 100], cond, uncond, schedule=schedule_of(model))
"""

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .offline import go_offline

SCHEDULES = ("ddpm", "flow")


@dataclass(frozen=True)
class ModelCall:
    """One forward call `model(x, **kwargs)`: x (B, C, H, W) or (B, C, F, H, W), the other
    arguments (ours: t and the condition; diffusers: timestep, encoder_hidden_states, …), the
    denoising step it belongs to and its timestep; `cfg`: the batch is the conditional half then
    the unconditional half."""
    x: Tensor
    kwargs: dict = field(default_factory=dict)
    step: int = 0
    timestep: float = math.nan
    cfg: bool = False

    def branches(self) -> list[tuple[str, slice]]:
        """(label, rows) of each guidance branch in the batch."""
        B = self.x.shape[0]
        if not self.cfg:
            return [("cond", slice(0, B))]
        if B % 2:
            raise ValueError(f"a guidance batch holds the conditional half then the "
                             f"unconditional half: an even batch, got {B}")
        return [("cond", slice(0, B // 2)), ("uncond", slice(B // 2, B))]


def schedule_of(model: nn.Module) -> str:
    """The noising `noised_inputs` should use for a model: 'flow' for PT-DiT (rectified flow,
    t = s·1000), 'ddpm' for DiT and PixArt (ours or diffusers')."""
    config = getattr(model, "config", None)
    return "flow" if getattr(config, "family", None) == "PT-DiT" else "ddpm"


def noised_inputs(latents: Tensor, timesteps: Iterable[float], cond: dict,
                  uncond: dict | None = None, *, schedule: str = "ddpm",
                  timestep_arg: str = "t", generator: torch.Generator | None = None,
                  noise: Tensor | None = None) -> list[ModelCall]:
    """Model calls for clean latents x0 (B, C, H, W) / (B, C, F, H, W) noised to each timestep,
    in the order given (step i is the i-th timestep), with one noise draw ε ~ N(0, 1) shared by
    all of them:
    - 'ddpm': diffusers' DDPMScheduler (1000 steps, linear betas 1e-4…0.02, DiT's and
      PixArt's schedule) `add_noise`, integer t in 0…999;
    - 'flow': x_t = (1 - s)·x0 + s·ε with s = t / 1000, t in 0…1000 (PT-DiT).
    `cond` holds the forward's condition arguments (ours: {"y": labels} or {"text": …,
    "text_mask": …}; diffusers: {"encoder_hidden_states": …} or {"class_labels": …}); with
    `uncond` (the same keys: null labels, empty-prompt captions) each call is a guidance batch
    [cond; uncond] of 2B samples. Timesteps go in as `timestep_arg` ('t' for ours, 'timestep'
    for diffusers), a (B,) float tensor. `noise`: the draw ε itself (the latents' shape), else
    drawn from `generator`."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown noise schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if uncond is not None and set(uncond) != set(cond):
        raise ValueError(f"uncond must hold the same arguments as cond ({sorted(cond)}), got "
                         f"{sorted(uncond)}")
    if noise is None:
        noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
    elif noise.shape != latents.shape:
        raise ValueError(f"noise {tuple(noise.shape)} must have the latents' shape "
                         f"{tuple(latents.shape)}")
    noise = noise.to(latents.device, latents.dtype)
    t_dtype = torch.float64 if latents.dtype == torch.float64 else torch.float32
    kwargs = dict(cond) if uncond is None else {k: _stack(cond[k], uncond[k]) for k in cond}
    calls = []
    for step, t in enumerate(timesteps):
        t = float(t)
        x_t = _ddpm(latents, noise, t) if schedule == "ddpm" else _flow(latents, noise, t)
        if uncond is not None:
            x_t = torch.cat([x_t, x_t])
        t_in = torch.full((len(x_t),), t, dtype=t_dtype, device=latents.device)
        calls.append(ModelCall(x_t, {**kwargs, timestep_arg: t_in}, step, t, uncond is not None))
    return calls


def _stack(cond, uncond):
    return torch.cat([cond, uncond]) if isinstance(cond, Tensor) else cond


def _ddpm(x0: Tensor, noise: Tensor, t: float) -> Tensor:
    go_offline()
    from diffusers import DDPMScheduler

    if t != int(t) or not 0 <= t <= 999:
        raise ValueError(f"DDPM timesteps are integers in 0…999, got {t}; nearest valid: "
                         f"{min(999, max(0, round(t)))}")
    scheduler = DDPMScheduler(num_train_timesteps=1000)
    return scheduler.add_noise(x0, noise, torch.full((len(x0),), int(t), dtype=torch.long))


def _flow(x0: Tensor, noise: Tensor, t: float) -> Tensor:
    if not 0 <= t <= 1000:
        raise ValueError(f"flow timesteps lie in 0…1000 (t = s·1000), got {t}; nearest valid: "
                         f"{min(1000.0, max(0.0, t))}")
    s = t / 1000
    return (1 - s) * x0 + s * noise
