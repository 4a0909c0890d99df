"""`method: opacus_dpsgd`: the same model, data, Poisson rate, σ and C through Opacus's PrivacyEngine.

An external reference for our own DP-SGD's accuracy and ε. It uses Opacus's own Poisson data loader
at our sample rate q and Opacus's hooks-based per-sample gradients. It has no checkpoint/resume and
runs in-process only.
"""

from __future__ import annotations

import math
import time

import torch
from torch.utils.data import TensorDataset

from adadpigu.config import TrainConfig
from adadpigu.noise import make_generator, make_noise_generator
from adadpigu.plan import TrainingPlan
from adadpigu.training import (
    NO_CALLBACKS,
    Callbacks,
    EpochReport,
    TrainerState,
    TrainingData,
    evaluate,
)

__all__ = ["run_opacus_training"]


def run_opacus_training(
    config: TrainConfig,
    plan: TrainingPlan,
    data: TrainingData,
    state: TrainerState,
    *,
    callbacks: Callbacks = NO_CALLBACKS,
    eval_batch_size: int = 2048,
) -> tuple[TrainerState, float]:
    """Train with Opacus; returns the state and Opacus's own ε (for comparison with ours)."""
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    device = data.train_x.device
    sampler = make_generator(config.seed, device="cpu")
    loader = DPDataLoader(
        TensorDataset(data.train_x.cpu(), data.train_y.cpu()),
        sample_rate=plan.sample_rate,
        generator=sampler,
    )
    engine = PrivacyEngine(accountant=plan.accountant)
    model, optimizer, loader = engine.make_private(
        module=state.model,
        optimizer=state.optimizer,
        data_loader=loader,
        noise_multiplier=plan.noise_multiplier,
        max_grad_norm=config.privacy.clip.c0,
        poisson_sampling=False,  # the loader above already is Opacus's Poisson loader at our q
        noise_generator=make_noise_generator(noise_seed=config.privacy.noise_seed, device=device),
    )
    criterion = torch.nn.CrossEntropyLoss()
    start = time.perf_counter()
    batches = iter(loader)
    model.train()
    while state.step < plan.total_steps:
        epoch = state.step // plan.steps_per_epoch
        epoch_end = min(plan.total_steps, (epoch + 1) * plan.steps_per_epoch)
        while state.step < epoch_end:
            for hook in callbacks.before_step:
                hook(state)
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loader)
                x, y = next(batches)
            optimizer.zero_grad(set_to_none=True)
            loss = criterion(model(x.to(device)), y.to(device)) if x.shape[0] else None
            if loss is not None:
                loss.backward()
            optimizer.step()
            state.step += 1
            state.executed_steps += 1
        val_acc, val_loss = evaluate(model, data.val_x, data.val_y, batch_size=eval_batch_size)
        test_acc, _ = evaluate(model, data.test_x, data.test_y, batch_size=eval_batch_size)
        report = EpochReport(
            epoch=epoch + 1,
            step=state.step,
            executed_steps=state.executed_steps,
            stage=1,
            val_accuracy=val_acc,
            test_accuracy=test_acc,
            val_loss=val_loss,
            epsilon=plan.epsilon_for(state.executed_steps),
            clip_norm=config.privacy.clip.c0,
            keep_ratio=1.0,
            wall_time=time.perf_counter() - start,
        )
        state.history.append(report)
        for hook in callbacks.on_epoch_end:
            hook(report, state)
    opacus_epsilon = engine.get_epsilon(plan.delta) if plan.noise_multiplier > 0 else math.inf
    return state, float(opacus_epsilon)
