"""Non-finite gradients and failing decompositions: what ``KFACPreconditioner.step()`` tells its caller.

A step whose gradients hold NaN or inf returns False and changes nothing (no statistics folded,
no decomposition, ``.grad`` left alone, the refresh schedule not advanced), on every rank alike;
a factor that keeps failing to decompose raises :class:`DecompositionError` on every rank.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from ngd_dist import DecompositionError, KFACConfig, KFACPreconditioner
from ngd_dist.testing.distributed import all_ranks, distributed_test
from tests.kfac import scenarios

HUGE = 1e20
"""An input scale whose A factors fit in float64 but not in float32 (entries ~1e40)."""


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))


def _batch(i: int, scale: float = 1.0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(32, 8, generator=g) * scale, torch.randint(0, 4, (32,), generator=g)


def _nan_batch(i: int) -> tuple[Tensor, Tensor]:
    x, y = _batch(i)
    x[5] = float("nan")
    return x, y


def _backward(model: nn.Module, x: Tensor, y: Tensor) -> None:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()


def _train(config: KFACConfig, batches: list[tuple[Tensor, Tensor]]) -> tuple[nn.Module, KFACPreconditioner, list[bool]]:
    """SGD + K-FAC over ``batches``, skipping the optimizer step whenever ``step()`` says so."""
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    pc = KFACPreconditioner(model, config, optimizer=opt)
    returned = []
    for x, y in batches:
        _backward(model, x, y)
        returned.append(pc.step())
        if returned[-1]:
            opt.step()
    return model, pc, returned


@pytest.mark.parametrize("curvature", ["ef", "ief"])
@pytest.mark.parametrize("method", ["eigen", "inverse"])
def test_a_nan_batch_makes_step_return_false_and_the_run_continues_as_if_it_never_came(curvature, method) -> None:
    config = KFACConfig(curvature=curvature, method=method, output_module="2", factor_every=1, inverse_every=2)
    clean = [_batch(i) for i in range(5)]
    model, pc, returned = _train(config, clean)
    poisoned_model, poisoned, poisoned_returned = _train(config, [*clean[:3], _nan_batch(9), *clean[3:]])

    assert returned == [True] * 5
    assert poisoned_returned == [True, True, True, False, True, True]
    assert poisoned.stats.skipped_steps == 1
    assert poisoned.stats.nonfinite_rejected == 0  # nothing reached the factors to be rejected
    assert poisoned.stats.steps == pc.stats.steps == 5  # the schedule did not count the skipped step
    assert poisoned.stats.factor_refreshes == pc.stats.factor_refreshes
    assert poisoned.stats.decompositions == pc.stats.decompositions
    for got, want in zip(poisoned_model.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_on_a_nan_step_nothing_is_folded_decomposed_or_preconditioned() -> None:
    model = _model()
    pc = KFACPreconditioner(model, KFACConfig(output_module="2", factor_every=1, inverse_every=1, kl_clip=None))
    for i in range(2):
        _backward(model, *_batch(i))
        assert pc.step()
    factors = {(la.name, f): la.factors[f].running.clone() for la in pc.layers for f in ("a", "g")}
    decompositions = {(la.name, f): la.factors[f].decomposition for la in pc.layers for f in ("a", "g")}
    _backward(model, *_nan_batch(2))
    raw = [p.grad.clone() for p in model.parameters()]
    assert pc.step() is False
    for la in pc.layers:
        for f in ("a", "g"):
            torch.testing.assert_close(la.factors[f].running, factors[la.name, f], rtol=0, atol=0)
            assert la.factors[f].decomposition is decompositions[la.name, f]
            assert la.factors[f].pending.total is None
    for p, before in zip(model.parameters(), raw, strict=True):  # .grad is the raw gradient, untouched
        torch.testing.assert_close(p.grad, before, rtol=0, atol=0, equal_nan=True)
    assert pc.grad_norm() != pc.grad_norm()  # NaN: the gradient norm of this step is not a number


def test_discard_step_drops_the_statistics_of_a_step_the_caller_skips() -> None:
    """A loop that skips a step for its own reason (a non-finite loss elsewhere) discards it instead."""
    config = KFACConfig(output_module="2", factor_every=1, inverse_every=2)
    clean = [_batch(i) for i in range(4)]
    model, pc, _ = _train(config, clean)

    skipping = _model()
    opt = torch.optim.SGD(skipping.parameters(), lr=0.1, momentum=0.9)
    other = KFACPreconditioner(skipping, config, optimizer=opt)
    for i, (x, y) in enumerate([*clean[:2], _batch(7), *clean[2:]]):
        _backward(skipping, x, y)
        if i == 2:
            other.discard_step()
            continue
        assert other.step()
        opt.step()
    assert other.stats.steps == pc.stats.steps
    for got, want in zip(skipping.parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_a_grad_scaler_overflow_returns_false() -> None:
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    pc = KFACPreconditioner(model, KFACConfig(output_module="2"), optimizer=opt, grad_scaler=scaler)
    returned = []
    for x, y in [_batch(0), (_batch(1)[0].index_fill(1, torch.tensor([0]), float("inf")), _batch(1)[1])]:
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        returned.append(pc.step())
        scaler.step(opt)
        scaler.update()
    assert returned == [True, False]
    assert pc.stats.skipped_steps == 1
    assert pc.stats.steps == 1


def _poisoned_run(rank: int, world_size: int, ddp: bool, poison_rank: int | None) -> tuple[list[Tensor], list[bool], int]:
    """``scenarios.STEPS`` steps on this rank's share; with ``poison_rank``, that rank's share of an
    extra batch, inserted after step 2, holds a NaN."""
    net: nn.Module = scenarios.model()
    head = "5"
    if ddp:
        net, head = DistributedDataParallel(net), "module.5"
    scenario = {"placement": "hybrid", "ddp": ddp, "refresh": "fixed", "curvature": "ief", "assignment": "greedy"}
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    pc = KFACPreconditioner(net, scenarios.config(scenario, head), optimizer=opt)
    share = scenarios.BATCH // world_size
    order = [0, 1, 2, None, 3, 4] if poison_rank is not None else list(range(scenarios.STEPS))
    returned = []
    for step in order:
        x, y = scenarios.batch(99 if step is None else step)
        x, y = x[rank * share : (rank + 1) * share].clone(), y[rank * share : (rank + 1) * share]
        if step is None and rank == poison_rank:
            x[0, 0, 0, 0] = float("nan")
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward()
        returned.append(pc.step())
        if returned[-1]:
            opt.step()
    return [p.detach().clone() for p in net.parameters()], returned, pc.stats.skipped_steps


@pytest.mark.parametrize("ddp", [False, True])
@distributed_test(world_sizes=(2,))
def test_a_nan_on_one_rank_makes_every_rank_skip_the_same_step(rank: int, world_size: int, ddp: bool) -> None:
    clean, _, _ = _poisoned_run(rank, world_size, ddp, None)
    params, returned, skipped = _poisoned_run(rank, world_size, ddp, poison_rank=1)
    assert all_ranks(returned) == [[True, True, True, False, True, True]] * world_size, all_ranks(returned)
    assert all_ranks(skipped) == [1] * world_size
    for got, want in zip(params, clean, strict=True):
        assert torch.equal(got, want), f"rank {rank}: the skipped step changed the run"


# -- decompositions that keep failing -------------------------------------------------------------


def _decompose_until_raised(config: KFACConfig, scales: list[float]) -> tuple[KFACPreconditioner, int | None, str]:
    """Call step() on batches of the given input scales (no optimizer step); the call that raised."""
    model = _model()
    pc = KFACPreconditioner(model, config)
    for i, scale in enumerate(scales):
        _backward(model, *_batch(i, scale))
        try:
            assert pc.step()
        except DecompositionError as exc:
            return pc, i, str(exc)
    return pc, None, ""


HUGE_FACTORS = {
    "method": "eigen",
    "output_module": "2",
    "curvature": "ef",
    "factor_dtype": "float64",
    "factor_decay": 0.0,
    "kl_clip": None,
    "factor_every": 1,
    "inverse_every": 1,
}
"""Statistics in float64, decompositions in float32: inputs of HUGE give A factors float32 cannot hold."""


def test_consecutive_failed_decompositions_raise_one_line_naming_the_factor_and_the_remedy() -> None:
    config = KFACConfig(**HUGE_FACTORS, max_failed_decompositions=3)
    pc, raised_at, message = _decompose_until_raised(config, [HUGE] * 6)
    # steps 0, 1, 2 fail; every rank learns of it with the next step's statistics
    assert raised_at == 3, (raised_at, pc.stats)
    assert pc.stats.decomposition_failures >= 3
    assert "\n" not in message
    assert "layer '0'" in message
    assert "factor A" in message
    assert "3 times in a row" in message
    assert "KFACConfig.damping" in message
    assert "KFACConfig.inverse_dtype=float64" in message


def test_the_remedy_float64_decompositions_succeed() -> None:
    config = KFACConfig(**HUGE_FACTORS, inverse_dtype="float64")
    pc, raised_at, _ = _decompose_until_raised(config, [HUGE] * 6)
    assert raised_at is None
    assert pc.stats.decomposition_failures == 0


def test_a_successful_decomposition_resets_the_count() -> None:
    config = KFACConfig(**HUGE_FACTORS, max_failed_decompositions=3)
    pc, raised_at, _ = _decompose_until_raised(config, [HUGE, HUGE, 1.0] * 3)
    assert raised_at is None
    assert pc.stats.decomposition_failures == 2 * 3 * 2  # two layers' A, twice in each round of three


def test_a_failed_decomposition_never_writes_non_finite_values_into_the_gradients() -> None:
    """float64 eigenvalues beyond float32 were once cast to inf and used: 0 x inf gave NaN updates."""
    config = KFACConfig(**HUGE_FACTORS, max_failed_decompositions=100)
    model = _model()
    pc = KFACPreconditioner(model, config)
    for i in range(3):
        _backward(model, *_batch(i, HUGE))
        assert pc.step()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert pc.stats.decomposition_failures == 3 * 2


def _failing_distributed_run(rank: int, world_size: int, placement: str) -> tuple[int | None, str]:
    net = scenarios.model()
    config = KFACConfig(
        **{**HUGE_FACTORS, "output_module": "5"}, placement=placement, max_failed_decompositions=2
    )
    pc = KFACPreconditioner(net, config)
    share = scenarios.BATCH // world_size
    for step in range(6):
        x, y = scenarios.batch(step)
        x, y = x[rank * share : (rank + 1) * share] * HUGE, y[rank * share : (rank + 1) * share]
        net.zero_grad()
        F.cross_entropy(net(x), y).backward()
        try:
            pc.step()
        except DecompositionError as exc:
            return step, str(exc)
    return None, ""


@pytest.mark.parametrize("placement", ["memory", "communication"])
@distributed_test(world_sizes=(2,))
def test_every_rank_raises_at_the_same_step(rank: int, world_size: int, placement: str) -> None:
    raised_at, message = _failing_distributed_run(rank, world_size, placement)
    everyone = all_ranks((raised_at, message))
    assert everyone == [(2, everyone[0][1])] * world_size, everyone
    assert "failed to decompose 2 times in a row" in message, message
