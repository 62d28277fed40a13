"""What a `ptdit` command costs on this machine: wall time and peak memory of whole commands,
each run in a fresh process, as rows of a results store, and a Markdown table from them.

    python -m bench.command_costs bench/commands/cpu.toml --out results/commands/cpu.jsonl \
        --report results/commands/commands.md

A commands file lists `[[command]]` tables: `name` (the row's label), `argv` (the arguments
after `ptdit`, as a list; `{tmp}` becomes a fresh temporary folder, removed afterwards), and
optionally `setup`, one of SETUPS (files the command reads, made in `{tmp}` first), and
`repeats` (default 1; each repeat is a row). The command runs with the interpreter running this
module (`python -m ptdit.cli …`), spawned by a small launcher process: its wall time is
perf_counter around it, its peak memory its own peak resident set (`os.wait4`'s ru_maxrss, in
KiB on Linux), including what it waited for of its own children.

Timings need an idle machine: with other work on the cores, torch's intra-op threads spin and a
command takes several times as long. Every row records the CPU time the rest of the machine
spent while the command ran (/proc/stat's busy time less the command's own CPU time, in cores),
and the report marks a row "BUSY" when that was IDLE_CORES or more. A rerun appends new rows;
the report shows the latest row of each command.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import pandas as pd

from .rows import provenance
from .store import Store, check_writable

MIB = 1024   # ru_maxrss is in KiB on Linux


def _prompt_embeddings(folder: Path) -> None:
    """prompts.safetensors: one random 120-token T5-XXL-width caption and its empty-prompt
    null, for the text models (the cost does not depend on the values)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    save_file({"embeddings": torch.randn(1, 120, 4096, generator=generator),
               "mask": torch.ones(1, 120, dtype=torch.int64),
               "null_embedding": torch.randn(120, 4096, generator=generator),
               "null_mask": torch.ones(120, dtype=torch.int64)},
              folder / "prompts.safetensors")


SETUPS = {"prompt-embeddings": _prompt_embeddings}


def load(path: str | Path) -> list[dict]:
    """The `[[command]]` tables of a commands file, checked."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"commands file {str(path)!r} does not exist; give a TOML file such as "
                         "bench/commands/cpu.toml")
    try:
        spec = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ValueError(f"commands file {path} is not valid TOML: {err}") from None
    commands = spec.get("command")
    if set(spec) != {"command"} or not isinstance(commands, list) or not commands:
        raise ValueError(f"{path}: expected [[command]] tables only, got keys "
                         f"{', '.join(spec) or 'none'}")
    names = set()
    for number, command in enumerate(commands, 1):
        where = f"{path}: [[command]] {number}"
        unknown = set(command) - {"name", "argv", "setup", "repeats"}
        if unknown:
            raise ValueError(f"{where}: unknown keys {', '.join(sorted(unknown))}; allowed: "
                             "name, argv, setup, repeats")
        if not isinstance(command.get("name"), str) or command["name"] in names:
            raise ValueError(f"{where}: 'name' must be a string naming the command once")
        names.add(command["name"])
        argv = command.get("argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError(f"{where}: 'argv' must be a list of strings (the arguments after "
                             "`ptdit`)")
        if command.get("setup", None) not in (None, *SETUPS):
            raise ValueError(f"{where}: unknown setup {command['setup']!r}; allowed: "
                             f"{', '.join(SETUPS)}")
        repeats = command.get("repeats", 1)
        if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
            raise ValueError(f"{where}: 'repeats' must be a positive integer, got {repeats!r}")
    return commands


# Linux records a process's peak RSS from its memory before exec too, so a child forked from a
# large process (a test run, a notebook) would start at the parent's resident set. A small
# launcher (python -S, a few MiB) spawns the command instead and reports the command's own wall
# time, exit status and ru_maxrss.
LAUNCHER = """
import json, os, sys, time
report, argv = sys.argv[1], sys.argv[2:]
began = time.perf_counter()
pid = os.posix_spawn(argv[0], argv, os.environ)
_, status, usage = os.wait4(pid, 0)
with open(report, "w") as f:
    json.dump({"wall_s": time.perf_counter() - began, "maxrss_kib": usage.ru_maxrss,
               "cpu_s": usage.ru_utime + usage.ru_stime,
               "returncode": os.waitstatus_to_exitcode(status)}, f)
"""
IDLE_CORES = 0.25   # other work below this, on average over the command: an idle machine


def _busy_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (/proc/stat), None elsewhere."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _child(argv: list[str]) -> list[str]:
    """The measured command line: `ptdit ARGV` through this interpreter."""
    return [sys.executable, "-m", "ptdit.cli", *argv]


def measure(command: dict) -> dict:
    """One run of `command` in a fresh process: a results row (DESIGN's fields where they
    apply) with wall_s, peak_rss_mib, returncode, load_1min, cpus and the command line."""
    with tempfile.TemporaryDirectory(prefix="ptdit-cost-") as tmp:
        if command.get("setup"):
            SETUPS[command["setup"]](Path(tmp))
        argv = [a.replace("{tmp}", tmp) for a in command["argv"]]
        load_1min = os.getloadavg()[0]
        report = Path(tmp) / "launcher.json"
        with open(Path(tmp) / "stderr.txt", "w+b") as stderr:
            busy = _busy_seconds()
            subprocess.run([sys.executable, "-S", "-c", LAUNCHER, str(report), *_child(argv)],
                           stdout=subprocess.DEVNULL, stderr=stderr, check=True)
            after = _busy_seconds()
            stderr.seek(0)
            error = stderr.read().decode(errors="replace").strip().splitlines()
        measured = json.loads(report.read_text())
    code = measured["returncode"]
    # the CPU time of everything else during the command, in cores: work beside the measured
    # command slows it (its threads spin); the launcher's own few milliseconds count here too
    other = (None if busy is None else
             max(0.0, (after - busy - measured["cpu_s"]) / measured["wall_s"]))
    return {**provenance(f"cpu ({os.cpu_count()} cores)", "n/a", "n/a"),
            "model": None, "resolution": None, "latent_frames": None, "tokens": None,
            "batch": None, "status": "ok" if code == 0 else
            f"error: exit {code}: {error[-1] if error else ''}",
            "command": command["name"], "argv": " ".join(["ptdit", *command["argv"]]),
            "wall_s": measured["wall_s"], "peak_rss_mib": measured["maxrss_kib"] / MIB,
            "cpu_s": measured["cpu_s"], "returncode": code, "other_cores": other,
            "idle": None if other is None else other < IDLE_CORES, "load_1min": load_1min,
            "cpus": os.cpu_count()}


def report(frame) -> str:
    """Markdown: the latest row of each command."""
    latest = frame.groupby("command", sort=False).tail(1)
    lines = ["| command | wall (s) | peak RSS (MiB) | CPU (s) | other work (cores) | "
             "measured (UTC) | status |", "|---|---:|---:|---:|---|---|---|"]
    for row in latest.itertuples():
        other = ("n/a" if pd.isna(row.other_cores) else
                 f"{row.other_cores:.2f} ({'idle' if row.idle else 'BUSY'})")
        lines.append(f"| `{row.argv}` | {row.wall_s:.1f} | {row.peak_rss_mib:.0f} | "
                     f"{row.cpu_s:.0f} | {other} | {row.time_utc} | {row.status} |")
    hosts = ", ".join(sorted(set(latest.host)))
    return "\n".join([f"Whole `ptdit` commands, each in a fresh process, on {hosts} "
                      f"({int(latest.cpus.iloc[0])} CPUs, torch {latest.torch.iloc[0]}); wall "
                      "time, the process's peak resident memory and CPU time; other work: what "
                      "the rest of the machine used meanwhile (an idle machine is below "
                      f"{IDLE_CORES} cores; timings taken beside other work are not comparable); "
                      "`{tmp}` is a temporary folder. Made by `python -m bench.command_costs` "
                      "(bench/command_costs.py).", "", *lines, ""])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.command_costs", description=__doc__.split("\n\n")[0])
    parser.add_argument("file", help="a commands file (TOML), e.g. bench/commands/cpu.toml")
    parser.add_argument("--out", required=True, metavar="STORE.jsonl",
                        help="results store the rows are appended to")
    parser.add_argument("--report", metavar="FILE.md", help="then write the Markdown table")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="measure these commands only")
    args = parser.parse_args(argv)
    try:
        commands = load(args.file)
        check_writable(args.out, "--out")
        if args.report:
            check_writable(args.report, "--report")
        unknown = set(args.only or ()) - {c["name"] for c in commands}
        if unknown:
            raise ValueError(f"--only: no command named {', '.join(sorted(unknown))} in "
                             f"{args.file}")
        store = Store(args.out, table="commands").check()
        with store.lock():
            for command in commands:
                if args.only and command["name"] not in args.only:
                    continue
                for _ in range(command.get("repeats", 1)):
                    row = store.append(measure(command))
                    print(f"{row['command']}: {row['wall_s']:.1f} s, "
                          f"{row['peak_rss_mib']:.0f} MiB, load {row['load_1min']:.2f}, "
                          f"{row['status']}", flush=True)
        if args.report:
            Path(args.report).parent.mkdir(parents=True, exist_ok=True)
            Path(args.report).write_text(report(store.frame()))
    except (ValueError, OSError) as err:
        print(f"bench.command_costs: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
