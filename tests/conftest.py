"""Shared fixtures. `ray_cluster`: one real Ray cluster per test session, a head and a second node on
loopback, started with `ray start` and token authentication; every Ray test (the CLI's included)
connects to it with `--address`."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HEAD_CPUS = 2
NODE_CPUS = 2


@dataclasses.dataclass(frozen=True)
class RayCluster:
    address: str
    env: dict[str, str]
    total_cpus: int
    head_cpus: int
    node_cpus: int


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray_bin() -> str:
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else (shutil.which("ray") or "ray")


def cli_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for running the `adadpigu` CLI in a subprocess (same interpreter, repo on path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("PYTHONUNBUFFERED", "1")
    if extra:
        env.update(extra)
    return env


def run_cli(args: list[str], *, env: dict[str, str] | None = None, timeout: float = 600, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the real `adadpigu` CLI (`python -m study.cli`) and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "study.cli", *args],
        env=env or cli_env(),
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayCluster]:
    token = secrets.token_hex(32)
    env = dict(os.environ)
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"})
    port = _free_port()
    dashboard_port = _free_port()
    ray = _ray_bin()
    address = f"127.0.0.1:{port}"
    head = [
        ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
        f"--num-cpus={HEAD_CPUS}", "--num-gpus=0", "--include-dashboard=true",
        "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard_port}", "--disable-usage-stats",
    ]
    node = [
        ray, "start", f"--address={address}", "--node-ip-address=127.0.0.1",
        f"--num-cpus={NODE_CPUS}", "--num-gpus=0", "--disable-usage-stats",
    ]
    subprocess.run(head, env=env, check=True, capture_output=True, timeout=120)
    try:
        subprocess.run(node, env=env, check=True, capture_output=True, timeout=120)
        _wait_for_nodes(address, env, expected=2)
        # Tests and the CLI subprocesses they start inherit the token from the environment.
        saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = token
        yield RayCluster(
            address=address,
            env=env,
            total_cpus=HEAD_CPUS + NODE_CPUS,
            head_cpus=HEAD_CPUS,
            node_cpus=NODE_CPUS,
        )
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True, timeout=120)


def _wait_for_nodes(address: str, env: dict[str, str], *, expected: int, timeout: float = 60) -> None:
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            [sys.executable, "-c", probe, address], env=env, capture_output=True, text=True, timeout=60
        )
        if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout.strip()) >= expected:
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray test cluster at {address} did not reach {expected} nodes")
