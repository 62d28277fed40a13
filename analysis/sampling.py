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
          shift 1.0 (docs/ptdit_release.md §1: none named), sigma 1 -> 0; the model gets
          t = 1000·sigma and its first half of channels is the velocity, x_next = x +
          (sigma_next - sigma)·v, i.e. diffusers' convention v = noise - x0 (assumed: the
          release states no sign; a model trained on x0 - noise would need -v).
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
VAE: temporal factor 1) from latents / scaling_factor (+ shift_factor). A sample whose latents
or pixels are not finite gets no PNG, and the run's row says so (status 'error: …').

Pixel space: a model trained on pixels (no VAE; in_channels 1 for grey, 3 for RGB) samples
with vae=PixelSpace(C): factor 1, scaling factor 1, no shift, decode the identity, so the
latents are the images in [-1, 1]; a 1-channel image is written as grey (its value in all three
PNG channels), and run.json and the row record the VAE as "pixel space".

Output: PNGs, run.json (the settings; a folder of other settings is refused) and the .npz:
see analysis.sample_writer. The indices are visited lazily, so a run of 10^12 indices starts
at once. Many processes: under torchrun (WORLD_SIZE > 1; analysis.distributed) rank r takes
the indices start + k with k % world == r and writes its own PNGs; rank 0 checks and writes
run.json before any rank samples (a refusal reaches every rank), and writes the .npz and the
run's row after a barrier.
"""

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.distributed as dist
from torch import Tensor, nn
from tqdm.auto import tqdm

from bench.rows import device_label, git_sha, provenance, status_of
from bench.store import Store, check_writable, check_writable_folder
from ptdit.attention import attention_modules
from ptdit.checks import check_device, dtype_name, either, model_dtype, nearest_multiples

from . import sample_writer
from .conditions import (
    ClassLabels,
    Prompts,
    check_conditions,
    class_conditions,
    condition_inputs,
    describe_runs,
    encode_prompts,
    prompt_embeddings,
)
from .distributed import barrier, broadcast, process_group
from .hashing import file_sha256, tensors_sha256
from .offline import VAE, go_offline
from .recipes import (  # noqa: F401
    FAMILY_RECIPES,
    FLOW_SHIFT,
    GUIDANCE_CHANNELS,
    SCHEDULER_STEPS,
    SCHEDULERS,
    TRAIN_TIMESTEPS,
    resolve,
)

__all__ = ["ClassLabels", "PixelSpace", "Prompts", "class_conditions", "decode", "denoise",
           "encode_prompts", "guide", "load_vae", "make_scheduler", "prompt_embeddings", "sample",
           "sample_seed", "space_of"]

OnStep = Callable[[int, Tensor, Tensor, dict], None]


#################################################################################
#                                  Schedulers                                   #
#################################################################################

def make_scheduler(name: str, learned_sigma: bool = True):
    """A fresh diffusers scheduler for `name` (see the module docstring)."""
    go_offline()
    from diffusers import (
        DDPMScheduler,
        DPMSolverMultistepScheduler,
        FlowMatchEulerDiscreteScheduler,
    )
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


def prepare_batch(model: nn.Module, conditions, indices: list[int], *, shape: tuple[int, ...],
                  size: tuple[int, int], seed: int, guided: bool, device, dtype: torch.dtype
                  ) -> tuple[list[torch.Generator], Tensor, dict[str, Tensor]]:
    """What the sampler needs for sample `indices`: their generators (sample_generators),
    initial noise (B, *shape) in the latent dtype on `device`, and the model's condition
    arguments — the conditional rows, then (`guided`) the null rows, with PixArtMS's size
    condition for `size` (H, W) pixels."""
    generators = sample_generators(seed, indices)
    noise = initial_noise(generators, shape).to(device, latent_dtype(dtype))
    condition = condition_inputs(model, conditions, indices, guided, device, dtype)
    condition.update(size_condition(model, len(indices) * (1 + guided), size, device, dtype))
    return generators, noise, condition


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


@dataclasses.dataclass(frozen=True)
class PixelSpace:
    """The VAE stand-in of a model that works on pixels: its `channels` input channels (1 grey,
    3 RGB) are the image in [-1, 1] itself. Factor 1, scaling factor 1, no shift, no weights;
    decode is the identity, and a 1-channel image is written as grey (its value in all three
    PNG channels)."""
    channels: int

    def __post_init__(self):
        if not isinstance(self.channels, int) or isinstance(self.channels, bool) \
                or self.channels not in (1, 3):
            raise ValueError(f"PixelSpace channels must be 1 (grey) or 3 (RGB) image channels, "
                             f"got {self.channels!r}")

    @property
    def config(self) -> SimpleNamespace:
        """The AutoencoderKL config fields sampling reads: latent_channels (= channels),
        scaling_factor 1, shift_factor 0."""
        return SimpleNamespace(latent_channels=self.channels, scaling_factor=1.0,
                               shift_factor=0.0)

    def to(self, *args, **kwargs) -> "PixelSpace":
        """Itself: there are no weights to move."""
        return self


def space_of(vae) -> str:
    """Where a model with this `vae` works: "pixel space" (PixelSpace) or "latent space"."""
    return "pixel space" if isinstance(vae, PixelSpace) else "latent space"


def vae_factor(vae) -> int:
    """Pixels per latent pixel: one halving per encoder block after the first (1 in pixel
    space)."""
    if isinstance(vae, PixelSpace):
        return 1
    return 2 ** (len(vae.config.block_out_channels) - 1)


@torch.no_grad()
def decode(vae, latents: Tensor) -> Tensor:
    """Latents (B, C, h, w) -> images (B, 3, H, W); video (B, C, F, h, w) -> (B, F, 3, H, W),
    decoded frame by frame; values nominally in [-1, 1]. In pixel space the latents are the
    images, C channels (1 or 3), only moved to that layout."""
    if isinstance(vae, PixelSpace):
        if latents.shape[1] != vae.channels:
            raise ValueError(f"{vae} decodes {vae.channels}-channel images, got latents "
                             f"{tuple(latents.shape)}")
        return latents if latents.dim() == 4 else latents.movedim(2, 1)
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
        made = (f"{vae} holds {vae.channels}-channel images" if isinstance(vae, PixelSpace)
                else f"the VAE makes {vae.config.latent_channels}-channel latents")
        raise ValueError(f"{made}; the model takes {model.in_channels}")
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


def _backend(model: nn.Module) -> str:
    return ",".join(sorted({m.backend for m in attention_modules(model).values()})) or "none"


def _totals(counts: list[float], seconds: float, device: torch.device) -> tuple[list, float]:
    """`counts` (made, skipped, non-finite) summed over ranks, the first non-finite index
    (the last entry, inf if none) the smallest of all ranks', the slowest rank's seconds."""
    if not dist.is_initialized():
        return counts, seconds
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    summed = torch.tensor(counts[:-1], dtype=torch.float64, device=on)
    first = torch.tensor([counts[-1]], dtype=torch.float64, device=on)
    slowest = torch.tensor([seconds], dtype=torch.float64, device=on)
    dist.all_reduce(summed)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    return [*summed.tolist(), float(first)], float(slowest)


def _conditions(conditions) -> ClassLabels | Prompts:
    if isinstance(conditions, (ClassLabels, Prompts)):
        return conditions
    if isinstance(conditions, (str, list, tuple, Tensor)):
        return class_conditions(conditions)
    raise ValueError(f"conditions must be ClassLabels, Prompts or a class label spec, got "
                     f"{type(conditions).__name__}")


def _weights_identity(model: nn.Module, checkpoint, init_seed: int | None) -> dict:
    """What the model's weights are, for run.json: the checkpoint's sha256, the seed random
    weights were drawn with, or (neither given) the sha256 of the weights themselves."""
    if checkpoint:
        return {"checkpoint_sha256": file_sha256(checkpoint)}
    if init_seed is not None:
        return {"untrained": True, "init_seed": init_seed}
    return {"weights_sha256": tensors_sha256(model)}


def _vae_identity(vae) -> str:
    if isinstance(vae, PixelSpace):
        return "pixel space"
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    return hashlib.sha256((json.dumps(config, sort_keys=True, default=str)
                           + tensors_sha256(vae)).encode()).hexdigest()


def _make_folder(path: Path) -> list[Path]:
    """Creates `path` and its missing parents; returns those it created, outermost first."""
    made = [p for p in (*reversed(path.parents), path) if not p.exists()]
    path.mkdir(parents=True, exist_ok=True)
    return made


def _remove_if_empty(made: list[Path]) -> None:
    """Removes the folders a failed run created, innermost first, while they are empty."""
    for folder in reversed(made):
        try:
            folder.rmdir()
        except OSError:
            return


def _batches(indices: range, is_finished: Callable[[int], bool], batch_size: int,
             on_skip: Callable[[], None]):
    """Batches (lists of <= batch_size) of the unfinished `indices`, found lazily: a run of
    10^12 indices starts at once and holds one batch of them."""
    batch = []
    for i in indices:
        if is_finished(i):
            on_skip()
            continue
        batch.append(i)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def sample(model: nn.Module, *, vae, conditions, num: int, out: str | os.PathLike,
           resolution: int | tuple[int, int], scheduler: str | None = None,
           steps: int | None = None, cfg_scale: float | None = None,
           guidance_channels: str | None = None, seed: int = 0, start: int = 0,
           batch_size: int = 16, frames: int | None = None, device="cpu",
           dtype: torch.dtype | str = torch.float32, write_npz: bool = False,
           on_step: OnStep | None = None, store: Store | str | os.PathLike | None = None,
           checkpoint: str | os.PathLike | None = None, init_seed: int | None = None,
           progress: bool = True) -> dict:
    """Samples indices start..start+num-1 into `out` as PNGs, skipping finished ones; returns
    the run's row (also appended to `store`, default out/samples.jsonl, by rank 0). A run
    whose latents or pixels turn non-finite writes no PNG for those samples and returns a row
    whose status is 'error: …' naming the first bad index; any other failure appends its row
    with the error as status, then raises; Ctrl-C (KeyboardInterrupt) appends nothing.

    model: a ptdit model, moved to `device` and cast to `dtype` in place, run in eval mode.
    vae: an AutoencoderKL, or its folder (load_vae), or PixelSpace(C) for a model that works
    on C-channel pixels (recorded as "pixel space"). conditions: ClassLabels / Prompts
    (analysis.conditions), or a class label spec ("0-999"); sample i takes condition i % N.
    scheduler / steps / cfg_scale / guidance_channels: default the family's (FAMILY_RECIPES,
    SCHEDULER_STEPS); cfg_scale 1 runs unguided. resolution: pixels, a side or (height,
    width); frames: latent frames for video (None: images). batch_size: samples per forward
    (twice the rows when guided). checkpoint: the model's file, recorded with its sha256
    ("untrained" if None); init_seed: the seed untrained weights were drawn with (recorded;
    with neither, the weights' own sha256 identifies them in run.json). on_step(step, t,
    model_input, model_kwargs): see denoise. write_npz: rank 0 writes out/samples.npz from
    all the PNGs at the end. out/run.json records the settings (analysis.sample_writer); a
    folder holding samples of other settings is refused before anything is written."""
    settings = resolve(model.config.family, scheduler, steps, cfg_scale, guidance_channels)
    scheduler, steps, cfg_scale, guidance_channels = settings
    for label, value in (("num", num), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{label} must be a positive int, got {value!r}")
    if not isinstance(start, int) or start < 0:
        raise ValueError(f"start must be a non-negative int, got {start!r}")
    make_scheduler(scheduler).set_timesteps(steps)   # fails on a bad step count, before any work
    device = check_device(device, "device")
    dtype = model_dtype(dtype)
    conditions = _conditions(conditions)
    guided = settings.guided
    check_conditions(model, conditions, guided)
    vae_folder = None
    if vae is None or isinstance(vae, (str, os.PathLike)):
        vae_folder, vae = str(VAE.path(vae)), load_vae(vae)
    if isinstance(vae, PixelSpace):
        vae_folder = "pixel space"
    vae_folder = vae_folder or str(getattr(vae.config, "_name_or_path", "") or "in memory")
    shape = latent_size(model, vae, resolution, frames)
    size = (shape[-2] * vae_factor(vae), shape[-1] * vae_factor(vae))   # (H, W) pixels
    out = check_writable_folder(out, "out")
    store = store if isinstance(store, Store) else Store(
        check_writable(store or out / "samples.jsonl", "store"), "samples")
    with process_group(device) as (rank, world, device), contextlib.ExitStack() as held:
        return _sample(model, vae, conditions, vae_folder, shape, size, out, store, held,
                       rank=rank, world=world, device=device, num=num, start=start,
                       scheduler=scheduler, steps=steps, cfg_scale=cfg_scale,
                       guidance_channels=guidance_channels, guided=guided, seed=seed,
                       batch_size=batch_size, frames=frames, dtype=dtype,
                       write_npz=write_npz, on_step=on_step, checkpoint=checkpoint,
                       init_seed=init_seed, progress=progress)


def _sample(model, vae, conditions, vae_folder, shape, size, out: Path, store: Store,
            held: contextlib.ExitStack, *, rank, world, device, num, start, scheduler, steps,
            cfg_scale, guidance_channels, guided, seed, batch_size, frames, dtype, write_npz,
            on_step, checkpoint, init_seed, progress) -> dict:
    """sample()'s work on each rank, once its arguments are checked."""
    family = model.config.family
    made: list[Path] = []
    refusal = checkpoint_sha256 = fingerprint = None
    if rank == 0:   # the folder's settings are checked (and recorded) once, for every rank
        settings = {
            "model": getattr(model, "name", None) or family,
            "model_config": dataclasses.asdict(model.config),
            "weights": _weights_identity(model, checkpoint, init_seed),
            "scheduler": scheduler, "steps": steps, "cfg_scale": cfg_scale,
            "guidance_channels": guidance_channels if guided else "none",
            "flow_shift": FLOW_SHIFT if scheduler == "flow" else None, "seed": seed,
            "conditions": conditions.fingerprint(), "resolution": list(size),
            "frames": frames, "vae": _vae_identity(vae), "dtype": dtype_name(dtype)}
        checkpoint_sha256 = settings["weights"].get("checkpoint_sha256")
        fingerprint = settings["conditions"]
        try:
            made = _make_folder(out)
            held.enter_context(store.lock())   # one writer per folder and store
            refusal = sample_writer.check_run(out, settings)
            if refusal is None:
                sample_writer.write_run(out, settings, {
                    "checkpoint": str(checkpoint) if checkpoint else "untrained",
                    "vae": vae_folder, "conditions": _describe(conditions),
                    "created_by": "analysis.sampling.sample", "git_sha": git_sha()})
        except (ValueError, OSError) as err:   # every rank must hear of it, not just rank 0
            refusal = str(err)
        if refusal is not None:
            held.close()             # the lock file first: then a new folder is empty again
            _remove_if_empty(made)
    refusal = broadcast(refusal)
    if refusal is not None:
        raise ValueError(refusal)
    mine = range(start + rank, start + num, world)
    sample_writer.remove_temporaries(out, mine)   # a killed run's, of this rank's indices
    model.to(device=device, dtype=dtype)
    vae.to(device)
    was_training = model.training
    model.eval()   # label / caption dropout off

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
            "init_seed": None if checkpoint else init_seed,
            "scheduler": scheduler, "steps": steps, "cfg_scale": cfg_scale,
            "guidance_channels": guidance_channels if guided else "none",
            "flow_shift": FLOW_SHIFT if scheduler == "flow" else None,
            "seed": seed, "index_start": start, "index_stop": start + num,
            "conditions": _describe(conditions),
            "conditions_sha256": fingerprint,
            "vae": vae_folder, "vae_factor": vae_factor(vae), "vae_temporal_factor": 1,
            "vae_scaling_factor": vae.config.scaling_factor,
            "pixels": "uint8 = clamp(127.5x + 128, 0, 255) truncated (DiT sample_ddp.py)",
            "world_size": world, "images": generated, "skipped": skipped,
            "wall_s": seconds, "images_per_s": generated / seconds if generated else None,
            "out": str(out), "npz": npz, "run_settings": str(out / sample_writer.RUN_FILE),
        }

    began, generated, skipped = time.perf_counter(), 0, 0
    bad, first_bad = 0, math.inf
    bar = tqdm(total=len(mine), unit="img", desc=f"sampling {len(mine)} of {num} (rank {rank})",
               disable=not progress or rank != 0)

    def skip() -> None:
        nonlocal skipped
        skipped += 1
        bar.update(1)

    try:
        for indices in _batches(mine, lambda i: sample_writer.finished(out, i, frames, size),
                                batch_size, skip):
            generators, noise, condition = prepare_batch(
                model, conditions, indices, shape=shape, size=size, seed=seed, guided=guided,
                device=device, dtype=dtype)
            latents = denoise(model, scheduler, steps, noise, condition, cfg_scale=cfg_scale,
                              guidance_channels=guidance_channels, generators=generators,
                              on_step=on_step)
            images = decode(vae, latents)   # (B, 3, H, W) or (B, F, 3, H, W); 1 or 3 in pixels
            finite = (torch.isfinite(latents).flatten(1).all(1)
                      & torch.isfinite(images).flatten(1).all(1)).tolist()
            pixels = sample_writer.to_uint8(images.flatten(0, -4))
            pixels = pixels.reshape(len(indices), *images.shape[1:-3], *size, 3)
            for index, image, ok in zip(indices, pixels, finite):
                if ok:
                    sample_writer.write_sample(out, index, frames, image)
                    generated += 1
            bar.update(len(indices))
            if not all(finite):   # a model that makes NaN once makes it again: stop here
                bad = finite.count(False)
                first_bad = indices[finite.index(False)]
                break
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    except KeyboardInterrupt:
        raise   # finished PNGs are kept; a rerun resumes (no error row: nothing failed)
    except BaseException as err:
        if rank == 0:
            store.append(row(status_of(err), generated, skipped, time.perf_counter() - began))
        raise
    finally:
        bar.close()
        model.train(was_training)
    (generated, skipped, bad, first_bad), seconds = _totals(
        [generated, skipped, bad, first_bad], time.perf_counter() - began, device)
    generated, skipped = int(generated), int(skipped)
    barrier()   # every rank's PNGs are written
    status, npz = "ok", None
    if bad:
        status = (f"error: non-finite (NaN/Inf) latents or pixels in {int(bad)} sample(s), "
                  f"first index {int(first_bad)}; no PNG was written for them (do the weights "
                  "or the conditions hold NaN/Inf?)")
    elif write_npz and rank == 0:
        npz = str(sample_writer.write_npz(out, range(start, start + num), frames, size))
    summary = row(status, generated, skipped, seconds, npz=npz)
    if rank == 0:
        summary = store.append(summary)
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
        return f"{conditions.count} class labels {describe_runs(conditions.runs)}"
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
