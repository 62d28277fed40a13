"""The two gates' rules as pure functions: the exact diff of two count tables, the speed rule over
interleaved timings, and the atomic write of a baseline file (docs/regression.md).

Speed rule. A benchmark's figure is `ratio`: over K rounds, each timing the calibration kernel
and then the benchmark back to back, the median of benchmark time / calibration time. Machine
load that slows both within a round cancels; a round hit by a burst of load is outvoted by the
median. A figure is *slower* when it exceeds the baseline ratio by more than
max(rel_tol × baseline, abs_tol); only then is the benchmark measured `rechecks` more times, and
the regression is confirmed when the median of those re-checks is slower too (so at least two
of three). One noisy measurement never fails the gate.
"""

import json
import os
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

#################################################################################
#                               Speed rule                                      #
#################################################################################

@dataclass(frozen=True)
class Rule:
    """The speed gate's numbers (docs/regression.md); ratios are in calibration units."""
    rounds: int = 21            # K interleaved (calibration, benchmark) rounds per measurement
    warmup: int = 3             # untimed rounds before them
    rel_tol: float = 0.30       # slower by more than 30% of the baseline ratio ...
    abs_tol: float = 0.25       # ... and by more than 0.25 calibration units
    rechecks: int = 3           # measurements that must confirm (by their median)

    def limit(self, baseline: float) -> float:
        """The ratio above which a measurement counts as slower."""
        return baseline + max(self.rel_tol * baseline, self.abs_tol)


RULE = Rule()


def ratio(times: Sequence[float], calibration: Sequence[float]) -> float:
    """Median over rounds of time / calibration time of the same round (seconds each)."""
    if len(times) != len(calibration) or not times:
        raise ValueError(f"need one calibration time per round: {len(times)} rounds, "
                         f"{len(calibration)} calibration times")
    return statistics.median(t / c for t, c in zip(times, calibration))


@dataclass(frozen=True)
class Verdict:
    """One benchmark against its baseline ratio (None: no baseline)."""
    name: str
    ratio: float
    baseline: float | None
    limit: float | None
    rechecks: tuple[float, ...] = ()

    @property
    def regressed(self) -> bool:
        """Slower, and confirmed by the median of the re-checks."""
        return (self.limit is not None and self.ratio > self.limit and bool(self.rechecks)
                and statistics.median(self.rechecks) > self.limit)

    @property
    def status(self) -> str:
        if self.baseline is None:
            return "no baseline"
        if self.regressed:
            return "regression"
        return "cleared by re-check" if self.rechecks else "ok"

    def message(self) -> str:
        """One line: the figure, the baseline, the limit, the re-checks, the status."""
        if self.baseline is None:
            return f"{self.name}: {self.ratio:.3f} calibration units; no baseline"
        change = self.ratio / self.baseline - 1
        text = (f"{self.name}: {self.ratio:.3f} vs baseline {self.baseline:.3f} calibration "
                f"units ({change:+.1%}; limit {self.limit:.3f})")
        if self.rechecks:
            text += "; re-checks " + ", ".join(f"{r:.3f}" for r in self.rechecks)
        return f"{text}: {self.status}"

    def as_dict(self) -> dict:
        return {"ratio": self.ratio, "baseline_ratio": self.baseline, "limit": self.limit,
                "rechecks": list(self.rechecks), "status": self.status}


def judge(name: str, first: float, baseline: float | None, recheck: Callable[[], float],
          rule: Rule = RULE) -> Verdict:
    """The verdict on a benchmark whose first measurement gave ratio `first`; `recheck()`
    measures it again (another K rounds) and is called only when `first` is slower."""
    if baseline is None:
        return Verdict(name, first, None, None)
    limit = rule.limit(baseline)
    rechecks = tuple(recheck() for _ in range(rule.rechecks)) if first > limit else ()
    return Verdict(name, first, baseline, limit, rechecks)


#################################################################################
#                               Exact diff                                      #
#################################################################################
# A count table maps a case ("PT-DiT/XL @1024px") to its fields: integers named `*_macs` (shown
# as GMACs) and `params*` (shown as millions), and plain values (tokens, window).

def _shown(field: str, old, new) -> tuple[str, str, str]:
    """(label, old, new) for a diff line: the fewest decimals that tell old and new apart."""
    if isinstance(old, str) or isinstance(new, str) or old is None or new is None:
        return field, str(old), str(new)
    if field.endswith("_macs"):
        label, scale = field.removesuffix("_macs") + "_gmacs", 1e9
    elif field.startswith("params"):
        label, scale = field + "_m", 1e6
    else:
        return field, str(old), str(new)
    for decimals in range(1, 10):
        a, b = f"{old / scale:.{decimals}f}", f"{new / scale:.{decimals}f}"
        if a != b:
            return label, a, b
    return label, f"{old:,}", f"{new:,}"


def _change(old, new) -> str:
    if not isinstance(old, (int, float)) or not isinstance(new, (int, float)):
        return ""
    if old == 0:
        return " (was 0)"
    pct = 100 * (new - old) / old
    return f" ({pct:+.1f}%)" if abs(pct) >= 0.05 else f" ({pct:+.2g}%)"


def diff(baseline: dict[str, dict], current: dict[str, dict]) -> list[str]:
    """One line per field that moved, e.g. 'PT-DiT/XL @1024px: linear_mlp_gmacs 1234.5 ->
    1300.2 (+5.3%)', and per case that appeared or went; [] when the tables are equal."""
    lines = []
    for case in list(baseline) + [c for c in current if c not in baseline]:
        if case not in current:
            lines.append(f"{case}: in the baseline, no longer counted")
            continue
        if case not in baseline:
            lines.append(f"{case}: new case, not in the baseline")
            continue
        old, new = baseline[case], current[case]
        for field in list(old) + [f for f in new if f not in old]:
            a, b = old.get(field), new.get(field)
            if a != b:
                label, x, y = _shown(field, a, b)
                lines.append(f"{case}: {label} {x} -> {y}{_change(a, b)}")
    return lines


#################################################################################
#                               Baseline files                                  #
#################################################################################

def read_json(path: Path) -> dict | None:
    """The baseline at `path`, None if there is none."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else None


def write_json(path: Path, data: dict) -> None:
    """Writes `data` to `path` atomically: a temporary file in the same folder, fsync'ed, then
    renamed over it, so a crash leaves the old baseline or the new one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)                  # mkstemp's 0600 is not a file to commit
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
