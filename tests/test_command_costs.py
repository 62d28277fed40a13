"""bench.command_costs: whole commands in fresh processes, their wall time and peak memory as
store rows, and the Markdown table the README cites."""

import os
import sys

import pandas as pd
import pytest

from bench import command_costs
from bench.store import Store


def write(tmp_path, text: str):
    path = tmp_path / "commands.toml"
    path.write_text(text)
    return path


def test_a_command_is_measured_in_a_fresh_process(tmp_path):
    """The row holds the command's wall time, exit status and, for a failure, ptdit's one-line
    error."""
    fine = command_costs.measure({"name": "models", "argv": ["models", "--format", "csv"]})
    assert fine["status"] == "ok" and fine["returncode"] == 0 and fine["wall_s"] > 0
    assert fine["argv"] == "ptdit models --format csv" and fine["cpus"] >= 1
    bad = command_costs.measure({"name": "bad", "argv": ["flops", "--model", "DiT-XL/3",
                                                          "--resolution", "256"]})
    assert bad["returncode"] == 2 and bad["status"].startswith("error: exit 2: ptdit flops: ")
    assert "DiT-XL/3" in bad["status"]


def test_peak_memory_is_the_childs_own(tmp_path, monkeypatch):
    """ru_maxrss of the measured child only: a child holding 300 MiB reports more than that, a
    small one far less, whatever this process holds."""
    script = tmp_path / "hold.py"
    script.write_text("import sys\nblock = bytearray(int(sys.argv[1]) * 2**20)\n"
                      "block[::4096] = b'x' * len(block[::4096])\n")
    monkeypatch.setattr(command_costs, "_child", lambda argv: [sys.executable, str(script),
                                                               *argv])
    big = command_costs.measure({"name": "big", "argv": ["300"]})
    small = command_costs.measure({"name": "small", "argv": ["1"]})
    assert big["peak_rss_mib"] > 300 > small["peak_rss_mib"] + 250


def test_commands_files_are_checked(tmp_path):
    ok = write(tmp_path, '[[command]]\nname = "a"\nargv = ["models"]\nrepeats = 2\n')
    assert command_costs.load(ok) == [{"name": "a", "argv": ["models"], "repeats": 2}]
    for text, message in [
            ('[[command]]\nname = "a"\nargv = "models"\n', "'argv' must be a list"),
            ('[[command]]\nname = "a"\nargv = ["m"]\n[[command]]\nname = "a"\nargv = ["m"]\n',
             "naming the command once"),
            ('[[command]]\nname = "a"\nargv = ["m"]\nrepeat = 2\n', "unknown keys repeat"),
            ('[[command]]\nname = "a"\nargv = ["m"]\nsetup = "x"\n', "unknown setup 'x'"),
            ('[[command]]\nname = "a"\nargv = ["m"]\nrepeats = 0\n', "positive integer"),
            ('name = "a"\n', r"expected \[\[command\]\] tables only")]:
        with pytest.raises(ValueError, match=message):
            command_costs.load(write(tmp_path, text))
    with pytest.raises(ValueError, match="does not exist"):
        command_costs.load(tmp_path / "none.toml")


def test_rows_go_to_the_store_and_the_report_shows_the_latest(tmp_path, capsys, monkeypatch):
    """(The child is a bare interpreter: a real command's measurement is the first test's.)"""
    monkeypatch.setattr(command_costs, "_child", lambda argv: [sys.executable, "-c", "pass"])
    spec = write(tmp_path, '[[command]]\nname = "models"\nargv = ["models", "--format", '
                 '"csv"]\nrepeats = 2\n')
    store, report = tmp_path / "out" / "costs.jsonl", tmp_path / "out" / "costs.md"
    assert command_costs.main([str(spec), "--out", str(store), "--report", str(report)]) == 0
    rows = Store(store, table="commands").rows()
    assert len(rows) == 2 and {r["table"] for r in rows} == {"commands"}
    text = report.read_text()
    assert text.count("| `ptdit models --format csv` |") == 1
    assert "peak RSS (MiB)" in text and ("(idle)" in text or "(BUSY)" in text)
    assert all(r["cpu_s"] > 0 and r["other_cores"] >= 0 for r in rows)
    assert command_costs.main([str(spec), "--out", str(store), "--only", "nope"]) == 2
    assert "--only: no command named nope" in capsys.readouterr().err


def test_the_commands_own_cpu_time_is_measured_and_not_counted_as_other_work(tmp_path,
                                                                              monkeypatch):
    """A command that spins for 1 s of CPU time: its own CPU time is at least that, whatever
    else the machine runs, and the machine's busy time over the command (/proc/stat) holds
    it, so other work is what is left (never negative)."""
    script = tmp_path / "spin.py"
    script.write_text("import time\nwhile time.process_time() < 1.0:\n    pass\n")
    monkeypatch.setattr(command_costs, "_child", lambda argv: [sys.executable, str(script)])
    seen = []
    busy = command_costs._busy_seconds
    monkeypatch.setattr(command_costs, "_busy_seconds", lambda: seen.append(busy()) or seen[-1])
    row = command_costs.measure({"name": "spin", "argv": []})
    assert row["cpu_s"] >= 1.0 and row["returncode"] == 0
    tick = 1 / os.sysconf("SC_CLK_TCK")
    assert seen[1] - seen[0] >= row["cpu_s"] - 2 * tick
    assert row["other_cores"] == pytest.approx(
        max(0.0, (seen[1] - seen[0] - row["cpu_s"]) / row["wall_s"]))


def test_other_work_beside_a_command_is_reported_busy(monkeypatch):
    """Busy time beyond the command's own, per second of its wall time, is other work in
    cores: with the machine's counters made up to show 40 s of it, the row is not idle and
    the report says BUSY; a row below IDLE_CORES reads idle."""
    monkeypatch.setattr(command_costs, "_child", lambda argv: [sys.executable, "-S", "-c", "0"])
    readings = iter([1000.0, 1040.0])
    monkeypatch.setattr(command_costs, "_busy_seconds", lambda: next(readings))
    row = command_costs.measure({"name": "x", "argv": []})
    assert row["other_cores"] == pytest.approx((40.0 - row["cpu_s"]) / row["wall_s"])
    assert row["other_cores"] > command_costs.IDLE_CORES and row["idle"] is False
    quiet = {**row, "other_cores": 0.1, "idle": True}
    text = command_costs.report(pd.DataFrame([{**row, "argv": "x"}, {**quiet, "argv": "y",
                                                                     "command": "y"}]))
    assert f"{row['other_cores']:.2f} (BUSY)" in text and "0.10 (idle)" in text
