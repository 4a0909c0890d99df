"""Privacy accounting: ε of DP-SGD runs, σ calibration, and the privacy cost of tuning.

Every training step of DP-SGD and AdaDPIGU is one Poisson-subsampled Gaussian mechanism with sample
rate q and noise multiplier σ; a run of T steps is their T-fold composition. This module turns
(σ, q, T, δ) into ε and back, and nothing else: it is pure math (numpy, scipy, Opacus's accountants,
dp-accounting), with no file I/O, no Ray and no global state (two known warnings are silenced,
inside a scoped context only).

Single runs (`compute_epsilon`, `calibrate_noise`) go through Opacus's accountants:

- **RDP** (the default). It is an upper bound that is robust and fast for every (q, σ, T) we meet,
  including T = 1 and σ in the thousands used in tests and searches, where the PRV accountant's
  discretisation is slow or degenerate; it is also the default of Opacus's `get_noise_multiplier`
  and `PrivacyEngine`, so our ε agrees with the `opacus_dpsgd` baseline's wherever the optimal
  Rényi order is ≤ 63 (every ε ≳ 0.2 at δ = 1e-5; below, ours is tighter). We evaluate it on
  `RDP_ORDERS`: Opacus's default orders plus 11 and 128…1024 (dp-accounting's default grid), so that
  small-ε regimes are not floored by the grid (Opacus's orders stop at 63, which caps how small ε
  can get at ≈ 0.10 for δ = 1e-5) and so that single runs and the tuning accountant use one grid.
- **PRV** (Gopi et al. 2021), selectable: a numerically composed, tighter (ε typically 5–30 % lower)
  upper bound. It is slower (seconds for T ≈ 10⁴), cannot go below ε ≈ its `eps_error` (0.01), and
  becomes slow and numerically fragile for σ ≲ 0.2.

The tuning cost (ALGORITHM.md, "Tuning is not free") uses dp-accounting's RDP accountant with
`RepeatAndSelectDpEvent` (Papernot & Steinke 2022): the ε of running a random number K of trials,
drawn from a stated distribution, and releasing only the best one. Naive composition of all trials
is also provided; it holds for any sampler.

Calibration never overshoots: the σ returned always satisfies ε(σ) ≤ the target, checked by
recomputation, and is tight within `tolerance` (relative: ε(σ) ≥ target·(1 − tolerance)).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from opacus.accountants import create_accountant
from opacus.accountants.utils import get_noise_multiplier

from adadpigu.config import AccountantKind

__all__ = [
    "MAX_NOISE_MULTIPLIER",
    "RDP_ORDERS",
    "AccountantKind",
    "AccountingError",
    "PrivacySpend",
    "calibrate_noise",
    "calibrate_noise_for_tuning",
    "check_delta",
    "check_trial_distribution",
    "compute_epsilon",
    "compute_spend",
    "epsilon_naive_composition",
    "epsilon_repeat_and_select",
    "run_event",
]

#: Rényi orders for every RDP computation here: Opacus's defaults (1.1…10.9 by 0.1, 12…63) plus 11
#: and 128, 256, 512, 1024, i.e. dp-accounting's default grid. More orders only tighten the bound.
RDP_ORDERS: tuple[float, ...] = tuple(
    [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]
)

#: Largest σ a calibration tries before declaring a target infeasible (Opacus uses the same bound).
MAX_NOISE_MULTIPLIER = 1e6

# Bisection iterations after bracketing; far more than a 1e-3 relative tolerance needs.
_MAX_BISECTIONS = 200


class AccountingError(ValueError):
    """An accounting input is outside its allowed range, or a privacy target cannot be met."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacySpend:
    """The privacy spent by `steps` Poisson-subsampled Gaussian steps, as reported for a run."""

    sigma: float
    sample_rate: float
    steps: int
    delta: float
    epsilon: float
    accountant: str

    def to_dict(self) -> dict[str, Any]:
        """A plain dict (JSON-ready) of the fields."""
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------


def _require(ok: bool, field: str, value: Any, allowed: str) -> None:
    if not ok:
        raise AccountingError(f"got {value!r}; allowed: {allowed}", field=field)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_noise_multiplier(noise_multiplier: float) -> None:
    _require(
        _is_number(noise_multiplier) and math.isfinite(noise_multiplier) and noise_multiplier >= 0,
        "noise_multiplier",
        noise_multiplier,
        "a finite number >= 0",
    )


def _check_sample_rate(sample_rate: float) -> None:
    _require(
        _is_number(sample_rate) and 0 < sample_rate <= 1,
        "sample_rate",
        sample_rate,
        "(0, 1]",
    )


def _check_steps(steps: int, *, minimum: int = 0) -> None:
    _require(
        isinstance(steps, numbers.Integral) and not isinstance(steps, bool) and steps >= minimum,
        "steps",
        steps,
        f"an integer >= {minimum}",
    )


def _check_delta_range(delta: float) -> None:
    _require(_is_number(delta) and 0 < delta < 1, "delta", delta, "(0, 1)")


def _check_epsilon_target(epsilon: float) -> None:
    _require(
        _is_number(epsilon) and math.isfinite(epsilon) and epsilon > 0,
        "epsilon",
        epsilon,
        "a finite number > 0",
    )


def _check_tolerance(tolerance: float) -> None:
    _require(_is_number(tolerance) and 0 < tolerance < 1, "tolerance", tolerance, "(0, 1)")


def _accountant_kind(accountant: AccountantKind | str) -> AccountantKind:
    try:
        return AccountantKind(accountant)
    except ValueError:
        allowed = ", ".join(kind.value for kind in AccountantKind)
        raise AccountingError(
            f"got {accountant!r}; allowed: {allowed}", field="accountant"
        ) from None


def check_delta(*, delta: float, dataset_size: int) -> None:
    """Reject a δ that is not below 1/N.

    With δ ≥ 1/N, the mechanism "release one random example in the clear" is (0, δ)-DP, so such a
    guarantee protects nobody. Raises `AccountingError` naming `privacy.delta`, the value and 1/N.
    """
    _require(
        isinstance(dataset_size, numbers.Integral)
        and not isinstance(dataset_size, bool)
        and dataset_size >= 1,
        "data.dataset_size",
        dataset_size,
        "an integer >= 1",
    )
    bound = 1.0 / dataset_size
    _require(
        _is_number(delta) and 0 < delta < bound,
        "privacy.delta",
        delta,
        f"(0, 1/N) = (0, {bound:.6g}) for N = {dataset_size} training examples",
    )


def check_trial_distribution(*, mean_trials: float, shape: float) -> None:
    """Validate the distribution of the number of tuning trials K (see `epsilon_repeat_and_select`).

    `mean_trials` must be finite and ≥ 1 (K ≥ 1 for the truncated families, and dp-accounting's
    bound needs E[K] ≥ 1); `shape` must be ≥ 0 or `math.inf` (Poisson).
    """
    _require(
        _is_number(mean_trials) and math.isfinite(mean_trials) and mean_trials >= 1,
        "mean_trials",
        mean_trials,
        "a finite number >= 1",
    )
    _require(
        _is_number(shape) and not math.isnan(shape) and shape >= 0,
        "shape",
        shape,
        ">= 0 (0 logarithmic, 1 geometric, (0, inf) truncated negative binomial) or inf (Poisson)",
    )


# --------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------


@contextmanager
def _quiet_accountants() -> Iterator[None]:
    # Opacus warns when the optimal Rényi order sits at the edge of the grid (huge σ or huge ε);
    # the bound is still valid, only looser, and calibration probes such σ on purpose. PRV takes
    # log(1 − q), which is log(0) = −inf by design when q = 1.
    with warnings.catch_warnings(), np.errstate(divide="ignore"):
        warnings.filterwarnings("ignore", message="Optimal order is the", category=UserWarning)
        yield


def _raw_epsilon(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, kind: AccountantKind
) -> float:
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    accountant = create_accountant(mechanism=kind.value)
    accountant.history = [(float(noise_multiplier), float(sample_rate), int(steps))]
    kwargs: dict[str, Any] = {"alphas": list(RDP_ORDERS)} if kind is AccountantKind.RDP else {}
    with _quiet_accountants():
        try:
            epsilon = float(accountant.get_epsilon(delta=delta, **kwargs))
        except (ValueError, OverflowError, FloatingPointError) as error:
            raise AccountingError(
                f"the {kind.value} accountant failed for noise_multiplier={noise_multiplier!r}, "
                f"sample_rate={sample_rate!r}, steps={steps!r}, delta={delta!r}: {error}"
            ) from error
    if math.isnan(epsilon):
        raise AccountingError(
            f"the {kind.value} accountant returned NaN for noise_multiplier={noise_multiplier!r}, "
            f"sample_rate={sample_rate!r}, steps={steps!r}, delta={delta!r}; "
            "try accountant='rdp'"
        )
    return epsilon


def compute_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind | str = AccountantKind.RDP,
) -> float:
    """ε such that `steps` Poisson-subsampled Gaussian steps (rate q, noise σ) are (ε, δ)-DP.

    Uses Opacus's RDP (on `RDP_ORDERS`) or PRV accountant; both return an upper bound. 0 steps
    spend nothing (0.0); σ = 0 with steps > 0 is not private (`math.inf`).
    """
    _check_noise_multiplier(noise_multiplier)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    _check_delta_range(delta)
    return _raw_epsilon(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        kind=_accountant_kind(accountant),
    )


def compute_spend(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    accountant: AccountantKind | str = AccountantKind.RDP,
) -> PrivacySpend:
    """The `PrivacySpend` of `steps` steps run: `compute_epsilon` and its inputs, for reports."""
    kind = _accountant_kind(accountant)
    epsilon = compute_epsilon(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        accountant=kind,
    )
    return PrivacySpend(
        sigma=float(noise_multiplier),
        sample_rate=float(sample_rate),
        steps=int(steps),
        delta=float(delta),
        epsilon=epsilon,
        accountant=kind.value,
    )


def _smallest_sigma_within(
    epsilon_of: Callable[[float], float],
    *,
    target: float,
    start: float,
    tolerance: float,
) -> float | None:
    """Smallest σ found with ε(σ) ≤ target, to within `tolerance` relative on ε; None if none.

    Brackets from `start` by doubling/halving, then bisects in log σ. The σ returned was evaluated
    and met the target, so the result never overshoots (NaN counts as a miss).
    """
    hi = start
    eps_hi = epsilon_of(hi)
    if eps_hi <= target:
        while True:
            lo = hi / 2
            if lo < 1e-6:  # ε stays small even with almost no noise: no lower σ worth finding
                return hi
            eps_lo = epsilon_of(lo)
            if not eps_lo <= target:
                break
            hi, eps_hi = lo, eps_lo
    else:
        lo = hi
        while not eps_hi <= target:
            lo, hi = hi, hi * 2
            if hi > MAX_NOISE_MULTIPLIER:
                return None
            eps_hi = epsilon_of(hi)
    for _ in range(_MAX_BISECTIONS):
        if target - eps_hi <= tolerance * target or hi / lo <= 1 + 1e-12:
            break
        mid = math.sqrt(lo * hi)
        eps_mid = epsilon_of(mid)
        if eps_mid <= target:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi


def _infeasible(what: str, *, epsilon: float, delta: float, sample_rate: float, steps: int) -> str:
    return (
        f"infeasible privacy target: {what} cannot reach epsilon={epsilon!r} at delta={delta!r} "
        f"with sample_rate={sample_rate!r} and steps={steps!r}, even with noise_multiplier up to "
        f"{MAX_NOISE_MULTIPLIER:g} (very small targets hit the accountant's resolution, not the "
        "noise); raise privacy.epsilon or privacy.delta"
    )


def calibrate_noise(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: AccountantKind | str = AccountantKind.RDP,
    tolerance: float = 0.01,
) -> float:
    """σ such that `steps` Poisson-subsampled Gaussian steps at rate q are (ε, δ)-DP.

    Searches with Opacus's `get_noise_multiplier`, then recomputes ε(σ): the result always
    satisfies target·(1 − tolerance) ≤ `compute_epsilon(σ)` ≤ target (if Opacus's σ overshot, σ is
    raised by bisection until it does not). `tolerance` is relative. Raises `AccountingError`
    ("infeasible") when no σ ≤ `MAX_NOISE_MULTIPLIER` reaches the target.
    """
    _check_epsilon_target(epsilon)
    _check_delta_range(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps, minimum=1)
    _check_tolerance(tolerance)
    kind = _accountant_kind(accountant)

    def epsilon_of(sigma: float) -> float:
        return _raw_epsilon(
            noise_multiplier=sigma, sample_rate=sample_rate, steps=steps, delta=delta, kind=kind
        )

    infeasible = AccountingError(
        _infeasible(
            f"the {kind.value} accountant",
            epsilon=epsilon,
            delta=delta,
            sample_rate=sample_rate,
            steps=steps,
        ),
        field="privacy.epsilon",
    )
    kwargs: dict[str, Any] = {"alphas": list(RDP_ORDERS)} if kind is AccountantKind.RDP else {}
    with _quiet_accountants():
        try:
            sigma = float(
                get_noise_multiplier(
                    target_epsilon=epsilon,
                    target_delta=delta,
                    sample_rate=sample_rate,
                    steps=steps,
                    accountant=kind.value,
                    epsilon_tolerance=tolerance * epsilon,
                    **kwargs,
                )
            )
        except ValueError as error:  # Opacus: "The privacy budget is too low."
            raise infeasible from error
    if epsilon_of(sigma) <= epsilon:
        return sigma
    # Never release a σ that overshoots: search upwards from Opacus's answer.
    repaired = _smallest_sigma_within(epsilon_of, target=epsilon, start=sigma, tolerance=tolerance)
    if repaired is None:
        raise infeasible
    return repaired


# --------------------------------------------------------------------------------------------------
# Tuning (Papernot & Steinke 2022)
# --------------------------------------------------------------------------------------------------


def run_event(*, noise_multiplier: float, sample_rate: float, steps: int) -> dp_event.DpEvent:
    """The dp-accounting `DpEvent` of one run: `steps` Poisson-subsampled Gaussian steps (q, σ)."""
    _check_noise_multiplier(noise_multiplier)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    if steps == 0:
        return dp_event.NoOpDpEvent()
    step = dp_event.PoissonSampledDpEvent(
        float(sample_rate), dp_event.GaussianDpEvent(float(noise_multiplier))
    )
    return dp_event.SelfComposedDpEvent(step, int(steps))


def _repeat_and_select_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    mean_trials: float,
    shape: float,
) -> float:
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    event = dp_event.RepeatAndSelectDpEvent(
        run_event(noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps),
        float(mean_trials),
        float(shape),
    )
    accountant = RdpAccountant(orders=list(RDP_ORDERS))
    accountant.compose(event)
    return float(accountant.get_epsilon(delta))


def epsilon_repeat_and_select(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    mean_trials: float,
    shape: float,
) -> float:
    """ε of a whole tuning procedure: K runs, K random, only the best run's result released.

    Each run is `steps` Poisson-subsampled Gaussian steps (q, σ). K is drawn, before any trial
    runs, from the distribution with mean `mean_trials` and `shape`: `math.inf` Poisson, 1
    geometric, 0 logarithmic, (0, inf) truncated negative binomial (dp-accounting's
    `RepeatAndSelectDpEvent`, Papernot & Steinke 2022, RDP on `RDP_ORDERS`).

    Valid only if hyperparameters are drawn independently of earlier results (random search), no
    trial is stopped early, K is drawn once and persisted (crashed trials count), and only the
    selected run is released; otherwise use `epsilon_naive_composition`.
    """
    _check_noise_multiplier(noise_multiplier)
    _check_sample_rate(sample_rate)
    _check_steps(steps)
    _check_delta_range(delta)
    check_trial_distribution(mean_trials=mean_trials, shape=shape)
    return _repeat_and_select_epsilon(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        mean_trials=mean_trials,
        shape=shape,
    )


def epsilon_naive_composition(
    *,
    noise_multiplier: float,
    sample_rate: float,
    steps: int,
    delta: float,
    trials: int,
    accountant: AccountantKind | str = AccountantKind.RDP,
) -> float:
    """ε of releasing all of `trials` runs of `steps` steps each: their composition (trials·steps).

    Holds for any hyperparameter sampler (TPE included) and any selection rule, as long as
    `trials` counts every trial that ran (crashed ones included) and `steps` bounds the steps each
    one executed.
    """
    _check_steps(steps)
    _require(
        isinstance(trials, numbers.Integral) and not isinstance(trials, bool) and trials >= 0,
        "trials",
        trials,
        "an integer >= 0",
    )
    return compute_epsilon(
        noise_multiplier=noise_multiplier,
        sample_rate=sample_rate,
        steps=int(steps) * int(trials),
        delta=delta,
        accountant=accountant,
    )


def calibrate_noise_for_tuning(
    *,
    epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    mean_trials: float,
    shape: float,
    tolerance: float = 0.01,
) -> float:
    """σ for every trial such that the whole repeat-and-select procedure is (ε, δ)-DP.

    Bisection on σ in log space: the result satisfies
    target·(1 − tolerance) ≤ `epsilon_repeat_and_select(σ)` ≤ target (never overshoots).
    Raises `AccountingError` ("infeasible") when no σ ≤ `MAX_NOISE_MULTIPLIER` reaches the target.
    """
    _check_epsilon_target(epsilon)
    _check_delta_range(delta)
    _check_sample_rate(sample_rate)
    _check_steps(steps, minimum=1)
    _check_tolerance(tolerance)
    check_trial_distribution(mean_trials=mean_trials, shape=shape)

    def epsilon_of(sigma: float) -> float:
        return _repeat_and_select_epsilon(
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            mean_trials=mean_trials,
            shape=shape,
        )

    sigma = _smallest_sigma_within(epsilon_of, target=epsilon, start=1.0, tolerance=tolerance)
    if sigma is None:
        raise AccountingError(
            _infeasible(
                f"repeat-and-select with mean_trials={mean_trials!r}, shape={shape!r}",
                epsilon=epsilon,
                delta=delta,
                sample_rate=sample_rate,
                steps=steps,
            ),
            field="privacy.epsilon",
        )
    return sigma
