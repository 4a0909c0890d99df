"""The privacy cost of tuning: the trial-count draw, when the selection bound is claimed, and the
three figures, pinned against dp-accounting (which production calls only for (ii) and for mixed
compositions; single-mechanism compositions go through Opacus's RDP accountant). No Ray."""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import pytest
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from dp_accounting.rdp.rdp_privacy_accountant import _gamma_truncated_negative_binomial

from adadpigu.accounting import RDP_ORDERS, calibrate_noise_for_tuning
from adadpigu.config import Method
from study.space import Group, TrialCount, TrialCountKind, parse_study
from study.tuning_cost import (
    COVERED,
    RunCharge,
    draw_trial_count,
    epsilon_all_runs,
    selection_not_covered_reasons,
    tnb_gamma,
    tuning_cost,
)

DELTA = 1e-5


def dp_accounting_epsilon(event: dp_event.DpEvent, delta: float = DELTA) -> float:
    accountant = RdpAccountant(orders=list(RDP_ORDERS))
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def run(sigma: float, q: float, steps: int) -> dp_event.DpEvent:
    step = dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma))
    return dp_event.SelfComposedDpEvent(step, steps)


def counts(kind: TrialCountKind, mean: float, shape: float) -> TrialCount:
    return TrialCount(kind=kind, mean=mean, shape=shape)


# --- drawing K ----------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [0.0, 0.5, 1.0, 3.0])
def test_tnb_gamma_matches_dp_accounting(shape: float) -> None:
    for mean in (1.5, 3.0, 10.0, 40.0):
        ours = tnb_gamma(mean=mean, shape=shape)
        theirs = _gamma_truncated_negative_binomial(shape, mean)
        assert ours == pytest.approx(theirs, rel=1e-6)


@pytest.mark.parametrize(
    ("kind", "shape"),
    [
        (TrialCountKind.POISSON, math.inf),
        (TrialCountKind.TRUNCATED_NEGATIVE_BINOMIAL, 1.0),
        (TrialCountKind.TRUNCATED_NEGATIVE_BINOMIAL, 0.0),
        (TrialCountKind.TRUNCATED_NEGATIVE_BINOMIAL, 2.0),
    ],
)
def test_drawn_counts_have_the_stated_mean(kind: TrialCountKind, shape: float) -> None:
    spec = counts(kind, 6.0, shape)
    rng = np.random.default_rng(1234)
    draws = np.array([draw_trial_count(spec, rng=rng) for _ in range(20000)])
    assert draws.mean() == pytest.approx(6.0, rel=0.05)
    if kind is TrialCountKind.TRUNCATED_NEGATIVE_BINOMIAL:
        assert draws.min() >= 1  # truncated at 0


def test_fixed_count_and_seeded_draws() -> None:
    assert draw_trial_count(TrialCount(kind=TrialCountKind.FIXED, count=4)) == 4
    seeded = TrialCount(kind=TrialCountKind.POISSON, mean=5.0, shape=math.inf, draw_seed=3)
    assert draw_trial_count(seeded) == draw_trial_count(seeded)


# --- (ii): when it is claimed -------------------------------------------------------------------

STUDY: dict[str, Any] = {
    "methods": ["dpsgd", "nonprivate"],
    "budgets": {"epsilon": [2], "delta": DELTA},
    "base": {
        "data": {"name": "synthetic"},
        "model": {"name": "mlp"},
        "training": {"epochs": 1, "batch_size": 64},
    },
    "space": {"training.lr": {"type": "float", "low": 0.1, "high": 4.0, "log": True}},
    "trials": {"distribution": "poisson", "mean": 4},
    "search": {"sampler": "random"},
}
DPSGD = Group(Method.DPSGD, 2.0)


def study(**changes: Any) -> Any:
    raw = copy.deepcopy(STUDY)
    raw.update(changes)
    return parse_study(raw)


def test_random_search_with_a_drawn_count_is_covered() -> None:
    assert selection_not_covered_reasons(study(), DPSGD) == []


@pytest.mark.parametrize(
    ("changes", "reason"),
    [
        ({"search": {"sampler": "tpe"}}, "TPE sampler"),
        (
            {"search": {"sampler": "random", "early_stopping": {"scheduler": "asha"}}},
            "early stopping",
        ),
        ({"trials": 4}, "fixed trial count"),
        ({"trials": {"distribution": "poisson", "mean": 4, "draw_seed": 1}}, "fixed seed"),
        (
            {"space": {"training.epochs": {"type": "int", "low": 1, "high": 3}}},
            "training.epochs searched",
        ),
        (
            {"search": {"sampler": "random", "enqueue": [{"training.lr": 1.0}]}},
            "enqueued points",
        ),
    ],
)
def test_selection_bound_not_covered(changes: dict[str, Any], reason: str) -> None:
    reasons = selection_not_covered_reasons(study(**changes), DPSGD)
    assert any(reason in r for r in reasons), reasons
    cost = tuning_cost(
        runs=[RunCharge(sigma=1.0, sample_rate=0.01, steps=500, planned_steps=500)],
        delta=DELTA,
        trials=counts(TrialCountKind.POISSON, 4.0, math.inf),
        seeds_per_trial=1,
        reasons=reasons,
    )
    assert cost.epsilon_selection is None
    assert cost.coverage.startswith("not covered: ") and reason in cost.coverage
    # (i) and (iii) hold whatever the sampler.
    assert cost.epsilon_one_run is not None and cost.epsilon_all_trials is not None


def test_nonprivate_group_is_not_covered() -> None:
    assert selection_not_covered_reasons(study(), Group(Method.NONPRIVATE, None)) == [
        "non-private method"
    ]


def test_runs_with_different_mechanisms_are_not_covered() -> None:
    cost = tuning_cost(
        runs=[
            RunCharge(sigma=1.0, sample_rate=0.01, steps=500, planned_steps=500),
            RunCharge(sigma=1.3, sample_rate=0.02, steps=250, planned_steps=250),
        ],
        delta=DELTA,
        trials=counts(TrialCountKind.POISSON, 4.0, math.inf),
        seeds_per_trial=1,
        reasons=[],
    )
    assert cost.epsilon_selection is None and "differ in σ or q" in cost.coverage


# --- the figures, pinned ------------------------------------------------------------------------

# (σ, q, T, mean K, shape): Poisson, geometric, truncated negative binomial, logarithmic.
SETTINGS = [
    (1.0, 0.01, 1000, 10.0, 1.0),
    (1.1, 256 / 55000, 430, 3.0, math.inf),
    (2.0, 0.004, 3000, 30.0, 0.5),
    (0.8, 0.02, 200, 5.0, 0.0),
]
# Regression values (dp-accounting 0.6, RDP on RDP_ORDERS, δ = 1e-5): (ii) for each setting.
PINNED_SELECTION = [4.10327065640215, 1.006010185751743, 1.0385664964964216, 5.640934697175679]


@pytest.mark.parametrize(("setting", "pinned"), list(zip(SETTINGS, PINNED_SELECTION, strict=True)))
def test_three_figures_pinned_against_dp_accounting(
    setting: tuple[float, float, int, float, float], pinned: float
) -> None:
    sigma, q, steps, mean, shape = setting
    kind = (
        TrialCountKind.POISSON if math.isinf(shape) else TrialCountKind.TRUNCATED_NEGATIVE_BINOMIAL
    )
    runs = [RunCharge(sigma=sigma, sample_rate=q, steps=steps, planned_steps=steps)] * 3
    cost = tuning_cost(
        runs=runs, delta=DELTA, trials=counts(kind, mean, shape), seeds_per_trial=1, reasons=[]
    )
    assert cost.coverage == COVERED
    # (i): one run.
    assert cost.epsilon_one_run == pytest.approx(
        dp_accounting_epsilon(run(sigma, q, steps)), rel=2e-3
    )
    # (ii): repeat and select, exactly dp-accounting's RepeatAndSelectDpEvent.
    expected = dp_accounting_epsilon(
        dp_event.RepeatAndSelectDpEvent(run(sigma, q, steps), mean, shape)
    )
    assert cost.epsilon_selection == pytest.approx(expected, rel=1e-9)
    assert cost.epsilon_selection == pytest.approx(pinned, rel=1e-6)
    # (iii): all three runs composed.
    assert cost.epsilon_all_trials == pytest.approx(
        dp_accounting_epsilon(run(sigma, q, 3 * steps)), rel=2e-3
    )
    assert cost.epsilon_selection > cost.epsilon_one_run


def test_seeds_make_a_trial_the_composition_of_its_runs() -> None:
    sigma, q, steps = 1.0, 0.01, 400
    cost = tuning_cost(
        runs=[RunCharge(sigma=sigma, sample_rate=q, steps=steps, planned_steps=steps)] * 2,
        delta=DELTA,
        trials=counts(TrialCountKind.TRUNCATED_NEGATIVE_BINOMIAL, 5.0, 1.0),
        seeds_per_trial=2,
        reasons=[],
    )
    expected = dp_accounting_epsilon(
        dp_event.RepeatAndSelectDpEvent(run(sigma, q, 2 * steps), 5.0, 1.0)
    )
    assert cost.epsilon_selection == pytest.approx(expected, rel=1e-9)


def test_mixed_runs_compose_event_by_event() -> None:
    runs = [
        RunCharge(sigma=1.0, sample_rate=0.01, steps=500, planned_steps=500),
        RunCharge(sigma=1.5, sample_rate=0.02, steps=120, planned_steps=250),  # pruned
        RunCharge(sigma=0.9, sample_rate=0.01, steps=0, planned_steps=300),  # infeasible: nothing
    ]
    expected = dp_accounting_epsilon(
        dp_event.ComposedDpEvent([run(1.0, 0.01, 500), run(1.5, 0.02, 120)])
    )
    assert epsilon_all_runs(runs, delta=DELTA) == pytest.approx(expected, rel=1e-9)
    assert epsilon_all_runs([], delta=DELTA) == 0.0


def test_tuning_within_budget_meets_the_target() -> None:
    """σ from calibrate_noise_for_tuning makes (ii) ≤ ε (tight), each run spending less."""
    q, steps, target = 0.01, 800, 2.0
    sigma = calibrate_noise_for_tuning(
        epsilon=target, delta=DELTA, sample_rate=q, steps=steps, mean_trials=8.0, shape=1.0
    )
    planned = RunCharge(sigma=sigma, sample_rate=q, steps=0, planned_steps=steps)
    cost = tuning_cost(
        runs=[],
        delta=DELTA,
        trials=counts(TrialCountKind.TRUNCATED_NEGATIVE_BINOMIAL, 8.0, 1.0),
        seeds_per_trial=1,
        reasons=[],
        planned=planned,
    )
    assert cost.coverage == COVERED
    assert target * 0.99 <= cost.epsilon_selection <= target
    assert cost.epsilon_one_run < target
