"""Work plans: who decomposes which factor and who preconditions which layer, as documented."""

import pytest

from ngd_dist.kfac.distributed import LayerShape, make_plan
from ngd_dist.kfac.distributed.assignment import grad_workers_for


def _layers(*dims):
    return [LayerShape(f"l{i}", a, g) for i, (a, g) in enumerate(dims)]


FIVE = _layers((4, 2), (8, 3), (5, 5), (2, 9), (3, 3))


def test_round_robin_communication_optimal_deals_factors_in_order_over_three_ranks() -> None:
    plan = make_plan(FIVE, 3, "round_robin", grad_workers=3)
    dealt = [plan.owner(f"l{i}", f) for i in range(5) for f in ("a", "g")]
    assert dealt == [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    assert plan.columns == 1
    assert all(plan.grad_workers_of(f"l{i}") == [0, 1, 2] for i in range(5))


def test_round_robin_memory_optimal_colocates_a_layers_factors() -> None:
    plan = make_plan(FIVE, 3, "round_robin", grad_workers=1)
    assert [plan.owner(f"l{i}", "a") for i in range(5)] == [0, 1, 2, 0, 1]
    assert [plan.owner(f"l{i}", "g") for i in range(5)] == [0, 1, 2, 0, 1]
    assert [plan.grad_workers_of(f"l{i}") for i in range(5)] == [[0], [1], [2], [0], [1]]
    assert plan.row_ranks(0) == [0, 1, 2]


def test_greedy_is_longest_processing_time_first() -> None:
    # factor costs: l0.a 1000, l0.g 8, l1.a 512, l1.g 512, l2.a 343, l2.g 27
    plan = make_plan(_layers((10, 2), (8, 8), (7, 3)), 2, "greedy", grad_workers=2)
    assert plan.owner("l0", "a") == 0  # 1000 -> rank 0
    assert plan.owner("l1", "a") == 1  # 512 -> rank 1 (load 0)
    assert plan.owner("l1", "g") == 1  # 512 -> rank 1 (512 < 1000)
    assert plan.owner("l2", "a") == 0  # 343 -> rank 0 (1000 < 1024)
    assert plan.owner("l2", "g") == 1  # 27 -> rank 1 (1024 < 1343)
    assert plan.owner("l0", "g") == 1  # 8 -> rank 1 (1051 < 1343)
    assert plan.rank_costs() == [1343.0, 1059.0]
    assert plan.load_balance() == pytest.approx(1343 / 1201)


def test_greedy_memory_optimal_places_whole_layers_by_their_cost() -> None:
    # layer costs: l1 1024 -> rank 0; l0 1008 -> rank 1; l2 370 -> rank 1 (1008 < 1024)
    plan = make_plan(_layers((10, 2), (8, 8), (7, 3)), 2, "greedy", grad_workers=1)
    assert plan.layer_column == {"l1": 0, "l0": 1, "l2": 1}
    assert plan.owner("l2", "a") == plan.owner("l2", "g") == 1
    assert plan.rank_costs() == [1024.0, 1378.0]


def test_hybrid_grid_of_two_rows_by_two_columns() -> None:
    plan = make_plan(FIVE, 4, "round_robin", grad_workers=2)
    assert plan.columns == 2
    assert plan.column_ranks(0) == [0, 2]
    assert plan.column_ranks(1) == [1, 3]
    assert plan.row_ranks(0) == [0, 1]
    assert plan.row_ranks(1) == [2, 3]
    assert [plan.layer_column[f"l{i}"] for i in range(5)] == [0, 1, 0, 1, 0]
    # column 0 holds l0, l2, l4: factors a0 g0 a2 g2 a4 g4 dealt to ranks 0, 2 in turn
    assert [plan.owner(f"l{i}", f) for i in (0, 2, 4) for f in ("a", "g")] == [0, 2, 0, 2, 0, 2]
    for name, rank in plan.factor_owner.items():
        assert rank in plan.grad_workers_of(name[0])


def test_greedy_balances_better_than_round_robin_on_skewed_layers() -> None:
    layers = _layers((512, 512), (64, 64), (64, 64), (64, 64), (256, 256), (32, 10), (128, 128))
    factors = {(f"l{i}", f) for i in range(len(layers)) for f in ("a", "g")}
    for k, biggest in ((1, 2 * 512.0**3), (4, 512.0**3)):  # the costliest layer (k=1) or factor (k=4)
        rr, lpt = make_plan(layers, 4, "round_robin", k), make_plan(layers, 4, "greedy", k)
        for plan in (rr, lpt):
            assert set(plan.factor_owner) == factors
            assert set(plan.factor_owner.values()) == set(range(4)), plan.factor_owner
        assert lpt.load_balance() < rr.load_balance()
        # greedy is optimal here: no rank carries more than the one item that cannot be split
        assert max(lpt.rank_costs()) == biggest
        assert max(rr.rank_costs()) > biggest


def test_diagonal_factor_costs_its_side() -> None:
    layer = LayerShape("emb", 1000, 16, diagonal_a=True)
    assert layer.cost("a") == 1000.0
    assert layer.cost("g") == 16.0**3


def test_grad_workers_for_each_placement() -> None:
    assert grad_workers_for("communication", 4, 0.5) == 4
    assert grad_workers_for("memory", 4, 0.5) == 1
    assert grad_workers_for("hybrid", 4, 0.5) == 2
    assert grad_workers_for("hybrid", 3, 0.5) == 1  # divisors of 3 are 1 and 3
    assert grad_workers_for("hybrid", 6, 0.5) == 3


@pytest.mark.parametrize("strategy", ["round_robin", "greedy"])
def test_one_rank_owns_everything_and_bad_arguments_are_rejected(strategy) -> None:
    plan = make_plan(_layers((3, 4), (5, 6)), 1, strategy)
    assert set(plan.factor_owner.values()) == {0}
    assert plan.load_balance() == 1.0
    with pytest.raises(ValueError, match="world_size: got 0"):
        make_plan(_layers((3, 4)), 0, strategy)
    with pytest.raises(ValueError, match="grad_workers: got 3; expected a divisor of world_size=4"):
        make_plan(_layers((3, 4)), 4, strategy, grad_workers=3)
    with pytest.raises(ValueError, match="strategy: got 'lpt'"):
        make_plan(_layers((3, 4)), 2, "lpt")
