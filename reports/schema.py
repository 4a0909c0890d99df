"""The results tables of a study, defined once and versioned.

`trials.parquet` has one row per run: a trial (one hyperparameter point of one (method, ε) group)
runs once per seed. `curves.parquet` has one row per (run, epoch). Both carry the schema version in
their Parquet metadata (`adadpigu.schema_version`); readers check it.

Status values (`STATUSES`):
  complete    the run finished its planned steps (its figures are final);
  pruned      stopped early by the scheduler (ASHA): its accuracy is partial, so it never enters a
              selection or a Pareto front;
  failed      the trial raised, or was lost; its steps are charged all the same;
  infeasible  no run: the configuration cannot meet the ε budget (or is invalid); nothing spent.

A run whose ε went over its budget is flagged `over_budget` and kept out of its budget's selection.
The tuning-cost columns repeat, on every row of a group, the group's figures (ALGORITHM.md,
"Tuning is not free"); `epsilon_selection` is null when `epsilon_selection_coverage` is not
"covered".
"""

from __future__ import annotations

import pyarrow as pa

__all__ = [
    "CURVES_SCHEMA",
    "HYPERPARAMETER_COLUMNS",
    "SCHEMA_VERSION",
    "STATUSES",
    "TRIALS_SCHEMA",
    "VERSION_KEY",
]

#: Bump on any change of columns, types or meanings.
SCHEMA_VERSION = 1
VERSION_KEY = b"adadpigu.schema_version"

STATUSES = ("complete", "pruned", "failed", "infeasible")

#: Hyperparameter columns: (column, dotted TrainConfig key, type). Settings that do not apply to a
#: run's method (AdaDPIGU's for DP-SGD, clipping for the non-private run) are null.
HYPERPARAMETER_COLUMNS: tuple[tuple[str, str, pa.DataType], ...] = (
    ("epochs", "training.epochs", pa.float64()),
    ("batch_size", "training.batch_size", pa.int64()),
    ("lr", "training.lr", pa.float64()),
    ("momentum", "training.momentum", pa.float64()),
    ("clip_schedule", "privacy.clip.schedule", pa.string()),
    ("clip_c0", "privacy.clip.c0", pa.float64()),
    ("clip_c_final", "privacy.clip.c_final", pa.float64()),
    ("clip_target_quantile", "privacy.clip.target_quantile", pa.float64()),
    ("clip_quantile_lr", "privacy.clip.quantile_lr", pa.float64()),
    ("keep_ratio", "adadpigu.keep_ratio", pa.float64()),
    ("stage1_fraction", "adadpigu.stage1_fraction", pa.float64()),
    ("importance", "adadpigu.importance", pa.string()),
    ("normalisation", "adadpigu.normalisation", pa.string()),
    ("min_keep_per_layer", "adadpigu.min_keep_per_layer", pa.int64()),
    ("release_final_keep_ratio", "adadpigu.release_final_keep_ratio", pa.float64()),
    ("ada_clip_schedule", "adadpigu.clip.schedule", pa.string()),
    ("ada_clip_c0", "adadpigu.clip.c0", pa.float64()),
    ("ada_clip_c_final", "adadpigu.clip.c_final", pa.float64()),
    ("ada_clip_target_quantile", "adadpigu.clip.target_quantile", pa.float64()),
    ("ada_clip_quantile_lr", "adadpigu.clip.quantile_lr", pa.float64()),
    ("activation", "model.activation", pa.string()),
)

_META = {VERSION_KEY: str(SCHEMA_VERSION).encode()}

TRIALS_SCHEMA = pa.schema(
    [
        # identity
        pa.field("study", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("epsilon_budget", pa.float64()),  # null: non-private reference
        pa.field("delta", pa.float64()),
        pa.field("trial_id", pa.int64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("over_budget", pa.bool_()),
        pa.field("dataset", pa.string()),
        pa.field("model", pa.string()),
        # hyperparameters
        *[pa.field(name, kind) for name, _, kind in HYPERPARAMETER_COLUMNS],
        pa.field("params", pa.string()),  # JSON: the searched values of this trial
        pa.field("config", pa.string()),  # JSON: the full resolved TrainConfig of this run
        pa.field("config_hash", pa.string()),
        # privacy of the run
        pa.field("sigma", pa.float64()),
        pa.field("sample_rate", pa.float64()),
        pa.field("expected_batch_size", pa.float64()),
        pa.field("steps", pa.int64()),  # executed (what the accountant charges)
        pa.field("planned_steps", pa.int64()),
        pa.field("epsilon", pa.float64()),  # spent, by `accountant`
        pa.field("accountant", pa.string()),
        pa.field("noise_seeded", pa.bool_()),  # true: the run is NOT private
        # held-out figures (final epoch): selection uses validation only
        pa.field("val_accuracy", pa.float64()),
        pa.field("test_accuracy", pa.float64()),
        pa.field("epochs_completed", pa.int64()),
        pa.field("restarts", pa.int64()),
        pa.field("lost_steps", pa.int64()),
        # time
        pa.field("wall_time", pa.float64()),  # the run, in the trainer
        pa.field("train_time", pa.float64()),  # its training loop (evaluation included)
        pa.field("trial_time", pa.float64()),  # the trial as the study driver saw it (start→end)
        pa.field("finished_at", pa.timestamp("us", tz="UTC")),
        pa.field("error", pa.string()),
        pa.field("versions", pa.string()),  # JSON: package versions
        # the search
        pa.field("sampler", pa.string()),
        pa.field("early_stopping", pa.string()),
        pa.field("tuning_within_budget", pa.bool_()),
        # tuning cost of the group (ALGORITHM.md "Tuning is not free")
        pa.field("trials_planned", pa.int64()),
        pa.field("trial_count_distribution", pa.string()),
        pa.field("epsilon_one_run", pa.float64()),
        pa.field("epsilon_selection", pa.float64()),
        pa.field("epsilon_selection_coverage", pa.string()),
        pa.field("epsilon_all_trials", pa.float64()),
    ],
    metadata=_META,
)

CURVES_SCHEMA = pa.schema(
    [
        pa.field("study", pa.string(), nullable=False),
        pa.field("group", pa.string(), nullable=False),
        pa.field("method", pa.string(), nullable=False),
        pa.field("epsilon_budget", pa.float64()),
        pa.field("trial_id", pa.int64(), nullable=False),
        pa.field("seed", pa.int64(), nullable=False),
        pa.field("epoch", pa.int64(), nullable=False),
        pa.field("val_accuracy", pa.float64()),
        pa.field("test_accuracy", pa.float64()),
        pa.field("val_loss", pa.float64()),
        pa.field("epsilon", pa.float64()),
        pa.field("clip_norm", pa.float64()),
    ],
    metadata=_META,
)
