"""The one point where data parallelism enters the DP step: a sum over workers.

A worker computes its shard's clipped sum; the collective sums the shards. In-process runs use
`LocalCollective` (identity). `TorchDistributedCollective` uses torch.distributed (gloo or NCCL), as set
up by Ray Train; the core itself knows nothing of Ray.
"""

from __future__ import annotations

from typing import Protocol

import torch

__all__ = ["LOCAL", "Collective", "LocalCollective", "TorchDistributedCollective"]


class Collective(Protocol):
    rank: int
    world_size: int

    def all_reduce_sum(self, flat: torch.Tensor) -> torch.Tensor:
        """Return the element-wise sum of `flat` over all workers (same result on every worker)."""
        ...


class LocalCollective:
    rank = 0
    world_size = 1

    def all_reduce_sum(self, flat: torch.Tensor) -> torch.Tensor:
        return flat


class TorchDistributedCollective:
    def __init__(self) -> None:
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised")
        self._dist = dist
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()

    def all_reduce_sum(self, flat: torch.Tensor) -> torch.Tensor:
        self._dist.all_reduce(flat, op=self._dist.ReduceOp.SUM)
        return flat


LOCAL = LocalCollective()
