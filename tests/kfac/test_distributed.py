"""Data-parallel equivalence on 2-4 gloo ranks, ownership counts, packed bytes, failures.

Each test body runs on every rank (``distributed_test``); the reference is the same run in one
process on the whole batch (tests/kfac/scenarios.py). On one rank the preconditioner skips every
collective and is that reference itself, so the equivalence starts at two ranks.
"""

from __future__ import annotations

import math

import pytest

from ngd_dist.testing.distributed import all_ranks, distributed_test
from tests.kfac.scenarios import SCENARIOS, STEPS, rel_diff, train


@distributed_test(world_sizes=(2, 3, 4), timeout=240)
def test_each_rank_with_a_share_of_the_batch_matches_one_process_on_all_of_it(rank: int, world_size: int) -> None:
    for scenario in SCENARIOS:
        reference, _ = train(scenario, rank, world_size, distributed=False)
        params, pc = train(scenario, rank, world_size, distributed=True)
        diff = rel_diff(params, reference)
        assert diff < 2e-5, (scenario, diff)
        # every (layer, factor) decomposition was computed by exactly one rank per refresh
        total: dict[tuple[str, str], int] = {}
        for counts in all_ranks(dict(pc.decomposed)):
            for key, count in counts.items():
                assert key not in total, f"{key} decomposed on two ranks ({scenario})"
                total[key] = count
        assert len(total) == 6, scenario  # 3 layers x (A, G)
        if scenario["refresh"] == "fixed":
            assert set(total.values()) == {math.ceil(STEPS / 2)}, (scenario, total)
        # adaptive decisions are identical on every rank
        intervals = all_ranks(pc.intervals())
        assert intervals == [pc.intervals()] * world_size, (scenario, intervals)


@pytest.mark.parametrize(("comm_dtype", "width"), [("float32", 4), ("bfloat16", 2)])
@distributed_test(world_sizes=(2,))
def test_factors_travel_as_packed_triangles(rank: int, world_size: int, comm_dtype: str, width: int) -> None:
    scenario = {
        "placement": "memory", "ddp": True, "refresh": "fixed", "curvature": "ef", "assignment": "round_robin",
        "comm_dtype": comm_dtype,
    }  # fmt: skip
    _, pc = train(scenario, rank, world_size, distributed=True)
    sides = [1 * 9 + 1, 3, 48 + 1, 10, 10 + 1, 5]  # A, G of conv, fc1, fc2
    packed = sum(n * (n + 1) // 2 for n in sides)
    # each factor step: one reduce per owner rank; every rank sends every factor once
    assert pc.comm_bytes["factors"] == STEPS * packed * width, (pc.comm_bytes, STEPS * packed * width)
    assert pc.collectives.calls["factors"] == STEPS * 2, pc.collectives.calls
    assert "gradients" not in pc.comm_bytes, pc.comm_bytes  # DDP averaged the gradients
    unpacked = sum(n * n for n in sides)
    assert packed / unpacked <= 0.55


@distributed_test(world_sizes=(3,))
def test_a_non_finite_factor_on_one_rank_is_rejected_on_all_without_hanging(rank: int, world_size: int) -> None:
    scenario = {
        "placement": "communication", "ddp": False, "refresh": "fixed", "curvature": "ief", "assignment": "round_robin",
    }  # fmt: skip
    _, pc = train(scenario, rank, world_size, distributed=True, overflow_on_rank=1)
    mine = {"rejected": pc.stats.nonfinite_rejected, "refreshes": pc.stats.factor_refreshes}
    everyone = all_ranks(mine)
    assert everyone == [mine] * world_size, everyone
    assert mine["rejected"] > 0, mine


@distributed_test(world_sizes=(2,))
def test_bf16_autocast_with_grad_scaler_on_two_ranks(rank: int, world_size: int) -> None:
    """Statistics under bf16 autocast accumulate in float32; the scaled run matches one process
    up to bf16 rounding of the forward pass."""
    scenario = {
        "placement": "memory", "ddp": True, "refresh": "fixed", "curvature": "ief", "assignment": "greedy", "amp": True,
    }  # fmt: skip
    reference, _ = train(scenario, rank, world_size, distributed=False)
    full_precision, _ = train({**scenario, "amp": False}, rank, world_size, distributed=False)
    params, pc = train(scenario, rank, world_size, distributed=True)
    # each factor's running statistics live on its owner rank (memory placement): all six, in float32
    held = {
        (layer.name, f): str(layer.factors[f].running.dtype)
        for layer in pc.layers
        for f in ("a", "g")
        if layer.factors[f].running is not None
    }
    everywhere = {key: dtype for mine in all_ranks(held) for key, dtype in mine.items()}
    assert everywhere == {(layer.name, f): "torch.float32" for layer in pc.layers for f in ("a", "g")}, everywhere
    assert pc.stats.nonfinite_rejected == 0, pc.stats
    # splitting the batch changes bf16 rounding about as much as bf16 itself does
    diff, rounding = rel_diff(params, reference), rel_diff(full_precision, reference)
    assert diff < 2 * rounding, (diff, rounding)
    assert diff < 0.1, diff
