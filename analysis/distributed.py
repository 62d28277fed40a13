"""Rank, world size, device and the process group under torchrun, in one place.

    with process_group("cuda") as (rank, world, device):
        ...   # under `torchrun --nproc_per_node N`: rank r of N on GPU LOCAL_RANK

torchrun sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in each worker's
environment. `process_group` starts a group when WORLD_SIZE > 1 and none is running (gloo for
the CPU, nccl for CUDA), and destroys only a group it started, so nested uses (a CLI command
around `analysis.sampling.sample` or `analysis.metrics.fid.fid`) share one group. Without
torchrun it yields (0, 1, device) and starts nothing.

A process may start and destroy groups one after another (a script calling `sample` twice under
torchrun): torch names every default group "0" again after a destroy, and torchrun's store
outlives the groups, so a second group would read the first one's stale gloo addresses and
could hang. Each group started here therefore gets its own key prefix in the store.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist

_started = 0   # groups this process has started: every rank counts the same, a fresh prefix


def current() -> tuple[int, int]:
    """(rank, world size) of the running process group; (0, 1) when none runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def launched_world_size() -> int:
    """The number of processes torchrun started (WORLD_SIZE), 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


@contextmanager
def process_group(device: str | torch.device = "cpu"
                  ) -> Iterator[tuple[int, int, torch.device]]:
    """Yields (rank, world size, this rank's device). Starts a process group when torchrun's
    WORLD_SIZE > 1 and none runs (gloo on the CPU; nccl on CUDA, on GPU LOCAL_RANK when
    `device` names no index) and destroys it on exit; a group that was running is left as it
    is."""
    global _started
    device = torch.device(device)
    started = False
    if not dist.is_initialized() and launched_world_size() > 1:
        if device.type == "cuda":
            if device.index is None:
                device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        store, rank, world = next(dist.rendezvous("env://"))   # torchrun's environment
        _started += 1
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                store=dist.PrefixStore(f"ptdit-group-{_started}", store),
                                rank=rank, world_size=world)
        started = True
    elif dist.is_initialized() and device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    rank, world = current()
    try:
        yield rank, world, device
    finally:
        if started:
            dist.destroy_process_group()


def broadcast(value, src: int = 0):
    """`value` of rank `src` on every rank (any picklable object); `value` itself on one
    process. Every rank must call it."""
    if current()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    """Waits for every rank; nothing on one process."""
    if current()[1] > 1:
        dist.barrier()
