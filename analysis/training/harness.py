"""Training any ptdit model on an image set: resumable, on one or many processes, for a number
of steps, a closed-form FLOP budget or a time budget, logged to a results store.

    from analysis.training.harness import TrainOptions, train, checkpoint_info
    row = train("DiT-S/2", "digits", "runs/dit-s", size=32,
                overrides=dict(depth=6, hidden_size=192, num_heads=3),
                options=TrainOptions(steps=2000, batch_size=64, lr=1e-4))
    checkpoint_info("runs/dit-s/ema.safetensors")   # objective, space, conditions, prompts

Follows facebookresearch/DiT `train.py`: AdamW (betas 0.9, 0.999), an EMA of the weights
(updated after every step, initialised to the weights), random horizontal flips, class dropout
to the null class; plus linear warm-up, gradient clipping and accumulation, bf16 autocast.

Conventions
- Model: `ptdit.build(name, seed=options.seed, in_channels=C, input_size=side, num_classes=K,
  class_dropout_prob=cond_dropout, **overrides)` (input_size for DiT / PixArt, whose position
  tables are defined on it; num_classes for class models). Pixel space by default: C = the
  images' channels and side = the image side. With a VAE (a diffusers AutoencoderKL or its
  folder) the images are encoded once, before training — one draw z = mean + std·ε per image
  (and per flipped image, so flips stay exact), ε from the seed — and trained on as
  (z - shift_factor)·scaling_factor, the latents analysis.sampling.decode inverts.
- Conditions: class models (DiT, PT-DiT/S-Class) take the labels; text models (PixArt, PT-DiT)
  take one FIXED caption per class, N(0, 1) of (tokens, caption_channels) from the seed, with
  tokens = analysis.conditions.text_tokens(model) (PixArt's model_max_length, PT-DiT's 200);
  row i of OUT/prompts.safetensors (analysis.conditions' prompt-embeddings file, keep-masks all
  ones) is class i's caption, for `ptdit sample --prompt-embeddings`. A dropped condition
  (probability cond_dropout) becomes the null class (num_classes), PixArt's learned null
  caption, or for PT-DiT (which has none) a fixed N(0, 1) null caption from the seed, saved in
  the same file as its `null_embedding`. An unlabelled image set is ONE class: every image gets
  label 0 (num_classes 1), so the model stays conditional (label 0, or the null) and samples
  with class label 0 / prompt row 0.
- Randomness: every draw is made for the GLOBAL batch on every rank and each rank takes its
  rows, so 1 and N processes see the same images, flips, drops, timesteps and noise. The image
  order is a permutation of the set per epoch (torch.randperm seeded from (seed, epoch)); a
  global batch takes the next batch_size positions, running on into the next epoch; the
  position (epoch, index) is checkpointed. Per step, one generator (seeded from the seed,
  checkpointed) draws in this order: flips (B,) if `flip`, drops (B,) if cond_dropout > 0,
  analysis.training.objectives.draw (t, u), then the noise (B, C, h, w). The models run in
  eval mode: their own label / caption dropout would draw from each rank's global generator.
- Batches: the global batch (batch_size images per optimizer step) is split into grad_accum
  micro-batches, and each of those over the ranks; the gradient is that of the global batch's
  mean loss (each micro-batch's mean / grad_accum, averaged over ranks by DDP).
- Cost: training FLOPs per step = 3 × the closed-form forward FLOPs of the global batch
  (forward + backward ≈ 2 × forward; ptdit.complexity, every matmul with attention, 2 FLOPs per
  MAC); the same count with gradient checkpointing (which recomputes the forward). budget_tflop
  gives floor(budget / per-step) steps; budget_seconds stops after the step on which the
  training time (checkpoint writing excluded) reaches it.
- Output, in `out`: run.json (the settings of the run), checkpoint.pt (the full training state,
  written atomically every checkpoint_every steps, at the end and when SIGINT / SIGTERM stops
  the run), ema.safetensors (the EMA weights in ptdit's format, `ptdit.load`), its training
  sidecar ema.training.json (`checkpoint_info`), prompts.safetensors (text models) and
  train.jsonl (rows, bench.store table "train": one per log_every steps, one at an interrupt,
  one final; a resumed run appends, and rows of steps redone after a SIGKILL appear twice:
  take the last per step).
- Resume: a folder holding another run (model, config, data, space or an option that changes
  the arithmetic) is refused; the same run continues from its checkpoint, bit for bit as if it
  had never stopped (fp32, same device and thread count). steps / budget_tflop, log_every,
  checkpoint_every, compile, grad_checkpointing and device may change between sessions
  (budget_seconds too: a finished timed run trains on when given more time).
"""

import contextlib
import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import signal
import threading
import time
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

import ptdit
from bench.rows import device_label, git_sha, provenance, status_of
from bench.store import Store, check_writable_folder
from ptdit import complexity
from ptdit.attention import attention_modules
from ptdit.checks import check_device, either, nearest_multiples
from ptdit.models.inputs import VAE_SPATIAL

from ..conditions import learned_null, make_prompts, text_tokens
from ..distributed import barrier, broadcast, process_group
from ..hashing import tensors_sha256
from ..sampling import PixelSpace, load_vae, size_condition, vae_factor
from . import datasets, objectives

__all__ = ["TrainOptions", "TrainingInterrupted", "apply_block_options", "checkpoint_info",
           "steps_for_budget", "train", "train_flops_per_step"]

RUN_FILE = "run.json"
RUN_FORMAT = "ptdit train run 1"
CHECKPOINT = "checkpoint.pt"
CHECKPOINT_FORMAT = "ptdit train checkpoint 1"
EMA_FILE = "ema.safetensors"
PROMPTS_FILE = "prompts.safetensors"
ROWS_FILE = "train.jsonl"
INFO_FORMAT = "ptdit training 1"
DTYPES = ("float32", "bfloat16")
FLOPS_CONVENTION = ("3 x forward (forward + backward = 2 x forward), forward = every matmul "
                    "incl. attention at 2 FLOPs per MAC (ptdit.complexity)")
# options that change what the run computes: a folder holding a run that differs in one of
# these is another run
UNTIL_TIME = 2**62   # the step cap of a run with a time budget: it stops on the clock

IDENTITY_OPTIONS = ("batch_size", "grad_accum", "lr", "warmup_steps", "weight_decay",
                    "grad_clip", "ema_decay", "seed", "dtype", "objective", "cond_dropout",
                    "flip")


#################################################################################
#                                   Options                                     #
#################################################################################

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


@dataclass(frozen=True)
class TrainOptions:
    """How to train. Exactly one of `steps` (optimizer steps), `budget_tflop` (closed-form
    training TFLOP, 10^12 FLOPs: steps = floor(budget / per-step)) and `budget_seconds` (train
    until the training time — steps, not checkpoint writing — reaches it; the step count then
    depends on the machine and is recorded). `batch_size` is the global
    batch (images per optimizer step, over every rank and micro-batch); `lr` the AdamW rate
    after `warmup_steps` of linear warm-up; `grad_clip` the max global gradient norm (None: no
    clipping); `dtype` float32, or bfloat16 autocast over float32 master weights;
    `objective` None for the family's (analysis.training.objectives); `cond_dropout` the
    probability of
    training a sample on the null condition; `compile` torch.compile per block;
    `grad_checkpointing` recomputes each block in the backward pass."""
    steps: int | None = None
    budget_tflop: float | None = None
    budget_seconds: float | None = None
    batch_size: int = 64
    grad_accum: int = 1
    lr: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float | None = 1.0
    ema_decay: float = 0.9999
    seed: int = 0
    dtype: str = "float32"
    objective: str | None = None
    cond_dropout: float = 0.1
    flip: bool = True
    checkpoint_every: int = 500
    log_every: int = 10
    compile: bool = False
    grad_checkpointing: bool = False
    device: str = "cpu"

    def __post_init__(self):
        given = [f"{k}={getattr(self, k)!r}" for k in ("steps", "budget_tflop", "budget_seconds")
                 if getattr(self, k) is not None]
        if len(given) > 1:
            raise ValueError(f"give one of steps, budget_tflop and budget_seconds, not "
                             f"{' and '.join(given)}")
        if self.budget_seconds is not None and (not _is_number(self.budget_seconds)
                                                or self.budget_seconds <= 0):
            raise ValueError(f"budget_seconds must be a positive number of seconds, got "
                             f"{self.budget_seconds!r}")
        if self.steps is not None and (not _is_int(self.steps) or self.steps < 1):
            raise ValueError(f"steps must be a positive int, got {self.steps!r}")
        if self.budget_tflop is not None and (not _is_number(self.budget_tflop)
                                              or self.budget_tflop <= 0):
            raise ValueError(f"budget_tflop must be a positive number of TFLOP, got "
                             f"{self.budget_tflop!r}")
        for name in ("batch_size", "grad_accum", "checkpoint_every", "log_every"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.batch_size % self.grad_accum:
            raise ValueError(f"batch_size {self.batch_size} does not split into grad_accum "
                             f"{self.grad_accum} equal micro-batches; nearest valid batch_size: "
                             f"{either(nearest_multiples(self.batch_size, self.grad_accum))}")
        for name in ("warmup_steps", "seed"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if not _is_number(self.lr) or self.lr <= 0:
            raise ValueError(f"lr must be a positive number, got {self.lr!r}")
        if not _is_number(self.weight_decay) or self.weight_decay < 0:
            raise ValueError(f"weight_decay must be a number >= 0, got {self.weight_decay!r}")
        if self.grad_clip is not None and (not _is_number(self.grad_clip)
                                           or self.grad_clip <= 0):
            raise ValueError(f"grad_clip must be a positive number or None (no clipping), got "
                             f"{self.grad_clip!r}")
        if not _is_number(self.ema_decay) or not 0 <= self.ema_decay <= 1:
            raise ValueError(f"ema_decay must be in [0, 1], got {self.ema_decay!r}")
        if not _is_number(self.cond_dropout) or not 0 <= self.cond_dropout < 1:
            raise ValueError(f"cond_dropout must be a probability in [0, 1), got "
                             f"{self.cond_dropout!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not a training dtype; allowed: "
                             f"{', '.join(DTYPES)} (bfloat16: autocast, float32 master weights)")
        if self.objective is not None and self.objective not in objectives.OBJECTIVES:
            raise ValueError(f"unknown training objective {self.objective!r}; allowed: "
                             f"{', '.join(objectives.OBJECTIVES)} or None (the family's)")
        for name in ("flip", "compile", "grad_checkpointing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if not isinstance(self.device, str):
            raise ValueError(f"device must be a string ('cpu', 'cuda', 'cuda:N'), got "
                             f"{self.device!r}")


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by `train` after SIGINT / SIGTERM stopped it at a step boundary and the
    checkpoint was written: running the same call again resumes."""


#################################################################################
#                            Data, space and model                              #
#################################################################################

def _stream_seed(seed: int, stream: str) -> int:
    """The seed of one named random stream of a run: the first 63 bits of
    sha256("ptdit train/{seed}/{stream}")."""
    digest = hashlib.sha256(f"ptdit train/{seed}/{stream}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _image_set(data, size: int, seed: int) -> "datasets.ImageSet":
    """`data` (an ImageSet, or a name / path for analysis.training.datasets.load) checked: (N, C,
    size,
    size) float32 images in [-1, 1], labels (N,) int64 in 0..num_classes-1 or None."""
    if isinstance(data, (str, os.PathLike)):
        return datasets.load(data, size=size, split="train", seed=seed)
    if not isinstance(data, datasets.ImageSet):
        raise ValueError(f"data must be an analysis.training.datasets.ImageSet, a built-in name "
                         f"({', '.join(datasets.DATASETS)}) or a folder / .npz path, got "
                         f"{type(data).__name__}")
    images, labels = data.images, data.labels
    if not isinstance(images, Tensor) or images.dim() != 4 or images.dtype != torch.float32 \
            or len(images) == 0:
        got = (f"{images.dtype} {tuple(images.shape)}" if isinstance(images, Tensor)
               else type(images).__name__)
        raise ValueError(f"data images must be a non-empty float32 (N, C, H, W) tensor, got "
                         f"{got}")
    if tuple(images.shape[2:]) != (size, size):
        raise ValueError(f"data images are {images.shape[2]}x{images.shape[3]} px but size is "
                         f"{size}: load the set at size={size} or give size="
                         f"{images.shape[2]}")
    low, high = images.min().item(), images.max().item()
    if low < -1 or high > 1:
        raise ValueError(f"data images must lie in [-1, 1], got values {low:.4g}..{high:.4g}")
    if labels is not None:
        if not isinstance(labels, Tensor) or labels.shape != (len(images),) \
                or labels.dtype != torch.int64:
            raise ValueError(f"data labels must be an int64 ({len(images)},) tensor or None")
        if not _is_int(data.num_classes) or data.num_classes < 1 or labels.min() < 0 \
                or labels.max() >= data.num_classes:
            raise ValueError(f"data labels must lie in 0..num_classes-1, got "
                             f"{int(labels.min())}..{int(labels.max())} with num_classes "
                             f"{data.num_classes!r}")
    return data


def _data_sha256(data) -> str:
    """sha256 over the images' and labels' bytes (dtype and shape included)."""
    digest = hashlib.sha256()
    for tensor in (data.images, data.labels):
        if tensor is None:
            digest.update(b"none")
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _space(vae, channels: int):
    """(the VAE or None for pixel space, its description for run.json and the sidecar)."""
    if vae is None or isinstance(vae, PixelSpace):
        if vae is not None and vae.channels != channels:
            raise ValueError(f"{vae} takes {vae.channels}-channel images; the data has "
                             f"{channels} channels")
        return None, {"kind": "pixel", "channels": channels, "factor": 1,
                      "scaling_factor": 1.0, "shift_factor": 0.0}
    folder = None
    if isinstance(vae, (str, os.PathLike)):
        folder, vae = str(vae), load_vae(vae)
    if getattr(getattr(vae, "config", None), "latent_channels", None) is None \
            or not hasattr(vae, "encode"):
        raise ValueError(f"vae must be None (pixel space), PixelSpace, a diffusers "
                         f"AutoencoderKL or its folder, got {type(vae).__name__}")
    if vae.config.in_channels != channels:
        raise ValueError(f"the VAE encodes {vae.config.in_channels}-channel images; the data "
                         f"has {channels} channels")
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    identity = hashlib.sha256((json.dumps(config, sort_keys=True, default=str)
                               + tensors_sha256(vae)).encode()).hexdigest()
    return vae, {"kind": "latent", "channels": vae.config.latent_channels,
                 "factor": vae_factor(vae), "scaling_factor": vae.config.scaling_factor,
                 "shift_factor": getattr(vae.config, "shift_factor", None) or 0.0,
                 "vae": folder or str(getattr(vae.config, "_name_or_path", "") or "in memory"),
                 "vae_sha256": identity}


@torch.no_grad()
def _encode(vae, images: Tensor, space: dict, seed: int, stream: str, device: torch.device,
            batch: int = 32) -> Tensor:
    """(N, C, H, W) images -> (N, c, h, w) float32 CPU latents, (z - shift)·scale with z one
    draw mean + std·ε per image, ε from the run's random stream `stream`."""
    generator = torch.Generator().manual_seed(_stream_seed(seed, stream))
    vae = vae.to(device).eval()
    out = []
    for chunk in images.split(batch):
        posterior = vae.encode(chunk.to(device, vae.dtype)).latent_dist
        eps = torch.randn(posterior.mean.shape, generator=generator)
        z = posterior.mean + posterior.std * eps.to(device, posterior.mean.dtype)
        out.append(((z - space["shift_factor"]) * space["scaling_factor"]).float().cpu())
    return torch.cat(out)


def _model_fields(base, name: str, channels: int, side: int, classes: int,
                  cond_dropout: float, overrides: dict) -> dict:
    """The config fields the data sets, with `overrides`; ValueError where an override
    contradicts the data (channels, too few classes) or the options (class dropout)."""
    fields = {"in_channels": channels, "class_dropout_prob": cond_dropout}
    if hasattr(base, "input_size"):
        fields["input_size"] = side
    if base.condition == "class":
        fields["num_classes"] = classes
    sets = {"in_channels": "the data's channels (the VAE's latent channels with a VAE)",
            "class_dropout_prob": "cond_dropout", "num_classes": "the data's classes"}
    for key, value in overrides.items():
        if key not in fields or key == "input_size" or value == fields[key]:
            continue
        if key == "num_classes" and _is_int(value) and value >= classes:
            continue
        raise ValueError(f"override {key}={value!r} contradicts {sets[key]} ({fields[key]!r}) "
                         f"for {name}; leave it out")
    return {**fields, **overrides}


def _check_grid(config, name: str, size: int, factor: int) -> int:
    """The latent side of `size`-px images; ValueError naming the nearest valid image sizes
    when the VAE factor, the patch or PT-DiT's windows do not divide it."""
    multiple, unit = (config.grid_multiple(1) if hasattr(config, "grid_multiple")
                      else ((1, 1, 1), "window"))
    tiles = math.lcm(multiple[1], multiple[2])   # square images: rows and columns both
    step = factor * config.patch_size * tiles
    if size % step:
        parts = ([f"VAE factor {factor}"] if factor > 1 else []) + [f"patch {config.patch_size}"]
        parts += [f"{unit} {tiles}"] if tiles > 1 else []
        raise ValueError(f"{name} cannot train at {size} px: {' × '.join(parts)} needs "
                         f"multiples of {step} px; nearest valid size: "
                         f"{either(nearest_multiples(size, step))} px")
    return size // factor


def _text_tokens(config) -> int:
    """Caption tokens of a text model (analysis.conditions.text_tokens), 0 for class models."""
    if config.condition != "text":
        return 0
    return text_tokens(SimpleNamespace(config=config))   # it reads the config only


def train_flops_per_step(config, latent_side: int, batch: int, text_tokens: int = 0) -> int:
    """Closed-form training FLOPs of one optimizer step: 3 × the forward FLOPs (every matmul,
    attention included, 2 FLOPs per MAC; ptdit.complexity) of `batch` samples of
    latent_side × latent_side latents with `text_tokens` caption tokens."""
    text = {"text_tokens": text_tokens} if config.condition == "text" else {}
    # a Workload's resolution is in pixels of an 8× VAE: latent side × 8
    work = ptdit.Workload(config, latent_side * VAE_SPATIAL, batch=batch, **text)
    return 3 * 2 * sum(complexity.macs(work).values())


def steps_for_budget(budget_tflop: float, flops_per_step: int) -> int:
    """floor(budget / per-step cost), the budget read as the decimal it is written as;
    ValueError when the budget is less than one step."""
    steps = math.floor(Fraction(str(budget_tflop)) * 10**12 / flops_per_step)
    if steps < 1:
        raise ValueError(f"a budget of {budget_tflop} TFLOP is smaller than one step of "
                         f"{flops_per_step / 1e12:.6g} TFLOP ({FLOPS_CONVENTION}); give at "
                         f"least {flops_per_step / 1e12:.6g}")
    return steps


#################################################################################
#                          Block options, EMA, draws                            #
#################################################################################

def _checkpointed(forward, *args, **kwargs):
    return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)


def apply_block_options(model: nn.Module, *, compile: bool = False,
                        grad_checkpointing: bool = False) -> nn.Module:
    """Wraps each of `model.blocks` in place (the state dict keeps its keys): with
    `grad_checkpointing` its forward runs under torch.utils.checkpoint (activations recomputed
    in the backward pass), with `compile` the block is torch.compile'd (nn.Module.compile)."""
    for block in model.blocks:
        if grad_checkpointing:
            block.forward = functools.partial(_checkpointed, block.forward)
        if compile:
            block.compile()
    return model


@torch.no_grad()
def _update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema = decay·ema + (1 - decay)·weights, over the trainable parameters (DiT's update_ema;
    frozen parameters and buffers never change)."""
    weights = dict(model.named_parameters())
    for name, param in ema.named_parameters():
        if weights[name].requires_grad:
            param.mul_(decay).add_(weights[name].detach(), alpha=1 - decay)


class DataOrder:
    """The order images are seen in: a permutation of the `count` images per epoch from the
    seed; each global batch takes the next positions, running on into the next epoch."""

    def __init__(self, count: int, seed: int, epoch: int = 0, index: int = 0):
        self.count, self.seed, self.epoch, self.index = count, seed, epoch, index
        self._epoch, self._permutation = None, None

    def permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(_stream_seed(self.seed, f"epoch {epoch}"))
            self._epoch, self._permutation = epoch, torch.randperm(self.count,
                                                                   generator=generator)
        return self._permutation

    def take(self, batch: int) -> Tensor:
        """(batch,) image indices of the next global batch; advances the position."""
        parts = []
        while batch:
            n = min(batch, self.count - self.index)
            parts.append(self.permutation(self.epoch)[self.index:self.index + n])
            batch -= n
            self.index += n
            if self.index == self.count:
                self.epoch, self.index = self.epoch + 1, 0
        return torch.cat(parts)


def _draws(generator: torch.Generator, batch: int, shape: tuple[int, ...], objective: str,
           flip: bool, cond_dropout: float) -> dict[str, Tensor]:
    """One step's draws for the global batch, in the documented order."""
    draws = {"flip": torch.rand(batch, generator=generator) < 0.5 if flip else None,
             "drop": (torch.rand(batch, generator=generator) < cond_dropout
                      if cond_dropout > 0 else None)}
    draws["t"], _ = objectives.draw(objective, batch, generator)
    draws["noise"] = objectives.draw_noise((batch, *shape), generator)
    return draws


#################################################################################
#                                 Conditions                                    #
#################################################################################

def _captions(config, classes: int, seed: int) -> dict[str, Tensor] | None:
    """A text model's fixed captions: embeddings (classes, L, C) and masks (ones), and for
    models without a learned null caption a fixed null (L, C); None for class models."""
    if config.condition != "text":
        return None
    L, C = _text_tokens(config), config.caption_channels
    generator = torch.Generator().manual_seed(_stream_seed(seed, "captions"))
    tensors = {"embeddings": torch.randn(classes, L, C, generator=generator),
               "mask": torch.ones(classes, L, dtype=torch.int64)}
    if not getattr(config, "null_caption", False):   # PT-DiT: no learned null caption
        tensors["null_embedding"] = torch.randn(L, C, generator=generator)
        tensors["null_mask"] = torch.ones(L, dtype=torch.int64)
    make_prompts(*(tensors.get(k) for k in ("embeddings", "mask", "null_embedding",
                                             "null_mask")))   # checked as sampling reads them
    return tensors


def _condition(model: nn.Module, labels: Tensor, drop: Tensor | None, captions, size: int,
               device: torch.device) -> dict[str, Tensor]:
    """The condition arguments of the model's forward for `labels` (b,), dropped rows
    replaced by the null condition."""
    config = model.config
    if config.condition == "class":
        if drop is not None:
            labels = torch.where(drop, config.num_classes, labels)
        return {"y" if config.family == "DiT" else "text": labels.to(device)}
    text = captions["embeddings"][labels]                                 # (b, L, C)
    if drop is not None:
        null = learned_null(model)
        null = captions["null_embedding"] if null is None else null.detach().cpu()
        text = torch.where(drop[:, None, None], null.to(text), text)
    kwargs = {"text": text.to(device), "text_mask": captions["mask"][labels].to(device)}
    kwargs.update(size_condition(model, len(labels), (size, size), device, torch.float32))
    return kwargs


#################################################################################
#                                Checkpoints                                    #
#################################################################################

def _atomic(path: Path, write) -> None:
    """write(temporary path), then fsync and rename it over `path`."""
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")
    write(tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json(path: Path, obj) -> None:
    _atomic(path, lambda tmp: tmp.write_text(json.dumps(obj, indent=2) + "\n"))


def _rng_states(generator: torch.Generator) -> dict:
    keys, position, has_gauss, gauss = np.random.get_state()[1:]
    version, state, gauss_next = random.getstate()
    return {"draws": generator.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(gauss)},
            "random": {"version": version, "state": list(state), "gauss_next": gauss_next}}


def _restore_rng(states: dict, generator: torch.Generator) -> None:
    generator.set_state(states["draws"])
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"],
                         n["has_gauss"], n["cached_gaussian"]))
    r = states["random"]
    random.setstate((r["version"], tuple(r["state"]), r["gauss_next"]))


def _sidecar(path: Path) -> Path:
    """The training sidecar of a model file: `ema.training.json` beside `ema.safetensors`."""
    return path.with_suffix(".training.json")


def checkpoint_info(path: str | os.PathLike) -> dict | None:
    """What a trained model's file says about its training (the sidecar `<name>.training.json`
    that `train` writes beside `<name>.safetensors`; a run folder means its ema.safetensors):
    objective, sampler (the analysis.sampling scheduler that inverts it), space ("pixel" or
    "latent", channels, VAE factor and scaling), condition ("class" / "text"), num_classes,
    labelled, prompt_embeddings (absolute path of the prompt-embeddings file, text models;
    else None), dataset info, step and the options. None when the file has no sidecar (a model
    not trained by `train`); ValueError when the file does not exist or the sidecar is not
    one."""
    path = Path(path)
    if path.is_dir():
        path = path / EMA_FILE
    if not path.exists():
        raise ValueError(f"trained model file {str(path)!r} does not exist")
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        return None
    try:
        info = json.loads(sidecar.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{sidecar}: not a training sidecar (not JSON: {err})") from None
    if not isinstance(info, dict) or info.get("format") != INFO_FORMAT:
        raise ValueError(f"{sidecar}: not a training sidecar (format "
                         f"{info.get('format') if isinstance(info, dict) else None!r}, "
                         f"expected {INFO_FORMAT!r})")
    if info.get("prompt_embeddings"):
        info["prompt_embeddings"] = str((sidecar.parent / info["prompt_embeddings"]).resolve())
    return info


#################################################################################
#                                  Run folder                                   #
#################################################################################

def _difference(there, here, where: str = "") -> tuple[str, object, object] | None:
    """The first (path, there, here) at which two JSON values differ, or None."""
    if isinstance(there, dict) and isinstance(here, dict):
        for key in [*there, *(k for k in here if k not in there)]:
            found = _difference(there.get(key), here.get(key), f"{where}.{key}" if where
                                else key)
            if found:
                return found
        return None
    return None if there == here else (where, there, here)


def _short(value) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _prepare_folder(out: Path, settings: dict, record: dict, resume: bool) -> str | None:
    """Checks `out` against the run's settings and writes run.json for a new run; returns a
    refusal (one line) or None."""
    run_file = out / RUN_FILE
    ours = [name for name in (CHECKPOINT, EMA_FILE, ROWS_FILE, PROMPTS_FILE)
            if (out / name).exists()]
    if not run_file.exists():
        if ours:
            return (f"out {out} holds training files ({', '.join(ours)}) but no {RUN_FILE}: "
                    "not a run this harness can resume; give another out folder")
        _write_json(run_file, {"format": RUN_FORMAT, "settings": settings, **record})
        return None
    try:
        there = json.loads(run_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        return f"out {out}: {RUN_FILE} is not JSON ({err}); give another out folder"
    if not isinstance(there, dict) or there.get("format") != RUN_FORMAT:
        return (f"out {out}: {RUN_FILE} is not a training run's (format "
                f"{there.get('format') if isinstance(there, dict) else None!r}); give "
                "another out folder")
    found = _difference(there.get("settings"), settings)
    if found:
        key, old, new = found
        return (f"out {out} holds another run ({key}: {_short(old)} there, {_short(new)} "
                "here); give another out folder, or the same settings to resume it")
    if (out / CHECKPOINT).exists() and not resume:
        return (f"out {out} holds this run's checkpoint; resume it (resume=True, the default) "
                "or give another out folder")
    return None


#################################################################################
#                                   Training                                    #
#################################################################################

class _StopSignals:
    """SIGINT / SIGTERM while training: the first asks the loop to stop after the current step
    (and write a checkpoint), a second aborts at once (KeyboardInterrupt). A signal within
    `repeat_s` of the first counts as the same one: on Ctrl-C under torchrun every worker gets
    the terminal's SIGINT and, milliseconds later, the one torchrun forwards. Installed in the
    main thread only (Python delivers signals there)."""
    repeat_s = 0.5

    def __init__(self):
        self.received: int | None = None
        self._at = 0.0
        self._previous = {}

    def _handle(self, signum, frame):
        if self.received is None:
            self.received, self._at = signum, time.monotonic()
        elif time.monotonic() - self._at > self.repeat_s:
            raise KeyboardInterrupt(f"a second {signal.Signals(signum).name}: aborted")

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def _all_sum(values: Tensor) -> Tensor:
    """`values` summed over ranks (itself on one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


def _backend(model: nn.Module) -> str:
    return ",".join(sorted({m.backend for m in attention_modules(model).values()})) or "none"


@dataclass(frozen=True)
class _Run:
    """A run's checked arguments, what train() hands each rank."""
    model_name: str
    fields: dict               # the config fields: the data's and the overrides
    config: object
    data: "datasets.ImageSet"
    labelled: bool
    classes: int
    size: int                  # image side, pixels
    side: int                  # latent side (the image side in pixel space)
    vae: object | None
    space: dict
    objective: str
    steps: int
    per_step: int              # closed-form training FLOPs of one step
    options: TrainOptions
    settings: dict             # run.json's identity of the run
    out: Path
    store: Store
    resume: bool
    progress: bool


def train(model_name: str, data, out: str | os.PathLike, *, size: int,
          overrides: dict | None = None, options: TrainOptions = TrainOptions(), vae=None,
          progress: bool = True, resume: bool = True) -> dict:
    """Trains `model_name` (a registry name, with config `overrides`) on `data` (an
    analysis.training.datasets.ImageSet, or a name / path that analysis.training.datasets.load
    reads at `size`,
    train split, options.seed) of `size`×`size`-px images into the run folder `out`; returns
    the final row (every rank; rank 0 appends it to out/train.jsonl). `vae`: None or
    PixelSpace(C) trains on the pixels, an AutoencoderKL (or its folder) on its latents.
    `resume`: continue this run from out/checkpoint.pt if there is one (else a folder holding
    this run's checkpoint is refused). See the module docstring for the conventions.

    Under torchrun every rank trains its rows of each global batch (DDP; gloo on the CPU, nccl
    on CUDA) and rank 0 writes. SIGINT / SIGTERM stop the run after the current step with a
    checkpoint (TrainingInterrupted, a KeyboardInterrupt, is raised after it is written); a
    second one aborts at once. Any other failure appends a row whose status is the error, then
    raises."""
    if options.steps is None and options.budget_tflop is None and options.budget_seconds is None:
        raise ValueError("give options.steps, options.budget_tflop or options.budget_seconds "
                         "(how long to train)")
    if not _is_int(size) or size < 1:
        raise ValueError(f"size must be a positive int (image side in pixels), got {size!r}")
    overrides = dict(overrides or {})
    device = check_device(options.device, "device")
    out = check_writable_folder(out, "out")
    base = ptdit.get_config(model_name, **overrides)          # unknown names / fields fail here
    objective = objectives.objective_for(base.family, options.objective)
    data = _image_set(data, size, options.seed)
    vae, space = _space(vae, data.images.shape[1])
    factor = space["factor"]
    if size % factor:
        raise ValueError(f"size {size} px is not a multiple of the VAE factor {factor}; "
                         f"nearest valid: {either(nearest_multiples(size, factor))} px")
    labelled = data.labels is not None
    classes = data.num_classes if labelled else 1
    fields = _model_fields(base, model_name, space["channels"], size // factor, classes,
                           options.cond_dropout, overrides)
    config = ptdit.get_config(model_name, **fields)
    side = _check_grid(config, model_name, size, factor)
    tokens_text = _text_tokens(config)
    per_step = train_flops_per_step(config, side, options.batch_size, tokens_text)
    steps = (options.steps if options.steps is not None
             else steps_for_budget(options.budget_tflop, per_step)
             if options.budget_tflop is not None else UNTIL_TIME)
    settings = json.loads(json.dumps({
        "model": model_name, "model_config": dataclasses.asdict(config),
        "data": {"info": data.info, "sha256": _data_sha256(data), "count": len(data.images),
                 "size": size, "labelled": labelled, "num_classes": classes},
        "space": space, "objective": objective, "text_tokens": tokens_text,
        "options": {k: getattr(options, k) for k in IDENTITY_OPTIONS} | {"objective":
                                                                         objective}}))
    store = Store(out / ROWS_FILE, "train").check()
    run = _Run(model_name, fields, config, data, labelled, classes, size, side, vae, space,
               objective, steps, per_step, options, settings, out, store, resume, progress)
    with process_group(device) as (rank, world, device), contextlib.ExitStack() as held:
        return _train(run, rank, world, device, held)


def _train(run: _Run, rank: int, world: int, device: torch.device,
           held: contextlib.ExitStack) -> dict:
    """train()'s work on each rank, once its arguments are checked."""
    options, out, store, config = run.options, run.out, run.store, run.config
    B, accum, steps = options.batch_size, options.grad_accum, run.steps
    if B % (accum * world):
        raise ValueError(f"batch_size {B} does not split into grad_accum {accum} × {world} "
                         f"ranks equal micro-batches; nearest valid batch_size: "
                         f"{either(nearest_multiples(B, accum * world))}")
    refusal = None
    if rank == 0:
        made = [p for p in (*reversed(out.parents), out) if not p.exists()]
        try:
            out.mkdir(parents=True, exist_ok=True)
            held.enter_context(store.lock())   # one trainer per folder
            refusal = _prepare_folder(out, run.settings, {
                "options": dataclasses.asdict(options),
                "steps": None if steps == UNTIL_TIME else steps,
                "overrides": run.fields, "created_by": "analysis.training.harness.train",
                "git_sha": git_sha()}, run.resume)
        except (ValueError, OSError) as err:
            refusal = str(err)
        if refusal is not None:
            held.close()
            for folder in reversed(made):
                with contextlib.suppress(OSError):
                    folder.rmdir()
    refusal = broadcast(refusal)
    if refusal is not None:
        raise ValueError(refusal)

    # the data, on the CPU: pixels, or latents encoded once (and their flips)
    images = run.data.images
    flipped = None
    if run.vae is not None:
        latents = _encode(run.vae, images, run.space, options.seed, "latents", device)
        if options.flip:
            flipped = _encode(run.vae, images.flip(-1), run.space, options.seed,
                              "flipped latents", device)
        images = latents
    labels = (run.data.labels if run.labelled
              else torch.zeros(len(images), dtype=torch.int64))
    captions = _captions(config, run.classes, options.seed)
    if rank == 0 and captions is not None and not (out / PROMPTS_FILE).exists():
        _atomic(out / PROMPTS_FILE, lambda tmp: save_file(captions, str(tmp)))

    model = ptdit.build(run.model_name, seed=options.seed, **run.fields).to(device)
    ema = copy.deepcopy(model).requires_grad_(False) if rank == 0 else None
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.lr, betas=(0.9, 0.999),
                                  weight_decay=options.weight_decay)
    warmup = options.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda k: min(1.0, (k + 1) / warmup) if warmup else 1.0)
    generator = torch.Generator().manual_seed(_stream_seed(options.seed, "draws"))
    state = {"step": 0, "epoch": 0, "index": 0, "train_s": 0.0}
    checkpoint_file = out / CHECKPOINT
    if run.resume and checkpoint_file.exists():
        saved = torch.load(checkpoint_file, map_location="cpu", weights_only=True)
        if saved.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{checkpoint_file} is not a training checkpoint (format "
                             f"{saved.get('format')!r}, expected {CHECKPOINT_FORMAT!r})")
        model.load_state_dict(saved["model"])
        if ema is not None:
            ema.load_state_dict(saved["ema"])
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        _restore_rng(saved["rng"], generator)
        state = {k: saved[k] for k in state}
    if state["step"] > steps:
        raise ValueError(f"the run in {out} is at step {state['step']}, past the {steps} "
                         f"steps asked for; give steps >= {state['step']}")
    apply_block_options(model, compile=options.compile,
                        grad_checkpointing=options.grad_checkpointing)
    if world > 1:
        forward = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    else:
        forward = model
    order = DataOrder(len(images), options.seed, state["epoch"], state["index"])
    shape = tuple(images.shape[1:])
    tokens = (run.side // config.patch_size) ** 2
    info = {"format": INFO_FORMAT, "model": run.model_name,
            "model_config": run.settings["model_config"], "objective": run.objective,
            "sampler": objectives.scheduler_for(config.family, run.objective),
            "space": run.space, "image_size": run.size, "latent_size": run.side,
            "condition": config.condition, "num_classes": run.classes,
            "labelled": run.labelled, "cond_dropout": options.cond_dropout,
            "null_condition": ("null class" if config.condition == "class" else
                               "learned null caption" if learned_null(model) is not None
                               else f"null_embedding of {PROMPTS_FILE}"),
            "prompt_embeddings": PROMPTS_FILE if captions is not None else None,
            "text_tokens": _text_tokens(config), "dataset": run.data.info,
            "checkpoint": CHECKPOINT, "steps": None if steps == UNTIL_TIME else steps}
    backend = _backend(model)

    def export(step: int) -> None:
        """Rank 0 writes the EMA weights and their sidecar, each atomically."""
        if rank == 0:
            _atomic(out / EMA_FILE, lambda tmp: ptdit.interop.save(ema, tmp, force=True))
            _write_json(_sidecar(out / EMA_FILE), {**info, "step": step,
                                                   "options": dataclasses.asdict(options)})

    def save(step: int, train_s: float) -> None:
        """Rank 0 writes the checkpoint, then exports the EMA weights, each atomically."""
        if rank == 0:
            saved = {"format": CHECKPOINT_FORMAT, "step": step, "epoch": order.epoch,
                     "index": order.index, "train_s": train_s, "model": model.state_dict(),
                     "ema": ema.state_dict(), "optimizer": optimizer.state_dict(),
                     "scheduler": scheduler.state_dict(), "rng": _rng_states(generator),
                     "options": dataclasses.asdict(options), "model_config":
                     dataclasses.asdict(config), "settings": run.settings}
            _atomic(checkpoint_file, lambda tmp: torch.save(saved, tmp))
        export(step)

    def row(event: str, step: int, stats: dict, seconds: float, session_s: float,
            train_s: float, status: str = "ok") -> dict:
        images_per_s = stats["steps"] * B / seconds if stats["steps"] and seconds else None
        return {
            **provenance(device_label(device), backend, options.dtype),
            "model": run.model_name, "resolution": run.size, "latent_frames": 1,
            "tokens": tokens, "batch": B, "status": status, "event": event,
            "step": step, "steps": None if steps == UNTIL_TIME else steps,
            "epochs": step * B / len(images),
            "loss": stats.get("loss"), **{f"loss_{k}": v for k, v in stats["parts"].items()},
            "logged_steps": stats["steps"], "lr": stats.get("lr"),
            "grad_norm": stats.get("grad_norm"), "images_per_s": images_per_s,
            "tokens_per_s": images_per_s * tokens if images_per_s else None,
            "tflop_per_s": (stats["steps"] * run.per_step / seconds / 1e12
                            if stats["steps"] and seconds else None),
            "tflop_spent": step * run.per_step / 1e12,
            "train_tflop_per_step": run.per_step / 1e12, "flops_convention": FLOPS_CONVENTION,
            "wall_s": session_s, "train_s": train_s, "world_size": world,
            "objective": run.objective, "space": run.space["kind"],
            "channels": run.space["channels"], "latent_size": run.side,
            "model_config": json.dumps(run.settings["model_config"], sort_keys=True),
            "dataset": run.data.info.get("name"), "dataset_sha256":
            run.settings["data"]["sha256"], "options": dataclasses.asdict(options),
            "out": str(out)}

    began = time.perf_counter()
    step = state["step"]
    timed = options.budget_seconds is not None
    if timed and state["train_s"] >= options.budget_seconds:
        steps = step            # the clock ran out in an earlier session
    if step == steps:   # finished already: export again (the same weights) and report
        export(step)
        barrier()
        finals = [r for r in store.rows() if r.get("event") == "final" and r.get("step") == step]
        if finals:
            return finals[-1]
        summary = row("final", step, {"steps": 0, "parts": {}}, 0.0, 0.0, state["train_s"])
        return store.append(summary) if rank == 0 else summary

    micro = B // accum          # rows of one micro-batch, all ranks
    mine = micro // world       # this rank's rows of it
    autocast = torch.autocast(device.type, dtype=torch.bfloat16,
                              enabled=options.dtype == "bfloat16")
    sums, logged, last = None, 0, {}
    window_start, excluded = time.perf_counter(), 0.0
    bar = tqdm(total=None if timed else steps, initial=step, unit="step",
               desc=f"training {run.model_name}",
               disable=not run.progress or rank != 0)

    def flush(event: str, step: int) -> dict:
        """Reduces the window's sums over ranks into one row (appended by rank 0)."""
        nonlocal sums, logged, window_start, excluded
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - window_start - excluded
        state["train_s"] += seconds
        stats = {"steps": logged, "parts": {}, **last}
        if sums is not None:
            totals = _all_sum(torch.stack(list(sums.values()))).tolist()
            count = logged * B
            stats["loss"] = totals[0] / count
            stats["parts"] = {k: v / count for k, v in zip(list(sums)[1:], totals[1:])}
        summary = row(event, step, stats, seconds, time.perf_counter() - began,
                      state["train_s"])
        if rank == 0:
            summary = store.append(summary)
            bar.set_postfix(loss=f"{stats.get('loss', float('nan')):.4g}",
                            img_s=f"{summary['images_per_s'] or 0:.1f}")
        sums, logged = None, 0
        window_start, excluded = time.perf_counter(), 0.0
        return summary

    stop = held.enter_context(_StopSignals())
    try:
        while step < steps:
            indices = order.take(B)
            draws = _draws(generator, B, shape, run.objective, options.flip,
                           options.cond_dropout)
            optimizer.zero_grad(set_to_none=True)
            last = {"lr": scheduler.get_last_lr()[0]}
            for m in range(accum):
                rows = slice(m * micro + rank * mine, m * micro + (rank + 1) * mine)
                picked = indices[rows]
                x0 = images[picked]
                if draws["flip"] is not None:
                    flip = draws["flip"][rows]
                    other = x0.flip(-1) if flipped is None else flipped[picked]
                    x0 = torch.where(flip[:, None, None, None], other, x0)
                drop = draws["drop"][rows] if draws["drop"] is not None else None
                kwargs = _condition(model, labels[picked], drop, captions, run.size, device)
                sync = (contextlib.nullcontext() if world == 1 or m == accum - 1
                        else forward.no_sync())
                with sync:
                    with autocast:
                        total, parts = objectives.loss(forward, x0.to(device), kwargs,
                                                       run.objective, draws["t"][rows],
                                                       draws["noise"][rows])
                    (total / accum).backward()
                values = {"loss": total.detach().float() * mine,
                          **{k: v.float().sum() for k, v in parts.items()}}
                sums = values if sums is None else {k: sums[k] + values[k] for k in sums}
            if options.grad_clip is not None:
                norm = nn.utils.clip_grad_norm_(params, options.grad_clip)
            else:
                norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            optimizer.step()
            scheduler.step()
            if ema is not None:
                _update_ema(ema, model, options.ema_decay)
            step += 1
            logged += 1
            last["grad_norm"] = norm
            bar.update(1)
            stopping = stop.received is not None
            spent = (timed and state["train_s"] + time.perf_counter() - window_start
                     - excluded >= options.budget_seconds)
            if world > 1:   # every rank stops at the same step
                flags = torch.tensor([float(stopping), float(spent)], device=device if
                                     dist.get_backend() == "nccl" else "cpu")
                stopping, spent = (bool(v) for v in _all_sum(flags).tolist())
            if spent:
                steps = step     # the time budget is spent: this step is the last
            if stopping or step == steps or step % options.log_every == 0:
                last["grad_norm"] = float(last["grad_norm"])
                summary = flush("interrupted" if stopping and step < steps else
                                "final" if step == steps else "log", step)
            if stopping or step == steps or step % options.checkpoint_every == 0:
                mark = time.perf_counter()
                save(step, state["train_s"] + mark - window_start - excluded)
                excluded += time.perf_counter() - mark
            if stopping and step < steps:
                barrier()
                name = signal.Signals(stop.received).name if stop.received else "another rank"
                raise TrainingInterrupted(
                    f"stopped by {name} after step {step} of {steps}; checkpoint written to "
                    f"{checkpoint_file}: run the same command again to resume")
    except KeyboardInterrupt:
        raise
    except BaseException as err:
        if rank == 0:
            store.append(row("error", step, {"steps": 0, "parts": {}}, 0.0,
                             time.perf_counter() - began, state["train_s"], status_of(err)))
        raise
    finally:
        bar.close()
    barrier()   # rank 0's files are written
    return summary

