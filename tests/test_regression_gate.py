"""The regression gates' rules (bench/regression/gate.py) on synthetic inputs: the speed rule on
seeded random timing lists, the exact diff on count tables in which one model changed, the
atomic baseline write; and the gate's inputs (reference cases, injected slowdowns)."""

import json
import random

import pytest
import torch

import ptdit
from bench.regression import exact, gate, speed
from ptdit import Workload, complexity

RULE = gate.RULE


@pytest.fixture
def rng() -> random.Random:
    """The same draws on every run (each test its own generator, seed 0)."""
    return random.Random(0)


def rounds(rng: random.Random, ratio: float, noise: float = 0.05, n: int = RULE.rounds):
    """(times, calibration times) of n rounds of a benchmark whose true ratio is `ratio`: each
    round runs on a machine slowed 1-3x by other jobs (both kernels of the round alike), and
    each time has its own lognormal noise."""
    times, calibration = [], []
    for _ in range(n):
        load, unit = rng.uniform(1, 3), rng.uniform(1e-3, 3e-3)
        calibration.append(unit * load * rng.lognormvariate(0, noise))
        times.append(ratio * unit * load * rng.lognormvariate(0, noise))
    return times, calibration


def measured(rng, ratio, noise=0.05):
    return gate.ratio(*rounds(rng, ratio, noise))


def never():
    raise AssertionError("re-checked a measurement within the limit")


#################################################################################
#                               Speed rule                                      #
#################################################################################

def test_ratio_cancels_load_shared_by_a_round(rng):
    times, calibration = rounds(rng, 7.25, noise=0)
    assert max(times) / min(times) > 1.2            # the raw times moved with the load ...
    assert gate.ratio(times, calibration) == pytest.approx(7.25, rel=1e-12)   # ... the ratio not


def test_ratio_needs_one_calibration_time_per_round():
    with pytest.raises(ValueError, match="3 rounds, 2 calibration"):
        gate.ratio([1.0, 2.0, 3.0], [1.0, 1.0])
    with pytest.raises(ValueError):
        gate.ratio([], [])


def test_limit_is_the_larger_of_the_relative_and_absolute_tolerance():
    assert RULE.limit(10.0) == pytest.approx(13.0)       # 30% of 10 > 0.25
    assert RULE.limit(0.5) == pytest.approx(0.75)        # 30% of 0.5 < 0.25
    rule = gate.Rule(rel_tol=0.1, abs_tol=2.0)
    assert rule.limit(10.0) == pytest.approx(12.0)


def test_a_2x_slowdown_fails(rng):
    base = rng.uniform(2, 60)
    verdict = gate.judge("slow", measured(rng, 2 * base), base, lambda: measured(rng, 2 * base))
    assert verdict.regressed and verdict.status == "regression"
    assert len(verdict.rechecks) == RULE.rechecks
    assert 0.8 < verdict.ratio / base - 1 < 1.2                          # about +100%
    assert verdict.message().startswith(f"slow: {verdict.ratio:.3f} vs baseline {base:.3f} ")
    assert f"({verdict.ratio / base - 1:+.1%}; limit " in verdict.message()
    assert verdict.message().endswith(": regression")


def test_noise_within_the_tolerance_passes_without_a_recheck(rng):
    for _ in range(200):
        base = rng.uniform(2, 60)
        now = base * rng.uniform(0.9, 1.1)                   # a real change of up to 10%
        verdict = gate.judge("noisy", measured(rng, now, noise=0.1), base, never)
        assert not verdict.regressed and verdict.status == "ok" and verdict.rechecks == ()


def test_a_single_outlier_is_cleared_by_the_recheck(rng):
    base = rng.uniform(2, 60)
    outlier = base * rng.uniform(1.5, 3)
    verdict = gate.judge("outlier", outlier, base, lambda: measured(rng, base))
    assert not verdict.regressed and verdict.status == "cleared by re-check"
    assert len(verdict.rechecks) == RULE.rechecks
    assert all(r <= verdict.limit for r in verdict.rechecks)


@pytest.mark.parametrize("slow_rechecks, regressed", [(0, False), (1, False), (2, True),
                                                      (3, True)])
def test_the_median_of_the_rechecks_confirms(rng, slow_rechecks, regressed):
    base = rng.uniform(2, 60)
    results = [2 * base] * slow_rechecks + [base] * (RULE.rechecks - slow_rechecks)
    rng.shuffle(results)
    verdict = gate.judge("x", 2 * base, base, iter(results).__next__)
    assert verdict.regressed is regressed
    assert verdict.rechecks == tuple(results)


def test_without_a_baseline_nothing_is_judged(rng):
    verdict = gate.judge("new", measured(rng, 5.0), None, never)
    assert verdict.status == "no baseline" and not verdict.regressed
    assert "no baseline" in verdict.message()


#################################################################################
#                               Exact diff                                      #
#################################################################################

PTDIT_XL, DIT_XL = exact.Case("PT-DiT/XL", 1024), exact.Case("DiT-XL/2", 256)


def test_equal_tables_have_no_diff():
    table = exact.table([PTDIT_XL, DIT_XL, exact.Case("PT-DiT/H", 512, 48)])
    assert gate.diff(table, json.loads(json.dumps(table))) == []


def test_a_changed_mlp_width_names_model_size_and_category(rng):
    baseline = exact.table([PTDIT_XL, DIT_XL])
    mlp_ratio = rng.choice([2.0, 3.0, 4.5, 5.0, 6.0])
    changed = Workload("PT-DiT/XL", 1024, overrides={"mlp_ratio": mlp_ratio})
    current = {**baseline, PTDIT_XL.key: exact.closed_form(changed)}
    lines = gate.diff(baseline, current)

    old = complexity.macs(PTDIT_XL.workload())["linear_mlp"]
    new = complexity.macs(changed)["linear_mlp"]
    assert new != old
    expected = (f"PT-DiT/XL @1024px: linear_mlp_gmacs {old / 1e9:.1f} -> {new / 1e9:.1f} "
                f"({100 * (new / old - 1):+.1f}%)")
    assert expected in lines
    assert all(line.startswith("PT-DiT/XL @1024px: ") for line in lines)    # DiT did not move
    labels = {line.split(": ")[1].split()[0] for line in lines}
    assert labels == {"linear_mlp_gmacs", "params_m", "params_trainable_m"}


def test_the_model_built_with_another_mlp_width_moves_the_counted_table(rng):
    case = exact.Case("PT-DiT/S-Class", 256, overrides=(("depth", 1),))
    mlp_ratio = rng.choice([2.0, 3.0, 5.0])
    model = ptdit.build(case.model, device="meta", depth=1, mlp_ratio=mlp_ratio)
    wider = Workload(model.config, 256)
    lines = gate.diff({case.key: exact.counted(case.workload())},
                      {case.key: exact.counted(wider)})
    assert any(line.startswith("PT-DiT/S-Class @256px (depth=1): linear_mlp_gmacs ")
               for line in lines)


def test_a_change_below_the_display_precision_still_shows(rng):
    """One MAC more in trillions: shown with the fewest decimals of GMACs that tell the two
    apart (9, or 8 where the 9th decimal's rounding already differs, as for 1763117444695)."""
    for old in [rng.randrange(10**12, 10**13) for _ in range(50)] + [1763117444695]:
        lines = gate.diff({"m @256px": {"linear_io_macs": old}},
                          {"m @256px": {"linear_io_macs": old + 1}})
        assert len(lines) == 1
        shown = lines[0].split("linear_io_gmacs ")[1].split(" (")[0].split(" -> ")
        decimals = len(shown[0].split(".")[1])
        assert shown == [f"{old / 1e9:.{decimals}f}", f"{(old + 1) / 1e9:.{decimals}f}"]
        assert shown[0] != shown[1] and decimals in (8, 9)
        assert f"{old / 1e9:.{decimals - 1}f}" == f"{(old + 1) / 1e9:.{decimals - 1}f}"


def test_diff_of_cases_added_removed_and_plain_fields():
    lines = gate.diff({"a @256px": {"window": "1x2x2", "attn_window_macs": 0},
                       "gone @512px": {"tokens": 1}},
                      {"a @256px": {"window": "1x4x4", "attn_window_macs": 5 * 10**9},
                       "new @1024px": {"tokens": 2}})
    assert lines == ["a @256px: window 1x2x2 -> 1x4x4",
                     "a @256px: attn_window_gmacs 0.0 -> 5.0 (was 0)",
                     "gone @512px: in the baseline, no longer counted",
                     "new @1024px: new case, not in the baseline"]


def test_reference_cases_cover_every_named_model_once_per_size():
    keys = [case.key for case in exact.BASELINE_CASES]
    assert len(keys) == len(set(keys)) == len(exact.BASELINE_CASES)
    assert set(exact.CASES) | set(exact.COUNTED) == set(exact.BASELINE_CASES)
    assert {case.model for case in exact.CASES} == set(ptdit.list_models())
    assert exact.Case("PT-DiT/H", 512, 48).key == "PT-DiT/H @512px, 48 latent frames"
    assert exact.Case("PixArt-XL/2", 256, overrides=(("depth", 2),)).key == \
        "PixArt-XL/2 @256px (depth=2)"


#################################################################################
#                      Baseline files and the gate's inputs                     #
#################################################################################

def test_write_json_is_atomic(tmp_path, rng):
    path = tmp_path / "baselines" / "b.json"
    data = {"cases": {"x": rng.randrange(10**15)}}
    gate.write_json(path, data)
    assert gate.read_json(path) == data
    assert path.stat().st_mode & 0o777 == 0o644
    with pytest.raises(ValueError):
        gate.write_json(path, {"cases": {"x": float("nan")}})   # fails halfway through
    assert gate.read_json(path) == data                          # the old file is intact
    assert [p.name for p in path.parent.iterdir()] == ["b.json"]  # no temporary left
    assert gate.read_json(tmp_path / "missing.json") is None


def test_injected_slowdown_is_parsed_and_checked(monkeypatch):
    monkeypatch.delenv(speed.INJECT_ENV, raising=False)
    assert speed.injected() == {}
    monkeypatch.setenv(speed.INJECT_ENV, "ptdit_forward:2, closed_form:3")
    assert speed.injected() == {"ptdit_forward": 2, "closed_form": 3}
    for bad in ("ptdit:2", "ptdit_forward:1.5", "ptdit_forward", "closed_form:0"):
        monkeypatch.setenv(speed.INJECT_ENV, bad)
        with pytest.raises(ValueError, match="name:factor"):
            speed.injected()


def test_an_injected_slowdown_runs_the_benchmark_factor_times(monkeypatch, rng):
    calls = []
    monkeypatch.setattr(complexity, "closed_form", lambda work: calls.append(work))
    factor = rng.randrange(2, 5)
    speed.build("closed_form", torch.device("cpu"), slowdown=factor).run()
    assert len(calls) == factor * len(ptdit.list_models())


def test_bench_environment_is_checked(monkeypatch):
    monkeypatch.setenv(speed.DEVICE_ENV, "tpu")
    with pytest.raises(ValueError, match="allowed: cpu, cuda"):
        speed.device()
    monkeypatch.setenv(speed.THREADS_ENV, "0")
    with pytest.raises(ValueError, match="positive integer"):
        speed.threads()
    with pytest.raises(ValueError, match="unknown benchmark"):
        speed.build("nope", torch.device("cpu"))
