"""Ray Train: DP under data parallelism, placement over nodes, worker failures, bad inputs.

Real Ray, no mocks: every test joins the session's two-node cluster (`ray_cluster`, conftest.py) by
its address, in this process or through the real CLI. Tiny synthetic data, so the wall time goes to
Ray's own start-up (about 20 s per Train run on a 2-core machine), not to training.
"""

from __future__ import annotations

import json
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from adadpigu.accounting import compute_epsilon
from adadpigu.config import TrainConfig
from adadpigu.gradients import per_example_gradients
from adadpigu.mechanisms import release_sum
from adadpigu.noise import make_generator
from adadpigu.sampling import shard_indices
from study.cluster import (
    ClusterError,
    ClusterInfo,
    connect,
    disconnect,
    probe_address,
    resolve_address,
)
from study.distributed import run_distributed
from study.runner import prepare_run
from tests.conftest import cli_env, run_cli

TINY: dict[str, Any] = {
    "method": "adadpigu",
    "seed": 3,
    "data": {"name": "synthetic", "synthetic_size": 512, "validation_size": 64},
    "model": {"name": "mlp"},
    "training": {"epochs": 3, "batch_size": 64, "lr": 0.5},
    "privacy": {"epsilon": 4.0, "delta": 1.0e-4},
    "adadpigu": {"keep_ratio": 0.6, "stage1_fraction": 0.3},
}
# 448 training examples, q = 1/7: 7 steps per epoch, 21 planned; the last rank dies before step 10,
# after the epoch-1 checkpoint (step 7).
FAULT_STEP = 10


def tiny_config(**sections: dict[str, Any]) -> TrainConfig:
    raw = json.loads(json.dumps(TINY))
    for name, values in sections.items():
        raw.setdefault(name, {}).update(values)
    return TrainConfig.from_dict(raw)


@pytest.fixture(scope="module")
def ray_connection(ray_cluster: Any) -> Iterator[ClusterInfo]:
    """This process joins the test cluster once; run_distributed reuses the connection."""
    info = connect(ray_cluster.address)
    assert info.num_nodes == 2 and info.num_cpus == ray_cluster.total_cpus
    yield info
    disconnect(info)


# --- the DP step across workers -------------------------------------------------------------------

SIGMA, CLIP, RATE, STEPS, NOISE_REPS = 1.3, 0.5, 0.1, 5, 4


def _flat(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def _release_probe(loop: dict[str, Any]) -> None:
    """Per worker: Poisson-sample its shard with its own generator, release the clipped sum through
    the core's `release_sum` over torch.distributed; then release pure noise (empty batches), with a
    noise generator on EVERY rank, so that noise added on more than one rank would show."""
    import ray.train

    from adadpigu.collective import TorchDistributedCollective
    from adadpigu.sampling import poisson_sample

    config = TrainConfig.from_dict(loop["config"])
    prepared = prepare_run(config)
    collective = TorchDistributedCollective()
    rank = collective.rank
    params = {n: p.detach() for n, p in prepared.model.named_parameters()}
    x, y = prepared.data.train_x, prepared.data.train_y
    shard = shard_indices(x.shape[0], rank=rank, world_size=collective.world_size)
    out: dict[str, Any] = {"rank": rank, "indices": [], "sums": [], "noise": []}
    for step in range(STEPS):
        sampler = make_generator(1000 * step + rank)  # each worker its own sampling generator
        idx = poisson_sample(shard, rate=RATE, generator=sampler)
        grads = per_example_gradients(prepared.model, params, x[idx], y[idx])
        released = release_sum(
            grads,
            clip_norm=CLIP,
            grad_noise_multiplier=0.0,
            count_std=None,
            noise_generator=make_generator(0),
            collective=collective,
        )
        out["indices"].append(idx.tolist())
        out["sums"].append(_flat(released.total))
    for rep in range(NOISE_REPS):
        empty = {n: p.new_zeros((0, *p.shape)) for n, p in params.items()}
        released = release_sum(
            empty,
            clip_norm=CLIP,
            grad_noise_multiplier=SIGMA,
            count_std=None,
            noise_generator=make_generator(7919 * (rep + 1) + rank),
            collective=collective,
        )
        out["noise"].append(_flat(released.total))
    torch.save(out, Path(loop["out"]) / f"rank{rank}.pt")
    ray.train.report({"rank": rank})


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_workers_release_the_single_process_sum_with_single_process_noise(
    ray_connection: ClusterInfo, tmp_path: Path
) -> None:
    import ray.cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # The probe lives in this test module, which workers cannot import: ship it by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    config = tiny_config(runtime={"device": "cpu", "dtype": "float64"})
    TorchTrainer(
        _release_probe,
        train_loop_config={"config": config.to_dict(), "out": str(tmp_path)},
        scaling_config=ScalingConfig(num_workers=2),
        run_config=RunConfig(name="probe", storage_path=str(tmp_path / "ray")),
    ).fit()
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]

    prepared = prepare_run(config)
    n = prepared.data.train_x.shape[0]
    # Shards: disjoint and exhaustive, no padding.
    shards = [set(shard_indices(n, rank=r, world_size=2).tolist()) for r in (0, 1)]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(range(n))
    params = {k: p.detach() for k, p in prepared.model.named_parameters()}
    for step in range(STEPS):
        sampled = [set(ranks[r]["indices"][step]) for r in (0, 1)]
        assert not sampled[0] & sampled[1], "an example was sampled by two workers"
        assert sampled[0] <= shards[0] and sampled[1] <= shards[1]
        union = torch.tensor(sorted(sampled[0] | sampled[1]), dtype=torch.long)
        grads = per_example_gradients(
            prepared.model, params, prepared.data.train_x[union], prepared.data.train_y[union]
        )
        single = release_sum(
            grads,
            clip_norm=CLIP,
            grad_noise_multiplier=0.0,
            count_std=None,
            noise_generator=make_generator(0),
        )
        expected = _flat(single.total)
        for r in (0, 1):
            torch.testing.assert_close(ranks[r]["sums"][step], expected, rtol=1e-10, atol=1e-12)

    # Noise: the same released values on both ranks, distributed as N(0, σ²C²) (single-process).
    for rep in range(NOISE_REPS):
        assert torch.equal(ranks[0]["noise"][rep], ranks[1]["noise"][rep])
    z = torch.cat(ranks[0]["noise"]).numpy() / (SIGMA * CLIP)
    empty = {k: p.new_zeros((0, *p.shape)) for k, p in params.items()}
    local = [
        release_sum(
            empty,
            clip_norm=CLIP,
            grad_noise_multiplier=SIGMA,
            count_std=None,
            noise_generator=make_generator(100 + rep),
        )
        for rep in range(NOISE_REPS)
    ]
    local_z = np.concatenate([_flat(r.total).numpy() for r in local]) / (SIGMA * CLIP)
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert stats.ks_2samp(z, local_z).pvalue > 1e-3
    # The test has the power to see noise on both ranks (√2×), half of it, or none.
    assert stats.kstest(z, stats.norm(scale=np.sqrt(2)).cdf).pvalue < 1e-6
    assert stats.kstest(z, stats.norm(scale=1 / np.sqrt(2)).cdf).pvalue < 1e-6
    chi2 = (z.size - 1) * z.var(ddof=1)
    lo, hi = stats.chi2.ppf([1e-4, 1 - 1e-4], df=z.size - 1)
    assert lo < chi2 < hi
    assert lo > (z.size - 1) * 0.5 and hi < (z.size - 1) * 2  # the band excludes 0× and 2× variance


# --- whole runs -----------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_two_workers_on_two_nodes_keep_identical_replicas(
    ray_cluster: Any, ray_connection: ClusterInfo, tmp_path: Path
) -> None:
    config = tiny_config()
    metrics = run_distributed(
        config,
        out_dir=tmp_path / "run",
        workers=2,
        address=ray_cluster.address,
        placement_strategy="STRICT_SPREAD",
    )
    assert metrics["workers"] == 2 and metrics["backend"] == "gloo"
    assert len(set(metrics["worker_nodes"])) == 2, "the workers did not land on both nodes"
    # Mask, m/s statistics, clip state and weights: identical on every worker.
    assert metrics["replicas_consistent"] is True
    assert metrics["adadpigu"]["kept_total"] > 0
    assert metrics["steps"] == metrics["planned_steps"] == metrics["completed_steps"] == 21
    assert metrics["restarts"] == 0 and metrics["lost_steps"] == 0
    assert metrics["epsilon"] <= metrics["target_epsilon"] * (1 + 1e-9)
    run = tmp_path / "run"
    names = ("config.yaml", "ledger.json", "checkpoint.pt", "metrics.json", "model.pt", "mask.npz")
    for name in names:
        assert (run / name).exists(), name
    assert json.loads((run / "ledger.json").read_text())["executed_steps"] == 21
    assert sorted(p.name for p in (run / "ray" / "train").glob("checkpoint-*"))[-1].endswith("21")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_cli_worker_failure_resumes_and_stays_within_budget(
    ray_cluster: Any, tmp_path: Path
) -> None:
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(TINY))
    out = tmp_path / "run"
    result = run_cli(
        [
            "train",
            str(config_path),
            "--workers",
            "2",
            "--address",
            ray_cluster.address,
            "--out",
            str(out),
            "--set",
            f"runtime.fault_at_step={FAULT_STEP}",
            "--quiet",
        ],
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["restarts"] == 1
    # Resumed from the epoch-1 checkpoint (step 7); the ledger charged the steps after it, up to the
    # one that rank 0 had begun when the last rank died.
    assert metrics["lost_steps"] in (FAULT_STEP - 7, FAULT_STEP + 1 - 7)
    assert metrics["steps"] == metrics["planned_steps"] == 21
    assert metrics["completed_steps"] == 21 - metrics["lost_steps"]
    assert metrics["budget_exhausted"] is True and metrics["over_budget"] is False
    assert metrics["epsilon"] <= metrics["target_epsilon"] * (1 + 1e-9)
    assert metrics["replicas_consistent"] is True
    assert "lost to restarts" in result.stdout and "within its budget" in result.stdout
    assert json.loads((out / "ledger.json").read_text())["executed_steps"] == metrics["steps"]


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_worker_failure_with_overspend_finishes_the_plan_and_charges_redone_steps(
    ray_cluster: Any, ray_connection: ClusterInfo, tmp_path: Path
) -> None:
    config = tiny_config(privacy={"allow_overspend": True}, runtime={"fault_at_step": FAULT_STEP})
    metrics = run_distributed(
        config, out_dir=tmp_path / "run", workers=2, address=ray_cluster.address
    )
    lost = metrics["lost_steps"]
    assert metrics["restarts"] == 1 and lost in (FAULT_STEP - 7, FAULT_STEP + 1 - 7)
    assert metrics["completed_steps"] == metrics["planned_steps"] == 21
    assert metrics["steps"] == 21 + lost
    expected = compute_epsilon(
        noise_multiplier=metrics["sigma"],
        sample_rate=metrics["sample_rate"],
        steps=21 + lost,
        delta=metrics["delta"],
        accountant=metrics["accountant"],
    )
    assert metrics["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert metrics["epsilon"] > metrics["target_epsilon"] and metrics["over_budget"] is True
    assert metrics["replicas_consistent"] is True


# --- bad inputs: clear errors within seconds ------------------------------------------------------


def _cli(tmp_path: Path, *args: str) -> tuple[Any, float]:
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(TINY))
    start = time.monotonic()
    args = ("train", str(config_path), "--out", str(tmp_path / "run"), *args)
    result = run_cli(list(args), timeout=120)
    return result, time.monotonic() - start


def test_cli_rejects_zero_workers(tmp_path: Path) -> None:
    result, elapsed = _cli(tmp_path, "--workers", "0")
    assert result.returncode == 2 and "--workers must be >= 1" in result.stderr
    assert elapsed < 30


def test_cli_rejects_more_workers_than_local_cpus(tmp_path: Path) -> None:
    from study.cluster import default_local_cpus

    workers = default_local_cpus() + 1
    result, elapsed = _cli(tmp_path, "--workers", str(workers))
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--workers {workers}" in result.stderr and "CPUs" in result.stderr
    assert elapsed < 30


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_cli_rejects_more_workers_than_the_cluster_has(ray_cluster: Any, tmp_path: Path) -> None:
    workers = ray_cluster.total_cpus + 1
    result, elapsed = _cli(tmp_path, "--workers", str(workers), "--address", ray_cluster.address)
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"--workers {workers}" in result.stderr
    assert f"{ray_cluster.total_cpus:g} CPUs" in result.stderr
    assert elapsed < 60
    assert not (tmp_path / "run" / "ledger.json").exists()


def test_cli_rejects_an_unreachable_address_quickly(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result, elapsed = _cli(tmp_path, "--workers", "2", "--address", f"127.0.0.1:{port}")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "cannot reach" in result.stderr
    assert elapsed < 30
    result, _ = _cli(tmp_path, "--workers", "2", "--address", "no-port-here")
    assert result.returncode == 2 and "HOST:PORT" in result.stderr


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_cli_without_the_cluster_token_fails_quickly_and_says_why(
    ray_cluster: Any, tmp_path: Path
) -> None:
    env = cli_env({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64})  # a wrong token
    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(TINY))
    args = ["train", str(config_path), "--workers", "2", "--address", ray_cluster.address]
    start = time.monotonic()
    result = run_cli([*args, "--out", str(tmp_path / "run")], env=env, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "RAY_AUTH_TOKEN" in result.stderr
    assert time.monotonic() - start < 30


# --- study.cluster without a cluster ------------------------------------------------------------


def test_resolve_address_prefers_the_argument_then_ray_address(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert resolve_address(None) is None and resolve_address("local") is None
    assert resolve_address(" 10.0.0.1:6379 ") == "10.0.0.1:6379"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert resolve_address(None) == "10.0.0.2:6379"
    assert resolve_address("ray://10.0.0.3:10001") == "ray://10.0.0.3:10001"


def test_probe_address_answers_within_its_timeout() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        # ray:// (Ray Client) addresses get the TCP stage only.
        assert probe_address(f"ray://127.0.0.1:{port}", timeout_s=2) == f"ray://127.0.0.1:{port}"
    start = time.monotonic()
    with pytest.raises(ClusterError, match="cannot reach"):
        probe_address(f"127.0.0.1:{port}", timeout_s=2)
    # A blackhole address (TEST-NET-1, RFC 5737): no answer at all, the deadline decides.
    with pytest.raises(ClusterError, match=r"cannot reach|no answer"):
        probe_address("192.0.2.1:6379", timeout_s=1)
    assert time.monotonic() - start < 6
    # Something that accepts connections but is no Ray GCS: the handshake's deadline decides
    # (ray.init alone would wait for minutes).
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(ClusterError, match="no Ray GCS answered within 2s"):
            probe_address(f"127.0.0.1:{port}", timeout_s=2)
        assert time.monotonic() - start < 5
    for bad in ("no-port", "host:", "host:99999", ":6379"):
        with pytest.raises(ClusterError, match="HOST:PORT"):
            probe_address(bad, timeout_s=1)
