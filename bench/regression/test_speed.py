"""Speed regressions (pytest-benchmark): every benchmark of speed.py, timed in rounds interleaved
with the calibration kernel, as a ratio to it, judged against baselines/speed-<device>.json by
gate.py's rule (re-checked before it fails). `make bench` reports and saves the history under
.benchmarks/, `make bench-compare` gates (--speed-gate), `make baseline` records
(--update-baseline: the median of BASELINE_REPEATS measurements)."""

import statistics

import pytest

from bench.regression import gate, speed

BASELINE_REPEATS = 5


@pytest.mark.parametrize("name", [
    pytest.param(name, marks=pytest.mark.benchmark(group="speed-gate", timer=speed.clock(name)))
    for name in speed.NAMES])
def test_speed(name, benchmark, speed_session):
    session, rule = speed_session, gate.RULE
    if benchmark.disabled:
        pytest.skip("pytest-benchmark is disabled (--benchmark-disable)")
    bench = speed.build(name, session.device, session.slowdown.get(name, 1))
    calibrate = speed.calibration(bench.device)
    calibration = []
    benchmark.pedantic(bench.run, setup=lambda: calibration.append(calibrate()),
                       rounds=rule.rounds, warmup_rounds=rule.warmup)
    calibration = calibration[rule.warmup:]                 # setup runs before warmup rounds too
    first = gate.ratio(benchmark.stats.stats.data, calibration)

    def measure() -> float:
        return gate.ratio(*speed.interleaved(bench, calibrate, rule.rounds, rule.warmup))

    benchmark.extra_info.update(session.machine, benchmark_device=str(bench.device),
                                calibration_s=calibration, slowdown=session.slowdown.get(name, 1))
    if session.update:
        ratios = [first] + [measure() for _ in range(BASELINE_REPEATS - 1)]
        session.ratios[name] = statistics.median(ratios)
        benchmark.extra_info.update(baseline_ratios=ratios)
        return
    verdict = gate.judge(name, first, session.baseline_ratio(name), measure, rule)
    session.verdicts.append(verdict)
    benchmark.extra_info.update(verdict.as_dict())
    if session.gating and verdict.baseline is None:
        pytest.fail(f"{name}: no baseline in {session.path}; record one with `make baseline` "
                    "on this machine class", pytrace=False)
    if session.gating and verdict.regressed:
        pytest.fail(f"confirmed speed regression: {verdict.message()}", pytrace=False)
