"""Tests for `adadpigu.accounting`.

ε of single runs is pinned against dp-accounting's RDP accountant, which production code does not
use for single runs (it calls Opacus's), so a regression in either path makes the test fail.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant

from adadpigu import accounting
from adadpigu.accounting import (
    AccountantKind,
    AccountingError,
    PrivacySpend,
    calibrate_noise,
    calibrate_noise_for_tuning,
    check_delta,
    check_trial_distribution,
    compute_epsilon,
    compute_spend,
    epsilon_naive_composition,
    epsilon_repeat_and_select,
    run_event,
)

MNIST_Q = 256 / 60000
MNIST = {"noise_multiplier": 1.1, "sample_rate": MNIST_Q, "steps": 1170, "delta": 1e-5}

# (σ, q, T, δ) → ε per accountant, computed once: a change means the accounting changed.
PINNED = [
    ((1.1, MNIST_Q, 1170, 1e-5), {"rdp": 0.915934, "prv": 0.656947}),
    ((1.0, 0.01, 1000, 1e-5), {"rdp": 2.101365, "prv": 1.838372}),
    ((0.8, 0.02, 500, 1e-6), {"rdp": 6.164547, "prv": 5.450637}),
    ((5.0, 0.05, 100, 1e-5), {"rdp": 0.395115, "prv": 0.366528}),
]


def _dp_accounting_epsilon(sigma: float, q: float, steps: int, delta: float) -> float:
    """ε from dp-accounting's RDP accountant on its own default orders, built from scratch."""
    event = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps
    )
    accountant = RdpAccountant()
    accountant.compose(event)
    return accountant.get_epsilon(delta)


# ------------------------------------------------------------------------------------------------
# ε of one run
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sigma", "q", "steps", "delta"),
    [
        (1.1, MNIST_Q, 1170, 1e-5),
        (1.0, 0.01, 1000, 1e-5),
        (0.8, 0.02, 500, 1e-6),
        (5.0, 0.05, 100, 1e-5),
        (1000.0, 0.01, 1, 1e-5),  # huge σ, one step: needs orders above 63
        (0.6, 1.0, 3, 1e-5),  # full batch
    ],
)
def test_rdp_epsilon_matches_dp_accounting(sigma: float, q: float, steps: int, delta: float):
    ours = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta)
    reference = _dp_accounting_epsilon(sigma, q, steps, delta)
    # Same Rényi orders, independent implementations: agreement is to float precision.
    assert ours == pytest.approx(reference, rel=1e-6)


@pytest.mark.parametrize(("setting", "expected"), PINNED)
@pytest.mark.parametrize("kind", list(AccountantKind))
def test_epsilon_regression(setting, expected, kind: AccountantKind):
    sigma, q, steps, delta = setting
    epsilon = compute_epsilon(
        noise_multiplier=sigma, sample_rate=q, steps=steps, delta=delta, accountant=kind
    )
    assert isinstance(epsilon, float)
    assert epsilon == pytest.approx(expected[kind.value], rel=1e-3)


@pytest.mark.parametrize(("setting", "expected"), PINNED)
def test_prv_is_tighter_than_rdp_in_the_usual_regime(setting, expected):
    assert expected["prv"] < expected["rdp"]


def test_tiny_budget_is_not_floored_by_the_rdp_grid():
    # Opacus's default orders stop at 63, which floors ε at ≈ 0.103 for δ = 1e-5.
    epsilon = compute_epsilon(noise_multiplier=1000.0, sample_rate=0.01, steps=1, delta=1e-5)
    assert epsilon == pytest.approx(0.00350146, rel=1e-3)


@pytest.mark.parametrize("kind", list(AccountantKind))
def test_zero_steps_spend_nothing_and_zero_noise_is_not_private(kind: AccountantKind):
    common = {"sample_rate": 0.01, "delta": 1e-5, "accountant": kind}
    assert compute_epsilon(noise_multiplier=1.0, steps=0, **common) == 0.0
    assert compute_epsilon(noise_multiplier=0.0, steps=0, **common) == 0.0
    assert compute_epsilon(noise_multiplier=0.0, steps=5, **common) == math.inf


def test_epsilon_is_monotone():
    base = {"noise_multiplier": 1.0, "sample_rate": 0.01, "steps": 100, "delta": 1e-5}
    eps = compute_epsilon(**base)
    assert compute_epsilon(**{**base, "noise_multiplier": 1.5}) < eps
    assert compute_epsilon(**{**base, "steps": 200}) > eps
    assert compute_epsilon(**{**base, "sample_rate": 0.02}) > eps
    assert compute_epsilon(**{**base, "delta": 1e-6}) > eps


def test_accountant_accepts_its_string_value():
    assert compute_epsilon(**MNIST, accountant="rdp") == compute_epsilon(**MNIST)


def test_compute_spend_reports_inputs_and_epsilon():
    spend = compute_spend(**MNIST, accountant="prv")
    assert spend == PrivacySpend(
        sigma=1.1,
        sample_rate=MNIST_Q,
        steps=1170,
        delta=1e-5,
        epsilon=compute_epsilon(**MNIST, accountant=AccountantKind.PRV),
        accountant="prv",
    )
    assert spend.to_dict() == {
        "sigma": 1.1,
        "sample_rate": MNIST_Q,
        "steps": 1170,
        "delta": 1e-5,
        "epsilon": spend.epsilon,
        "accountant": "prv",
    }
    with pytest.raises(dataclasses.FrozenInstanceError):
        spend.epsilon = 0.0  # type: ignore[misc]


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def test_delta_must_be_below_one_over_n():
    check_delta(delta=1e-5, dataset_size=60000)
    for delta in (1 / 60000, 1e-3, 0.0):
        with pytest.raises(AccountingError, match=r"^privacy\.delta: got ") as info:
            check_delta(delta=delta, dataset_size=60000)
        assert repr(delta) in str(info.value)
        assert "1/N" in str(info.value)
        assert "60000" in str(info.value)
    with pytest.raises(AccountingError, match="dataset_size"):
        check_delta(delta=1e-5, dataset_size=0)


def test_accounting_error_is_a_value_error_with_field():
    with pytest.raises(ValueError) as info:
        check_delta(delta=0.5, dataset_size=10)
    assert isinstance(info.value, AccountingError)
    assert info.value.field == "privacy.delta"


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"steps": -1}, "steps"),
        ({"steps": 2.5}, "steps"),
        ({"steps": True}, "steps"),
        ({"delta": 0.0}, "delta"),
        ({"delta": 1.0}, "delta"),
        ({"accountant": "gdp"}, "accountant"),
    ],
)
def test_compute_epsilon_rejects_bad_inputs(change: dict, field: str):
    with pytest.raises(AccountingError, match=rf"^{field}: got ") as info:
        compute_epsilon(**{**MNIST, **change})
    assert "allowed" in str(info.value)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"epsilon": math.inf}, "epsilon"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"sample_rate": 2.0}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"tolerance": 0.0}, "tolerance"),
        ({"delta": 2.0}, "delta"),
    ],
)
def test_calibrate_noise_rejects_bad_inputs(change: dict, field: str):
    target = {"epsilon": 1.0, "delta": 1e-5, "sample_rate": 0.01, "steps": 100}
    with pytest.raises(AccountingError, match=rf"^{field}: got "):
        calibrate_noise(**{**target, **change})


# ------------------------------------------------------------------------------------------------
# Calibration
# ------------------------------------------------------------------------------------------------


def _assert_tight(achieved: float, target: float, tolerance: float) -> None:
    assert achieved <= target, f"calibrated ε {achieved} overshoots the target {target}"
    assert achieved >= target * (1 - tolerance) - 1e-12, f"ε {achieved} is loose for {target}"


@pytest.mark.parametrize(
    ("epsilon", "q", "steps"),
    [
        (0.5, 0.004, 1000),
        (1.0, 0.1, 10),
        (3.0, 0.001, 3000),
        (8.0, 0.02, 1),
        (0.05, 0.01, 1),  # below Opacus's default-grid floor
        (20.0, 0.2, 20),
    ],
)
def test_rdp_calibration_never_overshoots_and_is_tight(epsilon: float, q: float, steps: int):
    sigma = calibrate_noise(epsilon=epsilon, delta=1e-5, sample_rate=q, steps=steps)
    achieved = compute_epsilon(noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5)
    _assert_tight(achieved, epsilon, 0.01)


@pytest.mark.parametrize(
    ("epsilon", "q", "steps"),
    [(1.0, 0.01, 30), (4.0, 0.02, 20), (0.5, 0.02, 1)],
)
def test_prv_calibration_never_overshoots_and_is_tight(epsilon: float, q: float, steps: int):
    sigma = calibrate_noise(
        epsilon=epsilon, delta=1e-5, sample_rate=q, steps=steps, accountant=AccountantKind.PRV
    )
    achieved = compute_epsilon(
        noise_multiplier=sigma, sample_rate=q, steps=steps, delta=1e-5, accountant="prv"
    )
    _assert_tight(achieved, epsilon, 0.01)
    rdp_sigma = calibrate_noise(epsilon=epsilon, delta=1e-5, sample_rate=q, steps=steps)
    assert sigma < rdp_sigma  # the tighter accountant needs less noise


def test_calibration_honours_a_smaller_tolerance():
    sigma = calibrate_noise(epsilon=2.0, delta=1e-5, sample_rate=0.01, steps=500, tolerance=1e-3)
    achieved = compute_epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=500, delta=1e-5)
    _assert_tight(achieved, 2.0, 1e-3)


def test_calibration_repairs_an_overshooting_search(monkeypatch: pytest.MonkeyPatch):
    true_sigma = calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=100)
    monkeypatch.setattr(accounting, "get_noise_multiplier", lambda **_: 0.8 * true_sigma)
    sigma = calibrate_noise(epsilon=1.0, delta=1e-5, sample_rate=0.01, steps=100)
    achieved = compute_epsilon(noise_multiplier=sigma, sample_rate=0.01, steps=100, delta=1e-5)
    _assert_tight(achieved, 1.0, 0.01)


@pytest.mark.parametrize("kind", list(AccountantKind))
def test_unreachable_target_is_infeasible(kind: AccountantKind):
    with pytest.raises(AccountingError, match="infeasible") as info:
        calibrate_noise(epsilon=1e-3, delta=1e-5, sample_rate=0.01, steps=100, accountant=kind)
    assert info.value.field == "privacy.epsilon"
    assert "epsilon=0.001" in str(info.value)


# ------------------------------------------------------------------------------------------------
# Tuning
# ------------------------------------------------------------------------------------------------

# (mean, shape) → ε of repeat-and-select on the MNIST run, pinned.
REPEAT_AND_SELECT = [
    (10.0, math.inf, 1.722615),  # Poisson
    (10.0, 1.0, 1.840085),  # geometric
    (10.0, 0.0, 1.593537),  # logarithmic
    (10.0, 2.0, 2.049877),  # truncated negative binomial
    (3.5, 0.5, 1.463151),
]


@pytest.mark.parametrize(("mean", "shape", "expected"), REPEAT_AND_SELECT)
def test_repeat_and_select_matches_dp_accounting(mean: float, shape: float, expected: float):
    ours = epsilon_repeat_and_select(**MNIST, mean_trials=mean, shape=shape)
    one_run = dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(MNIST_Q, dp_event.GaussianDpEvent(1.1)), 1170
    )
    reference = RdpAccountant()
    reference.compose(dp_event.RepeatAndSelectDpEvent(one_run, mean, shape))
    assert ours == pytest.approx(reference.get_epsilon(1e-5), rel=1e-9)
    assert ours == pytest.approx(expected, rel=1e-3)


@pytest.mark.parametrize(("mean", "shape"), [(10.0, math.inf), (10.0, 1.0), (30.0, 0.0)])
def test_tuning_costs_more_than_one_run_and_less_than_naive(mean: float, shape: float):
    one = compute_epsilon(**MNIST)
    selected = epsilon_repeat_and_select(**MNIST, mean_trials=mean, shape=shape)
    naive = epsilon_naive_composition(**MNIST, trials=math.ceil(mean))
    assert one < selected < naive


def test_repeat_and_select_grows_with_mean_trials():
    values = [
        epsilon_repeat_and_select(**MNIST, mean_trials=mean, shape=1.0) for mean in (1, 5, 20, 100)
    ]
    assert values == sorted(values)
    assert len(set(values)) == len(values)


def test_repeat_and_select_edge_cases():
    common = {"sample_rate": 0.01, "delta": 1e-5, "mean_trials": 10.0, "shape": 1.0}
    assert epsilon_repeat_and_select(noise_multiplier=1.0, steps=0, **common) == 0.0
    assert epsilon_repeat_and_select(noise_multiplier=0.0, steps=10, **common) == math.inf


def test_naive_composition_composes_all_steps():
    for kind in AccountantKind:
        naive = epsilon_naive_composition(**MNIST, trials=4, accountant=kind)
        composed = compute_epsilon(**{**MNIST, "steps": 4 * 1170}, accountant=kind)
        assert naive == composed
    assert epsilon_naive_composition(**MNIST, trials=1) == compute_epsilon(**MNIST)
    assert epsilon_naive_composition(**MNIST, trials=0) == 0.0
    with pytest.raises(AccountingError, match=r"^trials: "):
        epsilon_naive_composition(**MNIST, trials=-1)


def test_run_event_describes_one_run():
    event = run_event(noise_multiplier=1.1, sample_rate=MNIST_Q, steps=1170)
    assert event == dp_event.SelfComposedDpEvent(
        dp_event.PoissonSampledDpEvent(MNIST_Q, dp_event.GaussianDpEvent(1.1)), 1170
    )
    assert run_event(noise_multiplier=1.1, sample_rate=MNIST_Q, steps=0) == dp_event.NoOpDpEvent()


@pytest.mark.parametrize(
    ("epsilon", "mean", "shape"),
    [(1.0, 10.0, math.inf), (4.0, 20.0, 1.0), (8.0, 10.0, 0.0)],
)
def test_tuning_calibration_meets_its_target(epsilon: float, mean: float, shape: float):
    setting = {"delta": 1e-5, "sample_rate": 0.004, "steps": 1000}
    sigma = calibrate_noise_for_tuning(epsilon=epsilon, mean_trials=mean, shape=shape, **setting)
    achieved = epsilon_repeat_and_select(
        noise_multiplier=sigma, mean_trials=mean, shape=shape, **setting
    )
    _assert_tight(achieved, epsilon, 0.01)
    assert sigma > calibrate_noise(epsilon=epsilon, **setting)  # tuning needs more noise per run


def test_tuning_calibration_infeasible():
    with pytest.raises(AccountingError, match="infeasible"):
        calibrate_noise_for_tuning(
            epsilon=1e-3, delta=1e-5, sample_rate=0.01, steps=100, mean_trials=10.0, shape=1.0
        )


@pytest.mark.parametrize(
    ("mean", "shape", "field"),
    [
        (0.5, 1.0, "mean_trials"),
        (math.nan, 1.0, "mean_trials"),
        (math.inf, 1.0, "mean_trials"),
        (10.0, -1.0, "shape"),
        (10.0, math.nan, "shape"),
    ],
)
def test_trial_distribution_is_validated(mean: float, shape: float, field: str):
    with pytest.raises(AccountingError, match=rf"^{field}: got "):
        check_trial_distribution(mean_trials=mean, shape=shape)
    with pytest.raises(AccountingError, match=rf"^{field}: got "):
        epsilon_repeat_and_select(**MNIST, mean_trials=mean, shape=shape)


def test_trial_distribution_accepts_every_family():
    for shape in (0.0, 0.5, 1.0, 3.0, math.inf):
        check_trial_distribution(mean_trials=1.0, shape=shape)
