"""The notebooks as committed: stripped of outputs, each opening with a markdown cell (its
question) and reading its settings from exactly one cell tagged "parameters"; and
notebooks/strip.py, which strips them. Executing them is `make notebooks` (nbmake)."""

import importlib.util
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))


def load_strip():
    spec = importlib.util.spec_from_file_location("strip", NOTEBOOKS / "strip.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_notebooks_are_there():
    assert {p.name for p in PATHS} >= {"complexity.ipynb", "runtime.ipynb",
                                       "attention_similarity.ipynb", "quality.ipynb",
                                       "training_study.ipynb"}


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_outputs_are_stripped(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    dirty = [f"cell {i}: {what}" for i, cell in enumerate(nb.cells)
             for what, bad in (("outputs", cell.get("outputs")),
                               ("execution_count", cell.get("execution_count") is not None),
                               ("timing metadata", "execution" in cell.metadata))
             if cell.cell_type == "code" and bad]
    if "widgets" in nb.metadata:
        dirty.append("notebook metadata: widgets state")
    assert not dirty, f"{path.name} is not stripped ({'; '.join(dirty)}): run " \
                      f"`python notebooks/strip.py {path.name}`"


@pytest.mark.parametrize("path", PATHS, ids=[p.name for p in PATHS])
def test_opens_with_its_question_and_has_one_parameters_cell(path):
    nb = nbformat.read(path, as_version=4)
    assert nb.cells and nb.cells[0].cell_type == "markdown", \
        f"{path.name} must open with a markdown cell stating its question"
    tagged = [i for i, cell in enumerate(nb.cells)
              if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: cells tagged 'parameters': {tagged}; need exactly one"
    cell = nb.cells[tagged[0]]
    assert cell.cell_type == "code" and "PTDIT_NOTEBOOK_SIZE" in cell.source, \
        f"{path.name}: the parameters cell must read PTDIT_NOTEBOOK_SIZE"


def test_strip_removes_outputs_counts_timing_and_widgets(tmp_path):
    strip = load_strip()
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_markdown_cell("# Q"), nbformat.v4.new_code_cell("1 + 1")],
        metadata={"widgets": {"application/vnd.jupyter.widget-state+json": {}}})
    code = nb.cells[1]
    code.execution_count = 3
    code.outputs = [nbformat.v4.new_output("execute_result", {"text/plain": "2"},
                                           execution_count=3)]
    code.metadata["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00Z"}
    code.metadata["tags"] = ["parameters"]
    path = tmp_path / "run.ipynb"
    nbformat.write(nb, path)

    assert strip.main(["--check", str(path)]) == 1
    assert nbformat.read(path, as_version=4).cells[1].outputs       # --check writes nothing
    assert strip.main([str(path)]) == 0
    stripped = nbformat.read(path, as_version=4)
    assert stripped.cells[1].outputs == [] and stripped.cells[1].execution_count is None
    assert "execution" not in stripped.cells[1].metadata and "widgets" not in stripped.metadata
    assert stripped.cells[1].metadata["tags"] == ["parameters"]     # tags are kept
    assert strip.main(["--check", str(path)]) == 0
