"""Clip-norm schedules C_t: small pure objects, one update function per `ClipScheduleKind`.

Adding a schedule is adding an enum member in `config.py` and a function in `_UPDATES`. Only the
quantile schedule reads data, and only through the noised fraction of unclipped examples, whose cost is
charged by lowering the gradient's noise to σ_Δ (see `quantile_noise_split`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

from adadpigu.config import ClipConfig, ClipScheduleKind, ConfigError

__all__ = ["ClipState", "NoiseSplit", "advance_clip", "initial_clip", "quantile_noise_split"]


@dataclasses.dataclass(frozen=True)
class ClipState:
    """The clip norm for the next step of a stage and the stage's step counter (public)."""

    norm: float
    step: int = 0


@dataclasses.dataclass(frozen=True)
class NoiseSplit:
    """Noise multipliers for one step: σ_grad on the gradient sum, count_std on the clip count (or None)."""

    grad_multiplier: float
    count_std: float | None


def initial_clip(config: ClipConfig) -> ClipState:
    return ClipState(norm=config.c0, step=0)


def quantile_noise_split(
    *, noise_multiplier: float, count_std: float, field: str = "clip.count_noise"
) -> float:
    """σ_Δ = (σ⁻² − (2σ_b)⁻²)^(−1/2): gradient (sensitivity C) and count (sensitivity ½) together cost
    exactly one Gaussian mechanism with multiplier σ. Needs 2σ_b > σ."""
    if noise_multiplier == 0:
        return 0.0
    if not 2 * count_std > noise_multiplier:
        raise ConfigError(
            field,
            "quantile clipping needs 2·σ_b > σ; "
            f"got σ_b={count_std:.4g}, σ={noise_multiplier:.4g}: "
            "raise count_noise (or the batch size, since it defaults to qN/20)",
        )
    return (noise_multiplier**-2 - (2 * count_std) ** -2) ** -0.5


def noise_split(
    config: ClipConfig, *, noise_multiplier: float, expected_batch_size: float, field: str
) -> NoiseSplit:
    """How a stage with this schedule spends σ: all on the gradient, or split with the quantile count."""
    if config.schedule is not ClipScheduleKind.QUANTILE:
        return NoiseSplit(grad_multiplier=noise_multiplier, count_std=None)
    count_std = config.count_noise if config.count_noise is not None else expected_batch_size / 20
    grad = quantile_noise_split(noise_multiplier=noise_multiplier, count_std=count_std, field=field)
    return NoiseSplit(grad_multiplier=grad, count_std=count_std)


def _constant(
    config: ClipConfig, state: ClipState, *, stage_steps: int, unclipped_fraction: float | None
) -> float:
    return config.c0


def _fraction(step: int, stage_steps: int) -> float:
    return min(1.0, step / max(1, stage_steps - 1))


def _exp_decay(
    config: ClipConfig, state: ClipState, *, stage_steps: int, unclipped_fraction: float | None
) -> float:
    assert config.c_final is not None
    return config.c0 * (config.c_final / config.c0) ** _fraction(state.step + 1, stage_steps)


def _linear_decay(
    config: ClipConfig, state: ClipState, *, stage_steps: int, unclipped_fraction: float | None
) -> float:
    assert config.c_final is not None
    return config.c0 + (config.c_final - config.c0) * _fraction(state.step + 1, stage_steps)


def _quantile(
    config: ClipConfig, state: ClipState, *, stage_steps: int, unclipped_fraction: float | None
) -> float:
    if unclipped_fraction is None:
        raise ValueError("the quantile schedule needs the released unclipped fraction")
    return state.norm * math.exp(
        -config.quantile_lr * (unclipped_fraction - config.target_quantile)
    )


_UPDATES: dict[ClipScheduleKind, Callable[..., float]] = {
    ClipScheduleKind.CONSTANT: _constant,
    ClipScheduleKind.EXP_DECAY: _exp_decay,
    ClipScheduleKind.LINEAR_DECAY: _linear_decay,
    ClipScheduleKind.QUANTILE: _quantile,
}


def advance_clip(
    config: ClipConfig,
    state: ClipState,
    *,
    stage_steps: int,
    unclipped_fraction: float | None = None,
) -> ClipState:
    """The clip state after one step. `unclipped_fraction` must be the noised estimate b̃_t."""
    norm = _UPDATES[config.schedule](
        config, state, stage_steps=stage_steps, unclipped_fraction=unclipped_fraction
    )
    return ClipState(norm=norm, step=state.step + 1)


def noised_unclipped_fraction(*, noised_centred_count: float, expected_batch_size: float) -> float:
    """b̃ = (Σ(1[‖w_i‖≤C] − ½) + N(0, σ_b²)) / (qN) + ½, clamped to [0, 1]: post-processing of a release."""
    return min(1.0, max(0.0, noised_centred_count / expected_batch_size + 0.5))
