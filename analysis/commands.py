"""The analysis commands as library calls — `ptdit sample`, `fid`, `clip-score`, `attention` —
each taking the command's options by name, checking every one of them (devices, outputs,
weights files, non-finite numbers) before any work, and returning what the command reports.
analysis/cli.py is the argparse face of these; a notebook or script can call them directly.

Models: a checkpoint (ptdit.load), or random weights drawn from `init_seed` (default: the run's
`seed`), so that two runs build the same weights and the rows can say which.
"""

import math
import os
from pathlib import Path

from torch import nn

from bench.store import Store, check_writable, check_writable_folder
from ptdit.checks import check_device

from .offline import CLIP, INCEPTION, VAE, go_offline

#################################################################################
#                       Inputs: model, conditions, outputs                      #
#################################################################################


def init_seed_of(checkpoint, init_seed: int | None, seed: int) -> int | None:
    """The seed of untrained weights (`init_seed`, else `seed`); None with a checkpoint."""
    if checkpoint is not None:
        return None
    return seed if init_seed is None else init_seed


def build_model(name: str | None, checkpoint=None, overrides=(),
                init_seed: int | None = 0) -> nn.Module:
    """`name` loaded from `checkpoint` (None: whatever model the file holds: a file ptdit
    wrote carries its config), else built with random weights from `init_seed`
    (ptdit.build(seed=…)) and the config `overrides` ((field, value) pairs)."""
    import ptdit

    if name is None and checkpoint is None:
        raise ValueError("give --model NAME (random weights), or --checkpoint FILE")
    overrides = dict(overrides)
    bad = [f"{k}={v}" for k, v in overrides.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise ValueError(f"--override {' '.join(bad)}: not finite; allowed: finite numbers")
    if checkpoint is None:
        return ptdit.build(name, seed=init_seed, **overrides)
    if overrides:
        raise ValueError("--override changes a model's layers, so it cannot apply to "
                         f"--checkpoint {checkpoint}; drop one of them")
    if not Path(checkpoint).exists():
        raise ValueError(f"--checkpoint {checkpoint} does not exist")
    return ptdit.load(checkpoint, name=name)


def trained(checkpoint) -> dict:
    """What a model trained by `ptdit train` says about sampling it (analysis.training.harness
    .checkpoint_info): {"vae": PixelSpace(C) for a pixel-space model, "scheduler": the sampler
    that inverts its objective, "class_labels" / "prompt_embeddings": its classes or the
    caption file its training wrote}; {} for any other checkpoint (or none)."""
    if checkpoint is None or not Path(checkpoint).is_file():
        return {}
    from .training.harness import checkpoint_info

    info = checkpoint_info(checkpoint)
    if info is None:
        return {}
    from .sampling import PixelSpace

    defaults = {"scheduler": info["sampler"]}
    if info["space"]["kind"] == "pixel":
        defaults["vae"] = PixelSpace(info["space"]["channels"])
    if info["condition"] == "class":
        defaults["class_labels"] = f"0-{info['num_classes'] - 1}"
    else:
        defaults["prompt_embeddings"] = info["prompt_embeddings"]
    return defaults


def model_conditions(model: nn.Module, *, class_labels=None, prompt_embeddings=None,
                     prompts=None, t5=None, device="cpu", default_labels: str | None = None):
    """The conditions of exactly one of --class-labels, --prompt-embeddings, --prompts (with
    --t5); `default_labels` when none is given to a class model."""
    from . import conditions

    given = [flag for flag, value in (("--class-labels", class_labels),
                                      ("--prompt-embeddings", prompt_embeddings),
                                      ("--prompts", prompts)) if value is not None]
    if len(given) > 1:
        raise ValueError(f"give one of --class-labels, --prompt-embeddings or --prompts, not "
                         f"{' and '.join(given)}")
    if not given and default_labels is not None and model.config.condition == "class":
        class_labels = default_labels
    elif not given:
        what = ("--prompt-embeddings FILE (`embeddings` (N, L, C) and `mask` (N, L) T5 "
                "features) or --prompts FILE with --t5 DIR"
                if model.config.condition == "text" else "--class-labels SPEC")
        raise ValueError(f"{getattr(model, 'name', None) or model.config.family} is "
                         f"{model.config.condition}-conditioned: give {what}")
    if class_labels is not None:
        return conditions.class_conditions(class_labels)
    if prompt_embeddings is not None:
        return conditions.prompt_embeddings(prompt_embeddings)
    return conditions.encode_prompts(prompts, t5, conditions.text_tokens(model), device=device)


def check_outputs(outputs: dict[str, tuple[str | os.PathLike, bool]]) -> None:
    """That each output ({flag: (path, is a folder)}) can be written; creates nothing."""
    for flag, (path, folder) in outputs.items():
        (check_writable_folder if folder else check_writable)(path, flag)


#################################################################################
#                                     sample                                    #
#################################################################################

def sample(*, model: str, vae, resolution, out, num_samples: int, checkpoint=None,
           overrides=(), seed: int = 0, init_seed: int | None = None, frames: int | None = None,
           class_labels=None, prompt_embeddings=None, prompts=None, t5=None,
           first_index: int = 0, scheduler: str | None = None, sampler_steps: int | None = None,
           cfg_scale: float | None = None, guidance_channels: str | None = None,
           batch_size: int = 16, device="cpu", dtype="float32", npz: bool = False,
           store=None) -> dict | None:
    """`ptdit sample` (analysis.sampling.sample under one process group): the run's row on
    rank 0, None on the other ranks."""
    device = check_device(device, "--device")
    check_outputs({"--out": (out, True), "--store": (store or Path(out) / "samples.jsonl",
                                                      False)})
    go_offline()
    made_here = trained(checkpoint)   # a model of `ptdit train`: its space, sampler, classes
    if vae is None and "vae" in made_here:
        vae = made_here["vae"]
    else:
        VAE.path(vae)        # a missing folder fails in a moment, before the heavy imports
    if class_labels is None and prompt_embeddings is None and prompts is None:
        class_labels = made_here.get("class_labels")
        prompt_embeddings = made_here.get("prompt_embeddings")
    scheduler = scheduler or made_here.get("scheduler")
    from .distributed import process_group
    from .sampling import PixelSpace, load_vae
    from .sampling import sample as run

    vae = vae if isinstance(vae, PixelSpace) else load_vae(vae)
    seeded = init_seed_of(checkpoint, init_seed, seed)
    with process_group(device) as (rank, _, device):
        net = build_model(model, checkpoint, overrides, seeded)
        row = run(net, vae=vae, conditions=model_conditions(
                      net, class_labels=class_labels, prompt_embeddings=prompt_embeddings,
                      prompts=prompts, t5=t5, device=device),
                  num=num_samples, out=out, resolution=resolution, scheduler=scheduler,
                  steps=sampler_steps, cfg_scale=cfg_scale, guidance_channels=guidance_channels,
                  seed=seed, start=first_index, batch_size=batch_size, frames=frames,
                  device=device, dtype=dtype, write_npz=npz, store=store,
                  checkpoint=checkpoint, init_seed=seeded)
        return row if rank == 0 else None


#################################################################################
#                                fid, clip-score                                #
#################################################################################

def metrics_store(samples, store=None) -> Store:
    """The results store of a metric's row: `store`, else SAMPLES/metrics.jsonl beside a
    folder (SAMPLES.metrics.jsonl beside an .npz); checked to be writable and to hold metric
    rows, nothing created until the row is appended."""
    if store is None:
        samples = Path(samples)
        store = (samples / "metrics.jsonl" if samples.is_dir()
                 else samples.with_name(samples.name + ".metrics.jsonl"))
    return Store(check_writable(store, "--store"), "metrics").check()


def _metric(samples, store, device, weights, compute) -> tuple[dict, Path] | None:
    """Checks the device, the store and the weights file, then runs compute(device) on every
    rank (under torchrun: sharded, one process group); rank 0 appends the row. Returns (row,
    store path) on rank 0, None on the others."""
    from .distributed import process_group

    device = check_device(device, "--device")
    store = metrics_store(samples, store)
    weights()                                # fails in a moment, before the heavy imports
    go_offline()
    with process_group(device) as (rank, _, device):
        row = compute(device)
        return (store.append(row), store.path) if rank == 0 else None


def fid(*, samples, reference, inception_weights=None, antialias: bool = False,
        batch_size: int = 50, cache_dir=None, device="cpu", store=None):
    """`ptdit fid` (analysis.metrics.fid.fid): (row, store path) on rank 0, else None."""
    def compute(device):
        from .metrics.fid import fid as run
        return run(samples, reference, inception_weights=inception_weights,
                   batch_size=batch_size, device=device, antialias=antialias,
                   cache_dir=cache_dir)
    return _metric(samples, store, device, lambda: INCEPTION.path(inception_weights), compute)


def clip_score(*, samples, captions, clip_weights=None, batch_size: int = 64, device="cpu",
               store=None):
    """`ptdit clip-score` (analysis.metrics.clip_score): (row, store path) on rank 0."""
    def compute(device):
        from .metrics.clip_score import clip_score as run
        return run(samples, captions, clip_weights=clip_weights, batch_size=batch_size,
                   device=device)
    return _metric(samples, store, device, lambda: CLIP.path(clip_weights), compute)


#################################################################################
#                                   attention                                   #
#################################################################################

def attention(*, model: str, resolution, out, checkpoint=None, overrides=(), seed: int = 0,
              init_seed: int | None = None, frames: int | None = None, images=None, vae=None,
              class_labels=None, prompt_embeddings=None, sampler_steps: int = 25,
              analyse_steps=None, scheduler=None, cfg_scale=None, window_sides=None,
              edge_margin=None, layers=None, heads=None, num_samples: int = 1,
              headwise: bool = False, max_pairs: int = 2048, force: bool = False):
    """`ptdit attention` (analysis.attention_run.run): the run's Result."""
    from .attention_run import run

    if not isinstance(resolution, int):
        raise ValueError(f"--resolution {resolution[0]}x{resolution[1]}: the attention "
                         "analysis takes square images; give one side in pixels")
    for flag, value in (("--sampler-steps", sampler_steps), ("--num-samples", num_samples),
                        ("--edge-margin", edge_margin), ("--max-pairs", max_pairs)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1, got {value}")
    if cfg_scale is not None and not math.isfinite(cfg_scale):
        raise ValueError(f"--cfg-scale must be a finite number, got {cfg_scale}")
    if vae is not None and images is None:
        raise ValueError("--vae encodes the real images of --images; give both, or neither "
                         "to analyse the sampler's own trajectory")
    check_outputs({"--out": (out, True)})
    made_here = trained(checkpoint)   # a model of `ptdit train`: its space, sampler, classes
    scheduler = scheduler or made_here.get("scheduler")
    if class_labels is None and prompt_embeddings is None:
        prompt_embeddings = made_here.get("prompt_embeddings")
    if vae is None and "vae" in made_here:
        vae = made_here["vae"]
    elif vae is not None:
        go_offline()
        VAE.path(vae)
        from .sampling import load_vae
        vae = load_vae(vae)
    seeded = init_seed_of(checkpoint, init_seed, seed)
    net = build_model(model, checkpoint, overrides, seeded)
    conditions = model_conditions(net, class_labels=class_labels,
                                  prompt_embeddings=prompt_embeddings, default_labels="0")
    return run(net, conditions, out=out, resolution=resolution, frames=frames, images=images,
               vae=vae, scheduler=scheduler, steps=sampler_steps, analyse_steps=analyse_steps,
               cfg_scale=cfg_scale, seed=seed, samples=num_samples, windows=window_sides,
               layers=layers, heads=heads, headwise=headwise, max_pairs=max_pairs,
               edge_margin=edge_margin, checkpoint=checkpoint, init_seed=seeded, force=force)


#################################################################################
#                        train, study, digits-classifier                        #
#################################################################################

def train(*, model: str, data: str, resolution, out, overrides=(), vae=None,
          train_steps: int | None = None, budget_tflop: float | None = None,
          budget_seconds: float | None = None, batch_size: int = 64, grad_accum: int = 1,
          lr: float = 1e-4, warmup_steps: int = 0, weight_decay: float = 0.0,
          grad_clip: float | None = 1.0, ema_decay: float = 0.9999, seed: int = 0,
          dtype: str = "float32", objective: str | None = None, cond_dropout: float = 0.1,
          flip: bool = True, checkpoint_every: int = 500, log_every: int = 10,
          compile: bool = False, grad_checkpointing: bool = False, device="cpu",
          progress: bool = True) -> dict:
    """`ptdit train` (analysis.training.harness.train): the run's final row."""
    if not isinstance(resolution, int):
        raise ValueError(f"--resolution {resolution[0]}x{resolution[1]}: training takes square "
                         "images; give one side in pixels")
    if sum(v is not None for v in (train_steps, budget_tflop, budget_seconds)) != 1:
        raise ValueError("give exactly one of --train-steps, --budget-tflop and "
                         "--budget-seconds (how long to train)")
    device = check_device(device, "--device")
    check_outputs({"--out": (out, True)})
    go_offline()
    if vae is not None:
        VAE.path(vae)
    from .training.harness import TrainOptions
    from .training.harness import train as run

    overrides = dict(overrides)
    options = TrainOptions(
        steps=train_steps, budget_tflop=budget_tflop, budget_seconds=budget_seconds,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, ema_decay=ema_decay, seed=seed,
        dtype=dtype, objective=objective, cond_dropout=cond_dropout, flip=flip,
        checkpoint_every=checkpoint_every, log_every=log_every, compile=compile,
        grad_checkpointing=grad_checkpointing, device=str(device))
    if vae is not None:
        from .sampling import load_vae
        vae = load_vae(vae)
    return run(model, data, out, size=resolution, overrides=overrides, options=options,
               vae=vae, progress=progress)


def study(*, file, out, smoke: bool = False, progress: bool = True) -> dict:
    """`ptdit study` (analysis.training.study.run, then analysis.training.study_report.report):
    the files the
    report wrote."""
    from .training import study as studies
    from .training.study_report import report

    spec = studies.load(file)
    if smoke:
        spec = studies.smoke(spec)
    check_outputs({"--out": (out, True)})
    studies.run(spec, out, progress=progress)
    return report(out)


def digits_classifier(*, size: int = 32, cache_dir=None) -> dict:
    """`ptdit digits-classifier` (analysis.metrics.digits.main_make): trains the classifier of
    the digits Fréchet distance and caches it; its info (test accuracy, file)."""
    from .metrics.digits import main_make

    return main_make(size, cache_dir)
