"""The handwritten digits dataset (1,797 8x8 images, 10 classes), read from the package."""

from __future__ import annotations

import gzip
from importlib import resources

import torch
from torch import Tensor


def load_digits(*, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """Return ``(images, labels)``: images ``(1797, 1, 8, 8)`` scaled to [0, 1], labels int64."""
    raw = resources.files("ngd_dist.service.data").joinpath("digits.csv.gz").read_bytes()
    rows = [line.split(",") for line in gzip.decompress(raw).decode().split() if line]
    values = torch.tensor([[float(v) for v in row] for row in rows], dtype=torch.float64)
    images = (values[:, :64] / 16.0).to(dtype).reshape(-1, 1, 8, 8)
    return images, values[:, 64].long()
