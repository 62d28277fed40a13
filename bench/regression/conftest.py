"""The regression gates' options and session: `--update-baseline` rewrites the baselines of the
gates that run instead of comparing with them (`make baseline`); `--speed-gate` makes a
confirmed speed regression fail (`make bench-compare`; without it the speed benchmarks report
only, `make bench`). What changed or regressed is printed at the end of the run."""

import dataclasses

import pytest
import torch

from bench.regression import gate, speed


def pytest_addoption(parser):
    group = parser.getgroup("ptdit regression gates (docs/regression.md)")
    group.addoption("--update-baseline", action="store_true",
                    help="rewrite the baselines of the gates that run (exact counts, and the "
                         "speed ratios of PTDIT_BENCH_DEVICE) instead of comparing with them")
    group.addoption("--speed-gate", action="store_true",
                    help="fail on a confirmed speed regression (else report only)")


SUMMARY = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[SUMMARY] = []


@pytest.fixture(scope="session")
def update_baseline(request) -> bool:
    return request.config.getoption("--update-baseline")


@pytest.fixture(scope="session")
def summary(request) -> list[str]:
    """Lines printed after the run (what changed, what regressed)."""
    return request.config.stash[SUMMARY]


class SpeedSession:
    """The speed gate's run: device, threads, slowdowns injected, the baseline, and the
    measured ratios (written as the new baseline with --update-baseline)."""

    def __init__(self, update: bool, gating: bool):
        self.device = speed.device()
        self.update, self.gating = update, gating
        self.slowdown = speed.injected()
        if self.slowdown and update:
            raise ValueError(f"{speed.INJECT_ENV} is for the gate's self-test; unset it to "
                             "record a baseline")
        self.path = speed.baseline_path(self.device)
        self.baseline = gate.read_json(self.path)
        self.machine = speed.machine(self.device)
        self.ratios: dict[str, float] = {}
        self.verdicts: list[gate.Verdict] = []

    def calibration(self) -> dict[str, str]:
        """The calibration kernels of this run's benchmarks, by device type."""
        return {kind: speed.calibration_kernel(torch.device(kind))
                for kind in sorted({"cpu", self.device.type})}

    def mismatch(self) -> str | None:
        """Why the baseline's ratios do not compare with this run's (None: they do)."""
        recorded = self.baseline["machine"]["threads"]
        if recorded != self.machine["threads"]:
            return (f"{self.path.name} was recorded with {recorded} CPU threads, this run has "
                    f"{self.machine['threads']}: set {speed.THREADS_ENV}={recorded}, or record "
                    "a baseline (make baseline)")
        if self.baseline.get("calibration") != self.calibration():
            return (f"{self.path.name} was recorded with another calibration kernel than this "
                    f"run's {self.calibration()}: record a baseline (make baseline)")
        return None

    def baseline_ratio(self, name: str) -> float | None:
        """The baseline's ratio of the named benchmark; ValueError if the baseline does not
        compare with this run."""
        if self.baseline is None:
            return None
        if reason := self.mismatch():
            raise ValueError(reason)
        return self.baseline["ratios"].get(name)

    def lines(self) -> list[str]:
        """The run's summary: every verdict, or what the new baseline changed."""
        if self.update:
            old = (self.baseline or {}).get("ratios", {})
            return [f"speed baseline {self.path}:"] + [
                f"  {name}: {old[name]:.3f} -> {r:.3f} calibration units" if name in old else
                f"  {name}: {r:.3f} calibration units (new)" for name, r in self.ratios.items()]
        out = [f"speed gate on {self.machine['device']} ({self.machine['threads']} thread(s)), "
               f"{'gating' if self.gating else 'report only (make bench-compare gates)'}"]
        if self.baseline and self.baseline["machine"] != self.machine:
            out.append(f"  note: baseline recorded on {self.baseline['machine']}, this is "
                       f"{self.machine}; ratios compare across one machine class only")
        if self.slowdown:
            out.append(f"  injected slowdown (self-test): {self.slowdown}")
        return out + ["  " + v.message() for v in self.verdicts]

    def write(self) -> None:
        """Writes the measured ratios over the baseline's (none of those if it was recorded
        on another machine, or does not compare with this run)."""
        keep = (self.baseline is not None and self.baseline["machine"] == self.machine
                and self.mismatch() is None)
        ratios = {**(self.baseline["ratios"] if keep else {}), **self.ratios}
        gate.write_json(self.path, {
            "about": "Median ratio of each benchmark's time to the calibration kernel's, "
                     "measured interleaved (bench/regression/speed.py, gate.py). Regenerate "
                     "with `make baseline` on the machine class the gate runs on "
                     "(docs/regression.md).",
            "machine": self.machine,
            "calibration": self.calibration(),
            "rule": dataclasses.asdict(gate.RULE), "ratios": ratios})


@pytest.fixture(scope="session")
def speed_session(request, update_baseline, summary):
    previous = torch.get_num_threads()
    torch.set_num_threads(speed.threads())
    try:
        session = SpeedSession(update_baseline, request.config.getoption("--speed-gate"))
        yield session
        if update_baseline and session.ratios:
            session.write()
        summary.extend(session.lines())
    finally:
        torch.set_num_threads(previous)


def pytest_terminal_summary(terminalreporter, config):
    lines = config.stash.get(SUMMARY, [])
    if lines:
        terminalreporter.section("ptdit regression gates")
        for line in lines:
            terminalreporter.write_line(line)
