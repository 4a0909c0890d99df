"""Flat L2 clipping of per-example gradients and their sum.

`clip_and_sum` returns the clipped sum with its L2 sensitivity under add/remove of one example
(the clip norm), so the noise stage can be calibrated from the object itself.
"""

from __future__ import annotations

import dataclasses
import math

import torch

__all__ = ["ClippedSum", "clip_and_sum", "per_example_norms"]

_EPS = 1e-12


@dataclasses.dataclass(frozen=True)
class ClippedSum:
    """Σ_i clip_C(g_i): private until noised. `sensitivity` is its L2 sensitivity (add/remove)."""

    total: dict[str, torch.Tensor]
    sensitivity: float
    unclipped: torch.Tensor  # number of examples with norm ≤ C (private; released only with noise)
    batch_size: int  # private; never released


def per_example_norms(per_example: dict[str, torch.Tensor]) -> torch.Tensor:
    """L2 norm of each example's gradient across all tensors: shape [B]."""
    tensors = list(per_example.values())
    batch = tensors[0].shape[0]
    squares = torch.zeros(batch, dtype=tensors[0].dtype, device=tensors[0].device)
    for g in tensors:
        # flatten(1), not reshape(batch, -1): an empty Poisson batch (batch = 0) must work too.
        squares += torch.linalg.vector_norm(g.flatten(start_dim=1), dim=1).square()
    return squares.sqrt()


def clip_and_sum(per_example: dict[str, torch.Tensor], *, clip_norm: float) -> ClippedSum:
    """Scale each example to L2 norm ≤ clip_norm and sum over the batch (no copy of the B×D block).

    clip_norm = inf disables clipping (sensitivity inf): only for equivalence tests and non-private use.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm}")
    norms = per_example_norms(per_example)
    if math.isinf(clip_norm):
        factors = torch.ones_like(norms)
    else:
        factors = (clip_norm / (norms + _EPS)).clamp(max=1.0)
    # tensordot contracts the batch dim: Σ_i factor_i · g_i without materialising factor·g.
    total = {name: torch.tensordot(factors, g, dims=1) for name, g in per_example.items()}
    unclipped = (norms <= clip_norm).sum().to(norms.dtype)
    return ClippedSum(
        total=total, sensitivity=clip_norm, unclipped=unclipped, batch_size=norms.numel()
    )
