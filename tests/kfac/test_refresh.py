"""The adaptive refresh policy on a scripted sequence of relative changes."""

import pytest
import torch

from ngd_dist.kfac.refresh import AdaptiveInterval, relative_change


def test_relative_change_is_the_frobenius_ratio() -> None:
    old = torch.tensor([[3.0, 0.0], [0.0, 4.0]])
    assert relative_change(old * 1.1, old) == pytest.approx(0.1)
    assert relative_change(torch.zeros(2), torch.zeros(2)) == 0.0
    assert relative_change(torch.ones(2), torch.zeros(2)) == float("inf")


def test_intervals_lengthen_on_stable_statistics_and_shorten_after_a_change() -> None:
    policy = AdaptiveInterval(initial=1, cap=8, low=0.05, high=0.2)
    step, history = 0, []
    script = [0.01, 0.01, 0.01, 0.01, 0.01, 0.5, 0.5, 0.1, 0.01]
    for change in script:
        assert policy.due("l0.a", step)
        history.append(policy.observe("l0.a", step, change))
        assert not policy.due("l0.a", step + history[-1] - 1)
        step += history[-1]
    assert history == [2, 4, 8, 8, 8, 4, 2, 2, 4]
    assert policy.interval("other") == 1
    assert policy.due("other", 0)


def test_a_factor_s_decisions_follow_from_its_own_changes_alone() -> None:
    """Every rank decides without communication: a factor's intervals depend on its own history
    only, whatever other factors saw in between."""
    changes = [0.0, 0.3, 0.01, 0.01, 0.9]
    alone, mixed = AdaptiveInterval(cap=16), AdaptiveInterval(cap=16)
    decided_alone, decided_mixed = [], []
    for step, change in enumerate(changes):
        decided_alone.append(alone.observe(("l", "g"), step, change))
        mixed.observe(("other", "a"), step, 1.0 - change)  # another factor, with the opposite trend
        decided_mixed.append(mixed.observe(("l", "g"), step, change))
    assert decided_alone == [2, 1, 2, 4, 2]
    assert decided_mixed == decided_alone
    assert mixed.interval(("other", "a")) != mixed.interval(("l", "g"))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"cap": 0}, "cap: got 0"), ({"initial": 9, "cap": 8}, "initial: got 9"), ({"low": 0.3, "high": 0.2}, "low/high")],
)
def test_bad_policy_settings_are_rejected(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        AdaptiveInterval(**kwargs)


def test_adaptive_schedule_folds_on_the_fixed_period_and_decomposes_adaptively() -> None:
    from ngd_dist.kfac.refresh import AdaptiveSchedule

    schedule = AdaptiveSchedule(5, AdaptiveInterval(initial=20, cap=80, low=0.05, high=0.2, floor=5))
    assert [s for s in range(0, 30) if schedule.fold_due("k", s)] == [0, 5, 10, 15, 20, 25]
    assert schedule.decompose_due("k", 0)
    schedule.observe("k", 0, 0.5)  # stale: 20 -> 10
    assert not schedule.decompose_due("k", 9)
    assert schedule.decompose_due("k", 10)
    for step in (10, 15):
        schedule.observe("k", step, 0.9)
    assert schedule.interval("k") == 5  # never below the statistics period
    with pytest.raises(ValueError, match="floor: got 30"):
        AdaptiveInterval(initial=20, floor=30)


def test_fixed_refresh_warms_up_with_doubling_gaps_before_the_first_period() -> None:
    """Early curvature changes fastest: the fixed schedule also decomposes at factor_every x 1, 2,
    4, ... before the first inverse_every, then every inverse_every."""
    from ngd_dist.kfac.refresh import FixedSchedule

    warm = FixedSchedule(10, 100, warmup=True)
    assert [s for s in range(301) if warm.decompose_due("k", s)] == [0, 10, 20, 40, 80, 100, 200, 300]
    assert [s for s in range(301) if warm.fold_due("k", s)] == list(range(0, 301, 10))
    cold = FixedSchedule(10, 100, warmup=False)
    assert [s for s in range(301) if cold.decompose_due("k", s)] == [0, 100, 200, 300]
    assert [s for s in range(25) if FixedSchedule(5, 20, warmup=True).decompose_due("k", s)] == [0, 5, 10, 20]
    assert [s for s in range(4) if FixedSchedule(1, 1, warmup=True).decompose_due("k", s)] == [0, 1, 2, 3]


def _decompositions(config_kwargs: dict, steps: int) -> list[int]:
    """Steps at which a tiny MLP's preconditioner decomposed something."""
    from torch import nn

    from ngd_dist import KFACConfig, KFACPreconditioner

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    precond = KFACPreconditioner(model, KFACConfig(output_module="2", kl_clip=None, **config_kwargs))
    done, seen = [], 0
    for step in range(steps):
        x = torch.randn(8, 4)
        loss = nn.functional.cross_entropy(model(x), torch.randint(0, 2, (8,)))
        model.zero_grad()
        loss.backward()
        precond.step()
        if precond.stats.decompositions > seen:
            done.append(step)
        seen = precond.stats.decompositions
    return done


def test_refresh_warmup_is_on_by_default_and_can_be_turned_off() -> None:
    assert _decompositions({"factor_every": 2, "inverse_every": 16}, 40) == [0, 2, 4, 8, 16, 32]
    off = {"factor_every": 2, "inverse_every": 16, "refresh_warmup": False}
    assert _decompositions(off, 40) == [0, 16, 32]


def test_adaptive_refresh_with_warmup_starts_at_factor_every() -> None:
    steps = _decompositions({"factor_every": 2, "inverse_every": 16, "refresh": "adaptive"}, 8)
    assert steps[:2] == [0, 2]
    cold = {"factor_every": 2, "inverse_every": 16, "refresh": "adaptive", "refresh_warmup": False}
    assert _decompositions(cold, 8) == [0]
