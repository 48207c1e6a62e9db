"""The phase clock: nested phases counted once, totals and take(), on a fake time source."""

from __future__ import annotations

import itertools
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngd_dist import KFACConfig, KFACPreconditioner
from ngd_dist.kfac.timing import PhaseClock
from tests.support import FakeClock

PRECONDITIONER_PHASES = {
    "gradient_communication",
    "factor_computation",
    "factor_communication",
    "decomposition",
    "preconditioning",
}




def test_time_in_a_nested_phase_counts_in_that_phase_only() -> None:
    time = FakeClock()
    clock = PhaseClock(now=time)
    with clock("step"):
        time.advance(1)
        with clock("backward"):
            time.advance(2)
            with clock("factor_computation"):
                time.advance(4)
            time.advance(8)
        time.advance(16)
    assert clock.totals == {"step": 17.0, "backward": 10.0, "factor_computation": 4.0}
    assert sum(clock.totals.values()) == time.now


@pytest.mark.parametrize("synchronised", [False, True])
def test_sync_charges_queued_device_work_to_the_phase_that_queued_it(synchronised: bool) -> None:
    """Asynchronous device work: without ``sync`` it lands in the later phase that waits for it
    (here the optimizer's read of a result); with ``sync`` in the phase that queued it."""
    time, queued = FakeClock(), [0.0]

    def wait_for_device() -> None:
        time.advance(queued[0])
        queued[0] = 0.0

    clock = PhaseClock(now=time, sync=wait_for_device if synchronised else None)
    with clock("forward"):
        time.advance(1)
        queued[0] += 5  # kernels launched, not yet run
    with clock("optimizer"):
        wait_for_device()  # e.g. loss.item()
        time.advance(2)
    want = {"forward": 6.0, "optimizer": 2.0} if synchronised else {"forward": 1.0, "optimizer": 7.0}
    assert clock.totals == want


def test_take_returns_the_seconds_since_the_last_take_and_totals_keep_adding_up() -> None:
    time = FakeClock()
    clock = PhaseClock(now=time)
    for _ in range(2):  # two micro-batches: a phase entered twice adds up
        with clock("forward"):
            time.advance(1)
    with clock("decomposition"):
        time.advance(4)
    assert clock.take() == {"forward": 2.0, "decomposition": 4.0}
    with clock("forward"):
        time.advance(8)
    # a phase seen before but skipped in this step reports no time
    assert clock.take() == {"forward": 8.0, "decomposition": 0.0}
    assert clock.take() == {"forward": 0.0, "decomposition": 0.0}
    assert clock.totals == {"forward": 10.0, "decomposition": 4.0}
    clock.totals.clear()  # resetting the totals leaves take() alone
    with clock("forward"):
        time.advance(16)
    assert clock.take() == {"forward": 16.0, "decomposition": 0.0}
    assert clock.totals == {"forward": 16.0}


def test_a_phase_that_raises_is_still_counted_and_closed() -> None:
    time = FakeClock()
    clock = PhaseClock(now=time)

    def overflow() -> None:
        with clock("backward"):
            time.advance(1)
            raise RuntimeError("overflow")

    with pytest.raises(RuntimeError, match="overflow"):
        overflow()
    with clock("optimizer"):  # not nested in the failed phase
        time.advance(2)
    assert clock.take() == {"backward": 1.0, "optimizer": 2.0}


def test_a_shared_clock_counts_the_statistics_computed_in_forward_and_backward_once(
    tanh_mlp: Callable[..., nn.Module],
) -> None:
    ticks = itertools.count()
    clock = PhaseClock(now=lambda: float(next(ticks)))  # every reading one second later
    model = tanh_mlp(6, 8, 8, 3, seed=0)
    precond = KFACPreconditioner(model, KFACConfig(curvature="ef", kl_clip=None), clock=clock)
    x, y = torch.randn(5, 6), torch.randint(3, (5,))
    with clock("step"):
        with clock("forward"):
            loss = F.cross_entropy(model(x), y)
        with clock("backward"):
            loss.backward()
        precond.step()
    elapsed = next(ticks) - 1  # the step phase opened at reading 0 and closed at the one before this
    phases = clock.take()
    assert set(phases) == {"step", "forward", "backward", *PRECONDITIONER_PHASES}
    # three layers: one A statistic each in forward and one G statistic each in backward, one second each
    assert phases["factor_computation"] == 6.0
    assert sum(phases.values()) == elapsed
    assert precond.timings["factor_computation"] == 6.0  # the totals, as library users read them


def test_the_preconditioner_times_its_phases_on_its_own_clock_by_default(tanh_mlp: Callable[..., nn.Module]) -> None:
    model = tanh_mlp(6, 8, 8, 3, seed=0)
    precond = KFACPreconditioner(model, KFACConfig(curvature="ef", kl_clip=None))
    F.cross_entropy(model(torch.randn(5, 6)), torch.randint(3, (5,))).backward()
    precond.step()
    assert set(precond.timings) == PRECONDITIONER_PHASES
    assert all(seconds >= 0 for seconds in precond.timings.values())
    precond.timings.clear()
    assert precond.clock.totals == {}
