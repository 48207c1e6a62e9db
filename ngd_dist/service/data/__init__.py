"""Datasets embedded in the package, so that the quickstart needs no download."""

from ngd_dist.service.data.digits import load_digits

__all__ = ["load_digits"]
