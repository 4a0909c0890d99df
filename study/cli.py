"""The `adadpigu` command. Commands parse, resolve and delegate; Ray is imported only by the commands
that need it, so `adadpigu train` (one worker, no address) and `adadpigu accounting` start fast."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from study.study_cli import study_app

app = typer.Typer(
    help="DP-correct AdaDPIGU / DP-SGD training and privacy-utility studies.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
data_app = typer.Typer(help="Fetch and list datasets (offline-capable).", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(study_app, name="study")


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def load_train_config(path: Path, overrides: list[str]) -> Any:
    """Read a YAML config, apply `--set key=value` overrides, validate into a TrainConfig."""
    import yaml

    from adadpigu.config import TrainConfig, apply_overrides

    if not path.exists():
        _fail(f"config file {path} does not exist")
    raw = yaml.safe_load(path.read_text()) or {}
    return TrainConfig.from_dict(apply_overrides(raw, overrides))


@app.command()
def train(
    config_path: Annotated[
        Path | None, typer.Argument(metavar="CONFIG", help="YAML run config")
    ] = None,
    set_: Annotated[
        list[str], typer.Option("--set", help="override key.sub=value (repeatable)")
    ] = [],  # noqa: B006
    out: Annotated[
        Path | None, typer.Option(help="run directory (default runs/<name>-<time>)")
    ] = None,
    data_dir: Annotated[
        str | None, typer.Option(help="dataset folder (else $ADADPIGU_DATA or cache)")
    ] = None,
    workers: Annotated[int, typer.Option(help="Ray Train workers; 1 runs in-process")] = 1,
    gpus_per_worker: Annotated[float, typer.Option(help="GPUs per Ray Train worker")] = 0.0,
    address: Annotated[
        str | None, typer.Option(help="Ray cluster address (auto, ray://..., host:port)")
    ] = None,
    resume: Annotated[
        Path | None, typer.Option(help="continue an interrupted in-process run")
    ] = None,
    quiet: Annotated[bool, typer.Option(help="no progress output")] = False,
) -> None:
    """Train one run (nonprivate | dpsgd | opacus_dpsgd | adadpigu) and write its run directory."""
    from adadpigu.config import ConfigError
    from study.progress import EpochPrinter

    if workers < 1:
        _fail(f"--workers must be >= 1, got {workers}")
    try:
        if resume is not None:
            from study.runner import resume_run

            metrics = resume_run(
                resume, data_dir=data_dir, progress=None if quiet else EpochPrinter()
            )
            _print_summary(metrics, resume)
            return
        if config_path is None:
            _fail("give a CONFIG file (or --resume RUN_DIR)")
        config = load_train_config(config_path, set_)
        run_dir = out or Path("runs") / f"{config_path.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
        if workers == 1 and address is None and gpus_per_worker == 0:
            from study.runner import execute_run

            metrics = execute_run(
                config,
                out_dir=run_dir,
                data_dir=data_dir,
                progress=None if quiet else EpochPrinter(),
            )
        else:
            from study.distributed import run_distributed

            metrics = run_distributed(
                config,
                out_dir=run_dir,
                workers=workers,
                gpus_per_worker=gpus_per_worker,
                address=address,
                data_dir=data_dir,
                progress=None if quiet else EpochPrinter(),
            )
    except ConfigError as exc:
        _fail(f"invalid config: {exc}")
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    except RuntimeError as exc:  # a Ray Train run that failed after its retries
        _fail(str(exc), code=1)
    _print_summary(metrics, run_dir)


def _print_summary(metrics: dict[str, Any], run_dir: Path) -> None:
    privacy = metrics["privacy"]
    typer.echo(
        f"done: test accuracy {metrics['test_accuracy']:.4f}, validation {metrics['val_accuracy']:.4f}, "
        f"ε={metrics['epsilon']:.4g} (δ={metrics['delta']:.3g}, σ={metrics['sigma']:.4g}), "
        f"{metrics['steps']} steps, {metrics['samples_per_second']:.0f} samples/s, "
        f"{metrics['wall_time']:.1f}s"
    )
    if metrics.get("lost_steps"):
        typer.echo(
            f"note: {metrics['lost_steps']} steps were executed and lost to restarts; they are charged. "
            + (
                "The run stopped early to stay within its budget."
                if metrics.get("budget_exhausted")
                else ""
            )
        )
    if not privacy["private"]:
        typer.secho(privacy["statement"], fg=typer.colors.YELLOW)
    typer.echo(f"run directory: {run_dir}")


@app.command()
def accounting(
    epsilon: Annotated[float, typer.Option(help="target ε")],
    delta: Annotated[float, typer.Option(help="δ (< 1/N)")],
    sample_rate: Annotated[float, typer.Option(help="Poisson sampling rate q")],
    steps: Annotated[int, typer.Option(help="number of steps T")],
    dataset_size: Annotated[int | None, typer.Option(help="N: rejects δ ≥ 1/N")] = None,
    accountant: Annotated[str, typer.Option(help="rdp (default) or prv")] = "rdp",
    json_: Annotated[bool, typer.Option("--json", help="print a JSON object")] = False,
) -> None:
    """Calibrate σ for (ε, δ, q, T) and print the ε actually achieved."""
    from adadpigu.accounting import AccountingError, calibrate_noise, check_delta, compute_epsilon
    from adadpigu.config import AccountantKind

    try:
        kind = AccountantKind(accountant)
    except ValueError:
        _fail(f"--accountant: got {accountant!r}; allowed: rdp, prv")
    try:
        if dataset_size is not None:
            check_delta(delta=delta, dataset_size=dataset_size)
        sigma = calibrate_noise(
            epsilon=epsilon, delta=delta, sample_rate=sample_rate, steps=steps, accountant=kind
        )
        achieved = compute_epsilon(
            noise_multiplier=sigma,
            sample_rate=sample_rate,
            steps=steps,
            delta=delta,
            accountant=kind,
        )
    except (AccountingError, ValueError) as exc:
        _fail(str(exc))
    result = {
        "sigma": sigma,
        "epsilon": achieved,
        "target_epsilon": epsilon,
        "delta": delta,
        "sample_rate": sample_rate,
        "steps": steps,
        "accountant": kind.value,
    }
    if json_:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"σ = {sigma:.6g}  →  ε = {achieved:.6g} (target {epsilon}, δ = {delta:g}, q = {sample_rate:g}, "
            f"T = {steps}, accountant {kind.value})"
        )


@data_app.command("fetch")
def data_fetch(
    name: Annotated[str, typer.Argument(help="mnist | fashion-mnist | cifar10")],
    data_dir: Annotated[
        str | None, typer.Option(help="dataset folder (else $ADADPIGU_DATA or cache)")
    ] = None,
) -> None:
    """Fetch a dataset into the data folder and verify its checksums."""
    from adadpigu.data import fetch

    try:
        path = fetch(name, data_dir=data_dir, progress=lambda msg: typer.echo(msg, err=True))
    except (ValueError, FileNotFoundError) as exc:
        _fail(str(exc))
    typer.echo(f"{name}: ready in {path}")


@data_app.command("list")
def data_list(
    data_dir: Annotated[
        str | None, typer.Option(help="dataset folder (else $ADADPIGU_DATA or cache)")
    ] = None,
) -> None:
    """Show which datasets are available locally."""
    from adadpigu.data import dataset_status, resolve_data_dir

    typer.echo(f"data folder: {resolve_data_dir(data_dir)}")
    for status in dataset_status(data_dir=data_dir):
        mark = "yes" if status.present else "no "
        typer.echo(f"  {mark}  {status.name:<16} {status.detail}")


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
