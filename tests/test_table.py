"""The results tables: the versioned schema, atomic upserts, and the selection rule (validation
only; pruned, failed, infeasible and over-budget trials never selected). No Ray."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

from reports.schema import (
    CURVES_SCHEMA,
    HYPERPARAMETER_COLUMNS,
    SCHEMA_VERSION,
    TRIALS_SCHEMA,
    VERSION_KEY,
)
from reports.table import (
    SchemaVersionError,
    best_per_group,
    eligible_trials,
    read_table,
    rows_to_table,
    upsert_rows,
    write_table_atomic,
)


def row(
    trial_id: int, *, group: str = "dpsgd-eps2", seed: int = 0, **values: Any
) -> dict[str, Any]:
    base = {
        "study": "s",
        "group": group,
        "method": group.split("-")[0],
        "epsilon_budget": 2.0,
        "trial_id": trial_id,
        "seed": seed,
        "status": "complete",
        "over_budget": False,
        "val_accuracy": 0.5,
        "test_accuracy": 0.5,
        "sigma": 1.0,
        "epsilon": 1.99,
        "params": "{}",
        "finished_at": dt.datetime.now(dt.UTC),
    }
    base.update(values)
    return base


def test_schema_is_versioned_and_covers_the_issue_columns() -> None:
    for schema in (TRIALS_SCHEMA, CURVES_SCHEMA):
        assert schema.metadata[VERSION_KEY] == str(SCHEMA_VERSION).encode()
    names = set(TRIALS_SCHEMA.names)
    required = {
        "study", "method", "epsilon_budget", "delta", "trial_id", "seed", "sigma", "sample_rate",
        "steps", "epsilon", "accountant", "val_accuracy", "test_accuracy", "wall_time", "status",
        "versions", "config_hash", "over_budget", "epsilon_one_run", "epsilon_selection",
        "epsilon_selection_coverage", "epsilon_all_trials",
    }  # fmt: skip
    assert required <= names
    assert {name for name, _, _ in HYPERPARAMETER_COLUMNS} <= names
    assert {"keep_ratio", "stage1_fraction", "importance", "clip_schedule", "lr"} <= names


def test_round_trip_and_version_check(tmp_path: Path) -> None:
    path = tmp_path / "trials.parquet"
    assert read_table(path, TRIALS_SCHEMA).num_rows == 0
    write_table_atomic(path, rows_to_table([row(0), row(1)], TRIALS_SCHEMA))
    table = read_table(path, TRIALS_SCHEMA)
    assert table.num_rows == 2 and table.schema.equals(TRIALS_SCHEMA, check_metadata=False)
    assert [p.name for p in tmp_path.iterdir()] == ["trials.parquet"]  # no temp file left

    old = rows_to_table([row(0)], TRIALS_SCHEMA).replace_schema_metadata({VERSION_KEY: b"0"})
    pq.write_table(old, tmp_path / "old.parquet")
    with pytest.raises(SchemaVersionError, match="schema version 0"):
        read_table(tmp_path / "old.parquet", TRIALS_SCHEMA)


def test_unknown_columns_are_rejected() -> None:
    with pytest.raises(KeyError, match="colour"):
        rows_to_table([row(0, colour="blue")], TRIALS_SCHEMA)


def test_upsert_replaces_rows_with_the_same_key(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    upsert_rows(path, [row(0), row(1)], schema=TRIALS_SCHEMA)
    table = upsert_rows(path, [row(1, val_accuracy=0.9)], schema=TRIALS_SCHEMA)
    rows = {r["trial_id"]: r for r in table.to_pylist()}
    assert len(rows) == 2 and rows[1]["val_accuracy"] == 0.9


def test_a_failed_write_keeps_the_old_table(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    write_table_atomic(path, rows_to_table([row(0)], TRIALS_SCHEMA))
    with pytest.raises(Exception):  # noqa: B017  (pyarrow's error type for a non-table)
        write_table_atomic(path, "not a table")  # type: ignore[arg-type]
    assert read_table(path, TRIALS_SCHEMA).num_rows == 1
    assert [p.name for p in tmp_path.iterdir()] == ["t.parquet"]


def test_selection_uses_validation_and_skips_ineligible_trials() -> None:
    rows = [
        row(0, val_accuracy=0.80, test_accuracy=0.99),
        row(1, val_accuracy=0.95, test_accuracy=0.10, status="pruned"),  # partial: never selected
        row(2, val_accuracy=0.97, over_budget=True),  # over its ε budget
        row(3, val_accuracy=None, status="failed"),
        row(4, val_accuracy=None, status="infeasible"),
        row(5, val_accuracy=0.85, test_accuracy=0.70),
        row(6, val_accuracy=0.90, group="dpsgd-eps8"),
    ]
    best = best_per_group(rows)
    assert best["dpsgd-eps2"]["trial_id"] == 5  # highest validation, not highest test
    assert best["dpsgd-eps2"]["test_accuracy"] == 0.70
    assert best["dpsgd-eps8"]["trial_id"] == 6
    assert {t["trial_id"] for t in eligible_trials(rows)} == {0, 5, 6}


def test_a_trial_is_selected_on_its_mean_over_seeds() -> None:
    rows = [
        row(0, seed=0, val_accuracy=0.90),
        row(0, seed=1, val_accuracy=0.70),  # mean 0.80
        row(1, seed=0, val_accuracy=0.85),
        row(1, seed=1, val_accuracy=0.83),  # mean 0.84
        row(2, seed=0, val_accuracy=0.99),
        row(2, seed=1, val_accuracy=0.99, status="failed"),  # one run failed: not eligible
    ]
    best = best_per_group(rows)["dpsgd-eps2"]
    assert best["trial_id"] == 1 and best["seeds"] == 2
    assert best["val_accuracy"] == pytest.approx(0.84)
    assert best["val_std"] == pytest.approx(0.0141421, rel=1e-4)
