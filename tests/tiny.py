"""Shared helpers for the core's unit tests: a tiny float64 model and batch, comparisons, and the
Kolmogorov–Smirnov noise-scale check (accepts the right scale, rejects 2/3 and 3/2 of it)."""

from __future__ import annotations

import torch
from scipy import stats
from torch import nn

from adadpigu.config import ModelConfig
from adadpigu.models import build_model
from adadpigu.noise import make_generator

F64 = torch.float64
INPUT_SHAPE = (1, 4, 4)
NUM_CLASSES = 3


def tiny_mlp(seed: int = 0) -> nn.Module:
    model = build_model(
        ModelConfig(name="mlp"),
        input_shape=INPUT_SHAPE,
        num_classes=NUM_CLASSES,
        generator=make_generator(seed),
    )
    return model.to(F64)


def tiny_batch(n: int, *, seed: int = 1, scale: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = make_generator(seed)
    x = torch.randn(n, *INPUT_SHAPE, generator=generator, dtype=F64) * scale
    y = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    return x, y


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def ks_scale_pvalues(samples: torch.Tensor, std: float) -> dict[float, float]:
    """KS p-values of `samples` against N(0, (f·std)²) for f = 1, 2/3, 3/2."""
    values = samples.double().cpu().numpy()
    return {f: stats.kstest(values / (f * std), "norm").pvalue for f in (1.0, 2 / 3, 3 / 2)}


def assert_ks_scale(samples: torch.Tensor, std: float) -> None:
    p = ks_scale_pvalues(samples, std)
    assert p[1.0] > 1e-3, f"the right scale {std} is rejected (p={p[1.0]:.3g})"
    assert p[2 / 3] < 1e-6, f"2/3 of the scale is not rejected (p={p[2 / 3]:.3g})"
    assert p[3 / 2] < 1e-6, f"3/2 of the scale is not rejected (p={p[3 / 2]:.3g})"
