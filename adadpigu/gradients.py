"""Per-example gradients with torch.func (vmap over grad): one [B, *shape] tensor per parameter.

These are private intermediate values: nothing here is released. The tensors returned are fresh and
owned by the caller, who may modify them in place (normalisation does, to avoid a second B×D copy).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

__all__ = ["batch_loss_gradient", "per_example_gradients"]


def per_example_gradients(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """Gradient of each example's cross-entropy loss w.r.t. `params`, stacked on a leading batch dim."""
    buffers = dict(model.named_buffers())

    def example_loss(
        p: dict[str, torch.Tensor], xi: torch.Tensor, yi: torch.Tensor
    ) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (xi.unsqueeze(0),))
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    if x.shape[0] == 0:
        return {name: p.new_zeros((0, *p.shape)) for name, p in params.items()}
    return vmap(grad(example_loss), in_dims=(None, 0, 0))(params, x, y)


def batch_loss_gradient(
    model: nn.Module,
    params: dict[str, torch.Tensor],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    divisor: float,
) -> dict[str, torch.Tensor]:
    """Gradient of (Σ_i loss_i) / divisor: the non-private step, with the same divisor as DP-SGD."""
    if x.shape[0] == 0:
        return {name: torch.zeros_like(p) for name, p in params.items()}
    buffers = dict(model.named_buffers())

    def summed_loss(p: dict[str, torch.Tensor]) -> torch.Tensor:
        logits = functional_call(model, (p, buffers), (x,))
        return nn.functional.cross_entropy(logits, y, reduction="sum") / divisor

    return grad(summed_loss)(params)
