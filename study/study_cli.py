"""`adadpigu study ...`: launch, watch and resume privacy-utility studies.

Commands parse and delegate (to `study.tune` and `study.store`). The study file is validated before
Ray is imported, so a malformed file fails in a second with the key named.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

import typer

__all__ = ["study_app"]

study_app = typer.Typer(
    help="Privacy-utility studies: Ray Tune + Optuna at fixed ε budgets.", no_args_is_help=True
)

_OUT_HELP = "folder that holds studies by name"
_ADDRESS_HELP = "Ray cluster address (host:port, ray://..., auto); default: start a local Ray"
_DATA_HELP = "dataset folder (else $ADADPIGU_DATA or the cache)"


def _fail(message: str, code: int = 2) -> None:
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _echo(message: str) -> None:
    typer.echo(message)


@study_app.command()
def launch(
    space: Annotated[
        Path, typer.Argument(metavar="SPACE.yaml", help="study file (search_spaces/*.yaml)")
    ],
    name: Annotated[str | None, typer.Option(help="study name (default: the file's stem)")] = None,
    address: Annotated[str | None, typer.Option(help=_ADDRESS_HELP)] = None,
    out: Annotated[Path, typer.Option(help=_OUT_HELP)] = Path("studies"),
    data_dir: Annotated[str | None, typer.Option(help=_DATA_HELP)] = None,
) -> None:
    """Validate SPACE.yaml, draw the trial counts, and run the study (results in OUT/NAME)."""
    from adadpigu.config import ConfigError
    from study.space import StudyError, load_study

    try:
        load_study(space)
    except StudyError as exc:
        _fail(f"invalid study file {space}: {exc}")
    except FileNotFoundError as exc:
        _fail(str(exc))
    started = time.perf_counter()
    try:
        from study import tune as study_tune

        paths = study_tune.launch(
            space, name=name, out=out, address=address, data_dir=data_dir, echo=_echo
        )
    except StudyError as exc:
        _fail(f"invalid study file {space}: {exc}")
    except ConfigError as exc:
        _fail(f"invalid study file {space}: base.{exc}")
    except (FileExistsError, FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _interrupted(out / (name or space.stem))
    _finish(paths, started)


@study_app.command()
def resume(
    study: Annotated[
        str, typer.Argument(metavar="NAME|DIR", help="study name (under --out) or directory")
    ],
    address: Annotated[str | None, typer.Option(help=_ADDRESS_HELP)] = None,
    out: Annotated[Path, typer.Option(help=_OUT_HELP)] = Path("studies"),
    data_dir: Annotated[str | None, typer.Option(help=_DATA_HELP)] = None,
) -> None:
    """Continue a study after a crash or Ctrl-C: same trial counts, finished trials kept."""
    from study.space import StudyError

    started = time.perf_counter()
    try:
        from study import tune as study_tune

        paths = study_tune.resume(study, out=out, address=address, data_dir=data_dir, echo=_echo)
    except StudyError as exc:
        _fail(f"invalid study file: {exc}")
    except (FileNotFoundError, RuntimeError) as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        _interrupted(Path(study))
    _finish(paths, started)


@study_app.command()
def status(
    study: Annotated[
        str, typer.Argument(metavar="NAME|DIR", help="study name (under --out) or directory")
    ],
    out: Annotated[Path, typer.Option(help=_OUT_HELP)] = Path("studies"),
    watch: Annotated[bool, typer.Option(help="refresh until the study stops")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes with --watch")] = 2.0,
    json_: Annotated[bool, typer.Option("--json", help="print a JSON object")] = False,
) -> None:
    """Trials done / running / failed per (method, ε), the best so far and the tuning cost."""
    from study.store import resolve_study_dir, summarise

    try:
        paths = resolve_study_dir(study, out=out)
    except FileNotFoundError as exc:
        _fail(str(exc))
    if json_:
        typer.echo(json.dumps(summarise(paths), default=str, indent=2))
        return
    if not watch:
        _console().print(render_summary(summarise(paths)))
        return
    from rich.live import Live

    with Live(render_summary(summarise(paths)), console=_console(), refresh_per_second=4) as live:
        while True:
            summary = summarise(paths)
            live.update(render_summary(summary))
            if summary["state"] != "running":
                break
            time.sleep(interval)


def _console() -> Any:
    from rich.console import Console

    console = Console(highlight=False)
    if not console.is_terminal:  # a pipe or a log file: do not squeeze the table to 80 columns
        console = Console(highlight=False, width=160)
    return console


def _interrupted(where: Path) -> None:
    typer.secho(
        f"interrupted: finished trials are saved; continue with `adadpigu study resume {where}`",
        fg=typer.colors.YELLOW,
        err=True,
    )
    raise typer.Exit(130)


def _finish(paths: Any, started: float) -> None:
    from study.store import summarise

    summary = summarise(paths)
    wall = time.perf_counter() - started
    _console().print(render_summary(summary))
    typer.echo(f"study finished in {wall:.0f}s; results: {paths.trials}")
    train = _training_seconds(paths, since=started_at(started))
    slots = summary.get("concurrency")
    if train and slots:
        typer.echo(
            f"training loops used {train:.0f}s of {wall:.0f}s × {slots} trial slots "
            f"({train / (wall * slots):.0%}; the rest: start-up, data loading, idle slots)"
        )


def started_at(perf_start: float) -> float:
    """The wall-clock time of a `time.perf_counter()` reading."""
    return time.time() - (time.perf_counter() - perf_start)


def _training_seconds(paths: Any, *, since: float) -> float:
    """Σ train_time of the runs this process finished (by their finish time)."""
    from reports.schema import TRIALS_SCHEMA
    from reports.table import read_table

    total = 0.0
    for row in read_table(paths.trials, TRIALS_SCHEMA).to_pylist():
        if row["train_time"] is not None and row["finished_at"].timestamp() >= since:
            total += row["train_time"]
    return total


def _num(value: Any, fmt: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return format(value, fmt)


def render_summary(summary: dict[str, Any]) -> Any:
    """A rich renderable of `study.store.summarise`'s result."""
    from rich.console import Group as RichGroup
    from rich.table import Table
    from rich.text import Text

    head = Text(
        f"study {summary['name']} ({summary['root']}): {summary['state']}, "
        f"{summary['done']}/{summary['planned']} trials finished"
        + (f", now {summary['current_group']}" if summary.get("current_group") else "")
    )
    table = Table()
    columns = (
        "method", "ε", "K", "done", "running", "pruned", "failed", "infeas.",
        "best val", "its test", "σ", "ε run", "ε select", "ε all",
    )  # fmt: skip
    for title in columns:
        table.add_column(title, justify="left" if title in ("method", "running") else "right")
    notes = []
    for g in summary["groups"]:
        best = g["best"] or {}
        coverage = g["epsilon_selection_coverage"] or ""
        if g["epsilon_selection"] is not None:
            selection = _num(g["epsilon_selection"], ".3g")
        elif g["method"] == "nonprivate":
            selection = "-"
        else:
            selection = "not covered"
            if coverage.startswith("not covered: "):
                notes.append(f"{g['group']}: ε select {coverage}")
        running = ", ".join(
            f"#{r.get('trial_id')}" + (f"@ep{r['epoch']}" if r.get("epoch") else "")
            for r in g["running"]
        )
        sigma = g["sigma"] if g["sigma"] is not None else best.get("sigma")
        table.add_row(
            g["method"],
            "-" if g["epsilon"] is None else f"{g['epsilon']:g}",
            str(g["trials_planned"]),
            str(g["done"]),
            running or "-",
            str(g["pruned"]),
            str(g["failed"]),
            str(g["infeasible"]),
            _num(best.get("val_accuracy")) + (f" #{best['trial_id']}" if best else ""),
            _num(best.get("test_accuracy")),
            "-" if g["method"] == "nonprivate" else _num(sigma, ".4g"),
            _num(g["epsilon_one_run"], ".3g"),
            selection,
            _num(g["epsilon_all_trials"], ".3g"),
        )
    if summary.get("overhead") is not None:
        notes.append(
            f"per-trial overhead (trial time outside the training loop): {summary['overhead']:.1%}"
        )
    notes.append(
        "best: highest validation accuracy among complete, within-budget trials (test is reported, "
        "never used to select). ε select holds only if only the selected run is released."
    )
    return RichGroup(head, table, Text("\n".join(notes), style="dim"))
