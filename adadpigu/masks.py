"""The global pruning mask: keep the ⌈ρD⌉ coordinates with the highest (public) importance.

The ranking is a stable descending sort of the concatenated scores, so masks for a larger keep ratio
are supersets of those for a smaller one: the release schedule unfreezes coordinates in rank order.
"""

from __future__ import annotations

import math

import torch

__all__ = ["global_mask", "kept_per_tensor"]


def global_mask(
    scores: dict[str, torch.Tensor], *, keep_ratio: float, min_keep_per_layer: int = 0
) -> dict[str, torch.Tensor]:
    """Boolean mask per tensor keeping the top ⌈keep_ratio·D⌉ coordinates of the global ranking.

    With `min_keep_per_layer` > 0, each tensor first keeps its own top min(k, numel) coordinates so no
    layer is cut off; the remaining budget is filled from the global ranking.
    """
    if not 0 < keep_ratio <= 1:
        raise ValueError(f"adadpigu.keep_ratio must lie in (0, 1], got {keep_ratio}")
    names = list(scores)
    flat = torch.cat([scores[n].reshape(-1) for n in names])
    total = flat.numel()
    keep = min(total, math.ceil(keep_ratio * total - 1e-9))
    chosen = torch.zeros(total, dtype=torch.bool, device=flat.device)
    offset = 0
    if min_keep_per_layer > 0:
        for n in names:
            numel = scores[n].numel()
            floor = min(min_keep_per_layer, numel)
            local = torch.sort(scores[n].reshape(-1), descending=True, stable=True).indices[:floor]
            chosen[offset + local] = True
            offset += numel
    remaining = keep - int(chosen.sum())
    if remaining > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        order = order[~chosen[order]]
        chosen[order[:remaining]] = True
    masks = {}
    offset = 0
    for n in names:
        numel = scores[n].numel()
        masks[n] = chosen[offset : offset + numel].reshape(scores[n].shape)
        offset += numel
    return masks


def kept_per_tensor(mask: dict[str, torch.Tensor]) -> dict[str, int]:
    return {name: int(m.sum()) for name, m in mask.items()}
