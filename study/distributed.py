"""`adadpigu train --workers N`: the same run on Ray Train (V2 API), on CPUs (gloo) or GPUs.

Data parallelism that keeps the DP guarantee (ALGORITHM.md, "Data parallelism"):
- every worker builds the whole run itself (`study.runner.prepare_run`: data, plan, model from the
  same seed, so the replicas start identical) and owns one disjoint shard of the training split
  (`adadpigu.sampling.shard_indices`: no padding, no duplicates, so no example is seen twice);
- each worker Poisson-samples its shard at rate q with its own generator, derived from
  (seed, rank, epoch, restarts): the union over workers is a Poisson(q) sample of the whole split;
- per-example clipping happens on the worker; the clipped sums (and the quantile count) travel in
  one flat buffer, summed by one all-reduce (`TorchDistributedCollective`);
- the Gaussian noise is added exactly once per step, on rank 0, before the all-reduce (the other
  ranks hold no noise generator), so the released sum has the single-process noise N(0, σ²C²);
- the result is divided by the global expected batch size qN, the same on every rank; the AdaDPIGU
  mask and m/s statistics come from the released gradient, hence are identical on every rank (the
  run checks this at the end: `replicas_consistent` in metrics.json);
- after a restart the noise generator is new (OS entropy, or a seed derived from the executed step
  count in seeded mode): a noise stream is never replayed on a different batch.

Checkpoints and failures: rank 0 writes the write-ahead ledger (`study.runner.ledger_hook`) before
every step and, after every epoch, the trainer state to the run directory and to Ray Train
(`ray.train.report(..., checkpoint=...)`, kept under RUN_DIR/ray/). With
`FailureConfig(max_failures=...)` Ray Train restarts the worker group after a failure; every worker
restores the last reported checkpoint and the ledger (`study.runner.restore_state`), so ε counts
every executed step, redone ones included. By default the run then stops when the planned budget is
spent and reports the lost steps; with privacy.allow_overspend it finishes its plan and reports the
larger ε (metrics.json: `lost_steps`, `budget_exhausted`, `over_budget`).

Storage: the run directory (ledger, checkpoints, metrics) must be visible to every worker and to the
driver. On one machine (or the loopback test cluster) that holds for any local folder; on a real
multi-node cluster put the run directory (`--out`) on shared storage (NFS or similar), and make the
dataset available on every node (`--data-dir`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from adadpigu.collective import TorchDistributedCollective
from adadpigu.config import Method, TrainConfig
from adadpigu.plan import TrainingPlan
from adadpigu.training import Callbacks, EpochReport, TrainerState, init_state, run_training
from study.cluster import (
    ClusterError,
    check_resources,
    connect,
    default_local_cpus,
    disconnect,
    probe_address,
    resolve_address,
    worker_env,
)
from study.files import read_json, write_json_atomic, write_yaml_atomic
from study.runner import (
    build_metrics,
    checkpoint_hook,
    fault_hook,
    ledger_hook,
    prepare_run,
    restore_state,
    write_outputs,
)

__all__ = [
    "DEFAULT_MAX_FAILURES",
    "make_trainer",
    "run_distributed",
    "train_loop_per_worker",
]

DEFAULT_MAX_FAILURES = 3
CHECKPOINT_FILE = "checkpoint.pt"
Progress = Callable[[EpochReport, TrainingPlan], None]


# --- the driver -----------------------------------------------------------------------------------


def run_distributed(
    config: TrainConfig,
    *,
    out_dir: Path,
    workers: int,
    gpus_per_worker: float = 0.0,
    address: str | None = None,
    data_dir: str | None = None,
    progress: Progress | None = None,
    cpus_per_worker: float = 1.0,
    num_cpus: int | None = None,
    max_failures: int = DEFAULT_MAX_FAILURES,
    placement_strategy: str = "PACK",
    storage_path: str | None = None,
    callbacks: list[Any] | None = None,
    reserved_cpus: float = 0.0,
) -> dict[str, Any]:
    """Run `config` on `workers` Ray Train workers and write its run directory. Returns the metrics.

    Without `address` (and $RAY_ADDRESS) a local Ray is started with `num_cpus` CPUs (default: this
    machine's); with it, the cluster there is joined; a process already connected to Ray (a Tune
    trial, a test) reuses its connection and keeps it. Raises ClusterError (a ValueError) for worker
    counts or resources the cluster cannot place, and for unreachable addresses, before any worker
    starts. `callbacks` go to Ray Train's RunConfig (in a Tune trial: TuneReportCallback, with
    `reserved_cpus` the trial's own CPUs).
    """
    wall_start = time.perf_counter()
    if workers < 1:
        raise ClusterError(f"--workers: got {workers}; allowed: >= 1")
    if gpus_per_worker < 0:
        raise ClusterError(f"--gpus-per-worker: got {gpus_per_worker}; allowed: >= 0")
    if config.method is Method.OPACUS_DPSGD:
        raise ValueError(
            "method opacus_dpsgd runs in-process only (--workers 1, no --address): Opacus's own "
            "engine is the external reference and is not data-parallel here"
        )
    if gpus_per_worker == 0 and config.runtime.device.startswith("cuda"):
        raise ValueError(
            f"runtime.device={config.runtime.device!r} needs --gpus-per-worker > 0 on Ray Train"
        )
    out_dir = Path(out_dir).resolve()
    if (out_dir / "ledger.json").exists():
        raise ValueError(
            f"{out_dir} already holds a run (ledger.json): choose a new --out (a finished or "
            "interrupted run's privacy ledger must not be mixed with a new run's)"
        )
    # Refuse what cannot work before loading data or spending seconds on ray.init.
    local = _is_local(address)
    if not local and resolve_address(address) is not None:
        probe_address(resolve_address(address))
    if local:
        cpus = default_local_cpus() if num_cpus is None else num_cpus
        if workers * cpus_per_worker > cpus:
            raise ClusterError(
                f"--workers {workers}: needs {workers * cpus_per_worker:g} CPUs "
                f"({cpus_per_worker:g} per worker) but the local Ray gets {cpus} (this machine's "
                "CPUs); use fewer workers or join a larger cluster with --address"
            )
        if gpus_per_worker > 0:
            available = torch.cuda.device_count()
            if workers * gpus_per_worker > available:
                raise ClusterError(
                    f"--gpus-per-worker {gpus_per_worker:g} × {workers} workers needs "
                    f"{workers * gpus_per_worker:g} GPUs; this machine has {available}"
                )
    # Validate the config and calibrate σ here, so a bad config fails once, in the driver, and not
    # in every worker on every retry. On the CPU: the driver's machine may have no GPU, and the
    # plan does not depend on the device.
    on_cpu = config.replace(runtime=dataclasses.replace(config.runtime, device="cpu"))
    plan = prepare_run(on_cpu, data_dir=data_dir).plan

    info = connect(None if local else address, num_cpus=cpus if local else None)
    try:
        check_resources(
            workers=workers,
            cpus_per_worker=cpus_per_worker,
            gpus_per_worker=gpus_per_worker,
            spread=placement_strategy == "STRICT_SPREAD",
            reserved_cpus=reserved_cpus,
            where="the local Ray" if info.started_locally else f"the Ray cluster at {info.address}",
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        write_yaml_atomic(out_dir / "config.yaml", config.to_dict())
        progress_queue = _make_progress_queue() if progress is not None else None
        trainer = make_trainer(
            config,
            out_dir=out_dir,
            workers=workers,
            gpus_per_worker=gpus_per_worker,
            cpus_per_worker=cpus_per_worker,
            data_dir=data_dir,
            max_failures=max_failures,
            placement_strategy=placement_strategy,
            storage_path=storage_path,
            callbacks=callbacks,
            progress_queue=progress_queue,
        )
        fit_start = time.perf_counter()
        with _ProgressPump(progress_queue, progress, plan):
            _fit(trainer)
        fit_time = time.perf_counter() - fit_start
    finally:
        disconnect(info)
    metrics_path = out_dir / "metrics.json"
    if not metrics_path.exists():
        raise RuntimeError(f"the Ray Train run finished without writing {metrics_path}")
    metrics = read_json(metrics_path)
    metrics["ray"] = {
        "address": info.address,
        "started_locally": info.started_locally,
        "connect_time": info.connect_time_s,
        "fit_time": fit_time,
        "driver_wall_time": time.perf_counter() - wall_start,
        "cluster_cpus": info.num_cpus,
        "cluster_gpus": info.num_gpus,
        "cluster_nodes": info.num_nodes,
        "placement_strategy": placement_strategy,
        "max_failures": max_failures,
        "storage_path": _storage_path(out_dir, storage_path),
    }
    write_json_atomic(metrics_path, metrics)
    return metrics


def _is_local(address: str | None) -> bool:
    import ray

    return resolve_address(address) is None and not ray.is_initialized()


def _storage_path(out_dir: Path, storage_path: str | None) -> str:
    return storage_path or str(out_dir / "ray")


def _fit(trainer: Any) -> Any:
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise RuntimeError(
            f"Ray Train run failed after its retries (FailureConfig.max_failures): {exc}"
        ) from exc


def make_trainer(
    config: TrainConfig,
    *,
    out_dir: Path,
    workers: int,
    gpus_per_worker: float = 0.0,
    cpus_per_worker: float = 1.0,
    data_dir: str | None = None,
    max_failures: int = DEFAULT_MAX_FAILURES,
    placement_strategy: str = "PACK",
    storage_path: str | None = None,
    callbacks: list[Any] | None = None,
    progress_queue: Any = None,
    name: str = "train",
) -> Any:
    """A `ray.train.torch.TorchTrainer` for one run of `config` writing to `out_dir`.

    For a Tune trial: build it inside the trial function with
    `callbacks=[ray.tune.integration.ray_train.TuneReportCallback()]` and call `.fit()`; rank 0
    reports each epoch's release-safe `EpochReport` fields (val_accuracy, epsilon, ...).
    Backend: NCCL when each worker holds a whole GPU, else gloo (fractional GPUs may share a device,
    which NCCL refuses).
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.train.v2.api.config import LoggingConfig

    use_gpu = gpus_per_worker > 0
    resources: dict[str, float] = {"CPU": cpus_per_worker}
    if use_gpu:
        resources["GPU"] = gpus_per_worker
    backend = "nccl" if gpus_per_worker >= 1 else "gloo"
    threads = max(1, int(cpus_per_worker))
    loop_config = {
        "config": _worker_config(config, gpus_per_worker).to_dict(),
        "out_dir": str(Path(out_dir).resolve()),
        "data_dir": data_dir,
        "threads": threads,
        "backend": backend,
        "progress_queue": progress_queue,
    }
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend=backend),
        scaling_config=ScalingConfig(
            num_workers=workers,
            use_gpu=use_gpu,
            resources_per_worker=resources,
            placement_strategy=placement_strategy,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=_storage_path(Path(out_dir).resolve(), storage_path),
            failure_config=FailureConfig(max_failures=max_failures),
            # Restores need the latest only; one more is kept as a spare.
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            worker_runtime_env={"env_vars": worker_env(threads)},
            callbacks=callbacks,
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
    )


def _worker_config(config: TrainConfig, gpus_per_worker: float) -> TrainConfig:
    """Pin `runtime.device=auto` to what the worker is given (CPU unless it holds a GPU). Runtime
    settings never change the privacy guarantee."""
    if config.runtime.device != "auto":
        return config
    device = "cuda" if gpus_per_worker > 0 else "cpu"
    return config.replace(runtime=dataclasses.replace(config.runtime, device=device))


# --- progress from rank 0 to the driver -----------------------------------------------------------


def _make_progress_queue() -> Any:
    from ray.util.queue import Queue

    # A zero-CPU actor: it must never take a CPU that a worker needs.
    return Queue(actor_options={"num_cpus": 0})


class _ProgressPump:
    """While the driver blocks in `fit()`, a thread hands rank 0's epoch reports to `progress`."""

    def __init__(self, source: Any, progress: Progress | None, plan: TrainingPlan) -> None:
        self._source, self._progress, self._plan = source, progress, plan
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> _ProgressPump:
        if self._source is not None and self._progress is not None:
            self._thread = threading.Thread(target=self._pump, name="progress-pump", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _pump(self) -> None:
        from ray.util.queue import Empty

        while True:
            try:
                item = self._source.get(timeout=0.5)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            except Exception:  # the queue actor is gone (shutdown): progress is best effort
                return
            try:
                assert self._progress is not None
                self._progress(EpochReport(**item), self._plan)
            except Exception:  # a display problem must not stop a run
                pass


# --- the workers ----------------------------------------------------------------------------------


def train_loop_per_worker(loop: dict[str, Any]) -> None:
    """Ray Train's per-worker function: restore, train this worker's shard, checkpoint, report."""
    import ray
    import ray.train
    import torch.distributed as dist

    wall_start = time.perf_counter()
    # One thread per CPU given to the worker; prepare_run overrides it if runtime.threads is set.
    torch.set_num_threads(int(loop["threads"]))
    config = TrainConfig.from_dict(loop["config"])
    out_dir = Path(loop["out_dir"])
    prepared = prepare_run(config, data_dir=loop["data_dir"])
    collective = TorchDistributedCollective()
    rank, world = collective.rank, collective.world_size
    state = init_state(config, prepared.model)

    lost = _restore(state, out_dir)
    # Nobody may write the ledger before every rank has read it; then all ranks must agree on the
    # counters that drive sampling and the budget stop, or the all-reduces would fall out of step.
    dist.barrier()
    counters = (state.step, state.executed_steps, state.restarts)
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, (counters, ray.get_runtime_context().get_node_id()))
    if any(g[0] != counters for g in gathered):
        raise RuntimeError(
            f"ranks restored different states {[g[0] for g in gathered]}: the run directory "
            f"{out_dir} must be on storage shared by every node"
        )
    nodes = [g[1] for g in gathered]

    before_step: list[Callable[[TrainerState], None]] = []
    on_epoch_end: list[Callable[[EpochReport, TrainerState], None]] = []
    if rank == 0:
        before_step.append(ledger_hook(out_dir))
        on_epoch_end.append(checkpoint_hook(out_dir))
    if config.runtime.fault_at_step is not None and rank == world - 1:
        # The last rank dies; with W > 1 rank 0 is then left waiting in the all-reduce, as when a
        # worker's process or node is lost.
        before_step.append(fault_hook(config.runtime.fault_at_step))
    on_epoch_end.append(_report_hook(rank, loop.get("progress_queue")))

    train_start = time.perf_counter()
    state = run_training(
        config,
        prepared.plan,
        prepared.data,
        state,
        callbacks=Callbacks(before_step=before_step, on_epoch_end=on_epoch_end),
        collective=collective,
        eval_batch_size=config.runtime.eval_batch_size,
    )
    train_time = time.perf_counter() - train_start
    digests: list[Any] = [None] * world
    dist.all_gather_object(digests, _replica_digest(state))
    if rank == 0:
        extra = {
            "workers": world,
            "backend": loop["backend"],
            "worker_nodes": nodes,
            "replicas_consistent": len(set(digests)) == 1,
            "lost_steps_this_attempt": lost,
        }
        metrics = build_metrics(
            prepared,
            state,
            wall_time=time.perf_counter() - wall_start,
            train_time=train_time,
            extra=extra,
        )
        write_outputs(out_dir, prepared, state, metrics)
    dist.barrier()


def _restore(state: TrainerState, out_dir: Path) -> int:
    """Restore from Ray Train's last checkpoint (or the run directory's) and the ledger.

    The first attempt has neither a checkpoint nor a ledger and starts fresh (restarts = 0); any
    later attempt has at least the ledger (rank 0 writes it before the first step)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        if not (out_dir / "ledger.json").exists():
            return 0
        return restore_state(state, out_dir)
    with checkpoint.as_directory() as folder:
        return restore_state(state, out_dir, checkpoint=Path(folder) / CHECKPOINT_FILE)


def _report_hook(rank: int, progress_queue: Any) -> Callable[[EpochReport, TrainerState], None]:
    """Every rank reports each epoch (Ray Train's report is a barrier); rank 0 attaches the
    checkpoint. Only release-safe values are reported: the EpochReport's fields."""

    def on_epoch_end(report: EpochReport, state: TrainerState) -> None:
        import ray.train

        metrics = dataclasses.asdict(report)
        metrics["restarts"] = state.restarts
        metrics["lost_steps"] = state.lost_steps
        if rank != 0:
            ray.train.report(metrics, checkpoint=None)
            return
        with tempfile.TemporaryDirectory(prefix="adadpigu-ckpt-") as folder:
            torch.save(state.state_dict(), Path(folder) / CHECKPOINT_FILE)
            ray.train.report(
                metrics,
                checkpoint=ray.train.Checkpoint.from_directory(folder),
                # executed_steps only grows, even across restarts: a unique, ordered name.
                checkpoint_dir_name=f"checkpoint-step{state.executed_steps:08d}",
            )
        if progress_queue is not None:
            try:
                progress_queue.put_nowait(dataclasses.asdict(report))
            except Exception:  # progress is best effort; the queue may be full or gone
                pass

    return on_epoch_end


def _replica_digest(state: TrainerState) -> str:
    """A hash of what must be identical on every rank: weights, mask, m/s statistics, clip state."""
    digest = hashlib.sha256()

    def feed(tensors: dict[str, torch.Tensor] | None) -> None:
        for name in sorted(tensors or {}):
            digest.update(name.encode())
            digest.update(tensors[name].detach().cpu().contiguous().numpy().tobytes())

    feed(dict(state.model.state_dict()))
    feed(state.mask)
    if state.stats is not None:
        feed(state.stats.mean)
        feed(state.stats.variance)
    digest.update(repr((state.clip1, state.clip2, state.keep_ratio, state.step)).encode())
    return digest.hexdigest()
