"""The `ptdit` parser (`ptdit --help`, `ptdit CMD --help`) imports torch, the models and the
packages' command modules only: checkpoint I/O, torch.compile's dynamo, the counters' fvcore,
the report and plotting stack, sampling and metrics load per subcommand, when it runs."""

import subprocess
import sys

import pytest
import torch

from ptdit.layers import ShapeCache

HEAVY = ("ptdit.interop", "safetensors", "torch._dynamo", "fvcore", "pandas", "matplotlib",
         "diffusers", "transformers", "torchmetrics", "bench.reproduce", "bench.runtime_report",
         "bench.markdown", "analysis.sampling", "analysis.metrics", "analysis.attention")

HELP = """
import sys
from ptdit import cli
for argv in (["--help"], *([cmd, "--help"] for cmd in ("models", "convert", "flops",
                                                        "reproduce", "bench", "sweep", "report",
                                                        "sample", "fid", "clip-score",
                                                        "attention"))):
    cli.main(argv)
print(" ".join(sys.modules))
"""


def test_help_imports_nothing_heavy():
    out = subprocess.run([sys.executable, "-c", HELP], capture_output=True, text=True,
                         check=True).stdout
    modules = out.splitlines()[-1].split()
    assert {"ptdit.cli", "bench.cli", "analysis.cli"} <= set(modules)
    assert [m for m in modules if m.startswith(HEAVY)] == []


def test_shape_cache_is_called_not_traced_by_torch_compile():
    cache, computed = ShapeCache(), []

    def table(n):
        computed.append(n)
        return torch.arange(n, dtype=torch.float32)

    def f(x):
        return x + cache.get(x.shape, lambda: table(x.shape[-1]))

    compiled = torch.compile(f, backend="eager")
    for n in (3, 3, 5, 3):
        assert torch.equal(compiled(torch.ones(n)), torch.ones(n) + torch.arange(n))
    assert computed == [3, 5, 3]

    def g(x):   # a fresh code object: f's compiled frames would be reused without tracing
        return x + cache.get(x.shape, lambda: table(x.shape[-1]))

    with pytest.raises(Exception, match="(?i)skip"):   # dynamo refuses to inline it
        torch.compile(g, backend="eager", fullgraph=True)(torch.ones(7))
