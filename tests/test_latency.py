"""bench.latency: rows with every results-row field (docs/results.md) and the measurement
columns, the three modes,
compilation kept out of the timings, and the CUDA code paths run on a CPU through fakes of the
isolated CUDA calls (which fail loudly, not silently, without a GPU)."""

import time
import warnings

import pytest
import torch

import bench.rows
import ptdit
from bench import latency
from bench.latency import Case, measure
from bench.rows import check_row
from ptdit import Workload, complexity, example_inputs

TINY = {"depth": 1, "hidden_size": 64, "num_heads": 4}
TINY_TEXT = {**TINY, "caption_channels": 32}
MODELS = {"DiT-S/2": TINY, "PixArt-XL/2": {**TINY_TEXT, "model_max_length": 8},
          "PT-DiT/XL": TINY_TEXT}   # PixArt drops captions (train) at its null caption length
LATENCY_COLUMNS = ("measurement", "mode", "forward_batch", "threads", "compile", "cuda_graphs",
                   "text_tokens", "window", "overrides", "n", "warmup", "compile_s",
                   "latency_ms_median", "latency_ms_iqr", "latency_ms_min", "params",
                   "total_gmacs", "linear_gmacs", "attention_gmacs", "forward_gmacs",
                   "flop_model", "step_gflops", "achieved_tflops")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(model: str = "PT-DiT/XL", resolution: int = 128, frames=None, batch: int = 1,
         **case) -> Case:
    return Case(Workload(model, resolution, frames, batch, text_tokens=8,
                         overrides=MODELS[model]), **case)


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("mode", latency.MODES)
def test_rows_carry_the_design_fields_and_the_measurement(model, mode):
    case = tiny(model, frames=4, batch=2, mode=mode)
    row = measure(case, repeats=3, warmup=1)
    check_row(row)
    assert row["status"] == "ok"
    assert set(LATENCY_COLUMNS) <= set(row)
    assert (row["measurement"], row["mode"], row["batch"], row["n"], row["warmup"]) == (
        "latency", mode, 2, 3, 1)
    assert row["forward_batch"] == (4 if mode == "cfg" else 2)
    assert row["threads"] == 1 and row["device"] == "cpu (1 thread)"
    assert row["compile_s"] is None
    assert row["latency_ms_min"] <= row["latency_ms_median"] and row["latency_ms_iqr"] >= 0
    assert row["achieved_tflops"] == pytest.approx(row["step_gflops"] / row["latency_ms_median"])


def test_rows_record_the_thread_count():
    torch.set_num_threads(2)
    row = measure(tiny(), repeats=1, warmup=0)
    assert row["threads"] == 2 and row["device"] == "cpu (2 threads)"


def test_cfg_counts_the_doubled_batch_and_train_three_forwards():
    cf = complexity.closed_form(Workload("PT-DiT/XL", 128, 4, 4, 8, overrides=TINY_TEXT))
    cfg, train = (latency.costs(tiny(frames=4, batch=2, mode=m)) for m in ("cfg", "train"))
    assert cfg["forward_gmacs"] == cfg["total_gmacs"] == cf["total_gmacs"]
    assert cfg["step_gflops"] == 2 * cf["total_gmacs"]
    forward = latency.costs(tiny(frames=4, batch=2))
    assert train["forward_gmacs"] == forward["total_gmacs"]
    assert train["step_gflops"] == 3 * forward["step_gflops"]
    assert "3 x forward" in train["flop_model"]


@pytest.mark.parametrize("model", MODELS)
def test_train_step_updates_the_weights_against_a_target_of_the_output_shape(model):
    work = tiny(model, frames=4).work
    net = ptdit.build(work.config).train()
    inputs = example_inputs(net, work)
    step = latency._train_step(net, net, inputs, capturable=False)
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")      # mse_loss warns when it broadcasts shapes
        step()
    changed = [n for n, p in net.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all(p.grad is None for p in net.parameters())   # freed with the step


def test_train_mode_builds_a_model_in_training_mode(monkeypatch):
    seen, real = {}, latency._train_step

    def spy(model, forward, inputs, capturable):
        seen["training"], seen["capturable"] = model.training, capturable
        return real(model, forward, inputs, capturable)
    monkeypatch.setattr(latency, "_train_step", spy)
    latency.prepare(tiny(mode="train"))
    assert seen == {"training": True, "capturable": False}


def test_compilation_is_timed_apart_from_the_latency(monkeypatch):
    events = []

    def fake_compile(model):
        def compiled(**inputs):
            if not events:
                time.sleep(0.5)                 # "compiling", on the first call only
                events.append("compile")
            else:
                events.append("step")
            return model(**inputs)
        return compiled

    def spy(*args, **kwargs):
        events.append("timer")
        return time_step(*args, **kwargs)
    time_step = latency.time_step
    monkeypatch.setattr(latency, "_compile", fake_compile)
    monkeypatch.setattr(latency, "time_step", spy)
    for mode in ("forward", "train"):
        events.clear()
        row = measure(tiny(mode=mode, compile=True), repeats=4, warmup=2)
        assert row["status"] == "ok" and row["compile"] is True
        assert row["compile_s"] >= 0.5
        # the compiling call ran before the timer started: warm-up and repeats came after it
        assert events == ["compile", "timer"] + ["step"] * (2 + 4)


#################################################################################
#                            CUDA paths, faked                                  #
#################################################################################

class FakeClock:
    """Milliseconds that advance only when a faked step runs."""

    def __init__(self):
        self.now, self.synced = 0.0, 0


class FakeEvent:
    def __init__(self, clock: FakeClock):
        self.clock, self.at = clock, None

    def record(self):
        self.at = self.clock.now

    def elapsed_time(self, end: "FakeEvent") -> float:
        assert self.at is not None and end.at is not None, "event read before it was recorded"
        return end.at - self.at


@pytest.fixture
def fake_cuda(monkeypatch):
    """CUDA 'available', with fake events, synchronize, graphs and a device name."""
    clock = FakeClock()
    graphs = []

    def sync():
        clock.synced += 1

    def graph(step):
        graphs.append(step)
        return step
    monkeypatch.setattr(latency, "_cuda_available", lambda: True)
    monkeypatch.setattr(latency, "_cuda_synchronize", sync)
    monkeypatch.setattr(latency, "_cuda_event", lambda: FakeEvent(clock))
    monkeypatch.setattr(latency, "_cuda_empty_cache", lambda: None)
    monkeypatch.setattr(latency, "_cuda_graph", graph)
    monkeypatch.setattr(bench.rows, "_cuda_name", lambda index: "Fake GPU 80GB")
    clock.graphs = graphs
    return clock


def test_cuda_timer_reads_events_around_synchronised_steps(fake_cuda):
    durations = iter([5.0, 1.0, 2.0, 3.0, 4.0])

    def step():
        fake_cuda.now += next(durations)
    times = latency.time_step(step, "cuda", repeats=4, warmup=1)
    assert times == [1.0, 2.0, 3.0, 4.0]
    assert fake_cuda.synced == 1 + 2 * 4


def test_cuda_case_measures_through_the_fakes(fake_cuda, monkeypatch):
    def fake_prepare(case):
        assert case.device == "cuda"

        def step():
            fake_cuda.now += 7.0
        return step
    monkeypatch.setattr(latency, "prepare", fake_prepare)
    row = measure(tiny(device="cuda", cuda_graphs=True), repeats=3, warmup=1)
    check_row(row)
    assert row["status"] == "ok" and row["device"] == "Fake GPU 80GB"
    assert row["cuda_graphs"] is True and len(fake_cuda.graphs) == 1
    assert (row["latency_ms_median"], row["latency_ms_iqr"], row["latency_ms_min"]) == (7, 0, 7)
    assert row["threads"] == torch.get_num_threads()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without a GPU")
def test_cuda_without_a_gpu_fails_loudly(monkeypatch):
    with pytest.raises(ValueError, match="CUDA is not available"):
        tiny(device="cuda")
    with pytest.raises(RuntimeError):           # the real CUDA calls, never a CPU timing
        latency.time_step(lambda: None, "cuda", repeats=1)
    monkeypatch.setattr(latency, "_cuda_available", lambda: True)
    monkeypatch.setattr(bench.rows, "_cuda_name", lambda index: "Fake GPU")
    row = measure(tiny(device="cuda"), repeats=1, warmup=0)
    assert row["status"].startswith("error: ")    # building on CUDA failed; nothing ran on CPU


def test_bad_cases_name_what_is_allowed():
    for bad, message in (({"mode": "sample"}, "mode must be"), ({"dtype": "float64"}, "dtype"),
                         ({"backend": "flash"}, "attention backend"),
                         ({"device": "tpu"}, "device"),
                         ({"cuda_graphs": True}, "cuda_graphs needs device 'cuda'")):
        with pytest.raises(ValueError, match=message):
            tiny(**bad)
    with pytest.raises(ValueError, match="repeats"):
        measure(tiny(), repeats=0)


def test_failure_is_a_row(monkeypatch):
    def out_of_memory(case):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    monkeypatch.setattr(latency, "prepare", out_of_memory)
    row = measure(tiny(), repeats=1)
    check_row(row)
    assert row["status"] == "oom" and row["latency_ms_median"] is None
    assert row["total_gmacs"] > 0               # the case's cost is known even when it fails
