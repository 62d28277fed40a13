"""Attention-map analysis and quality metrics (DESIGN.md); empty until those issues land."""
