"""Sampling: images (and video frames) from any ptdit model with diffusers' schedulers, guided,
decoded by a real VAE, written as PNGs (and ADM's .npz), resumable, on one or many processes.

    from analysis.sampling import sample, load_vae
    from analysis.conditions import class_conditions
    row = sample(model, vae=load_vae("sd-vae-ft-ema"), conditions=class_conditions("0-999"),
                 num=50_000, out="samples/dit-xl-2", resolution=256, write_npz=True)

Samplers (`scheduler=`; the default follows the model family, as each release samples):
- "ddpm"  DiT: IDDPM-respaced DDPM, 250 steps, linear betas 1e-4..0.02 over 1000, learned
          variance. diffusers' DDPMScheduler(variance_type="learned_range", clip_sample=False,
          timestep_spacing="linspace"): linspace spacing keeps timesteps round(i·999/(S-1)),
          IDDPM's space_timesteps("S"), and step() respaces beta_t = 1 - ᾱ_t/ᾱ_prev from the
          kept timesteps; it gets eps and the variance channels v (log σ² = ½(v+1)·log β_t +
          ½(1-v)·log β̃_t, β̃ the posterior variance). DiTPipeline drops the variance channels
          (its schedulers take eps only); here they are used, as DiT's own sampler does.
- "dpm"   PixArt-α: DPM-Solver++ (2M, midpoint, lower order at the end), 20 steps, linear betas,
          linspace spacing, as PixArt-XL-2's diffusers scheduler config; it gets eps only
          (the first half of the channels), as PixArtAlphaPipeline feeds it.
- "flow"  PT-DiT: rectified-flow Euler, 30 steps, FlowMatchEulerDiscreteScheduler with
          shift 1.0 (official_ptdit.md names no shift), sigma 1 -> 0; the model gets
          t = 1000·sigma and its first half of channels is the velocity, x_next = x +
          (sigma_next - sigma)·v, i.e. diffusers' convention v = noise - x0 (assumed: the
          reference states no sign; a model trained on x0 - noise would need -v).
The same timestep goes to every row of a forward (PT-DiT's release mixes samples' timesteps
otherwise). All three schedulers start from N(0, I) and scale no model input.

Guidance: with cfg_scale != 1 each forward holds the B conditional rows, then the B null rows
(analysis.conditions: null class, learned null caption or empty prompt); the prediction
channels are guided, pred = null + s·(cond - null), and the variance channels come from the
conditional rows. guidance_channels "3" guides the first 3 latent channels only, as DiT's
forward_with_cfg does "for exact reproducibility" (DiT's default); "all" guides every latent
channel (the others' default).

Seeds: sample i has its own generator, torch.Generator().manual_seed(sample_seed(seed, i));
it draws the initial noise (float32, (1, C, [F,] h, w)) and then, for ddpm, each step's
variance noise (diffusers' randn_tensor with a list of per-sample generators). So a sample's
image does not depend on the shard, batch composition or restart that produced it: the same
batch composition gives the same bits, another one differs by float rounding only (within
one 8-bit level in the tests).

Latents: (B, C, H/f, W/f) for images, (B, C, F, H/f, W/f) for video (frames = latent frames),
f = 2^(len(vae block_out_channels) - 1) (8 for the SD VAE), kept in float32 (float64 for
float64 models) while the model runs in its dtype; decoded (frame by frame for video, a 2-D
VAE: temporal factor 1) from latents / scaling_factor (+ shift_factor). Pixels: see
analysis.sample_writer. Many processes: under torchrun (WORLD_SIZE > 1) rank r takes the
indices start + k with k % world == r, writes its own PNGs; rank 0 writes the .npz and the
run's row after a barrier.
"""

import dataclasses
import hashlib
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.rows import device_label, provenance, status_of
from bench.store import Store
from ptdit.attention import attention_modules
from ptdit.checks import dtype_name, either, model_dtype, nearest_multiples

from . import sample_writer
from .conditions import (ClassLabels, Prompts, check_conditions, class_conditions,
                         condition_inputs, encode_prompts, prompt_embeddings)
from .offline import VAE, go_offline

__all__ = ["ClassLabels", "Prompts", "class_conditions", "decode", "denoise", "encode_prompts",
           "guide", "load_vae", "make_scheduler", "prompt_embeddings", "sample", "sample_seed"]

SCHEDULERS = ("ddpm", "dpm", "flow")
GUIDANCE_CHANNELS = ("3", "all")
SCHEDULER_STEPS = {"ddpm": 250, "dpm": 20, "flow": 30}   # each release's step count
TRAIN_TIMESTEPS = 1000
FLOW_SHIFT = 1.0   # official_ptdit.md states none: diffusers' default, recorded in every row


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
    # the released PT-DiT: rectified flow, 30 steps, cfg 4.0 (official_ptdit.md)
    "PT-DiT": Recipe("flow", 4.0, "all"),
}

OnStep = Callable[[int, Tensor, Tensor, dict], None]


#################################################################################
#                                  Schedulers                                   #
#################################################################################

def make_scheduler(name: str, learned_sigma: bool = True):
    """A fresh diffusers scheduler for `name` (see the module docstring)."""
    go_offline()
    from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, \
        FlowMatchEulerDiscreteScheduler
    betas = dict(num_train_timesteps=TRAIN_TIMESTEPS, beta_start=1e-4, beta_end=0.02,
                 beta_schedule="linear")
    if name == "ddpm":   # DiT's create_diffusion: learned range, else IDDPM's fixed large
        return DDPMScheduler(**betas, variance_type="learned_range" if learned_sigma
                             else "fixed_large", clip_sample=False, prediction_type="epsilon",
                             timestep_spacing="linspace")
    if name == "dpm":    # PixArt-XL-2's scheduler_config.json
        return DPMSolverMultistepScheduler(**betas, algorithm_type="dpmsolver++", solver_order=2,
                                           solver_type="midpoint", lower_order_final=True,
                                           prediction_type="epsilon", timestep_spacing="linspace")
    if name == "flow":
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=TRAIN_TIMESTEPS,
                                               shift=FLOW_SHIFT)
    raise ValueError(f"unknown scheduler {name!r}; allowed: {', '.join(SCHEDULERS)}")


def guide(out: Tensor, cfg_scale: float, channels: int) -> Tensor:
    """(2B, C_out, ...) conditional rows then null rows -> (B, C_out, ...): the first `channels`
    guided, null + s·(cond - null), the rest the conditional rows'."""
    cond, null = out.chunk(2)
    guided = null[:, :channels] + cfg_scale * (cond[:, :channels] - null[:, :channels])
    return torch.cat([guided, cond[:, channels:]], dim=1)


@torch.no_grad()
def denoise(model: nn.Module, scheduler_name: str, steps: int, noise: Tensor,
            condition: dict[str, Tensor], *, cfg_scale: float, guidance_channels: str,
            generators: list[torch.Generator], on_step: OnStep | None = None) -> Tensor:
    """Runs the sampler from `noise` (B, C, [F,] h, w) to clean latents of the same shape.
    `condition` holds the model's condition arguments, conditional rows then (guided) null
    rows; each step calls on_step(step, t, model_input, model_kwargs) with exactly what
    model(model_input, **model_kwargs) then gets."""
    C = model.in_channels
    learned_sigma = model.out_channels == 2 * C
    scheduler = make_scheduler(scheduler_name, learned_sigma)
    scheduler.set_timesteps(steps, device=noise.device)
    guided = cfg_scale != 1
    channels = 3 if guidance_channels == "3" else C
    dtype = next(model.parameters()).dtype
    step_kwargs = {"generator": generators} if scheduler_name == "ddpm" else {}
    x = noise
    for k, t in enumerate(scheduler.timesteps):
        model_input = (torch.cat([x, x]) if guided else x).to(dtype)
        kwargs = {"t": t.expand(len(model_input)), **condition}
        if on_step is not None:
            on_step(k, t, model_input, kwargs)
        out = model(model_input, **kwargs).to(x.dtype)                  # (2B, C_out, ...)
        if guided:
            out = guide(out, cfg_scale, channels)                       # (B, C_out, ...)
        if scheduler_name != "ddpm" or not learned_sigma:
            out = out[:, :C]       # eps (dpm) or velocity (flow); ddpm takes eps + variance
        x = scheduler.step(out, t, x, **step_kwargs).prev_sample
    return x


#################################################################################
#                                    Seeds                                      #
#################################################################################

def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample `index` in a run seeded `seed`: the first 63 bits of
    sha256("{seed}/{index}"), so neighbouring indices get unrelated streams."""
    digest = hashlib.sha256(f"{seed}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def sample_generators(seed: int, indices: list[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


def initial_noise(generators: list[torch.Generator], shape: tuple[int, ...]) -> Tensor:
    """(B, *shape) float32 N(0, 1) on the CPU, row b drawn from generators[b]."""
    return torch.cat([torch.randn((1, *shape), generator=g) for g in generators])


#################################################################################
#                                     VAE                                       #
#################################################################################

def load_vae(folder: str | os.PathLike | None):
    """A diffusers AutoencoderKL from a local folder (None: $PTDIT_VAE), offline, in eval mode.
    FileNotFoundError (analysis.offline.VAE's message) when no folder is there, ValueError when
    the folder is not an AutoencoderKL."""
    path = VAE.path(folder)
    config_file = path / "config.json"
    expected = f"expected {VAE.expected}"
    if not config_file.is_file():
        raise ValueError(f"VAE folder {str(path)!r} has no config.json: not a diffusers "
                         f"AutoencoderKL folder; {expected}")
    try:
        class_name = json.loads(config_file.read_text()).get("_class_name")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"VAE folder {str(path)!r}: config.json is not a JSON object ({err}); "
                         f"{expected}") from None
    if class_name != "AutoencoderKL":
        raise ValueError(f"VAE folder {str(path)!r} holds a {class_name!r}, not an "
                         f"AutoencoderKL; {expected}")
    if not any(path.glob("diffusion_pytorch_model*")):
        raise ValueError(f"VAE folder {str(path)!r} has config.json but no weights "
                         f"(diffusion_pytorch_model.*); {expected}")
    go_offline()
    from diffusers import AutoencoderKL
    # low_cpu_mem_usage=False: the same load without `accelerate` (and without its warning)
    return AutoencoderKL.from_pretrained(path, local_files_only=True,
                                         low_cpu_mem_usage=False).eval()


def vae_factor(vae) -> int:
    """Pixels per latent pixel: one halving per encoder block after the first."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode(vae, latents: Tensor) -> Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W); video (B, C, F, h, w) -> (B, F, 3, H, W),
    decoded frame by frame; values nominally in [-1, 1]."""
    scale, shift = vae.config.scaling_factor, getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(vae.dtype) / scale + shift
    if z.dim() == 4:
        return vae.decode(z).sample
    return torch.stack([vae.decode(z[:, :, f]).sample for f in range(z.shape[2])], dim=1)


#################################################################################
#                                   Sampling                                    #
#################################################################################

def _pixels(resolution: int | tuple[int, int]) -> tuple[int, int]:
    pair = (resolution, resolution) if isinstance(resolution, int) else tuple(resolution)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"resolution must be a positive int or (height, width), got "
                         f"{resolution!r}")
    return pair


def latent_size(model: nn.Module, vae, resolution, frames: int | None) -> tuple[int, ...]:
    """The latent shape of one sample (C, [F,] h, w); ValueError naming the nearest valid
    resolution when the VAE factor, patch or PT-DiT's windows do not divide it."""
    config, factor = model.config, vae_factor(vae)
    if vae.config.latent_channels != model.in_channels:
        raise ValueError(f"the VAE makes {vae.config.latent_channels}-channel latents; the "
                         f"model takes {model.in_channels}")
    if frames is not None and (not isinstance(frames, int) or frames < 1):
        raise ValueError(f"frames must be a positive int (latent frames) or None, got {frames!r}")
    multiple, unit = (config.grid_multiple(frames or 1) if hasattr(config, "grid_multiple")
                      else ((1, 1, 1), "window"))   # PT-DiT's windows must tile the grid
    if frames is not None and frames % multiple[0]:
        raise ValueError(f"{frames} latent frames: the model's temporal window takes "
                         f"multiples of {multiple[0]}; nearest valid: "
                         f"{either(nearest_multiples(frames, multiple[0]))}")
    dims = []
    for axis, px, m in zip(("height", "width"), _pixels(resolution), multiple[1:]):
        step = factor * config.patch_size * m
        if px % step:
            windows = f" × {unit} {m}" if m > 1 else ""
            raise ValueError(
                f"resolution {axis} {px} px: VAE factor {factor} × patch {config.patch_size}"
                f"{windows} needs multiples of {step} px; nearest valid: "
                f"{either(nearest_multiples(px, step))} px")
        dims.append(px // factor)
    return (model.in_channels, *([frames] if frames is not None else []), *dims)


def _distributed(device) -> tuple[int, int, bool, torch.device]:
    """(rank, world size, whether this call started the process group, this rank's device);
    a process group is started when torchrun's WORLD_SIZE > 1 and none is running."""
    device = torch.device(device)
    started = False
    if not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        started = True
    if not dist.is_initialized():
        return 0, 1, False, device
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return dist.get_rank(), dist.get_world_size(), started, device


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _backend(model: nn.Module) -> str:
    return ",".join(sorted({m.backend for m in attention_modules(model).values()})) or "none"


def _totals(generated: int, skipped: int, seconds: float, device: torch.device
            ) -> tuple[int, int, float]:
    """Images made and skipped summed over ranks, the slowest rank's seconds."""
    if not dist.is_initialized():
        return generated, skipped, seconds
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    counts = torch.tensor([generated, skipped], dtype=torch.float64, device=on)
    slowest = torch.tensor([seconds], dtype=torch.float64, device=on)
    dist.all_reduce(counts)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return int(counts[0]), int(counts[1]), float(slowest)


def _conditions(conditions) -> ClassLabels | Prompts:
    if isinstance(conditions, (ClassLabels, Prompts)):
        return conditions
    if isinstance(conditions, (str, list, tuple, Tensor)):
        return class_conditions(conditions)
    raise ValueError(f"conditions must be ClassLabels, Prompts or a class label spec, got "
                     f"{type(conditions).__name__}")


def sample(model: nn.Module, *, vae, conditions, num: int, out: str | os.PathLike,
           resolution: int | tuple[int, int], scheduler: str | None = None,
           steps: int | None = None, cfg_scale: float | None = None,
           guidance_channels: str | None = None, seed: int = 0, start: int = 0,
           batch_size: int = 16, frames: int | None = None, device="cpu",
           dtype: torch.dtype | str = torch.float32, write_npz: bool = False,
           on_step: OnStep | None = None, store: Store | str | os.PathLike | None = None,
           checkpoint: str | os.PathLike | None = None, progress: bool = True) -> dict:
    """Samples indices start..start+num-1 into `out` as PNGs, skipping finished ones; returns
    the run's row (also appended to `store`, default out/samples.jsonl, by rank 0; a failed
    run appends its row with the error as status, then raises).

    model: a ptdit model, moved to `device` and cast to `dtype` in place, run in eval mode.
    vae: an AutoencoderKL, or its folder (load_vae). conditions: ClassLabels / Prompts
    (analysis.conditions), or a class label spec ("0-999"); sample i takes condition i % N.
    scheduler / steps / cfg_scale / guidance_channels: default the family's (FAMILY_RECIPES,
    SCHEDULER_STEPS); cfg_scale 1 runs unguided. resolution: pixels, a side or (height,
    width); frames: latent frames for video (None: images). batch_size: samples per forward
    (twice the rows when guided). checkpoint: the model's file, recorded with its sha256
    ("untrained" if None). on_step(step, t, model_input, model_kwargs): see denoise.
    write_npz: rank 0 writes out/samples.npz from all the PNGs at the end."""
    family = model.config.family
    recipe = FAMILY_RECIPES[family]
    scheduler = scheduler or recipe.scheduler
    if scheduler not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {scheduler!r}; allowed: {', '.join(SCHEDULERS)}")
    steps = SCHEDULER_STEPS[scheduler] if steps is None else steps
    cfg_scale = recipe.cfg_scale if cfg_scale is None else float(cfg_scale)
    guidance_channels = guidance_channels or recipe.guidance_channels
    if guidance_channels not in GUIDANCE_CHANNELS:
        raise ValueError(f"guidance_channels {guidance_channels!r}; allowed: "
                         f"{', '.join(GUIDANCE_CHANNELS)}")
    for label, value in (("num", num), ("batch_size", batch_size), ("steps", steps)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    make_scheduler(scheduler).set_timesteps(steps)   # fails on a bad step count, before any work
    dtype = model_dtype(dtype)
    conditions = _conditions(conditions)
    guided = cfg_scale != 1
    check_conditions(model, conditions, guided)
    vae_folder = None
    if vae is None or isinstance(vae, (str, os.PathLike)):
        vae_folder, vae = str(VAE.path(vae)), load_vae(vae)
    vae_folder = vae_folder or str(getattr(vae.config, "_name_or_path", "") or "in memory")
    shape = latent_size(model, vae, resolution, frames)
    size = (shape[-2] * vae_factor(vae), shape[-1] * vae_factor(vae))   # (H, W) pixels
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    store = store if isinstance(store, Store) else Store(store or out / "samples.jsonl")

    rank, world, started, device = _distributed(device)
    mine = [start + k for k in range(num) if k % world == rank]
    todo = [i for i in mine if not sample_writer.finished(out, i, frames, size)]
    model.to(device=device, dtype=dtype)
    vae.to(device)
    was_training = model.training
    model.eval()   # label / caption dropout off
    checkpoint_sha256 = _sha256(Path(checkpoint)) if checkpoint and rank == 0 else None

    def row(status: str, generated: int, skipped: int, seconds: float, npz=None) -> dict:
        return {
            **provenance(device_label(device), _backend(model), dtype_name(dtype)),
            "model": getattr(model, "name", None) or family,
            "resolution": size[0] if size[0] == size[1] else "{}x{}".format(*size),
            "latent_frames": frames or 1, "tokens": _tokens(model, shape),
            "batch": batch_size, "status": status,
            "text_tokens": conditions.tokens if isinstance(conditions, Prompts) else 0,
            "model_config": json.dumps(dataclasses.asdict(model.config), sort_keys=True),
            "checkpoint": str(checkpoint) if checkpoint else "untrained",
            "checkpoint_sha256": checkpoint_sha256,
            "scheduler": scheduler, "steps": steps, "cfg_scale": cfg_scale,
            "guidance_channels": guidance_channels if guided else "none",
            "flow_shift": FLOW_SHIFT if scheduler == "flow" else None,
            "seed": seed, "index_start": start, "index_stop": start + num,
            "conditions": _describe(conditions),
            "vae": vae_folder, "vae_factor": vae_factor(vae), "vae_temporal_factor": 1,
            "vae_scaling_factor": vae.config.scaling_factor,
            "pixels": "uint8 = clamp(127.5x + 128, 0, 255) truncated (DiT sample_ddp.py)",
            "world_size": world, "images": generated, "skipped": skipped,
            "wall_s": seconds, "images_per_s": generated / seconds if generated else None,
            "out": str(out), "npz": npz,
        }

    began, generated = time.perf_counter(), 0
    bar = tqdm(total=len(todo), unit="img", desc=f"sampling {len(mine)} of {num} (rank {rank})",
               disable=not progress or rank != 0)
    try:
        for b in range(0, len(todo), batch_size):
            indices = todo[b:b + batch_size]
            generators = sample_generators(seed, indices)
            noise = initial_noise(generators, shape).to(device, latent_dtype(dtype))
            condition = condition_inputs(model, conditions, indices, guided, device, dtype)
            condition.update(size_condition(model, len(indices) * (1 + guided), size, device,
                                             dtype))
            latents = denoise(model, scheduler, steps, noise, condition, cfg_scale=cfg_scale,
                              guidance_channels=guidance_channels, generators=generators,
                              on_step=on_step)
            images = decode(vae, latents)             # (B, 3, H, W) or (B, F, 3, H, W)
            pixels = sample_writer.to_uint8(images.flatten(0, -4))
            pixels = pixels.reshape(len(indices), *images.shape[1:-3], *size, 3)
            for index, image in zip(indices, pixels):
                sample_writer.write_sample(out, index, frames, image)
            generated += len(indices)
            bar.update(len(indices))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except BaseException as err:
        if rank == 0:
            store.append(row(status_of(err), generated, len(mine) - len(todo),
                             time.perf_counter() - began))
        raise
    finally:
        bar.close()
        model.train(was_training)
    totals = _totals(generated, len(mine) - len(todo), time.perf_counter() - began, device)
    if world > 1:
        dist.barrier()   # every rank's PNGs are written
    npz = None
    if write_npz and rank == 0:
        npz = str(sample_writer.write_npz(out, range(start, start + num), frames, size))
    summary = row("ok", *totals, npz=npz)
    if rank == 0:
        store.append(summary)
    if started:
        dist.destroy_process_group()
    return summary


def latent_dtype(dtype: torch.dtype) -> torch.dtype:
    """The sampler's latent dtype: float32, float64 for float64 models."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tokens(model: nn.Module, shape: tuple[int, ...]) -> int:
    p = model.config.patch_size
    frames = shape[1] if len(shape) == 4 else 1
    return frames * (shape[-2] // p) * (shape[-1] // p)


def _describe(conditions: ClassLabels | Prompts) -> str:
    if isinstance(conditions, ClassLabels):
        labels = conditions.labels.tolist()
        return f"{len(labels)} class labels {labels[:3]}..." if len(labels) > 3 else \
            f"class labels {labels}"
    return f"{len(conditions)} prompts × {conditions.tokens} tokens from {conditions.source}"


def size_condition(model: nn.Module, rows: int, size: tuple[int, int], device,
                    dtype: torch.dtype) -> dict[str, Tensor]:
    """PixArtMS's (rows, 2) image (height, width) and (rows, 1) aspect ratio, as
    PixArtAlphaPipeline passes them; nothing for other models."""
    if not getattr(model.config, "micro_condition", False):
        return {}
    height, width = size
    return {"resolution": torch.tensor([[height, width]], device=device, dtype=dtype)
            .expand(rows, 2),
            "aspect_ratio": torch.tensor([[height / width]], device=device, dtype=dtype)
            .expand(rows, 1)}
