"""One training run in this process: load data, plan, train, write the run directory atomically.

Run directory layout:
  config.yaml     the fully resolved config (written first, so `--resume` can find it)
  ledger.json     write-ahead count of executed steps (what ε is charged for, restarts included)
  checkpoint.pt   the trainer state after the last finished epoch (never holds the noise stream)
  metrics.json    final figures, curves, ε, privacy statement (written last)
  model.pt        final weights;  mask.npz (AdaDPIGU): importance scores and mask per tensor
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adadpigu.config import Method, TrainConfig, config_hash
from adadpigu.models import build_model, count_parameters
from adadpigu.noise import make_generator
from adadpigu.plan import TrainingPlan, make_plan
from adadpigu.training import (
    Callbacks,
    EpochReport,
    TrainerState,
    TrainingData,
    init_state,
    mask_summary,
    run_training,
)
from study.files import (
    read_json,
    write_json_atomic,
    write_npz_atomic,
    write_torch_atomic,
    write_yaml_atomic,
)

__all__ = ["FaultInjectedError", "PreparedRun", "execute_run", "prepare_run", "resume_run"]

Reporter = Callable[[EpochReport], None]


class FaultInjectedError(RuntimeError):
    """Raised by the deterministic fault-injection hook (`runtime.fault_at_step`)."""


@dataclasses.dataclass
class PreparedRun:
    config: TrainConfig
    plan: TrainingPlan
    data: TrainingData
    model: torch.nn.Module
    device: torch.device
    split_sizes: dict[str, int]
    dataset_name: str


def resolve_device(name: str) -> torch.device:
    """`auto` → CUDA when present, else CPU. The device never changes the privacy guarantee."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"runtime.device={name!r} but no CUDA device is available; use auto or cpu"
        )
    return torch.device(name)


def prepare_run(config: TrainConfig, *, data_dir: str | None = None) -> PreparedRun:
    """Load the splits, derive the plan (calibrating σ), build and initialise the model."""
    from adadpigu.data import load_splits

    if config.runtime.threads is not None:
        torch.set_num_threads(config.runtime.threads)
    device = resolve_device(config.runtime.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[config.runtime.dtype]
    splits = load_splits(config.data, data_dir=data_dir)
    plan = make_plan(config, n_train=splits.n_train)
    model = build_model(
        config.model,
        input_shape=splits.input_shape,
        num_classes=splits.num_classes,
        generator=make_generator(config.seed),
    ).to(device=device, dtype=dtype)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)

    data = TrainingData(
        train_x=put(splits.train_x),
        train_y=put(splits.train_y),
        val_x=put(splits.val_x),
        val_y=put(splits.val_y),
        test_x=put(splits.test_x),
        test_y=put(splits.test_y),
    )
    sizes = {
        "train": splits.n_train,
        "validation": int(splits.val_y.numel()),
        "test": int(splits.test_y.numel()),
    }
    return PreparedRun(config, plan, data, model, device, sizes, splits.name)


# --- callbacks: ledger, checkpoints, fault injection -------------------------------------------


def ledger_hook(out_dir: Path) -> Callable[[TrainerState], None]:
    """Write-ahead: record that step `executed_steps + 1` is about to run, before it runs, so that a crash
    can never make the accountant forget a step whose noise was released."""
    path = out_dir / "ledger.json"

    def before_step(state: TrainerState) -> None:
        entry = {"executed_steps": state.executed_steps + 1, "restarts": state.restarts}
        write_json_atomic(path, entry, durable=False)

    return before_step


def checkpoint_hook(out_dir: Path) -> Callable[[EpochReport, TrainerState], None]:
    def on_epoch_end(report: EpochReport, state: TrainerState) -> None:
        write_torch_atomic(out_dir / "checkpoint.pt", state.state_dict())

    return on_epoch_end


def fault_hook(step: int) -> Callable[[TrainerState], None]:
    def before_step(state: TrainerState) -> None:
        if state.restarts == 0 and state.step == step:
            raise FaultInjectedError(f"injected fault at step {step} (runtime.fault_at_step)")

    return before_step


def restore_state(state: TrainerState, out_dir: Path, *, checkpoint: Path | None = None) -> int:
    """Load the last checkpoint into `state`; charge the steps the ledger says ran after it.

    `checkpoint` is the file to load (default: the run directory's checkpoint.pt; Ray Train passes
    the one it restored). The ledger is always the run directory's.
    Returns the number of steps lost (executed after the checkpoint, to be redone)."""
    path = out_dir / "checkpoint.pt" if checkpoint is None else checkpoint
    blob = torch.load(path, weights_only=False) if path.exists() else None
    if blob is not None:
        state.load_state_dict(blob)
    ledger = read_json(out_dir / "ledger.json") if (out_dir / "ledger.json").exists() else {}
    ledger_steps = int(ledger.get("executed_steps", 0))
    previous_restarts = int(ledger.get("restarts", state.restarts))
    lost = max(0, ledger_steps - state.executed_steps)
    state.executed_steps = max(state.executed_steps, ledger_steps)
    state.restarts = max(state.restarts, previous_restarts) + 1
    state.lost_steps += lost
    return lost


# --- outputs -------------------------------------------------------------------------------------


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in ("adadpigu", "torch", "opacus", "dp-accounting", "numpy", "ray", "optuna"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def privacy_statement(
    config: TrainConfig, plan: TrainingPlan, sizes: dict[str, int], epsilon: float
) -> dict[str, Any]:
    private = config.method.is_private and config.privacy.noise_seed is None
    if not config.method.is_private:
        text = "NOT PRIVATE: non-private baseline."
    elif config.privacy.noise_seed is not None:
        text = (
            "NOT PRIVATE: the noise was seeded (privacy.noise_seed); anyone holding the seed can remove "
            "the noise. Use this mode for reproducibility only."
        )
    else:
        text = (
            f"({epsilon:.4g}, {plan.delta:.3g})-DP for the training split (N={sizes['train']}) under "
            "add/remove of one example, by the "
            f"{plan.accountant.upper()} accountant over {plan.total_steps} planned Poisson-subsampled "
            "Gaussian steps. The validation and test splits are held out, never trained on, and lie "
            "outside the guarantee."
        )
    return {
        "private": private,
        "statement": text,
        "neighbouring_relation": "add/remove one example",
        "dataset_size": sizes["train"],
        "outside_guarantee": ["validation", "test"],
        "noise_seeded": config.privacy.noise_seed is not None,
    }


def _clip_summary(trace: list[float]) -> dict[str, float] | None:
    if not trace:
        return None
    return {
        "first": trace[0],
        "last": trace[-1],
        "min": min(trace),
        "max": max(trace),
        "median": statistics.median(trace),
    }


def build_metrics(
    prepared: PreparedRun,
    state: TrainerState,
    *,
    wall_time: float,
    train_time: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    config, plan = prepared.config, prepared.plan
    epsilon = plan.epsilon_for(state.executed_steps) if plan.is_private else math.inf
    last = state.history[-1] if state.history else None
    metrics: dict[str, Any] = {
        "method": config.method.value,
        "dataset": prepared.dataset_name,
        "model": config.model.name,
        "num_parameters": count_parameters(prepared.model),
        "test_accuracy": last.test_accuracy if last else math.nan,
        "val_accuracy": last.val_accuracy if last else math.nan,
        "curves": {
            "epoch": [r.epoch for r in state.history],
            "val_accuracy": [r.val_accuracy for r in state.history],
            "test_accuracy": [r.test_accuracy for r in state.history],
            "val_loss": [r.val_loss for r in state.history],
            "epsilon": [r.epsilon for r in state.history],
            "clip_norm": [r.clip_norm for r in state.history],
        },
        "epsilon": epsilon,
        "target_epsilon": plan.target_epsilon,
        "delta": plan.delta,
        "sigma": plan.noise_multiplier,
        "sample_rate": plan.sample_rate,
        "expected_batch_size": plan.expected_batch_size,
        "steps": state.executed_steps,
        "planned_steps": plan.total_steps,
        "completed_steps": state.step,
        "steps_per_epoch": plan.steps_per_epoch,
        "epochs": config.training.epochs,
        "accountant": plan.accountant,
        "seed": config.seed,
        "validation_seed": config.data.validation_seed,
        "noise_seeded": config.privacy.noise_seed is not None,
        "restarts": state.restarts,
        "lost_steps": state.lost_steps,
        "budget_exhausted": state.step < plan.total_steps,
        "over_budget": bool(
            plan.target_epsilon is not None and epsilon > plan.target_epsilon * (1 + 1e-9)
        ),
        "wall_time": wall_time,
        "train_time": train_time,
        "samples_per_second": plan.expected_batch_size
        * state.executed_steps
        / max(train_time, 1e-9),
        "versions": _versions(),
        "config_hash": config_hash(config),
        "split_sizes": prepared.split_sizes,
        "privacy": privacy_statement(config, plan, prepared.split_sizes, epsilon),
    }
    if config.method is Method.ADADPIGU:
        stage1_trace = state.clip_trace[: plan.stage1_steps]
        stage2_trace = state.clip_trace[plan.stage1_steps :]
        kept = mask_summary(state)
        metrics["adadpigu"] = {
            "keep_ratio": state.keep_ratio,
            "kept_per_tensor": kept,
            "kept_total": None if kept is None else sum(kept.values()),
            "stage1_steps": plan.stage1_steps,
            "stage2_steps": plan.total_steps - plan.stage1_steps,
            "epsilon_after_stage1": plan.epsilon_for(min(plan.stage1_steps, state.executed_steps)),
            "epsilon_total": epsilon,
            "stage1_grad_noise_multiplier": plan.stage1_noise.grad_multiplier,
            "stage2_grad_noise_multiplier": plan.stage2_noise.grad_multiplier,
            "clip_norm_stage1": _clip_summary(stage1_trace),
            "clip_norm_stage2": _clip_summary(stage2_trace),
        }
    if extra:
        metrics.update(extra)
    return metrics


def write_outputs(
    out_dir: Path, prepared: PreparedRun, state: TrainerState, metrics: dict[str, Any]
) -> None:
    write_torch_atomic(out_dir / "model.pt", state.model.state_dict())
    if state.mask is not None and state.importance is not None:
        arrays = {}
        for name, mask in state.mask.items():
            arrays[f"{name}/mask"] = mask.cpu().numpy()
            arrays[f"{name}/importance"] = state.importance[name].cpu().numpy()
        write_npz_atomic(out_dir / "mask.npz", arrays)
    write_json_atomic(out_dir / "metrics.json", metrics)


# --- the run ---------------------------------------------------------------------------------------


def execute_run(
    config: TrainConfig,
    *,
    out_dir: Path,
    data_dir: str | None = None,
    reporter: Reporter | None = None,
    progress: Callable[[EpochReport, TrainingPlan], None] | None = None,
    resume: bool = False,
) -> dict[str, Any]:
    """Run `config` in this process and write its run directory. Returns the metrics."""
    wall_start = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    prepared = prepare_run(config, data_dir=data_dir)
    if not resume:
        write_yaml_atomic(out_dir / "config.yaml", config.to_dict())
    state = init_state(config, prepared.model)
    lost = restore_state(state, out_dir) if resume else 0
    callbacks = Callbacks(
        before_step=[ledger_hook(out_dir)]
        + (
            [fault_hook(config.runtime.fault_at_step)]
            if config.runtime.fault_at_step is not None
            else []
        ),
        on_epoch_end=[checkpoint_hook(out_dir)]
        + ([lambda r, s: reporter(r)] if reporter else [])
        + ([lambda r, s: progress(r, prepared.plan)] if progress else []),
    )
    train_start = time.perf_counter()
    extra: dict[str, Any] = {}
    if config.method is Method.OPACUS_DPSGD:
        if resume:
            raise ValueError("method opacus_dpsgd cannot be resumed; start it again")
        from adadpigu.opacus_reference import run_opacus_training

        state, opacus_eps = run_opacus_training(
            config,
            prepared.plan,
            prepared.data,
            state,
            callbacks=callbacks,
            eval_batch_size=config.runtime.eval_batch_size,
        )
        extra["opacus_epsilon"] = opacus_eps
    else:
        state = run_training(
            config,
            prepared.plan,
            prepared.data,
            state,
            callbacks=callbacks,
            eval_batch_size=config.runtime.eval_batch_size,
        )
    train_time = time.perf_counter() - train_start
    if resume:
        extra["lost_steps_this_resume"] = lost
    metrics = build_metrics(
        prepared,
        state,
        wall_time=time.perf_counter() - wall_start,
        train_time=train_time,
        extra=extra,
    )
    write_outputs(out_dir, prepared, state, metrics)
    return metrics


def resume_run(run_dir: Path, **kwargs: Any) -> dict[str, Any]:
    """Continue an interrupted in-process run from its last checkpoint (same budget rules)."""
    import yaml

    run_dir = Path(run_dir)
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml)")
    config = TrainConfig.from_dict(yaml.safe_load(config_path.read_text()))
    return execute_run(config, out_dir=run_dir, resume=True, **kwargs)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use the `adadpigu` command")
