"""Progress display for runs: one line per epoch with held-out accuracy and ε spent.

Only release-safe values are shown (validation/test metrics, ε, public clip norm); never a training
loss or accuracy.
"""

from __future__ import annotations

import math

from rich.console import Console

from adadpigu.plan import TrainingPlan
from adadpigu.training import EpochReport

__all__ = ["EpochPrinter"]


class EpochPrinter:
    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)

    def __call__(self, report: EpochReport, plan: TrainingPlan) -> None:
        total_epochs = math.ceil(plan.total_steps / plan.steps_per_epoch)
        eps = "∞ (non-private)" if math.isinf(report.epsilon) else f"{report.epsilon:.3f}"
        stage = f" stage {report.stage}" if plan.method.value == "adadpigu" else ""
        self.console.print(
            f"epoch {report.epoch}/{total_epochs}{stage}  step {report.step}/{plan.total_steps}  "
            f"val acc {report.val_accuracy:.4f}  test acc {report.test_accuracy:.4f}  "
            f"ε {eps}  C {report.clip_norm:.3g}  [{report.wall_time:.1f}s]"
        )
