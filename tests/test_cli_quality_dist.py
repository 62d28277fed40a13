"""The quality commands as real processes: under `torchrun` (two ranks, gloo on the CPU)
`ptdit sample`, `ptdit fid` and `ptdit clip-score` shard their work, start one process group and
write one row (world_size 2) with the one-process value; the README's torchrun line gets through
torchrun's and ptdit's argument parsing; Ctrl-C stops `ptdit sample` with a message, not a
traceback. Tiny random-weight networks in local files stand in for the real ones."""

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from test_cli_quality import TINY, rows, weights  # noqa: F401  (weights: a fixture)
from test_sampling_dist import environment, free_port

from ptdit.cli import main

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = str(Path(sys.executable).parent / "torchrun")
SAMPLE = ["sample", "--model", "DiT-S/2", "--override", *TINY, "--resolution", "16",
          "--class-labels", "0-3", "--sampler-steps", "2", "--scheduler", "flow",
          "--batch-size", "1"]


def torchrun(*args: str, cwd=ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m ptdit.cli ARGS` on the loopback, gloo on the CPU."""
    return subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
         str(free_port()), "-m", "ptdit.cli", *args],
        cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout)


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))}


def readme_torchrun_line() -> str:
    """The README's torchrun command, its continuation lines joined."""
    text = (ROOT / "README.md").read_text()
    lines = re.search(r"```\n(torchrun .*?)\n```", text, re.S).group(1).splitlines()
    command = []
    for line in lines:
        command.append(line.rstrip("\\").strip())
        if not line.endswith("\\"):
            break
    return " ".join(command)


def test_the_readmes_torchrun_line_reaches_ptdits_own_error(tmp_path):
    """As written, in a fresh folder: torchrun and ptdit both parse it; with no weights here it
    stops at ptdit's one-line error about the missing VAE folder."""
    command = readme_torchrun_line().split()
    assert command[0] == "torchrun" and "--num-samples" in command
    env = {**environment(), "PET_MASTER_PORT": str(free_port())}   # torchrun's --master-port
    done = subprocess.run([TORCHRUN, *command[1:]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0
    assert "ambiguous option" not in done.stderr
    assert "ptdit sample: error: VAE folder 'sd-vae-ft-ema' (from --vae sd-vae-ft-ema) does " \
           "not exist" in done.stderr, done.stderr[-3000:]
    assert list(tmp_path.iterdir()) == []                       # samples/ was not created


@pytest.mark.slow   # two torchrun launches of two ranks each: about a minute on 2 cores
def test_torchrun_sample_shares_the_indices_and_refuses_other_settings_on_every_rank(
        tmp_path, weights):  # noqa: F811
    out = tmp_path / "ranks"
    args = [*SAMPLE, "--vae", str(weights / "vae"), "--num-samples", "4", "--first-index", "3",
            "--out", str(out)]
    done = torchrun(*args)
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(pngs(out)) == [f"{i:06d}.png" for i in range(3, 7)]
    (row,) = rows(out / "samples.jsonl")
    assert (row["world_size"], row["images"], row["skipped"], row["status"]) == (2, 4, 0, "ok")
    assert done.stdout.count("world_size") == 1                  # rank 0 prints the summary
    # one process, the same untrained weights (drawn under --seed): the same pixels
    assert main([*args[:-1], str(tmp_path / "one")]) == 0
    for name, image in pngs(tmp_path / "one").items():
        assert np.abs(image.astype(int) - pngs(out)[name].astype(int)).max() <= 1

    refused = torchrun(*args, "--seed", "1", timeout=240)      # a hang would time out
    assert refused.returncode != 0
    assert refused.stderr.count("ptdit sample: error: ") == 2    # both ranks, the same error
    assert "seed: 0 → 1" in refused.stderr and "another --out" in refused.stderr
    assert len(rows(out / "samples.jsonl")) == 1


def metric_inputs(tmp_path: Path) -> tuple[Path, Path, Path]:
    """5 samples (odd: shards of 3 and 2), 6 reference images, 5 captions."""
    samples, reference = tmp_path / "samples", tmp_path / "reference"
    for folder, n in ((samples, 5), (reference, 6)):
        folder.mkdir()
        for i in range(n):
            pixels = torch.randint(0, 256, (24, 24, 3), dtype=torch.uint8).numpy()
            Image.fromarray(pixels).save(folder / f"{i:06d}.png")
    captions = tmp_path / "captions.txt"
    captions.write_text("a cat\na dog on a tree\na red car\na small house\na blue boat\n")
    return samples, reference, captions


@pytest.mark.slow   # two ranks import torch and torchmetrics or clip: 30-60 s on 2 cores
@pytest.mark.parametrize("metric", ["fid", "clip_score"])
def test_torchrun_metrics_write_one_row_of_the_one_process_value(tmp_path, weights,  # noqa: F811
                                                                  metric):
    samples, reference, captions = metric_inputs(tmp_path)
    if metric == "fid":
        args = ["fid", str(samples), str(reference), "--inception-weights",
                str(weights / "inception.pth"), "--batch-size", "2"]
        ranks, one = ["--cache-dir", str(tmp_path / "c2")], ["--cache-dir", str(tmp_path / "c1")]
    else:
        args = ["clip-score", str(samples), str(captions), "--clip-weights",
                str(weights / "clip.pt"), "--batch-size", "2"]
        ranks = one = []
    done = torchrun(*args, "--store", str(tmp_path / "ranks.jsonl"), *ranks)
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = rows(tmp_path / "ranks.jsonl")                   # rank 0 alone appends
    assert done.stdout.count("(stored in)") == 1              # and prints the summary
    assert main([*args, "--store", str(tmp_path / "one.jsonl"), *one]) == 0
    (single,) = rows(tmp_path / "one.jsonl")
    assert (row["world_size"], single["world_size"]) == (2, 1)
    assert row[metric] == pytest.approx(single[metric], rel=1e-9, abs=1e-9)
    count = "n_samples" if metric == "fid" else "n_pairs"
    assert row[count] == single[count] == 5


@pytest.mark.skipif(not hasattr(signal, "SIGINT"), reason="POSIX only")
def test_ctrl_c_keeps_the_pngs_says_how_to_resume_and_stores_no_error(
        tmp_path, weights):  # noqa: F811
    out = tmp_path / "out"
    command = [sys.executable, "-m", "ptdit.cli", *SAMPLE[:-6], "--sampler-steps", "20",
               "--scheduler", "flow", "--batch-size", "1", "--vae", str(weights / "vae"),
               "--num-samples", "1000", "--out", str(out)]
    # SIGINT as a terminal delivers it, even when this test runs in the background of a
    # non-interactive shell (which starts its children with SIGINT ignored)
    child = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    try:
        while len(list(out.glob("*.png"))) < 2:
            assert child.poll() is None, child.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "no PNG in 120 s"
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        err = child.communicate(timeout=60)[1]
    finally:
        child.kill()
    assert child.returncode == 130, err[-3000:]
    assert "Traceback" not in err
    message = [line for line in err.splitlines() if line.startswith("ptdit sample:")]
    assert message == [f"ptdit sample: interrupted; the finished PNGs are kept in {out}: run "
                       "the same command again to resume"]
    assert not (out / "samples.jsonl").exists() or rows(out / "samples.jsonl") == []
    assert len(list(out.glob("*.png"))) >= 2
