"""Samples/s of one training step on the MNIST CNN, ours against Opacus, measured side by side.

Configs (batch 256, random 1×28×28 inputs, σ = 1, C = 1):
  nonprivate    our `batch_loss_gradient` + SGD update
  dpsgd         our `per_example_gradients` + `dp_release` + update
  adadpigu      our stage-2 step: `per_example_gradients` + `adaptive_release` on a 60 % mask
                (quantile count released too) + `update_stats_` + update
  opacus_hooks  Opacus `make_private(grad_sample_mode="hooks")`: forward, backward, DPOptimizer.step
  opacus_ew     the same with `grad_sample_mode="ew"` (expanded weights)

Every repetition runs each config once, in turn (interleaved, so drifts in machine load hit all of
them alike), after warm-up steps; a repetition times `--steps` steps. Medians over repetitions,
and the ratio to the non-private step, are printed and written to
benchmarks/results/step_throughput.json.

Resumable: the JSON is rewritten after every repetition; configs already measured with the same
settings are skipped, partly measured ones continue (`--force` measures everything again).

    .venv/bin/python benchmarks/step_throughput.py [--repeats N] [--quick] [--force] [--only a,b]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from adadpigu.config import ModelConfig  # noqa: E402
from adadpigu.gradients import batch_loss_gradient, per_example_gradients  # noqa: E402
from adadpigu.mechanisms import adaptive_release, dp_release  # noqa: E402
from adadpigu.models import build_model  # noqa: E402
from adadpigu.noise import make_generator  # noqa: E402
from adadpigu.normalisation import init_stats, scales, update_stats_  # noqa: E402
from adadpigu.schedules import quantile_noise_split  # noqa: E402

RESULTS = REPO / "benchmarks" / "results" / "step_throughput.json"
CONFIGS = ("nonprivate", "dpsgd", "adadpigu", "opacus_hooks", "opacus_ew")
SIGMA, CLIP, KEEP_RATIO = 1.0, 1.0, 0.6

Step = Callable[[], None]


@dataclasses.dataclass(frozen=True)
class Settings:
    """What a measurement depends on; stored results are reused only under equal settings."""

    batch_size: int
    steps: int
    warmup: int
    threads: int
    torch: str
    opacus: str
    machine: str

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --- the steps ------------------------------------------------------------------------------------


def _model() -> nn.Module:
    return build_model(
        ModelConfig(name="mnist_cnn"),
        input_shape=(1, 28, 28),
        num_classes=10,
        generator=make_generator(0),
    )


def _params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters()}


def _apply(
    model: nn.Module, optimizer: torch.optim.Optimizer, grad: dict[str, torch.Tensor]
) -> None:
    for name, p in model.named_parameters():
        p.grad = grad[name]
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def make_step(name: str, x: torch.Tensor, y: torch.Tensor) -> Step:
    """A closure running one step of config `name` on the batch (x, y)."""
    batch = float(x.shape[0])
    model = _model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    noise = make_generator(1)  # a benchmark: seeded noise is fine (nothing is released)

    if name == "nonprivate":

        def step() -> None:
            grad = batch_loss_gradient(model, _params(model), x, y, divisor=batch)
            _apply(model, optimizer, grad)

        return step

    if name == "dpsgd":

        def step() -> None:
            per_example = per_example_gradients(model, _params(model), x, y)
            grad, _ = dp_release(
                per_example,
                clip_norm=CLIP,
                grad_noise_multiplier=SIGMA,
                count_std=None,
                expected_batch_size=batch,
                noise_generator=noise,
            )
            _apply(model, optimizer, grad)

        return step

    if name == "adadpigu":
        params = _params(model)
        mask_gen = make_generator(2)
        mask = {n: torch.rand(p.shape, generator=mask_gen) < KEEP_RATIO for n, p in params.items()}
        stats = init_stats(params)
        count_std = batch / 20
        sigma_g = quantile_noise_split(noise_multiplier=SIGMA, count_std=count_std)

        def step() -> None:
            per_example = per_example_gradients(model, _params(model), x, y)
            scale = scales(stats, gamma=1e-8)
            grad, _ = adaptive_release(
                per_example,
                mask=mask,
                mean=stats.mean,
                scale=scale,
                clip_norm=CLIP,
                grad_noise_multiplier=sigma_g,
                count_std=count_std,
                expected_batch_size=batch,
                noise_generator=noise,
            )
            update_stats_(
                stats,
                released=grad,
                noise_variance={n: (sigma_g * CLIP * b / batch) ** 2 for n, b in scale.items()},
                mask=mask,
                beta1=0.9,
                beta2=0.999,
                s_min=1e-12,
                s_max=1e6,
            )
            _apply(model, optimizer, grad)

        return step

    if name.startswith("opacus_"):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        mode = name.removeprefix("opacus_")
        loader = DataLoader(TensorDataset(x, y), batch_size=x.shape[0])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            engine = PrivacyEngine(accountant="rdp")
            private_model, private_optimizer, _ = engine.make_private(
                module=model,
                optimizer=optimizer,
                data_loader=loader,
                noise_multiplier=SIGMA,
                max_grad_norm=CLIP,
                poisson_sampling=False,  # a fixed batch of 256, as for our configs
                grad_sample_mode=mode,
                noise_generator=noise,
            )
        criterion = nn.CrossEntropyLoss()

        def step() -> None:
            private_optimizer.zero_grad(set_to_none=True)
            criterion(private_model(x), y).backward()
            private_optimizer.step()

        return step

    raise ValueError(f"unknown config {name!r}; allowed: {', '.join(CONFIGS)}")


# --- measurement ----------------------------------------------------------------------------------


def time_steps(step: Step, *, steps: int) -> tuple[float, float]:
    """(wall, CPU) time of `steps` consecutive steps, in seconds. CPU time (all threads of this
    process) is less sensitive than wall time to other processes on a shared machine."""
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    return time.perf_counter() - wall, time.process_time() - cpu


def load_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}


def save_results(path: Path, results: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def summarise(entry: dict[str, Any], batch: int, steps: int) -> dict[str, Any]:
    rates = [batch * steps / t for t in entry["seconds"]]
    entry["samples_per_second"] = rates
    entry["median_samples_per_second"] = statistics.median(rates)
    entry["best_samples_per_second"] = max(rates)
    entry["median_step_ms"] = 1000 * statistics.median(entry["seconds"]) / steps
    entry["median_cpu_step_ms"] = 1000 * statistics.median(entry["cpu_seconds"]) / steps
    return entry


def measure(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    import opacus

    settings = Settings(
        batch_size=args.batch_size,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        torch=torch.__version__,
        opacus=opacus.__version__,
        machine=f"{platform.machine()} {os.cpu_count()} cpus",
    ).to_dict()
    results = load_results(args.output)
    configs = results.setdefault("configs", {})
    wanted = args.only or list(CONFIGS)
    todo = []
    for name in wanted:
        entry = configs.get(name)
        if args.force or entry is None or entry.get("settings") != settings:
            configs[name] = {
                "settings": settings,
                "seconds": [],
                "cpu_seconds": [],
                "complete": False,
            }
        if len(configs[name]["seconds"]) < args.repeats:
            configs[name]["complete"] = False
            todo.append(name)
        else:
            print(
                f"{name}: already measured ({len(configs[name]['seconds'])} repetitions), skipped"
            )
    if not todo:
        return results

    generator = make_generator(3)
    x = torch.randn(args.batch_size, 1, 28, 28, generator=generator)
    y = torch.randint(0, 10, (args.batch_size,), generator=generator)
    steps = {name: make_step(name, x, y) for name in todo}
    for name in todo:  # warm-up: first calls compile vmap graphs, allocate, install hooks
        time_steps(steps[name], steps=args.warmup)

    rounds = max(args.repeats - len(configs[name]["seconds"]) for name in todo)
    for r in range(rounds):
        for name in todo:
            entry = configs[name]
            if len(entry["seconds"]) >= args.repeats:
                continue
            wall, cpu = time_steps(steps[name], steps=args.steps)
            entry["seconds"].append(wall)
            entry["cpu_seconds"].append(cpu)
            entry["complete"] = len(entry["seconds"]) >= args.repeats
            summarise(entry, args.batch_size, args.steps)
        save_results(args.output, results)
        done = ", ".join(
            f"{n} {1000 * configs[n]['seconds'][-1] / args.steps:.0f} ms"
            for n in todo
            if configs[n]["seconds"]
        )
        print(f"repetition {r + 1}/{rounds}: {done}", flush=True)
    return results


def report(results: dict[str, Any]) -> str:
    configs = results.get("configs", {})
    base = configs.get("nonprivate", {}).get("median_samples_per_second")
    lines = [
        f"{'config':<14}{'samples/s':>11}{'best':>8}{'ms/step':>9}{'cpu ms':>8}"
        f"{'vs nonprivate':>15}{'reps':>6}",
        "-" * 71,
    ]
    for name in CONFIGS:
        entry = configs.get(name)
        if not entry or "median_samples_per_second" not in entry:
            continue
        rate = entry["median_samples_per_second"]
        ratio = f"{rate / base:.3f}x" if base else "n/a"
        lines.append(
            f"{name:<14}{rate:>11.0f}{entry['best_samples_per_second']:>8.0f}"
            f"{entry['median_step_ms']:>9.1f}{entry['median_cpu_step_ms']:>8.1f}"
            f"{ratio:>15}{len(entry['seconds']):>6}"
        )
    ours = configs.get("dpsgd", {}).get("median_samples_per_second")
    opacus = [
        configs[n]["median_samples_per_second"]
        for n in ("opacus_hooks", "opacus_ew")
        if "median_samples_per_second" in configs.get(n, {})
    ]
    if ours and opacus:
        lines.append(f"our DP-SGD / best Opacus mode: {ours / max(opacus):.3f}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=15, help="timed repetitions per config")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed repetition")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per config first")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    parser.add_argument("--quick", action="store_true", help="3 repetitions of 1 step, 1 warm-up")
    parser.add_argument("--force", action="store_true", help="re-measure configs already stored")
    parser.add_argument(
        "--only",
        type=lambda s: [c for c in s.split(",") if c],
        default=None,
        help=f"comma-separated subset of {','.join(CONFIGS)}",
    )
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.steps, args.warmup = 3, 1, 1
    unknown = sorted(set(args.only or ()) - set(CONFIGS))
    if unknown:
        parser.error(
            f"--only: unknown config(s) {', '.join(unknown)}; allowed: {', '.join(CONFIGS)}"
        )
    if args.repeats < 1 or args.steps < 1 or args.warmup < 0 or not math.isfinite(args.repeats):
        parser.error("--repeats and --steps must be >= 1, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    results = measure(args)
    print(report(results))
    print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
