"""Backends and observers of a whole model, and PT-DiT's batch-independent window layout."""

import warnings
from contextlib import ExitStack

import numpy as np
import pytest
import torch

import ptdit
from ptdit import attention as A
from ptdit.attention import AttentionCall, attention_backend, attention_modules, observe

from conftest import Ops, forward_inputs, randomize, small_model

FUSED = "aten._scaled_dot_product_flash_attention_for_cpu"


def layout_bytes(layout) -> int:
    """Bytes held by the tensors of a cached (WindowLayout, positions) pair."""
    tensors = (*layout[0][1:], layout[1])
    return sum(t.untyped_storage().nbytes() for t in tensors if t is not None)


#################################################################################
#                                  Backends                                     #
#################################################################################

def test_attention_backend_restores_each_module_even_on_error():
    model = small_model("PT-DiT")
    modules = list(attention_modules(model).values())
    modules[0].backend = "math"                 # modules that differ get their own back
    before = [m.backend for m in modules]
    with pytest.raises(RuntimeError, match="boom"):
        with attention_backend(model, "math") as same:
            assert same is model and {m.backend for m in modules} == {"math"}
            raise RuntimeError("boom")
    assert [m.backend for m in modules] == before
    with pytest.raises(ValueError, match="allowed: sdpa, math"):
        with attention_backend(model, "flash"):
            pass
    assert [m.backend for m in modules] == before


def test_attention_backend_math_matches_sdpa():
    model = small_model("PT-DiT")
    x, t, *cond = forward_inputs(model, (2, 4, 16, 16))
    with torch.no_grad():
        ref = model(x, t, *cond)
        with attention_backend(model, "math"):
            assert (model(x, t, *cond) - ref).abs().max() <= 1e-12


#################################################################################
#                                  Observers                                    #
#################################################################################

def test_observers_get_one_record_per_call():
    model = small_model("PT-DiT")
    B, nW, N, H = 2, 4, 16, 4                   # grid 1x8x8 in 2x2 windows of 1x4x4 tokens
    x, t, *cond = forward_inputs(model, (B, 4, 16, 16))
    seen = {}
    with torch.no_grad(), attention_backend(model, "math"), \
            observe(model, lambda call, probs: seen.setdefault(call, probs.shape)) as observed:
        model(x, t, *cond)
    assert list(observed) == list(attention_modules(model))
    windows = dict(grid=(1, 8, 8), window=(1, 4, 4), batch=B)
    plain = dict(grid=None, window=None, batch=B)
    expected = {
        AttentionCall("blocks.1.proxy_attn", "proxy", "math", **plain): (B, H, nW, nW),
        AttentionCall("blocks.1.proxy_cross_attn", "proxy_cross", "math", **plain):
            (B, H, nW * N, nW),
        AttentionCall("blocks.1.attn", "window", "math", **windows): (B * nW, H, N, N),
        AttentionCall("blocks.1.shift_attn", "shift_window", "math", **windows):
            (B * nW, H, N, N),
        AttentionCall("blocks.1.cross_attn", "text_cross", "math", **plain): (B, H, nW * N, 6),
    }
    assert {c: s for c, s in seen.items() if c.name.startswith("blocks.1.")} == expected
    assert len(seen) == 10
    assert all(m.observer is None for m in attention_modules(model).values())   # restored


def test_shifted_window_rows_are_sample_major():
    """Row b·nW + w of a shifted-window call's probabilities is window w of sample b."""
    model = small_model("PT-DiT")
    x, t, *cond = forward_inputs(model, (3, 4, 16, 16))
    probs = []
    with torch.no_grad(), attention_backend(model, "math"), \
            observe(model, lambda call, p: probs.append(p), names=["blocks.0.shift_attn"]):
        model(x, t, *cond)
        model(x[2:], t[2:], *(c[2:] for c in cond))
    batched, alone = probs
    assert batched.shape == (3 * 4, 4, 16, 16) and alone.shape == (4, 4, 16, 16)
    assert (batched[8:] - alone).abs().max() <= 1e-12


def test_observe_filters_and_restores_what_was_there():
    model = small_model("PT-DiT")
    keep = lambda call, probs: None   # noqa: E731
    model.blocks[0].attn.observer = keep
    calls = []
    with attention_backend(model, "math"), \
            observe(model, lambda call, p: calls.append(call.name), kinds=["window"]) as chosen:
        assert list(chosen) == ["blocks.0.attn", "blocks.1.attn"]
        with torch.no_grad():
            model(*forward_inputs(model, (1, 4, 16, 16)))
    assert calls == ["blocks.0.attn", "blocks.1.attn"]
    assert model.blocks[0].attn.observer is keep and model.blocks[1].attn.observer is None
    with pytest.raises(ValueError, match=r"unknown attention module kinds \['windows'\]"):
        with observe(model, keep, kinds=["windows"]):
            pass
    with pytest.raises(ValueError, match=r"unknown attention module names \['blocks.9.attn'\]"):
        with observe(model, keep, names=["blocks.9.attn"]):
            pass
    with pytest.raises(ValueError, match=r"no attention module matches kinds=\['shift_window'\]"
                                         r", names=None; this model's kinds: global"):
        with observe(small_model("DiT"), keep, kinds=["shift_window"]):
            pass


def test_observer_on_a_fused_backend_warns_at_set_time_and_once_at_run_time():
    model = small_model("PT-DiT", depth=1)
    inputs = forward_inputs(model, (1, 4, 16, 16))
    names = list(attention_modules(model))
    with ExitStack() as stack:
        with pytest.warns(UserWarning, match=r"5 module\(s\) not on the 'math' backend "
                                             r"\(blocks.0.proxy_attn, .* and 1 more\).*"
                                             r"attention_backend\(model, 'math'\)"):
            stack.enter_context(observe(model, lambda call, probs: None))
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            model(*inputs)
            model(*inputs)
    assert len(caught) == len(names) == 5                  # once per module, not per call
    assert all(sum(f"({n})" in str(w.message) for w in caught) == 1 for n in names)


#################################################################################
#                  Shifted windows: one mask for every sample                   #
#################################################################################

@pytest.mark.parametrize("backend", ["sdpa", "math"])
def test_shared_shift_mask_equals_the_repeated_one(backend):
    """(B, nW, N, D) rows against one (nW, 1, N, N) mask give what (B·nW, N, D) rows against
    the mask repeated B times gave."""
    grid, window, B = (4, 4, 6), (2, 2, 3), 8
    attn = randomize(A.Attention(32, 4, kind="shift_window").double(), std=0.3)
    A.set_backend(attn, backend)
    nW, N = A.window_count(grid, window), 12
    bias = A.shift_window_bias(grid, window, torch.float64, "cpu")
    h = torch.randn(B, nW, N, 32, dtype=torch.float64)
    ours = attn(h, bias)
    assert ours.shape == (B, nW, N, 32)
    repeated = attn(h.view(B * nW, N, 32), bias.repeat(B, 1, 1, 1)).view(B, nW, N, 32)
    assert (ours - repeated).abs().max() <= 1e-12
    alone = torch.stack([attn(h[b:b + 1], bias)[0] for b in range(B)])
    assert (ours - alone).abs().max() <= 1e-12


def test_shared_shift_mask_takes_the_fused_cpu_kernel():
    """No 5-D problem reaches SDPA (it would run the math path): one fused 4-D call per sample,
    with the (nW, 1, N, N) mask as it is."""
    attn = A.Attention(32, 4, kind="shift_window")
    grid, window, B = (1, 8, 8), (1, 4, 4), 3
    bias = A.shift_window_bias(grid, window, torch.float32, "cpu")
    with torch.no_grad(), Ops() as ops:
        attn(torch.randn(B, 4, 16, 32), bias)
    assert ops.seen.count(FUSED) == B and "aten.bmm" not in ops.seen


def test_ptdit_layout_is_cached_once_for_every_batch_size():
    model = small_model("PT-DiT")
    grid, window = (1, 8, 8), (1, 4, 4)
    like = torch.zeros((), dtype=torch.float64)
    with torch.no_grad():
        model(*forward_inputs(model, (1, 4, 16, 16)))
        cached = model.layout(grid, window, like)
        x, t, *cond = forward_inputs(model, (8, 4, 16, 16))
        out = model(x, t, *cond)
        alone = torch.cat([model(x[b:b + 1], t[b:b + 1], *(c[b:b + 1] for c in cond))
                           for b in range(8)])
    assert model.layout(grid, window, like) is cached      # not rebuilt for batch 8
    layout, positions = cached
    assert layout.shift_bias.shape == (4, 1, 16, 16)
    T, D = 64, 64
    assert layout_bytes(cached) == 8 * (4 * 16 * 16 + 2 * T + T * D)   # bias, gathers, table
    assert (out - alone).abs().max() <= 1e-12


def test_cached_shift_mask_at_48_frames_1024px_is_192_mib_whatever_the_batch():
    model = ptdit.build("PT-DiT/XL", device="meta")
    grid = (48, 64, 64)                               # 48 latent frames, 128x128 latents, p=2
    window = model.config.window_for(grid)
    layout, _ = model.layout(grid, window, torch.empty((), device="meta"))
    assert window == (4, 8, 8) and layout.shift_bias.shape == (768, 1, 256, 256)
    assert layout.shift_bias.untyped_storage().nbytes() == 192 * 2**20


def test_ptdit_refuses_numpy_latents_with_a_value_error():
    model = small_model("PT-DiT-class")
    x, t, y = forward_inputs(model, (1, 4, 16, 16))
    with pytest.raises(ValueError, match=r"latents must be a \(B, C, H, W\) or \(B, C, F, H, W\)"
                                         r" tensor, got ndarray"):
        model(np.zeros((1, 4, 16, 16)), t, y)
