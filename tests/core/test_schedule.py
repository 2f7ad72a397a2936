import math

import pytest

from hf_rifle import cyclic_cosine_factor, period_starts, position_in_period, reinit_steps


@pytest.mark.parametrize("max_steps,num_periods", [(100, 3), (9, 3), (10, 3), (7, 7), (1000, 4), (5, 1)])
def test_period_starts_are_floor_k_t_over_k(max_steps, num_periods):
    assert period_starts(max_steps, num_periods) == [
        math.floor(k * max_steps / num_periods) for k in range(num_periods)
    ]


def test_epoch_based_run_restarts_on_epoch_starts():
    steps_per_epoch, epochs, num_periods = 7, 40, 4
    starts = period_starts(steps_per_epoch * epochs, num_periods)
    assert starts == [0, 10 * steps_per_epoch, 20 * steps_per_epoch, 30 * steps_per_epoch]


def test_reinit_never_at_step_zero_nor_on_the_last_step():
    for max_steps in range(1, 40):
        for num_periods in range(1, max_steps + 1):
            steps = reinit_steps(max_steps, num_periods)
            assert 0 not in steps and all(step <= max_steps - 1 for step in steps)
            assert len(set(steps)) == num_periods - 1


@pytest.mark.parametrize("num_periods", [0, -1])
def test_fewer_than_one_period_is_rejected(num_periods):
    with pytest.raises(ValueError, match="num_periods must be >= 1"):
        period_starts(10, num_periods)


def test_more_periods_than_steps_is_rejected():
    with pytest.raises(ValueError, match="more than the run's 4 optimizer steps"):
        period_starts(4, 5)


def test_head_lr_curve_is_the_paper_formula_restarting_each_period():
    max_steps, num_periods = 100, 3
    starts = period_starts(max_steps, num_periods) + [max_steps]
    for step in range(max_steps):
        k = max(i for i in range(num_periods) if starts[i] <= step)
        tau, length = step - starts[k], starts[k + 1] - starts[k]
        assert position_in_period(step, max_steps, num_periods) == (k, tau, length)
        expected = 0.5 * (1 + math.cos(math.pi * tau / length))
        assert cyclic_cosine_factor(step, max_steps, num_periods) == pytest.approx(expected, abs=1e-12)
    for start in starts[:-1]:
        assert cyclic_cosine_factor(start, max_steps, num_periods) == 1.0
    for next_start in starts[1:]:
        assert cyclic_cosine_factor(next_start - 1, max_steps, num_periods) < 0.01


def test_step_after_the_last_update_ends_the_last_period():
    assert cyclic_cosine_factor(30, 30, 3) == pytest.approx(0.0, abs=1e-12)
