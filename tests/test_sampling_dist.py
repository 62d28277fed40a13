"""analysis.sampling across processes: two torchrun ranks (gloo, CPU) make the same images as
one process, and a run killed with SIGKILL resumes with no index missing or made twice.

Run as a script, this file is the worker: `python test_sampling_dist.py spec.json` (or under
torchrun) samples the runs a JSON spec describes with a tiny DiT whose weights the test saved.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CLASSES = "0-9"


def worker(spec_file: str) -> None:
    """Samples each run of the spec (keys: weights, vae, runs, sleep_per_step)."""
    from analysis.sampling import sample

    from conftest import small_model
    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(1)
    model = small_model("DiT", dtype=torch.float32)
    model.load_state_dict(torch.load(spec["weights"], weights_only=True))
    pause = spec.get("sleep_per_step", 0)
    for run in spec["runs"]:
        sample(model, vae=spec["vae"], conditions=CLASSES, resolution=16, progress=False,
               on_step=(lambda *_: time.sleep(pause)) if pause else None, **run)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    worker(sys.argv[1])
    sys.exit(0)

from analysis.offline import go_offline  # noqa: E402

go_offline()
from test_sampling import tiny_vae  # noqa: E402

from analysis.sampling import sample  # noqa: E402

from conftest import small_model  # noqa: E402

RUN = dict(scheduler="ddpm", steps=3, cfg_scale=4.0, seed=11)


@pytest.fixture
def setup(tmp_path):
    """A tiny DiT (weights saved for the workers) and a tiny VAE folder."""
    model = small_model("DiT", dtype=torch.float32)
    torch.save(model.state_dict(), tmp_path / "dit.pt")
    tiny_vae().save_pretrained(tmp_path / "vae")
    return model, tmp_path


@contextmanager
def one_thread():
    """The workers' thread count, so in-process references run the same kernels."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def reference(model, folder: Path, out: Path, **run) -> dict[str, np.ndarray]:
    with one_thread():
        sample(model, vae=folder / "vae", conditions=CLASSES, resolution=16, progress=False,
               out=out, **run)
    return images(out)


def images(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def write_spec(folder: Path, runs: list[dict], **extra) -> Path:
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"weights": str(folder / "dit.pt"), "vae": str(folder / "vae"),
                                "runs": runs, **extra}))
    return spec


def environment() -> dict[str, str]:
    # TORCH_GLOO_LAZY_INIT: gloo connects its pairs at the first collective rather than in
    # init_process_group; on a loaded, sandboxed loopback (gVisor) the eager mesh connect was
    # refused in about half the runs (gloo's 3 retries ran out), the lazy one never.
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
            "MASTER_ADDR": "127.0.0.1", "TORCH_GLOO_LAZY_INIT": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ranks_make_the_one_process_images(setup):
    """Rank r takes indices k % 2 == r; batch size 1 gives bit-identical PNGs, batch size 2
    (other batch compositions) within one 8-bit level; rank 0 writes the .npz and one row."""
    model, folder = setup
    runs = [dict(RUN, num=5, batch_size=1, out=str(folder / "ranks_b1"), write_npz=True),
            dict(RUN, num=5, batch_size=2, out=str(folder / "ranks_b2"))]
    spec = write_spec(folder, runs)
    done = subprocess.run(
        [str(VENV_BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), __file__, str(spec)],
        cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one_b1 = reference(model, folder, folder / "one_b1", **dict(RUN, num=5, batch_size=1))
    one_b2 = reference(model, folder, folder / "one_b2", **dict(RUN, num=5, batch_size=2))
    ranks_b1, ranks_b2 = images(folder / "ranks_b1"), images(folder / "ranks_b2")
    names = [f"{i:06d}.png" for i in range(5)]
    assert list(one_b1) == list(ranks_b1) == list(ranks_b2) == names
    for name in names:
        np.testing.assert_array_equal(ranks_b1[name], one_b1[name])
        for a in (ranks_b2[name], one_b2[name]):
            assert np.abs(a.astype(int) - one_b1[name].astype(int)).max() <= 1
    np.testing.assert_array_equal(np.load(folder / "ranks_b1" / "samples.npz")["arr_0"],
                                  np.stack([one_b1[n] for n in names]))
    rows = [json.loads(line) for line in
            (folder / "ranks_b1" / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    assert (rows[0]["world_size"], rows[0]["images"], rows[0]["skipped"]) == (2, 5, 0)


@pytest.mark.slow
def test_sigkill_then_rerun_finishes_every_index_once(setup):
    """A worker killed (SIGKILL) after two PNGs leaves whole PNGs only; the rerun skips them,
    makes the rest, and the folder equals an uninterrupted run's."""
    model, folder = setup
    num, out = 6, folder / "killed"
    run = dict(RUN, num=num, batch_size=1, out=str(out))
    spec = write_spec(folder, [run], sleep_per_step=0.15)
    worker_process = subprocess.Popen([sys.executable, __file__, str(spec)], cwd=ROOT,
                                      env=environment(), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    try:
        while len(list(out.glob("*.png"))) < 2:
            assert worker_process.poll() is None, worker_process.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the worker made no PNGs in 120 s"
            time.sleep(0.02)
    finally:
        worker_process.send_signal(signal.SIGKILL)
        worker_process.wait()
    survivors = {p.name: p.stat().st_mtime_ns for p in out.glob("*.png")}
    assert 2 <= len(survivors) < num
    with one_thread():
        row = sample(model, vae=folder / "vae", conditions=CLASSES, resolution=16,
                     progress=False, **run)
    assert (row["skipped"], row["images"]) == (len(survivors), num - len(survivors))
    assert {n: (out / n).stat().st_mtime_ns for n in survivors} == survivors   # not redone
    assert sorted(p.name for p in out.iterdir() if p.name not in ("samples.jsonl", "run.json")) \
        == [f"{i:06d}.png" for i in range(num)]                                   # no .tmp
    expected = reference(model, folder, folder / "uninterrupted", **dict(RUN, num=num,
                                                                         batch_size=1))
    resumed = images(out)
    for name, image in expected.items():
        np.testing.assert_array_equal(resumed[name], image)
