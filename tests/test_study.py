"""Studies: the trial function alone (no Ray), then whole studies through the real CLI on the
session's Ray cluster (real Tune, real Optuna, synthetic data): the results table, σ against the
ε budget, a crash and `study resume`, ASHA pruning, and malformed files refused before Ray."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import optuna
import pyarrow.parquet as pq
import pytest
import yaml

from adadpigu.config import Method
from reports.schema import SCHEMA_VERSION, TRIALS_SCHEMA, VERSION_KEY
from reports.table import best_per_group, read_table
from study.objective import TrialContext, TrialStatus, classify, run_dir, run_trial
from study.runner import FaultInjectedError
from study.space import Group, parse_study
from study.store import StudyPaths, StudyRecorder, prepare_plan
from tests.conftest import REPO, cli_env, run_cli

SYNTHETIC_BASE: dict[str, Any] = {
    "data": {"name": "synthetic", "synthetic_size": 512, "validation_size": 64},
    "model": {"name": "mlp"},
    "training": {"epochs": 2, "batch_size": 64, "lr": 2.0},
}


def study_file(tmp_path: Path, name: str, **fields: Any) -> Path:
    raw = {"base": SYNTHETIC_BASE, **fields}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def trials_table(root: Path) -> list[dict[str, Any]]:
    return read_table(root / "results" / "trials.parquet", TRIALS_SCHEMA).to_pylist()


# --------------------------------------------------------------------------------------------------
# The trial function, without Ray
# --------------------------------------------------------------------------------------------------

PLAIN_STUDY = {
    "methods": ["dpsgd"],
    "budgets": {"epsilon": [4.0], "delta": 1e-4},
    "base": SYNTHETIC_BASE,
    "space": {"training.lr": {"type": "float", "low": 0.1, "high": 4.0, "log": True}},
    "trials": 2,
}


def context(
    tmp_path: Path, raw: dict[str, Any] = PLAIN_STUDY, *, epsilon: float = 4.0
) -> TrialContext:
    spec = parse_study(raw)
    return TrialContext(
        study="t", spec=spec, group=Group(Method.DPSGD, epsilon), study_dir=str(tmp_path)
    )


def test_trial_reports_each_epoch_then_one_final_result(tmp_path: Path) -> None:
    reports: list[dict[str, Any]] = []
    final = run_trial(context(tmp_path), {"training.lr": 2.0}, trial_id=7, report=reports.append)
    assert [r["status"] for r in reports] == ["running", "complete"]
    first, last = reports
    assert first["epoch"] == 1 and first["final"] is False and first["curve"]["epoch"] == 1
    # The last epoch is merged into the final result: a scheduler never sees it as "running".
    assert last is final and last["final"] is True and last["epoch"] == 2
    assert last["curve"]["epoch"] == 2 and last["val_accuracy"] == last["runs"][0]["val_accuracy"]
    run = last["runs"][0]
    assert run["steps"] == run["planned_steps"] == 14
    assert run["epsilon"] <= 4.0 and not run["over_budget"]
    assert "train_accuracy" not in json.dumps(reports)  # nothing computed on training data
    assert (run_dir(tmp_path, "dpsgd-eps4", 7, 0) / "metrics.json").exists()
    assert classify(last, error=False) == TrialStatus.COMPLETE
    assert classify(first, error=False) == TrialStatus.PRUNED  # stopped after a running result
    assert classify(None, error=True) == TrialStatus.FAILED


def test_a_budget_that_cannot_be_met_is_infeasible_not_a_crash(tmp_path: Path) -> None:
    reports: list[dict[str, Any]] = []
    final = run_trial(
        context(tmp_path, epsilon=1e-9), {"training.lr": 1.0}, trial_id=0, report=reports.append
    )
    assert reports == [final]
    assert final["status"] == TrialStatus.INFEASIBLE and final["final"] is True
    assert "infeasible" in final["reason"] and math.isnan(final["val_accuracy"])
    assert classify(final, error=False) == TrialStatus.INFEASIBLE


def test_recorder_rows_for_complete_pruned_and_infeasible_trials(tmp_path: Path) -> None:
    spec = parse_study(PLAIN_STUDY)
    paths = StudyPaths(tmp_path)
    plan = prepare_plan(spec, name="t", source="-")
    recorder = StudyRecorder(paths, spec, plan)
    ctx = TrialContext(study="t", spec=spec, group=spec.groups()[0], study_dir=str(tmp_path))
    group = ctx.group.name

    reports: list[dict[str, Any]] = []
    final = run_trial(ctx, {"training.lr": 2.0}, trial_id=0, report=reports.append)
    recorder.started(group, 0)
    for r in reports:
        recorder.result(group, 0, r)
    recorder.finished(group, 0, params={"training.lr": 2.0}, result=final, error=None, context=ctx)

    recorder.started(group, 1)  # stopped by the scheduler after its first epoch
    recorder.result(group, 1, reports[0])
    recorder.finished(
        group, 1, params={"training.lr": 0.2}, result=reports[0], error=None, context=ctx
    )

    rows = {r["trial_id"]: r for r in trials_table(tmp_path)}
    assert rows[0]["status"] == "complete" and rows[1]["status"] == "pruned"
    assert rows[1]["steps"] == reports[0]["curve"]["executed_steps"] == 7
    assert rows[0]["lr"] == 2.0 and rows[1]["lr"] == 0.2
    assert rows[0]["keep_ratio"] is None  # AdaDPIGU's settings do not apply to DP-SGD
    assert rows[0]["epsilon_all_trials"] > rows[0]["epsilon_one_run"]
    assert best_per_group(rows.values())[group]["trial_id"] == 0
    curves = pq.read_table(tmp_path / "results" / "curves.parquet").to_pylist()
    assert sorted((c["trial_id"], c["epoch"]) for c in curves) == [(0, 1), (0, 2), (1, 1)]


def test_a_crashed_trial_is_recorded_failed_and_charged(tmp_path: Path) -> None:
    raw = {**PLAIN_STUDY, "base": {**SYNTHETIC_BASE, "runtime": {"fault_at_step": 3}}}
    spec = parse_study(raw)
    ctx = TrialContext(study="t", spec=spec, group=spec.groups()[0], study_dir=str(tmp_path))
    reports: list[dict[str, Any]] = []
    with pytest.raises(FaultInjectedError):
        run_trial(ctx, {"training.lr": 1.0}, trial_id=0, report=reports.append)
    assert reports == []  # it died before its first epoch ended
    recorder = StudyRecorder(StudyPaths(tmp_path), spec, prepare_plan(spec, name="t", source="-"))
    recorder.started(ctx.group.name, 0)
    (row,) = recorder.finished(
        ctx.group.name,
        0,
        params={"training.lr": 1.0},
        result=None,
        error="FaultInjectedError",
        context=ctx,
    )
    # Its ledger says how far it got; those steps are charged (write-ahead: the fatal one too).
    assert row["status"] == "failed" and row["error"] == "FaultInjectedError"
    assert row["steps"] == 4 and row["sigma"] > 0 and 0 < row["epsilon"] < 4.0
    assert row["epsilon_all_trials"] == pytest.approx(row["epsilon"], rel=1e-6)
    assert best_per_group([row]) == {}


# --------------------------------------------------------------------------------------------------
# Whole studies on Ray, through the CLI
# --------------------------------------------------------------------------------------------------


def test_malformed_study_fails_before_ray(tmp_path: Path) -> None:
    """A bad file fails with the key named, even with an address nobody listens on."""
    bad = {
        "methods": ["dpsgd"],
        "budgets": {"epsilon": [1.0]},
        "base": SYNTHETIC_BASE,
        "space": {"adadpigu.keep_ratio": {"type": "float", "low": 0.3, "high": 1.5}},
        "trials": 2,
    }
    for raw, key in [
        ({**bad, "colour": "blue"}, "colour"),
        ({**bad, "budgets": {"epsilon": [0]}}, "budgets.epsilon[0]"),
        ({**bad, "methods": []}, "methods"),
        ({**bad, "methods": ["adadpigu"]}, "space.adadpigu.keep_ratio.high"),
    ]:
        path = study_file(tmp_path, "bad", **{k: v for k, v in raw.items() if k != "base"})
        start = time.monotonic()
        out = run_cli(
            ["study", "launch", str(path), "--address", "127.0.0.1:9", "--out", str(tmp_path)],
            timeout=120,
        )
        assert out.returncode == 2, out.stderr
        assert f"{key}:" in out.stderr, out.stderr
        assert "Ray" not in out.stdout + out.stderr
        assert time.monotonic() - start < 60
    assert not (tmp_path / "bad").exists()


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_four_trial_study_writes_the_table(tmp_path: Path, ray_cluster: Any) -> None:
    path = study_file(
        tmp_path,
        "four",
        methods=["dpsgd"],
        budgets={"epsilon": [1.0, 4.0], "delta": 1e-4},
        space={"training.lr": {"type": "float", "low": 0.5, "high": 4.0, "log": True}},
        trials=2,
        search={"sampler": "tpe", "max_concurrent_trials": 2},
    )
    out = run_cli(
        ["study", "launch", str(path), "--name", "four", "--out", str(tmp_path),
         "--address", ray_cluster.address],
        timeout=480,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    root = tmp_path / "four"
    table = pq.read_table(root / "results" / "trials.parquet")
    assert table.schema.equals(TRIALS_SCHEMA)  # the schema defined once, in reports/
    assert table.schema.metadata[VERSION_KEY] == str(SCHEMA_VERSION).encode()
    rows = table.to_pylist()
    assert len(rows) == 4
    assert {(r["group"], r["trial_id"]) for r in rows} == {
        (g, t) for g in ("dpsgd-eps1", "dpsgd-eps4") for t in (0, 1)
    }
    assert all(r["status"] == "complete" and not r["over_budget"] for r in rows)
    assert all(r["epsilon"] <= r["epsilon_budget"] for r in rows)
    assert all(r["val_accuracy"] is not None and r["test_accuracy"] is not None for r in rows)
    assert all(r["steps"] == 14 and r["trial_time"] > 0 for r in rows)
    # Epochs and batch size fixed: σ is set by the budget alone, and falls as ε grows.
    sigma = {r["epsilon_budget"]: r["sigma"] for r in rows}
    assert {r["sigma"] for r in rows if r["epsilon_budget"] == 1.0} == {sigma[1.0]}
    assert sigma[1.0] > sigma[4.0] > 0
    assert all("TPE sampler" in r["epsilon_selection_coverage"] for r in rows)
    assert all(
        r["epsilon_selection"] is None and r["epsilon_all_trials"] > r["epsilon_one_run"]
        for r in rows
    )
    curves = pq.read_table(root / "results" / "curves.parquet").to_pylist()
    assert len(curves) == 4 * 2

    # One Optuna study per (method, ε), in sqlite storage in the study directory.
    storage = f"sqlite:///{root / 'optuna.db'}"
    names = sorted(s.study_name for s in optuna.get_all_study_summaries(storage))
    assert names == ["dpsgd-eps1", "dpsgd-eps4"]
    for name in names:
        study = optuna.load_study(study_name=name, storage=storage)
        assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 2

    status = run_cli(["study", "status", "four", "--out", str(tmp_path), "--json"], timeout=120)
    assert status.returncode == 0, status.stderr
    summary = json.loads(status.stdout)
    assert summary["state"] == "finished" and summary["done"] == summary["planned"] == 4
    assert {g["group"]: g["complete"] for g in summary["groups"]} == {
        "dpsgd-eps1": 2,
        "dpsgd-eps4": 2,
    }
    text = run_cli(["study", "status", str(root)], timeout=120)
    assert text.returncode == 0 and "dpsgd" in text.stdout and "not covered" in text.stdout

    # Launching the same file again (a second `make study`) continues it: nothing to run.
    again = run_cli(
        ["study", "launch", str(path), "--name", "four", "--out", str(tmp_path)], timeout=120
    )
    assert again.returncode == 0, again.stderr
    assert "already exists" in again.stdout and "all 2 trials done" in again.stdout
    assert pq.read_table(root / "results" / "trials.parquet").num_rows == 4


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_killed_study_resumes_without_losing_or_rerunning_trials(
    tmp_path: Path, ray_cluster: Any
) -> None:
    path = study_file(
        tmp_path,
        "crash",
        methods=["dpsgd"],
        budgets={"epsilon": [4.0], "delta": 1e-4},
        space={"training.lr": {"type": "float", "low": 0.5, "high": 4.0, "log": True}},
        # K drawn before any trial runs (seeded here, so the test knows it is 3).
        trials={
            "distribution": "truncated_negative_binomial",
            "mean": 3,
            "shape": 1,
            "draw_seed": 1,
        },
        search={"sampler": "random", "max_concurrent_trials": 1},
    )
    raw = yaml.safe_load(path.read_text())
    raw["base"]["data"]["synthetic_size"] = 4096  # a few seconds per trial
    raw["base"]["training"]["epochs"] = 3
    path.write_text(yaml.safe_dump(raw))
    root = tmp_path / "crash"
    launch = subprocess.Popen(
        [sys.executable, "-m", "study.cli", "study", "launch", str(path), "--name", "crash",
         "--out", str(tmp_path), "--address", ray_cluster.address],
        cwd=REPO, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    table = root / "results" / "trials.parquet"
    deadline = time.monotonic() + 300
    while not table.exists():  # poll until a trial has finished
        assert launch.poll() is None, launch.stdout.read() if launch.stdout else ""
        assert time.monotonic() < deadline, "no trial finished in time"
        time.sleep(0.1)
    os.kill(launch.pid, signal.SIGKILL)
    launch.wait(timeout=60)
    plan_bytes = (root / "plan.json").read_bytes()
    trials_planned = json.loads(plan_bytes)["groups"]["dpsgd-eps4"]["trials_planned"]
    assert trials_planned == 3
    before = trials_table(root)
    assert 1 <= len(before) < trials_planned, "the study finished before it could be killed"
    status = run_cli(["study", "status", "crash", "--out", str(tmp_path), "--json"], timeout=120)
    assert json.loads(status.stdout)["state"].startswith("stopped")

    out = run_cli(
        ["study", "resume", "crash", "--out", str(tmp_path), "--address", ray_cluster.address],
        timeout=480,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert (root / "plan.json").read_bytes() == plan_bytes  # K not redrawn
    after = trials_table(root)
    assert len(after) == trials_planned  # the study completed its K trials, no more
    assert len({r["trial_id"] for r in after}) == trials_planned
    assert all(r["status"] == "complete" for r in after)
    by_id = {r["trial_id"]: r for r in after}
    for old in before:  # finished trials kept as they were, not rerun
        new = by_id[old["trial_id"]]
        assert (
            new["finished_at"] == old["finished_at"] and new["val_accuracy"] == old["val_accuracy"]
        )
        metrics = run_dir(root, "dpsgd-eps4", old["trial_id"], 0) / "metrics.json"
        assert metrics.stat().st_mtime <= old["finished_at"].timestamp() + 1
    attempts = (root / "attempts.jsonl").read_text().splitlines()
    assert [json.loads(a)["kind"] for a in attempts] == ["launch", "resume"]
    study = optuna.load_study(study_name="dpsgd-eps4", storage=f"sqlite:///{root / 'optuna.db'}")
    complete = [t for t in study.trials if t.state is optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["trial_id"] for t in complete) == sorted(by_id)


@pytest.mark.ray
@pytest.mark.timeout(600)
def test_asha_pruned_trials_are_marked_and_never_selected(tmp_path: Path, ray_cluster: Any) -> None:
    path = study_file(
        tmp_path,
        "asha",
        methods=["dpsgd"],
        budgets={"epsilon": [64.0], "delta": 1e-4},
        space={"training.lr": {"type": "float", "low": 1e-5, "high": 4.0, "log": True}},
        trials=2,
        search={
            "sampler": "tpe",
            "max_concurrent_trials": 1,
            "early_stopping": {"scheduler": "asha", "grace_period": 1, "reduction_factor": 2},
            # A learning rate that learns, then one that cannot: ASHA stops the second after
            # epoch 1 (its validation accuracy is below the first trial's there).
            "enqueue": [{"training.lr": 2.0}, {"training.lr": 1e-5}],
        },
    )
    out = run_cli(
        ["study", "launch", str(path), "--name", "asha", "--out", str(tmp_path),
         "--address", ray_cluster.address],
        timeout=480,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    root = tmp_path / "asha"
    rows = {r["trial_id"]: r for r in trials_table(root)}
    assert rows[0]["status"] == "complete" and rows[0]["epochs_completed"] == 2
    assert rows[1]["status"] == "pruned" and rows[1]["epochs_completed"] == 1
    assert rows[1]["steps"] < rows[1]["planned_steps"]
    assert rows[1]["epsilon"] < rows[0]["epsilon"]  # charged for what it ran
    assert best_per_group(rows.values())["dpsgd-eps64"]["trial_id"] == 0
    coverage = rows[0]["epsilon_selection_coverage"]
    assert "early stopping" in coverage and "TPE sampler" in coverage
    assert rows[0]["epsilon_selection"] is None
    study = optuna.load_study(study_name="dpsgd-eps64", storage=f"sqlite:///{root / 'optuna.db'}")
    states = {t.user_attrs["trial_id"]: t.state for t in study.trials}
    assert states == {0: optuna.trial.TrialState.COMPLETE, 1: optuna.trial.TrialState.PRUNED}
