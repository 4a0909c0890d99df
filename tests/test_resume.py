"""In-process runs: interrupted by the deterministic fault hook, continued with `--resume`.

No Ray. The ledger is written before each step, so a crash never un-charges a step: the resumed
run's ε counts every step executed, the redone ones included. By default it stops when the planned
budget is spent (and says so); with privacy.allow_overspend it finishes its plan and reports the
larger ε.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml

from adadpigu.accounting import compute_epsilon
from adadpigu.config import TrainConfig
from study.runner import FaultInjectedError, execute_run, resume_run
from tests.conftest import run_cli

TINY: dict[str, Any] = {
    "method": "adadpigu",
    "seed": 5,
    "data": {"name": "synthetic", "synthetic_size": 512, "validation_size": 64},
    "model": {"name": "mlp"},
    "training": {"epochs": 3, "batch_size": 64, "lr": 0.5},
    "privacy": {"epsilon": 4.0, "delta": 1.0e-4},
    "adadpigu": {"keep_ratio": 0.6, "stage1_fraction": 0.3},
}
PLANNED, PER_EPOCH = 21, 7  # 448 training examples, q = 1/7


def _epsilon(metrics: dict[str, Any], steps: int) -> float:
    return compute_epsilon(
        noise_multiplier=metrics["sigma"],
        sample_rate=metrics["sample_rate"],
        steps=steps,
        delta=metrics["delta"],
        accountant=metrics["accountant"],
    )


def _ledger(run: Path) -> int:
    return json.loads((run / "ledger.json").read_text())["executed_steps"]


def test_cli_resume_after_a_fault_counts_every_executed_step(tmp_path: Path) -> None:
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(TINY))
    run, fault = tmp_path / "run", 10
    first = run_cli(
        [
            "train",
            str(config_path),
            "--out",
            str(run),
            "--quiet",
            "--set",
            f"runtime.fault_at_step={fault}",
        ],
        timeout=300,
    )
    assert first.returncode != 0 and "injected fault at step 10" in first.stderr
    assert not (run / "metrics.json").exists()
    # Write-ahead: step 10 was charged before the fault; the checkpoint is the epoch-1 one (step 7).
    assert _ledger(run) == fault + 1
    assert (run / "checkpoint.pt").exists()

    second = run_cli(["train", "--resume", str(run), "--quiet"], timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    lost = fault + 1 - PER_EPOCH
    assert metrics["restarts"] == 1 and metrics["lost_steps"] == lost
    # Default: the budget holds; the run stops early and tells the user.
    assert metrics["steps"] == _ledger(run) == PLANNED
    assert metrics["completed_steps"] == PLANNED - lost
    assert metrics["budget_exhausted"] is True and metrics["over_budget"] is False
    assert math.isclose(metrics["epsilon"], _epsilon(metrics, PLANNED), rel_tol=1e-12)
    assert metrics["epsilon"] <= metrics["target_epsilon"] * (1 + 1e-9)
    assert f"{lost} steps were executed and lost to restarts" in second.stdout
    assert "within its budget" in second.stdout


@pytest.mark.parametrize(
    ("fault", "checkpoint_step"),
    [(10, PER_EPOCH), (2, 0)],  # after the first checkpoint; before any checkpoint exists
)
def test_resume_with_overspend_finishes_the_plan_and_charges_redone_steps(
    tmp_path: Path, fault: int, checkpoint_step: int
) -> None:
    raw = json.loads(json.dumps(TINY))
    raw["privacy"]["allow_overspend"] = True
    raw["runtime"] = {"fault_at_step": fault}
    config = TrainConfig.from_dict(raw)
    run = tmp_path / "run"
    with pytest.raises(FaultInjectedError):
        execute_run(config, out_dir=run)
    assert (run / "checkpoint.pt").exists() == (checkpoint_step > 0)

    metrics = resume_run(run)
    lost = fault + 1 - checkpoint_step
    assert metrics["restarts"] == 1 and metrics["lost_steps"] == lost
    assert metrics["lost_steps_this_resume"] == lost
    assert metrics["completed_steps"] == metrics["planned_steps"] == PLANNED
    assert metrics["steps"] == _ledger(run) == PLANNED + lost
    assert math.isclose(metrics["epsilon"], _epsilon(metrics, PLANNED + lost), rel_tol=1e-12)
    assert metrics["epsilon"] > metrics["target_epsilon"] and metrics["over_budget"] is True
    # One curve point per epoch: the checkpoint's history, then the epochs run after the resume.
    assert metrics["curves"]["epoch"] == [1, 2, 3]
