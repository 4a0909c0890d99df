"""The public plan of a run: q, steps, stage boundary and the calibrated noise, derived from the config
and the training-set size N (treated as public). One calibration covers the whole run."""

from __future__ import annotations

import dataclasses
import math

from adadpigu.accounting import calibrate_noise, check_delta, compute_epsilon
from adadpigu.config import ConfigError, Method, TrainConfig
from adadpigu.schedules import NoiseSplit, noise_split

__all__ = ["TrainingPlan", "make_plan"]


@dataclasses.dataclass(frozen=True)
class TrainingPlan:
    method: Method
    n_train: int
    sample_rate: float
    expected_batch_size: float
    steps_per_epoch: int
    total_steps: int
    stage1_steps: int
    noise_multiplier: float
    target_epsilon: float | None
    delta: float
    accountant: str
    stage1_noise: NoiseSplit
    stage2_noise: NoiseSplit

    @property
    def is_private(self) -> bool:
        return self.method.is_private

    def epsilon_for(self, steps: int) -> float:
        """ε of `steps` executed steps of this plan (0 for the non-private method is meaningless: inf)."""
        if not self.is_private:
            return math.inf
        return compute_epsilon(
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=steps,
            delta=self.delta,
            accountant=self.accountant,
        )

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["method"] = self.method.value
        return out


def make_plan(config: TrainConfig, *, n_train: int) -> TrainingPlan:
    """Derive q, T, T1 and σ. Raises ConfigError (naming the field) when the plan is invalid."""
    training, privacy = config.training, config.privacy
    if training.batch_size is not None:
        if training.batch_size > n_train:
            raise ConfigError(
                "training.batch_size",
                f"got {training.batch_size}; allowed: 1..N={n_train} (training-set size)",
            )
        sample_rate = training.batch_size / n_train
    else:
        assert training.sample_rate is not None
        sample_rate = training.sample_rate
    expected = sample_rate * n_train
    steps_per_epoch = max(1, round(1 / sample_rate))
    total_steps = max(1, round(training.epochs * steps_per_epoch))
    stage1_steps = total_steps
    if config.method is Method.ADADPIGU:
        fraction = config.adadpigu.stage1_fraction
        stage1_steps = (
            0 if fraction == 0 else min(total_steps - 1, max(1, round(fraction * total_steps)))
        )
        if fraction > 0 and total_steps < 2:
            raise ConfigError("adadpigu.stage1_fraction", "a two-stage run needs at least 2 steps")

    sigma, target = 0.0, None
    if config.method.is_private:
        try:
            check_delta(delta=privacy.delta, dataset_size=n_train)
        except ValueError as exc:
            raise ConfigError("privacy.delta", str(exc)) from exc
        if privacy.noise_multiplier is not None:
            sigma = privacy.noise_multiplier
        else:
            target = privacy.epsilon
            sigma = calibrate_noise(
                epsilon=privacy.epsilon,
                delta=privacy.delta,
                sample_rate=sample_rate,
                steps=total_steps,
                accountant=privacy.accountant,
                tolerance=privacy.epsilon_tolerance,
            )
    stage1 = noise_split(
        privacy.clip,
        noise_multiplier=sigma,
        expected_batch_size=expected,
        field="privacy.clip.count_noise",
    )
    stage2 = (
        noise_split(
            config.adadpigu.clip,
            noise_multiplier=sigma,
            expected_batch_size=expected,
            field="adadpigu.clip.count_noise",
        )
        if config.method is Method.ADADPIGU
        else stage1
    )
    if not config.method.is_private:
        stage1 = stage2 = NoiseSplit(grad_multiplier=0.0, count_std=None)
    return TrainingPlan(
        method=config.method,
        n_train=n_train,
        sample_rate=sample_rate,
        expected_batch_size=expected,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
        stage1_steps=stage1_steps,
        noise_multiplier=sigma,
        target_epsilon=target,
        delta=privacy.delta,
        accountant=privacy.accountant.value,
        stage1_noise=stage1,
        stage2_noise=stage2,
    )
