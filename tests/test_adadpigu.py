"""AdaDPIGU: reduction to SGD, a mask built from noised releases only, sensitivity on neighbouring
datasets for every clip schedule, noise on kept coordinates only, the quantile schedule and its
noise split, the ε reported, config validation and the run's outputs.

Statistical tests use fixed seeds and explicit noise generators; each is built to fail on the bug it
guards against (e.g. importance read from pre-noise gradients, noise on pruned coordinates).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from dp_accounting import dp_event
from dp_accounting.rdp import RdpAccountant
from scipy import stats
from torch import nn

from adadpigu import training
from adadpigu.accounting import compute_epsilon
from adadpigu.clipping import clip_and_sum
from adadpigu.config import (
    ClipConfig,
    ClipScheduleKind,
    ConfigError,
    ImportanceKind,
    TrainConfig,
)
from adadpigu.gradients import batch_loss_gradient, per_example_gradients
from adadpigu.importance import accumulate_importance, zero_scores
from adadpigu.masks import global_mask
from adadpigu.mechanisms import adaptive_release, dp_release, release_sum
from adadpigu.noise import make_generator
from adadpigu.normalisation import normalise_
from adadpigu.plan import make_plan
from adadpigu.sampling import poisson_sample
from adadpigu.schedules import (
    ClipState,
    advance_clip,
    initial_clip,
    noised_unclipped_fraction,
    quantile_noise_split,
)
from tests.tiny import (
    F64,
    assert_ks_scale,
    max_abs_diff,
    params_of,
    tiny_batch,
    tiny_mlp,
)


def l2(tensors: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(t.square().sum()) for t in tensors.values()))


def clone(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: t.clone() for n, t in tensors.items()}


def run_config(**sections: Any) -> TrainConfig:
    """A tiny float64 run on the synthetic task (N = 240, q = 1/8)."""
    raw: dict[str, Any] = {
        "seed": 3,
        "data": {"name": "synthetic", "synthetic_size": 300, "validation_size": 60},
        "model": {"name": "mlp"},
        "training": {"epochs": 2, "batch_size": 30, "lr": 0.5},
        "runtime": {"dtype": "float64", "eval_batch_size": 512},
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return TrainConfig.from_dict(raw)


def train(config: TrainConfig) -> training.TrainerState:
    from study.runner import prepare_run

    prepared = prepare_run(config)
    state = training.init_state(config, prepared.model)
    return training.run_training(config, prepared.plan, prepared.data, state)


# --- reduction to SGD -----------------------------------------------------------------------------


def test_adaptive_release_neutral_settings_equal_plain_gradient() -> None:
    model = tiny_mlp()
    params = params_of(model)
    x, y = tiny_batch(11)
    expected_batch = 9.5
    mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()}
    released, _ = adaptive_release(
        per_example_gradients(model, params, x, y),
        mask=mask,
        mean={n: torch.zeros_like(p) for n, p in params.items()},
        scale={n: torch.ones_like(p) for n, p in params.items()},
        clip_norm=math.inf,
        grad_noise_multiplier=0.0,
        count_std=None,
        expected_batch_size=expected_batch,
        noise_generator=make_generator(0),
    )
    plain = batch_loss_gradient(model, params, x, y, divisor=expected_batch)
    assert max_abs_diff(released, plain) < 1e-10
    assert max_abs_diff(plain, {n: torch.zeros_like(p) for n, p in params.items()}) > 1e-3


NEUTRAL = {
    "privacy": {"noise_multiplier": 0.0, "delta": 1e-3, "clip": {"c0": 1e12}},
    "adadpigu": {
        "keep_ratio": 1.0,
        "normalisation": "off",
        "clip": {"schedule": "constant", "c0": 1e12},
    },
}


@pytest.mark.parametrize("stage1_fraction", [0.0, 0.5])
def test_adadpigu_run_with_neutral_settings_equals_nonprivate_sgd(stage1_fraction: float) -> None:
    adadpigu = {**NEUTRAL["adadpigu"], "stage1_fraction": stage1_fraction}
    private = train(run_config(method="adadpigu", privacy=NEUTRAL["privacy"], adadpigu=adadpigu))
    baseline = train(run_config(method="nonprivate"))
    assert private.executed_steps == baseline.executed_steps == 16
    assert private.mask is not None and all(bool(m.all()) for m in private.mask.values())
    assert max_abs_diff(params_of(private.model), params_of(baseline.model)) < 1e-10


def test_dpsgd_run_with_sigma0_and_no_clipping_equals_nonprivate_sgd() -> None:
    private = train(run_config(method="dpsgd", privacy=NEUTRAL["privacy"]))
    baseline = train(run_config(method="nonprivate"))
    assert max_abs_diff(params_of(private.model), params_of(baseline.model)) < 1e-10


def test_normalisation_on_is_not_sgd_even_without_noise() -> None:
    # The equivalence above must be able to fail: the adaptive normalisation changes the update.
    adadpigu = {**NEUTRAL["adadpigu"], "stage1_fraction": 0.5, "normalisation": "adaclip"}
    private = train(run_config(method="adadpigu", privacy=NEUTRAL["privacy"], adadpigu=adadpigu))
    baseline = train(run_config(method="nonprivate"))
    assert max_abs_diff(params_of(private.model), params_of(baseline.model)) > 1e-4


# --- the mask is built from noised releases only --------------------------------------------------

MASK_SHAPES = {"w": (8, 20), "b": (40,)}  # D = 200
TOP_K = 20


def _true_top() -> dict[str, torch.Tensor]:
    """The coordinates whose expected gradient is large, known by construction (20 of 200)."""
    order = torch.randperm(200, generator=make_generator(99))[:TOP_K]
    flat = torch.zeros(200, dtype=torch.bool)
    flat[order] = True
    return {"w": flat[:160].reshape(8, 20), "b": flat[160:]}


def _stage1_mask(*, sigma: float, noise_seed: int, steps: int = 10, batch: int = 16) -> int:
    """Run stage 1 on a gradient stream whose signal lives on the true top set; return the overlap
    of the ρ = 0.1 mask (20 coordinates) with that set."""
    top = _true_top()
    data = make_generator(1000 + noise_seed)
    noise = make_generator(noise_seed)
    params = {n: torch.zeros(s, dtype=F64) for n, s in MASK_SHAPES.items()}
    scores = zero_scores(params)
    clip_norm = 1.0
    for _ in range(steps):
        per_example = {
            n: top[n].to(F64) + 0.05 * torch.randn(batch, *s, generator=data, dtype=F64)
            for n, s in MASK_SHAPES.items()
        }
        released, _ = dp_release(
            per_example,
            clip_norm=clip_norm,
            grad_noise_multiplier=sigma,
            count_std=None,
            expected_batch_size=float(batch),
            noise_generator=noise,
        )
        accumulate_importance(
            scores,
            kind=ImportanceKind.ABS_SUM,
            released=released,
            params=params,
            noise_variance=(sigma * clip_norm / batch) ** 2,
        )
    mask = global_mask(scores, keep_ratio=0.1)
    assert sum(int(m.sum()) for m in mask.values()) == TOP_K
    return sum(int((mask[n] & top[n]).sum()) for n in mask)


def test_mask_recovers_the_true_top_set_without_noise() -> None:
    assert _stage1_mask(sigma=0.0, noise_seed=0) == TOP_K


def test_mask_under_huge_noise_overlaps_the_true_top_set_at_chance() -> None:
    replicates = 40
    overlaps = [_stage1_mask(sigma=1e3, noise_seed=seed) for seed in range(replicates)]
    # Under the null the overlap is hypergeometric(D=200, K=20, n=20): mean ρ·k = 2.
    null = stats.hypergeom(200, TOP_K, TOP_K)
    mean_std = math.sqrt(null.var() / replicates)
    assert abs(np.mean(overlaps) - null.mean()) < 4 * mean_std, overlaps
    assert max(overlaps) <= null.ppf(1 - 1e-4), overlaps


class _Capture:
    """Wrap the release functions that `training` calls, keeping what they released and the
    pre-noise clipped means (which must never reach the importance or the statistics)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.stage1: list[dict[str, Any]] = []
        self.stage2: list[dict[str, Any]] = []
        real_dp, real_adaptive = training.dp_release, training.adaptive_release

        def dp(per_example: dict[str, torch.Tensor], **kwargs: Any) -> Any:
            pre = clip_and_sum(per_example, clip_norm=kwargs["clip_norm"]).total
            grad, count = real_dp(per_example, **kwargs)
            qn = kwargs["expected_batch_size"]
            pre_noise = {n: t / qn for n, t in pre.items()}
            self.stage1.append({"released": clone(grad), "pre_noise": pre_noise})
            return grad, count

        def adaptive(per_example: dict[str, torch.Tensor], **kwargs: Any) -> Any:
            grad, count = real_adaptive(per_example, **kwargs)
            public = ("clip_norm", "grad_noise_multiplier", "expected_batch_size")
            step = {k: kwargs[k] for k in public}
            self.stage2.append({"released": clone(grad), "scale": clone(kwargs["scale"]), **step})
            return grad, count

        monkeypatch.setattr(training, "dp_release", dp)
        monkeypatch.setattr(training, "adaptive_release", adaptive)


def test_importance_mask_and_statistics_come_from_released_gradients_only(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    capture = _Capture(monkeypatch)
    config = run_config(
        method="adadpigu",
        privacy={"noise_multiplier": 1.0, "delta": 1e-3, "noise_seed": 5},
        adadpigu={"keep_ratio": 0.5, "stage1_fraction": 0.5},
    )
    state = train(config)
    assert len(capture.stage1) == 8 and len(capture.stage2) == 8
    assert state.importance is not None and state.mask is not None and state.stats is not None

    from_releases = {n: torch.zeros_like(t) for n, t in state.importance.items()}
    from_pre_noise = {n: torch.zeros_like(t) for n, t in state.importance.items()}
    for step in capture.stage1:
        for n in from_releases:
            from_releases[n] += step["released"][n].abs()
            from_pre_noise[n] += step["pre_noise"][n].abs()
    # Importance is exactly the accumulation of the released ĝ, far from the pre-noise one ...
    assert max_abs_diff(state.importance, from_releases) == 0.0
    assert l2({n: state.importance[n] - from_pre_noise[n] for n in from_pre_noise}) > 0.3 * l2(
        from_pre_noise
    )
    # ... and the mask is the ranking of those scores, not of the pre-noise ones.
    released_mask = global_mask(from_releases, keep_ratio=0.5)
    pre_noise_mask = global_mask(from_pre_noise, keep_ratio=0.5)
    for n in state.mask:
        assert torch.equal(state.mask[n], released_mask[n])
    assert any(not torch.equal(released_mask[n], pre_noise_mask[n]) for n in state.mask)

    # The adaptive statistics are the EMA of the released ĝ (minus the known noise variance).
    cfg = config.adadpigu
    mean = {n: torch.zeros_like(t) for n, t in state.importance.items()}
    var = {n: torch.ones_like(t) for n, t in state.importance.items()}
    for step in capture.stage2:
        qn, sigma, clip = (
            step["expected_batch_size"],
            step["grad_noise_multiplier"],
            step["clip_norm"],
        )
        for n, g in step["released"].items():
            keep = state.mask[n]
            noise_var = (sigma * clip * step["scale"][n] / qn) ** 2
            new_var = cfg.beta2 * var[n] + (1 - cfg.beta2) * ((g - mean[n]).square() - noise_var)
            var[n] = torch.where(keep, new_var.clamp(cfg.s_min, cfg.s_max), var[n])
            mean[n] = torch.where(keep, cfg.beta1 * mean[n] + (1 - cfg.beta1) * g, mean[n])
    assert max_abs_diff(state.stats.mean, mean) < 1e-12
    assert max_abs_diff(state.stats.variance, var) < 1e-12


# --- sensitivity on neighbouring datasets ---------------------------------------------------------


def _clip_after_some_steps(config: ClipConfig) -> float:
    state = initial_clip(config)
    for fraction in (0.9, 0.2, 0.7, 0.95):
        state = advance_clip(config, state, stage_steps=10, unclipped_fraction=fraction)
    assert state.step == 4
    return state.norm


CLIP_SCHEDULES = {
    "constant": ClipConfig(c0=0.9),
    "exp_decay": ClipConfig(schedule=ClipScheduleKind.EXP_DECAY, c0=2.0, c_final=0.2),
    "linear_decay": ClipConfig(schedule=ClipScheduleKind.LINEAR_DECAY, c0=2.0, c_final=0.2),
    "quantile": ClipConfig(schedule=ClipScheduleKind.QUANTILE, c0=1.3),
}


def _adversaries(model: nn.Module, params: dict[str, torch.Tensor]) -> Iterator[tuple[str, dict]]:
    """One added example's per-example gradient, worst cases first."""
    huge_x, huge_y = tiny_batch(1, seed=77, scale=1e4)
    yield "huge input", per_example_gradients(model, params, huge_x, huge_y)
    yield "huge gradient", {n: torch.full((1, *p.shape), 1e8, dtype=F64) for n, p in params.items()}
    yield "zero gradient", {n: torch.zeros((1, *p.shape), dtype=F64) for n, p in params.items()}
    x, y = tiny_batch(1, seed=78)
    yield "ordinary", per_example_gradients(model, params, x, y)


def _cat(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {n: torch.cat([a[n], b[n]]) for n in a}


@pytest.mark.parametrize("schedule", list(CLIP_SCHEDULES))
@pytest.mark.parametrize("normalised", [False, True], ids=["raw", "normalised"])
def test_presum_changes_by_at_most_clip_norm_on_neighbouring_datasets(
    schedule: str, normalised: bool
) -> None:
    clip_config = CLIP_SCHEDULES[schedule]
    clip_norm = _clip_after_some_steps(clip_config)
    assert clip_norm != clip_config.c0 or schedule == "constant"
    model = tiny_mlp()
    params = params_of(model)
    x, y = tiny_batch(12)
    base = per_example_gradients(model, params, x, y)
    g = make_generator(8)
    mask = {n: torch.rand(p.shape, generator=g, dtype=F64) < 0.6 for n, p in params.items()}
    mean = {n: torch.randn(p.shape, generator=g, dtype=F64) for n, p in params.items()}
    # Tiny scales blow the normalised gradient up; clipping must still bound it.
    scale = {
        n: 10 ** torch.empty(p.shape, dtype=F64).uniform_(-4, 0.5, generator=g)
        for n, p in params.items()
    }

    def presum(per_example: dict[str, torch.Tensor]) -> Any:
        per_example = clone(per_example)
        if normalised:
            normalise_(per_example, mask=mask, mean=mean, scale=scale)
        return clip_and_sum(per_example, clip_norm=clip_norm)

    without = presum(base)
    assert without.sensitivity == clip_norm
    for name, extra in _adversaries(model, params):
        with_extra = presum(_cat(base, extra))
        change = l2({n: with_extra.total[n] - without.total[n] for n in without.total})
        assert change <= clip_norm * (1 + 1e-9), (name, change, clip_norm)
        if name == "huge gradient":
            assert change == pytest.approx(clip_norm, rel=1e-9)  # clipped to exactly C_t
        centred = (with_extra.unclipped - with_extra.batch_size / 2) - (
            without.unclipped - without.batch_size / 2
        )
        assert abs(float(centred)) == 0.5  # the quantile count has sensitivity ½


def test_released_stage2_gradients_of_neighbours_differ_by_clip_norm_at_most() -> None:
    # Through the whole mechanism, with the same noise draw: (ĝ' − ĝ)·qN / b is the change of the
    # normalised clipped sum, so its norm is ≤ C on kept coordinates and 0 elsewhere.
    model = tiny_mlp()
    params = params_of(model)
    x, y = tiny_batch(12)
    base = per_example_gradients(model, params, x, y)
    g = make_generator(9)
    mask = {n: torch.rand(p.shape, generator=g, dtype=F64) < 0.6 for n, p in params.items()}
    mean = {n: 0.1 * torch.randn(p.shape, generator=g, dtype=F64) for n, p in params.items()}
    scale = {
        n: torch.empty(p.shape, dtype=F64).uniform_(1e-3, 2.0, generator=g)
        for n, p in params.items()
    }
    clip_norm, qn = 0.7, 10.0

    def release(per_example: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        grad, _ = adaptive_release(
            clone(per_example),
            mask=mask,
            mean=mean,
            scale=scale,
            clip_norm=clip_norm,
            grad_noise_multiplier=2.0,
            count_std=None,
            expected_batch_size=qn,
            noise_generator=make_generator(10),
        )
        return grad

    without = release(base)
    for name, extra in _adversaries(model, params):
        with_extra = release(_cat(base, extra))
        diff = {n: (with_extra[n] - without[n]) * qn / scale[n] for n in without}
        assert l2(diff) <= clip_norm * (1 + 1e-9), name
        for n in diff:
            assert torch.equal(with_extra[n][~mask[n]], torch.zeros_like(with_extra[n][~mask[n]]))


# --- noise on kept coordinates only ---------------------------------------------------------------


@pytest.mark.parametrize("schedule", ["constant", "quantile"])
def test_stage2_noise_has_scale_sigma_c_b_over_qn_on_kept_and_none_on_pruned(schedule: str) -> None:
    sigma, clip_norm, n_train, batch = 1.1, 0.7, 2000, 40
    config = TrainConfig.from_dict(
        {
            "method": "adadpigu",
            "training": {"batch_size": batch},
            "privacy": {"noise_multiplier": sigma, "delta": 1e-4},
            "adadpigu": {"clip": {"schedule": schedule, "c0": clip_norm}},
        }
    )
    plan = make_plan(config, n_train=n_train)
    noise = plan.stage2_noise
    if schedule == "quantile":
        assert noise.count_std == batch / 20
        assert noise.grad_multiplier == quantile_noise_split(noise_multiplier=sigma, count_std=2.0)
        assert noise.grad_multiplier > sigma
    else:
        assert (noise.grad_multiplier, noise.count_std) == (sigma, None)

    g = make_generator(13)
    shapes = {"w": (90, 60), "b": (900,)}
    mask = {n: torch.rand(s, generator=g) < 0.6 for n, s in shapes.items()}
    scale = {
        n: torch.empty(s, dtype=F64).uniform_(0.2, 5.0, generator=g) for n, s in shapes.items()
    }
    released, count = adaptive_release(
        {n: torch.zeros(3, *s, dtype=F64) for n, s in shapes.items()},
        mask=mask,
        mean={n: torch.zeros(s, dtype=F64) for n, s in shapes.items()},
        scale=scale,
        clip_norm=clip_norm,
        grad_noise_multiplier=noise.grad_multiplier,
        count_std=noise.count_std,
        expected_batch_size=plan.expected_batch_size,
        noise_generator=make_generator(14),
    )
    assert (count is None) == (schedule == "constant")
    kept = torch.cat([(released[n] / scale[n])[mask[n]] for n in shapes])
    pruned = torch.cat([released[n][~mask[n]] for n in shapes])
    assert kept.numel() > 3000 and pruned.numel() > 2000
    assert torch.equal(pruned, torch.zeros_like(pruned))
    assert_ks_scale(kept, noise.grad_multiplier * clip_norm / plan.expected_batch_size)

    # The release W̃ itself (before de-normalisation) carries no noise on pruned coordinates.
    noised = release_sum(
        {n: torch.zeros(3, *s, dtype=F64) for n, s in shapes.items()},
        clip_norm=clip_norm,
        grad_noise_multiplier=noise.grad_multiplier,
        count_std=noise.count_std,
        noise_generator=make_generator(15),
        noise_mask=mask,
    )
    assert all(
        torch.equal(noised.total[n][~mask[n]], torch.zeros_like(noised.total[n][~mask[n]]))
        for n in shapes
    )
    kept_sum = torch.cat([noised.total[n][mask[n]] for n in shapes])
    assert_ks_scale(kept_sum, noise.grad_multiplier * clip_norm)


# --- the quantile schedule ------------------------------------------------------------------------


@pytest.mark.parametrize("target", [0.5, 0.9])
def test_quantile_clip_converges_to_the_target_quantile_of_norms(target: float) -> None:
    n, rate = 4000, 0.05
    norms = torch.exp(0.5 * torch.randn(n, generator=make_generator(15), dtype=F64))  # lognormal
    config = ClipConfig(schedule=ClipScheduleKind.QUANTILE, c0=0.05, target_quantile=target)
    count_std = n * rate / 20
    sampler, noise = make_generator(16), make_generator(17)
    state, trace = initial_clip(config), []
    for _ in range(500):
        idx = poisson_sample(torch.arange(n), rate=rate, generator=sampler)
        released = release_sum(
            {"g": norms[idx].unsqueeze(1)},  # a 1-D gradient whose norm is the drawn norm
            clip_norm=state.norm,
            grad_noise_multiplier=1.0,
            count_std=count_std,
            noise_generator=noise,
        )
        assert released.centred_count is not None
        fraction = noised_unclipped_fraction(
            noised_centred_count=released.centred_count, expected_batch_size=n * rate
        )
        state = advance_clip(config, state, stage_steps=500, unclipped_fraction=fraction)
        trace.append(state.norm)
    settled = float(np.exp(np.mean(np.log(trace[250:]))))
    truth = float(torch.quantile(norms, target))
    assert settled == pytest.approx(truth, rel=0.05)
    assert float((norms <= settled).double().mean()) == pytest.approx(target, abs=0.03)


@pytest.mark.parametrize(("sigma", "count_std"), [(0.5, 0.3), (1.0, 12.8), (4.0, 2.5), (7.9, 4.0)])
def test_quantile_noise_split_is_one_gaussian_with_multiplier_sigma(
    sigma: float, count_std: float
) -> None:
    sigma_delta = quantile_noise_split(noise_multiplier=sigma, count_std=count_std)
    assert sigma_delta > sigma
    assert sigma**-2 == pytest.approx(sigma_delta**-2 + (2 * count_std) ** -2, rel=1e-12)
    # Independently: the RDP of the pair (gradient at σ_Δ, count of sensitivity ½ at σ_b, i.e. a
    # multiplier 2σ_b) composes to that of one Gaussian with multiplier σ.
    pair, single = RdpAccountant(), RdpAccountant()
    pair.compose(
        dp_event.ComposedDpEvent(
            [dp_event.GaussianDpEvent(sigma_delta), dp_event.GaussianDpEvent(2 * count_std)]
        )
    )
    single.compose(dp_event.GaussianDpEvent(sigma))
    assert pair.get_epsilon(1e-5) == pytest.approx(single.get_epsilon(1e-5), rel=1e-9)


@pytest.mark.parametrize(("sigma", "count_std"), [(1.0, 0.5), (2.0, 0.9), (3.0, 1.5)])
def test_quantile_noise_split_needs_two_sigma_b_above_sigma(sigma: float, count_std: float) -> None:
    with pytest.raises(ConfigError) as info:
        quantile_noise_split(
            noise_multiplier=sigma, count_std=count_std, field="adadpigu.clip.count_noise"
        )
    assert info.value.field == "adadpigu.clip.count_noise"


def test_plan_rejects_a_count_noise_too_small_for_sigma() -> None:
    explicit = TrainConfig.from_dict(
        {
            "method": "adadpigu",
            "privacy": {"noise_multiplier": 1.0, "delta": 1e-5},
            "adadpigu": {"clip": {"schedule": "quantile", "count_noise": 0.4}},
        }
    )
    with pytest.raises(ConfigError) as info:
        make_plan(explicit, n_train=10_000)
    assert info.value.field == "adadpigu.clip.count_noise"
    # The default σ_b = qN/20 is too small for the σ a small ε needs at batch 10.
    calibrated = TrainConfig.from_dict(
        {
            "method": "dpsgd",
            "training": {"batch_size": 10},
            "privacy": {"epsilon": 0.5, "delta": 1e-5, "clip": {"schedule": "quantile"}},
        }
    )
    with pytest.raises(ConfigError) as info:
        make_plan(calibrated, n_train=10_000)
    assert info.value.field == "privacy.clip.count_noise"


def _dp_accounting_epsilon(*, sigma: float, rate: float, steps: int, delta: float) -> float:
    accountant = RdpAccountant()
    accountant.compose(
        dp_event.PoissonSampledDpEvent(rate, dp_event.GaussianDpEvent(sigma)), count=steps
    )
    return accountant.get_epsilon(delta)


def test_planned_quantile_run_spends_at_most_the_target_epsilon() -> None:
    target, tolerance = 3.0, 0.01
    config = TrainConfig.from_dict(
        {
            "method": "adadpigu",
            "training": {"batch_size": 200, "epochs": 2},
            "privacy": {
                "epsilon": target,
                "delta": 1e-5,
                "epsilon_tolerance": tolerance,
                "clip": {"schedule": "quantile"},
            },
            "adadpigu": {"clip": {"schedule": "quantile"}},
        }
    )
    plan = make_plan(config, n_train=10_000)
    epsilon = plan.epsilon_for(plan.total_steps)
    assert target * (1 - tolerance) <= epsilon <= target
    independent = _dp_accounting_epsilon(
        sigma=plan.noise_multiplier, rate=plan.sample_rate, steps=plan.total_steps, delta=1e-5
    )
    assert independent == pytest.approx(epsilon, rel=0.02)
    # Both stages spend σ through the (σ_Δ, σ_b) pair: each is one Gaussian of multiplier σ.
    for noise in (plan.stage1_noise, plan.stage2_noise):
        assert noise.count_std == 200 / 20
        assert noise.grad_multiplier**-2 + (2 * noise.count_std) ** -2 == pytest.approx(
            plan.noise_multiplier**-2, rel=1e-12
        )


# --- a full run: ε, metrics and mask.npz ----------------------------------------------------------

RUN = {
    "method": "adadpigu",
    "seed": 2,
    "data": {"name": "synthetic", "synthetic_size": 600, "validation_size": 100},
    "model": {"name": "mlp"},
    "training": {"epochs": 3, "batch_size": 50, "lr": 0.5},
    "privacy": {"epsilon": 5.0, "delta": 1e-4},
    "adadpigu": {"keep_ratio": 0.6, "stage1_fraction": 0.3},
    "runtime": {"eval_batch_size": 1024},
}


@pytest.fixture(scope="module")
def adadpigu_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Any], Path]:
    from study.runner import execute_run

    out_dir = tmp_path_factory.mktemp("adadpigu_run")
    return execute_run(TrainConfig.from_dict(RUN), out_dir=out_dir), out_dir


def test_reported_epsilon_matches_independent_accounting(adadpigu_run: tuple[dict, Path]) -> None:
    metrics, _ = adadpigu_run
    assert metrics["steps"] == metrics["planned_steps"] == 30
    assert metrics["sample_rate"] == 0.1
    ours = compute_epsilon(
        noise_multiplier=metrics["sigma"],
        sample_rate=metrics["sample_rate"],
        steps=metrics["steps"],
        delta=metrics["delta"],
    )
    assert metrics["epsilon"] == ours
    assert 5.0 * (1 - 0.01) <= metrics["epsilon"] <= 5.0
    independent = _dp_accounting_epsilon(
        sigma=metrics["sigma"], rate=0.1, steps=30, delta=metrics["delta"]
    )
    assert metrics["epsilon"] == pytest.approx(independent, rel=0.02)
    assert metrics["adadpigu"]["epsilon_after_stage1"] == compute_epsilon(
        noise_multiplier=metrics["sigma"], sample_rate=0.1, steps=9, delta=metrics["delta"]
    )
    assert metrics["privacy"]["private"] is True


def test_run_writes_mask_and_adadpigu_metrics(adadpigu_run: tuple[dict, Path]) -> None:
    metrics, out_dir = adadpigu_run
    names = list(torch.load(out_dir / "model.pt", weights_only=True))
    summary = metrics["adadpigu"]
    assert summary["keep_ratio"] == 0.6
    assert summary["stage1_steps"] == 9 and summary["stage2_steps"] == 21
    assert 0 < summary["epsilon_after_stage1"] < summary["epsilon_total"] == metrics["epsilon"]
    assert set(summary["kept_per_tensor"]) == set(names)

    with np.load(out_dir / "mask.npz") as arrays:
        assert set(arrays.files) == {
            f"{n}/{kind}" for n in names for kind in ("mask", "importance")
        }
        masks = {n: arrays[f"{n}/mask"] for n in names}
        scores = {n: arrays[f"{n}/importance"] for n in names}
    total = sum(m.size for m in masks.values())
    assert (
        sum(int(m.sum()) for m in masks.values()) == summary["kept_total"] == math.ceil(0.6 * total)
    )
    for n in names:
        assert masks[n].dtype == bool and masks[n].shape == scores[n].shape
        assert int(masks[n].sum()) == summary["kept_per_tensor"][n]
    # The mask keeps the top of the (abs_sum, non-negative) importance ranking.
    kept = np.concatenate([scores[n][masks[n]] for n in names])
    pruned = np.concatenate([scores[n][~masks[n]] for n in names])
    assert kept.min() >= pruned.max() >= 0


# --- config validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"keep_ratio": 0.0}, "adadpigu.keep_ratio"),
        ({"keep_ratio": -0.2}, "adadpigu.keep_ratio"),
        ({"keep_ratio": 1.01}, "adadpigu.keep_ratio"),
        ({"stage1_fraction": -0.1}, "adadpigu.stage1_fraction"),
        ({"stage1_fraction": 1.0}, "adadpigu.stage1_fraction"),
        ({"stage1_fraction": 0.0, "keep_ratio": 0.6}, "adadpigu.stage1_fraction"),
        ({"gamma": 0.0}, "adadpigu.gamma"),
        ({"gamma": -1e-8}, "adadpigu.gamma"),
        ({"beta1": 1.0}, "adadpigu.beta1"),
        ({"beta1": -0.1}, "adadpigu.beta1"),
        ({"beta2": 1.0}, "adadpigu.beta2"),
        ({"release_final_keep_ratio": 0.5, "keep_ratio": 0.6}, "adadpigu.release_final_keep_ratio"),
        ({"normalisation": "batchnorm"}, "adadpigu.normalisation"),
        ({"importance": "oracle"}, "adadpigu.importance"),
        ({"clip": {"schedule": "exp_decay", "c0": 1.0}}, "adadpigu.clip.c_final"),
        ({"clip": {"target_quantile": 1.0}}, "adadpigu.clip.target_quantile"),
        ({"keep_ratio_typo": 0.5}, "adadpigu.keep_ratio_typo"),
    ],
)
def test_bad_adadpigu_settings_name_the_field(settings: dict, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"method": "adadpigu", "adadpigu": settings})
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}:")


@pytest.mark.parametrize(
    "settings",
    [{"keep_ratio": 1.0, "stage1_fraction": 0.0}, {"keep_ratio": 1.0}, {"stage1_fraction": 0.99}],
)
def test_edge_adadpigu_settings_are_allowed(settings: dict) -> None:
    TrainConfig.from_dict({"method": "adadpigu", "adadpigu": settings})


def test_sq_debiased_importance_of_pure_noise_is_centred() -> None:
    # Debiasing subtracts exactly the known noise variance: pure noise scores ≈ 0 on average.
    sigma, clip_norm, qn, steps = 2.0, 1.0, 8.0, 50
    params = {"w": torch.zeros(4000, dtype=F64)}
    scores = zero_scores(params)
    noise = make_generator(20)
    variance = (sigma * clip_norm / qn) ** 2
    for _ in range(steps):
        released, _ = dp_release(
            {"w": torch.zeros(2, 4000, dtype=F64)},
            clip_norm=clip_norm,
            grad_noise_multiplier=sigma,
            count_std=None,
            expected_batch_size=qn,
            noise_generator=noise,
        )
        accumulate_importance(
            scores,
            kind=ImportanceKind.SQ_DEBIASED,
            released=released,
            params=params,
            noise_variance=variance,
        )
    # Each score is a sum of `steps` centred (χ²₁ − 1)·variance terms: std √(2·steps)·variance.
    mean_std = math.sqrt(2 * steps) * variance / math.sqrt(4000)
    assert abs(float(scores["w"].mean())) < 4 * mean_std


def test_clip_state_is_public_and_advances_one_step() -> None:
    state = advance_clip(ClipConfig(c0=0.5), ClipState(norm=0.5), stage_steps=3)
    assert state == ClipState(norm=0.5, step=1)
