"""Coordinate-wise adaptive normalisation for stage 2 (AdaClip-style), from public statistics only.

m (mean) and s (variance) are updated from the released gradient ĝ after every step: post-processing,
no privacy cost. They are never computed from per-example or pre-noise gradients.
"""

from __future__ import annotations

import dataclasses

import torch

__all__ = ["AdaptiveStats", "denormalise", "init_stats", "normalise_", "scales", "update_stats_"]


@dataclasses.dataclass
class AdaptiveStats:
    mean: dict[str, torch.Tensor]
    variance: dict[str, torch.Tensor]


def init_stats(params: dict[str, torch.Tensor]) -> AdaptiveStats:
    """m₀ = 0, s₀ = 1: stage 2 starts as masked DP-SGD and adapts."""
    return AdaptiveStats(
        mean={n: torch.zeros_like(p) for n, p in params.items()},
        variance={n: torch.ones_like(p) for n, p in params.items()},
    )


def scales(stats: AdaptiveStats, *, gamma: float) -> dict[str, torch.Tensor]:
    """b = √s + γ."""
    return {n: s.sqrt() + gamma for n, s in stats.variance.items()}


def normalise_(
    per_example: dict[str, torch.Tensor],
    *,
    mask: dict[str, torch.Tensor],
    mean: dict[str, torch.Tensor],
    scale: dict[str, torch.Tensor],
) -> None:
    """In place: w_i = (M ⊙ g_i − m) / b on kept coordinates, 0 on pruned ones (private, not released)."""
    for name, g in per_example.items():
        # Two passes over the B×D block: scale by M/b, then subtract the (D-sized) m·M/b.
        factor = mask[name].to(g.dtype) / scale[name]
        g.mul_(factor).sub_(mean[name] * factor)


def denormalise(
    noised_sum: dict[str, torch.Tensor],
    *,
    mask: dict[str, torch.Tensor],
    mean: dict[str, torch.Tensor],
    scale: dict[str, torch.Tensor],
    expected_batch_size: float,
) -> dict[str, torch.Tensor]:
    """ĝ = b ⊙ W̃ / (qN) + m on kept coordinates, 0 elsewhere (post-processing of the release W̃)."""
    return {
        n: torch.where(mask[n], scale[n] * w / expected_batch_size + mean[n], torch.zeros_like(w))
        for n, w in noised_sum.items()
    }


@torch.no_grad()
def update_stats_(
    stats: AdaptiveStats,
    *,
    released: dict[str, torch.Tensor],
    noise_variance: dict[str, torch.Tensor],
    mask: dict[str, torch.Tensor],
    beta1: float,
    beta2: float,
    s_min: float,
    s_max: float,
) -> None:
    """EMA update from the released ĝ: s ← clamp(β2·s + (1−β2)·((ĝ−m)² − Var_noise), s_min, s_max),
    m ← β1·m + (1−β1)·ĝ, on kept coordinates. Var_noise = (σ_g C_t b / qN)² is known (public)."""
    for n, g in released.items():
        keep = mask[n]
        m = stats.mean[n]
        centred = (g - m).square() - noise_variance[n]
        new_s = (beta2 * stats.variance[n] + (1 - beta2) * centred).clamp(s_min, s_max)
        stats.variance[n] = torch.where(keep, new_s, stats.variance[n])
        stats.mean[n] = torch.where(keep, beta1 * m + (1 - beta1) * g, m)
