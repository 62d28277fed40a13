"""analysis.training.harness: the budget arithmetic against a hand-written MAC count, run folders
that are
refused and left untouched, a restart after SIGKILL or SIGINT that ends on the uninterrupted
run's weights bit for bit, one process against two (torchrun, gloo) at equal global batch,
gradient checkpointing, the EMA export and its sidecar, the rows.

Run as a script, this file is the worker: `python test_train.py spec.json` (or under torchrun)
trains the tiny run a JSON spec describes (keys: out, steps, options: TrainOptions fields other
than RUN's, sleep: seconds added to each loss call, so that a test can signal it mid-run).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(depth=1, hidden_size=32, num_heads=2)          # DiT-S/2, 8x8 px, 16 tokens
# a run that takes a few hundred ms on one thread; batches span epochs (24 images, batch 8)
RUN = dict(batch_size=8, lr=1e-3, warmup_steps=3, ema_decay=0.9, checkpoint_every=4,
           log_every=2)


def tiny_set(count: int = 24, classes: int | None = 3, channels: int = 1, size: int = 8):
    """A fixed image set: smooth random images in (-1, 1), labels i % classes (or none)."""
    from analysis.training.datasets import ImageSet

    generator = torch.Generator().manual_seed(1234)
    low = torch.randn(count, channels, 4, 4, generator=generator)
    images = torch.tanh(torch.nn.functional.interpolate(low, size=(size, size), mode="bilinear"))
    labels = None if classes is None else torch.arange(count) % classes
    return ImageSet(images=images.float(), labels=labels, num_classes=classes,
                    info={"name": "tiny", "count": count, "classes": classes})


def worker(spec_file: str) -> int:
    from analysis.training import objectives
    from analysis.training.harness import TrainingInterrupted, TrainOptions, train

    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(1)
    if spec.get("sleep"):
        loss = objectives.loss

        def slow_loss(*args, **kwargs):
            time.sleep(spec["sleep"])
            return loss(*args, **kwargs)
        objectives.loss = slow_loss
    try:
        train("DiT-S/2", tiny_set(), spec["out"], size=8, overrides=TINY,
              options=TrainOptions(steps=spec["steps"], **{**RUN, **spec.get("options", {})}),
              progress=False)
    except TrainingInterrupted:
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))

import dataclasses  # noqa: E402

import pytest  # noqa: E402
import safetensors.torch  # noqa: E402

import ptdit  # noqa: E402
from analysis.conditions import prompt_embeddings  # noqa: E402
from analysis.training import objectives  # noqa: E402
from analysis.training.harness import (  # noqa: E402
    DataOrder,
    TrainOptions,
    _StopSignals,
    apply_block_options,
    checkpoint_info,
    steps_for_budget,
    train,
    train_flops_per_step,
)
from bench.rows import check_row  # noqa: E402

from conftest import SMALL, randomize  # noqa: E402


def run(out, steps: int = 4, data=None, model: str = "DiT-S/2", overrides=None, size: int = 8,
        vae=None, **options) -> dict:
    return train(model, tiny_set() if data is None else data, out, size=size,
                 overrides=TINY if overrides is None else overrides, vae=vae,
                 options=TrainOptions(steps=steps, **{**RUN, **options}), progress=False)


def weights(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    saved = torch.load(out / "checkpoint.pt", weights_only=True)
    return {"model": saved["model"], "ema": saved["ema"], "step": saved["step"]}


def assert_equal_states(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def read_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train.jsonl").read_text().splitlines()]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


#################################################################################
#                                  Budget                                       #
#################################################################################

def dit_forward_macs(depth: int, D: int, T: int, C: int, p: int) -> int:
    """One sample's forward MACs of a learned-sigma DiT, by hand (DiT's Gflops convention:
    every matmul, attention included): patch embed, timestep MLP (256 frequencies), per block
    adaLN (D -> 6D), qkv, QKᵀ and AV, out projection, MLP (4D), then the final adaLN and
    linear to p²·2C."""
    block = D * 6 * D + T * D * 3 * D + 2 * T * T * D + T * D * D + 2 * T * D * 4 * D
    return (T * C * p * p * D + 256 * D + D * D + depth * block + D * 2 * D
            + T * D * p * p * 2 * C)


def test_budget_gives_whole_steps_of_the_closed_form_cost(tmp_path, one_thread):
    per_step = 3 * 2 * 8 * dit_forward_macs(1, 32, 16, 1, 2)   # 3 × forward, 2 FLOPs a MAC
    config = ptdit.get_config("DiT-S/2", **TINY, in_channels=1, input_size=8, num_classes=3)
    assert train_flops_per_step(config, 8, 8) == per_step
    # read as the decimal written: 3 steps' worth is 3 steps, not 2.999…
    assert steps_for_budget(float(f"{3 * per_step / 1e12!r}"), per_step) == 3
    assert steps_for_budget(2.5 * per_step / 1e12, per_step) == 2
    row = train("DiT-S/2", tiny_set(), tmp_path / "run", size=8, overrides=TINY,
                options=TrainOptions(budget_tflop=2.5 * per_step / 1e12, **RUN), progress=False)
    assert (row["step"], row["steps"]) == (2, 2)
    assert row["train_tflop_per_step"] == per_step / 1e12
    assert row["tflop_spent"] == pytest.approx(2 * per_step / 1e12, rel=1e-12)
    with pytest.raises(ValueError, match=r"a budget of 1e-06 TFLOP is smaller than one step "
                                         r"of 1\.13541e-05 TFLOP"):
        train("DiT-S/2", tiny_set(), tmp_path / "small", size=8, overrides=TINY,
              options=TrainOptions(budget_tflop=1e-6, **RUN), progress=False)
    assert not (tmp_path / "small").exists()


def test_options_are_checked_with_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="give one of steps, budget_tflop and budget_seconds, "
                                         "not steps=3 and budget_tflop=1.0"):
        TrainOptions(steps=3, budget_tflop=1.0)
    with pytest.raises(ValueError, match="budget_seconds must be a positive number of seconds"):
        TrainOptions(budget_seconds=0)
    with pytest.raises(ValueError, match="batch_size 10 does not split into grad_accum 4 .* "
                                         "nearest valid batch_size: 8 or 12"):
        TrainOptions(steps=1, batch_size=10, grad_accum=4)
    with pytest.raises(ValueError, match="dtype 'float16' is not a training dtype"):
        TrainOptions(steps=1, dtype="float16")
    with pytest.raises(ValueError, match="cond_dropout must be a probability in"):
        TrainOptions(steps=1, cond_dropout=1.0)
    with pytest.raises(ValueError, match="give options.steps, options.budget_tflop or "
                                         "options.budget_seconds"):
        train("DiT-S/2", tiny_set(), tmp_path / "a", size=8, overrides=TINY)
    with pytest.raises(ValueError, match=r"PT-DiT/XL cannot train at 10 px: patch 2 × windows "
                                         r"per side 2 needs multiples of 4 px; nearest valid "
                                         r"size: 8 or 12 px"):
        run(tmp_path / "b", model="PT-DiT/XL", size=10, data=tiny_set(size=10),
            overrides=SMALL["PT-DiT"][1])
    with pytest.raises(ValueError, match="override in_channels=3 contradicts the data's "
                                         "channels"):
        run(tmp_path / "c", overrides={**TINY, "in_channels": 3})
    with pytest.raises(ValueError, match="data images are 8x8 px but size is 16"):
        run(tmp_path / "d", size=16)
    assert not any(tmp_path.iterdir())


#################################################################################
#                               Run folders                                     #
#################################################################################

def test_a_folder_of_another_run_is_refused_and_left_untouched(tmp_path, one_thread):
    out = tmp_path / "run"
    run(out, steps=2)
    before = snapshot(out)
    others = [dict(overrides={**TINY, "hidden_size": 64}),            # another config
              dict(model="DiT-S/4"),                                   # another model
              dict(lr=2e-3),                                           # another option
              dict(data=tiny_set(classes=None)),                       # other data
              dict(objective="flow")]
    for other in others:
        with pytest.raises(ValueError, match=f"out {out} holds another run"):
            run(out, steps=4, **other)
        assert snapshot(out) == before
    with pytest.raises(ValueError, match="holds this run's checkpoint; resume it"):
        train("DiT-S/2", tiny_set(), out, size=8, overrides=TINY,
              options=TrainOptions(steps=4, **RUN), progress=False, resume=False)
    assert snapshot(out) == before
    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "checkpoint.pt").write_bytes(b"somebody's")
    with pytest.raises(ValueError, match=r"holds training files \(checkpoint.pt\) but no "
                                         "run.json"):
        run(stray)
    assert snapshot(stray) == {"checkpoint.pt": b"somebody's"}


def test_a_finished_run_reports_again_and_can_be_extended(tmp_path, one_thread):
    out = tmp_path / "run"
    first = run(out, steps=2)
    again = run(out, steps=2)
    assert again == first                                     # nothing trained, same row
    longer = run(out, steps=4, log_every=1, checkpoint_every=10)
    assert (longer["step"], weights(out)["step"]) == (4, 4)
    with pytest.raises(ValueError, match="is at step 4, past the 3 steps asked for"):
        run(out, steps=3)


def test_a_time_budget_stops_on_the_clock_and_a_rerun_trains_no_further(tmp_path, one_thread,
                                                                         monkeypatch):
    """On a made-up clock that advances 0.125 s at every reading, a 1 s budget ends the run on
    the step where the training time reaches it; the same call again trains nothing, and a
    longer budget continues the run."""
    from analysis.training import harness

    clock = iter(range(10**6))
    monkeypatch.setattr(harness.time, "perf_counter", lambda: next(clock) * 0.125)
    out = tmp_path / "run"
    options = dict(RUN, log_every=1, checkpoint_every=100)
    first = train("DiT-S/2", tiny_set(), out, size=8, overrides=TINY, progress=False,
                  options=TrainOptions(budget_seconds=1.0, **options))
    assert first["event"] == "final" and first["steps"] == first["step"] > 0
    assert first["train_s"] >= 1.0
    again = train("DiT-S/2", tiny_set(), out, size=8, overrides=TINY, progress=False,
                  options=TrainOptions(budget_seconds=1.0, **options))
    assert again["step"] == first["step"] and weights(out)["step"] == first["step"]
    more = train("DiT-S/2", tiny_set(), out, size=8, overrides=TINY, progress=False,
                 options=TrainOptions(budget_seconds=2.0, **options))
    assert more["step"] > first["step"] and more["train_s"] >= 2.0


#################################################################################
#                   Restarts: SIGKILL, SIGINT, equal to one run                 #
#################################################################################

def environment() -> dict[str, str]:
    # TORCH_GLOO_LAZY_INIT: see tests/test_sampling_dist.py (gloo's eager connect on a loaded
    # sandboxed loopback)
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path,
            "MASTER_ADDR": "127.0.0.1", "TORCH_GLOO_LAZY_INIT": "1"}


def start_worker(folder: Path, out: Path, steps: int, sleep: float) -> subprocess.Popen:
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "steps": steps, "sleep": sleep}))
    return subprocess.Popen([sys.executable, __file__, str(spec)], cwd=ROOT, env=environment(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for_checkpoint(worker_process: subprocess.Popen, out: Path) -> None:
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists():
        assert worker_process.poll() is None, worker_process.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the worker wrote no checkpoint in 120 s"
        time.sleep(0.01)


STEPS = 16


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: the run of STEPS steps that nothing stops, on one thread."""
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(out, steps=STEPS)
    finally:
        torch.set_num_threads(threads)
    return weights(out)


@pytest.mark.slow
def test_sigkill_then_resume_ends_on_the_uninterrupted_weights(tmp_path, uninterrupted,
                                                               one_thread):
    out = tmp_path / "run"
    worker_process = start_worker(tmp_path, out, STEPS, sleep=0.05)
    try:
        wait_for_checkpoint(worker_process, out)
    finally:
        worker_process.send_signal(signal.SIGKILL)
        worker_process.wait()
    killed_at = weights(out)["step"]
    assert 4 <= killed_at < STEPS
    assert not list(out.glob(".*tmp*"))                   # only whole files under final names
    row = run(out, steps=STEPS)
    assert row["step"] == STEPS
    final = weights(out)
    assert_equal_states(final["model"], uninterrupted["model"])
    assert_equal_states(final["ema"], uninterrupted["ema"])


@pytest.mark.slow
def test_sigint_stops_at_a_step_with_a_checkpoint_and_resumes_exactly(tmp_path, uninterrupted,
                                                                      one_thread):
    out = tmp_path / "run"
    worker_process = start_worker(tmp_path, out, STEPS, sleep=0.05)
    wait_for_checkpoint(worker_process, out)
    worker_process.send_signal(signal.SIGINT)
    _, stderr = worker_process.communicate(timeout=120)
    assert worker_process.returncode == 3, stderr[-3000:]    # TrainingInterrupted, no traceback
    stopped = weights(out)["step"]
    assert 4 <= stopped < STEPS
    events = [(r["event"], r["step"]) for r in read_rows(out)]
    assert events[-1] == ("interrupted", stopped)
    run(out, steps=STEPS)
    final = weights(out)
    assert_equal_states(final["model"], uninterrupted["model"])
    assert_equal_states(final["ema"], uninterrupted["ema"])
    assert [r["step"] for r in read_rows(out) if r["event"] == "final"] == [STEPS]


def test_a_second_signal_aborts_at_once(monkeypatch):
    """The first signal is noted (the loop stops after its step); one within repeat_s of it
    is the same Ctrl-C forwarded by torchrun; a later one aborts."""
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)

    def deliver(sig: int) -> None:
        os.kill(os.getpid(), sig)
        time.sleep(0.05)       # the handler runs in the main thread at the next bytecode

    with pytest.raises(KeyboardInterrupt, match="a second SIGTERM: aborted"):
        with _StopSignals() as stop:
            monkeypatch.setattr(stop, "repeat_s", 5.0)
            deliver(signal.SIGINT)
            deliver(signal.SIGINT)
            assert stop.received == signal.SIGINT
            monkeypatch.setattr(stop, "repeat_s", 0.0)
            deliver(signal.SIGTERM)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_follow_the_one_process_run(tmp_path, one_thread):
    """torchrun, two ranks (gloo), global batch 8 = 4 rows a rank: the same images, flips,
    drops, timesteps and noise, so the same losses up to the float rounding of the batch split
    (measured: 6e-8 relative at most; asserted rtol 1e-6 per step) and the same weights
    (measured: 3e-8 apart after 6 AdamW steps at lr 1e-3; asserted atol 1e-6)."""
    steps = 6
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"out": str(tmp_path / "two"), "steps": steps,
                                "options": {"log_every": 1}}))
    torchrun = Path(sys.executable).parent / "torchrun"
    done = subprocess.run([str(torchrun), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
                           "--master_port", str(free_port()), __file__, str(spec)],
                          cwd=ROOT, env=environment(), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    run(tmp_path / "one", steps=steps, log_every=1)
    two, one = read_rows(tmp_path / "two"), read_rows(tmp_path / "one")
    assert {r["world_size"] for r in two} == {2}
    loss_two = {r["step"]: r["loss"] for r in two}
    loss_one = {r["step"]: r["loss"] for r in one}
    assert list(loss_two) == list(loss_one) == list(range(1, steps + 1))
    for step, loss in loss_two.items():
        assert loss == pytest.approx(loss_one[step], rel=1e-6), step
    a, b = weights(tmp_path / "two"), weights(tmp_path / "one")
    for kind in ("model", "ema"):
        for key in a[kind]:
            torch.testing.assert_close(a[kind][key], b[kind][key], rtol=0, atol=1e-6)


def test_the_data_order_is_a_permutation_per_epoch_whatever_the_batch():
    order = DataOrder(10, seed=3)
    seen = torch.cat([order.take(4) for _ in range(5)])          # 20 = two epochs
    assert sorted(seen[:10].tolist()) == sorted(seen[10:].tolist()) == list(range(10))
    assert not torch.equal(seen[:10], seen[10:])                 # a new order each epoch
    assert (order.epoch, order.index) == (2, 0)
    again = DataOrder(10, seed=3)
    assert torch.equal(torch.cat([again.take(n) for n in (3, 7, 10)]), seen)
    resumed = DataOrder(10, seed=3, epoch=1, index=2)
    assert torch.equal(resumed.take(8), seen[12:])


#################################################################################
#                      Gradient checkpointing, EMA export                       #
#################################################################################

@pytest.mark.parametrize("family", ["DiT", "PT-DiT"])
def test_gradient_checkpointing_gives_the_same_gradients(family, one_thread):
    name, fields = SMALL[family]
    model = randomize(ptdit.build(name, **fields, in_channels=1))
    checkpointed = apply_block_options(randomize(ptdit.build(name, **fields, in_channels=1)),
                                       grad_checkpointing=True)
    checkpointed.load_state_dict(model.state_dict())
    generator = torch.Generator().manual_seed(5)
    x0 = torch.rand(2, 1, 8, 8, generator=generator) * 2 - 1
    t, _ = objectives.draw("iddpm", 2, generator)
    noise = objectives.draw_noise((2, 1, 8, 8), generator)
    if model.config.condition == "class":
        kwargs = {"y": torch.tensor([0, 1])}
    else:
        kwargs = {"text": torch.randn(2, 5, 24, generator=generator),
                  "text_mask": torch.ones(2, 5, dtype=torch.int64)}
    grads = []
    for m in (model, checkpointed):
        total, _ = objectives.loss(m, x0, kwargs, "iddpm", t, noise)
        total.backward()
        grads.append({k: p.grad for k, p in m.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for key in grads[0]:
        assert torch.equal(grads[0][key], grads[1][key]), key
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_the_ema_export_loads_with_ptdit_load_and_says_how_it_was_trained(tmp_path,
                                                                        one_thread):
    out = tmp_path / "run"
    run(out, steps=3, ema_decay=0.0)       # decay 0: the EMA is the weights themselves
    saved = weights(out)
    assert_equal_states(saved["ema"], saved["model"])
    loaded = ptdit.load(out / "ema.safetensors")
    assert_equal_states(loaded.state_dict(), saved["ema"])
    assert loaded.config == ptdit.get_config("DiT-S/2", **TINY, in_channels=1, input_size=8,
                                             num_classes=3, class_dropout_prob=0.1)
    info = checkpoint_info(out / "ema.safetensors")
    assert info == checkpoint_info(out)
    assert (info["objective"], info["sampler"], info["space"]["kind"], info["condition"],
            info["num_classes"], info["labelled"], info["prompt_embeddings"], info["step"]) == \
        ("iddpm", "ddpm", "pixel", "class", 3, True, None, 3)
    still = tmp_path / "still"
    run(still, steps=2, ema_decay=1.0)     # decay 1: the EMA keeps the initial weights
    initial = ptdit.build("DiT-S/2", seed=0, **TINY, in_channels=1, input_size=8, num_classes=3,
                          class_dropout_prob=0.1).state_dict()
    assert_equal_states(weights(still)["ema"], initial)
    trained = weights(still)["model"]
    assert not torch.equal(trained["final_layer.linear.weight"],
                           initial["final_layer.linear.weight"])
    plain = tmp_path / "plain.safetensors"
    ptdit.interop.save(loaded, plain)
    assert checkpoint_info(plain) is None
    with pytest.raises(ValueError, match="does not exist"):
        checkpoint_info(tmp_path / "nothing.safetensors")


@pytest.mark.parametrize("family", ["PixArt", "PT-DiT"])
def test_text_models_train_on_one_fixed_caption_per_class(family, tmp_path, one_thread):
    name, fields = SMALL[family]
    out = tmp_path / "run"
    row = run(out, steps=2, model=name, overrides=fields)
    assert row["status"] == "ok"
    info = checkpoint_info(out)
    assert info["condition"] == "text" and info["num_classes"] == 3
    prompts = prompt_embeddings(info["prompt_embeddings"])
    tokens = fields.get("model_max_length", 200)          # PixArt's, PT-DiT's release length
    assert prompts.embeddings.shape == (3, tokens, 24)
    assert torch.equal(prompts.mask, torch.ones(3, tokens, dtype=torch.int64))
    stored = safetensors.torch.load_file(out / "prompts.safetensors")
    if family == "PT-DiT":                                 # no learned null: a fixed one
        assert prompts.null_embedding.shape == (tokens, 24)
        assert info["null_condition"] == "null_embedding of prompts.safetensors"
    else:
        assert "null_embedding" not in stored
        assert info["null_condition"] == "learned null caption"
    assert row["objective"] == ("flow" if family == "PT-DiT" else "iddpm")


def test_an_unlabelled_set_is_one_class_and_bfloat16_trains(tmp_path, one_thread):
    out = tmp_path / "run"
    row = run(out, steps=2, data=tiny_set(classes=None), dtype="bfloat16", grad_accum=2)
    assert row["status"] == "ok" and row["dtype"] == "bfloat16"
    info = checkpoint_info(out)
    assert (info["num_classes"], info["labelled"]) == (1, False)
    assert ptdit.load(out / "ema.safetensors").config.num_classes == 1


def test_latent_space_trains_on_the_vaes_latents(tmp_path, one_thread):
    from analysis.offline import go_offline
    go_offline()
    from diffusers import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4,
                        norm_num_groups=8, sample_size=32)
    data = tiny_set(count=8, channels=3, size=16)       # factor 2: 8x8 latents
    row = run(tmp_path / "run", steps=2, data=data, size=16, vae=vae)
    assert (row["space"], row["channels"], row["latent_size"], row["tokens"]) == \
        ("latent", 4, 8, 16)
    space = checkpoint_info(tmp_path / "run")["space"]
    assert (space["kind"], space["factor"], space["scaling_factor"]) == ("latent", 2, 0.18215)


#################################################################################
#                                   Rows                                        #
#################################################################################

def test_rows_every_log_steps_and_a_final_one_with_the_fields(tmp_path, one_thread):
    out = tmp_path / "run"
    final = run(out, steps=5, log_every=2)
    rows = read_rows(out)
    assert [(r["event"], r["step"], r["logged_steps"]) for r in rows] == \
        [("log", 2, 2), ("log", 4, 2), ("final", 5, 1)]
    assert rows[-1] == final
    for row in rows:
        check_row(row)
        assert row["table"] == "train" and row["status"] == "ok"
        assert row["loss"] == pytest.approx(row["loss_mse"] + row["loss_vb"], rel=1e-6)
        assert row["tflop_spent"] == pytest.approx(row["step"] * row["train_tflop_per_step"])
        for field in ("lr", "grad_norm", "images_per_s", "tokens_per_s", "tflop_per_s",
                      "wall_s", "train_s"):
            assert row[field] > 0, field
        assert row["tokens_per_s"] == pytest.approx(row["images_per_s"] * 16)
        assert row["options"] == dataclasses.asdict(TrainOptions(steps=5, **{**RUN,
                                                                             "log_every": 2}))
    # linear warm-up over 3 steps, then constant: the rate of each logged window's last step
    assert [r["lr"] for r in rows] == pytest.approx([2e-3 / 3, 1e-3, 1e-3])
    settings = json.loads((out / "run.json").read_text())
    assert settings["options"] == rows[0]["options"]
