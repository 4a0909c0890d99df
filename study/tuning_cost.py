"""The privacy cost of tuning (ALGORITHM.md, "Tuning is not free"), per (method, ε) group.

A study runs K trials on the same training data. Three figures are reported for each group:

(i)   ε of one run: what a single trial's training spends (the largest over the group's runs);
(ii)  ε of the whole selection procedure, for K drawn at random and only the best run released
      (Papernot & Steinke 2022; `accounting.epsilon_repeat_and_select`). It is claimed only when
      its conditions hold; otherwise it is "not covered" and the reasons are given;
(iii) ε of naive composition of every run executed (pruned and crashed ones included), which
      holds for any sampler and any selection rule.

The trial count K is drawn here, once, before any trial runs; the caller persists it. Its draw uses
OS entropy unless a `draw_seed` is given (tests): a predictable K voids (ii).

Pure math and bookkeeping: no Ray, no Optuna, no files.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np

from adadpigu.accounting import (
    RDP_ORDERS,
    compute_epsilon,
    epsilon_naive_composition,
    epsilon_repeat_and_select,
    run_event,
)
from study.space import SAMPLING_KEYS, Group, SamplerKind, StudySpec, TrialCount, TrialCountKind

__all__ = [
    "COVERED",
    "RunCharge",
    "TuningCost",
    "draw_trial_count",
    "quiet_dp_accounting",
    "selection_not_covered_reasons",
    "tnb_gamma",
    "tuning_cost",
]

COVERED = "covered"


@contextlib.contextmanager
def quiet_dp_accounting() -> Iterator[None]:
    """Silence dp-accounting's (absl) warnings that an RDP order was excluded for not converging:
    the bound stays valid (other orders carry it), and they would flood the study's console."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


# --------------------------------------------------------------------------------------------------
# Drawing K
# --------------------------------------------------------------------------------------------------


def tnb_mean(gamma: float, shape: float) -> float:
    """Mean of the truncated negative binomial (K ≥ 1) with success probability γ and shape η.

    η = 0 is the logarithmic distribution, η = 1 the geometric one (Papernot & Steinke 2022, as
    parameterised in dp-accounting).
    """
    if shape == 0:
        return (1 - gamma) / (gamma * math.log(1 / gamma))
    return shape * (1 - gamma) / (gamma * (1 - gamma**shape))


def tnb_gamma(*, mean: float, shape: float, tolerance: float = 1e-12) -> float:
    """γ of the truncated negative binomial with this mean (bisection: the mean falls with γ)."""
    if shape == 1:
        return 1 / mean
    lo, hi = 0.0, min(1.0, 2 * (shape + 1) / mean)
    while hi - lo > tolerance * hi:
        mid = (lo + hi) / 2
        if tnb_mean(mid, shape) < mean:
            hi = mid
        else:
            lo = mid
    return (lo + hi) / 2


def draw_trial_count(trials: TrialCount, *, rng: np.random.Generator | None = None) -> int:
    """K for one group: the fixed count, or one draw from the stated distribution.

    Poisson may give 0 (then the group runs no trial). The truncated negative binomial is ≥ 1:
    drawn from numpy's negative binomial (failures before η successes, success probability γ)
    or, for η = 0, its logarithmic series, conditioned on K ≥ 1 by rejection.
    """
    if trials.kind is TrialCountKind.FIXED:
        assert trials.count is not None
        return int(trials.count)
    if rng is None:
        rng = np.random.default_rng(trials.draw_seed)  # None: OS entropy
    assert trials.mean is not None and trials.shape is not None
    if trials.kind is TrialCountKind.POISSON:
        return int(rng.poisson(trials.mean))
    gamma = tnb_gamma(mean=trials.mean, shape=trials.shape)
    if gamma >= 1:
        return 1
    if trials.shape == 0:
        return int(rng.logseries(1 - gamma))
    while True:
        k = int(rng.negative_binomial(trials.shape, gamma))
        if k >= 1:
            return k


# --------------------------------------------------------------------------------------------------
# Conditions of the selection-procedure bound
# --------------------------------------------------------------------------------------------------


def selection_not_covered_reasons(spec: StudySpec, group: Group) -> list[str]:
    """Why (ii) cannot be claimed for `group` by the study's design; empty if it can.

    The conditions checked here are static; `tuning_cost` adds the ones seen in the runs (one
    mechanism for every run). "Only the selected run is released" is a condition on what the user
    publishes, which no code can check: the results table itself releases every trial.
    """
    if not group.method.is_private:
        return ["non-private method"]
    reasons: list[str] = []
    if spec.search.sampler is not SamplerKind.RANDOM:
        reasons.append(f"{spec.search.sampler.value.upper()} sampler (needs random search)")
    if spec.search.enqueue:
        reasons.append("enqueued points (needs every trial drawn from the same distribution)")
    if spec.search.early_stopping is not None:
        reasons.append("early stopping")
    if not spec.trials.is_random:
        reasons.append("fixed trial count (needs a count drawn at random)")
    elif spec.trials.draw_seed is not None:
        reasons.append("trial count drawn from a fixed seed (predictable)")
    searched = spec.searched_keys(group.method) & set(SAMPLING_KEYS)
    if searched:
        reasons.append(f"{', '.join(sorted(searched))} searched (trials differ in q or T)")
    return reasons


# --------------------------------------------------------------------------------------------------
# The three figures
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunCharge:
    """One run as the accountant sees it: `steps` Poisson-subsampled Gaussian steps (q, σ).

    `steps` counts what the run executed (or, for a crash with no ledger, what it planned).
    """

    sigma: float
    sample_rate: float
    steps: int
    planned_steps: int

    @property
    def mechanism(self) -> tuple[float, float]:
        return (float(self.sigma), float(self.sample_rate))


@dataclasses.dataclass(frozen=True, kw_only=True)
class TuningCost:
    epsilon_one_run: float | None
    epsilon_selection: float | None
    coverage: str  # COVERED or "not covered: <reasons>"
    epsilon_all_trials: float | None
    runs_counted: int


def tuning_cost(
    *,
    runs: Sequence[RunCharge],
    delta: float,
    trials: TrialCount,
    seeds_per_trial: int,
    reasons: Sequence[str],
    planned: RunCharge | None = None,
    accountant: str = "rdp",
) -> TuningCost:
    """(i), (ii) and (iii) for one group of a private method.

    `runs`: every run executed so far (zero-step runs, e.g. infeasible ones, spend nothing).
    `planned`: the group's mechanism fixed before any trial (when q, T and σ are the same for
    every trial), so (ii) is known before the first run finishes. `seeds_per_trial` runs make one
    trial: the trial is their composition, and (ii) is computed for that.
    """
    active = [r for r in runs if r.steps > 0]
    one_run = None
    if active:
        one_run = max(
            compute_epsilon(
                noise_multiplier=r.sigma,
                sample_rate=r.sample_rate,
                steps=r.steps,
                delta=delta,
                accountant=accountant,
            )
            for r in active
        )
    elif planned is not None:
        one_run = compute_epsilon(
            noise_multiplier=planned.sigma,
            sample_rate=planned.sample_rate,
            steps=planned.planned_steps,
            delta=delta,
            accountant=accountant,
        )

    why = list(reasons)
    mechanisms = {r.mechanism for r in active} | ({planned.mechanism} if planned else set())
    if len(mechanisms) > 1:
        why.append("runs differ in σ or q")
    selection = None
    if not why:
        reference = planned if planned is not None else (active[0] if active else None)
        if reference is None:
            why.append("no run yet")
        else:
            steps = max([reference.planned_steps] + [r.steps for r in active])
            assert trials.mean is not None and trials.shape is not None
            with quiet_dp_accounting():
                selection = epsilon_repeat_and_select(
                    noise_multiplier=reference.sigma,
                    sample_rate=reference.sample_rate,
                    steps=steps * seeds_per_trial,
                    delta=delta,
                    mean_trials=trials.mean,
                    shape=trials.shape,
                )
    coverage = COVERED if not why else "not covered: " + "; ".join(why)
    return TuningCost(
        epsilon_one_run=one_run,
        epsilon_selection=selection,
        coverage=coverage,
        epsilon_all_trials=epsilon_all_runs(active, delta=delta, accountant=accountant)
        if active
        else None,
        runs_counted=len(active),
    )


def epsilon_all_runs(runs: Sequence[RunCharge], *, delta: float, accountant: str = "rdp") -> float:
    """ε of releasing every run: their composition.

    One mechanism (σ, q) for all runs: the run accountant on the summed steps. Otherwise
    dp-accounting's RDP accountant composes each run's event (on the same Rényi orders).
    """
    from dp_accounting import dp_event
    from dp_accounting.rdp import RdpAccountant

    active = [r for r in runs if r.steps > 0]
    if not active:
        return 0.0
    if any(r.sigma == 0 for r in active):
        return math.inf
    if len({r.mechanism for r in active}) == 1:
        first = active[0]
        return epsilon_naive_composition(
            noise_multiplier=first.sigma,
            sample_rate=first.sample_rate,
            steps=sum(r.steps for r in active),
            delta=delta,
            trials=1,
            accountant=accountant,
        )
    events = [
        run_event(noise_multiplier=r.sigma, sample_rate=r.sample_rate, steps=r.steps)
        for r in active
    ]
    rdp = RdpAccountant(orders=list(RDP_ORDERS))
    with quiet_dp_accounting():
        rdp.compose(dp_event.ComposedDpEvent(events))
        return float(rdp.get_epsilon(delta))
