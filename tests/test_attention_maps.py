"""Capturing self-attention maps of our three architectures and of diffusers' DiT / PixArt along
a sequence of denoising calls, reduced per layer, head, step and guidance branch."""

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode  # private, for tests only
from torch.utils._pytree import tree_leaves

from analysis.attention_maps import AttentionMap, load_maps, save_maps
from analysis.capture import Capture, analyse
from analysis.model_calls import ModelCall, noised_inputs, schedule_of

from conftest import condition, small_model

TIMESTEPS = [900, 500, 100]
COND_ARGS = {"DiT": ["y"], "PixArt": ["text", "text_mask"], "PT-DiT": ["text", "text_mask"],
             "PT-DiT-class": ["text"]}


# tiny maps: OpenMP hand-offs cost more than the work
pytestmark = pytest.mark.usefixtures("one_thread")


def ours(family: str):
    """A small model (windows_per_side=4 gives PT-DiT a 4x4 grid of proxies at 16x16 latents)
    and guidance calls (cond + uncond, 2 samples each) at three timesteps."""
    model = small_model(family, **({"windows_per_side": 4} if "PT-DiT" in family else {}))
    cond = dict(zip(COND_ARGS[family], condition(model, 2)))
    uncond = dict(zip(COND_ARGS[family], condition(model, 2)))
    x0 = torch.randn(2, 4, 16, 16, dtype=torch.float64)
    return model, noised_inputs(x0, TIMESTEPS, cond, uncond, schedule=schedule_of(model))


def attention_input(module: torch.nn.Module, model, call: ModelCall) -> torch.Tensor:
    """What `module` receives in a plain forward of `call` (its first positional input)."""
    seen = []
    handle = module.register_forward_pre_hook(lambda _, args, *__: seen.append(args[0]),
                                              with_kwargs=True)
    with torch.no_grad():
        model(call.x, **call.kwargs)
    handle.remove()
    return seen[0]


def softmax_attention(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return (q @ k.transpose(-2, -1) * scale).softmax(dim=-1)


def find(maps: list[AttentionMap], **fields) -> AttentionMap:
    (found,) = [m for m in maps if all(getattr(m, f) == v for f, v in fields.items())]
    return found


#################################################################################
#                                  Our models                                   #
#################################################################################

@pytest.mark.parametrize("family", ["DiT", "PixArt", "PT-DiT", "PT-DiT-class"])
def test_capture_along_calls_matches_direct_recomputation(family):
    """Layers, heads, steps and branches as asked; a kept map equals softmax(q·kᵀ/√d) from the
    module's own weights on what it received; the headwise path gives the same numbers."""
    model, calls = ours(family)
    kind = "proxy" if "PT-DiT" in family else "global"
    windows = [2, 4] if kind == "global" else [2]
    rows, maps = analyse(model, calls, windows=windows, layers=[0, 1], heads=[1, 2],
                         keep_maps=True, max_pairs=None)
    keys = {(r["kind"], r["layer"], r["head"], r["step"], r["timestep"], r["branch"])
            for r in rows}
    assert keys == {(kind, layer, h, s, float(t), b) for layer in (0, 1) for h in (1, 2)
                    for s, t in enumerate(TIMESTEPS) for b in ("cond", "uncond")}
    assert {r["grid"] for r in rows} == {"8x8" if kind == "global" else "4x4"}
    assert {r["model"] for r in rows} == {model.name}
    assert all(r["n"] > 0 for r in rows)

    module = model.blocks[1].attn if kind == "global" else model.blocks[1].proxy_attn
    x = attention_input(module, model, calls[1])[2]         # first sample of the uncond half
    D, d = x.shape[-1], module.head_dim
    W, b = module.qkv.weight, module.qkv.bias
    q = (x @ W[:D].T + b[:D])[:, 2 * d:3 * d]
    k = (x @ W[D:2 * D].T + b[D:2 * D])[:, 2 * d:3 * d]
    kept = find(maps, layer=1, head=2, step=1, branch="uncond")
    assert kept.probs.shape == (x.shape[0], x.shape[0])
    torch.testing.assert_close(torch.from_numpy(kept.probs).double(),
                               softmax_attention(q, k, d**-0.5), rtol=1e-6, atol=1e-7)

    headwise, _ = analyse(model, calls, windows=windows, layers=[0, 1], heads=[1, 2],
                          max_pairs=None, headwise=True)
    for a, h in zip(rows, headwise):
        assert (a["metric"], a["window"], a["step"]) == (h["metric"], h["window"], h["step"])
        assert h["value"] == pytest.approx(a["value"], rel=1e-10)


def test_capture_leaves_outputs_and_other_layers_alone():
    """Only the analysed layers switch to math while capturing; the output is unchanged; every
    module gets its backend and observer back."""
    model, calls = ours("PixArt")
    with torch.no_grad():
        plain = model(calls[0].x, **calls[0].kwargs)
    with Capture(model, layers=[0], windows=[2]) as capture:
        assert model.blocks[0].attn.backend == "math"
        assert model.blocks[1].attn.backend == "sdpa"
        assert model.blocks[0].cross_attn.backend == "sdpa"
        out = capture.run(calls[0])
    torch.testing.assert_close(out, plain, rtol=1e-12, atol=1e-12)
    assert {k.layer for k in capture.stats} == {0}
    for block in model.blocks:
        assert block.attn.backend == "sdpa" and block.attn.observer is None
        assert not block.attn.qkv._forward_hooks
    with Capture(model, layers=[0], windows=[2], headwise=True):
        assert model.blocks[0].attn.backend == "sdpa"


def test_ptdit_window_attention_is_not_analysed():
    """Window and shifted-window attention stay on SDPA; a PT-DiT without proxy attention is
    refused with what is analysed."""
    model, calls = ours("PT-DiT")
    with Capture(model, windows=[2]) as capture:
        assert model.blocks[0].attn.backend == "sdpa"             # window kind
        assert model.blocks[0].proxy_attn.backend == "math"
        capture.run(calls[0])
    assert {k.kind for k in capture.stats} == {"proxy"}
    no_giim = small_model("PT-DiT", giim=False)
    with pytest.raises(ValueError, match="no attention over all positions.*proxy"):
        Capture(no_giim)


def test_bad_requests_are_refused():
    model, calls = ours("DiT")
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist; allowed: 0…1"):
        Capture(model, layers=[5])
    with pytest.raises(ValueError, match="heads must be in 0…3"):
        Capture(model, heads=[4])
    odd = ModelCall(calls[0].x[:3], {k: v[:3] for k, v in calls[0].kwargs.items()}, cfg=True)
    with pytest.raises(ValueError, match="even batch"):
        analyse(model, [odd], windows=[2])
    with pytest.raises(ValueError, match="no model calls"):
        analyse(model, [], windows=[2])


def test_video_latents_and_step_subsets():
    """Video latents (B, C, F, H, W): maps over the (F, h, w) grid, windows with a temporal
    extent; `steps` runs only the chosen calls."""
    model = small_model("DiT")
    x0 = torch.randn(1, 4, 2, 8, 8, dtype=torch.float64)
    labels = {"y": torch.tensor([3])}
    calls = noised_inputs(x0, TIMESTEPS, labels, {"y": torch.tensor([model.config.num_classes])})
    rows, _ = analyse(model, calls, windows=[(2, 2, 2), 2], layers=[0], heads=[0], steps=[2])
    assert {r["grid"] for r in rows} == {"2x4x4"} and {r["step"] for r in rows} == {2}
    assert {r["window"] for r in rows} == {"2x2x2", "1x2x2", None}
    assert {r["latent_frames"] for r in rows} == {2} and {r["tokens"] for r in rows} == {32}


def test_kept_maps_round_trip(tmp_path):
    model, calls = ours("DiT")
    _, maps = analyse(model, calls[:1], windows=[2], layers=[0], heads=[0], keep_maps=True)
    assert [(m.branch, m.grid) for m in maps] == [("cond", (1, 8, 8)), ("uncond", (1, 8, 8))]
    back = load_maps(save_maps(maps, tmp_path / "maps.npz"))
    for a, b in zip(maps, back):
        assert (a.kind, a.layer, a.head, a.step, a.timestep, a.branch, a.grid) == \
            (b.kind, b.layer, b.head, b.step, b.timestep, b.branch, b.grid)
        assert (a.probs == b.probs).all()


#################################################################################
#                              diffusers' DiT / PixArt                          #
#################################################################################

def diffusers_model(name: str):
    from analysis.offline import go_offline
    go_offline()
    import diffusers

    if name == "PixArt":
        model = diffusers.PixArtTransformer2DModel(
            num_layers=2, attention_head_dim=8, num_attention_heads=2, in_channels=4,
            out_channels=8, sample_size=8, caption_channels=16, cross_attention_dim=16)

        def cond():
            return {"encoder_hidden_states": torch.randn(1, 5, 16),
                    "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
        return model.eval(), cond(), cond()
    model = diffusers.DiTTransformer2DModel(num_layers=2, attention_head_dim=8,
                                            num_attention_heads=2, in_channels=4, sample_size=8)
    return model.eval(), {"class_labels": torch.tensor([3])}, \
        {"class_labels": torch.tensor([1000])}


@pytest.mark.parametrize("name", ["PixArt", "DiT"])
def test_diffusers_capture_matches_attn_processor(name):
    """The reducing processor returns AttnProcessor's output, hands over softmax(q·kᵀ·scale)
    of the module's own projections, only on attn1, per layer, head, step and branch."""
    model, cond, uncond = diffusers_model(name)
    calls = noised_inputs(torch.randn(1, 4, 16, 16), TIMESTEPS, cond, uncond,
                          timestep_arg="timestep")
    with torch.no_grad():
        plain = model(calls[2].x, **calls[2].kwargs).sample
    with Capture(model, windows=[2, 4], keep_maps=True) as capture:
        out = capture.run(calls[2]).sample
        processors = [(b.attn1.processor, b.attn2 and b.attn2.processor)
                      for b in model.transformer_blocks]
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-6)
    for (self_attention, cross_attention), block in zip(processors, model.transformer_blocks):
        assert type(self_attention).__name__ == "_ReducingProcessor"
        assert type(cross_attention).__name__ != "_ReducingProcessor"
        assert block.attn1.processor is not self_attention            # given back

    rows, maps = analyse(model, calls, windows=[2, 4], keep_maps=True)
    keys = {(r["layer"], r["head"], r["step"], r["branch"]) for r in rows}
    assert keys == {(layer, h, s, b) for layer in (0, 1) for h in (0, 1) for s in range(3)
                    for b in ("cond", "uncond")}
    attn = model.transformer_blocks[1].attn1
    x = attention_input(attn, model, calls[0])[0]             # the conditional sample
    q, k = (f(x).unflatten(-1, (2, 8))[:, 1] for f in (attn.to_q, attn.to_k))   # head 1
    kept = find(maps, layer=1, head=1, step=0, branch="cond")
    torch.testing.assert_close(torch.from_numpy(kept.probs), softmax_attention(q, k, attn.scale),
                               rtol=1e-4, atol=1e-6)


#################################################################################
#                                 Noised inputs                                 #
#################################################################################

def test_noised_inputs_follow_their_schedules():
    x0 = torch.randn(2, 4, 8, 8, dtype=torch.float64)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(7)).double()
    labels = {"y": torch.tensor([1, 2])}
    ddpm = noised_inputs(x0, [999, 10], labels, schedule="ddpm",
                         generator=torch.Generator().manual_seed(7))
    betas = torch.linspace(1e-4, 0.02, 1000, dtype=torch.float32)   # as diffusers builds them
    alpha_bar = torch.cumprod(1 - betas, dim=0).double()
    for call, t in zip(ddpm, [999, 10]):
        expected = alpha_bar[t].sqrt() * x0 + (1 - alpha_bar[t]).sqrt() * noise
        torch.testing.assert_close(call.x, expected, rtol=1e-6, atol=1e-6)
        assert call.timestep == t and not call.cfg
        assert torch.equal(call.kwargs["t"], torch.full((2,), float(t), dtype=torch.float64))
    flow = noised_inputs(x0, [250.0], labels, {"y": torch.tensor([10, 10])}, schedule="flow",
                         generator=torch.Generator().manual_seed(7))
    (call,) = flow
    torch.testing.assert_close(call.x, torch.cat([0.75 * x0 + 0.25 * noise] * 2))
    assert call.cfg and call.kwargs["y"].tolist() == [1, 2, 10, 10]
    assert [b for b, _ in call.branches()] == ["cond", "uncond"]
    with pytest.raises(ValueError, match="integers in 0…999, got 1000.0; nearest valid: 999"):
        noised_inputs(x0, [1000], labels)
    with pytest.raises(ValueError, match="0…1000"):
        noised_inputs(x0, [-5], labels, schedule="flow")
    with pytest.raises(ValueError, match="unknown noise schedule"):
        noised_inputs(x0, [5], labels, schedule="edm")
    with pytest.raises(ValueError, match="same arguments"):
        noised_inputs(x0, [5], labels, {"text": x0})


#################################################################################
#                 Memory: how many maps each path holds at once                 #
#################################################################################

class LiveMaps(TorchDispatchMode):
    """The most bytes that tensors shaped like attention maps (..., L, L) hold at once over the
    ops a block of code runs (a storage counted once, however many views share it)."""

    def __init__(self, tokens: int):
        super().__init__()
        self.tokens, self.peak, self._live = tokens, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self._live += [weakref.ref(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)
                       and t.dim() >= 2 and t.shape[-2:] == (self.tokens, self.tokens)]
        alive = [t for t in (ref() for ref in self._live) if t is not None]
        self._live = [weakref.ref(t) for t in alive]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in alive}
        self.peak = max(self.peak, sum(storages.values()))
        return out


def test_headwise_path_holds_one_heads_maps_at_a_time(monkeypatch):
    """The headwise path hands the reducer each head's maps (rows, L, L) in a storage of their
    own and holds a few such maps at once whatever the number of heads (the previous head's
    probabilities, this head's q·kᵀ and its scaled copy); the observer path hands over views of
    all heads' probabilities and holds all heads' scores beside them. (What each path peaks at
    for PixArt-XL/2 at 1024 px is measured by `python -m bench.command_costs
    bench/commands/cpu.toml`, not here.)"""
    heads, tokens = 8, 100                                        # 20x20 latents, patch 2
    model = small_model("DiT", num_heads=heads)
    call = noised_inputs(torch.randn(1, 4, 20, 20, dtype=torch.float64), [500],
                         {"y": torch.tensor([3])}, {"y": torch.tensor([10])})
    one_head = 2 * tokens * tokens * 8                            # 2 rows (cond, uncond), float64
    take, handed = Capture.take, []

    def spy(self, name, head, probs, values):
        handed.append((tuple(probs.shape), probs.untyped_storage().nbytes()))
        take(self, name, head, probs, values)

    monkeypatch.setattr(Capture, "take", spy)
    for headwise in (True, False):
        handed.clear()
        with LiveMaps(tokens) as live:
            analyse(model, call, windows=[2], layers=[0], headwise=headwise)
        assert [shape for shape, _ in handed] == [(2, tokens, tokens)] * heads
        if headwise:
            assert {nbytes for _, nbytes in handed} == {one_head}
            assert one_head <= live.peak <= 3 * one_head
        else:
            assert {nbytes for _, nbytes in handed} == {heads * one_head}
            assert live.peak >= 2 * heads * one_head
