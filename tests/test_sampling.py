"""analysis.sampling: the sampling loops against independent closed forms (IDDPM's respaced
posterior, DPM-Solver++ first order, Euler on the rectified flow), guidance, seeds, resume,
conditions and their errors. Tiny random models and a tiny random VAE (2x spatial factor)."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from analysis.offline import go_offline

go_offline()
from diffusers import AutoencoderKL  # noqa: E402  (after go_offline)

from analysis import sample_writer, sampling  # noqa: E402
from analysis.conditions import (  # noqa: E402
    ClassLabels,
    check_conditions,
    class_conditions,
    encode_prompts,
    make_prompts,
    prompt_embeddings,
)
from analysis.sampling import (  # noqa: E402
    decode,
    guide,
    initial_noise,
    load_vae,
    make_scheduler,
    sample,
    sample_generators,
    sample_seed,
)
from bench.rows import check_row  # noqa: E402

from conftest import small_model  # noqa: E402

RESOLUTION = 16   # pixels; the tiny VAE halves once: 8x8 latents, 4x4 tokens (2x2 windows)


def tiny_vae(latent_channels: int = 4) -> AutoencoderKL:
    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=32)


@pytest.fixture(scope="module")
def vae_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vae")
    tiny_vae().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def vae(vae_folder):
    return load_vae(vae_folder)


def random_prompts(n: int, tokens: int, channels: int = 24, null: bool = True):
    """Fresh random T5-like embeddings, each keeping a random prefix of >= 1 tokens."""
    keep = torch.randint(1, tokens + 1, (n + 1,))
    masks = (torch.arange(tokens)[None] < keep[:, None]).to(torch.int64)
    return make_prompts(torch.randn(n, tokens, channels), masks[:n],
                        torch.randn(tokens, channels) if null else None,
                        masks[n] if null else None)


def conditions_for(model, n: int = 3):
    if model.config.condition == "class":
        return ClassLabels(torch.randint(0, model.config.num_classes, (n,)))
    return random_prompts(n, 6, model.config.caption_channels)


class Trace:
    """What the model got at each step (through on_step) and what it returned (a hook)."""

    def __init__(self, model):
        self.steps, self.outputs = [], []
        self._hook = model.register_forward_hook(self._record, with_kwargs=True)

    def on_step(self, k, t, model_input, kwargs):
        self.steps.append((k, t.clone(), model_input.clone(),
                           {n: v.clone() for n, v in kwargs.items()}))

    def _record(self, module, args, kwargs, out):
        self.outputs.append(out.detach().clone())

    def close(self):
        self._hook.remove()


def run(model, vae, out, **kwargs):
    kwargs = {"num": 2, "batch_size": 2, "cfg_scale": 4.0, "resolution": RESOLUTION,
              "progress": False, "conditions": conditions_for(model), **kwargs}
    return sample(model, vae=vae, out=out, **kwargs)


def pngs(folder) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def hand_decoded(vae, latents) -> np.ndarray:
    """Independent decode: diffusers' decoder on latents / scaling_factor, then (x/2 + 0.5)·255
    rounded half up, as uint8 (B, H, W, 3)."""
    with torch.no_grad():
        x = vae.decode(latents.float() / vae.config.scaling_factor).sample.double().numpy()
    return np.clip(np.floor((x / 2 + 0.5) * 255 + 0.5), 0, 255).astype(np.uint8) \
        .transpose(0, 2, 3, 1)


def assert_near_pixels(a: np.ndarray, b: np.ndarray):
    """Within one 8-bit level (float rounding can flip a half-way pixel)."""
    assert a.shape == b.shape
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def alphas_cumprod() -> np.ndarray:
    """ᾱ_t of linear betas 1e-4..0.02 over 1000 steps, in float32 as the schedulers hold it
    (float64 ᾱ differs by ~1e-5 relative, which a random model's large x0 amplifies past
    any tight tolerance); the update rules built on it are computed in float64."""
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)
    return torch.cumprod(1 - betas, dim=0).double().numpy()


#################################################################################
#                          Loops run end to end                                 #
#################################################################################

@pytest.mark.parametrize("family,scheduler,steps", [
    ("DiT", "ddpm", 4), ("PixArt", "dpm", 3), ("PT-DiT", "flow", 3), ("PT-DiT-class", "flow", 3),
    ("DiT", "dpm", 3), ("PixArt", "ddpm", 3)])
def test_loop_writes_pngs_npz_and_row(family, scheduler, steps, vae, vae_folder, tmp_path):
    model = small_model(family, dtype=torch.float32)
    trace = Trace(model)
    row = run(model, vae, tmp_path, num=3, scheduler=scheduler, steps=steps, write_npz=True,
              on_step=trace.on_step)
    trace.close()
    images = pngs(tmp_path)
    assert list(images) == ["000000.png", "000001.png", "000002.png"]
    assert all(im.shape == (RESOLUTION, RESOLUTION, 3) and im.dtype == np.uint8
               for im in images.values())
    assert len({im.tobytes() for im in images.values()}) == 3   # distinct seeds, distinct images
    arr = np.load(tmp_path / "samples.npz")["arr_0"]
    np.testing.assert_array_equal(arr, np.stack(list(images.values())))
    assert len(trace.steps) == steps * 2   # two batches (2 + 1 samples), `steps` forwards each
    check_row(row)
    assert (row["scheduler"], row["steps"], row["images"], row["skipped"]) == \
        (scheduler, steps, 3, 0)
    assert row["text_tokens"] == (6 if model.config.condition == "text" else 0)
    assert (row["vae_factor"], row["vae"], row["tokens"]) == (2, str(vae_folder), 16)
    assert row["checkpoint"] == "untrained" and row["images_per_s"] > 0
    assert json.loads((tmp_path / "samples.jsonl").read_text()) == row


def test_family_defaults(vae, tmp_path, monkeypatch):
    """DiT samples as sample_ddp.py (ddpm, 250 IDDPM-spaced steps, cfg 1.5, 3 channels); PT-DiT
    as released (flow, cfg 4.0, all channels); steps are overridable. The loop gets what the
    row records (the loop itself: the closed-form tests below)."""
    loops = []

    def loop(model, scheduler, steps, noise, condition, *, cfg_scale, guidance_channels, **_):
        loops.append((scheduler, steps, cfg_scale, guidance_channels))
        return noise

    monkeypatch.setattr(sampling, "denoise", loop)
    row = sample(small_model("DiT", dtype=torch.float32), vae=vae, conditions="0-9", num=1,
                 out=tmp_path / "dit", resolution=RESOLUTION, progress=False)
    assert (row["scheduler"], row["steps"], row["cfg_scale"], row["guidance_channels"]) == \
        ("ddpm", 250, 1.5, "3")
    assert loops == [("ddpm", 250, 1.5, "3")]
    ddpm = make_scheduler("ddpm")
    ddpm.set_timesteps(250)
    assert ddpm.timesteps.tolist() == iddpm_timesteps(250)
    assert ddpm.timesteps.tolist()[:3] == [999, 995, 991] and ddpm.timesteps[-1] == 0
    model = small_model("PT-DiT", dtype=torch.float32)
    row = sample(model, vae=vae, conditions=conditions_for(model), num=1, steps=2,
                 out=tmp_path / "ptdit", resolution=RESOLUTION, progress=False)
    assert (row["scheduler"], row["steps"], row["cfg_scale"], row["guidance_channels"],
            row["flow_shift"]) == ("flow", 2, 4.0, "all", 1.0)
    assert loops[1:] == [("flow", 2, 4.0, "all")]


def test_video_frames_decoded_one_by_one(vae, tmp_path):
    model = small_model("DiT", dtype=torch.float32)
    checkpoint = tmp_path / "weights" / "dit.pt"
    checkpoint.parent.mkdir()
    torch.save(model.state_dict(), checkpoint)
    trace = Trace(model)
    row = run(model, vae, tmp_path, num=2, frames=2, scheduler="flow", steps=1,
              guidance_channels="all", on_step=trace.on_step, write_npz=True,
              checkpoint=checkpoint)
    trace.close()
    assert row["checkpoint"] == str(checkpoint)
    assert row["checkpoint_sha256"] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    assert trace.steps[0][2].shape == (4, 4, 2, 8, 8)   # (2B, C, F, h, w)
    names = sorted(p.name for p in tmp_path.glob("*.png"))
    assert names == ["000000-000.png", "000000-001.png", "000001-000.png", "000001-001.png"]
    (_, t, x, _), v = trace.steps[0], trace.outputs[0]
    v = guide(v, 4.0, 4)[:, :4]
    final = x[:2] + (0 - t / 1000) * v                    # one Euler step to sigma 0
    expected = np.stack([hand_decoded(vae, final[:, :, f]) for f in range(2)], axis=1)
    assert_near_pixels(np.load(tmp_path / "samples.npz")["arr_0"], expected)
    assert row["latent_frames"] == 2 and row["tokens"] == 32


#################################################################################
#                  One step against independent closed forms                    #
#################################################################################

def iddpm_timesteps(steps: int, train: int = 1000) -> list[int]:
    """IDDPM's space_timesteps(train, str(steps)) (one section), descending."""
    stride = (train - 1) / (steps - 1) if steps > 1 else 1
    taken, cur = [], 0.0
    for _ in range(steps):
        taken.append(round(cur))
        cur += stride
    return sorted(set(taken), reverse=True)


@pytest.mark.parametrize("channels", ["3", "all"])
def test_ddpm_matches_iddpm_learned_range_posterior(channels, vae, tmp_path):
    """Every step equals IDDPM's p_sample on the respaced chain: posterior mean from the
    guided eps, log-variance interpolated by v between log beta and log posterior variance,
    the sample's own noise; guidance as DiT's forward_with_cfg (channels "3") or on all four."""
    model = small_model("DiT", dtype=torch.float32)
    seed, steps, s, C = int(torch.randint(0, 2**31, ())), 4, 4.0, 4
    trace = Trace(model)
    run(model, vae, tmp_path, scheduler="ddpm", steps=steps, cfg_scale=s, seed=seed,
        guidance_channels=channels, on_step=trace.on_step)
    trace.close()
    ts = [int(t) for _, t, _, _ in trace.steps]
    assert ts == iddpm_timesteps(steps) == [999, 666, 333, 0]
    ab = alphas_cumprod()
    generators = [torch.Generator().manual_seed(sample_seed(seed, i)) for i in range(2)]
    x = torch.cat([torch.randn((1, C, 8, 8), generator=g) for g in generators]).double()
    for k, ((_, t, model_input, kwargs), out) in enumerate(zip(trace.steps, trace.outputs)):
        assert torch.equal(model_input[:2], model_input[2:])
        torch.testing.assert_close(model_input[:2].double(), x, rtol=1e-4, atol=1e-4)
        assert torch.equal(kwargs["t"], torch.full((4,), ts[k]))
        if channels == "3":
            with torch.no_grad():
                guided = model.forward_with_cfg(model_input, kwargs["t"], kwargs["y"], s)[:2]
        else:
            cond, null = out.chunk(2)
            guided = torch.cat([null[:, :C] + s * (cond[:, :C] - null[:, :C]), cond[:, C:]], 1)
        eps, v = guided[:, :C].double(), guided[:, C:].double()
        ab_t, ab_prev = ab[t], ab[ts[k + 1]] if k + 1 < steps else 1.0
        beta = 1 - ab_t / ab_prev
        x0 = (x - np.sqrt(1 - ab_t) * eps) / np.sqrt(ab_t)
        mean = (np.sqrt(ab_prev) * beta / (1 - ab_t)) * x0 + \
            (np.sqrt(1 - beta) * (1 - ab_prev) / (1 - ab_t)) * x
        if t > 0:
            frac = (v + 1) / 2
            log_var = frac * np.log(beta) + (1 - frac) * np.log(beta * (1 - ab_prev) / (1 - ab_t))
            noise = torch.cat([torch.randn((1, C, 8, 8), generator=g) for g in generators])
            x = mean + torch.exp(0.5 * log_var) * noise.double()
        else:
            x = mean
    assert_near_pixels(np.stack(list(pngs(tmp_path).values())), hand_decoded(vae, x))


def test_dpm_matches_dpm_solver_pp(vae, tmp_path):
    """PixArt's DPM-Solver++: the first step is first order,
    x_t = (sigma_t/sigma_s)·x_s - alpha_t·(e^-h - 1)·x0; the last (lower order, to sigma 0)
    lands on the x0 prediction. eps is PixArtAlphaPipeline's: guidance on all channels, then
    the first half; the null rows hold the learned null caption with the prompt's mask."""
    model = small_model("PixArt", dtype=torch.float32)
    s, C = 4.5, 4
    trace = Trace(model)
    conditions = random_prompts(2, 6, null=False)
    run(model, vae, tmp_path, scheduler="dpm", steps=3, cfg_scale=s, conditions=conditions,
        on_step=trace.on_step)
    trace.close()
    ts = [int(t) for _, t, _, _ in trace.steps]
    assert ts == [999, 666, 333]
    ab = alphas_cumprod()
    alpha, sigma = np.sqrt(ab), np.sqrt(1 - ab)

    def x0_pred(k):
        (_, t, model_input, _), out = trace.steps[k], trace.outputs[k]
        uncond, cond = out[2:].double(), out[:2].double()
        eps = (uncond + s * (cond - uncond))[:, :C]
        return (model_input[:2].double() - sigma[t] * eps) / alpha[t]

    text, mask = trace.steps[0][3]["text"], trace.steps[0][3]["text_mask"]
    torch.testing.assert_close(text[:2], conditions.embeddings)
    assert torch.equal(text[2:], model.y_embedder.y_embedding[None].expand(2, -1, -1))
    assert torch.equal(mask[2:], mask[:2]) and torch.equal(mask[:2], conditions.mask)
    x_s, t_s, t_t = trace.steps[0][2][:2].double(), ts[0], ts[1]
    h = np.log(alpha[t_t] / sigma[t_t]) - np.log(alpha[t_s] / sigma[t_s])
    x_t = (sigma[t_t] / sigma[t_s]) * x_s - alpha[t_t] * (np.exp(-h) - 1) * x0_pred(0)
    torch.testing.assert_close(trace.steps[1][2][:2].double(), x_t, rtol=1e-4, atol=1e-4)
    assert_near_pixels(np.stack(list(pngs(tmp_path).values())), hand_decoded(vae, x0_pred(2)))


def test_flow_matches_euler_on_velocity(vae, tmp_path):
    """x_next = x + (sigma_next - sigma)·v with t = 1000·sigma from 1000 to 1 (shift 1), then
    to sigma 0; v = the first half of the guided output; PT-DiT's null rows hold the given
    empty-prompt encoding and its mask."""
    model = small_model("PT-DiT", dtype=torch.float32)
    s, C, steps = 4.0, 4, 3
    conditions = random_prompts(2, 5)
    trace = Trace(model)
    run(model, vae, tmp_path, scheduler="flow", steps=steps, cfg_scale=s, conditions=conditions,
        on_step=trace.on_step)
    trace.close()
    ts = torch.stack([t for _, t, _, _ in trace.steps]).double()
    torch.testing.assert_close(ts, torch.linspace(1000, 1, steps, dtype=torch.float64))
    kwargs = trace.steps[0][3]
    assert torch.equal(kwargs["text"][2:], conditions.null_embedding[None].expand(2, -1, -1))
    assert torch.equal(kwargs["text_mask"][2:], conditions.null_mask[None].expand(2, -1))
    sigmas = torch.cat([ts / 1000, torch.zeros(1, dtype=torch.float64)])
    x = trace.steps[0][2][:2].double()
    for k, out in enumerate(trace.outputs):
        torch.testing.assert_close(trace.steps[k][2][:2].double(), x, rtol=1e-5, atol=1e-5)
        assert torch.equal(trace.steps[k][3]["t"], trace.steps[k][1].expand(4))
        cond, null = out[:2].double(), out[2:].double()
        v = (null + s * (cond - null))[:, :C]
        x = x + (sigmas[k + 1] - sigmas[k]) * v
    assert_near_pixels(np.stack(list(pngs(tmp_path).values())), hand_decoded(vae, x))


#################################################################################
#                              Guidance and seeds                               #
#################################################################################

@pytest.mark.parametrize("family", ["DiT", "PT-DiT-class", "PixArt", "PT-DiT"])
def test_guidance_doubles_batch_with_null_second(family, vae, tmp_path):
    model = small_model(family, dtype=torch.float32)
    conditions = conditions_for(model, 2)
    guided = Trace(model)
    run(model, vae, tmp_path / "cfg", scheduler="flow", steps=1, conditions=conditions,
        on_step=guided.on_step)
    _, _, x, kwargs = guided.steps[0]
    assert x.shape[0] == 4 and torch.equal(x[:2], x[2:])
    if model.config.condition == "class":
        labels = kwargs["y" if family == "DiT" else "text"]
        assert torch.equal(labels[:2], conditions.labels)
        assert (labels[2:] == model.config.num_classes).all()
    else:
        null = (model.y_embedder.y_embedding if family == "PixArt"
                else conditions.null_embedding)
        assert torch.equal(kwargs["text"][:2], conditions.embeddings)
        assert torch.equal(kwargs["text"][2:], null[None].expand(2, -1, -1))
    guided.close()
    plain = Trace(model)
    run(model, vae, tmp_path / "plain", scheduler="flow", steps=1, cfg_scale=1.0,
        conditions=conditions, on_step=plain.on_step)
    plain.close()
    assert plain.steps[0][2].shape[0] == 2


def test_guide_three_channels_is_dits_forward_with_cfg():
    model = small_model("DiT")
    x = torch.randn(2, 4, 8, 8, dtype=torch.float64).repeat(2, 1, 1, 1)
    t, y = torch.full((4,), 500), torch.tensor([3, 7, 1000, 1000])
    with torch.no_grad():
        out, reference = model(x, t, y), model.forward_with_cfg(x, t, y, 4.0)
    torch.testing.assert_close(guide(out, 4.0, 3), reference[:2], rtol=0, atol=0)
    all_channels = guide(out, 4.0, 4)
    torch.testing.assert_close(all_channels[:, :3], reference[:2, :3], rtol=0, atol=0)
    assert not torch.allclose(all_channels[:, 3], reference[:2, 3])


def test_seeds_follow_the_index_not_the_batch(vae, tmp_path):
    """Index i draws its noise from sample_seed(seed, i) alone: batches of 1 and of 3, and a
    run of indices 1..2 alone, give the same noise and (to float rounding) the same images."""
    model = small_model("DiT", dtype=torch.float32)
    seed = int(torch.randint(0, 2**31, ()))
    conditions = conditions_for(model)
    runs = {}
    for name, kw in {"one": dict(batch_size=1, num=3), "three": dict(batch_size=3, num=3),
                     "tail": dict(batch_size=2, num=2, start=1)}.items():
        trace = Trace(model)
        run(model, vae, tmp_path / name, scheduler="ddpm", steps=3, seed=seed,
            conditions=conditions, on_step=trace.on_step, **kw)
        trace.close()
        runs[name] = (pngs(tmp_path / name), torch.cat(
            [x[: len(x) // 2] for k, _, x, _ in trace.steps if k == 0]))
    expected = initial_noise(sample_generators(seed, [0, 1, 2]), (4, 8, 8))
    assert torch.equal(runs["one"][1], expected) and torch.equal(runs["three"][1], expected)
    assert torch.equal(runs["tail"][1], expected[1:])
    assert list(runs["tail"][0]) == ["000001.png", "000002.png"]
    for name, image in runs["one"][0].items():
        assert_near_pixels(runs["three"][0][name], image)
        if name in runs["tail"][0]:
            assert_near_pixels(runs["tail"][0][name], image)
    assert sample_seed(seed, 1) != sample_seed(seed, 2) != sample_seed(seed + 1, 2)


#################################################################################
#                          Resume, pixels, conditions                           #
#################################################################################

def test_resume_skips_whole_pngs_and_redoes_damaged(vae, tmp_path):
    model = small_model("PT-DiT-class", dtype=torch.float32)
    conditions = conditions_for(model)
    kw = dict(num=4, batch_size=1, scheduler="flow", steps=2, conditions=conditions, seed=5)
    run(model, vae, tmp_path, **kw)
    first = pngs(tmp_path)
    whole = {n: os.stat(tmp_path / n).st_mtime_ns for n in ("000000.png", "000001.png")}
    data = (tmp_path / "000002.png").read_bytes()
    (tmp_path / "000002.png").write_bytes(data[: len(data) // 2])   # torn
    (tmp_path / "000003.png").unlink()
    (tmp_path / "000003.png.tmp").write_bytes(b"half")              # a killed write
    row = run(model, vae, tmp_path, **kw)
    assert (row["images"], row["skipped"]) == (2, 2)
    assert {n: os.stat(tmp_path / n).st_mtime_ns for n in whole} == whole
    assert sorted(p.name for p in tmp_path.iterdir()) == \
        ["000000.png", "000001.png", "000002.png", "000003.png", "run.json", "samples.jsonl"]
    for name, image in pngs(tmp_path).items():
        np.testing.assert_array_equal(image, first[name])
    assert len((tmp_path / "samples.jsonl").read_text().splitlines()) == 2


def test_to_uint8_rounds_half_up_and_clamps():
    x = torch.rand(2, 3, 4, 5) * 2.4 - 1.2
    expected = np.clip(np.floor((x.double().numpy() / 2 + 0.5) * 255 + 0.5), 0, 255)
    np.testing.assert_array_equal(sample_writer.to_uint8(x),
                                  expected.astype(np.uint8).transpose(0, 2, 3, 1))
    edges = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 1, 5).expand(1, 3, 1, 5)
    assert sample_writer.to_uint8(edges)[0, 0, :, 0].tolist() == [0, 0, 128, 255, 255]


def test_class_condition_specs(tmp_path):
    assert class_conditions("1,2,3").labels.tolist() == [1, 2, 3]
    assert class_conditions("0-999").labels.tolist() == list(range(1000))
    assert class_conditions(" 4, 7-9 ").labels.tolist() == [4, 7, 8, 9]
    (tmp_path / "labels.txt").write_text("5\n\n2\n8\n")
    labels = class_conditions(str(tmp_path / "labels.txt"))
    assert labels.labels.tolist() == [5, 2, 8]
    assert labels.at([0, 1, 2, 3, 7]).tolist() == [5, 2, 8, 5, 2]   # i % N
    for bad, message in [("a-b", "cannot read"), ("9-3", "backwards"), ("", "no labels"),
                         ("1,-2", "cannot read")]:
        with pytest.raises(ValueError, match=message):
            class_conditions(bad)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_prompt_embeddings_file(suffix, tmp_path):
    from safetensors.torch import save_file
    prompts = random_prompts(3, 5)
    tensors = {"embeddings": prompts.embeddings, "mask": prompts.mask,
               "null_embedding": prompts.null_embedding, "null_mask": prompts.null_mask}
    path = tmp_path / f"prompts{suffix}"
    save_file(tensors, path) if suffix == ".safetensors" else torch.save(tensors, path)
    loaded = prompt_embeddings(path)
    for key, value in tensors.items():
        assert torch.equal(getattr(loaded, key), value)
    text, mask = loaded.at([4])                                     # 4 % 3 = prompt 1
    assert torch.equal(text[0], prompts.embeddings[1]) and torch.equal(mask[0], prompts.mask[1])
    del tensors["mask"]
    torch.save(tensors, tmp_path / "no_mask.pt")
    with pytest.raises(ValueError, match="lacks mask"):
        prompt_embeddings(tmp_path / "no_mask.pt")
    torch.save({"embeddings": prompts.embeddings, "mask": prompts.mask * 2},
               tmp_path / "bad_mask.pt")
    with pytest.raises(ValueError, match="0 .drop. or 1"):
        prompt_embeddings(tmp_path / "bad_mask.pt")


def test_encode_prompts_with_a_local_t5(tmp_path):
    """A tiny random T5 encoder and a word-level fast tokenizer (no sentencepiece offline),
    saved and read back through AutoTokenizer / T5EncoderModel: the prompts and the empty
    prompt are encoded as the encoder does on the tokenizer's ids, padded to max_length."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5EncoderModel
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "red": 4, "cat": 5, "on": 6, "mat": 7}
    words = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                         special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=words, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(tmp_path / "t5")
    encoder = T5EncoderModel(T5Config(vocab_size=8, d_model=24, d_kv=8, d_ff=32, num_layers=1,
                                      num_heads=2, pad_token_id=0, eos_token_id=1)).eval()
    encoder.save_pretrained(tmp_path / "t5")
    (tmp_path / "prompts.txt").write_text("a red cat\n\na cat on a mat\n")
    prompts = encode_prompts(tmp_path / "prompts.txt", tmp_path / "t5", max_length=7)
    ids = torch.tensor([[3, 4, 5, 1, 0, 0, 0], [3, 5, 6, 3, 7, 1, 0], [1, 0, 0, 0, 0, 0, 0]])
    mask = (ids != 0).long()
    mask[2, 0] = 1
    with torch.no_grad():
        expected = encoder(input_ids=ids, attention_mask=mask)[0]
    assert prompts.embeddings.shape == (2, 7, 24)
    assert torch.equal(prompts.mask, mask[:2]) and torch.equal(prompts.null_mask, mask[2])
    torch.testing.assert_close(prompts.embeddings, expected[:2])
    torch.testing.assert_close(prompts.null_embedding, expected[2])


#################################################################################
#                                    Errors                                     #
#################################################################################

def test_missing_vae_folder_says_where_to_get_it(monkeypatch, tmp_path):
    monkeypatch.delenv("PTDIT_VAE", raising=False)
    with pytest.raises(FileNotFoundError, match="--vae.*PTDIT_VAE") as err:
        load_vae(None)
    assert "sd-vae-ft-ema" in str(err.value)
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist.*sd-vae-ft-ema"):
        sample(small_model("DiT"), vae=tmp_path / "nowhere", conditions="1", num=1,
               out=tmp_path / "out", resolution=RESOLUTION)
    assert not (tmp_path / "out").exists()


def test_vae_folder_of_the_wrong_kind(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty.*no config.json.*AutoencoderKL"):
        load_vae(empty)
    unet = tmp_path / "unet"
    unet.mkdir()
    (unet / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    with pytest.raises(ValueError, match="unet.*'UNet2DModel', not an AutoencoderKL"):
        load_vae(unet)
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ValueError, match="no_weights.*no weights"):
        load_vae(no_weights)


def test_condition_and_model_mismatches(vae, tmp_path):
    def attempt(family, conditions, **kw):
        run(small_model(family), vae, tmp_path, conditions=conditions, **kw)

    with pytest.raises(ValueError, match="class-conditional: give class labels"):
        attempt("DiT", random_prompts(2, 6))
    with pytest.raises(ValueError, match="text-conditional: give T5 prompt embeddings"):
        attempt("PixArt", class_conditions("1,2"))
    with pytest.raises(ValueError, match=r"\[10\] out of range.*0..9"):
        attempt("PT-DiT-class", class_conditions("3,10"))
    with pytest.raises(ValueError, match="32 channels.*caption_channels=24"):
        attempt("PixArt", random_prompts(2, 6, channels=32))
    with pytest.raises(ValueError, match="5 caption tokens.*learned null caption has 6"):
        attempt("PixArt", random_prompts(2, 5))
    with pytest.raises(ValueError, match="no learned null caption.*null_embedding"):
        attempt("PT-DiT", random_prompts(2, 5, null=False))
    attempt("PT-DiT", random_prompts(2, 5, null=False), cfg_scale=1.0, steps=1)   # unguided
    assert not list(tmp_path.glob("*.png.tmp"))


def test_shape_and_option_errors(vae, tmp_path):
    model = small_model("PT-DiT")
    conditions = conditions_for(model)
    with pytest.raises(ValueError,
                       match="VAE factor 2 × patch 2 × windows per side 2.*8 px.*16 or 24"):
        run(model, vae, tmp_path, resolution=20, conditions=conditions)
    with pytest.raises(ValueError, match="3-channel latents; the model takes 4"):
        run(model, tiny_vae(latent_channels=3), tmp_path, conditions=conditions)
    with pytest.raises(ValueError, match="temporal window takes multiples of 4"):
        run(model, vae, tmp_path, frames=3, conditions=conditions)
    with pytest.raises(ValueError, match="unknown scheduler 'euler'; allowed: ddpm, dpm, flow"):
        run(model, vae, tmp_path, scheduler="euler", conditions=conditions)
    with pytest.raises(ValueError, match="guidance_channels '2'"):
        run(model, vae, tmp_path, guidance_channels="2", conditions=conditions)
    with pytest.raises(ValueError, match="1000"):
        run(model, vae, tmp_path, scheduler="ddpm", steps=1001, conditions=conditions)


def test_decode_divides_by_the_scaling_factor(vae):
    latents = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = vae.decode(latents / vae.config.scaling_factor).sample
    torch.testing.assert_close(decode(vae, latents), expected)
    video = decode(vae, torch.stack([latents, -latents], dim=2))   # (B, C, F, h, w)
    assert video.shape == (2, 2, 3, 16, 16)
    torch.testing.assert_close(video[:, 0], expected)


#################################################################################
#             run.json, stale temporaries, non-finite values, sizes             #
#################################################################################

def test_a_folder_of_other_settings_is_refused_naming_each_change(vae, tmp_path):
    """run.json records what makes the pixels: a rerun with another seed, step count, cfg
    scale, labels or model is refused before any PNG is written, naming each field (old →
    new); the count, first index and batch size may change (a resume)."""
    model = small_model("DiT", dtype=torch.float32)
    base = dict(num=2, batch_size=2, scheduler="flow", steps=1, seed=3,
                conditions=class_conditions("0-3"))
    run(model, vae, tmp_path, **base)
    record = json.loads((tmp_path / "run.json").read_text())
    assert record["settings"]["seed"] == 3 and record["settings"]["steps"] == 1
    before = sorted(p.name for p in tmp_path.iterdir())
    for change, fields in [
            (dict(seed=4), ["seed: 3 → 4"]),
            (dict(steps=2, cfg_scale=2.0), ["steps: 1 → 2", "cfg_scale: 4.0 → 2.0"]),
            (dict(conditions=class_conditions("0-4")), ["conditions: "]),
            (dict(scheduler="ddpm"), ["scheduler: \"flow\" → \"ddpm\""])]:
        with pytest.raises(ValueError) as err:
            run(model, vae, tmp_path, **{**base, **change})
        message = str(err.value)
        assert "\n" not in message and "another --out" in message
        assert all(field in message for field in fields), message
    other = small_model("DiT", dtype=torch.float32)            # other weights, same config
    with pytest.raises(ValueError, match="weights.weights_sha256: "):
        run(other, vae, tmp_path, **base)
    with pytest.raises(ValueError, match=r"model_config.depth: 2 → 1"):
        run(small_model("DiT", dtype=torch.float32, depth=1), vae, tmp_path, **base)
    assert sorted(p.name for p in tmp_path.iterdir()) == before   # nothing written
    row = run(model, vae, tmp_path, **{**base, "num": 3, "batch_size": 1})   # resume: fine
    assert (row["images"], row["skipped"], row["status"]) == (1, 2, "ok")
    row = run(model, vae, tmp_path, **{**base, "num": 1, "start": 3})
    assert (row["images"], row["status"]) == (1, "ok")


def test_samples_without_a_record_are_not_resumed(vae, tmp_path):
    Image.fromarray(np.zeros((RESOLUTION, RESOLUTION, 3), np.uint8)).save(tmp_path / "000000.png")
    with pytest.raises(ValueError, match="holds samples .000000.png.*no run.json"):
        run(small_model("DiT", dtype=torch.float32), vae, tmp_path, steps=1, scheduler="flow")


def test_stale_temporaries_of_this_runs_indices_are_removed(vae, tmp_path):
    model = small_model("DiT", dtype=torch.float32)
    kw = dict(num=2, batch_size=2, scheduler="flow", steps=1, conditions=class_conditions("1"))
    run(model, vae, tmp_path, **kw)
    for name in ("000001.png.tmp", "000005.png.tmp"):   # killed writes: in and out of range
        (tmp_path / name).write_bytes(b"half")
    row = run(model, vae, tmp_path, **kw)                 # everything finished already
    assert row["skipped"] == 2 and not (tmp_path / "000001.png.tmp").exists()
    assert (tmp_path / "000005.png.tmp").exists()         # another run's index: left alone


def test_untrained_weights_are_recorded_by_their_init_seed(vae, tmp_path):
    model = small_model("DiT", dtype=torch.float32)
    kw = dict(steps=1, scheduler="flow", conditions=class_conditions("1"))
    row = run(model, vae, tmp_path / "a", init_seed=7, **kw)
    assert row["checkpoint"] == "untrained" and row["init_seed"] == 7
    assert json.loads((tmp_path / "a" / "run.json").read_text())["settings"]["weights"] == \
        {"untrained": True, "init_seed": 7}
    with pytest.raises(ValueError, match="weights.init_seed: 7 → 8"):
        run(model, vae, tmp_path / "a", init_seed=8, **kw)


def test_non_finite_latents_make_an_error_row_and_no_pngs(vae, tmp_path):
    model = small_model("DiT", dtype=torch.float32)
    with torch.no_grad():
        model.final_layer.linear.bias[0] = float("inf")   # every sample's output
    row = run(model, vae, tmp_path, num=3, batch_size=2, scheduler="flow", steps=1, start=5)
    assert row["status"].startswith("error: non-finite") and "first index 5" in row["status"]
    assert row["images"] == 0 and not list(tmp_path.glob("*.png"))
    (stored,) = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text()
                 .splitlines()]
    assert stored["status"] == row["status"]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_cfg_scale_is_refused(vae, tmp_path, value):
    with pytest.raises(ValueError, match="cfg_scale .* is not finite"):
        run(small_model("DiT", dtype=torch.float32), vae, tmp_path / "out", cfg_scale=value)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("key", ["embeddings", "null_embedding"])
def test_non_finite_prompt_embeddings_are_refused_naming_the_file(tmp_path, key):
    prompts = random_prompts(3, 5)
    tensors = {"embeddings": prompts.embeddings, "mask": prompts.mask,
               "null_embedding": prompts.null_embedding, "null_mask": prompts.null_mask}
    tensors[key] = tensors[key].clone()
    tensors[key].view(-1)[int(torch.randint(0, tensors[key].numel(), ()))] = float("nan")
    torch.save(tensors, tmp_path / "prompts.pt")
    with pytest.raises(ValueError, match=f"prompts.pt: '{key}' holds NaN or infinite"):
        prompt_embeddings(tmp_path / "prompts.pt")


@pytest.mark.parametrize("content, message", [
    (b"not a safetensors file at all", "cannot be read"),
    (None, "cannot be read"),                       # a truncated real file
    (b"", "is empty .0 bytes."),
])
def test_damaged_safetensors_are_named(tmp_path, content, message):
    from safetensors.torch import save_file
    prompts = random_prompts(2, 5)
    path = tmp_path / "prompts.safetensors"
    save_file({"embeddings": prompts.embeddings, "mask": prompts.mask}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if content is None else content)
    with pytest.raises(ValueError, match=f"prompts.safetensors' {message}"):
        prompt_embeddings(path)


def test_non_tensor_pickles_and_text_files_are_named(tmp_path):
    torch.save({"embeddings": Trace, "mask": None}, tmp_path / "objects.pt")   # a class
    with pytest.raises(ValueError, match="objects.pt' cannot be read .*dict of tensors"):
        prompt_embeddings(tmp_path / "objects.pt")
    (tmp_path / "text.pt").write_text("a red cat\n")
    with pytest.raises(ValueError, match="text.pt' cannot be read"):
        prompt_embeddings(tmp_path / "text.pt")
    (tmp_path / "prompts.txt").write_text("a red cat\n")
    with pytest.raises(ValueError, match="unknown file type '.txt'.*--prompts"):
        prompt_embeddings(tmp_path / "prompts.txt")


def test_huge_label_ranges_are_runs_checked_against_the_model():
    labels = class_conditions("0-99999999999")            # never a list of 10^11 ints
    assert labels.count == 10**11 and labels.runs == (range(0, 10**11),)
    i = torch.randint(0, 2**40, (5,))
    assert torch.equal(labels.at(i.tolist()), i % 10**11)
    mixed = class_conditions("7,100-199,3")
    assert mixed.at([0, 1, 100, 101, 102, 206]).tolist() == [7, 100, 199, 3, 7, 101]
    with pytest.raises(ValueError, match=r"\[1000, 1001.*\] and 99999998992 more out of range"
                                         r" for DiT.*0..999"):
        check_conditions(small_model("DiT", num_classes=1000), labels, guided=True)


def test_a_huge_run_starts_at_once(vae, tmp_path):
    """10^12 indices: the first batch runs without a list of every index being built (the
    alarm is a guard against a hang, not a timing)."""
    import signal

    class Started(Exception):
        pass

    def stop(*_):
        raise Started

    def hung(*_):
        raise AssertionError("sampling 10^12 indices did not start within 120 s")

    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        with pytest.raises(Started):
            run(small_model("DiT", dtype=torch.float32), vae, tmp_path, num=10**12,
                scheduler="flow", steps=1, on_step=stop)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    (row,) = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text()
              .splitlines()]
    assert row["status"] == "error: Started" and row["index_stop"] == 10**12
