"""analysis.distributed: the device check, and process groups under torchrun — started only
when WORLD_SIZE > 1, destroyed only by whoever started them, and safe to start again in the
same process while another rank still lags in the previous group.

Run as a script under torchrun, this file is the worker of the last test."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

if __name__ == "__main__":
    from analysis.distributed import broadcast, process_group

    for k in range(int(sys.argv[1])):
        with process_group("cpu") as (rank, world, device):
            assert (world, device) == (2, torch.device("cpu"))
            assert broadcast(k if rank == 0 else None) == k
            if rank == 0:   # rank 1 starts the next group while rank 0 is still in this one
                time.sleep(0.3)
        assert not dist.is_initialized()
    print(f"rank {rank}: {sys.argv[1]} groups", flush=True)
    sys.exit(0)

from test_sampling_dist import environment, free_port  # noqa: E402

from analysis.distributed import broadcast, current, process_group  # noqa: E402
from ptdit.checks import check_device  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def test_devices_this_machine_cannot_run_are_one_line_errors():
    assert check_device("cpu") == torch.device("cpu")
    for bad in ("foo", "cuda:x", "tpu", "cpu:0 "):
        with pytest.raises(ValueError, match=f"--device {bad!r} is not a device.*nearest: cpu"):
            check_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="--gpu cuda:1 was asked for but CUDA is not "
                                             "available.*give --gpu cpu"):
            check_device("cuda:1", "--gpu")


def test_without_torchrun_nothing_is_started(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with process_group("cpu") as (rank, world, device):
        assert (rank, world, device) == (0, 1, torch.device("cpu"))
        assert not dist.is_initialized() and current() == (0, 1)
        assert broadcast({"x": 1}) == {"x": 1}


def test_a_group_started_by_the_caller_is_used_and_left_running(tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0,
                            world_size=1)
    try:
        with process_group("cpu") as (rank, world, _):
            assert (rank, world) == (0, 1)
        assert dist.is_initialized()
    finally:
        dist.destroy_process_group()


def test_groups_started_one_after_another_do_not_read_each_others_addresses():
    """torch names every default group "0" again after a destroy, and torchrun's store outlives
    the groups: without a prefix of its own, a group started while the other rank still lags
    in the previous one picks up that group's gloo addresses (connection reset, or a hang)."""
    done = subprocess.run(
        [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2",
         "--master_addr", "127.0.0.1", "--master_port", str(free_port()), __file__, "5"],
        cwd=ROOT, env={**environment(), "PYTHONPATH": f"{ROOT}{os.pathsep}{ROOT / 'tests'}"},
        capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(done.stdout.split("\n")[:2]) == ["rank 0: 5 groups", "rank 1: 5 groups"]
