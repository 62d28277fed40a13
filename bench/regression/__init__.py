"""CI regression gates (docs/regression.md): exact parameter and MAC counts against
baselines/exact.json (`test_exact.py`, part of `make test`), and speed against
baselines/speed-<device>.json under a noise-robust rule (`test_speed.py`, `make bench-compare`).
`gate.py` holds the rules, `exact.py` and `speed.py` what is measured."""
