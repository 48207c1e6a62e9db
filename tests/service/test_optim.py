"""Learning-rate schedules: warm-up, then constant, cosine, linear or step decay."""

import pytest

from ngd_dist.service.jobs import ScheduleSpec
from ngd_dist.service.optim import lr_at


def test_cosine_after_a_linear_warmup() -> None:
    warm = ScheduleSpec(name="cosine", warmup_steps=10, min_lr=0.0)
    assert lr_at(warm, 0, base_lr=1.0, total_steps=110) == pytest.approx(0.1)
    assert lr_at(warm, 9, base_lr=1.0, total_steps=110) == pytest.approx(1.0)
    assert lr_at(warm, 60, base_lr=1.0, total_steps=110) == pytest.approx(0.5)
    assert lr_at(warm, 110, base_lr=1.0, total_steps=110) == pytest.approx(0.0, abs=1e-12)


def test_linear_step_and_constant() -> None:
    linear = ScheduleSpec(name="linear", min_lr=0.1)
    assert lr_at(linear, 50, base_lr=1.0, total_steps=100) == pytest.approx(0.55)
    step = ScheduleSpec(name="step", decay_steps=10, gamma=0.5, min_lr=0.2)
    assert [lr_at(step, s, base_lr=1.0, total_steps=100) for s in (0, 10, 25, 99)] == [1.0, 0.5, 0.25, 0.2]
    assert lr_at(ScheduleSpec(name="constant"), 7, base_lr=0.3, total_steps=10) == 0.3


def test_step_schedule_without_decay_steps_names_the_key() -> None:
    with pytest.raises(ValueError, match=r"^schedule.decay_steps: got None; expected an integer >= 1"):
        lr_at(ScheduleSpec(name="step"), 3, base_lr=1.0, total_steps=10)
