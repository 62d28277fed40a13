"""Exact regressions: parameters and MACs per category of every named model at its papers'
sizes (closed form), and of a few small cases counted on the built model, against
baselines/exact.json. Any change fails with one line per moved count; `make baseline`
(--update-baseline) records the new counts deliberately."""

import pytest

from bench.regression import exact, gate

HOW_TO_UPDATE = ("if the change is intended, record it with `make baseline` and commit "
                 "bench/regression/baselines/exact.json")


def _baseline() -> dict:
    baseline = gate.read_json(exact.BASELINE)
    if baseline is None:
        pytest.fail(f"no exact baseline at {exact.BASELINE}: record one with `make baseline`",
                    pytrace=False)
    return baseline["cases"]


def test_closed_form_counts_match_baseline(update_baseline, summary):
    current = exact.table(exact.BASELINE_CASES)
    if update_baseline:
        old = (gate.read_json(exact.BASELINE) or {}).get("cases", {})
        changes = gate.diff(old, current)
        if changes or not exact.BASELINE.exists():
            gate.write_json(exact.BASELINE, exact.document(current))
        if not old:
            summary.append(f"exact baseline {exact.BASELINE}: written, {len(current)} cases")
            return
        summary.append(f"exact baseline {exact.BASELINE}: "
                       + (f"{len(changes)} change(s)" if changes else "unchanged"))
        summary.extend("  " + line for line in changes)
        return
    changes = gate.diff(_baseline(), current)
    if changes:
        pytest.fail(f"{len(changes)} count(s) moved from the baseline ({HOW_TO_UPDATE}):\n  "
                    + "\n  ".join(changes), pytrace=False)


@pytest.mark.parametrize("case", exact.COUNTED, ids=lambda case: case.key)
def test_counted_model_matches_baseline(case, update_baseline):
    """The built model, counted by FlopCounterMode, has the baseline's counts (with
    --update-baseline: the closed form's, so a baseline never records a disagreement)."""
    work = case.workload()
    expected = exact.closed_form(work) if update_baseline else _baseline()[case.key]
    changes = gate.diff({case.key: expected}, {case.key: exact.counted(work)})
    if changes:
        against = "the closed form" if update_baseline else "the baseline"
        pytest.fail(f"the built model, counted by FlopCounterMode, differs from {against} "
                    "(ptdit/complexity.py must follow the model, tests/test_flops.py; "
                    f"{HOW_TO_UPDATE}):\n  " + "\n  ".join(changes), pytrace=False)
