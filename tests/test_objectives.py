"""analysis.training.objectives: IDDPM's hybrid loss and rectified flow against independent float64
closed forms, where their gradients go, and the key property: a tiny model of each family
trained with its objective and sampled (in pixel space, analysis.sampling.PixelSpace) with the
scheduler that inverts it reproduces its training data. Also PixelSpace itself."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import ptdit
from analysis import sample_writer, sampling
from analysis.conditions import ClassLabels, make_prompts
from analysis.sampling import PixelSpace, sample, space_of
from analysis.training import objectives
from analysis.training.objectives import draw, draw_noise, loss, objective_for, scheduler_for
from bench.rows import check_row

from conftest import SMALL, condition, small_model

T = 1000


class Output:
    """What the model got (x, t) and returned, its output kept for gradients (retain_grad)."""

    def __init__(self, model):
        self.handle = model.register_forward_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs, out):
        self.x, self.t, self.out = args[0].detach(), args[1].detach(), out
        out.retain_grad()

    def close(self):
        self.handle.remove()


def model_conditions(model, batch):
    """Keyword condition arguments of a random condition for `model`."""
    cond = condition(model, batch)
    if model.config.condition == "class":
        return {"y" if model.config.family == "DiT" else "text": cond[0]}
    return {"text": cond[0], "text_mask": cond[1]}


def grid_images(shape, generator) -> torch.Tensor:
    """Images on the 256-level grid of [-1, 1] (as IDDPM's decoder term assumes), the edges
    -1 and +1 included."""
    levels = torch.randint(0, 256, shape, generator=generator)
    levels.view(-1)[:2] = torch.tensor([0, 255])
    return (levels.double() / 127.5 - 1.0)


#################################################################################
#                         Independent float64 references                        #
#################################################################################

def ref_schedule():
    """IDDPM's linear schedule in numpy float64: betas, ᾱ, ᾱ_prev, β̃ (posterior variance)."""
    betas = np.linspace(1e-4, 0.02, T, dtype=np.float64)
    abar = np.cumprod(1.0 - betas)
    abar_prev = np.append(1.0, abar[:-1])
    post_var = betas * (1.0 - abar_prev) / (1.0 - abar)
    return betas, abar, abar_prev, post_var


def ref_normal_cdf_tanh(x):
    return 0.5 * (1.0 + np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def ref_normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


def ref_decoder_nll(x0, mean, log_var, cdf):
    """-log P(x0) in nats of the 256-bin discretised N(mean, e^log_var), outer bins open."""
    std = np.exp(0.5 * log_var)
    upper = np.where(x0 > 0.999, 1.0, cdf((x0 + 1 / 255 - mean) / std))
    lower = np.where(x0 < -0.999, 0.0, cdf((x0 - 1 / 255 - mean) / std))
    return -np.log(np.maximum(upper - lower, 1e-12))


def ref_iddpm(x0, noise, t, out):
    """Per-sample (mse, vb in bits/dim, x_t) from the formulas (IDDPM, arXiv:2102.09672 §2-3)."""
    betas, abar, abar_prev, post_var = ref_schedule()
    B, C = x0.shape[:2]
    shape = (B,) + (1,) * (x0.ndim - 1)
    a, ap, b = abar[t].reshape(shape), abar_prev[t].reshape(shape), betas[t].reshape(shape)
    x_t = np.sqrt(a) * x0 + np.sqrt(1 - a) * noise
    eps, v = out[:, :C], out[:, C:]
    mse = ((noise - eps) ** 2).reshape(B, -1).mean(1)
    # q(x_{t-1} | x_t, x0): mean and (clipped at t = 0) variance
    log_post = np.log(np.where(t == 0, post_var[1], post_var[t])).reshape(shape)
    q_mean = (np.sqrt(ap) * b / (1 - a)) * x0 + (np.sqrt(1 - b) * (1 - ap) / (1 - a)) * x_t
    x0_hat = (x_t - np.sqrt(1 - a) * eps) / np.sqrt(a)
    p_mean = (np.sqrt(ap) * b / (1 - a)) * x0_hat + (np.sqrt(1 - b) * (1 - ap) / (1 - a)) * x_t
    frac = (v + 1) / 2
    p_log_var = frac * np.log(b) + (1 - frac) * log_post
    kl = 0.5 * (p_log_var - log_post + np.exp(log_post - p_log_var)
                + (q_mean - p_mean) ** 2 / np.exp(p_log_var) - 1)
    nll = ref_decoder_nll(x0, p_mean, p_log_var, ref_normal_cdf_tanh)
    vb = np.where(t == 0, nll.reshape(B, -1).mean(1), kl.reshape(B, -1).mean(1)) / np.log(2)
    return mse, vb, x_t, nll, p_mean, p_log_var


#################################################################################
#                         Objectives, samplers and draws                        #
#################################################################################

def test_each_family_has_an_objective_and_the_sampler_that_inverts_it():
    assert objectives.OBJECTIVES == ("iddpm", "flow")
    assert [objective_for(f) for f in ("DiT", "PixArt", "PT-DiT")] == ["iddpm", "iddpm", "flow"]
    assert objective_for("PT-DiT", "iddpm") == "iddpm"
    assert objectives.SAMPLER_OF == {"iddpm": "ddpm", "flow": "flow"}
    table = {(f, o): scheduler_for(f, o) for f in ("DiT", "PixArt", "PT-DiT")
             for o in objectives.OBJECTIVES}
    assert table == {("DiT", "iddpm"): "ddpm", ("PixArt", "iddpm"): "dpm",
                     ("PT-DiT", "iddpm"): "ddpm", ("DiT", "flow"): "flow",
                     ("PixArt", "flow"): "flow", ("PT-DiT", "flow"): "flow"}
    with pytest.raises(ValueError, match=r"^unknown training objective 'ddpm'; allowed: "
                                         r"iddpm, flow \(DiT's own: iddpm\)$"):
        objective_for("DiT", "ddpm")
    with pytest.raises(ValueError, match=r"^no training objective for model family 'SD'; "
                                         r"allowed: DiT, PixArt, PT-DiT$"):
        scheduler_for("SD", "flow")


def test_draws_are_the_global_batchs_from_one_generator():
    t, u = draw("iddpm", 20_000, torch.Generator().manual_seed(3))
    assert t.dtype == torch.int64 and u.dtype == torch.float64 and t.shape == u.shape == (20_000,)
    assert torch.equal(t, torch.floor(u * T).long())
    assert t.min() == 0 and t.max() == T - 1 and bool(((u >= 0) & (u < 1)).all())
    assert abs(t.double().mean().item() - 499.5) < 3 * 288.7 / math.sqrt(20_000) + 0.5
    tf, uf = draw("flow", 8, torch.Generator().manual_seed(3))
    assert tf.dtype == torch.float64 and torch.equal(tf, uf * T) and torch.equal(uf, u[:8])
    # one generator, the same sequence: any rank slicing the global batch sees the same rows
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    whole = draw("iddpm", 8, g1), draw_noise((8, 1, 4, 4), g1)
    again = draw("iddpm", 8, g2), draw_noise((8, 1, 4, 4), g2)
    assert torch.equal(whole[0][0], again[0][0]) and torch.equal(whole[1], again[1])
    assert whole[1].dtype == torch.float32
    with pytest.raises(ValueError, match=r"^batch must be a positive int \(the global batch\), "
                                         r"got 0$"):
        draw("flow", 0, g1)
    with pytest.raises(ValueError, match=r"^unknown training objective 'eps'; allowed: iddpm, "
                                         r"flow$"):
        draw("eps", 4, g1)
    with pytest.raises(ValueError, match=r"^noise shape must be positive ints, got \(2, 0\)$"):
        draw_noise((2, 0), g1)


def test_the_schedule_is_the_samplers():
    """float64 constants equal IDDPM's numpy ones and, to float32, diffusers' DDPM scheduler's
    (the sampler that inverts the objective)."""
    betas, abar, _, post_var = ref_schedule()
    s = objectives.schedule()
    np.testing.assert_allclose(s["betas"].numpy(), betas, rtol=1e-14)
    np.testing.assert_allclose(s["alphas_cumprod"].numpy(), abar, rtol=1e-12)
    np.testing.assert_allclose(s["posterior_log_variance"].numpy(),
                               np.log(np.append(post_var[1], post_var[1:])), rtol=1e-12)
    for name in ("ddpm", "dpm"):
        sched = sampling.make_scheduler(name)
        np.testing.assert_allclose(sched.alphas_cumprod.double().numpy(), abar, rtol=2e-6)


#################################################################################
#                                     IDDPM                                     #
#################################################################################

def test_iddpm_terms_match_the_closed_forms(one_thread):
    """mse, the KL of q(x_{t-1}|x_t, x0) to p(x_{t-1}|x_t) and, at t = 0, the discretised
    decoder NLL, in bits per dim, against numpy float64; the model gets x_t and t."""
    g = torch.Generator().manual_seed(1)
    model = small_model("DiT")
    B = 6
    x0 = grid_images((B, 4, 8, 8), g)
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 0, 1, 17, 500, 999])
    record = Output(model)
    total, parts = loss(model, x0, model_conditions(model, B), "iddpm", t, noise)
    record.close()
    out = record.out.detach().numpy()
    assert out.shape == (B, 8, 8, 8) and set(parts) == {"mse", "vb"}
    mse, vb, x_t, nll, p_mean, p_log_var = ref_iddpm(x0.numpy(), noise.numpy(), t.numpy(), out)
    np.testing.assert_allclose(record.x.numpy(), x_t, rtol=1e-12, atol=1e-12)
    assert torch.equal(record.t, t)
    np.testing.assert_allclose(parts["mse"].numpy(), mse, rtol=1e-10)
    np.testing.assert_allclose(parts["vb"].numpy(), vb, rtol=1e-9)
    np.testing.assert_allclose(total.item(), (mse + vb).mean(), rtol=1e-10)
    assert (vb > 0).all() and not parts["vb"].requires_grad
    # the decoder term is a real discretised likelihood: the exact normal CDF gives nearly it
    exact = ref_decoder_nll(x0.numpy()[:2], p_mean[:2], p_log_var[:2], ref_normal_cdf)
    np.testing.assert_allclose(nll[:2].mean((1, 2, 3)), exact.mean((1, 2, 3)), rtol=2e-2)


def test_iddpm_vb_trains_the_variance_only(one_thread):
    """The ε channels' gradient is exactly the mse's; vb reaches only the variance channels
    (its mean uses the detached ε̂)."""
    model = small_model("DiT")
    B, C = 4, 4
    x0 = torch.rand(B, C, 8, 8, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, dtype=torch.float64)
    t = torch.tensor([0, 3, 400, 999])
    record = Output(model)
    total, parts = loss(model, x0, model_conditions(model, B), "iddpm", t, noise)
    total.backward()
    record.close()
    grad, out = record.out.grad, record.out.detach()
    mse_grad = -2 * (noise - out[:, :C]) / (B * noise[0].numel())
    torch.testing.assert_close(grad[:, :C], mse_grad, rtol=1e-12, atol=1e-15)
    assert (grad[:, C:].flatten(1).abs().sum(1) > 0).all()    # vb (and the decoder NLL) train v


def test_a_model_without_variance_channels_gets_mse_only(one_thread):
    model = small_model("PixArt", learn_sigma=False)
    assert model.out_channels == model.in_channels == 4
    x0 = torch.rand(3, 4, 8, 8, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, dtype=torch.float64)
    t = torch.tensor([0, 10, 900])
    record = Output(model)
    total, parts = loss(model, x0, model_conditions(model, 3), "iddpm", t, noise)
    record.close()
    assert set(parts) == {"mse"}
    mse = ((noise - record.out.detach()) ** 2).flatten(1).mean(1)
    torch.testing.assert_close(parts["mse"], mse, rtol=1e-12, atol=0)
    torch.testing.assert_close(total, mse.mean(), rtol=1e-12, atol=0)


#################################################################################
#                                      Flow                                     #
#################################################################################

@pytest.mark.parametrize("family", ["PT-DiT", "DiT"])
def test_flow_interpolates_and_regresses_the_velocity(family, one_thread):
    """x_σ = (1-σ)·x0 + σ·ε at t = 1000·σ, target ε - x0 on the first C channels; the learned
    sigma channels get no gradient at all."""
    model = small_model(family)
    B, C = 3, 4
    x0 = torch.rand(B, C, 8, 8, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, dtype=torch.float64)
    t, u = draw("flow", B, torch.Generator().manual_seed(2))
    record = Output(model)
    total, parts = loss(model, x0, model_conditions(model, B), "flow", t, noise)
    total.backward()
    record.close()
    sigma = u.reshape(B, 1, 1, 1)
    torch.testing.assert_close(record.x, (1 - sigma) * x0 + sigma * noise, rtol=1e-12,
                               atol=1e-12)
    assert torch.equal(record.t, 1000 * u)
    v = record.out.detach()[:, :C]
    mse = ((noise - x0 - v) ** 2).flatten(1).mean(1)
    assert set(parts) == {"mse"}
    torch.testing.assert_close(parts["mse"], mse, rtol=1e-12, atol=0)
    torch.testing.assert_close(total, mse.mean(), rtol=1e-12, atol=0)
    grad = record.out.grad
    assert record.out.shape[1] == 2 * C and torch.equal(grad[:, C:], torch.zeros_like(grad[:, C:]))
    torch.testing.assert_close(grad[:, :C], -2 * (noise - x0 - v) / (B * x0[0].numel()),
                               rtol=1e-12, atol=1e-15)


def test_loss_input_errors():
    model = small_model("DiT")
    x0 = torch.zeros(2, 4, 8, 8, dtype=torch.float64)
    kw = model_conditions(model, 2)
    cases = [
        ("iddpm", x0, torch.tensor([0.5, 1.0]), x0,
         r"^iddpm timesteps must be integers in 0..999, got torch.float32$"),
        ("iddpm", x0, torch.tensor([0, 1000]), x0,
         r"^iddpm timesteps must lie in \[0, 999\], got 0..1000$"),
        ("flow", x0, torch.tensor([3, 4]), x0,
         r"^flow timesteps must be floats T·σ in \[0, 1000\], got torch.int64$"),
        ("flow", x0, torch.tensor([3.0]), x0,
         r"^t must be a \(2,\) tensor of timesteps \(draw\(\)\), got \(1,\)$"),
        ("flow", x0, torch.tensor([3.0, 4.0]), x0[:1],
         r"^noise must have x0's shape \(2, 4, 8, 8\), got \(1, 4, 8, 8\)$"),
        ("v", x0, torch.tensor([3, 4]), x0, r"^unknown training objective 'v'; allowed: "),
        ("flow", x0[0], torch.tensor([3.0, 4.0]), x0,
         r"^x0 must be a float \(B, C, H, W\) or \(B, C, F, H, W\) tensor, got torch.float64 "
         r"\(4, 8, 8\)$"),
    ]
    for objective, x, t, noise, message in cases:
        with pytest.raises(ValueError, match=message):
            loss(model, x, kw, objective, t, noise)


#################################################################################
#                                  Pixel space                                  #
#################################################################################

def test_pixel_space_decodes_to_itself_and_writes_grey_pngs(tmp_path, monkeypatch):
    """PixelSpace(1): factor 1, identity decode; the PNG holds the latents' pixels as grey
    (three equal channels), and run.json and the row record "pixel space"."""
    space = PixelSpace(1)
    assert (sampling.vae_factor(space), space.config.scaling_factor, space_of(space)) == \
        (1, 1.0, "pixel space")
    x = torch.randn(2, 1, 3, 4, 4)
    image = x[:, :, 0]
    assert sampling.decode(space, image) is image
    assert torch.equal(sampling.decode(space, x), x.permute(0, 2, 1, 3, 4))   # (B, F, C, H, W)
    ramp = torch.linspace(-1, 1, 64).reshape(1, 1, 8, 8)

    def loop(model, scheduler, steps, noise, condition, **_):
        return ramp.expand(len(noise), -1, -1, -1).clone()

    monkeypatch.setattr(sampling, "denoise", loop)
    model = small_model("DiT", dtype=torch.float32, in_channels=1, num_classes=2)
    row = sample(model, vae=space, conditions=ClassLabels([0, 1]), num=2, out=tmp_path,
                 resolution=8, cfg_scale=1, steps=2, progress=False)
    check_row(row)
    assert row["status"] == "ok" and row["vae"] == "pixel space" and row["vae_factor"] == 1
    assert row["vae_scaling_factor"] == 1.0 and row["tokens"] == 16
    png = np.asarray(Image.open(tmp_path / "000001.png"))
    assert png.shape == (8, 8, 3) and (png == png[..., :1]).all()
    expected = np.clip(np.floor((ramp[0, 0].double().numpy() / 2 + 0.5) * 255 + 0.5), 0, 255)
    np.testing.assert_array_equal(png[..., 0], expected)
    settings = json.loads((tmp_path / "run.json").read_text())
    assert settings["settings"]["vae"] == "pixel space"
    assert settings["about"]["vae"] == "pixel space"


def test_pixel_space_errors(tmp_path):
    with pytest.raises(ValueError, match=r"^PixelSpace channels must be 1 \(grey\) or 3 \(RGB\) "
                                         r"image channels, got 4$"):
        PixelSpace(4)
    model = small_model("DiT", dtype=torch.float32, in_channels=1)
    with pytest.raises(ValueError, match=r"^PixelSpace\(channels=3\) holds 3-channel images; "
                                         r"the model takes 1$"):
        sample(model, vae=PixelSpace(3), conditions="0", num=1, out=tmp_path, resolution=8,
               cfg_scale=1, progress=False)
    with pytest.raises(ValueError, match=r"^images must be \(B, 3, H, W\) RGB or \(B, 1, H, W\) "
                                         r"grey, got \(1, 2, 4, 4\)$"):
        sample_writer.to_uint8(torch.zeros(1, 2, 4, 4))
    assert space_of(object()) == "latent space"


#################################################################################
#                    The sampler inverts training (the key test)                #
#################################################################################

CONSTANTS = (0.8, -0.8)   # class 0: every pixel +0.8; class 1: every pixel -0.8
SIZE = 8                  # pixels; patch 4: 2x2 tokens (PT-DiT: 2x2 windows of one token)


def tiny_pixel_model(family: str) -> torch.nn.Module:
    """A one-block, 64-wide model of `family` on 1-channel 8x8 pixels, with learned sigma."""
    name, kwargs = SMALL[family]
    overrides = dict(kwargs, depth=1, patch_size=4, in_channels=1)
    if family in ("DiT", "PixArt"):
        overrides["input_size"] = SIZE
    if family == "DiT":
        overrides["num_classes"] = 2
    return ptdit.build(name, seed=0, dtype=torch.float32, **overrides)


def train(model, objective: str, steps: int, captions: torch.Tensor, batch: int = 64,
          lr: float = 2e-3) -> list[float]:
    """AdamW, lr decaying linearly to 0, on the two constant images (half of each batch
    each); the draws come from analysis.training.objectives. Returns the losses."""
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: 1 - k / steps)
    labels = torch.arange(batch) % 2
    x0 = torch.tensor(CONSTANTS)[labels].reshape(batch, 1, 1, 1).expand(-1, 1, SIZE, SIZE)
    if model.config.condition == "class":
        kwargs = {"y" if model.config.family == "DiT" else "text": labels}
    else:
        kwargs = {"text": captions[labels], "text_mask": torch.ones(batch, len(captions[0]))}
    model.train()
    losses = []
    for _ in range(steps):
        t, _u = draw(objective, batch, generator)
        noise = draw_noise(x0.shape, generator)
        total, _parts = loss(model, x0, kwargs, objective, t, noise)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        schedule.step()
        losses.append(total.item())
    return losses


def sampled(model, scheduler: str, captions: torch.Tensor, out, num: int = 16) -> np.ndarray:
    """`num` samples (i of class i % 2) as PNG values mapped back to [-1, 1], (num, H, W)."""
    conditions = (ClassLabels([0, 1]) if model.config.condition == "class" else
                  make_prompts(captions, torch.ones(2, captions.shape[1], dtype=torch.int64)))
    row = sample(model, vae=PixelSpace(1), conditions=conditions, num=num, out=out,
                 resolution=SIZE, scheduler=scheduler, steps=20, cfg_scale=1, batch_size=num,
                 progress=False)
    assert row["status"] == "ok" and row["images"] == num
    pngs = np.stack([sample_writer.read_sample(out, i, None) for i in range(num)])
    assert (pngs == pngs[..., :1]).all()                      # grey: three equal channels
    return (pngs[..., 0].astype(np.float64) - 127.5) / 127.5


def class_errors(images: np.ndarray) -> tuple[np.ndarray, float]:
    """Each sample's mean minus its class's constant, and the median |pixel - constant|."""
    target = np.array(CONSTANTS)[np.arange(len(images)) % 2][:, None, None]
    return images.mean((1, 2)) - target[:, 0, 0], float(np.median(np.abs(images - target)))


@pytest.mark.slow
@pytest.mark.parametrize("family,objective,steps", [
    ("DiT", "iddpm", 1500), ("PixArt", "iddpm", 1500), ("PT-DiT", "flow", 400),
    ("DiT", "flow", 600)])
def test_the_sampler_inverts_training(family, objective, steps, one_thread, tmp_path):
    """Trained on two constant images (±0.8 by class / caption), sampled with the scheduler that
    inverts the objective (ddpm with the learned variance for DiT, eps-only DPM-Solver++ for
    PixArt, Euler on the velocity for flow): every sample is its class's constant (a sign
    error gives the other class, a wrong shift, scale or channel noise or saturation). A
    mismatched sampler fails the same check."""
    model = tiny_pixel_model(family)
    captions = torch.randn(2, 6, 24, generator=torch.Generator().manual_seed(1))
    losses = train(model, objective, steps, captions)
    assert np.mean(losses[-50:]) < 0.2 * np.mean(losses[:50])
    scheduler = scheduler_for(family, objective)
    offsets, median = class_errors(sampled(model, scheduler, captions, tmp_path / scheduler))
    assert np.abs(offsets).max() < 0.3, offsets      # each sample: its own constant (1.6 apart)
    assert median < 0.1, median                       # and the constant itself, not a blur
    wrong = "flow" if objective == "iddpm" else "ddpm"
    offsets, median = class_errors(sampled(model, wrong, captions, tmp_path / wrong))
    assert np.abs(offsets).max() >= 0.3 or median >= 0.1
