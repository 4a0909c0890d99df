"""Connecting to Ray: start a local instance or join a cluster, probe addresses, check resources.

Generic on purpose (Ray Train runs and Tune studies both use it); it knows nothing of training.

- `resolve_address(address)`: the explicit address, else $RAY_ADDRESS, else None (start locally).
- `probe_address(address, timeout_s=...)`: a TCP probe with a deadline, so that an unreachable
  address fails in seconds instead of hanging inside `ray.init`.
- `connect(address, num_cpus=...)` / `disconnect(info)` and the context manager `ray_session(...)`:
  without an address a fresh local instance is started with an explicit CPU count (never a silent
  attach to whatever `ray start` left on this machine); with one, the cluster is joined. A process
  that is already connected reuses its connection and leaves it open.
- `check_resources(...)`: refuse a request the cluster can never place (more workers than CPUs, GPUs
  that do not exist), instead of letting the scheduler wait forever.

Token authentication: clusters started by `ray start` may require a token; a joining driver takes
it from $RAY_AUTH_TOKEN (with RAY_AUTH_MODE=token) or ~/.ray/auth_token. The dashboard is started
with a local instance by default: without it, a Train run inside a Tune trial that Tune stops never
releases its placement group (seen with ray 2.60).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = [
    "ClusterError",
    "ClusterInfo",
    "check_resources",
    "connect",
    "default_local_cpus",
    "disconnect",
    "probe_address",
    "ray_session",
    "resolve_address",
    "worker_env",
]

DEFAULT_PROBE_TIMEOUT_S = 5.0
_RAY_CLIENT_PREFIX = "ray://"


class ClusterError(ValueError):
    """The address, worker count or resources asked for do not match the cluster at hand.

    A ValueError: it is a bad argument (`--address`, `--workers`, `--gpus-per-worker`), reported as
    such by the CLI."""


@dataclasses.dataclass(frozen=True)
class ClusterInfo:
    """The Ray instance this process is connected to.

    `started_locally`: `connect` started it (no address). `owns_connection`: `connect` called
    `ray.init`, so `disconnect` calls `ray.shutdown` (False when an existing connection was reused).
    """

    address: str
    started_locally: bool
    owns_connection: bool
    num_cpus: float
    num_gpus: float
    num_nodes: int
    connect_time_s: float


def default_local_cpus() -> int:
    """CPUs this process may use (the affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def worker_env(threads: int = 1) -> dict[str, str]:
    """Environment for worker processes: `threads` intra-op threads each, so W workers on a small
    machine do not oversubscribe its cores."""
    n = str(max(1, int(threads)))
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n}


def resolve_address(address: str | None) -> str | None:
    """`address` if given, else $RAY_ADDRESS if set and non-empty, else None (start locally;
    `local` says so explicitly)."""
    resolved = (address or os.environ.get("RAY_ADDRESS", "")).strip()
    return None if resolved in ("", "local") else resolved


def _auto_address() -> str:
    """The address `auto` stands for: the cluster last started by `ray start` on this machine."""
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError as exc:  # pragma: no cover - private API moved
        raise ClusterError(f"--address auto: this Ray version cannot resolve it ({exc})") from exc
    try:
        return canonicalize_bootstrap_address_or_die("auto")
    except (ConnectionError, ValueError) as exc:
        raise ClusterError(
            f"--address auto: no running Ray cluster found on this machine ({exc})"
        ) from exc


def _host_port(address: str) -> tuple[str, int]:
    target = address.removeprefix(_RAY_CLIENT_PREFIX)
    host, sep, port = target.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ClusterError(
            f"--address: got {address!r}; allowed: auto, HOST:PORT or ray://HOST:PORT"
        )
    return host, int(port)


def _with_deadline(fn: Callable[[], object], timeout_s: float, name: str) -> BaseException | None:
    """Run `fn` in a daemon thread; return its exception (None if it returned), or raise
    TimeoutError if it is still running after `timeout_s` (it is then abandoned: the calls used
    here release the GIL while they wait, and a daemon thread does not keep the process alive)."""
    outcome: dict[str, BaseException | None] = {}

    def attempt() -> None:
        try:
            fn()
            outcome["error"] = None
        except BaseException as exc:  # reported to the caller
            outcome["error"] = exc

    thread = threading.Thread(target=attempt, name=name, daemon=True)
    thread.start()
    thread.join(timeout_s)
    if "error" not in outcome:
        raise TimeoutError
    return outcome["error"]


def probe_address(address: str, *, timeout_s: float = DEFAULT_PROBE_TIMEOUT_S) -> str:
    """Check, within `timeout_s` seconds per stage, that a Ray cluster answers at `address`; return
    the address to pass to `ray.init` (`auto` resolved to HOST:PORT). Raises ClusterError otherwise.

    Two stages, each with a deadline, because `ray.init` itself can wait minutes: a TCP connection
    (name resolution has no timeout of its own in the socket API), then, for a GCS address, a GCS
    handshake (which also reports a missing or wrong auth token at once). A ray:// address gets
    the TCP stage only.
    """
    target = _auto_address() if address == "auto" else address
    host, port = _host_port(target)
    hint = (
        "is the cluster running (`ray start --head`), and is the address its GCS address (port "
        "6379 by default) or its Ray Client address (ray://HOST:10001)?"
    )

    def tcp() -> None:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass

    try:
        error = _with_deadline(tcp, timeout_s + 0.5, "ray-address-probe")
    except TimeoutError:
        raise ClusterError(
            f"--address {address}: no answer from {host}:{port} within {timeout_s:g}s; {hint}"
        ) from None
    if error is not None:
        raise ClusterError(f"--address {address}: cannot reach {host}:{port} ({error}); {hint}")
    if target.startswith(_RAY_CLIENT_PREFIX):
        return target
    try:
        from ray._raylet import GcsClient  # private API: skip the stage if it moves
    except ImportError:
        return target
    try:
        error = _with_deadline(lambda: GcsClient(address=target), timeout_s, "ray-gcs-probe")
    except TimeoutError:
        raise ClusterError(
            f"--address {address}: {host}:{port} accepts connections but no Ray GCS answered "
            f"within {timeout_s:g}s; {hint}"
        ) from None
    if error is None:
        return target
    if "auth" in type(error).__name__.lower() or "token" in str(error).lower():
        raise ClusterError(
            f"--address {address}: the cluster refused this process's credentials ({error}). "
            "It uses token authentication: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (or "
            "~/.ray/auth_token) to its token."
        )
    raise ClusterError(f"--address {address}: no Ray GCS at {host}:{port} ({error}); {hint}")


def _summarise(*, address: str, started_locally: bool, owns: bool, elapsed: float) -> ClusterInfo:
    import ray

    totals = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    return ClusterInfo(
        address=address,
        started_locally=started_locally,
        owns_connection=owns,
        num_cpus=float(totals.get("CPU", 0.0)),
        num_gpus=float(totals.get("GPU", 0.0)),
        num_nodes=len(nodes),
        connect_time_s=elapsed,
    )


def _current_address() -> str:
    import ray

    context = ray.get_runtime_context()
    return str(getattr(context, "gcs_address", "") or "")


def connect(
    address: str | None,
    *,
    num_cpus: int | None = None,
    num_gpus: int | None = None,
    probe_timeout_s: float = DEFAULT_PROBE_TIMEOUT_S,
    include_dashboard: bool = True,
    runtime_env: Mapping[str, Any] | None = None,
    logging_level: str = "WARNING",
) -> ClusterInfo:
    """Join the cluster at `address` (after `resolve_address`), or start a local Ray instance.

    Local start: `num_cpus` defaults to `default_local_cpus()`; `num_gpus` to what Ray detects.
    Joining: `num_cpus` / `num_gpus` must be None (a cluster's resources are its own). If this
    process is already connected, the connection is reused (and must be to the same cluster).
    """
    import ray

    resolved = resolve_address(address)
    if ray.is_initialized():
        current = _current_address()
        if resolved not in (None, "auto") and not resolved.startswith(_RAY_CLIENT_PREFIX):
            if current and not _same_cluster(resolved, current):
                raise ClusterError(
                    f"--address {resolved}: this process is already connected to Ray at {current}"
                )
        return _summarise(address=current, started_locally=False, owns=False, elapsed=0.0)

    start = time.perf_counter()
    common: dict[str, Any] = {"logging_level": logging_level, "configure_logging": True}
    if runtime_env:
        common["runtime_env"] = dict(runtime_env)
    if resolved is None:
        cpus = default_local_cpus() if num_cpus is None else int(num_cpus)
        if cpus < 1:
            raise ClusterError(f"num_cpus: got {cpus}; allowed: >= 1")
        # "local" forces a fresh instance: plain ray.init() would attach to a cluster that a
        # `ray start` on this machine left behind, whose resources are not the ones asked for.
        ray.init(
            address="local",
            num_cpus=cpus,
            num_gpus=num_gpus,
            include_dashboard=include_dashboard,
            **common,
        )
        return _summarise(
            address=_current_address(),
            started_locally=True,
            owns=True,
            elapsed=time.perf_counter() - start,
        )
    if num_cpus is not None or num_gpus is not None:
        raise ClusterError(
            f"--address {resolved}: num_cpus/num_gpus apply to a local Ray only; a cluster "
            "brings its own"
        )
    target = probe_address(resolved, timeout_s=probe_timeout_s)
    if not target.startswith(_RAY_CLIENT_PREFIX):
        # Ray's own actors (Ray Train's placement-group cleaner) find the cluster through the
        # state API, which without RAY_ADDRESS guesses it from the GCS processes on the machine
        # and fails where several clusters share one (a dev box, a test machine).
        env = dict(common.get("runtime_env", {}))
        env["env_vars"] = {"RAY_ADDRESS": target, **dict(env.get("env_vars", {}))}
        common["runtime_env"] = env
    try:
        ray.init(address=target, **common)
    except ConnectionError as exc:
        raise ClusterError(f"--address {resolved}: Ray could not connect ({exc})") from exc
    return _summarise(
        address=_current_address() or target,
        started_locally=False,
        owns=True,
        elapsed=time.perf_counter() - start,
    )


def _same_cluster(a: str, b: str) -> bool:
    """Loose match of two GCS addresses: the same port (a node may be known by its loopback and by
    its interface address, so hosts are not compared)."""
    try:
        return _host_port(a)[1] == _host_port(b)[1]
    except ClusterError:
        return False


def disconnect(info: ClusterInfo) -> None:
    """Shut down the connection `connect` opened (and the local instance it started); leave a reused
    connection alone."""
    import ray

    if info.owns_connection and ray.is_initialized():
        ray.shutdown()


@contextlib.contextmanager
def ray_session(address: str | None, **kwargs: Any) -> Iterator[ClusterInfo]:
    """`connect(address, **kwargs)` for the duration of a `with` block."""
    info = connect(address, **kwargs)
    try:
        yield info
    finally:
        disconnect(info)


def check_resources(
    *,
    workers: int,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    spread: bool = False,
    reserved_cpus: float = 0.0,
    where: str = "the Ray cluster",
) -> None:
    """Raise ClusterError unless `workers` bundles of (CPU, GPU) fit on the connected cluster's
    nodes (by their total resources: a request that fits the totals but is busy now waits; one that
    can never fit would wait forever). `spread`: one worker per node (STRICT_SPREAD).
    `reserved_cpus`: CPUs the caller holds and the workers cannot use, e.g. a Tune trial's own CPU
    (counted against the cluster's total, not a particular node)."""
    import ray

    if workers < 1:
        raise ClusterError(f"--workers: got {workers}; allowed: >= 1")
    if cpus_per_worker < 0 or gpus_per_worker < 0:
        raise ClusterError("cpus/gpus per worker must be >= 0")
    nodes = [n.get("Resources", {}) for n in ray.nodes() if n.get("Alive")]
    total_cpu = sum(float(n.get("CPU", 0.0)) for n in nodes)
    total_gpu = sum(float(n.get("GPU", 0.0)) for n in nodes)

    def fits(node: Mapping[str, float]) -> int:
        counts = []
        if cpus_per_worker > 0:
            counts.append(int(float(node.get("CPU", 0.0)) // cpus_per_worker + 1e-9))
        if gpus_per_worker > 0:
            counts.append(int(float(node.get("GPU", 0.0)) / gpus_per_worker + 1e-9))
        return min(counts) if counts else workers

    placeable = sum(min(1, fits(n)) if spread else fits(n) for n in nodes)
    if cpus_per_worker > 0:
        placeable = min(placeable, int((total_cpu - reserved_cpus) // cpus_per_worker + 1e-9))
    if placeable >= workers:
        return
    need = f"{cpus_per_worker:g} CPU" + (f" + {gpus_per_worker:g} GPU" if gpus_per_worker else "")
    have = f"{total_cpu:g} CPUs and {total_gpu:g} GPUs on {len(nodes)} node(s)"
    if reserved_cpus:
        have += f", {reserved_cpus:g} CPU(s) of which the caller holds"
    layout = " with one worker per node" if spread else ""
    raise ClusterError(
        f"--workers {workers}: {where} can place at most {placeable} worker(s) of {need} each"
        f"{layout}; it has {have}. Use fewer workers, or a larger cluster (--address)."
    )
