"""Helpers for tests and benchmarks of multi-rank code on one machine (not used by the library)."""
