"""The training loop: linear, one step function per method, I/O only through callbacks.

What leaves this module: per-epoch validation/test metrics (held-out splits, outside the guarantee),
ε spent, and public quantities (clip norms, which come from noised releases, the mask, the stage).
Nothing computed on training examples is reported un-noised: there is no training loss or accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from adadpigu.collective import LOCAL, Collective
from adadpigu.config import ClipScheduleKind, Method, NormalisationKind, TrainConfig
from adadpigu.gradients import batch_loss_gradient, per_example_gradients
from adadpigu.importance import accumulate_importance, zero_scores
from adadpigu.masks import global_mask, kept_per_tensor
from adadpigu.mechanisms import adaptive_release, dp_release
from adadpigu.noise import make_generator, make_noise_generator
from adadpigu.normalisation import AdaptiveStats, init_stats, scales, update_stats_
from adadpigu.plan import TrainingPlan
from adadpigu.sampling import poisson_sample, shard_indices
from adadpigu.schedules import ClipState, advance_clip, initial_clip, noised_unclipped_fraction

__all__ = [
    "Callbacks",
    "EpochReport",
    "TrainerState",
    "TrainingData",
    "evaluate",
    "init_state",
    "run_training",
]


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """Tensors on the training device. `train_*` is private; `val_*` and `test_*` are held out."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


@dataclasses.dataclass(frozen=True)
class EpochReport:
    """What may be released after an epoch: held-out metrics, ε spent and public schedule values."""

    epoch: int
    step: int
    executed_steps: int
    stage: int
    val_accuracy: float
    test_accuracy: float
    val_loss: float
    epsilon: float
    clip_norm: float
    keep_ratio: float
    wall_time: float


@dataclasses.dataclass
class TrainerState:
    """Everything a checkpoint holds. `executed_steps` counts every step run, including steps redone
    after a restart: it is what the accountant charges."""

    step: int
    executed_steps: int
    restarts: int
    model: nn.Module
    optimizer: torch.optim.Optimizer
    clip1: ClipState
    clip2: ClipState
    importance: dict[str, torch.Tensor] | None
    mask: dict[str, torch.Tensor] | None
    stats: AdaptiveStats | None
    keep_ratio: float
    history: list[EpochReport]
    clip_trace: list[float]
    lost_steps: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "executed_steps": self.executed_steps,
            "restarts": self.restarts,
            "lost_steps": self.lost_steps,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "clip1": dataclasses.asdict(self.clip1),
            "clip2": dataclasses.asdict(self.clip2),
            "importance": self.importance,
            "mask": self.mask,
            "stats": None
            if self.stats is None
            else {"mean": self.stats.mean, "variance": self.stats.variance},
            "keep_ratio": self.keep_ratio,
            "history": [dataclasses.asdict(r) for r in self.history],
            "clip_trace": list(self.clip_trace),
        }

    def load_state_dict(self, blob: dict[str, Any]) -> None:
        self.model.load_state_dict(blob["model"])
        self.optimizer.load_state_dict(blob["optimizer"])
        self.step = blob["step"]
        self.executed_steps = blob["executed_steps"]
        self.restarts = blob["restarts"]
        self.lost_steps = blob.get("lost_steps", 0)
        self.clip1 = ClipState(**blob["clip1"])
        self.clip2 = ClipState(**blob["clip2"])
        self.importance = blob["importance"]
        self.mask = blob["mask"]
        stats = blob["stats"]
        self.stats = (
            None if stats is None else AdaptiveStats(mean=stats["mean"], variance=stats["variance"])
        )
        self.keep_ratio = blob["keep_ratio"]
        self.history = [EpochReport(**r) for r in blob["history"]]
        self.clip_trace = list(blob["clip_trace"])


@dataclasses.dataclass
class Callbacks:
    """Hooks for the caller's I/O. `before_step` runs before each step is executed (a write-ahead
    privacy ledger hooks here); `on_epoch_end` gets the release-safe report (checkpoint, progress)."""

    before_step: Sequence[Callable[[TrainerState], None]] = ()
    on_epoch_end: Sequence[Callable[[EpochReport, TrainerState], None]] = ()


NO_CALLBACKS = Callbacks()


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def init_state(config: TrainConfig, model: nn.Module) -> TrainerState:
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad],
        lr=config.training.lr,
        momentum=config.training.momentum,
    )
    return TrainerState(
        step=0,
        executed_steps=0,
        restarts=0,
        model=model,
        optimizer=optimizer,
        clip1=initial_clip(config.privacy.clip),
        clip2=initial_clip(config.adadpigu.clip),
        importance=None,
        mask=None,
        stats=None,
        keep_ratio=1.0,
        history=[],
        clip_trace=[],
    )


@torch.no_grad()
def evaluate(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int
) -> tuple[float, float]:
    """(accuracy, mean loss) on a held-out split."""
    if x.shape[0] == 0:
        return math.nan, math.nan
    model.eval()
    correct, loss = 0, 0.0
    for start in range(0, x.shape[0], batch_size):
        logits = model(x[start : start + batch_size])
        target = y[start : start + batch_size]
        correct += int((logits.argmax(dim=1) == target).sum())
        loss += float(nn.functional.cross_entropy(logits, target, reduction="sum"))
    model.train()
    return correct / x.shape[0], loss / x.shape[0]


def _derived_seed(*parts: object) -> int:
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _apply_update(state: TrainerState, grad: dict[str, torch.Tensor]) -> None:
    for name, p in state.model.named_parameters():
        if p.requires_grad:
            p.grad = grad[name].to(p.dtype)
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)


def _enter_stage2(state: TrainerState, *, config: TrainConfig, keep_ratio: float) -> None:
    """Fix the mask from the stage-1 importance (public) and start the adaptive statistics."""
    params = _params(state.model)
    scores = state.importance if state.importance is not None else zero_scores(params)
    state.mask = global_mask(
        scores, keep_ratio=keep_ratio, min_keep_per_layer=config.adadpigu.min_keep_per_layer
    )
    state.keep_ratio = keep_ratio
    state.stats = init_stats(params)
    if config.adadpigu.stage2_lr is not None:
        for group in state.optimizer.param_groups:
            group["lr"] = config.adadpigu.stage2_lr
    _freeze_pruned_momentum(state)


def _freeze_pruned_momentum(state: TrainerState) -> None:
    # Pruned coordinates must not move: clear their momentum so a zero gradient means no update.
    assert state.mask is not None
    for name, p in state.model.named_parameters():
        buf = state.optimizer.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            buf.mul_(state.mask[name].to(buf.dtype))


def _release_keep_ratio(config: TrainConfig, plan: TrainingPlan, step: int) -> float:
    """Keep ratio under the optional release schedule: linear in stage-2 progress, per epoch."""
    base = config.adadpigu.keep_ratio
    final = config.adadpigu.release_final_keep_ratio
    if final is None:
        return base
    stage2_steps = max(1, plan.total_steps - plan.stage1_steps)
    done = (step - plan.stage1_steps) // plan.steps_per_epoch * plan.steps_per_epoch
    return base + (final - base) * min(1.0, max(0, done) / stage2_steps)


def _private_step(
    state: TrainerState,
    *,
    config: TrainConfig,
    plan: TrainingPlan,
    x: torch.Tensor,
    y: torch.Tensor,
    noise_generator: torch.Generator | None,
    collective: Collective,
) -> None:
    """One DP-SGD / AdaDPIGU step on this worker's Poisson sample (x, y)."""
    params = _params(state.model)
    per_example = per_example_gradients(state.model, params, x, y)
    stage2 = config.method is Method.ADADPIGU and state.step >= plan.stage1_steps
    qn = plan.expected_batch_size
    if not stage2:
        noise = plan.stage1_noise
        clip = state.clip1
        grad, count = dp_release(
            per_example,
            clip_norm=clip.norm,
            grad_noise_multiplier=noise.grad_multiplier,
            count_std=noise.count_std,
            expected_batch_size=qn,
            noise_generator=noise_generator,
            collective=collective,
        )
        if config.method is Method.ADADPIGU:
            if state.importance is None:
                state.importance = zero_scores(params)
            accumulate_importance(
                state.importance,
                kind=config.adadpigu.importance,
                released=grad,
                params=params,
                noise_variance=(noise.grad_multiplier * clip.norm / qn) ** 2,
            )
        schedule_config, stage_steps = config.privacy.clip, plan.stage1_steps
    else:
        noise = plan.stage2_noise
        clip = state.clip2
        assert state.mask is not None and state.stats is not None
        adaptive = config.adadpigu.normalisation is NormalisationKind.ADACLIP
        if adaptive:
            mean, scale = state.stats.mean, scales(state.stats, gamma=config.adadpigu.gamma)
        else:
            mean = {n: torch.zeros_like(p) for n, p in params.items()}
            scale = {n: torch.ones_like(p) for n, p in params.items()}
        grad, count = adaptive_release(
            per_example,
            mask=state.mask,
            mean=mean,
            scale=scale,
            clip_norm=clip.norm,
            grad_noise_multiplier=noise.grad_multiplier,
            count_std=noise.count_std,
            expected_batch_size=qn,
            noise_generator=noise_generator,
            collective=collective,
        )
        if adaptive:
            noise_var = {
                n: (noise.grad_multiplier * clip.norm * b / qn) ** 2 for n, b in scale.items()
            }
            update_stats_(
                state.stats,
                released=grad,
                noise_variance=noise_var,
                mask=state.mask,
                beta1=config.adadpigu.beta1,
                beta2=config.adadpigu.beta2,
                s_min=config.adadpigu.s_min,
                s_max=config.adadpigu.s_max,
            )
        schedule_config, stage_steps = config.adadpigu.clip, plan.total_steps - plan.stage1_steps
    fraction = None
    if schedule_config.schedule is ClipScheduleKind.QUANTILE:
        assert count is not None
        fraction = noised_unclipped_fraction(noised_centred_count=count, expected_batch_size=qn)
    new_clip = advance_clip(
        schedule_config, clip, stage_steps=stage_steps, unclipped_fraction=fraction
    )
    if stage2:
        state.clip2 = new_clip
    else:
        state.clip1 = new_clip
    state.clip_trace.append(clip.norm)
    _apply_update(state, grad)


def _nonprivate_step(
    state: TrainerState,
    *,
    plan: TrainingPlan,
    x: torch.Tensor,
    y: torch.Tensor,
    collective: Collective,
) -> None:
    params = _params(state.model)
    grad = batch_loss_gradient(state.model, params, x, y, divisor=plan.expected_batch_size)
    if collective.world_size > 1:
        names = list(grad)
        flat = collective.all_reduce_sum(torch.cat([grad[n].reshape(-1) for n in names]))
        grad = dict(zip(names, flat.split([grad[n].numel() for n in names]), strict=True))
        grad = {n: g.reshape(params[n].shape) for n, g in grad.items()}
    _apply_update(state, grad)


def run_training(
    config: TrainConfig,
    plan: TrainingPlan,
    data: TrainingData,
    state: TrainerState,
    *,
    callbacks: Callbacks = NO_CALLBACKS,
    collective: Collective = LOCAL,
    eval_batch_size: int = 2048,
) -> TrainerState:
    """Train from `state` to the end of the plan (or of the budget, after a restart; see below).

    Each worker samples its own shard Poisson(q) from a generator derived from (seed, rank, epoch,
    restarts): the redone steps after a restart draw fresh batches. The noise generator is new for every
    call (OS entropy; or a seed derived from `noise_seed` and the executed step count, so a restart never
    replays a noise stream). Budget: the accountant charges `executed_steps`; unless
    `privacy.allow_overspend`, training stops once executed_steps reaches the planned total.
    """
    device = data.train_x.device
    noise_generator = None
    if collective.rank == 0 and config.method.is_private:
        seed = config.privacy.noise_seed
        derived = None if seed is None else _derived_seed("noise", seed, state.executed_steps)
        noise_generator = make_noise_generator(noise_seed=derived, device=device)
    shard = shard_indices(
        data.train_x.shape[0], rank=collective.rank, world_size=collective.world_size, device=device
    )
    if config.method is Method.ADADPIGU and state.step >= plan.stage1_steps and state.mask is None:
        _enter_stage2(
            state, config=config, keep_ratio=_release_keep_ratio(config, plan, state.step)
        )
    start = time.perf_counter()
    state.model.train()
    while state.step < plan.total_steps:
        if not config.privacy.allow_overspend and state.executed_steps >= plan.total_steps:
            break  # the budget is spent (a restart redid steps): stop rather than overspend
        epoch = state.step // plan.steps_per_epoch
        sampler = make_generator(
            _derived_seed("sampling", config.seed, collective.rank, epoch, state.restarts),
            device=device,
        )
        # Skip to the current step within the epoch so the stream position matches the step.
        for _ in range(state.step - epoch * plan.steps_per_epoch):
            poisson_sample(shard, rate=plan.sample_rate, generator=sampler)
        epoch_end = min(plan.total_steps, (epoch + 1) * plan.steps_per_epoch)
        while state.step < epoch_end:
            if not config.privacy.allow_overspend and state.executed_steps >= plan.total_steps:
                break
            for hook in callbacks.before_step:
                hook(state)
            if (
                config.method is Method.ADADPIGU
                and state.step == plan.stage1_steps
                and state.mask is None
            ):
                _enter_stage2(
                    state, config=config, keep_ratio=_release_keep_ratio(config, plan, state.step)
                )
            idx = poisson_sample(shard, rate=plan.sample_rate, generator=sampler)
            x, y = data.train_x[idx], data.train_y[idx]
            if config.method is Method.NONPRIVATE:
                _nonprivate_step(state, plan=plan, x=x, y=y, collective=collective)
            else:
                _private_step(
                    state,
                    config=config,
                    plan=plan,
                    x=x,
                    y=y,
                    noise_generator=noise_generator,
                    collective=collective,
                )
            state.step += 1
            state.executed_steps += 1
        _maybe_release_more(state, config=config, plan=plan)
        val_acc, val_loss = evaluate(
            state.model, data.val_x, data.val_y, batch_size=eval_batch_size
        )
        test_acc, _ = evaluate(state.model, data.test_x, data.test_y, batch_size=eval_batch_size)
        in_stage2 = config.method is Method.ADADPIGU and state.step > plan.stage1_steps
        report = EpochReport(
            epoch=epoch + 1,
            step=state.step,
            executed_steps=state.executed_steps,
            stage=2 if in_stage2 else 1,
            val_accuracy=val_acc,
            test_accuracy=test_acc,
            val_loss=val_loss,
            epsilon=plan.epsilon_for(state.executed_steps) if plan.is_private else math.inf,
            clip_norm=(state.clip2 if in_stage2 else state.clip1).norm,
            keep_ratio=state.keep_ratio if in_stage2 else 1.0,
            wall_time=time.perf_counter() - start,
        )
        state.history.append(report)
        for hook in callbacks.on_epoch_end:
            hook(report, state)
    return state


def _maybe_release_more(state: TrainerState, *, config: TrainConfig, plan: TrainingPlan) -> None:
    """Release schedule: at an epoch boundary in stage 2, unfreeze more coordinates in rank order."""
    if state.mask is None or config.adadpigu.release_final_keep_ratio is None:
        return
    target = _release_keep_ratio(config, plan, state.step)
    if target <= state.keep_ratio:
        return
    old = state.mask
    assert state.importance is not None and state.stats is not None
    state.mask = global_mask(
        state.importance, keep_ratio=target, min_keep_per_layer=config.adadpigu.min_keep_per_layer
    )
    state.keep_ratio = target
    # Newly released coordinates start from the neutral statistics m = 0, s = 1.
    for n in state.mask:
        fresh = state.mask[n] & ~old[n]
        state.stats.mean[n] = torch.where(
            fresh, torch.zeros_like(state.stats.mean[n]), state.stats.mean[n]
        )
        state.stats.variance[n] = torch.where(
            fresh, torch.ones_like(state.stats.variance[n]), state.stats.variance[n]
        )


def mask_summary(state: TrainerState) -> dict[str, int] | None:
    return None if state.mask is None else kept_per_tensor(state.mask)
