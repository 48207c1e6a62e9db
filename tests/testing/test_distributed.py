"""The multi-rank test helpers: a failing rank's traceback, ``all_ranks``, and what ``distributed_test``
hands to pytest."""

from __future__ import annotations

import inspect

import pytest

from ngd_dist.testing.distributed import all_ranks, distributed_test, run_ranks


def _gather_then_fail_on_rank_1(rank: int, world_size: int) -> int:
    gathered = all_ranks(10 * rank)
    assert gathered == [0, 10], gathered
    if rank == 1:
        raise ValueError("rank 1 gives up")
    return rank


def test_a_failing_rank_fails_the_caller_with_its_traceback() -> None:
    with pytest.raises(AssertionError, match=r"(?s)^rank 1:\n.*_gather_then_fail_on_rank_1.*ValueError: rank 1 gives up"):
        run_ranks(_gather_then_fail_on_rank_1, 2, timeout=60)


def _body(rank: int, world_size: int, comm_dtype: str, tmp_path: object) -> None:
    """A body for the decorator (not collected: not named test_*)."""


def test_one_test_per_world_size_taking_the_body_s_own_arguments() -> None:
    wrapped = distributed_test(world_sizes=(2, 3), timeout=5)(_body)
    assert list(inspect.signature(wrapped).parameters) == ["world_size", "comm_dtype", "tmp_path"]
    (mark,) = wrapped.pytestmark  # type: ignore[attr-defined]
    assert mark.name == "parametrize"
    assert mark.args == ("world_size", (2, 3))
    assert mark.kwargs["ids"] == ["world_size=2", "world_size=3"]
    assert wrapped.__name__ == "_body"


def _no_rank(world_size: int, rank: int) -> None:
    """Parameters in the wrong order."""


@pytest.mark.parametrize(
    ("sizes", "body", "error", "message"),
    [
        ((), _body, ValueError, r"world_sizes: got \(\); expected a non-empty sequence of integers >= 1"),
        ((2, 0), _body, ValueError, r"world_sizes: got \(2, 0\)"),
        ((True,), _body, ValueError, r"world_sizes: got \(True,\)"),
        ((2,), _no_rank, TypeError, r"_no_rank: a distributed test's first two parameters must be \(rank, world_size\)"),
        ((2,), lambda rank, world_size: None, TypeError, "must be a module-level function"),
    ],
    ids=["empty", "zero", "bool", "order", "lambda"],
)
def test_bad_use_is_refused_at_collection(sizes: tuple, body: object, error: type, message: str) -> None:
    with pytest.raises(error, match=message):
        distributed_test(world_sizes=sizes)(body)  # type: ignore[arg-type]
