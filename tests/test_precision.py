"""bfloat16 / float16 parity of every attention backend, flash-attention's rule
(Dao-AILab/flash-attention tests/test_flash_attn.py): against a float64 run, a backend's error
(RMS) in a low precision is at most twice that of a plain explicit-softmax attention written
here and run in the same precision, plus a tiny floor for exactly-zero references. Per
attention kind (the module, every other op alike) and per small model of each family (all of
its attentions at once). Weights and inputs are rounded to the low precision first, and the
float64 run gets the rounded values: what is compared is the arithmetic, not the rounding of
the inputs."""

import copy
from math import prod

import pytest
import torch

from ptdit import attention as A
from ptdit.attention import Attention, CrossAttention, attention_backend

from conftest import SMALL, forward_inputs, randomize, small_model

LOW = [torch.bfloat16, torch.float16]
FLOOR = 1e-6            # absolute; only matters where the reference's own error is exactly zero
D, HEADS, BATCH = 32, 4, 2
GRID, WINDOW = (2, 4, 6), (2, 2, 3)     # video grid, odd window side: 4 windows of 12 tokens


def reference_attention(q, k, v, bias, observe):
    """softmax(q·kᵀ/√d + bias)·v written out op by op in the inputs' dtype, q (..., H, Lq, d),
    k, v (..., H, Lk, d), bias broadcasting to (..., H, Lq, Lk). q is scaled before the product
    (the backends scale the scores), as flash-attention's reference reorders its operations,
    and the softmax is spelled out (exp, sum, divide: each rounded), not torch.softmax."""
    scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
    if bias is not None:
        scores = scores + bias
    weights = (scores - scores.amax(dim=-1, keepdim=True)).exp()
    return weights / weights.sum(dim=-1, keepdim=True) @ v


@pytest.fixture(autouse=True)
def reference_backend(monkeypatch):
    """The reference registered as backend "reference" for the test's duration."""
    monkeypatch.setitem(A.BACKENDS, "reference", reference_attention)


def kind_case(kind: str):
    """(module, float64 inputs of its forward) for one attention kind, tiny shapes; the
    `dtype -> bias` function gives the kind's additive mask (or None)."""
    T, nW, N = prod(GRID), A.window_count(GRID, WINDOW), prod(WINDOW)
    x = torch.randn(BATCH, T, D, dtype=torch.float64)
    if kind in ("global", "proxy"):      # tokens, or one proxy per window (B, nW, D)
        module, inputs = Attention(D, HEADS, kind=kind), (x if kind == "global" else x[:, :nW],)
        bias = None
    elif kind == "window":               # a window per row (B·nW, N, D)
        module, inputs, bias = Attention(D, HEADS, kind=kind), (x.view(BATCH * nW, N, D),), None
    elif kind == "shift_window":         # (B, nW, N, D) with the shared mask (nW, 1, N, N)
        module, inputs = Attention(D, HEADS, kind=kind), (x.view(BATCH, nW, N, D),)

        def bias(dtype):
            return A.shift_window_bias(GRID, WINDOW, dtype, "cpu")
    elif kind == "proxy_cross":          # tokens to the proxies
        module = CrossAttention(D, HEADS, kind=kind)
        inputs, bias = (x, torch.randn(BATCH, nW, D, dtype=torch.float64)), None
    elif kind == "text_cross":           # tokens to 7 caption tokens, some dropped
        module = CrossAttention(D, HEADS, kind=kind)
        inputs = (x, torch.randn(BATCH, 7, D, dtype=torch.float64))
        keep = torch.tensor([[1, 1, 1, 0, 1, 0, 0], [1, 0, 0, 0, 0, 0, 0]])

        def bias(dtype):
            return A.text_bias(keep, dtype)
    else:
        raise AssertionError(f"no precision case for attention kind {kind!r}")
    return randomize(module.double(), std=0.3), inputs, bias


def run(module, backend: str, *inputs):
    """module(*inputs) on `backend`, no autograd; a float16 op CPU lacks skips the case."""
    try:
        with torch.no_grad(), attention_backend(module, backend):
            return module(*inputs)
    except (RuntimeError, NotImplementedError) as err:
        if "Half" in str(err):
            pytest.skip(f"float16 on CPU: {err}")
        raise


def low_and_exact(module, inputs, dtype):
    """The module and inputs in `dtype`, and the same rounded values in float64."""
    low = copy.deepcopy(module).to(dtype)
    low_inputs = tuple(x.to(dtype) if x.is_floating_point() else x for x in inputs)
    exact = copy.deepcopy(low).double()
    exact_inputs = tuple(x.double() if x.is_floating_point() else x for x in low_inputs)
    return low, low_inputs, exact, exact_inputs


def rms(error: torch.Tensor) -> float:
    return error.square().mean().sqrt().item()


def assert_within_twice_the_reference(ours, reference, exact, dtype) -> float:
    """ours' error against `exact` (float64) is at most twice reference's, plus FLOOR; returns
    reference's. The error is the root-mean-square difference: the largest difference of two
    equally accurate low-precision runs swings by up to 4x from one draw of weights and inputs
    to the next (math against the reference, 100 draws), their RMS by at most 1.4x."""
    assert ours.dtype == reference.dtype == dtype and ours.shape == exact.shape
    ours_diff, reference_diff = ours.double() - exact, reference.double() - exact
    ours_error, reference_error = rms(ours_diff), rms(reference_diff)
    assert ours_error <= 2 * reference_error + FLOOR, (
        f"RMS error {ours_error:.3g} vs the reference's {reference_error:.3g}; largest "
        f"{ours_diff.abs().max():.3g} vs {reference_diff.abs().max():.3g}")
    return reference_error


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("kind", A.KINDS)
@pytest.mark.parametrize("backend", list(A.BACKENDS))
def test_each_attention_kind_within_twice_the_reference_error(backend, kind, dtype):
    module, inputs, bias = kind_case(kind)
    low, low_inputs, exact, exact_inputs = low_and_exact(module, inputs, dtype)
    if bias is not None:
        low_inputs += (bias(dtype),)
        exact_inputs += (bias(dtype).double(),)      # the rounded mask the low runs get
    reference_error = assert_within_twice_the_reference(
        run(low, backend, *low_inputs), run(low, "reference", *low_inputs),
        run(exact, "reference", *exact_inputs), dtype)
    assert reference_error > 0                  # the low precision did round something


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("family", list(SMALL))
@pytest.mark.parametrize("backend", list(A.BACKENDS))
def test_small_models_within_twice_the_reference_error(backend, family, dtype, one_thread):
    """Every attention of the model on the backend against every attention on the reference:
    all other ops run alike in `dtype`. The attentions' weights are drawn larger than the rest
    (sharper maps), or the other ops' rounding would hide what attention adds (a backend run
    through bfloat16 inside float16 would pass). PT-DiT on video latents, so windows and
    shifts span frames."""
    model = small_model(family)
    for module in A.attention_modules(model).values():
        randomize(module, std=0.3)
    shape = (2, 4, 4, 16, 16) if family.startswith("PT-DiT") else (2, 4, 16, 16)
    low, low_inputs, exact, exact_inputs = low_and_exact(model, forward_inputs(model, shape),
                                                         dtype)
    assert_within_twice_the_reference(run(low, backend, *low_inputs),
                                      run(low, "reference", *low_inputs),
                                      run(exact, "reference", *exact_inputs), dtype)
