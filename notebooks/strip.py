"""Strips what running a notebook leaves in it: each code cell's outputs, execution count and
nbclient's timing metadata, and the notebook's widget state. Notebooks are committed stripped
(tests/test_notebooks.py checks it).

    python notebooks/strip.py                  # every notebooks/*.ipynb, in place
    python notebooks/strip.py --check a.ipynb  # change nothing; exit 1 if any needs stripping
"""

import argparse
import sys
from pathlib import Path

import nbformat

NOTEBOOKS = Path(__file__).resolve().parent


def strip(nb: nbformat.NotebookNode) -> bool:
    """Strips `nb` in place; returns whether anything was there to strip."""
    changed = "widgets" in nb.metadata
    nb.metadata.pop("widgets", None)
    for cell in nb.cells:
        changed |= "execution" in cell.metadata
        cell.metadata.pop("execution", None)
        if cell.cell_type == "code":
            changed |= bool(cell.outputs) or cell.execution_count is not None
            cell.outputs, cell.execution_count = [], None
    return changed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("notebooks", nargs="*", type=Path,
                        help="default: every .ipynb beside this script")
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if any notebook has something to strip")
    args = parser.parse_args(argv)
    dirty = []
    for path in args.notebooks or sorted(NOTEBOOKS.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        if strip(nb):
            dirty.append(path)
            if not args.check:
                nbformat.write(nb, path)
    for path in dirty:
        print(f"{'needs stripping' if args.check else 'stripped'}: {path}")
    return 1 if args.check and dirty else 0


if __name__ == "__main__":
    sys.exit(main())
