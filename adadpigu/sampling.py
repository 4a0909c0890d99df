"""Poisson sampling: every example joins a step's batch independently with probability q.

The accountant's subsampled-Gaussian analysis assumes exactly this; shuffled fixed-size batches are a
different mechanism. An empty batch is a legitimate outcome and still takes a (noise-only) step.
"""

from __future__ import annotations

import torch

__all__ = ["poisson_sample", "shard_indices"]


def shard_indices(
    n: int, *, rank: int, world_size: int, device: torch.device | None = None
) -> torch.Tensor:
    """The examples owned by `rank`: a disjoint, exhaustive partition of range(n) (no padding).

    Each example lies in exactly one shard, so sampling every shard at rate q is a Poisson sample of
    the whole dataset at rate q and no example can be counted twice.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must lie in [0, world_size={world_size})")
    return torch.arange(rank, n, world_size, device=device)


def poisson_sample(
    population: torch.Tensor, *, rate: float, generator: torch.Generator
) -> torch.Tensor:
    """Return the members of `population` (1-D index tensor) kept independently with probability `rate`."""
    if not 0 < rate <= 1:
        raise ValueError(f"sample rate must lie in (0, 1], got {rate}")
    keep = torch.rand(population.numel(), generator=generator, device=generator.device) < rate
    return population[keep.to(population.device)]
