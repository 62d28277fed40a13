"""bench.memory: the CPU method measures a known allocation within 10% in a fresh process (a
higher peak before the step does not hide it), rows carry the prediction and the method, a
failed child is a row, and the CUDA method reads the peak stats through fakes."""

import sys

import pytest
import torch

from bench import latency, memory
from bench.latency import Case
from bench.rows import check_row
from ptdit import Workload, complexity

MIB = 2**20
TINY = {"depth": 1, "hidden_size": 64, "num_heads": 4, "caption_channels": 32}
MEMORY_COLUMNS = ("measurement", "mode", "forward_batch", "threads", "compile", "cuda_graphs",
                  "text_tokens", "window", "memory_method", "baseline_mib", "peak_mib",
                  "reserved_mib", "predicted_activation_mib", "predicted_state_mib",
                  "prediction", "measured_over_predicted")
linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc is Linux's")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(mode: str = "forward", **case) -> Case:
    return Case(Workload("PT-DiT/XL", 128, 4, 1, text_tokens=8, overrides=TINY), mode, **case)


def touch(mib: int) -> torch.Tensor:
    """A tensor of `mib` MiB whose every page is written."""
    return torch.ones(mib * MIB // 4)


# Factories run in the measuring subprocess, so they live at module level (picklable).
def allocates_512_mib(case: Case):
    def step() -> None:
        touch(512).add_(1)
    return step


def peaks_before_the_step(case: Case):
    touch(768)                  # freed again before the step: a high-water mark it must not see
    return allocates_256_mib_step


def allocates_256_mib_step() -> None:
    touch(256)


def runs_out_of_memory(case: Case):
    raise MemoryError("can't allocate")


def breaks(case: Case):
    raise KeyError("no such layer")


@linux
def test_cpu_method_measures_a_known_allocation_within_10_percent():
    row = memory.measure(tiny(), allocates_512_mib)
    assert row["status"] == "ok" and row["memory_method"] == "cpu-subprocess-vmhwm"
    assert row["peak_mib"] == pytest.approx(512, rel=0.10)
    assert row["baseline_mib"] > 0 and row["reserved_mib"] is None


@linux
def test_a_higher_peak_before_the_step_is_not_the_steps():
    row = memory.measure(tiny(), peaks_before_the_step)
    assert row["peak_mib"] == pytest.approx(256, rel=0.10)


@linux
def test_peak_rss_resets_on_this_kernel():
    big = touch(256)
    del big
    before = memory.high_water()
    assert memory.reset_high_water() < before - 200 * MIB      # the freed 256 MiB is gone
    assert memory.high_water() < before - 200 * MIB


@linux
@pytest.mark.parametrize("mode", latency.MODES)
def test_rows_carry_the_fields_and_the_prediction(mode):
    case = tiny(mode)
    row = memory.measure(case)
    check_row(row)
    assert row["status"] == "ok" and set(MEMORY_COLUMNS) <= set(row)
    assert (row["measurement"], row["mode"], row["compile"]) == ("memory", mode, False)
    cf = complexity.closed_form(case.forward_work, "float32")
    assert row["forward_batch"] == (2 if mode == "cfg" else 1)
    assert row["predicted_activation_mib"] == cf["activation_mib"] - cf["attn_scores_mib"]
    grads = cf["params_trainable"] * 4 / MIB
    assert row["predicted_state_mib"] == (grads if mode == "train" else 0)
    assert row["peak_mib"] > 0
    predicted = row["predicted_activation_mib"] + row["predicted_state_mib"]
    assert row["measured_over_predicted"] == pytest.approx(row["peak_mib"] / predicted)
    assert "activation_mib" in row["prediction"]


def test_the_math_backend_prediction_keeps_the_scores():
    cf = complexity.closed_form(tiny().forward_work, "float32")
    prediction = memory.prediction(tiny(backend="math"))
    assert prediction["predicted_activation_mib"] == cf["activation_mib"]


@linux
def test_a_failing_child_is_a_row():
    assert memory.measure(tiny(), runs_out_of_memory)["status"] == "oom"
    row = memory.measure(tiny(), breaks)
    check_row(row)
    assert row["status"] == "error: KeyError: 'no such layer'" and row["peak_mib"] is None


def test_memory_rows_are_eager():
    with pytest.raises(ValueError, match="eager"):
        memory.measure(tiny(compile=True))


def test_cuda_method_through_fakes(monkeypatch):
    """A fake allocator: 100 MiB held before the step, 300 MiB more at the step's peak."""
    state = {"allocated": 0, "peak": 0, "reserved": 0, "peak_reserved": 0, "steps": 0}

    def allocate(mib):
        state["allocated"] += mib * MIB
        state["peak"] = max(state["peak"], state["allocated"])
        state["reserved"] = max(state["reserved"], state["allocated"] + 64 * MIB)
        state["peak_reserved"] = max(state["peak_reserved"], state["reserved"])

    def factory(case):
        allocate(100)                       # model and inputs

        def step():
            state["steps"] += 1
            allocate(300)
            allocate(-300)
        return step

    def reset():
        state["peak"], state["peak_reserved"] = state["allocated"], state["reserved"]

    def empty_cache():
        state["reserved"] = state["allocated"] + 64 * MIB
    monkeypatch.setattr(latency, "_cuda_available", lambda: True)
    monkeypatch.setattr(latency, "_cuda_synchronize", lambda: None)
    monkeypatch.setattr(latency, "_cuda_empty_cache", empty_cache)
    monkeypatch.setattr(memory, "_cuda_memory", lambda: (state["allocated"], state["reserved"]))
    monkeypatch.setattr(memory, "_cuda_peak_memory",
                        lambda: (state["peak"], state["peak_reserved"]))
    monkeypatch.setattr(memory, "_cuda_reset_peak", reset)
    monkeypatch.setattr("bench.rows._cuda_name", lambda index: "Fake GPU")
    row = memory.measure(tiny(device="cuda"), factory)
    check_row(row)
    assert row["status"] == "ok" and row["device"] == "Fake GPU"
    assert row["memory_method"] == "cuda-max-allocated" and state["steps"] == 2
    assert (row["baseline_mib"], row["peak_mib"]) == (100, 300)
    assert row["reserved_mib"] == 300            # 464 MiB reserved at the peak, 164 before
