"""bench.flops: FlopCounterMode and fvcore on the real modules agree with the closed form.

The agreement is exact, per category, for every named model: no category is left out by either
counter once the documented traps are handled (SDPA on CPU for FlopCounterMode; SDPA, layer_norm
and the single-operand einsum for fvcore). The trap tests below show each trap is real.
"""

import ast
import json
import warnings
from pathlib import Path

import pytest
import torch

import ptdit
from bench import flops
from ptdit import Workload, example_inputs
from ptdit import complexity as cx
from ptdit.attention import set_backend
from ptdit.cli import main

MODELS = ptdit.list_models()
IMAGE = [256, 512, 1024, 2048]
VIDEO = [(256, 8)]


def analytic(work):
    macs = cx.macs(work)
    return {**macs, "other": 0}


def workload(name, resolution, frames=None, batch=1, text_tokens=120, **overrides):
    return Workload(name, resolution, frames, batch, text_tokens, overrides=overrides)


def meta_model(work, backend="sdpa"):
    model = ptdit.build(work.config, device="meta")
    return set_backend(model, backend), example_inputs(model, work)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("resolution, frames", [(r, None) for r in IMAGE] + VIDEO)
def test_torch_counter_equals_closed_form(name, resolution, frames):
    work = workload(name, resolution, frames)
    model, inputs = meta_model(work)
    per_category, elements = flops.count_torch(model, inputs)
    assert per_category == analytic(work)
    assert elements == cx.activation_elements(work)[0]


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("resolution, frames", [(256, None), (1024, None)] + VIDEO)
def test_fvcore_counter_equals_closed_form(name, resolution, frames):
    work = workload(name, resolution, frames)
    assert flops.count_fvcore(*meta_model(work)) == analytic(work)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("resolution, frames", [(512, None), (2048, None), (512, 16)])
def test_fvcore_counter_equals_closed_form_more_shapes(name, resolution, frames):
    """Two blocks (every block is the same; full depth: the test above): fvcore's trace costs
    a second or two per full-depth model."""
    work = workload(name, resolution, frames, depth=2)
    assert flops.count_fvcore(*meta_model(work)) == analytic(work)


@pytest.mark.parametrize("counter", ["torch", "fvcore"])
@pytest.mark.parametrize("name", ["PixArt-XL/2", "PT-DiT/S-Class"])
@pytest.mark.parametrize("frames, batch, text_tokens", [(None, 1, 1), (8, 3, 200)])
def test_math_backend_counts_the_same(counter, name, frames, batch, text_tokens):
    work = workload(name, 512, frames, batch=batch, text_tokens=text_tokens)
    count = {"torch": lambda m, i: flops.count_torch(m, i)[0], "fvcore": flops.count_fvcore}
    assert count[counter](*meta_model(work, "math")) == analytic(work)


def counted_rows(work, dtype="float32"):
    """The three counters' rows for `work`, after checking each says ok."""
    rows = {c: flops.count(work, c, dtype=dtype) for c in flops.COUNTERS}
    for counter, row in rows.items():
        assert row["status"] == "ok", (counter, row["status"])
    return rows


def cost_columns(row):
    return {k: v for k, v in row.items() if k.endswith("_gmacs") or k.startswith("params")}


# Every kind of config field a user can override: those that change costs and those that must
# not (norm_eps, freq_shift, pos_interp_scale, null_caption, model_max_length).
OVERRIDES = [
    ("DiT-S/8", 256, None, dict(norm_eps=1e-5, freq_shift=1)),
    ("DiT-S/8", 256, None, dict(learn_sigma=False, class_dropout_prob=0.0, num_classes=10)),
    ("DiT-S/4", 256, None, dict(mlp_ratio=2.7)),
    ("DiT-S/8", 512, 4, dict(input_size=64, in_channels=16)),
    ("PixArt-XL/2", 1024, None, dict(micro_condition=True)),
    ("PixArt-XL/2", 256, 4, dict(depth=2, micro_condition=True, null_caption=False)),
    ("PixArt-XL/2", 256, None, dict(depth=2, null_caption=False, learn_sigma=False,
                                    mlp_ratio=2.5, norm_eps=1e-5)),
    ("PixArt-XL/2", 256, None, dict(depth=2, caption_channels=1024, model_max_length=77,
                                    pos_interp_scale=2.0, class_dropout_prob=0.0)),
    ("PT-DiT/S-Class", 256, None, dict(giim=False)),
    ("PT-DiT/S-Class", 256, None, dict(shift_window=False, learn_sigma=False)),
    ("PT-DiT/S-Class", 288, None, dict(window=(1, 3, 3))),                    # odd window
    ("PT-DiT/S-Class", 256, 8, dict(windows_per_side=4, temporal_window=2)),
    ("PT-DiT/S-Class", 256, None, dict(mlp_ratio=3.3, class_dropout_prob=0.0, num_classes=7)),
    ("PT-DiT/B", 256, None, dict(caption_channels=1024, pos_interp_scale=0.5)),
    ("PT-DiT/B", 256, None, dict(condition="class")),
    ("PT-DiT/B", 256, 6, dict(window=(3, 4, 4), giim=False)),
    ("PT-DiT/B", 256, None, dict(patch_size=4, in_channels=8, windows_per_side=4)),
    ("Qihoo-T2I-1B", 256, None, dict(depth=2, window=(1, 2, 2))),
]


@pytest.mark.parametrize("name, resolution, frames, overrides", OVERRIDES,
                         ids=[f"{n}-{r}-{f}-{','.join(o)}" for n, r, f, o in OVERRIDES])
def test_counters_agree_under_config_overrides(name, resolution, frames, overrides):
    work = workload(name, resolution, frames, batch=2, text_tokens=13, **overrides)
    rows = counted_rows(work)
    for counter in ("torch", "fvcore"):
        assert cost_columns(rows[counter]) == cost_columns(rows["analytic"]), counter
    assert rows["torch"]["activation_mib"] == rows["analytic"]["activation_mib"]


@pytest.mark.parametrize("dtype, size", [("bfloat16", 2), ("float16", 2), ("float64", 8)])
def test_rows_report_the_requested_dtype(dtype, size):
    work = workload("PixArt-XL/2", 256, batch=2, depth=2, micro_condition=True)
    base, rows = counted_rows(work), counted_rows(work, dtype)
    for counter, row in rows.items():
        assert row["dtype"] == dtype and base[counter]["dtype"] == "float32"
        assert cost_columns(row) == cost_columns(base[counter])
    for counter in ("analytic", "torch"):
        assert rows[counter]["activation_mib"] == base[counter]["activation_mib"] * size / 4
    assert rows["fvcore"]["activation_mib"] is None


def test_rows_carry_conventions_and_provenance():
    work = workload("PT-DiT/B", 512, 8, batch=2, text_tokens=77)
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

@pytest.mark.parametrize("name, resolution, overrides, masked", [
    ("DiT-S/8", 128, {}, False),
    ("PT-DiT/S-Class", 256, {}, False),      # shifted windows: additive mask (B·nW, 1, N, N)
    ("PT-DiT/B", 256, dict(depth=1), True),  # and a caption mask (B, 1, 1, L)
    ("PixArt-XL/2", 128, dict(depth=1, micro_condition=True), True),
])
def test_torch_counter_on_cpu_tensors(name, resolution, overrides, masked):
    """Plain FlopCounterMode counts CPU SDPA as 0; count_torch's custom_mapping restores it.

    On CPU (torch 2.14) every SDPA call of the three models takes the fused kernel
    `_scaled_dot_product_flash_attention_for_cpu`, masked ones included: global, proxy and
    proxy-cross, window attention as 4-D (B·nW, H, N, d) problems, shifted-window attention as
    one (nW, H, N, d) problem per sample sharing the (nW, 1, N, N) shift mask, and text
    cross-attention with a caption mask. So plain FlopCounterMode sees the linear layers only,
    and no call falls back to the math path."""
    work = workload(name, resolution, batch=2, text_tokens=7, **overrides)
    model = ptdit.build(name, device="cpu", **overrides)
    inputs = example_inputs(model, work)
    if masked:
        inputs["text_mask"] = torch.tensor([[1] * 5 + [0] * 2] * 2)
    fused = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    plain = torch.utils.flop_counter.FlopCounterMode(display=False)
    seen = torch.utils.flop_counter.FlopCounterMode(
        display=False, custom_mapping={fused: flops._sdpa_cpu_flops})
    with torch.no_grad(), plain, seen:
        model(**inputs)
    expected = analytic(work)
    linear = sum(v for k, v in expected.items() if k.startswith("linear_"))
    assert plain.get_total_flops() == 2 * linear
    ops = seen.get_flop_counts()["Global"]
    assert fused in ops and torch.ops.aten.bmm not in ops and torch.ops.aten.baddbmm not in ops
    assert flops.count_torch(model, inputs)[0] == expected


def test_fvcore_without_handles_misses_sdpa_and_counts_norms():
    from fvcore.nn import FlopCountAnalysis

    work = workload("DiT-S/2", 256)
    model, inputs = meta_model(work)
    flops._convs_as_linear(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = FlopCountAnalysis(model, tuple(inputs.values()))
        plain.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
        plain.tracer_warnings("none")
        by_op = plain.by_operator()
    expected = analytic(work)
    assert by_op["linear"] == sum(v for k, v in expected.items() if k.startswith("linear_"))
    assert "scaled_dot_product_attention" not in by_op
    assert by_op["layer_norm"] > 0 and by_op["einsum"] > 0
    assert flops.count_fvcore(*meta_model(work)) == expected


def _dotted(node) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    return ".".join([node.id, *reversed(parts)]) if isinstance(node, ast.Name) else ""


def test_private_imports_stay_in_one_place():
    """Private torch modules only in bench/flops.py, imported by name with a comment
    saying why (not reached by attribute), and nothing private from ptdit anywhere in bench/.
    Private aten operators (torch.ops.aten._…) are op names, allowed in bench/flops.py only."""
    def private(dotted):
        return any(part.startswith("_") and not part.endswith("__") for part in dotted.split("."))

    bench = Path(flops.__file__).parent
    for path in sorted(bench.glob("*.py")):
        source = path.read_text()
        where = f"bench/{path.name}"
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Store):
                name = _dotted(node)
                if name.startswith("torch.") and private(name):
                    assert name.startswith("torch.ops.") and path.name == "flops.py", \
                        f"{where}:{node.lineno} reaches private {name} by attribute"
                continue
            if isinstance(node, ast.Import):
                names = [(a.name, a.name) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [(node.module, f"{node.module}.{a.name}") for a in node.names]
            else:
                continue
            for module, full in names:
                if module.split(".")[0] == "ptdit":
                    assert not private(full), f"{where}:{node.lineno} imports {full}"
                if module.split(".")[0] == "torch" and private(full):
                    assert path.name == "flops.py", f"{where}:{node.lineno} imports {full}"
                    above = source.splitlines()[node.lineno - 2]
                    assert above.lstrip().startswith("#"), f"{where}: no comment on {full}"


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
        flops.workloads(["DiT-XL/2", "PT-DiT/XL"], [256], [6])
    works = flops.workloads(["DiT-XL/2"], [256])
    with pytest.raises(ValueError, match="unknown counter"):
        list(flops.sweep(works, counters=["torch", "thop"]))
    with pytest.raises(ValueError, match="unknown attention backend 'flash'; allowed: sdpa, math"):
        list(flops.sweep(works, counters=["torch"], backend="flash"))
    assert calls == []


def test_cli_flops_dtype(capsys):
    argv = ["flops", "--model", "PT-DiT/S-Class", "--resolution", "256", "--counter", "all",
            "--format", "json"]
    assert main(argv) == 0
    base = json.loads(capsys.readouterr().out)
    assert main([*argv, "--dtype", "bfloat16"]) == 0
    half = json.loads(capsys.readouterr().out)
    for b, h in zip(base, half):
        assert (b["dtype"], h["dtype"]) == ("float32", "bfloat16")
        assert h["total_gmacs"] == b["total_gmacs"] and h["params"] == b["params"]
        if b["activation_mib"] is not None:
            assert h["activation_mib"] == pytest.approx(b["activation_mib"] / 2, rel=1e-9)


def test_cli_flops_json(capsys):
    assert main(["flops", "--model", "PT-DiT/S-Class", "DiT-S/8", "--resolution", "256", "512",
                 "--frames", "4", "--batch-size", "2", "--counter", "all",
                 "--format", "json"]) == 0
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
    (["--model", "DiT-XL/2", "--resolution", "256", "--batch-size", "-1"], "positive integer"),
])
def test_cli_flops_bad_input_exits_2_before_counting(argv, message, capsys, monkeypatch):
    monkeypatch.setattr(flops, "count", lambda *a, **k: pytest.fail("counted bad input"))
    assert main(["flops", *argv, "--counter", "torch"]) == 2
    assert message in capsys.readouterr().err
