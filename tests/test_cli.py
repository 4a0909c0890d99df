"""The real `adadpigu` CLI in a subprocess: train end to end, accounting, config errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import yaml

from adadpigu.accounting import compute_epsilon
from tests.conftest import REPO, cli_env, run_cli

TINY = {
    "method": "dpsgd",
    "seed": 3,
    "data": {"name": "synthetic", "synthetic_size": 512, "validation_size": 64},
    "model": {"name": "mlp"},
    "training": {"epochs": 2, "batch_size": 64, "lr": 0.5},
    "privacy": {"epsilon": 4.0, "delta": 1e-4},
}


def write_config(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_train_end_to_end_writes_run_directory(tmp_path: Path) -> None:
    config = write_config(tmp_path, TINY)
    out = tmp_path / "run"
    result = run_cli(
        ["train", str(config), "--out", str(out), "--set", "training.epochs=3"], timeout=300
    )
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    resolved = yaml.safe_load((out / "config.yaml").read_text())
    assert resolved["training"]["epochs"] == 3  # the override reached the resolved config
    assert (out / "model.pt").exists()
    assert metrics["method"] == "dpsgd"
    assert len(metrics["curves"]["val_accuracy"]) == 3
    assert 0.0 <= metrics["test_accuracy"] <= 1.0
    assert metrics["steps"] == metrics["planned_steps"] == 3 * round((512 - 64) / 64)
    assert metrics["epsilon"] <= 4.0
    recomputed = compute_epsilon(
        noise_multiplier=metrics["sigma"],
        sample_rate=metrics["sample_rate"],
        steps=metrics["steps"],
        delta=metrics["delta"],
    )
    assert math.isclose(metrics["epsilon"], recomputed, rel_tol=1e-12)
    assert metrics["privacy"]["private"] is True
    assert metrics["privacy"]["neighbouring_relation"] == "add/remove one example"
    assert metrics["privacy"]["dataset_size"] == 512 - 64
    assert set(metrics["privacy"]["outside_guarantee"]) == {"validation", "test"}
    for key in (
        "delta",
        "sigma",
        "sample_rate",
        "seed",
        "noise_seeded",
        "wall_time",
        "samples_per_second",
        "versions",
        "config_hash",
    ):
        assert key in metrics, key
    # Nothing computed on training examples is stored: no training loss/accuracy anywhere.
    assert "train" not in json.dumps(metrics["curves"])
    assert not {"train_loss", "train_accuracy", "loss", "accuracy"} & set(metrics)
    # No temporary files left behind by atomic writes.
    assert not list(out.glob(".*.tmp"))


def test_train_rejects_bad_config_with_field_name(tmp_path: Path) -> None:
    bad = dict(TINY, privacy={"epsilon": -1.0, "delta": 1e-4})
    result = run_cli(
        ["train", str(write_config(tmp_path, bad)), "--out", str(tmp_path / "r")], timeout=120
    )
    assert result.returncode != 0
    assert "privacy.epsilon" in result.stderr
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_train_rejects_delta_at_least_one_over_n(tmp_path: Path) -> None:
    bad = dict(TINY, privacy={"epsilon": 1.0, "delta": 0.01})
    result = run_cli(
        ["train", str(write_config(tmp_path, bad)), "--out", str(tmp_path / "r")], timeout=120
    )
    assert result.returncode != 0
    assert "privacy.delta" in result.stderr
    assert not (tmp_path / "r" / "metrics.json").exists()


def test_accounting_json_output() -> None:
    result = run_cli(
        [
            "accounting",
            "--epsilon",
            "8",
            "--delta",
            "1e-5",
            "--sample-rate",
            "0.004",
            "--steps",
            "1000",
            "--dataset-size",
            "60000",
            "--json",
        ],
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    payload = json.loads(result.stdout)
    assert {"sigma", "epsilon", "delta", "sample_rate", "steps", "accountant"} <= set(payload)
    assert payload["accountant"] == "rdp"
    assert payload["epsilon"] <= 8.0
    assert payload["epsilon"] >= 8.0 * 0.98


def test_accounting_rejects_delta_over_one_over_n() -> None:
    result = run_cli(
        [
            "accounting",
            "--epsilon",
            "8",
            "--delta",
            "1e-3",
            "--sample-rate",
            "0.01",
            "--steps",
            "100",
            "--dataset-size",
            "1000",
        ],
        timeout=120,
    )
    assert result.returncode != 0
    assert "delta" in result.stderr


def test_cli_train_does_not_import_ray() -> None:
    probe = (
        "import sys; from study import cli; import study.runner; "
        "assert 'ray' not in sys.modules and 'optuna' not in sys.modules, sorted(m for m in sys.modules if m.startswith(('ray', 'optuna')))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe], env=cli_env(), cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
