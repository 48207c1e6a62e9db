"""finite_flag / all_finite: the same answer as torch.isfinite(t).all() for every dtype and bad value."""

from __future__ import annotations

import pytest
import torch

from ngd_dist.kfac.finite import all_finite, finite_flag

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("bad", [None, float("nan"), float("inf"), float("-inf")], ids=str)
def test_agrees_with_isfinite(dtype: torch.dtype, bad: float | None) -> None:
    tensors = [torch.randn(7, 5).to(dtype), torch.randn(300).to(dtype)]
    if bad is not None:
        tensors[1][123] = bad
    want = all(bool(torch.isfinite(t).all()) for t in tensors)
    assert all_finite(tensors) is want
    flag = finite_flag(tensors)
    assert flag.dtype == torch.bool
    assert flag.dim() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_the_largest_finite_values_do_not_overflow_into_a_false_alarm(dtype: torch.dtype) -> None:
    big = torch.full((100_000,), torch.finfo(dtype).max, dtype=dtype)
    assert not bool(torch.isfinite(big.sum()))  # a plain sum overflows
    assert all_finite([big, -big])  # all_finite's float32 sums overflow too: decided exactly then
    assert bool(finite_flag([big, -big]))
    assert not all_finite([big, torch.tensor([float("nan")], dtype=dtype)])


def test_float64_near_its_limit_and_mixed_inputs() -> None:
    big = torch.full((4,), torch.finfo(torch.float64).max, dtype=torch.float64)
    assert all_finite([big])  # its sum would overflow: checked element-wise instead
    assert all_finite([torch.arange(5), torch.ones(3)])
    assert not all_finite([torch.arange(5), torch.tensor([1.0, float("nan")])])
    assert all_finite([])
    assert all_finite([torch.empty(0), torch.tensor(2.0), torch.empty(0, 3, dtype=torch.bfloat16)])
    assert not all_finite([torch.empty(0), torch.tensor(float("nan"))])
    assert not bool(finite_flag([torch.tensor(float("-inf"), dtype=torch.float16), torch.ones(2)]))
    assert all_finite([torch.ones(3, dtype=torch.complex64)])
    assert not all_finite([torch.tensor([complex(1, float("inf"))])])
