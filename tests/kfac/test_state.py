"""Checkpoint round trips, mixed precision, and the numerics safeguards."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ngd_dist import KFACConfig, KFACPreconditioner


def _setup(**config):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    defaults = {"output_module": "2", "factor_every": 2, "inverse_every": 4, "factor_decay": 0.9}
    pc = KFACPreconditioner(model, KFACConfig(**{**defaults, **config}), optimizer=opt)
    return model, opt, pc


def _batch(i: int):
    g = torch.Generator().manual_seed(100 + i)
    return torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def _train(model, opt, pc, steps, start=0):
    for i in range(start, start + steps):
        x, y = _batch(i)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pc.step()
        opt.step()


@pytest.mark.parametrize("curvature", ["ef", "mc", "ief"])
@pytest.mark.parametrize("method", ["eigen", "inverse"])
@pytest.mark.parametrize("saved_at", [5, 7, 8])  # 7: factors folded since the last decomposition
def test_state_dict_round_trip_gives_an_identical_next_step(curvature, method, saved_at) -> None:
    model, opt, pc = _setup(curvature=curvature, method=method)
    _train(model, opt, pc, saved_at)
    state = copy.deepcopy(pc.state_dict())
    model_state, opt_state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, pc, 3, start=saved_at)
    expected = [p.detach().clone() for p in model.parameters()]

    model2, opt2, pc2 = _setup(curvature=curvature, method=method)
    model2.load_state_dict(model_state)
    opt2.load_state_dict(opt_state)
    pc2.load_state_dict(state)
    assert pc2.stats.steps == saved_at
    _train(model2, opt2, pc2, 3, start=saved_at)
    for got, want in zip(model2.parameters(), expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_load_state_dict_rejects_a_state_for_another_model() -> None:
    model, opt, pc = _setup()
    _train(model, opt, pc, 1)
    state = pc.state_dict()
    other = KFACPreconditioner(nn.Sequential(nn.Linear(8, 4)), KFACConfig(kl_clip=None))
    with pytest.raises(ValueError, match="layers"):
        other.load_state_dict(state)
    bad = copy.deepcopy(state)
    bad["factors"]["0/a"] = torch.zeros(3, 3)
    with pytest.raises(ValueError, match=r"factors\.0/a has shape \(3, 3\); expected \(9, 9\)"):
        pc.load_state_dict(bad)
    bad = copy.deepcopy(state)
    bad["world_size"] = 2
    with pytest.raises(ValueError, match=r"written by rank 0 of 2; expected rank 0 of 1"):
        pc.load_state_dict(bad)
    with pytest.raises(ValueError, match="version"):
        pc.load_state_dict({"layers": {}})


def test_overflowing_statistics_are_rejected_and_counted() -> None:
    """An input of 1e20 keeps loss and gradients finite, but its A statistics (1e40) overflow float32.

    (A NaN input makes the gradients NaN too: step() refuses that whole step, tests/kfac/test_nonfinite.py.)
    """
    model, opt, pc = _setup(factor_every=1, inverse_every=1)
    _train(model, opt, pc, 2)
    before = [(layer.a.clone(), layer.g.clone()) for layer in pc.layers]
    x, y = _batch(5)
    x[3, 2] = 1e20
    opt.zero_grad()
    F.cross_entropy(model(x), y).backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert pc.step()
    assert pc.stats.nonfinite_rejected == 2  # A of both layers
    for layer, (a, g) in zip(pc.layers, before, strict=True):
        torch.testing.assert_close(layer.a, a, rtol=0, atol=0)
        assert not torch.equal(layer.g, g)
        assert torch.isfinite(layer.a).all()
        assert torch.isfinite(layer.g).all()


def test_grad_scaler_skipped_step_leaves_factors_unchanged() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    # The CPU GradScaler: scaling and overflow detection run as on a GPU.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    pc = KFACPreconditioner(model, KFACConfig(curvature="ief", output_module="2"), optimizer=opt, grad_scaler=scaler)

    def amp_step(x, y):
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(opt)
        pc.step()
        scaler.step(opt)
        scaler.update()

    for i in range(3):
        amp_step(*_batch(i))
    assert all(layer.a.dtype == torch.float32 and layer.g.dtype == torch.float32 for layer in pc.layers)
    factors = [(layer.a.clone(), layer.g.clone()) for layer in pc.layers]
    params = [p.detach().clone() for p in model.parameters()]
    x, y = _batch(9)
    x[0, 0] = float("inf")
    scale_before = scaler.get_scale()
    amp_step(x, y)
    assert scaler.get_scale() < scale_before  # the scaler saw the overflow and skipped
    assert pc.stats.skipped_steps == 1
    assert pc.stats.nonfinite_rejected == 0
    for layer, (a, g) in zip(pc.layers, factors, strict=True):
        torch.testing.assert_close(layer.a, a, rtol=0, atol=0)
        torch.testing.assert_close(layer.g, g, rtol=0, atol=0)
    for p, before in zip(model.parameters(), params, strict=True):
        torch.testing.assert_close(p.detach(), before, rtol=0, atol=0)


def test_grad_scaler_scale_does_not_change_ef_factors() -> None:
    """G is expressed in unscaled units: the loss scale divides out."""
    factors = []
    for scale in (1.0, 2.0**12):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        pc = KFACPreconditioner(model, KFACConfig(curvature="ef", kl_clip=None), grad_scaler=scaler)
        x, y = _batch(0)
        scaler.scale(F.cross_entropy(model(x), y)).backward()
        scaler.unscale_(opt)
        pc.step()
        factors.append([layer.g for layer in pc.layers])
    for g1, g2 in zip(*factors, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(("method", "routine"), [("eigen", "eigh"), ("inverse", "cholesky")])
def test_decomposition_retries_in_float64_and_keeps_the_last_good_one(monkeypatch, method, routine) -> None:
    """A decomposition that fails in float32 is retried in float64 (and cast back); one that fails in
    both keeps the previous decomposition."""
    model, opt, pc = _setup(method=method, factor_every=1, inverse_every=1)
    _train(model, opt, pc, 1)
    good = pc.layers[0].factors["g"].decomposition
    real = getattr(torch.linalg, routine)
    calls = {"float32": 0, "float64": 0}

    def flaky(x, *args, **kwargs):
        calls[str(x.dtype).removeprefix("torch.")] += 1
        if x.dtype == torch.float32:
            raise torch.linalg.LinAlgError("simulated failure")
        return real(x, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, routine, flaky)
    _train(model, opt, pc, 1, start=1)
    assert pc.stats.decomposition_retries == 4
    assert pc.stats.decomposition_failures == 0
    assert calls["float64"] == 4
    retried = pc.layers[0].factors["g"].decomposition
    assert retried is not good
    assert all(t.dtype == torch.float32 for t in retried.tensors())

    def broken(x, *args, **kwargs):
        raise torch.linalg.LinAlgError("simulated failure")

    monkeypatch.setattr(torch.linalg, routine, broken)
    kept = pc.layers[0].factors["g"].decomposition
    _train(model, opt, pc, 1, start=2)
    assert pc.stats.decomposition_failures == 4
    assert pc.layers[0].factors["g"].decomposition is kept


def test_statistics_are_captured_only_on_factor_steps() -> None:
    model, opt, pc = _setup(factor_every=3, inverse_every=3)
    seen = []
    for i in range(7):
        seen.append(pc.capture.active)
        _train(model, opt, pc, 1, start=i)
    assert seen == [True, False, False, True, False, False, True]
    assert pc.stats.factor_refreshes == 3
    assert pc.stats.decompositions == 3 * 2 * len(pc.layers)  # A and G of each layer
