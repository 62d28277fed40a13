"""Measurement on top of ptdit: FLOP counters, reports, the papers' complexity figures."""
