"""Stage-1 importance scores, computed ONLY from released (noised) gradients and public parameters.

This is post-processing of the DP-SGD releases and costs no privacy. There is deliberately no code
path that reads per-example or pre-noise gradients here: the functions take the released gradient.
"""

from __future__ import annotations

import torch

from adadpigu.config import ImportanceKind

__all__ = ["accumulate_importance", "zero_scores"]


def zero_scores(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: torch.zeros_like(p) for name, p in params.items()}


def accumulate_importance(
    scores: dict[str, torch.Tensor],
    *,
    kind: ImportanceKind,
    released: dict[str, torch.Tensor],
    params: dict[str, torch.Tensor],
    noise_variance: float,
) -> None:
    """Add one step's contribution to `scores` in place.

    abs_sum: |ĝ|; sq_debiased: ĝ² − Var(noise) with Var = (σ C / qN)² known in advance;
    taylor: |θ ⊙ ĝ|. `released` must be the noised gradient ĝ (already divided by qN).
    """
    for name, g in released.items():
        if kind is ImportanceKind.ABS_SUM:
            scores[name] += g.abs()
        elif kind is ImportanceKind.SQ_DEBIASED:
            scores[name] += g.square() - noise_variance
        else:
            scores[name] += (params[name] * g).abs()
