"""Test-wide settings and the small models and data several test modules build.

One torch thread: the tensors are tiny, threads only add overhead (and contend on a busy machine).
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import pairwise

import pytest
import torch
from torch import Tensor, nn

torch.set_num_threads(1)


def _tanh_mlp(*widths: int, seed: int | None = None, dtype: torch.dtype = torch.float32) -> nn.Sequential:
    if len(widths) < 2:
        raise ValueError(f"widths: got {widths}; expected at least an input and an output width")
    if seed is not None:
        torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(pairwise(widths)):
        if i:
            layers.append(nn.Tanh())
        layers.append(nn.Linear(fan_in, fan_out))
    return nn.Sequential(*layers).to(dtype)


def _classification_batch(
    rows: int, features: int, classes: int, *, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    return torch.randn(rows, features, dtype=dtype), torch.randint(0, classes, (rows,))


@pytest.fixture
def tanh_mlp() -> Callable[..., nn.Sequential]:
    """``tanh_mlp(4, 8, 3, seed=0, dtype=...)``: Linear(4, 8), Tanh, Linear(8, 3) (modules "0", "2").

    Seeded with ``torch.manual_seed(seed)`` first when ``seed`` is given; else it draws from the
    global generator where it stands.
    """
    return _tanh_mlp


@pytest.fixture
def classification_batch() -> Callable[..., tuple[Tensor, Tensor]]:
    """``classification_batch(rows, features, classes, dtype=...)``: standard normal inputs and uniform
    labels, drawn from the global generator (inputs first)."""
    return _classification_batch
