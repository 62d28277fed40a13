"""The one direction of imports, read from the source (ast), lazy imports included: `ptdit`
(its CLI dispatcher too) <- `bench` / `analysis` (their commands register themselves through an
entry-point group) <- notebooks; `analysis` may use `bench` (its results store), never the
reverse; no cycle anywhere; ptdit/checks.py is a leaf. And what `ptdit --help` imports.
"""

import ast
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("ptdit", "bench", "analysis")


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path, packages=PACKAGES) -> dict[str, set[str]]:
    """module -> the modules of `packages` it imports anywhere in its file (function-level
    imports too: a cycle resolved by a lazy import is still a cycle)."""
    files = {module_name(p, root): p for pkg in packages for p in (root / pkg).rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import mod` imports the module pkg.mod, else names of pkg
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in files else base
                           for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t.split(".")[0] in packages and t != name}
        graph[name] = edges
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, …, a], or None."""
    state: dict[str, int] = {}   # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def direction_violations(graph: dict[str, set[str]]) -> list[str]:
    def top(module):
        return module.split(".")[0]

    bad = []
    for module, edges in graph.items():
        for target in sorted(edges):
            if module == "ptdit.checks":
                bad.append(f"{module} -> {target}: checks.py imports nothing of the suite")
            elif top(module) == "ptdit" and top(target) != "ptdit":
                bad.append(f"{module} -> {target}: ptdit knows nothing of bench or analysis")
            elif top(module) == "bench" and top(target) == "analysis":
                bad.append(f"{module} -> {target}: bench never imports analysis")
            elif target == "ptdit.cli" and module not in ("bench.cli", "analysis.cli"):
                bad.append(f"{module} -> {target}: only the packages' command modules use the "
                           "CLI's shared flags")
    return bad


def test_the_suite_has_no_import_cycle():
    assert find_cycle(import_graph(ROOT)) is None


def test_imports_follow_the_design_direction():
    graph = import_graph(ROOT)
    assert graph["ptdit.configs"] >= {"ptdit.models"}          # the registry imports models
    assert "ptdit.configs" not in set().union(*(graph[m] for m in graph
                                                 if m.startswith("ptdit.models")))
    assert direction_violations(graph) == []


@pytest.fixture
def toy(tmp_path):
    """A package laid out like ptdit, for showing the checks fail when they should."""
    def write(files: dict[str, str]) -> dict[str, set[str]]:
        for rel, text in files.items():
            path = tmp_path / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(textwrap.dedent(text))
        return import_graph(tmp_path)
    return write


def test_a_lazy_import_cycle_is_caught(toy):
    graph = toy({"ptdit/__init__.py": "", "ptdit/checks.py": "import math\n",
                 "ptdit/models/__init__.py": "from .dit import DiT\n",
                 "ptdit/models/dit.py": "def f():\n    from ..configs import MODELS\n",
                 "ptdit/configs.py": "from .models import DiT\nfrom . import checks\n",
                 "bench/__init__.py": "", "analysis/__init__.py": ""})
    cycle = find_cycle(graph)
    assert cycle is not None and {"ptdit.configs", "ptdit.models.dit"} <= set(cycle)
    assert direction_violations(graph) == []


def test_a_wrong_direction_is_caught(toy):
    graph = toy({"ptdit/__init__.py": "", "ptdit/checks.py": "from . import layers\n",
                 "ptdit/layers.py": "import bench.store\n", "ptdit/cli.py": "import bench\n",
                 "bench/__init__.py": "", "bench/store.py": "from analysis import plots\n",
                 "analysis/__init__.py": "", "analysis/plots.py": "import bench.store\n"})
    assert find_cycle(graph) == ["analysis.plots", "bench.store", "analysis.plots"]
    bad = direction_violations(graph)
    assert any(b.startswith("ptdit.checks -> ptdit.layers") for b in bad)
    assert any(b.startswith("ptdit.layers -> bench.store") for b in bad)
    assert any(b.startswith("bench.store -> analysis.plots") for b in bad)
    assert any(b.startswith("ptdit.cli -> bench") for b in bad)   # the dispatcher neither


def test_help_imports_no_heavy_library():
    """`ptdit --help` and a subcommand's --help build every parser (the entry-point group's
    command modules included) without importing what only the work needs."""
    import subprocess
    import sys

    heavy = ("diffusers", "transformers", "torchmetrics", "torch_fidelity", "clip",
             "matplotlib", "pandas", "scipy", "fvcore", "torch._dynamo")
    script = ("import sys\nfrom ptdit.cli import build_parser\nbuild_parser()\n"
              f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "[]"
