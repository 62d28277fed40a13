"""Every fenced code block of README.md and docs/*.md runs, as a reader would run it.

Each test works in a fresh copy of the repository's files (what a clone holds: `git ls-files`,
untracked files that git does not ignore included), so examples may read `bench/sweeps/…` or
`results/…` and write anywhere without touching the checkout.

- ```python blocks: executed in order, one namespace per document, in that copy.
- ```sh / ```bash / ```console / unlabelled blocks: each command line (`\\` continuations
  joined, `# …` comments and a `$ ` prompt dropped, leading VAR=value assignments put in the
  environment) runs in that copy, one copy per block, lines in order:
  - `ptdit …` (run by `ptdit.cli.main` in the test's own interpreter, in the copy, with the
    reader's environment; warnings count as printed) and `torchrun … -m ptdit.cli …` (fresh
    processes, two ranks whatever the count) pass when they exit 0, or when they stop with
    ptdit's own one-line error (exit status 2 for `ptdit`) about an input the example needs and a
    clone cannot have: a checkpoint, weights or reference images that are named and do not
    exist, or weights that are not given (`… does not exist`, `no … given`). An argparse usage
    error, a deprecated flag or any other failure fails the test.
  - `make TARGET …` is checked with `make -n` (the recipe is printed, not run).
  - `python -m bench.command_costs …` runs with every measured `ptdit` command replaced by an
    empty Python process: its arguments, the commands file, the results store and the report are
    checked, the minutes of measuring are not spent.
  - Commands that take minutes run as their quick form instead, listed in INSTEAD; commands
    another test runs as written are checked to be in that test (ELSEWHERE), not run twice.
- Any other language, or a command with no rule here, fails: output excerpts belong in
  Markdown tables, not in fenced blocks.
"""

import contextlib
import io
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
PYTHON = {"python", "py"}
SHELL = {"", "sh", "bash", "console", "shell"}

# Documented commands that take minutes, and the quick form the test runs in their place.
INSTEAD = {
    # the full CPU sweep re-measures every case on a machine whose thread count differs
    "ptdit sweep bench/sweeps/cpu.toml --out results/cpu/cpu_sweep.jsonl --report "
    "results/cpu/report":
        "ptdit sweep bench/sweeps/cpu.toml --dry-run --out results/cpu/cpu_sweep.jsonl",
}

# Documented commands that another test already runs as written: (test file, the function or
# fixture that runs it). The line is checked to appear in that function's source, not run twice.
ELSEWHERE = {
    "bench/gpu_suite.sh --dry-run":
        ("test_sweep.py", "test_the_gpu_suite_dry_run_runs_the_same_grid_tiny_on_the_cpu"),
    "ptdit study analysis/studies/digits.toml --out study-smoke --smoke": ("test_study.py",
                                                                           "smoke"),
}

# ptdit's one-line error about a missing input file, folder or weights
MISSING_INPUT = re.compile(r"^ptdit [\w-]+: error: .*(does not exist|\bno .+ given\b)")


@dataclass(frozen=True)
class Block:
    doc: Path
    line: int          # of the opening fence, 1-based
    language: str
    text: str

    @property
    def name(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def fenced_blocks(doc: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, in order."""
    blocks, opened, body = [], None, []
    for number, line in enumerate(doc.read_text().splitlines(), 1):
        fence = re.match(r"^\s*```\s*([\w+-]*)\s*$", line)
        if opened is None and fence:
            opened, body = (number, fence.group(1).lower()), []
        elif opened is not None and re.match(r"^\s*```\s*$", line):
            blocks.append(Block(doc, opened[0], opened[1], "\n".join(body) + "\n"))
            opened = None
        elif opened is not None:
            body.append(line)
    assert opened is None, f"{doc}:{opened[0]}: a fenced block is never closed"
    return blocks


BLOCKS = [block for doc in DOCS for block in fenced_blocks(doc)]
SHELL_BLOCKS = [b for b in BLOCKS if b.language in SHELL]
PYTHON_DOCS = sorted({b.doc for b in BLOCKS if b.language in PYTHON})


def command_lines(text: str) -> list[str]:
    """The command lines of a shell block: continuations joined, prompts and comments dropped."""
    lines, pending = [], ""
    for raw in text.splitlines():
        line = raw.rstrip()
        if line.endswith("\\"):
            pending += line[:-1].strip() + " "
            continue
        line = (pending + line.strip()).strip()
        pending = ""
        line = line[2:] if line.startswith("$ ") else line
        if line and not line.startswith("#"):
            lines.append(line)
    assert not pending, f"a line continues past the end of the block: {pending}"
    return lines


def repository_files() -> list[Path]:
    """What a clone holds, relative to ROOT: git's tracked and unignored files where git can say,
    else every file outside the virtual environment and the caches."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
            capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
        return sorted({Path(p) for p in listed if p and (ROOT / p).is_file()})
    except (OSError, subprocess.SubprocessError):
        skip = {".git", ".venv", "__pycache__", ".pytest_cache", ".benchmarks", ".ruff_cache"}
        return sorted(p.relative_to(ROOT) for p in ROOT.rglob("*") if p.is_file()
                      and not skip & set(p.relative_to(ROOT).parts)
                      and not any(part.endswith(".egg-info") for part in p.parts))


@pytest.fixture(scope="module")
def files() -> list[Path]:
    return repository_files()


@pytest.fixture
def clone(tmp_path, files) -> Path:
    """A fresh copy of the repository's files, in which an example runs."""
    root = tmp_path / "clone"
    for path in files:
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / path, root / path)
    return root


def environment(tmp: Path) -> dict[str, str]:
    """The reader's environment without ptdit's weight variables, offline, the venv's commands
    first, temporary files and ptdit's cache (the digits classifier) inside the test's
    folder."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PTDIT_")}
    return {**env, "PATH": f"{BIN}{os.pathsep}{env.get('PATH', '')}", "HF_HUB_OFFLINE": "1",
            "TMPDIR": str(tmp), "PYTHONPATH": str(ROOT), "PTDIT_CACHE": str(tmp / "cache")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def split(line: str) -> tuple[dict[str, str], list[str]]:
    """VAR=value assignments in front of a command, and the command's words."""
    words = shlex.split(line, comments=True)
    assignments = {}
    while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
        key, value = words.pop(0).split("=", 1)
        assignments[key] = value
    return assignments, words


def check_ptdit_outcome(line: str, done: subprocess.CompletedProcess, exit_code: int | None):
    """Exit 0, or ptdit's one-line error about a missing input (`exit_code`: the status it must
    have then; None: any non-zero status, as torchrun reports its ranks' failure)."""
    report = f"`{line}` -> exit {done.returncode}\n{done.stderr[-4000:]}"
    assert "usage:" not in done.stderr and "ambiguous option" not in done.stderr, report
    assert "deprecated" not in done.stderr, report
    if done.returncode == 0:
        return
    errors = [e for e in done.stderr.splitlines() if re.match(r"^ptdit [\w-]+: error: ", e)]
    assert errors and all(MISSING_INPUT.match(e) for e in errors), report
    assert exit_code is None or done.returncode == exit_code, report


def in_process(argv: list[str], cwd: Path, env: dict[str, str],
               monkeypatch) -> subprocess.CompletedProcess:
    """`ptdit ARGV` run by ptdit.cli.main in this interpreter (a fresh process would spend most
    of its seconds importing torch again), in `cwd` with `env`; what a shell would have seen."""
    from ptdit.cli import main

    monkeypatch.chdir(cwd)
    for key in [k for k in os.environ if k not in env]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setattr(tempfile, "tempdir", env["TMPDIR"])
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), \
            warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code if isinstance(exit.code, int) else 1
    shown = "".join(f"{w.category.__name__}: {w.message}\n" for w in warned)
    return subprocess.CompletedProcess(["ptdit", *argv], code or 0, out.getvalue(),
                                       err.getvalue() + shown)


def runs_elsewhere(line: str) -> bool:
    """Whether `line` is one that another test runs (ELSEWHERE): its test function holds the
    command's words (the study file and --smoke, or the script and its flag)."""
    if line not in ELSEWHERE:
        return False
    module, function = ELSEWHERE[line]
    source = (ROOT / "tests" / module).read_text()
    body = re.search(rf"^def {function}\(.*?(?=^\S)", source + "\nend", re.S | re.M)
    assert body, f"{module} has no function {function} (ELSEWHERE[{line!r}])"
    words = [w for w in shlex.split(line) if w not in ("ptdit", "--out", "study-smoke")]
    constants = dict(re.findall(r'^([A-Z_]+) = "([^"]+)"', source, re.M))
    text = body.group(0)
    for name, value in constants.items():
        text = text.replace(name, value)
    missing = [w for w in words if w not in text]
    assert not missing, f"{module}::{function} does not run {missing} of `{line}`"
    return True


def run_line(line: str, cwd: Path, monkeypatch) -> None:
    line = INSTEAD.get(" ".join(line.split()), line)
    if runs_elsewhere(" ".join(line.split())):
        return
    assignments, words = split(line)
    env = {**environment(cwd.parent), **assignments}
    program = words[0]
    if program == "ptdit":
        check_ptdit_outcome(line, in_process(words[1:], cwd, env, monkeypatch), exit_code=2)
    elif program == "torchrun":
        assert words[words.index("-m") + 1] == "ptdit.cli", line
        # two ranks stand for any count: each rank runs the same command to the same outcome
        words = [re.sub(r"^(--nproc[-_]per[-_]node=?)\d+$", r"\g<1>2", w) for w in words]
        if "--nproc_per_node" in words or "--nproc-per-node" in words:
            at = max(words.index(f) for f in ("--nproc_per_node", "--nproc-per-node")
                     if f in words) + 1
            words[at] = "2"
        env.update(OMP_NUM_THREADS="1", MASTER_ADDR="127.0.0.1", TORCH_GLOO_LAZY_INIT="1",
                   PET_MASTER_PORT=str(free_port()))   # torchrun's --master-port
        done = subprocess.run([str(BIN / "torchrun"), *words[1:]], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)
        check_ptdit_outcome(line, done, exit_code=None)
    elif program == "make":
        done = subprocess.run(["make", "-n", *words[1:]], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"`make -n {' '.join(words[1:])}`:\n{done.stderr}"
    elif words[:3] == ["python", "-m", "bench.command_costs"]:
        from bench import command_costs
        monkeypatch.chdir(cwd)
        # each measured command becomes an empty process: no minutes of measuring
        monkeypatch.setattr(command_costs, "_child",
                            lambda argv: [sys.executable, "-S", "-c", "pass"])
        assert command_costs.main(words[3:]) == 0, line
    else:
        pytest.fail(f"no rule for `{line}`: give it one in tests/test_docs.py")


def test_every_fenced_block_is_python_or_shell():
    other = [f"{b.name} ```{b.language}" for b in BLOCKS if b.language not in PYTHON | SHELL]
    assert not other, "fenced blocks are run: show output as Markdown tables instead"


def test_every_quick_form_stands_for_a_documented_command():
    documented = {" ".join(line.split()) for b in SHELL_BLOCKS for line in command_lines(b.text)}
    assert set(INSTEAD) <= documented, set(INSTEAD) - documented


@pytest.mark.parametrize("block", SHELL_BLOCKS, ids=[b.name for b in SHELL_BLOCKS])
def test_shell_block_runs(block, clone, monkeypatch):
    lines = command_lines(block.text)
    assert lines, f"{block.name}: an empty block"
    for line in lines:
        run_line(line, clone, monkeypatch)


@pytest.mark.parametrize("doc", PYTHON_DOCS, ids=[str(d.relative_to(ROOT)) for d in PYTHON_DOCS])
def test_python_blocks_run(doc, clone, monkeypatch):
    monkeypatch.chdir(clone)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("PTDIT_CACHE", str(clone.parent / "cache"))
    namespace = {"__name__": "__main__"}
    for block in (b for b in BLOCKS if b.doc == doc and b.language in PYTHON):
        exec(compile(block.text, block.name, "exec"), namespace)


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(ROOT)) for d in DOCS])
def test_links_stay_inside_the_repository(doc):
    text = doc.read_text()
    assert "../shared" not in text and "shared/reference" not in text
    for target in LINK.findall(text):
        assert not re.match(r"^[a-z]+:", target), f"{doc.name}: {target} leaves the repository"
        path = (doc.parent / target.split("#")[0]).resolve()
        assert path.is_relative_to(ROOT), f"{doc.name}: {target} points outside the repository"
        assert path.exists(), f"{doc.name}: {target} does not exist"
