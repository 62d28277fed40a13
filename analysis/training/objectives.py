"""Training objectives that analysis.sampling's schedulers invert exactly: IDDPM's learned-sigma
hybrid loss (DiT, PixArt-α) and rectified flow (PT-DiT).

    from analysis.training import objectives
    objective = objectives.objective_for(model.config.family)        # "iddpm" for DiT
    t, u = objectives.draw(objective, global_batch, generator)      # the same on every rank
    noise = objectives.draw_noise((global_batch, *x0.shape[1:]), generator)
    mine = slice(rank * len(x0), (rank + 1) * len(x0))              # this rank's rows
    total, parts = objectives.loss(model, x0, {"y": labels}, objective, t[mine], noise[mine])
    total.backward()
    sampler = objectives.scheduler_for(model.config.family, objective)   # "ddpm" for DiT

Objectives
- "iddpm": DiT's train.py with create_diffusion's defaults (learn_sigma=True, loss type MSE, no
  rescaling), which PixArt-α trains with too (IDDPM, Nichol & Dhariwal 2021, arXiv:2102.09672).
  Linear betas 1e-4..0.02 over T = 1000 steps (the constants in float64), t uniform in
  {0..T-1}, x_t = sqrt(ᾱ_t)·x0 + sqrt(1-ᾱ_t)·ε. The first C output channels predict ε:
  mse = mean over (C, [F,] H, W) of (ε - ε̂)². With 2C output channels the last C give v,
  log σ² = frac·log β_t + (1-frac)·log β̃_t, frac = (v+1)/2, β̃_t the posterior variance (β̃_0
  clipped to β̃_1, as IDDPM), trained by vb = KL(q(x_{t-1}|x_t, x0) ‖ p(x_{t-1}|x_t)) in bits
  per dim with the mean from the DETACHED ε̂ (only v learns from vb), and at t = 0 the
  discretized Gaussian decoder NLL in bits per dim (bins of 2/255 on [-1, 1], the outer bins
  open, with IDDPM's tanh approximation of the normal CDF). Per sample: mse + vb. Models with C
  output channels get mse only. Inverted by "ddpm" (DiT's sampler: eps + learned variance) and
  "dpm" (PixArt-α's: eps only).
- "flow": rectified flow as analysis.sampling's "flow" sampler integrates it (diffusers'
  FlowMatchEulerDiscreteScheduler, shift 1): σ uniform in [0, 1) (rectified flow's uniform
  time, which shift 1 assumes; no logit-normal weighting), x_σ = (1-σ)·x0 + σ·ε, the model gets
  t = T·σ, and its first C output channels predict the velocity v = ε - x0 (the sampler's
  x_next = x + (σ_next - σ)·v): mse = mean over (C, [F,] H, W) of (ε - x0 - v̂)². A model built
  with learned sigma (2C output channels) keeps its last C channels, but the loss never reads
  them, so they get no gradient (only weight decay, if any, moves their final-layer rows); the
  "flow" sampler reads the first C channels only.

Draws: `draw` makes the per-sample draws of a GLOBAL batch from one generator, so a trainer on
any number of ranks draws the same (t, u) and takes its own rows: t the model's timesteps,
u (float64, [0, 1)) the uniform draw t derives from, i.e. the noise level as a fraction
(iddpm: t = ⌊T·u⌋; flow: σ = u, t = T·σ). `draw_noise` draws ε (float32) from the same kind
of generator. The loss reads only t: flow's σ is t / T.

The loss runs the model once, `model(x_t, t, **model_kwargs)` (model_kwargs: the condition
arguments, e.g. {"y": labels} for DiT, {"text": captions, "text_mask": mask} for text models),
so a DistributedDataParallel or autocast wrapper around it works as it does for a forward;
the terms are computed in float32 (float64 for float64 data), whatever the model's dtype.
"""

import functools
import math

import torch
from torch import Tensor, nn

from ..recipes import FAMILY_RECIPES, TRAIN_TIMESTEPS

__all__ = ["FAMILY_OBJECTIVES", "OBJECTIVES", "SAMPLER_OF", "draw", "draw_noise", "loss",
           "objective_for", "scheduler_for"]

OBJECTIVES = ("iddpm", "flow")
FAMILY_OBJECTIVES = {"DiT": "iddpm", "PixArt": "iddpm", "PT-DiT": "flow"}
SAMPLER_OF = {"iddpm": "ddpm", "flow": "flow"}   # the sampler that inverts it, by default
INVERTED_BY = {"iddpm": ("ddpm", "dpm"), "flow": ("flow",)}   # every sampler that does
BETA_START, BETA_END = 1e-4, 0.02   # linear betas, as analysis.sampling.make_scheduler


#################################################################################
#                          Objectives, families, samplers                       #
#################################################################################

def objective_for(family: str, name: str | None = None) -> str:
    """The objective a `family` model trains with: `name` checked, or (None) the family's own
    (FAMILY_OBJECTIVES)."""
    if family not in FAMILY_OBJECTIVES:
        raise ValueError(f"no training objective for model family {family!r}; allowed: "
                         f"{', '.join(FAMILY_OBJECTIVES)}")
    if name is None:
        return FAMILY_OBJECTIVES[family]
    if name not in OBJECTIVES:
        raise ValueError(f"unknown training objective {name!r}; allowed: {', '.join(OBJECTIVES)}"
                         f" ({family}'s own: {FAMILY_OBJECTIVES[family]})")
    return name


def scheduler_for(family: str, objective: str) -> str:
    """The analysis.sampling scheduler that inverts `objective` for a `family` model: the
    family's release's sampler when it inverts the objective (DiT "ddpm", PixArt "dpm", PT-DiT
    "flow"), else SAMPLER_OF[objective] (e.g. PT-DiT trained with "iddpm" samples with
    "ddpm", DiT trained with "flow" with "flow")."""
    objective = objective_for(family, objective)
    release = FAMILY_RECIPES[family].scheduler
    return release if release in INVERTED_BY[objective] else SAMPLER_OF[objective]


#################################################################################
#                                     Draws                                     #
#################################################################################

def _check_objective(objective: str) -> None:
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown training objective {objective!r}; allowed: "
                         f"{', '.join(OBJECTIVES)}")


def draw(objective: str, batch: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """The per-sample draws of a global batch, (t, u), both (batch,) on the generator's device:
    u float64 uniform in [0, 1) and the model's timesteps t from it — iddpm: int64 ⌊T·u⌋ in
    {0..T-1}; flow: float64 T·u (σ = u). Take each rank's rows of the global batch's draws."""
    _check_objective(objective)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ValueError(f"batch must be a positive int (the global batch), got {batch!r}")
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    u = torch.rand(batch, generator=generator, dtype=torch.float64, device=generator.device)
    if objective == "iddpm":
        return (u * TRAIN_TIMESTEPS).floor().long().clamp_(max=TRAIN_TIMESTEPS - 1), u
    return u * TRAIN_TIMESTEPS, u


def draw_noise(shape: tuple[int, ...], generator: torch.Generator) -> Tensor:
    """ε ~ N(0, I) of `shape` (the data's, e.g. (B, C, H, W)), float32 on the generator's
    device."""
    if not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    shape = tuple(shape)
    if not shape or not all(isinstance(n, int) and n >= 1 for n in shape):
        raise ValueError(f"noise shape must be positive ints, got {shape!r}")
    return torch.randn(shape, generator=generator, dtype=torch.float32, device=generator.device)


#################################################################################
#                         IDDPM's schedule and its terms                        #
#################################################################################

@functools.cache
def schedule() -> dict[str, Tensor]:
    """The diffusion's constants, (T,) float64 on the CPU each, indexed by timestep t: the
    linear betas, ᾱ_t, the q posterior's mean coefficients (of x0 and x_t) and log variance
    (β̃_0 clipped to β̃_1), and the eps -> x0 coefficients. Do not modify (cached)."""
    betas = torch.linspace(BETA_START, BETA_END, TRAIN_TIMESTEPS, dtype=torch.float64)
    alphas = 1.0 - betas
    alphas_cumprod = torch.cumprod(alphas, 0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])   # ᾱ_{t-1}
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)   # β̃_t (0 at t = 0)
    return {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "sqrt_recip_alphas_cumprod": alphas_cumprod.rsqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        "posterior_mean_coef_x0": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef_xt": (1.0 - prev) * alphas.sqrt() / (1.0 - alphas_cumprod),
        "posterior_log_variance": torch.cat([posterior_variance[1:2],
                                             posterior_variance[1:]]).log(),
        "log_betas": betas.log(),
    }


def _at(name: str, t: Tensor, like: Tensor) -> Tensor:
    """schedule()[name] at timesteps t (B,), shaped (B, 1, ...) to broadcast against `like`."""
    values = schedule()[name].to(like.device, like.dtype)[t]   # indexed where t is: no sync
    return values.reshape(-1, *[1] * (like.dim() - 1))


def _mean_flat(x: Tensor) -> Tensor:
    """(B, ...) -> (B,), the mean over all but the batch dimension."""
    return x.flatten(1).mean(1)


def normal_kl(mean1: Tensor, logvar1: Tensor, mean2: Tensor, logvar2: Tensor) -> Tensor:
    """KL(N(mean1, e^logvar1) ‖ N(mean2, e^logvar2)) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_normal_cdf(x: Tensor) -> Tensor:
    """The standard normal CDF by the tanh approximation IDDPM's decoder term uses."""
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x: Tensor, mean: Tensor, log_scale: Tensor) -> Tensor:
    """log P(x) in nats, elementwise, of data x in [-1, 1] on a grid of 256 levels (bins of
    2/255) under N(mean, e^(2·log_scale)); the outer bins extend to ±∞."""
    centered = x - mean
    inv_std = torch.exp(-log_scale)
    cdf_plus = _approx_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = cdf_plus.clamp(min=1e-12).log()                     # lowest bin
    log_one_minus_cdf_min = (1.0 - cdf_min).clamp(min=1e-12).log()      # highest bin
    log_delta = (cdf_plus - cdf_min).clamp(min=1e-12).log()
    return torch.where(x < -0.999, log_cdf_plus,
                       torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def _iddpm_terms(out: Tensor, x0: Tensor, x_t: Tensor, t: Tensor, noise: Tensor
                 ) -> dict[str, Tensor]:
    """IDDPM's per-sample terms (B,) from the model's output (B, C or 2C, ...) at x_t."""
    C = x0.shape[1]
    eps = out[:, :C]
    terms = {"mse": _mean_flat((noise - eps) ** 2)}
    if out.shape[1] == C:
        return terms
    v = out[:, C:]
    # the learned variance trains through vb alone: its mean uses eps with no gradient
    x0_pred = (_at("sqrt_recip_alphas_cumprod", t, x_t) * x_t
               - _at("sqrt_recipm1_alphas_cumprod", t, x_t) * eps.detach())
    coef_x0, coef_xt = _at("posterior_mean_coef_x0", t, x_t), _at("posterior_mean_coef_xt", t, x_t)
    true_mean = coef_x0 * x0 + coef_xt * x_t
    true_log_var = _at("posterior_log_variance", t, x_t)
    model_mean = coef_x0 * x0_pred + coef_xt * x_t
    frac = (v + 1.0) / 2.0
    model_log_var = frac * _at("log_betas", t, x_t) + (1.0 - frac) * true_log_var
    kl = _mean_flat(normal_kl(true_mean, true_log_var.expand_as(x0), model_mean, model_log_var))
    nll = -_mean_flat(discretized_gaussian_log_likelihood(x0, model_mean, 0.5 * model_log_var))
    terms["vb"] = torch.where(t == 0, nll, kl) / math.log(2.0)   # bits per dim
    return terms


#################################################################################
#                                     Loss                                      #
#################################################################################

def _check_inputs(objective: str, x0: Tensor, t: Tensor, noise: Tensor) -> None:
    _check_objective(objective)
    if not isinstance(x0, Tensor) or x0.dim() not in (4, 5) or not x0.is_floating_point():
        got = (f"{x0.dtype} {tuple(x0.shape)}" if isinstance(x0, Tensor)
               else type(x0).__name__)
        raise ValueError(f"x0 must be a float (B, C, H, W) or (B, C, F, H, W) tensor, got {got}")
    B = x0.shape[0]
    if not isinstance(noise, Tensor) or noise.shape != x0.shape:
        got = tuple(noise.shape) if isinstance(noise, Tensor) else type(noise).__name__
        raise ValueError(f"noise must have x0's shape {tuple(x0.shape)}, got {got}")
    if not isinstance(t, Tensor) or t.shape != (B,):
        got = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
        raise ValueError(f"t must be a ({B},) tensor of timesteps (draw()), got {got}")
    if objective == "iddpm":
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"iddpm timesteps must be integers in 0..{TRAIN_TIMESTEPS - 1}, "
                             f"got {t.dtype}")
        low, high = 0, TRAIN_TIMESTEPS - 1
    else:
        if not t.is_floating_point():
            raise ValueError(f"flow timesteps must be floats T·σ in [0, {TRAIN_TIMESTEPS}], "
                             f"got {t.dtype}")
        low, high = 0, TRAIN_TIMESTEPS
    # values are checked on the CPU only (draw() makes them there): no device sync per step
    if t.device.type == "cpu" and B and not (t.min() >= low and t.max() <= high):
        raise ValueError(f"{objective} timesteps must lie in [{low}, {high}], got "
                         f"{t.min().item()}..{t.max().item()}")


def loss(model: nn.Module, x0: Tensor, model_kwargs: dict, objective: str, t: Tensor,
         noise: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """The training loss of one batch: (the mean over the batch, a scalar to backward, and its
    per-sample parts (B,) each, detached, for logging: {"mse", "vb"} for iddpm with learned
    sigma, else {"mse"}). The total is the batch mean of the parts' sum.

    model: a ptdit model (or a DDP / autocast wrapper of one), called once as
        model(x_t, t, **model_kwargs); its output has C channels, or 2C with learned sigma.
    x0: (B, C, H, W) or (B, C, F, H, W) clean data (pixels in [-1, 1] or scaled latents).
    t: (B,) timesteps from draw(objective, ...); noise: ε, x0's shape (draw_noise).
    """
    _check_inputs(objective, x0, t, noise)
    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    x0 = x0.to(dtype)
    noise = noise.to(x0.device, dtype)
    t = t.to(x0.device)
    model_dtype = next(model.parameters()).dtype
    C = x0.shape[1]
    if objective == "iddpm":
        x_t = (_at("sqrt_alphas_cumprod", t, x0) * x0
               + _at("sqrt_one_minus_alphas_cumprod", t, x0) * noise)
    else:
        sigma = (t.to(torch.float64) / TRAIN_TIMESTEPS).to(dtype)
        sigma = sigma.reshape(-1, *[1] * (x0.dim() - 1))
        x_t = (1.0 - sigma) * x0 + sigma * noise
    out = model(x_t.to(model_dtype), t, **model_kwargs).to(dtype)
    if out.shape[1] not in (C, 2 * C) or out.shape[2:] != x0.shape[2:]:
        raise ValueError(f"the model returned {tuple(out.shape)} for data {tuple(x0.shape)}; "
                         f"expected {C} or {2 * C} channels (learned sigma) of the same size")
    if objective == "iddpm":
        parts = _iddpm_terms(out, x0, x_t, t, noise)
    else:   # extra (learned-sigma) channels are not read: no gradient reaches them
        parts = {"mse": _mean_flat((noise - x0 - out[:, :C]) ** 2)}
    total = torch.stack(list(parts.values())).sum(0).mean()
    return total, {name: part.detach() for name, part in parts.items()}
