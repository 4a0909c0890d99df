"""The study directory: its layout, the persisted plan, the lock, and the results it records.

    <study>/
      study.yaml         the study file as launched (resume reads this copy, not the original)
      plan.json          written once before any trial runs, never rewritten: N, and per group the
                         trial count K (drawn or fixed), σ where it is fixed for the whole group
      attempts.jsonl     one line per launch / resume
      optuna.db          Optuna storage (sqlite), one study per (method, ε) group: open it with
                         `optuna-dashboard sqlite:///<study>/optuna.db`
      results/trials.parquet, results/curves.parquet   the tables (schemas in reports.schema)
      status.json        live state while running (trials running, their last epoch)
      runs/<group>/trial-NNNN-seed-S/                   each run's directory (see study.runner)
      tune/              Ray Tune's experiment folders

Rows are written by one process (the one holding the lock), atomically, as each trial finishes.
Nothing here imports Ray or Optuna.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import fcntl
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from adadpigu.accounting import (
    AccountingError,
    calibrate_noise_for_tuning,
    check_delta,
    compute_epsilon,
)
from adadpigu.config import ConfigError, TrainConfig, config_hash, lookup_key
from reports.schema import CURVES_SCHEMA, HYPERPARAMETER_COLUMNS, TRIALS_SCHEMA
from reports.table import read_table, rows_to_table, write_table_atomic
from study.files import read_json, write_json_atomic, write_text_atomic
from study.objective import TrialContext, TrialStatus, classify, run_dir
from study.space import (
    SAMPLING_KEYS,
    Group,
    StudyError,
    StudySpec,
    load_study,
    trial_config,
)
from study.tuning_cost import (
    RunCharge,
    draw_trial_count,
    quiet_dp_accounting,
    selection_not_covered_reasons,
    tuning_cost,
)

__all__ = [
    "GroupPlan",
    "StudyBusyError",
    "StudyPaths",
    "StudyPlan",
    "StudyRecorder",
    "hold_lock",
    "is_running",
    "load_plan",
    "prepare_plan",
    "resolve_study_dir",
    "summarise",
    "write_plan",
]


class StudyBusyError(RuntimeError):
    """Another process is running this study."""


@dataclasses.dataclass(frozen=True)
class StudyPaths:
    root: Path

    @property
    def study_file(self) -> Path:
        return self.root / "study.yaml"

    @property
    def plan(self) -> Path:
        return self.root / "plan.json"

    @property
    def attempts(self) -> Path:
        return self.root / "attempts.jsonl"

    @property
    def optuna_db(self) -> Path:
        return self.root / "optuna.db"

    @property
    def optuna_url(self) -> str:
        return f"sqlite:///{self.optuna_db.resolve()}"

    @property
    def trials(self) -> Path:
        return self.root / "results" / "trials.parquet"

    @property
    def curves(self) -> Path:
        return self.root / "results" / "curves.parquet"

    @property
    def status(self) -> Path:
        return self.root / "status.json"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def tune(self) -> Path:
        return self.root / "tune"

    def spec(self) -> StudySpec:
        return load_study(self.study_file)


# --------------------------------------------------------------------------------------------------
# The plan: decided before any trial runs, persisted once
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class GroupPlan:
    name: str
    method: str
    epsilon: float | None
    trials_planned: int  # K
    trial_count: dict[str, Any]  # the spec it was drawn from
    # Tuning within budget: the σ of every trial (the selection procedure meets ε).
    noise_multiplier: float | None = None
    # (σ, q, T) when they are the same for every trial (epochs and batch size not searched).
    sigma: float | None = None
    sample_rate: float | None = None
    steps: int | None = None

    @property
    def mechanism(self) -> RunCharge | None:
        if self.sigma is None or self.sample_rate is None or self.steps is None:
            return None
        return RunCharge(
            sigma=self.sigma, sample_rate=self.sample_rate, steps=0, planned_steps=self.steps
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class StudyPlan:
    name: str
    created_at: str
    source: str
    n_train: int
    groups: dict[str, GroupPlan]

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["groups"] = {k: dataclasses.asdict(v) for k, v in self.groups.items()}
        return out

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> StudyPlan:
        groups = {k: GroupPlan(**v) for k, v in raw["groups"].items()}
        return cls(
            name=raw["name"],
            created_at=raw["created_at"],
            source=raw["source"],
            n_train=int(raw["n_train"]),
            groups=groups,
        )


def prepare_plan(
    spec: StudySpec, *, name: str, source: str, data_dir: str | None = None
) -> StudyPlan:
    """Everything decided before any trial runs: N, each group's σ where fixed, and K (drawn here).

    Raises StudyError for a budget that cannot hold (δ ≥ 1/N, tuning σ infeasible).
    """
    import datetime as dt

    from adadpigu.data import load_splits
    from adadpigu.plan import make_plan

    probe = trial_config(spec, spec.groups()[0], {}, seed=spec.seeds[0])
    splits = load_splits(probe.data, data_dir=data_dir)
    n_train = splits.n_train
    if any(m.is_private for m in spec.methods):
        try:
            check_delta(delta=spec.delta, dataset_size=n_train)
        except AccountingError as exc:
            raise StudyError("budgets.delta", str(exc).split(": ", 1)[-1]) from None
    early = spec.search.early_stopping
    if early is not None:
        for method in spec.methods:
            if early.grace_period > math.ceil(spec.max_epochs(method)):
                raise StudyError(
                    "search.early_stopping.grace_period",
                    f"got {early.grace_period}; allowed: <= the epochs of a trial "
                    f"({spec.max_epochs(method):g} for {method.value})",
                )
    groups: dict[str, GroupPlan] = {}
    for group in spec.groups():
        fixed_mechanism = not (spec.searched_keys(group.method) & set(SAMPLING_KEYS))
        sigma = sample_rate = steps = tuning_sigma = None
        if group.method.is_private and fixed_mechanism:
            config = trial_config(spec, group, {}, seed=spec.seeds[0], noise_multiplier=1.0)
            plan = make_plan(config, n_train=n_train)
            sample_rate, steps = plan.sample_rate, plan.total_steps
            if spec.tuning_within_budget:
                assert spec.trials.mean is not None and spec.trials.shape is not None
                try:
                    with quiet_dp_accounting():
                        tuning_sigma = calibrate_noise_for_tuning(
                            epsilon=group.epsilon,  # type: ignore[arg-type]
                            delta=spec.delta,
                            sample_rate=sample_rate,
                            steps=steps * len(spec.seeds),
                            mean_trials=spec.trials.mean,
                            shape=spec.trials.shape,
                        )
                except AccountingError as exc:
                    raise StudyError("tuning_within_budget", f"{group.name}: {exc}") from None
                sigma = tuning_sigma
            else:
                try:
                    sigma = make_plan(
                        trial_config(spec, group, {}, seed=spec.seeds[0]), n_train=n_train
                    ).noise_multiplier
                except (AccountingError, ConfigError):
                    sigma = None  # every trial will report infeasible
        groups[group.name] = GroupPlan(
            name=group.name,
            method=group.method.value,
            epsilon=group.epsilon,
            trials_planned=draw_trial_count(spec.trials),
            trial_count=spec.trials.to_dict(),
            noise_multiplier=tuning_sigma,
            sigma=sigma,
            sample_rate=sample_rate,
            steps=steps,
        )
    return StudyPlan(
        name=name,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        source=source,
        n_train=n_train,
        groups=groups,
    )


def write_plan(paths: StudyPaths, plan: StudyPlan, *, study_text: str) -> None:
    """Create the study directory with its study file and plan. Refuses to overwrite a plan."""
    if paths.plan.exists():
        raise FileExistsError(
            f"{paths.root} already holds a study; "
            f"continue it with `adadpigu study resume {paths.root}`"
        )
    paths.root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(paths.study_file, study_text)
    write_json_atomic(paths.plan, plan.to_dict())


def resolve_study_dir(target: str | Path, *, out: str | Path = "studies") -> StudyPaths:
    """A study directory given as a path, or as a name under `out`."""
    path = Path(target)
    if (path / "plan.json").exists():
        return StudyPaths(path.resolve())
    candidate = Path(out) / str(target)
    if (candidate / "plan.json").exists():
        return StudyPaths(candidate.resolve())
    raise FileNotFoundError(
        f"no study {str(target)!r}: neither {path} nor {candidate} holds a plan.json"
    )


def load_plan(paths: StudyPaths) -> StudyPlan:
    if not paths.plan.exists():
        raise FileNotFoundError(f"{paths.root} is not a study directory (no plan.json)")
    return StudyPlan.from_dict(read_json(paths.plan))


def record_attempt(paths: StudyPaths, kind: str, **info: Any) -> int:
    """Append a launch/resume line; returns the attempt number (0 for the launch)."""
    previous = paths.attempts.read_text().splitlines() if paths.attempts.exists() else []
    entry = {"attempt": len(previous), "kind": kind, "at": _now(), "pid": os.getpid(), **info}
    with paths.attempts.open("a") as handle:
        handle.write(json.dumps(entry) + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    return len(previous)


# --------------------------------------------------------------------------------------------------
# The lock
# --------------------------------------------------------------------------------------------------


@contextmanager
def hold_lock(paths: StudyPaths) -> Iterator[None]:
    """Hold the study's lock for the block (one running process per study)."""
    paths.root.mkdir(parents=True, exist_ok=True)
    handle = paths.lock.open("a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise StudyBusyError(
                f"{paths.root} is being run by another process; "
                f"see `adadpigu study status {paths.root}`"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()


def is_running(paths: StudyPaths) -> bool:
    """Whether some process holds the study's lock now."""
    if not paths.lock.exists():
        return False
    with paths.lock.open("a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
        return False


# --------------------------------------------------------------------------------------------------
# Recording
# --------------------------------------------------------------------------------------------------


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def _finite(value: Any) -> float | None:
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _over(epsilon: float | None, target: float | None) -> bool:
    return bool(epsilon is not None and target is not None and epsilon > target * (1 + 1e-9))


def _hyperparameters(config: TrainConfig) -> dict[str, Any]:
    plain = config.to_dict()
    method = config.method
    out: dict[str, Any] = {}
    for column, key, _ in HYPERPARAMETER_COLUMNS:
        applies = True
        if key.startswith("adadpigu."):
            applies = method.value == "adadpigu"
        elif key.startswith("privacy."):
            applies = method.is_private
        out[column] = lookup_key(plain, key) if applies else None
    return out


def _ledger_steps(directory: Path) -> int | None:
    ledger = directory / "ledger.json"
    if not ledger.exists():
        return None
    try:
        return int(read_json(ledger).get("executed_steps", 0))
    except (OSError, ValueError):
        return None


def _set_aside_steps(directory: Path) -> int:
    """Steps of earlier attempts of this run that could not be resumed (distributed runs)."""
    total = 0
    for old in directory.parent.glob(f"{directory.name}.attempt-*"):
        total += _ledger_steps(old) or 0
    return total


class StudyRecorder:
    """Turns finished trials into table rows and keeps the live status file. Driver-side only."""

    def __init__(self, paths: StudyPaths, spec: StudySpec, plan: StudyPlan) -> None:
        self.paths = paths
        self.spec = spec
        self.plan = plan
        self._running: dict[tuple[str, int], dict[str, Any]] = {}
        self._curves: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self._started: dict[tuple[str, int], float] = {}
        self.current_group: str | None = None
        self.concurrency: int | None = None  # trials at a time, once the Tuner is set up

    # -- live state --------------------------------------------------------------------------------

    def started(self, group: str, trial_id: int) -> None:
        key = (group, trial_id)
        self._started[key] = time.monotonic()
        self._running[key] = {"group": group, "trial_id": trial_id, "started_at": _now()}
        self._curves[key] = []
        self.write_status("running")

    def result(self, group: str, trial_id: int, result: Mapping[str, Any]) -> None:
        key = (group, trial_id)
        curve = result.get("curve")
        if isinstance(curve, Mapping):
            self._curves.setdefault(key, []).append(dict(curve))
            self._running.setdefault(key, {"group": group, "trial_id": trial_id}).update(
                epoch=curve.get("epoch"),
                seed=curve.get("seed"),
                val_accuracy=curve.get("val_accuracy"),
            )
        self.write_status("running")

    def write_status(self, state: str) -> None:
        status = {
            "state": state,
            "pid": os.getpid(),
            "updated_at": _now(),
            "current_group": self.current_group,
            "running": list(self._running.values()),
            "concurrency": self.concurrency,
        }
        write_json_atomic(self.paths.status, status, durable=False)

    # -- finished trials ---------------------------------------------------------------------------

    def finished(
        self,
        group_name: str,
        trial_id: int,
        *,
        params: Mapping[str, Any],
        result: Mapping[str, Any] | None,
        error: str | None,
        context: TrialContext,
    ) -> list[dict[str, Any]]:
        """Record a finished trial (complete, pruned, failed or infeasible). Returns its rows."""
        key = (group_name, trial_id)
        start = self._started.pop(key, None)
        trial_time = time.monotonic() - start if start is not None else None
        self._running.pop(key, None)
        status = classify(result, error=error is not None)
        group = self.spec.group(group_name)
        rows, curves = self._rows(
            group,
            trial_id,
            status=status,
            params=params,
            result=result or {},
            error=error,
            context=context,
            trial_time=trial_time,
            curves=self._curves.pop(key, []),
        )
        self._write(group, trial_id, rows, curves)
        self.write_status("running")
        return rows

    def _rows(
        self,
        group: Group,
        trial_id: int,
        *,
        status: str,
        params: Mapping[str, Any],
        result: Mapping[str, Any],
        error: str | None,
        context: TrialContext,
        trial_time: float | None,
        curves: list[dict[str, Any]],
    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        spec = self.spec
        runs = list(result.get("runs") or []) if status == TrialStatus.COMPLETE else []
        rows, curve_rows = [], []
        for index, seed in enumerate(spec.seeds):
            try:
                config: TrainConfig | None = context.config(params, seed=seed)
            except ConfigError:
                config = None
            run = runs[index] if index < len(runs) else None
            seed_curves = [c for c in curves if c.get("seed") == seed]
            last = seed_curves[-1] if seed_curves else None
            row: dict[str, Any] = {
                "study": self.plan.name,
                "group": group.name,
                "method": group.method.value,
                "epsilon_budget": group.epsilon,
                "delta": spec.delta if group.method.is_private else None,
                "trial_id": trial_id,
                "seed": seed,
                "status": status,
                "params": json.dumps(dict(params), sort_keys=True, default=str),
                "sampler": spec.search.sampler.value,
                "early_stopping": "asha" if spec.search.early_stopping else "none",
                "tuning_within_budget": spec.tuning_within_budget,
                "trial_time": trial_time,
                "finished_at": dt.datetime.now(dt.UTC),
                "error": error
                or (result.get("reason") if status == TrialStatus.INFEASIBLE else None),
            }
            if config is not None:
                row.update(_hyperparameters(config))
                row.update(
                    dataset=config.data.name,
                    model=config.model.name,
                    config=json.dumps(config.to_dict(), sort_keys=True),
                    config_hash=config_hash(config),
                    noise_seeded=config.privacy.noise_seed is not None,
                    accountant=config.privacy.accountant.value if group.method.is_private else None,
                )
            if status == TrialStatus.INFEASIBLE:
                row.update(steps=0, epochs_completed=0)
            elif run is not None:
                row.update(self._from_run(run))
            else:
                row.update(
                    self._from_partial(group, config, last, status, trial_id=trial_id, seed=seed)
                )
            if run is not None and run.get("curves"):
                curve_rows.extend(self._curve_rows(group, trial_id, seed, run["curves"]))
            else:
                curve_rows.extend(self._curve_rows_from_points(group, trial_id, seed, seed_curves))
            rows.append(row)
        return rows, curve_rows

    @staticmethod
    def _from_run(run: Mapping[str, Any]) -> dict[str, Any]:
        return {
            "over_budget": bool(run.get("over_budget")),
            "dataset": run.get("dataset"),
            "model": run.get("model"),
            "sigma": _finite(run.get("sigma")),
            "sample_rate": _finite(run.get("sample_rate")),
            "expected_batch_size": _finite(run.get("expected_batch_size")),
            "steps": run.get("steps"),
            "planned_steps": run.get("planned_steps"),
            "epsilon": _finite(run.get("epsilon")),
            "accountant": run.get("accountant"),
            "noise_seeded": bool(run.get("noise_seeded")),
            "val_accuracy": _finite(run.get("val_accuracy")),
            "test_accuracy": _finite(run.get("test_accuracy")),
            "epochs_completed": run.get("epochs_completed"),
            "restarts": run.get("restarts"),
            "lost_steps": run.get("lost_steps"),
            "wall_time": _finite(run.get("wall_time")),
            "train_time": _finite(run.get("train_time")),
            "versions": json.dumps(run.get("versions") or {}, sort_keys=True),
            "config_hash": run.get("config_hash"),
        }

    def _from_partial(
        self,
        group: Group,
        config: TrainConfig | None,
        last: Mapping[str, Any] | None,
        status: str,
        *,
        trial_id: int,
        seed: int,
    ) -> dict[str, Any]:
        """A pruned or failed run: figures from its last epoch report, steps from its ledger.

        Charged steps: the run's write-ahead ledger where it can be read (every step executed,
        including after the last report), else the last report's count for a pruned run (the
        trial blocks at each report, so it ran no further), else the planned steps (a bound).
        """
        sigma = sample_rate = planned = None
        accountant = "rdp"
        if last is not None:
            sigma, sample_rate = last.get("sigma"), last.get("sample_rate")
            planned, accountant = last.get("planned_steps"), last.get("accountant", "rdp")
        elif config is not None and group.method.is_private:
            try:
                from adadpigu.plan import make_plan

                plan = make_plan(config, n_train=self.plan.n_train)
                sigma, sample_rate, planned = (
                    plan.noise_multiplier,
                    plan.sample_rate,
                    plan.total_steps,
                )
                accountant = plan.accountant
            except (ConfigError, ValueError):
                pass
        directory = run_dir(self.paths.root, group.name, trial_id, seed)
        ledger = _ledger_steps(directory)
        if ledger is not None:
            steps = ledger
        elif status == TrialStatus.PRUNED and last is not None:
            steps = int(last.get("executed_steps", 0))
        else:
            steps = int(planned or 0)
        steps += _set_aside_steps(directory)
        epsilon = None
        if group.method.is_private and sigma is not None and sample_rate is not None:
            epsilon = compute_epsilon(
                noise_multiplier=float(sigma),
                sample_rate=float(sample_rate),
                steps=steps,
                delta=self.spec.delta,
                accountant=accountant,
            )
        # Tuning within budget: runs have a fixed σ and no per-run target.
        target = None if self.spec.tuning_within_budget else group.epsilon
        return {
            "sigma": _finite(sigma),
            "sample_rate": _finite(sample_rate),
            "steps": steps,
            "planned_steps": planned,
            "epsilon": _finite(epsilon),
            "over_budget": _over(epsilon, target),
            "val_accuracy": _finite(last.get("val_accuracy")) if last else None,
            "test_accuracy": _finite(last.get("test_accuracy")) if last else None,
            "epochs_completed": int(last["epoch"]) if last else 0,
        }

    def _curve_rows(
        self, group: Group, trial_id: int, seed: int, curves: Mapping[str, list[Any]]
    ) -> list[dict[str, Any]]:
        epochs = curves.get("epoch", [])
        out = []
        for i, epoch in enumerate(epochs):
            out.append(
                {
                    **self._curve_identity(group, trial_id, seed),
                    "epoch": int(epoch),
                    **{
                        k: _finite(curves[k][i]) if k in curves and i < len(curves[k]) else None
                        for k in (
                            "val_accuracy",
                            "test_accuracy",
                            "val_loss",
                            "epsilon",
                            "clip_norm",
                        )
                    },
                }
            )
        return out

    def _curve_rows_from_points(
        self, group: Group, trial_id: int, seed: int, points: list[Mapping[str, Any]]
    ) -> list[dict[str, Any]]:
        return [
            {
                **self._curve_identity(group, trial_id, seed),
                "epoch": int(p["epoch"]),
                **{
                    k: _finite(p.get(k))
                    for k in ("val_accuracy", "test_accuracy", "val_loss", "epsilon", "clip_norm")
                },
            }
            for p in points
        ]

    def _curve_identity(self, group: Group, trial_id: int, seed: int) -> dict[str, Any]:
        return {
            "study": self.plan.name,
            "group": group.name,
            "method": group.method.value,
            "epsilon_budget": group.epsilon,
            "trial_id": trial_id,
            "seed": seed,
        }

    def _write(
        self, group: Group, trial_id: int, rows: list[dict[str, Any]], curves: list[dict[str, Any]]
    ) -> None:
        existing = read_table(self.paths.trials, TRIALS_SCHEMA).to_pylist()
        kept = [r for r in existing if not (r["group"] == group.name and r["trial_id"] == trial_id)]
        table_rows = kept + rows
        self._fill_tuning_cost(group, table_rows)
        # Curves first: a trial is recorded once its row is in the trials table.
        old_curves = read_table(self.paths.curves, CURVES_SCHEMA).to_pylist()
        kept_curves = [
            c for c in old_curves if not (c["group"] == group.name and c["trial_id"] == trial_id)
        ]
        write_table_atomic(self.paths.curves, rows_to_table(kept_curves + curves, CURVES_SCHEMA))
        write_table_atomic(self.paths.trials, rows_to_table(table_rows, TRIALS_SCHEMA))

    def _fill_tuning_cost(self, group: Group, rows: list[dict[str, Any]]) -> None:
        plan = self.plan.groups[group.name]
        mine = [r for r in rows if r["group"] == group.name]
        values: dict[str, Any] = {
            "trials_planned": plan.trials_planned,
            "trial_count_distribution": self.spec.trials.describe(),
        }
        if group.method.is_private:
            charges = [
                RunCharge(
                    sigma=r["sigma"],
                    sample_rate=r["sample_rate"],
                    steps=int(r["steps"] or 0),
                    planned_steps=int(r["planned_steps"] or r["steps"] or 0),
                )
                for r in mine
                if r["sigma"] is not None and r["sample_rate"] is not None and (r["steps"] or 0) > 0
            ]
            cost = tuning_cost(
                runs=charges,
                delta=self.spec.delta,
                trials=self.spec.trials,
                seeds_per_trial=len(self.spec.seeds),
                reasons=selection_not_covered_reasons(self.spec, group),
                planned=plan.mechanism,
                accountant=next((r["accountant"] for r in mine if r["accountant"]), "rdp"),
            )
            values.update(
                epsilon_one_run=_finite(cost.epsilon_one_run),
                epsilon_selection=_finite(cost.epsilon_selection),
                epsilon_selection_coverage=cost.coverage,
                epsilon_all_trials=_finite(cost.epsilon_all_trials),
            )
        else:
            values["epsilon_selection_coverage"] = "not covered: non-private method"
        for row in mine:
            row.update(values)


# --------------------------------------------------------------------------------------------------
# Summary (for `adadpigu study status`)
# --------------------------------------------------------------------------------------------------


def summarise(paths: StudyPaths) -> dict[str, Any]:
    """Where a study stands: per group K, counts by status, running trials, best, tuning cost.

    Reads the files only (plan, tables, live status, lock); works while the study runs.
    """
    from reports.table import best_per_group

    plan = load_plan(paths)
    delta = paths.spec().delta
    rows = read_table(paths.trials, TRIALS_SCHEMA).to_pylist()
    running_now = is_running(paths)
    live = read_json(paths.status) if paths.status.exists() else {}
    running = live.get("running", []) if running_now else []
    best = best_per_group(rows)
    groups = []
    for name, group_plan in plan.groups.items():
        mine = [r for r in rows if r["group"] == name]
        by_trial: dict[int, str] = {}
        for r in mine:
            by_trial[int(r["trial_id"])] = r["status"]
        counts = {
            s: sum(1 for v in by_trial.values() if v == s)
            for s in ("complete", "pruned", "failed", "infeasible")
        }
        first = mine[0] if mine else {}
        one_run = first.get("epsilon_one_run")
        mechanism = group_plan.mechanism
        if one_run is None and mechanism is not None and group_plan.epsilon is not None:
            one_run = compute_epsilon(
                noise_multiplier=mechanism.sigma,
                sample_rate=mechanism.sample_rate,
                steps=mechanism.planned_steps,
                delta=delta,
            )
        overhead = _overhead(mine)
        groups.append(
            {
                "group": name,
                "method": group_plan.method,
                "epsilon": group_plan.epsilon,
                "trials_planned": group_plan.trials_planned,
                "done": len(by_trial),
                "running": [r for r in running if r.get("group") == name],
                **counts,
                "over_budget": sum(1 for r in mine if r.get("over_budget")),
                "best": best.get(name),
                "sigma": group_plan.sigma,
                "epsilon_one_run": one_run,
                "epsilon_selection": first.get("epsilon_selection"),
                "epsilon_selection_coverage": first.get("epsilon_selection_coverage"),
                "epsilon_all_trials": first.get("epsilon_all_trials"),
                "overhead": overhead,
            }
        )
    planned = sum(g["trials_planned"] for g in groups)
    done = sum(g["done"] for g in groups)
    if running_now:
        state = "running"
    elif done >= planned:
        state = "finished"
    else:
        state = "stopped (resume with `adadpigu study resume`)"
    return {
        "name": plan.name,
        "root": str(paths.root),
        "state": state,
        "planned": planned,
        "done": done,
        "current_group": live.get("current_group") if running_now else None,
        "groups": groups,
        "overhead": _overhead(rows),
        "concurrency": live.get("concurrency"),
    }


def _overhead(rows: list[dict[str, Any]]) -> float | None:
    """Share of complete trials' time (as the driver saw it) not spent in the training loop."""
    trial_time: dict[tuple[str, int], float] = {}
    train_time: dict[tuple[str, int], float] = {}
    for r in rows:
        if r["status"] != "complete" or r.get("trial_time") is None or r.get("train_time") is None:
            continue
        key = (r["group"], int(r["trial_id"]))
        trial_time[key] = float(r["trial_time"])
        train_time[key] = train_time.get(key, 0.0) + float(r["train_time"])
    total = sum(trial_time.values())
    if total <= 0:
        return None
    return max(0.0, 1 - sum(train_time.values()) / total)
