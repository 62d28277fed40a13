"""bench.profile: operators put in the right categories, category times that add up to the
profiled step, the closed form's MACs joined to the GEMM and attention rows, failures as rows,
and the report's table of them."""

import pandas as pd
import pytest

from bench import profile as prof
from bench.latency import Case
from bench.rows import check_row
from bench.runtime_report import markdown, profiles, speedups
from ptdit import Workload, complexity

TINY = {"depth": 1, "hidden_size": 64, "num_heads": 4, "caption_channels": 32}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("op, category", [
    ("aten::addmm", "gemm"), ("aten::mm", "gemm"), ("aten::mkldnn_convolution", "gemm"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_efficient_attention", "attention"), ("aten::bmm", "attention"),
    ("aten::_softmax", "attention"), ("aten::copy_", "layout"), ("aten::index", "layout"),
    ("aten::cat", "layout"), ("aten::native_layer_norm", "norm"), ("aten::gelu", "elementwise"),
    ("aten::add", "elementwise"), ("aten::mul_", "elementwise"),
    ("aten::_foreach_mul_", "optimizer"), ("aten::view", "other"), ("cudaLaunchKernel", "other"),
])
def test_operators_fall_in_their_category(op, category):
    assert prof.category_of(op) == category


def test_category_times_add_up_to_the_step_and_carry_the_closed_form_macs():
    work = Workload("PT-DiT/XL", 128, text_tokens=8, overrides=TINY)
    rows = prof.profile(Case(work), steps=2, warmup=1, top=5)
    for row in rows:
        check_row(row)
    categories = [r for r in rows if r["level"] == "category"]
    assert [r["name"] for r in categories] == list(prof.CATEGORIES)
    step = categories[0]["step_ms"]
    assert step > 0
    assert sum(r["profile_ms"] for r in categories) == pytest.approx(step, rel=1e-9)
    by = {r["name"]: r for r in categories}
    assert by["gemm"]["profile_ms"] > 0 and by["attention"]["profile_ms"] > 0
    cf = complexity.closed_form(work)
    assert by["gemm"]["gmacs"] == cf["linear_gmacs"]
    assert by["attention"]["gmacs"] == cf["attention_gmacs"]
    assert by["gemm"]["achieved_tflops"] == pytest.approx(
        2 * cf["linear_gmacs"] / by["gemm"]["profile_ms"])
    ops = [r for r in rows if r["level"] == "op"]
    assert 0 < len(ops) <= 5
    assert [r["profile_ms"] for r in ops] == sorted((r["profile_ms"] for r in ops), reverse=True)
    assert all(r["category"] == prof.category_of(r["name"]) for r in ops)   # no optimizer here


def test_a_train_step_counts_three_forwards_and_its_optimizer():
    work = Workload("DiT-S/2", 128, overrides={k: v for k, v in TINY.items()
                                              if k != "caption_channels"})
    rows = prof.profile(Case(work, mode="train"), steps=1, warmup=1)
    by = {r["name"]: r for r in rows if r["level"] == "category"}
    assert by["gemm"]["gmacs"] == 3 * complexity.closed_form(work)["linear_gmacs"]
    assert by["optimizer"]["profile_ms"] > 0


def test_a_failing_case_is_one_row_saying_why(monkeypatch):
    def broken(case):
        raise RuntimeError("no kernel for this")
    monkeypatch.setattr(prof, "prepare", broken)
    rows = prof.profile(Case(Workload("PT-DiT/XL", 128, text_tokens=8, overrides=TINY)))
    assert len(rows) == 1 and rows[0]["status"] == "error: RuntimeError: no kernel for this"


def test_the_report_tabulates_the_latest_profile_of_each_case():
    work = Workload("PT-DiT/XL", 128, text_tokens=8, overrides=TINY)
    first = prof.profile(Case(work), steps=1, warmup=0)
    second = prof.profile(Case(work), steps=1, warmup=0)
    for row in second:
        row["time_utc"] = "9999-01-01T00:00:00Z"   # the later run
    other = prof.profile(Case(Workload("DiT-S/2", 256, overrides={
        k: v for k, v in TINY.items() if k != "caption_channels"})), steps=1, warmup=0)
    table = profiles(pd.DataFrame(first + second + other))
    assert sorted(table.model) == ["DiT-S/2", "PT-DiT/XL"]   # one line per profiled case
    table = table[table.model == "PT-DiT/XL"]
    later = {r["name"]: r for r in second if r["level"] == "category"}
    assert table.gemm_share.iloc[0] == later["gemm"]["share"]
    assert table.attention_tflops.iloc[0] == later["attention"]["achieved_tflops"]
    frame = pd.DataFrame(first)
    text = markdown(frame, speedups(frame), {})
    assert "## Where the time goes (torch.profiler)" in text and "PT-DiT/XL" in text
