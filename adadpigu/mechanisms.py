"""One private step, as named stages: clip and accumulate → add noise once → all-reduce → scale.

`release_sum` is the only function that turns private per-example values into something released;
its docstring states the sensitivity. The gradient sum and the quantile count travel in one flat
buffer, so a data-parallel step costs one all-reduce and the noise is added exactly once (on rank 0).
"""

from __future__ import annotations

import dataclasses

import torch

from adadpigu.clipping import clip_and_sum
from adadpigu.collective import LOCAL, Collective
from adadpigu.normalisation import denormalise, normalise_

__all__ = ["NoisedSum", "adaptive_release", "dp_release", "release_sum"]


@dataclasses.dataclass(frozen=True)
class NoisedSum:
    """Released values: W̃ = Σ clip(w_i) + N(0, σ_g²C²) and the noised centred unclipped count."""

    total: dict[str, torch.Tensor]
    centred_count: float | None


def release_sum(
    per_example: dict[str, torch.Tensor],
    *,
    clip_norm: float,
    grad_noise_multiplier: float,
    count_std: float | None,
    noise_generator: torch.Generator | None,
    noise_mask: dict[str, torch.Tensor] | None = None,
    collective: Collective = LOCAL,
) -> NoisedSum:
    """Release the clipped sum of this worker's examples, summed over workers, noised once.

    Releases Σ_i clip_C(g_i) + N(0, σ_g² C² I) — L2 sensitivity C under add/remove, each example in one
    worker's shard only — and, if `count_std` is set, Σ_i (1[‖g_i‖ ≤ C] − ½) + N(0, count_std²), of
    sensitivity ½. Noise is drawn on rank 0 only (the other ranks need no noise generator), on the
    coordinates of `noise_mask` only (pruned coordinates carry no signal and get no noise).
    """
    clipped = clip_and_sum(per_example, clip_norm=clip_norm)
    names = list(clipped.total)
    pieces = [clipped.total[n].reshape(-1) for n in names]
    if count_std is not None:
        centred = clipped.unclipped - clipped.batch_size / 2
        pieces.append(centred.reshape(1).to(pieces[0].dtype))
    flat = torch.cat(pieces)
    if collective.rank == 0:
        if noise_generator is None:
            raise ValueError("rank 0 needs a noise generator")
        _add_noise_(
            flat,
            names=names,
            shapes={n: clipped.total[n].shape for n in names},
            # σ = 0 with clip_norm = inf (no clipping) must give no noise, not 0·inf = NaN.
            std=0.0 if grad_noise_multiplier == 0 else grad_noise_multiplier * clip_norm,
            count_std=count_std,
            noise_mask=noise_mask,
            generator=noise_generator,
        )
    flat = collective.all_reduce_sum(flat)
    total, offset = {}, 0
    for n in names:
        numel = clipped.total[n].numel()
        total[n] = flat[offset : offset + numel].reshape(clipped.total[n].shape)
        offset += numel
    count = float(flat[offset]) if count_std is not None else None
    return NoisedSum(total=total, centred_count=count)


def _add_noise_(
    flat: torch.Tensor,
    *,
    names: list[str],
    shapes: dict[str, torch.Size],
    std: float,
    count_std: float | None,
    noise_mask: dict[str, torch.Tensor] | None,
    generator: torch.Generator,
) -> None:
    noise = torch.randn(flat.shape, generator=generator, device=flat.device, dtype=flat.dtype)
    grad_part = flat.numel() - (1 if count_std is not None else 0)
    noise[:grad_part] *= std
    if noise_mask is not None:
        noise[:grad_part] *= torch.cat([noise_mask[n].reshape(-1) for n in names]).to(flat.dtype)
    if count_std is not None:
        noise[grad_part:] *= count_std
    flat += noise


def dp_release(
    per_example: dict[str, torch.Tensor],
    *,
    clip_norm: float,
    grad_noise_multiplier: float,
    count_std: float | None,
    expected_batch_size: float,
    noise_generator: torch.Generator | None,
    collective: Collective = LOCAL,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """DP-SGD (stage 1): ĝ = (Σ clip_C(g_i) + N(0, σ²C²I)) / (qN), plus the noised centred count."""
    noised = release_sum(
        per_example,
        clip_norm=clip_norm,
        grad_noise_multiplier=grad_noise_multiplier,
        count_std=count_std,
        noise_generator=noise_generator,
        collective=collective,
    )
    grad = {n: t / expected_batch_size for n, t in noised.total.items()}
    return grad, noised.centred_count


def adaptive_release(
    per_example: dict[str, torch.Tensor],
    *,
    mask: dict[str, torch.Tensor],
    mean: dict[str, torch.Tensor],
    scale: dict[str, torch.Tensor],
    clip_norm: float,
    grad_noise_multiplier: float,
    count_std: float | None,
    expected_batch_size: float,
    noise_generator: torch.Generator | None,
    collective: Collective = LOCAL,
) -> tuple[dict[str, torch.Tensor], float | None]:
    """Stage 2: normalise kept coordinates with public (m, b), clip to C_t, noise kept coordinates only,
    de-normalise. `per_example` is modified in place (no second B×D copy)."""
    normalise_(per_example, mask=mask, mean=mean, scale=scale)
    noised = release_sum(
        per_example,
        clip_norm=clip_norm,
        grad_noise_multiplier=grad_noise_multiplier,
        count_std=count_std,
        noise_generator=noise_generator,
        noise_mask=mask,
        collective=collective,
    )
    grad = denormalise(
        noised.total, mask=mask, mean=mean, scale=scale, expected_batch_size=expected_batch_size
    )
    return grad, noised.centred_count
