"""Running a study on Ray Tune with Optuna: one Tuner and one Optuna study per (method, ε) group.

Flow of `launch`: validate the study file (no Ray yet), load the data once to learn N, derive each
group's plan (σ where q and T are fixed, the tuning-within-budget σ), draw every group's trial count
K, write the study directory; only then start or join Ray and run the groups one after another.
`resume` reads the persisted plan (K is never redrawn) and the results table: finished trials are
kept and not rerun; trials that were running when the process died are continued from their run
directory (their ledger charges every step they ran), under their original trial id.

Searcher: `OptunaSearch` (TPE by default, random selectable) over a define-by-run space, with a
sqlite storage in the study directory. Two corrections to its ray 2.60 behaviour (StudySearch):
a trial stopped by ASHA is told to Optuna as PRUNED, not COMPLETE with its partial value, and an
infeasible point is told as FAIL. `max_concurrent_trials` is always set (without it OptunaSearch
starts trials one at a time). Early stopping: ASHA on validation accuracy per epoch.

Single-worker trials run in the trial's own process (`study.runner.execute_run`, a reporter calling
`ray.tune.report`); multi-worker trials run through Ray Train (`study.distributed`), their trial
driver taking no CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.logger import JsonLoggerCallback
from ray.tune.schedulers import FIFOScheduler, TrialScheduler
from ray.tune.search import Searcher
from ray.tune.search.optuna import OptunaSearch

from study.objective import TrialContext, TrialStatus, classify, run_trial
from study.space import (
    Group,
    ParamSpec,
    SamplerKind,
    StudySpec,
    enqueued_points,
    load_study,
    suggest,
)
from study.store import (
    StudyPaths,
    StudyPlan,
    StudyRecorder,
    hold_lock,
    load_plan,
    prepare_plan,
    record_attempt,
    resolve_study_dir,
    write_plan,
)

__all__ = [
    "GROUP_KEY",
    "RUN_ID_KEY",
    "GroupedScheduler",
    "GroupedSearch",
    "RecorderCallback",
    "SpaceFunction",
    "StudySearch",
    "launch",
    "resume",
    "tune_trial",
]

#: The trial id travels in the Tune config under this key (the other keys are dotted config keys).
RUN_ID_KEY = "_trial_id"
GROUP_KEY = "_group"
METRIC = "val_accuracy"

Echo = Callable[[str], None]
log = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------
# Launch and resume
# --------------------------------------------------------------------------------------------------


def launch(
    space_file: str | Path,
    *,
    name: str | None = None,
    out: str | Path = "studies",
    address: str | None = None,
    data_dir: str | None = None,
    echo: Echo = print,
) -> StudyPaths:
    """Validate, plan (drawing K), create the study directory, then run every group."""
    space_file = Path(space_file)
    spec = load_study(space_file)  # StudyError before anything else happens
    name = name or space_file.stem
    paths = StudyPaths((Path(out) / name).resolve())
    if paths.plan.exists():
        # Launching the same file again (e.g. a second `make study`) continues the study: its plan,
        # trial counts included, stays as drawn. A different file under the same name is refused.
        if paths.study_file.exists() and paths.study_file.read_text() == space_file.read_text():
            echo(f"study {name} already exists in {paths.root} with this file: resuming it")
            return resume(paths.root, out=out, address=address, data_dir=data_dir, echo=echo)
        raise FileExistsError(
            f"{paths.root} already holds a study launched from another file; choose another "
            f"--name, or continue it with `adadpigu study resume {name}`"
        )
    plan = prepare_plan(spec, name=name, source=str(space_file), data_dir=data_dir)
    with hold_lock(paths):
        write_plan(paths, plan, study_text=space_file.read_text())
        attempt = record_attempt(paths, "launch", address=address)
        _echo_plan(plan, spec, echo)
        _run(paths, spec, plan, attempt=attempt, address=address, data_dir=data_dir, echo=echo)
    return paths


def resume(
    target: str | Path,
    *,
    out: str | Path = "studies",
    address: str | None = None,
    data_dir: str | None = None,
    echo: Echo = print,
) -> StudyPaths:
    """Continue a study: same plan and K, finished trials kept, interrupted ones continued."""
    paths = resolve_study_dir(target, out=out)
    spec = paths.spec()
    plan = load_plan(paths)
    with hold_lock(paths):
        attempt = record_attempt(paths, "resume", address=address)
        echo(f"resuming study {plan.name} in {paths.root} (attempt {attempt})")
        _run(paths, spec, plan, attempt=attempt, address=address, data_dir=data_dir, echo=echo)
    return paths


def _echo_plan(plan: StudyPlan, spec: StudySpec, echo: Echo) -> None:
    echo(f"study {plan.name}: N={plan.n_train} training examples, {len(plan.groups)} groups")
    for group in plan.groups.values():
        sigma = "" if group.sigma is None else f", σ={group.sigma:.4g}"
        tuning = " (tuning within budget)" if group.noise_multiplier is not None else ""
        echo(
            f"  {group.name}: K={group.trials_planned} trials "
            f"({spec.trials.describe()}){sigma}{tuning}"
        )


def _run(
    paths: StudyPaths,
    spec: StudySpec,
    plan: StudyPlan,
    *,
    attempt: int,
    address: str | None,
    data_dir: str | None,
    echo: Echo,
) -> None:
    """Run what remains of every group in one Tuner (actors are reused across groups)."""
    # Ctrl-C raises here (no graceful Tune stop that would look like a finished study); the
    # classic reporter at verbosity 0 keeps Tune's own output off the console.
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    # Our tables replace Tune's CSV and TensorBoard logs; its JSON log is kept (added in _fit).
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    from study.cluster import disconnect

    recorder = StudyRecorder(paths, spec, plan)
    work = [_prepare_group(paths, spec, plan, g, attempt=attempt, echo=echo) for g in spec.groups()]
    work = [w for w in work if w.remaining > 0]
    if not work:  # nothing left: no need for Ray
        recorder.write_status("finished")
        return
    cluster = _connect(address, spec, echo)
    try:
        _fit(
            paths,
            spec,
            plan,
            work,
            recorder=recorder,
            attempt=attempt,
            address=address,
            data_dir=data_dir,
            echo=echo,
        )
        recorder.write_status("finished")
    except BaseException:
        recorder.write_status("interrupted")
        raise
    finally:
        disconnect(cluster)


@dataclasses.dataclass
class _GroupWork:
    group: Group
    remaining: int
    planned: int
    done: int
    searcher: StudySearch


def _prepare_group(
    paths: StudyPaths, spec: StudySpec, plan: StudyPlan, group: Group, *, attempt: int, echo: Echo
) -> _GroupWork:
    """Open the group's Optuna study, re-enqueue interrupted trials, build its searcher."""
    import optuna

    from reports.schema import TRIALS_SCHEMA
    from reports.table import read_table

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    group_plan = plan.groups[group.name]
    rows = read_table(paths.trials, TRIALS_SCHEMA).to_pylist()
    done = {int(r["trial_id"]) for r in rows if r["group"] == group.name}
    remaining = group_plan.trials_planned - len(done)
    storage = optuna.storages.RDBStorage(
        paths.optuna_url, engine_kwargs={"connect_args": {"timeout": 60}}
    )
    study = optuna.create_study(
        storage=storage, study_name=group.name, direction="maximize", load_if_exists=True
    )
    first_time = not study.get_trials(deepcopy=False)
    if first_time:
        study.set_user_attr("method", group.method.value)
        study.set_user_attr("epsilon", group.epsilon)
        study.set_user_attr("trials_planned", group_plan.trials_planned)
    continued = _continue_interrupted(study, done) if remaining > 0 else []
    if first_time:
        for point in enqueued_points(spec, group.method):
            study.enqueue_trial(point)
    if remaining > 0:
        note = (
            f" ({len(continued)} continued: {', '.join(map(str, continued))})" if continued else ""
        )
        echo(f"[{group.name}] {remaining} of {group_plan.trials_planned} trials to run{note}")
    else:
        echo(f"[{group.name}] all {group_plan.trials_planned} trials done")
    seed = _derived_seed(spec.search.seed, group.name, attempt)
    sampler = (
        optuna.samplers.RandomSampler(seed=seed)
        if spec.search.sampler is SamplerKind.RANDOM
        else optuna.samplers.TPESampler(seed=seed)
    )
    searcher = StudySearch(
        space=SpaceFunction(spec.space_for(group.method), base=spec.base),
        metric=METRIC,
        mode="max",
        sampler=sampler,
        study_name=group.name,
        storage=storage,
    )
    return _GroupWork(
        group=group,
        remaining=max(0, remaining),
        planned=group_plan.trials_planned,
        done=len(done),
        searcher=searcher,
    )


def _fit(
    paths: StudyPaths,
    spec: StudySpec,
    plan: StudyPlan,
    work: list[_GroupWork],
    *,
    recorder: StudyRecorder,
    attempt: int,
    address: str | None,
    data_dir: str | None,
    echo: Echo,
) -> None:
    import ray

    contexts = {
        w.group.name: TrialContext(
            study=plan.name,
            spec=spec,
            group=w.group,
            study_dir=str(paths.root),
            noise_multiplier=plan.groups[w.group.name].noise_multiplier,
            data_dir=data_dir,
            address=address,
        )
        for w in work
    }
    resources = spec.resources
    if resources.workers == 1:
        request = {"cpu": resources.cpus_per_trial, "gpu": resources.gpus_per_worker}
        per_trial_cpus = resources.cpus_per_trial
    else:
        # The trial only drives Ray Train workers, which hold the CPUs (study.distributed). Tune
        # refuses an all-zero request, so the driver asks for a token of memory instead of a CPU.
        request = {"cpu": 0, "memory": 2**20}
        per_trial_cpus = float(resources.workers)
    total = sum(w.remaining for w in work)
    concurrency = spec.search.max_concurrent_trials or max(
        1, int(ray.cluster_resources().get("CPU", 1) // per_trial_cpus)
    )
    recorder.concurrency = min(concurrency, total)
    search = GroupedSearch(
        {w.group.name: w.searcher for w in work}, {w.group.name: w.remaining for w in work}
    )
    scheduler = GroupedScheduler({w.group.name: _scheduler(spec, w.group) for w in work})
    callback = RecorderCallback(
        recorder,
        contexts,
        echo=echo,
        planned={w.group.name: w.planned for w in work},
        done={w.group.name: w.done for w in work},
    )
    trainable = tune.with_resources(tune.with_parameters(tune_trial, contexts=contexts), request)
    tuner = tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=search,
            scheduler=scheduler,
            num_samples=total,
            max_concurrent_trials=min(concurrency, total),
            reuse_actors=resources.workers == 1,
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=f"attempt{attempt}",
            storage_path=str(paths.tune),
            verbose=0,
            callbacks=[callback, JsonLoggerCallback()],
            failure_config=tune.FailureConfig(max_failures=0),
        ),
    )
    tuner.fit()


def _connect(address: str | None, spec: StudySpec, echo: Echo) -> Any:
    """Join the cluster at `address`, or start a local Ray (explicit CPU count, dashboard on)."""
    from study.cluster import connect

    info = connect(
        address, num_cpus=None if address else spec.resources.num_cpus, logging_level="ERROR"
    )
    where = (
        "started a local Ray"
        if info.started_locally
        else f"joined the Ray cluster at {info.address}"
    )
    echo(f"{where}: {info.num_cpus:g} CPUs, {info.num_gpus:g} GPUs, {info.num_nodes} node(s)")
    return info


def _derived_seed(*parts: object) -> int:
    text = "/".join(str(p) for p in parts)
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16)


def _continue_interrupted(study: Any, done: set[int]) -> list[int]:
    """Re-enqueue trials that started but never reached the table (the process died).

    Each keeps its trial id (user attr `trial_id`), so it resumes from its run directories. The
    old Optuna trial is marked superseded (and FAIL if it was still RUNNING).
    """
    from optuna.trial import TrialState

    continued: list[int] = []
    for trial in study.get_trials(deepcopy=False):
        trial_id = int(trial.user_attrs.get("trial_id", trial.number))
        if trial.user_attrs.get("superseded") or trial.state is TrialState.WAITING:
            continue
        if trial_id in done or trial_id in continued:
            continue
        storage = study._storage
        storage.set_trial_user_attr(trial._trial_id, "superseded", True)
        if trial.state is TrialState.RUNNING:
            storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL)
        study.enqueue_trial(dict(trial.params), user_attrs={"trial_id": trial_id})
        continued.append(trial_id)
    return continued


def _scheduler(spec: StudySpec, group: Group) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    early = spec.search.early_stopping
    if early is None:
        return FIFOScheduler()
    return ASHAScheduler(
        time_attr="epoch",
        metric=METRIC,
        mode="max",
        max_t=max(1, math.ceil(spec.max_epochs(group.method))),
        grace_period=early.grace_period,
        reduction_factor=early.reduction_factor,
    )


# --------------------------------------------------------------------------------------------------
# Pieces Tune pickles: the space, the searcher, the trainable, the callback
# --------------------------------------------------------------------------------------------------


def trial_dirname(trial: Any) -> str:
    return f"trial_{trial.trial_id}"


class SpaceFunction:
    """Optuna define-by-run space of one method; also stamps the trial id (a user attr)."""

    def __init__(self, params: Sequence[ParamSpec], *, base: Mapping[str, Any]) -> None:
        self.params = tuple(params)
        self.base = dict(base)

    def __call__(self, trial: Any) -> dict[str, Any]:
        values = suggest(self.params, trial, base=self.base)
        trial_id = trial.user_attrs.get("trial_id")
        if trial_id is None:
            trial_id = trial.number
            trial.set_user_attr("trial_id", trial_id)
        return {**values, RUN_ID_KEY: int(trial_id)}


class StudySearch(OptunaSearch):
    """OptunaSearch that tells Optuna what happened: COMPLETE only for trials that ran to the end.

    ray 2.60's OptunaSearch tells a trial that ASHA stopped as COMPLETE with its partial value;
    here it is PRUNED. Infeasible points are FAIL. Only running-epoch results are reported as
    intermediate values.
    """

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get("status") == TrialStatus.RUNNING:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        from optuna.trial import TrialState

        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        ot_trial = self._ot_trials[trial_id]
        status = classify(result, error=error)
        try:
            ot_trial.set_user_attr("status", status)
            value = float(result[self.metric]) if status == TrialStatus.COMPLETE else math.nan  # type: ignore[index]
            if status == TrialStatus.COMPLETE and math.isfinite(value):
                self._ot_study.tell(ot_trial, value, state=TrialState.COMPLETE)
            elif status == TrialStatus.PRUNED:
                self._ot_study.tell(ot_trial, state=TrialState.PRUNED)
            else:
                self._ot_study.tell(ot_trial, state=TrialState.FAIL)
        except Exception as exc:  # a NaN value, a trial already finished in storage
            log.warning("could not tell Optuna about trial %s: %s", trial_id, exc)
        self._completed_trials.add(trial_id)


class GroupedSearch(Searcher):
    """One searcher per group behind one Tune searcher: trials are handed out group by group (in
    study order), each group's count capped at what it still has to run; results are routed back
    to the group's own Optuna study."""

    def __init__(self, searchers: Mapping[str, StudySearch], remaining: Mapping[str, int]) -> None:
        super().__init__(metric=METRIC, mode="max")
        self._searchers = dict(searchers)
        self._remaining = dict(remaining)
        self._group_of: dict[str, str] = {}

    def set_search_properties(
        self, metric: str | None, mode: str | None, config: dict, **spec: Any
    ) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict | str | None:
        for name, left in self._remaining.items():
            if left <= 0:
                continue
            config = self._searchers[name].suggest(trial_id)
            if config is None:
                return None
            self._remaining[name] -= 1
            self._group_of[trial_id] = name
            return {**config, GROUP_KEY: name}
        return Searcher.FINISHED

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._group_of:
            self._searchers[self._group_of[trial_id]].on_trial_result(trial_id, result)

    def on_trial_complete(
        self, trial_id: str, result: dict | None = None, error: bool = False
    ) -> None:
        if trial_id in self._group_of:
            self._searchers[self._group_of[trial_id]].on_trial_complete(
                trial_id, result=result, error=error
            )

    def save(self, checkpoint_path: str) -> None:
        # The study resumes from its own files (plan, table, Optuna storage), not from Tune's.
        Path(checkpoint_path).write_text(json.dumps(self._remaining))

    def restore(self, checkpoint_path: str) -> None:
        self._remaining = json.loads(Path(checkpoint_path).read_text())


class GroupedScheduler(FIFOScheduler):
    """FIFO over all trials, with each group's own scheduler (ASHA compares a trial with the
    trials of its own (method, ε) only)."""

    def __init__(self, schedulers: Mapping[str, TrialScheduler]) -> None:
        super().__init__()
        self._schedulers = dict(schedulers)
        self._metric = METRIC

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True

    def _of(self, trial: Any) -> TrialScheduler:
        return self._schedulers[trial.config[GROUP_KEY]]

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_add(tune_controller, trial)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_error(tune_controller, trial)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        return self._of(trial).on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._of(trial).on_trial_complete(tune_controller, trial, result)

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self._of(trial).on_trial_remove(tune_controller, trial)

    def debug_string(self) -> str:
        return "; ".join(f"{k}: {v.debug_string()}" for k, v in self._schedulers.items())


def tune_trial(config: dict[str, Any], contexts: Mapping[str, TrialContext]) -> None:
    """The Tune function trainable: one trial, reporting through `ray.tune.report`."""
    params = {k: v for k, v in config.items() if k not in (RUN_ID_KEY, GROUP_KEY)}
    context = contexts[config[GROUP_KEY]]
    run_trial(context, params, trial_id=int(config[RUN_ID_KEY]), report=tune.report)


class RecorderCallback(tune.Callback):
    """Driver-side: records each finished trial in the tables and prints one line per trial."""

    def __init__(
        self,
        recorder: StudyRecorder,
        contexts: Mapping[str, TrialContext],
        *,
        echo: Echo,
        planned: Mapping[str, int],
        done: Mapping[str, int],
    ) -> None:
        self.recorder = recorder
        self.contexts = dict(contexts)
        self.echo = echo
        self.planned = dict(planned)
        self.finished = dict(done)

    @staticmethod
    def _ids(trial: Any) -> tuple[str, int, dict[str, Any]]:
        config = dict(trial.config)
        group = config.pop(GROUP_KEY)
        trial_id = int(config.pop(RUN_ID_KEY))
        return group, trial_id, config

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        group, trial_id, _ = self._ids(trial)
        self.recorder.current_group = group
        self.recorder.started(group, trial_id)

    def on_trial_result(
        self, iteration: int, trials: list, trial: Any, result: dict, **info: Any
    ) -> None:
        group, trial_id, _ = self._ids(trial)
        self.recorder.result(group, trial_id, result)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=None)

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, error=_error_text(trial))

    def _finish(self, trial: Any, *, error: str | None) -> None:
        group, trial_id, params = self._ids(trial)
        rows = self.recorder.finished(
            group,
            trial_id,
            params=params,
            result=trial.last_result,
            error=error,
            context=self.contexts[group],
        )
        self.finished[group] = self.finished.get(group, 0) + 1
        self.echo(
            _trial_line(
                group, trial_id, rows, index=self.finished[group], planned=self.planned[group]
            )
        )


def _error_text(trial: Any) -> str:
    path = getattr(trial, "error_file", None)
    if path and Path(path).exists():
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
        return "\n".join(lines[-3:])[-2000:]
    return "the trial failed (no error file)"


def _trial_line(
    group: str, trial_id: int, rows: list[dict[str, Any]], *, index: int, planned: int
) -> str:
    row = rows[0]
    status = row["status"]
    head = f"[{group} {index}/{planned}] trial {trial_id} {status}"
    if status == TrialStatus.INFEASIBLE or status == TrialStatus.FAILED:
        reason = (row.get("error") or "").splitlines()[-1:] or [""]
        return f"{head}: {reason[0][:160]}"
    vals = [r["val_accuracy"] for r in rows if r["val_accuracy"] is not None]
    tests = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
    parts = [head + ":"]
    if vals:
        parts.append(f"val {sum(vals) / len(vals):.4f}")
    if tests:
        parts.append(f"test {sum(tests) / len(tests):.4f}")
    if row.get("sigma") is not None and row["method"] != "nonprivate":
        parts.append(f"σ {row['sigma']:.4g}")
    if row.get("epsilon") is not None:
        parts.append(f"ε {row['epsilon']:.3g}")
    if row.get("over_budget"):
        parts.append("OVER BUDGET")
    if row.get("trial_time") is not None:
        parts.append(f"({row['trial_time']:.1f}s)")
    return " ".join(parts)
