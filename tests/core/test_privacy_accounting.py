"""Privacy accounting (``client_agent.privacy.accounting``): the ε the agent, the portal and
the server-side DP option show is Opacus's RDP accountant's, for the same history."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import RDPAccountant

from client_agent.privacy import accounting
from client_agent.privacy.accounting import Step


def opacus_epsilon(history: list[Step], delta: float) -> float:
    """ε straight from Opacus: one ``step()`` call per step, as DP-SGD would make them."""
    accountant = RDPAccountant()
    for sigma, rate, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=rate)
    return float(accountant.get_epsilon(delta=delta))


@pytest.mark.parametrize(
    ("history", "delta"),
    [
        pytest.param([(1.1, 1.0, 3)], 1e-5, id="one-entry"),
        pytest.param([(1.1, 1.0, 2), (2.0, 1.0, 4), (0.8, 0.5, 3)], 1e-5, id="three-entries"),
        pytest.param([(1.0, 0.25, 10), (1.0, 0.25, 5), (3.0, 1.0, 1)], 1e-6, id="merged"),
        pytest.param([(5.0, 1.0, 50)], 1e-3, id="many-steps"),
    ],
)
def test_epsilon_is_opacus_rdp_accountant_s_value(history: list[Step], delta: float) -> None:
    ours = accounting.epsilon(history, delta)

    assert ours == pytest.approx(opacus_epsilon(history, delta), rel=0, abs=1e-9)
    assert 0 < ours < math.inf


def test_epsilon_after_is_epsilon_of_one_entry() -> None:
    assert accounting.epsilon_after(1.3, 7, 1e-5) == pytest.approx(
        opacus_epsilon([(1.3, 1.0, 7)], 1e-5), abs=1e-9
    )
    assert accounting.epsilon_after(1.3, 7, 1e-5, sample_rate=0.1) == pytest.approx(
        opacus_epsilon([(1.3, 0.1, 7)], 1e-5), abs=1e-9
    )


def test_epsilon_grows_with_steps_and_shrinks_with_noise() -> None:
    assert accounting.epsilon_after(1.0, 2, 1e-5) < accounting.epsilon_after(1.0, 3, 1e-5)
    assert accounting.epsilon_after(2.0, 3, 1e-5) < accounting.epsilon_after(1.0, 3, 1e-5)
    # a smaller δ costs more ε
    assert accounting.epsilon_after(1.0, 3, 1e-3) < accounting.epsilon_after(1.0, 3, 1e-7)


def test_no_noise_is_infinite_epsilon_and_no_step_is_zero() -> None:
    assert accounting.epsilon_after(0.0, 1, 1e-5) == math.inf
    assert accounting.epsilon([(1.0, 1.0, 3), (0.0, 1.0, 1)], 1e-5) == math.inf
    assert accounting.epsilon([], 1e-5) == 0.0
    assert accounting.epsilon([(1.0, 1.0, 0)], 1e-5) == 0.0


def test_merged_joins_consecutive_equal_entries_and_drops_empty_ones() -> None:
    history: list[Step] = [
        (1.0, 1.0, 1),
        (1.0, 1.0, 2),
        (0.5, 1.0, 0),
        (2.0, 1.0, 1),
        (1.0, 1.0, 1),
    ]

    assert accounting.merged(history) == ((1.0, 1.0, 3), (2.0, 1.0, 1), (1.0, 1.0, 1))


@pytest.mark.parametrize(
    ("max_epsilon", "sigma", "spent"),
    [
        (8.0, 1.1, ()),
        (8.0, 3.0, ()),
        (1.0, 5.0, ()),
        (8.0, 3.0, ((3.0, 1.0, 10),)),
        (20.0, 2.0, ((1.0, 1.0, 2), (4.0, 1.0, 5))),
    ],
)
def test_steps_within_is_the_largest_count_that_fits(
    max_epsilon: float, sigma: float, spent: tuple[Step, ...]
) -> None:
    count = accounting.steps_within(max_epsilon, sigma, 1e-5, spent=spent)

    assert count >= 1
    assert accounting.epsilon([*spent, (sigma, 1.0, count)], 1e-5) <= max_epsilon
    assert accounting.epsilon([*spent, (sigma, 1.0, count + 1)], 1e-5) > max_epsilon


def test_steps_within_is_zero_when_not_one_step_fits() -> None:
    assert accounting.epsilon_after(0.5, 1, 1e-5) > 1.0
    assert accounting.steps_within(1.0, 0.5, 1e-5) == 0
    # the budget already spent
    spent = ((2.0, 1.0, accounting.steps_within(4.0, 2.0, 1e-5)),)
    assert accounting.steps_within(4.0, 2.0, 1e-5, spent=spent) == 0


def test_steps_within_stops_at_most() -> None:
    assert accounting.epsilon_after(5.0, 21, 1e-5) < 100.0
    assert accounting.steps_within(100.0, 5.0, 1e-5, most=20) == 20


@pytest.mark.parametrize(
    ("target", "steps", "delta", "rate"),
    [(1.0, 10, 1e-5, 1.0), (4.0, 30, 1e-5, 1.0), (8.0, 5, 1e-6, 1.0), (2.0, 100, 1e-5, 0.1)],
)
def test_noise_for_epsilon_keeps_within_the_target_and_close_to_it(
    target: float, steps: int, delta: float, rate: float
) -> None:
    sigma = accounting.noise_for_epsilon(target, steps, delta, sample_rate=rate)

    spent = accounting.epsilon_after(sigma, steps, delta, rate)
    assert spent <= target
    # 0.1 % less noise spends more than the target: sigma is the smallest to 0.1 %
    assert accounting.epsilon_after(sigma * (1 - 1e-3), steps, delta, rate) > target
    assert spent >= target * (1 - 1e-3)


@pytest.mark.parametrize("target", [0.0, -1.0, math.inf, math.nan])
def test_noise_for_epsilon_refuses_a_target_that_is_not_a_positive_number(target: float) -> None:
    with pytest.raises(ValueError, match="target_epsilon must be a positive number"):
        accounting.noise_for_epsilon(target, 10, 1e-5)
