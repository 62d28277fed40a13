"""Where the analysed attention comes from: the model's own sampling trajectory, or real images
noised to the sampler's timesteps. Both reduce the maps on the fly (analysis.attention_maps) and
return (rows, kept maps) with the same columns, so the two can be set side by side.

    rows, maps = analyse_trajectory(model, class_conditions("207"), resolution=256,
                                    steps=25, analyse_steps=[0, 12, 24])
    rows, maps = analyse_images(model, class_conditions("207"), "photos/", resolution=256,
                                vae=load_vae("sd-vae-ft-ema"), steps=25,
                                analyse_steps=[0, 12, 24])

- Trajectory: the quality sampler's denoising loop (analysis.sampling.denoise: the family's
  scheduler, steps, guidance and per-sample seeds) from seeded noise; the maps are those of the
  sampler's own forwards at the analysed steps; the run stops after the last of them.
- Images: the first `samples` images of a folder or an ADM-style .npz (analysis.images), each
  resized so that its shorter side is `resolution` px (bicubic, antialiased) and centre-cropped
  to a square, scaled to [-1, 1], then encoded by the VAE (the mean of its latent
  distribution, times the scaling factor; shift subtracted first where the VAE has one) or, for
  a model with 3 input channels and no VAE, taken as they are (pixel space: rows record
  resolution = pixels of the model's input). Each is noised to the timesteps the sampler visits
  at the analysed steps — DDPM's q(x_t | x_0) for DiT and PixArt-α, x_t = (1 - σ)·x_0 + σ·ε with
  t = 1000·σ for PT-DiT — with its own seeded noise (sample i's generator, as the sampler's),
  and run through the model under the same guidance as the sampler (both branches).
"""

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ptdit.models.inputs import VAE_SPATIAL

from . import recipes, sampling
from .capture import Capture, analyse, describe
from .conditions import check_conditions, class_conditions
from .images import count_images, read_images
from .model_calls import ModelCall, noised_inputs, schedule_of
from .window_similarity import to_rows


def _recipe(model: nn.Module, scheduler: str | None, steps: int | None, cfg_scale: float | None,
            samples: int) -> recipes.Settings:
    """The run's sampler settings (analysis.recipes.resolve), `samples` checked."""
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    settings = recipes.resolve(model.config.family, scheduler, steps, cfg_scale)
    sampling.make_scheduler(settings.scheduler).set_timesteps(settings.steps)   # fails here
    return settings


def _steps(analyse_steps: Iterable[int] | None, steps: int) -> list[int]:
    if analyse_steps is None:
        return list(range(steps))
    wanted = sorted(set(analyse_steps))
    bad = [s for s in wanted if not 0 <= s < steps]
    if bad:
        raise ValueError(f"steps to analyse {bad} lie outside the sampler's steps 0…{steps - 1}")
    return wanted


class _TrajectoryDone(Exception):
    """Ends a sampling run once the last analysed step has been reduced."""


def _conditions(conditions):
    return class_conditions(conditions) if isinstance(conditions, (str, list, tuple)) \
        else conditions


def analyse_trajectory(model: nn.Module, conditions, *, resolution: int, frames: int | None = None,
                       scheduler: str | None = None, steps: int | None = None,
                       analyse_steps: Iterable[int] | None = None, cfg_scale: float | None = None,
                       guidance_channels: str | None = None, seed: int = 0, samples: int = 1,
                       meta: dict | None = None, factor: int = VAE_SPATIAL,
                       **options) -> tuple[list[dict], list]:
    """Window statistics of `model`'s self-attention along a real sampling trajectory: the
    quality sampler's denoising loop (analysis.sampling.denoise: its scheduler, steps, guidance
    and per-sample seeds for samples 0…samples-1) from noise of the latent shape of
    `resolution` px (`factor` pixels per latent pixel: 8, an SD VAE's, or 1 for a pixel-space
    model; `frames` latent frames), each forward of a step in
    `analyse_steps` (default: every step) reduced as it runs — the maps are the ones the sampler
    itself computes; the run stops after the last analysed step. Under guidance the batch holds
    both branches. `conditions`: ClassLabels /
    Prompts (analysis.conditions) or a class-label spec. `options` go to Capture (windows,
    layers, heads, keep_maps, max_pairs, max_distance, edge_margin, headwise). Returns (rows,
    kept maps)."""
    settings = _recipe(model, scheduler, steps, cfg_scale, samples)
    scheduler, steps, cfg_scale, guidance_channels = recipes.resolve(
        model.config.family, settings.scheduler, settings.steps, settings.cfg_scale,
        guidance_channels)
    guided = settings.guided
    wanted = set(_steps(analyse_steps, steps))
    conditions = _conditions(conditions)
    check_conditions(model, conditions, guided)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} px is not a multiple of the VAE factor "
                         f"{factor}")
    side = resolution // factor
    shape = (model.in_channels, *([frames] if frames else []), side, side)
    parameter = next(model.parameters())
    generators, noise, condition = sampling.prepare_batch(
        model, conditions, list(range(samples)), shape=shape, size=(resolution, resolution),
        seed=seed, guided=guided, device=parameter.device, dtype=parameter.dtype)
    first: list[ModelCall] = []
    model.eval()
    with Capture(model, **options) as capture:
        def on_step(step: int, t: Tensor, model_input: Tensor, kwargs: dict) -> None:
            if step > max(wanted):         # the rest of the trajectory changes no map
                raise _TrajectoryDone
            call = ModelCall(model_input, kwargs, step, float(t), cfg=guided)
            first[:] = first or [call]
            # a step not analysed is attributed to no call: its maps are not reduced
            capture.begin(call if step in wanted else None)
        try:
            with torch.no_grad():
                sampling.denoise(model, scheduler, steps, noise, condition,
                                 cfg_scale=cfg_scale, guidance_channels=guidance_channels,
                                 generators=generators, on_step=on_step)
        except _TrajectoryDone:
            pass
    described = {**describe(model, first[0]), "source": "sampler trajectory",
                 "scheduler": scheduler, "steps": steps, "cfg_scale": cfg_scale, "seed": seed,
                 **(meta or {})}
    return to_rows(capture.stats, described), capture.maps


#################################################################################
#                                 Real images                                   #
#################################################################################

def _square(images: Tensor, side: int) -> Tensor:
    """uint8 (B, 3, H, W) -> float (B, 3, side, side) in [-1, 1]: shorter side resized to
    `side` (bicubic, antialiased), centre crop."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    images = TF.resize(images, side, InterpolationMode.BICUBIC, antialias=True)
    images = TF.center_crop(images, [side, side])
    return images.float() / 127.5 - 1


def clean_latents(images, count: int, resolution: int, vae=None, in_channels: int = 4,
                  device="cpu", dtype: torch.dtype = torch.float32) -> tuple[Tensor, int, str]:
    """The first `count` images of a folder / .npz (analysis.images) as clean model inputs:
    (latents (count, C, h, w), pixels per input pixel, how they were made) — encoded by `vae`
    (an AutoencoderKL), or in pixel space without one (3-channel models; a 1-channel model
    gets the mean of the image's channels)."""
    available = count_images(images)
    if count > available:
        raise ValueError(f"{count} images asked for, but {images} holds {available}")
    batches, taken = [], 0
    for batch in read_images(images, batch_size=count, rank=0, world_size=1):
        batches.append(batch[:count - taken])
        taken += len(batches[-1])
        if taken == count:
            break
    pixels = _square(torch.cat(batches), resolution)
    source = f"{count} image(s) of {images}"
    if vae is None:
        if in_channels == 1:      # a greyscale pixel-space model: the channels' mean
            return pixels.mean(1, keepdim=True).to(device, dtype), 1, f"{source}, grey pixels"
        if in_channels != 3:
            raise ValueError(f"the model takes {in_channels}-channel latents: give a VAE to "
                             "encode the images (--vae), or use a 1- or 3-channel (pixel-space) "
                             "model")
        return pixels.to(device, dtype), 1, f"{source}, pixel space"
    factor = sampling.vae_factor(vae)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} px is not a multiple of the VAE factor "
                         f"{factor}")
    if vae.config.latent_channels != in_channels:
        raise ValueError(f"the VAE makes {vae.config.latent_channels}-channel latents; the "
                         f"model takes {in_channels}")
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    with torch.no_grad():
        mean = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean
    name = str(getattr(vae.config, "_name_or_path", "") or "a VAE")
    return ((mean - shift) * scale).to(device, dtype), factor, f"{source}, encoded by {name}"


def analyse_images(model: nn.Module, conditions, images, *, resolution: int, vae=None,
                   scheduler: str | None = None, steps: int | None = None,
                   analyse_steps: Iterable[int] | None = None, cfg_scale: float | None = None,
                   seed: int = 0, samples: int = 1, meta: dict | None = None,
                   **options) -> tuple[list[dict], list]:
    """Window statistics of `model`'s self-attention on real images noised to the timesteps
    the sampler (`scheduler`, `steps`: the family's by default) visits at `analyse_steps`
    (default: all), under its guidance: see the module docstring. `images`: a folder or an
    .npz (the first `samples` images); `vae`: an AutoencoderKL (None: pixel space).
    `conditions` and `options` as for analyse_trajectory. Returns (rows, kept maps)."""
    scheduler, steps, cfg_scale, _ = settings = _recipe(model, scheduler, steps, cfg_scale,
                                                        samples)
    guided = settings.guided
    wanted = _steps(analyse_steps, steps)
    conditions = _conditions(conditions)
    check_conditions(model, conditions, guided)
    parameter = next(model.parameters())
    x0, factor, source = clean_latents(images, samples, resolution, vae, model.in_channels,
                                       parameter.device, sampling.latent_dtype(parameter.dtype))
    timing = sampling.make_scheduler(scheduler)
    timing.set_timesteps(steps)
    timesteps = [float(timing.timesteps[k]) for k in wanted]
    _, noise, condition = sampling.prepare_batch(
        model, conditions, list(range(samples)), shape=tuple(x0.shape[1:]),
        size=(resolution, resolution), seed=seed, guided=guided, device=parameter.device,
        dtype=parameter.dtype)
    cond = {k: v[:samples] for k, v in condition.items()}
    uncond = {k: v[samples:] for k, v in condition.items()} if guided else None
    calls = noised_inputs(x0, timesteps, cond, uncond, schedule=schedule_of(model),
                          noise=noise.to(x0))
    calls = [ModelCall(c.x.to(parameter.dtype), c.kwargs, wanted[k], c.timestep, c.cfg)
             for k, c in enumerate(calls)]
    model.eval()
    described = {"source": f"noised images: {source}", "scheduler": scheduler, "steps": steps,
                 "cfg_scale": cfg_scale, "seed": seed, **(meta or {})}
    return analyse(model, calls, meta=described, factor=factor, **options)


__all__ = ["analyse_images", "analyse_trajectory", "clean_latents"]
