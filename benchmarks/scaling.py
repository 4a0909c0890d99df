"""Throughput of one training run: in-process vs Ray Train with 1 and 2 workers, and Ray's overhead.

    .venv/bin/python benchmarks/scaling.py [--out benchmarks/results/scaling.json] [--force NAME]

Each measurement is one full `adadpigu train` run of the same config (synthetic data, DP-SGD on the
MNIST CNN by default); Ray runs start a local Ray instance each (as the CLI does without --address),
so their overhead includes `ray.init`. Figures: samples/s during training (expected batch qN × steps
/ training time, as in metrics.json), the run's wall time seen by the caller, and for Ray its split
into connect (ray.init), fit (worker start + training + checkpoints) and the rest. Resumable: the
results file is rewritten after every measurement and measurements already in it are skipped
(`--force NAME` redoes one). Timings on a shared machine are noisy; the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from adadpigu.config import TrainConfig  # noqa: E402
from study.files import write_json_atomic  # noqa: E402

DEFAULT_OUT = REPO / "benchmarks" / "results" / "scaling.json"


def bench_config(*, size: int, epochs: float, model: str, threads: int | None) -> TrainConfig:
    return TrainConfig.from_dict(
        {
            "method": "dpsgd",
            "seed": 0,
            "data": {"name": "synthetic", "synthetic_size": size, "validation_size": 256},
            "model": {"name": model},
            "training": {"epochs": epochs, "batch_size": 256, "lr": 1.0},
            "privacy": {"epsilon": 8.0, "delta": 1e-5},
            "runtime": {"device": "cpu", "threads": threads},
        }
    )


def measure_inprocess(config: TrainConfig, run_dir: Path) -> dict[str, Any]:
    from study.runner import execute_run

    start = time.perf_counter()
    metrics = execute_run(config, out_dir=run_dir)
    return _figures(metrics, time.perf_counter() - start)


def measure_ray(config: TrainConfig, run_dir: Path, *, workers: int) -> dict[str, Any]:
    from study.distributed import run_distributed

    start = time.perf_counter()
    metrics = run_distributed(config, out_dir=run_dir, workers=workers)
    figures = _figures(metrics, time.perf_counter() - start)
    ray_info = metrics["ray"]
    figures.update(
        connect_s=ray_info["connect_time"],
        fit_s=ray_info["fit_time"],
        fit_minus_training_s=ray_info["fit_time"] - metrics["train_time"],
        workers=metrics["workers"],
    )
    return figures


def _figures(metrics: dict[str, Any], caller_wall: float) -> dict[str, Any]:
    return {
        "samples_per_second": metrics["samples_per_second"],
        "train_time_s": metrics["train_time"],
        "steps": metrics["steps"],
        "expected_batch_size": metrics["expected_batch_size"],
        "wall_s": caller_wall,
        "load_average": os.getloadavg()[0],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--force", action="append", default=[], help="redo this measurement")
    parser.add_argument("--size", type=int, default=32768, help="synthetic training-set size")
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--model", default="mnist_cnn")
    args = parser.parse_args(argv)

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    results: dict[str, Any] = json.loads(args.out.read_text()) if args.out.exists() else {}
    setup = {"size": args.size, "epochs": args.epochs, "model": args.model}
    if results.get("setup", setup) != setup:
        print(f"{args.out} holds another setup {results['setup']}; use --out or delete it")
        return 2
    results["setup"] = setup
    results.setdefault("machine", {"platform": platform.platform(), "cpus": os.cpu_count()})

    base = bench_config(size=args.size, epochs=args.epochs, model=args.model, threads=None)
    one_thread = bench_config(size=args.size, epochs=args.epochs, model=args.model, threads=1)
    plan: dict[str, Callable[[Path], dict[str, Any]]] = {
        "inprocess": lambda d: measure_inprocess(base, d),
        "inprocess_1thread": lambda d: measure_inprocess(one_thread, d),
        "ray_1_worker": lambda d: measure_ray(base, d, workers=1),
        "ray_2_workers": lambda d: measure_ray(base, d, workers=2),
    }
    for name, run in plan.items():
        if name in results.get("measurements", {}) and name not in args.force:
            print(f"{name}: already measured, skipped")
            continue
        with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as folder:
            figures = run(Path(folder) / "run")
        results.setdefault("measurements", {})[name] = figures
        write_json_atomic(args.out, results)
        rate, wall = figures["samples_per_second"], figures["wall_s"]
        print(f"{name}: {rate:.0f} samples/s, wall {wall:.1f}s")
    results["derived"] = derive(results.get("measurements", {}))
    write_json_atomic(args.out, results)
    report(results)
    return 0


def derive(m: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Speed-up of 2 workers over 1, and Ray Train's per-run overhead: the time a run spends
    outside training (wall - train), Ray with 1 worker minus in-process with 1 thread (the same
    compute per process), so the difference is Ray's alone."""
    out: dict[str, float] = {}
    if "ray_1_worker" in m and "ray_2_workers" in m:
        one, two = m["ray_1_worker"], m["ray_2_workers"]
        out["speedup_2_over_1_workers"] = two["samples_per_second"] / one["samples_per_second"]
    if "inprocess" in m and "ray_2_workers" in m:
        out["ray_2_workers_over_inprocess"] = (
            m["ray_2_workers"]["samples_per_second"] / m["inprocess"]["samples_per_second"]
        )
    if "inprocess_1thread" in m and "ray_1_worker" in m:
        ray, local = m["ray_1_worker"], m["inprocess_1thread"]
        out["ray_overhead_per_run_s"] = (ray["wall_s"] - ray["train_time_s"]) - (
            local["wall_s"] - local["train_time_s"]
        )
        out["ray_connect_s"] = ray["connect_s"]
        out["ray_fit_minus_training_s"] = ray["fit_minus_training_s"]
    return out


def report(results: dict[str, Any]) -> None:
    print(f"setup: {results['setup']}")
    for name, f in results.get("measurements", {}).items():
        extra = ""
        if "connect_s" in f:
            extra = f"  (connect {f['connect_s']:.1f}s, fit {f['fit_s']:.1f}s)"
        print(
            f"  {name:<18} {f['samples_per_second']:8.0f} samples/s"
            f"  train {f['train_time_s']:6.1f}s  wall {f['wall_s']:6.1f}s"
            f"  load {f['load_average']:.1f}{extra}"
        )
    for key, value in results.get("derived", {}).items():
        print(f"  {key}: {value:.2f}")


if __name__ == "__main__":
    sys.exit(main())
