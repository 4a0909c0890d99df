"""Reading and writing the results tables (schemas in `reports.schema`), and the selection rule.

Writes are atomic: the new table goes to a temporary file in the same folder, is flushed to disk,
then renamed over the old one, so a reader (or a crash) only ever sees a complete table. Rows are
upserted by key, so recording a run twice replaces it rather than duplicating it.

Selection (`best_per_group`) uses validation accuracy only, over eligible trials: every run of the
trial complete (pruned, failed and infeasible trials never compete with partial figures) and none
over its ε budget. Test accuracy is carried along for reporting, never used to choose.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from reports.schema import SCHEMA_VERSION, VERSION_KEY

__all__ = [
    "TRIAL_KEY",
    "SchemaVersionError",
    "best_per_group",
    "eligible_trials",
    "read_table",
    "rows_to_table",
    "upsert_rows",
    "write_table_atomic",
]

#: A run is identified by its group, trial and seed.
TRIAL_KEY = ("group", "trial_id", "seed")


class SchemaVersionError(ValueError):
    """A table was written with another schema version than this code reads."""


def rows_to_table(rows: Sequence[Mapping[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts by column name) as a table of `schema`.

    Absent columns are null; unknown ones are an error.
    """
    names = set(schema.names)
    for row in rows:
        extra = set(row) - names
        if extra:
            raise KeyError(f"columns not in the schema: {', '.join(sorted(extra))}")
    return pa.Table.from_pylist([dict(row) for row in rows], schema=schema)


def read_table(path: str | Path, schema: pa.Schema) -> pa.Table:
    """The table at `path` (an empty one if there is none), checked against `schema`'s version."""
    path = Path(path)
    if not path.exists():
        return schema.empty_table()
    table = pq.read_table(path)
    meta = table.schema.metadata or {}
    found = meta.get(VERSION_KEY, b"?").decode()
    if found != str(SCHEMA_VERSION):
        raise SchemaVersionError(
            f"{path}: schema version {found}, this code reads version {SCHEMA_VERSION}"
        )
    return table.cast(schema)


def write_table_atomic(path: str | Path, table: pa.Table) -> None:
    """Write `table` as Parquet to `path` atomically (temp file, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def upsert_rows(
    path: str | Path,
    rows: Sequence[Mapping[str, Any]],
    *,
    schema: pa.Schema,
    key: Sequence[str] = TRIAL_KEY,
    replace: Iterable[tuple[Any, ...]] = (),
) -> pa.Table:
    """Add `rows` to the table at `path`, replacing rows with the same `key` (and any in `replace`).

    Returns the table written. One writer at a time (the study holds a lock).
    """
    existing = read_table(path, schema).to_pylist()
    drop = {tuple(row[k] for k in key) for row in rows} | set(replace)
    kept = [row for row in existing if tuple(row[k] for k in key) not in drop]
    table = rows_to_table(kept + list(rows), schema)
    write_table_atomic(path, table)
    return table


# --------------------------------------------------------------------------------------------------
# Selection
# --------------------------------------------------------------------------------------------------


def eligible_trials(rows: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One summary per trial (over its seeds) that may be selected, with mean ± std figures.

    Eligible: every run complete, none over budget, validation accuracy known.
    """
    by_trial: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for row in rows:
        by_trial.setdefault((row["group"], int(row["trial_id"])), []).append(row)
    out = []
    for (group, trial_id), runs in sorted(by_trial.items()):
        if any(r["status"] != "complete" or r.get("over_budget") for r in runs):
            continue
        vals = [r["val_accuracy"] for r in runs]
        if any(v is None or math.isnan(v) for v in vals):
            continue
        tests = [r["test_accuracy"] for r in runs if r["test_accuracy"] is not None]
        first = runs[0]
        out.append(
            {
                "group": group,
                "method": first["method"],
                "epsilon_budget": first["epsilon_budget"],
                "trial_id": trial_id,
                "seeds": len(runs),
                "val_accuracy": statistics.fmean(vals),
                "val_std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
                "test_accuracy": statistics.fmean(tests) if tests else None,
                "test_std": statistics.stdev(tests) if len(tests) > 1 else 0.0,
                "sigma": first["sigma"],
                "epsilon": max(
                    (r["epsilon"] for r in runs if r["epsilon"] is not None), default=None
                ),
                "params": first["params"],
            }
        )
    return out


def best_per_group(rows: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """The selected trial of each group: the highest mean validation accuracy among eligible ones
    (ties: the lower trial id)."""
    best: dict[str, dict[str, Any]] = {}
    for trial in eligible_trials(rows):
        current = best.get(trial["group"])
        if current is None or trial["val_accuracy"] > current["val_accuracy"]:
            best[trial["group"]] = trial
    return best
