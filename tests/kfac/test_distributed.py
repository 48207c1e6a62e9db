"""Data-parallel equivalence on 2-4 gloo ranks, ownership counts, packed bytes, failures.

The reference is the same run in one process on the whole batch (tests/kfac/scenarios.py). On one
rank the preconditioner skips every collective and is that reference itself, so the equivalence
starts at two ranks.

Starting gloo ranks costs seconds (a process and a torch import each), so there is one start per world
size: :func:`_on_every_rank` runs every check of that size on its ranks and returns what each rank saw;
the tests assert on those values here, in the pytest process (the module-scoped :func:`ranks`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from ngd_dist.kfac.refresh import FixedSchedule
from ngd_dist.testing.distributed import all_ranks, run_ranks
from tests.kfac.scenarios import SCENARIOS, STEPS, rel_diff, train

PACKED = {"float32": 4, "bfloat16": 2}
"""Factor communication dtypes and their bytes per value."""


def _equivalence(rank: int, world_size: int) -> list[dict[str, Any]]:
    """Each scenario's distributed run on this rank against the one-process reference.

    The reference does not depend on the rank: rank r computes those of the scenarios r, r + W, ...
    and every rank gets them all (a third to a quarter of the work of each rank computing each).
    """
    mine = {i: train(s, rank, world_size, distributed=False)[0] for i, s in enumerate(SCENARIOS) if i % world_size == rank}
    references = {i: params for part in all_ranks(mine) for i, params in part.items()}
    seen = []
    for i, scenario in enumerate(SCENARIOS):
        params, pc = train(scenario, rank, world_size, distributed=True)
        seen.append(
            {"diff": rel_diff(params, references[i]), "decomposed": dict(pc.decomposed), "intervals": pc.intervals()}
        )
    return seen


def _packed(rank: int, world_size: int, comm_dtype: str) -> dict[str, Any]:
    scenario = {
        "placement": "memory", "ddp": True, "refresh": "fixed", "curvature": "ef", "assignment": "round_robin",
        "comm_dtype": comm_dtype,
    }  # fmt: skip
    _, pc = train(scenario, rank, world_size, distributed=True)
    return {"comm_bytes": dict(pc.comm_bytes), "calls": dict(pc.collectives.calls)}


def _nonfinite(rank: int, world_size: int) -> dict[str, int]:
    scenario = {
        "placement": "communication", "ddp": False, "refresh": "fixed", "curvature": "ief", "assignment": "round_robin",
    }  # fmt: skip
    _, pc = train(scenario, rank, world_size, distributed=True, overflow_on_rank=1)
    return {"rejected": pc.stats.nonfinite_rejected, "refreshes": pc.stats.factor_refreshes}


def _bf16(rank: int, world_size: int) -> dict[str, Any]:
    scenario = {
        "placement": "memory", "ddp": True, "refresh": "fixed", "curvature": "ief", "assignment": "greedy", "amp": True,
    }  # fmt: skip
    reference, _ = train(scenario, rank, world_size, distributed=False)
    full_precision, _ = train({**scenario, "amp": False}, rank, world_size, distributed=False)
    params, pc = train(scenario, rank, world_size, distributed=True)
    held = {
        (layer.name, f): str(layer.factors[f].running.dtype)
        for layer in pc.layers
        for f in ("a", "g")
        if layer.factors[f].running is not None
    }
    return {
        "held": held,
        "layers": [layer.name for layer in pc.layers],
        "rejected": pc.stats.nonfinite_rejected,
        "diff": rel_diff(params, reference),
        "rounding": rel_diff(full_precision, reference),
    }


def _on_every_rank(rank: int, world_size: int) -> dict[str, Any]:
    """Every check of this world size, run on this rank; what it saw, by check (all pickle)."""
    seen: dict[str, Any] = {"equivalence": _equivalence(rank, world_size)}
    if world_size == 2:
        seen["packed"] = {dtype: _packed(rank, world_size, dtype) for dtype in PACKED}
        seen["bf16"] = _bf16(rank, world_size)
    if world_size == 3:
        seen["nonfinite"] = _nonfinite(rank, world_size)
    return seen


@pytest.fixture(scope="module")
def ranks() -> Callable[[int], list[dict[str, Any]]]:
    """``ranks(world_size)``: what each rank saw in :func:`_on_every_rank`, by rank (one start per size;
    a failed start fails every test of that size with the failing rank's traceback)."""
    runs: dict[int, list[dict[str, Any]] | AssertionError] = {}

    def get(world_size: int) -> list[dict[str, Any]]:
        if world_size not in runs:
            try:
                runs[world_size] = run_ranks(_on_every_rank, world_size, timeout=300)
            except AssertionError as err:
                runs[world_size] = err
        run = runs[world_size]
        if isinstance(run, AssertionError):
            raise run
        return run

    return get


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_each_rank_with_a_share_of_the_batch_matches_one_process_on_all_of_it(ranks, world_size: int) -> None:
    by_rank = [seen["equivalence"] for seen in ranks(world_size)]
    for i, scenario in enumerate(SCENARIOS):
        runs = [mine[i] for mine in by_rank]
        for rank, run in enumerate(runs):
            assert run["diff"] < 2e-5, (scenario, rank, run["diff"])
        # every (layer, factor) decomposition was computed by exactly one rank per refresh
        total: dict[tuple[str, str], int] = {}
        for run in runs:
            for key, count in run["decomposed"].items():
                assert key not in total, f"{key} decomposed on two ranks ({scenario})"
                total[key] = count
        assert len(total) == 6, scenario  # 3 layers x (A, G)
        if scenario["refresh"] == "fixed":
            schedule = FixedSchedule(1, 2, warmup=True)  # the scenarios' factor_every / inverse_every
            due = sum(schedule.decompose_due("k", s) for s in range(STEPS))
            assert set(total.values()) == {due}, (scenario, total)
        # adaptive decisions are identical on every rank
        assert [run["intervals"] for run in runs] == [runs[0]["intervals"]] * world_size, scenario


@pytest.mark.parametrize(("comm_dtype", "width"), PACKED.items())
def test_factors_travel_as_packed_triangles(ranks, comm_dtype: str, width: int) -> None:
    sides = [1 * 9 + 1, 3, 48 + 1, 10, 10 + 1, 5]  # A, G of conv, fc1, fc2
    packed = sum(n * (n + 1) // 2 for n in sides)
    for seen in ranks(2):
        got = seen["packed"][comm_dtype]
        # each factor step: one reduce per owner rank; every rank sends every factor once
        assert got["comm_bytes"]["factors"] == STEPS * packed * width, got
        assert got["calls"]["factors"] == STEPS * 2, got
        assert "gradients" not in got["comm_bytes"], got  # DDP averaged the gradients
    unpacked = sum(n * n for n in sides)
    assert packed / unpacked <= 0.55


def test_a_non_finite_factor_on_one_rank_is_rejected_on_all_without_hanging(ranks) -> None:
    everyone = [seen["nonfinite"] for seen in ranks(3)]
    assert everyone == [everyone[0]] * 3, everyone
    assert everyone[0]["rejected"] > 0, everyone


def test_bf16_autocast_with_grad_scaler_on_two_ranks(ranks) -> None:
    """Statistics under bf16 autocast accumulate in float32; the scaled run matches one process
    up to bf16 rounding of the forward pass."""
    by_rank = [seen["bf16"] for seen in ranks(2)]
    # each factor's running statistics live on its owner rank (memory placement): all six, in float32
    everywhere = {key: dtype for mine in by_rank for key, dtype in mine["held"].items()}
    layers = by_rank[0]["layers"]
    assert everywhere == {(layer, f): "torch.float32" for layer in layers for f in ("a", "g")}, everywhere
    for mine in by_rank:
        assert mine["rejected"] == 0, mine
        # splitting the batch changes bf16 rounding about as much as bf16 itself does
        assert mine["diff"] < 2 * mine["rounding"], mine
        assert mine["diff"] < 0.1, mine
