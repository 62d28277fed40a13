"""bench.flops: FlopCounterMode and fvcore on the real modules agree with the closed form.

The agreement is exact, per category, for every named model: no category is left out by either
counter once the documented traps are handled (SDPA on CPU for FlopCounterMode; SDPA, layer_norm
and the single-operand einsum for fvcore). The trap tests below show each trap is real.
"""

import json
import random
import warnings

import pytest
import torch

import ptdit
from bench import flops
from ptdit import complexity as cx
from ptdit.attention import set_backend
from ptdit.cli import main

MODELS = ptdit.list_models()
IMAGE = [256, 512, 1024, 2048]
VIDEO = [(256, 8)]


def analytic(work):
    macs = cx.macs(work)
    return {**macs, "other": 0}


def meta_model(work, backend="sdpa"):
    model = ptdit.build(work.name, device="meta", **work.overrides).eval()
    return set_backend(model, backend), flops.example_inputs(model, work.shape, work.text_tokens)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("resolution, frames", [(r, None) for r in IMAGE] + VIDEO)
def test_torch_counter_equals_closed_form(name, resolution, frames):
    work = cx.workload(name, resolution, frames)
    model, inputs = meta_model(work)
    per_category, elements = flops.count_torch(model, inputs)
    assert per_category == analytic(work)
    assert elements == cx.activation_elements(work)[0]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("resolution, frames", [(256, None), (1024, None)] + VIDEO)
def test_fvcore_counter_equals_closed_form(name, resolution, frames):
    work = cx.workload(name, resolution, frames)
    assert flops.count_fvcore(*meta_model(work)) == analytic(work)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("resolution, frames", [(512, None), (2048, None), (512, 16)])
def test_fvcore_counter_equals_closed_form_more_shapes(name, resolution, frames):
    work = cx.workload(name, resolution, frames)
    assert flops.count_fvcore(*meta_model(work)) == analytic(work)


@pytest.mark.parametrize("counter", ["torch", "fvcore"])
@pytest.mark.parametrize("name", ["PixArt-XL/2", "PT-DiT/S-Class"])
def test_math_backend_counts_the_same(counter, name):
    work = cx.workload(name, 512, random.choice([None, 4, 8]), batch=random.randint(1, 3),
                       text_tokens=random.randint(1, 200))
    count = {"torch": lambda m, i: flops.count_torch(m, i)[0], "fvcore": flops.count_fvcore}
    assert count[counter](*meta_model(work, "math")) == analytic(work)


def test_rows_carry_conventions_and_provenance():
    work = cx.workload("PT-DiT/B", 512, 8, batch=2, text_tokens=77)
    rows = {c: flops.count(work, c) for c in flops.COUNTERS}
    for counter, row in rows.items():
        assert row["status"] == "ok" and row["counter"] == counter
        assert (row["latent_frames"], row["tokens"], row["text_tokens"], row["batch"]) == \
            (8, 8 * 32 * 32, 77, 2)
        assert row["total_gflops"] == 2 * row["total_gmacs"]
        for field in ("schema_version", "git_sha", "time_utc", "host", "device", "torch",
                      "dtype", "backend", "model", "resolution"):
            assert field in row
    cost_columns = [k for k in rows["analytic"] if k.endswith("_gmacs") or k.startswith("params")]
    for counter in ("torch", "fvcore"):
        assert {k: rows[counter][k] for k in cost_columns} == \
            {k: rows["analytic"][k] for k in cost_columns}
    assert rows["torch"]["activation_mib"] == rows["analytic"]["activation_mib"]


#################################################################################
#                    The traps are real (and handled)                           #
#################################################################################

@pytest.mark.parametrize("name, resolution", [("DiT-S/8", 128), ("PT-DiT/S-Class", 256)])
def test_torch_counter_on_cpu_tensors(name, resolution):
    """Plain FlopCounterMode counts CPU SDPA as 0; count_torch's custom_mapping restores it."""
    work = cx.workload(name, resolution, batch=2)
    model = ptdit.build(name, device="cpu").eval()
    inputs = flops.example_inputs(model, work.shape, work.text_tokens, device="cpu")
    plain = torch.utils.flop_counter.FlopCounterMode(display=False)
    with torch.no_grad(), plain:
        model(*inputs)
    expected = analytic(work)
    linear = sum(v for k, v in expected.items() if k.startswith("linear_"))
    # Fused CPU SDPA counts 0; only calls that fall back to the math path (PT-DiT's masked
    # shifted windows) are seen.
    assert 2 * linear <= plain.get_total_flops() < 2 * sum(expected.values())
    if name.startswith("DiT"):
        assert plain.get_total_flops() == 2 * linear
    assert flops.count_torch(model, inputs)[0] == expected


def test_fvcore_without_handles_misses_sdpa_and_counts_norms():
    from fvcore.nn import FlopCountAnalysis

    work = cx.workload("DiT-S/2", 256)
    model, inputs = meta_model(work)
    flops._convs_as_linear(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = FlopCountAnalysis(model, inputs)
        plain.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        plain.tracer_warnings("none")
        by_op = plain.by_operator()
    expected = analytic(work)
    assert by_op["linear"] == sum(v for k, v in expected.items() if k.startswith("linear_"))
    assert "scaled_dot_product_attention" not in by_op
    assert by_op["layer_norm"] > 0 and by_op["einsum"] > 0
    assert flops.count_fvcore(*meta_model(work)) == expected


def test_conv_as_linear_is_the_same_function():
    conv = torch.nn.Conv2d(4, 32, 2, stride=2)
    x = torch.randn(3, 4, 8, 12)
    torch.testing.assert_close(flops.Conv2dAsLinear(conv)(x), conv(x))


#################################################################################
#                       Sweep and CLI: validation first                         #
#################################################################################

def test_sweep_validates_everything_before_counting(monkeypatch):
    calls = []
    monkeypatch.setattr(flops, "count", lambda *a, **k: calls.append(a))
    with pytest.raises(ValueError, match="temporal window 4"):
        list(flops.sweep(["DiT-XL/2", "PT-DiT/XL"], [256], [6], counters=["torch"]))
    with pytest.raises(ValueError, match="unknown counter"):
        list(flops.sweep(["DiT-XL/2"], [256], counters=["thop"]))
    assert calls == []


def test_cli_flops_json(capsys):
    assert main(["flops", "--model", "PT-DiT/S-Class", "DiT-S/8", "--resolution", "256", "512",
                 "--frames", "4", "--batch", "2", "--counter", "all", "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 2 * 2 * 3
    assert {r["counter"] for r in rows} == {"analytic", "torch", "fvcore"}
    assert all(r["latent_frames"] == 4 and r["batch"] == 2 for r in rows)
    for model in ("PT-DiT/S-Class", "DiT-S/8"):
        totals = {r["total_gmacs"] for r in rows if r["model"] == model and r["resolution"] == 512}
        assert len(totals) == 1


@pytest.mark.parametrize("argv, message", [
    (["--model", "PT-DiT/XXL", "--resolution", "256"], "nearest: PT-DiT/XL"),
    (["--model", "PT-DiT/XL", "--resolution", "320"], "(256 or 384 px)"),
    (["--model", "DiT-XL/2", "--resolution", "256", "--frames", "0"], "positive integer"),
    (["--model", "DiT-XL/2", "--resolution", "256", "--batch", "-1"], "positive integer"),
])
def test_cli_flops_bad_input_exits_2_before_counting(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(flops, "count", lambda *a, **k: pytest.fail("counted bad input"))
    assert main(["flops", *argv, "--counter", "torch"]) == 2
    assert message in capsys.readouterr().err
