"""The trial function of a study: a plain function, testable without Ray.

A trial is one hyperparameter point of one (method, ε) group, run once per seed. `run_trial` builds
each run's config, trains it (in this process, or through Ray Train for multi-worker trials) and
reports through the `report` callable it is given: one result per epoch while training (validation
accuracy is the objective, `status: running`), then one final result (`final: true`) that carries
every run's figures. The last epoch's report is merged into the final one, so that a scheduler
never sees a finished trial as a running one.

A point that cannot meet its budget (calibration infeasible) or whose values do not make a valid
config is reported `infeasible` (final, nothing trained, nothing spent): a result, not a crash.

Only release-safe values are reported: held-out accuracies and loss, ε, σ, q, step counts, public
schedule values; never a training loss or accuracy.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from adadpigu.accounting import AccountingError
from adadpigu.config import ConfigError, TrainConfig
from study.space import Group, StudySpec, trial_config

__all__ = [
    "RUN_SUMMARY_KEYS",
    "TrialContext",
    "TrialStatus",
    "classify",
    "run_dir",
    "run_trial",
]

Report = Callable[[dict[str, Any]], None]

#: The figures of a finished run that travel in the final report (curves go per epoch).
RUN_SUMMARY_KEYS = (
    "seed",
    "val_accuracy",
    "test_accuracy",
    "epsilon",
    "target_epsilon",
    "delta",
    "sigma",
    "sample_rate",
    "expected_batch_size",
    "steps",
    "planned_steps",
    "completed_steps",
    "accountant",
    "over_budget",
    "budget_exhausted",
    "noise_seeded",
    "restarts",
    "lost_steps",
    "wall_time",
    "train_time",
    "versions",
    "config_hash",
    "dataset",
    "model",
)


class TrialStatus:
    RUNNING = "running"
    COMPLETE = "complete"
    PRUNED = "pruned"
    FAILED = "failed"
    INFEASIBLE = "infeasible"


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrialContext:
    """Everything a trial needs besides its point: shipped once to the workers."""

    study: str
    spec: StudySpec
    group: Group
    study_dir: str
    noise_multiplier: float | None = None  # tuning within budget: σ for every trial
    data_dir: str | None = None
    address: str | None = None  # Ray Train trials: the cluster (None: the current one)

    @property
    def threads(self) -> int | None:
        resources = self.spec.resources
        return max(1, int(resources.cpus_per_trial)) if resources.workers == 1 else None

    def config(self, params: Mapping[str, Any], *, seed: int) -> TrainConfig:
        return trial_config(
            self.spec,
            self.group,
            params,
            seed=seed,
            noise_multiplier=self.noise_multiplier,
            threads=self.threads,
        )


def run_dir(study_dir: str | Path, group: str, trial_id: int, seed: int) -> Path:
    """Where a run of a trial keeps its run directory (config, ledger, checkpoint, metrics)."""
    return Path(study_dir) / "runs" / group / f"trial-{trial_id:04d}-seed-{seed}"


def classify(result: Mapping[str, Any] | None, *, error: bool) -> str:
    """A finished Tune trial's status from its last result: failed, infeasible, complete or pruned.

    A trial whose last result is not final was stopped by the scheduler: pruned.
    """
    if error:
        return TrialStatus.FAILED
    if not result or "status" not in result:
        return TrialStatus.FAILED
    if result.get("final"):
        return (
            TrialStatus.INFEASIBLE
            if result["status"] == TrialStatus.INFEASIBLE
            else TrialStatus.COMPLETE
        )
    return TrialStatus.PRUNED


def _curve_point(report: Any, plan: Any, *, seed: int) -> dict[str, Any]:
    return {
        "seed": seed,
        "epoch": int(report.epoch),
        "step": int(report.step),
        "executed_steps": int(report.executed_steps),
        "val_accuracy": float(report.val_accuracy),
        "test_accuracy": float(report.test_accuracy),
        "val_loss": float(report.val_loss),
        "epsilon": float(report.epsilon) if math.isfinite(report.epsilon) else None,  # non-private
        "clip_norm": float(report.clip_norm),
        "sigma": float(plan.noise_multiplier),
        "sample_rate": float(plan.sample_rate),
        "planned_steps": int(plan.total_steps),
        "accountant": plan.accountant,
    }


def _summary(metrics: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: metrics.get(k) for k in RUN_SUMMARY_KEYS}
    out["epochs_completed"] = len(metrics.get("curves", {}).get("epoch", []))
    out["curves"] = metrics.get("curves")
    return out


def run_trial(
    context: TrialContext,
    params: Mapping[str, Any],
    *,
    trial_id: int,
    report: Report,
    execute: Callable[..., dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """Run every seed of one trial and report as described in the module docstring.

    `execute` runs one config (defaults: `study.runner.execute_run` for one worker, resumed from its
    run directory when one exists, so a continued trial is charged for every step it ran;
    `study.distributed.run_distributed` for several). Returns the final result it reported.
    """
    seeds = context.spec.seeds
    runs: list[dict[str, Any]] = []
    held: dict[str, Any] = {}
    for index, seed in enumerate(seeds):
        last_seed = index == len(seeds) - 1
        try:
            config = context.config(params, seed=seed)
        except ConfigError as exc:
            return _infeasible(report, params, f"invalid config: {exc}")
        out_dir = run_dir(context.study_dir, context.group.name, trial_id, seed)

        def progress(
            epoch_report: Any, plan: Any, *, _seed: int = seed, _last: bool = last_seed
        ) -> None:
            point = _curve_point(epoch_report, plan, seed=_seed)
            if _last and epoch_report.step >= plan.total_steps:
                held["curve"] = point  # merged into the final report
                return
            report(
                {
                    "status": TrialStatus.RUNNING,
                    "final": False,
                    "val_accuracy": point["val_accuracy"],
                    "epoch": point["epoch"],
                    "seed": _seed,
                    "curve": point,
                }
            )

        try:
            metrics = _execute(context, config, out_dir=out_dir, progress=progress, execute=execute)
        except (ConfigError, AccountingError) as exc:
            return _infeasible(report, params, str(exc))
        runs.append(_summary(metrics))

    val = statistics.fmean(r["val_accuracy"] for r in runs)
    final = {
        "status": TrialStatus.COMPLETE,
        "final": True,
        "val_accuracy": val,
        "test_accuracy": statistics.fmean(r["test_accuracy"] for r in runs),
        "epoch": max(r["epochs_completed"] for r in runs),
        "seed": seeds[-1],
        "curve": held.get("curve"),
        "runs": runs,
        "params": dict(params),
    }
    report(final)
    return final


def _infeasible(report: Report, params: Mapping[str, Any], reason: str) -> dict[str, Any]:
    # No `epoch`: schedulers ignore the result. val_accuracy is present (Tune checks the metric)
    # but NaN, and the searcher is told this point failed.
    final = {
        "status": TrialStatus.INFEASIBLE,
        "final": True,
        "val_accuracy": math.nan,
        "reason": reason,
        "params": dict(params),
    }
    report(final)
    return final


def _execute(
    context: TrialContext,
    config: TrainConfig,
    *,
    out_dir: Path,
    progress: Callable[[Any, Any], None],
    execute: Callable[..., dict[str, Any]] | None,
) -> dict[str, Any]:
    resources = context.spec.resources
    resume = (out_dir / "config.yaml").exists()
    if execute is not None:
        return execute(
            config, out_dir=out_dir, data_dir=context.data_dir, progress=progress, resume=resume
        )
    if resources.workers == 1:  # in this trial's process (it holds the trial's CPUs and GPU)
        from study.runner import execute_run

        return execute_run(
            config, out_dir=out_dir, data_dir=context.data_dir, progress=progress, resume=resume
        )
    from study.distributed import run_distributed

    if resume:  # a fresh distributed attempt: keep the old one's ledger for the accounting
        _set_aside(out_dir)
    return run_distributed(
        config,
        out_dir=out_dir,
        workers=resources.workers,
        gpus_per_worker=resources.gpus_per_worker,
        address=context.address,
        data_dir=context.data_dir,
        progress=progress,
    )


def _set_aside(out_dir: Path) -> None:
    attempt = 1
    while out_dir.with_name(f"{out_dir.name}.attempt-{attempt}").exists():
        attempt += 1
    out_dir.rename(out_dir.with_name(f"{out_dir.name}.attempt-{attempt}"))
