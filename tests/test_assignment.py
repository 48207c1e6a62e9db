"""Work plans: who decomposes which factor, as documented, for uneven layer counts."""

import pytest

from ngd_dist.distributed import LayerShape, greedy, round_robin


def _layers(*dims):
    return [LayerShape(f"l{i}", a, g) for i, (a, g) in enumerate(dims)]


def test_round_robin_deals_factors_in_registration_order_over_three_ranks() -> None:
    plan = round_robin(_layers((4, 2), (8, 3), (5, 5), (2, 9), (3, 3)), 3)
    dealt = [plan.owner(f"l{i}", f) for i in range(5) for f in ("a", "g")]
    assert dealt == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert [plan.layer_owner[f"l{i}"] for i in range(5)] == [0, 1, 2, 0, 1]


def test_greedy_is_longest_processing_time_first() -> None:
    # costs: l0.a 1000, l0.g 8, l1.a 512, l1.g 512, l2.a 343, l2.g 27
    plan = greedy(_layers((10, 2), (8, 8), (7, 3)), 2)
    assert plan.owner("l0", "a") == 0  # 1000 -> rank 0
    assert plan.owner("l1", "a") == 1  # 512 -> rank 1 (load 0)
    assert plan.owner("l1", "g") == 1  # 512 -> rank 1 (512 < 1000)
    assert plan.owner("l2", "a") == 0  # 343 -> rank 0 (1000 < 1024)
    assert plan.owner("l2", "g") == 1  # 27 -> rank 1 (1024 < 1343)
    assert plan.owner("l0", "g") == 1  # 8 -> rank 1 (1051 < 1343)
    assert plan.rank_costs() == [1343.0, 1059.0]
    assert plan.load_balance() == pytest.approx(1343 / 1201)
    assert plan.layer_owner == {"l0": plan.owner("l0", "a"), "l1": plan.owner("l1", "g"), "l2": plan.owner("l2", "a")}


def test_greedy_balances_better_than_round_robin_on_skewed_layers() -> None:
    layers = _layers((512, 512), (64, 64), (64, 64), (64, 64), (256, 256), (32, 10), (128, 128))
    rr, lpt = round_robin(layers, 4), greedy(layers, 4)
    assert lpt.load_balance() <= rr.load_balance()
    assert sorted(lpt.factor_owner) == sorted(rr.factor_owner)


def test_diagonal_factor_costs_its_side() -> None:
    layer = LayerShape("emb", 1000, 16, diagonal_a=True)
    assert layer.cost("a") == 1000.0 and layer.cost("g") == 16.0**3


@pytest.mark.parametrize("planner", [round_robin, greedy])
def test_one_rank_owns_everything_and_bad_world_size_is_rejected(planner) -> None:
    plan = planner(_layers((3, 4), (5, 6)), 1)
    assert set(plan.factor_owner.values()) == {0} and plan.load_balance() == 1.0
    with pytest.raises(ValueError, match="world_size: got 0"):
        planner(_layers((3, 4)), 0)
