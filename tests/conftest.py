"""Shared test helpers: small random models, random inputs (seeded: every test starts from
seed 0)."""

import json
import os
import random
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

# private, for tests only: the op-level trace that shows which SDPA kernel runs
from torch.utils._python_dispatch import TorchDispatchMode

import ptdit
from ptdit.models.inputs import VAE_SPATIAL


def randomize(model: torch.nn.Module, std: float = 0.1) -> torch.nn.Module:
    """Redraws every parameter and floating buffer N(0, std): zero-initialised layers would
    otherwise hide whole branches."""
    with torch.no_grad():
        for p in list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]:
            p.copy_(torch.randn(p.shape, dtype=torch.float64).to(p.dtype) * std)
    return model


SMALL = {  # tiny configurations of each family, for CPU numerics
    "DiT": ("DiT-S/2", dict(depth=2, hidden_size=64, num_heads=4)),
    "PixArt": ("PixArt-XL/2", dict(depth=2, hidden_size=64, num_heads=4, caption_channels=24,
                                   model_max_length=6)),
    # 2x2 windows per frame: small latents still get windows of many tokens, and shifts
    "PT-DiT": ("PT-DiT/XL", dict(depth=2, hidden_size=64, num_heads=4, caption_channels=24,
                                 windows_per_side=2)),
    "PT-DiT-class": ("PT-DiT/S-Class", dict(depth=2, hidden_size=64, num_heads=4,
                                             num_classes=10, windows_per_side=2)),
}


def small_model(family: str, dtype=torch.float64, **overrides) -> torch.nn.Module:
    name, kwargs = SMALL[family]
    model = ptdit.build(name, dtype=dtype, **{**kwargs, **overrides})
    return randomize(model).eval()


def forward_inputs(model: torch.nn.Module, shape: tuple, dtype=torch.float64,
                   text_tokens: int = 6) -> tuple:
    """Random positional forward inputs (latents, timesteps in [0, 1000), condition…) for
    `model` at latent `shape` (B, C, H, W) or (B, C, F, H, W): ptdit.example_inputs, whose keys
    follow the forward's argument order."""
    B, _, *frames, H, W = shape
    work = ptdit.Workload(model.config, (H * VAE_SPATIAL, W * VAE_SPATIAL),
                          frames[0] if frames else None, B, text_tokens)
    return tuple(ptdit.example_inputs(model, work, dtype=dtype).values())


def condition(model: torch.nn.Module, batch: int, dtype=torch.float64) -> tuple:
    """A random condition for `model`: (class labels,) or (captions, keep-mask)."""
    return forward_inputs(model, (batch, model.config.in_channels, 16, 16), dtype)[2:4]


def modules_at_failure(code: str) -> tuple[str | None, set[str]]:
    """Runs `code` in a fresh interpreter (this environment, the repository as working folder)
    until it raises: (repr of the error, or None if nothing raised; the top-level packages
    imported by then). What a refusal must not have imported yet is checked here, not timed."""
    report = "print(json.dumps([{}, sorted(sys.modules)]))"
    probe = ("import json, sys\ntry:\n" + textwrap.indent(textwrap.dedent(code).strip(), "    ")
             + "\nexcept Exception as err:\n    " + report.format("repr(err)")
             + "\nelse:\n    " + report.format("None") + "\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          cwd=Path(__file__).resolve().parents[1], timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    error, modules = json.loads(done.stdout.strip().splitlines()[-1])
    return error, {m.split(".")[0] for m in modules}


class Ops(TorchDispatchMode):
    """Names of the aten ops a block of code runs (`with Ops() as ops: …; ops.seen`)."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread, and least disturbed by other jobs."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _fixed_seed():
    """Every test starts from seed 0 (torch, numpy, random), so each run draws the same inputs;
    a test that needs several independent draws seeds its own generators."""
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt is recorded and refused."""
    attempts = []

    def connect(self, address):
        attempts.append(address)
        raise OSError(f"test: network access to {address} attempted")

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket.socket, "connect_ex", connect)
    return attempts


@pytest.fixture(autouse=True, scope="session")
def _own_cache(tmp_path_factory):
    """ptdit's cache (the digits classifier's weights) in a folder of this test session, not
    the user's ~/.cache/ptdit."""
    before = os.environ.get("PTDIT_CACHE")
    os.environ["PTDIT_CACHE"] = str(tmp_path_factory.mktemp("ptdit-cache"))
    yield
    if before is None:
        os.environ.pop("PTDIT_CACHE", None)
    else:
        os.environ["PTDIT_CACHE"] = before
