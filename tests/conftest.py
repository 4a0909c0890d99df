"""Shared fixtures. `ray_cluster`: one real Ray cluster per test session, a head and a second node on
loopback, started with `ray start` and token authentication; every Ray test (the CLI's included)
connects to it with `--address`."""

from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
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


def run_cli(
    args: list[str],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess:
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
    # A private temp dir, so this cluster never becomes another process's `auto`
    # (ray_current_cluster); short, as Ray's socket paths are limited in length.
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    head = [
        ray,
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={port}",
        f"--num-cpus={HEAD_CPUS}",
        "--num-gpus=0",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard_port}",
        "--disable-usage-stats",
        f"--temp-dir={temp_dir}",
    ]
    node = [
        ray,
        "start",
        f"--address={address}",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={NODE_CPUS}",
        "--num-gpus=0",
        "--disable-usage-stats",
    ]
    # `--block` keeps each `ray start` alive as the leader of its own process group, so teardown
    # stops exactly this cluster's processes; `ray stop --force` would kill every Ray process on the
    # machine, other sessions' clusters included.
    started: list[subprocess.Popen] = []
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    try:
        started.append(_start_blocking(head, env, temp_dir / "head.out"))
        _wait_for_port("127.0.0.1", port, started[0])
        started.append(_start_blocking(node, env, temp_dir / "node.out"))
        _wait_for_nodes(address, env, expected=2)
        # Tests and the CLI subprocesses they start inherit the token from the environment.
        os.environ["RAY_AUTH_MODE"] = "token"
        os.environ["RAY_AUTH_TOKEN"] = token
        yield RayCluster(
            address=address,
            env=env,
            total_cpus=HEAD_CPUS + NODE_CPUS,
            head_cpus=HEAD_CPUS,
            node_cpus=NODE_CPUS,
        )
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        for proc in reversed(started):
            _stop_group(proc)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _start_blocking(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )


def _wait_for_port(host: str, port: int, proc: subprocess.Popen, *, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start --head` exited with code {proc.returncode}")
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the Ray test cluster's head did not listen on {host}:{port}")


def _stop_group(proc: subprocess.Popen, *, grace: float = 5.0) -> None:
    """SIGTERM the `ray start --block` process group, then SIGKILL what is left of it (a head node
    would otherwise drain for 30 s)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def _wait_for_nodes(
    address: str, env: dict[str, str], *, expected: int, timeout: float = 60
) -> None:
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run(
            [sys.executable, "-c", probe, address],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if (
            out.returncode == 0
            and out.stdout.strip().isdigit()
            and int(out.stdout.strip()) >= expected
        ):
            return
        time.sleep(1)
    raise RuntimeError(f"the Ray test cluster at {address} did not reach {expected} nodes")
