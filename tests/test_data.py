"""bn_core.data: built-in and toy sets, IDX files, and the MNIST loader, all offline.

The download path is exercised against a local HTTP server on 127.0.0.1 serving tiny fake
IDX files, so nothing here needs the internet.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import hashlib
import http.server
import socket
import struct
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier

from bn_core import data
from bn_core.data import (
    DATASETS,
    IDX_FILES,
    Dataset,
    DatasetUnavailable,
    default_cache_dir,
    fetch_idx_files,
    load_dataset,
    read_idx,
    write_idx,
)

TOY = ["moons", "circles", "spirals", "blobs"]
FILE_NAMES = list(IDX_FILES.values())


@pytest.fixture(autouse=True)
def _isolated(monkeypatch):
    data._read_idx_set.cache_clear()
    # A proxy from the environment would swallow requests meant for the local test server.
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")
    monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 5.0)
    yield
    data._read_idx_set.cache_clear()


def _assert_same(a: Dataset, b: Dataset) -> None:
    for field in ("x_train", "y_train", "x_test", "y_test", "x_probe"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field


def _row_set(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.numpy()}


def _direct_standardize(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    constant = np.ptp(train, axis=0) == 0
    # float64 mean/std of a repeated 0.05 can be off by an ulp: pin them exactly.
    mean[constant], std[constant] = train[0, constant], 1.0
    return (train - mean) / std, (test - mean) / std


# ------------------------------------------------------------------------------------------
# Registry and arguments
# ------------------------------------------------------------------------------------------


def test_dataset_names_in_documented_order():
    assert list(DATASETS) == [
        "digits",
        "moons",
        "circles",
        "spirals",
        "blobs",
        "mnist",
        "fashion-mnist",
    ]
    assert all(isinstance(v, str) and v and "\n" not in v for v in DATASETS.values())


@pytest.mark.parametrize(
    ("kwargs", "field", "shown"),
    [
        ({"test_fraction": 0.0}, "test_fraction", "0.0"),
        ({"test_fraction": 0.95}, "test_fraction", "0.95"),
        ({"test_fraction": float("nan")}, "test_fraction", "nan"),
        ({"noise": -0.1}, "noise", "-0.1"),
        ({"noise": 1.5}, "noise", "1.5"),
        ({"probe_size": 1}, "probe_size", "1"),
        ({"n_samples": 19}, "n_samples", "19"),
        ({"n_samples": 100.0}, "n_samples", "100.0"),
        ({"seed": -1}, "seed", "-1"),
    ],
)
def test_bad_arguments_name_field_value_and_range(kwargs, field, shown):
    with pytest.raises(ValueError) as info:
        load_dataset("moons", **kwargs)
    msg = str(info.value)
    assert msg.startswith(f"{field} = {shown}")
    assert any(w in msg for w in ("range", ">=", "<=")), msg


def test_unknown_dataset_lists_allowed_names():
    with pytest.raises(ValueError) as info:
        load_dataset("xyz")
    assert str(info.value) == (
        "dataset = 'xyz': allowed: digits, moons, circles, spirals, blobs, mnist, fashion-mnist"
    )


def test_arguments_are_checked_before_any_io(tmp_path):
    # A bad argument must not be hidden behind a missing-file error.
    with pytest.raises(ValueError, match="noise"):
        load_dataset("mnist", noise=2.0, cache_dir=tmp_path, download=False)


# ------------------------------------------------------------------------------------------
# digits
# ------------------------------------------------------------------------------------------


def test_digits_shapes_and_metadata():
    ds = load_dataset("digits")
    assert ds.name == "digits"
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert len(ds.x_test) == round(0.2 * 1797)
    assert ds.x_train.shape[1] == ds.x_test.shape[1] == ds.input_dim == 64
    assert ds.x_train.dtype == ds.x_test.dtype == ds.x_probe.dtype == torch.float32
    assert ds.y_train.dtype == ds.y_test.dtype == torch.int64
    assert ds.y_train.shape == (len(ds.x_train),) and ds.y_test.shape == (len(ds.x_test),)
    assert ds.num_classes == 10
    assert set(ds.y_train.tolist()) == set(range(10)) == set(ds.y_test.tolist())
    assert ds.image_shape == (8, 8)
    assert ds.description == DATASETS["digits"]
    for t in (ds.x_train, ds.x_test, ds.x_probe):
        assert torch.isfinite(t).all()
    assert "digits" in repr(ds) and len(repr(ds)) < 300


def test_digits_train_split_is_standardized():
    ds = load_dataset("digits")
    x = ds.x_train.double()
    std = x.std(dim=0, unbiased=False)
    constant = std == 0
    # Corner pixels of the 8x8 digits are blank in every image.
    assert 1 <= int(constant.sum()) < 64
    assert torch.allclose(x.mean(dim=0), torch.zeros(64, dtype=x.dtype), atol=1e-6)
    assert torch.allclose(std[~constant], torch.ones_like(std[~constant]), atol=1e-5)
    assert (x[:, constant] == 0).all()
    # The test split reuses the train statistics, so it is not exactly centred itself.
    assert ds.x_test.double().mean(dim=0).abs().max() > 1e-3


def test_digits_matches_direct_computation():
    ds = load_dataset("digits", seed=3, test_fraction=0.25)
    bunch = load_digits()
    train_idx, test_idx = data._stratified_split(bunch.target, 0.25, 3)
    raw = bunch.data / 16.0
    want_train, want_test = _direct_standardize(raw[train_idx], raw[test_idx])
    np.testing.assert_allclose(ds.x_train.numpy(), want_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), want_test, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(ds.y_train.numpy(), bunch.target[train_idx])
    np.testing.assert_array_equal(ds.y_test.numpy(), bunch.target[test_idx])


def test_digits_split_is_stratified_and_a_partition():
    y = load_digits().target
    train_idx, test_idx = data._stratified_split(y, 0.2, 0)
    assert sorted(np.concatenate([train_idx, test_idx]).tolist()) == list(range(len(y)))
    test_counts = np.bincount(y[test_idx], minlength=10)
    assert np.abs(test_counts - 0.2 * np.bincount(y)).max() <= 1


def test_standardize_constant_features_and_scale():
    rng = np.random.default_rng(0)
    train = np.column_stack([np.full(40, 0.1), rng.normal(3.0, 2.0, 40), np.full(40, 7.0)])
    test = np.array([[0.1, 3.0, 9.0], [0.3, 5.0, 7.0]])
    got_train, got_test = data._standardize(train, test, scale=0.5)
    assert got_train.dtype == got_test.dtype == np.float32
    # Exactly zero, although 0.1 has no exact float32 value.
    assert (got_train[:, [0, 2]] == 0).all()
    want_train, want_test = _direct_standardize(train * 0.5, test * 0.5)
    np.testing.assert_allclose(got_train, want_train, atol=1e-6)
    np.testing.assert_allclose(got_test, want_test, atol=1e-6)
    assert got_test[1, 0] == pytest.approx(0.1) and got_test[0, 2] == pytest.approx(1.0)


def test_digits_deterministic_by_seed():
    a, b = load_dataset("digits", seed=5), load_dataset("digits", seed=5)
    _assert_same(a, b)
    c = load_dataset("digits", seed=6)
    assert not torch.equal(a.y_train, c.y_train)
    assert _row_set(a.x_test) != _row_set(c.x_test)


def test_probe_is_fixed_subset_of_train_rows():
    ds = load_dataset("digits", seed=1, probe_size=50)
    assert ds.x_probe.shape == (50, 64)
    train_rows = [row.tobytes() for row in ds.x_train.numpy()]
    assert all(row.tobytes() in set(train_rows) for row in ds.x_probe.numpy())
    # Distinct train rows, not one row repeated.
    assert len(_row_set(ds.x_probe)) > 45
    assert torch.equal(ds.x_probe, load_dataset("digits", seed=1, probe_size=50).x_probe)
    other = load_dataset("digits", seed=2, probe_size=50).x_probe
    assert not torch.equal(ds.x_probe, other)


def test_probe_is_a_copy_and_loads_are_isolated():
    a = load_dataset("digits")
    probe = a.x_probe.clone()
    a.x_train.fill_(7.0)
    assert torch.equal(a.x_probe, probe)
    b = load_dataset("digits")
    assert not (b.x_train == 7.0).any()


def test_probe_size_is_capped_by_the_train_split():
    ds = load_dataset("moons", n_samples=20, probe_size=300)
    assert len(ds.x_train) == 16
    assert ds.x_probe.shape == (16, 2)
    assert _row_set(ds.x_probe) == _row_set(ds.x_train)


def test_tiny_test_fraction_keeps_both_splits_non_empty():
    ds = load_dataset("moons", n_samples=20, test_fraction=0.01)
    assert len(ds.x_test) == 1 and len(ds.x_train) == 19


def test_dataset_is_frozen():
    ds = load_dataset("moons", n_samples=40)
    with pytest.raises(AttributeError):
        ds.name = "other"  # type: ignore[misc]


# ------------------------------------------------------------------------------------------
# Toy 2-D sets
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", TOY)
def test_toy_shapes_balance_and_standardization(name):
    ds = load_dataset(name, n_samples=600, test_fraction=0.25)
    k = 3 if name == "blobs" else 2
    assert ds.num_classes == k and ds.image_shape is None and ds.input_dim == 2
    assert ds.x_train.shape == (450, 2) and ds.x_test.shape == (150, 2)
    assert ds.x_probe.shape == (300, 2)
    for y, n in ((ds.y_train, 450), (ds.y_test, 150)):
        counts = torch.bincount(y, minlength=k)
        assert len(counts) == k
        assert (counts - n / k).abs().max() <= 1
    x = ds.x_train.double()
    assert torch.allclose(x.mean(0), torch.zeros(2, dtype=x.dtype), atol=1e-6)
    assert torch.allclose(x.std(0, unbiased=False), torch.ones(2, dtype=x.dtype), atol=1e-5)


@pytest.mark.parametrize("name", TOY)
def test_toy_deterministic_and_seeded(name):
    _assert_same(load_dataset(name, seed=11), load_dataset(name, seed=11))
    assert not torch.equal(load_dataset(name, seed=11).x_train, load_dataset(name, seed=12).x_train)


@pytest.mark.parametrize("name", TOY)
def test_toy_noise_changes_the_points(name):
    clean = load_dataset(name, noise=0.0, seed=4)
    noisy = load_dataset(name, noise=0.2, seed=4)
    assert not torch.allclose(clean.x_train, noisy.x_train, atol=1e-3)


@pytest.mark.parametrize("name", TOY)
def test_toy_classes_are_learnable_at_low_noise_and_overlap_at_high(name):
    def knn_accuracy(noise: float) -> float:
        ds = load_dataset(name, noise=noise, n_samples=1000, seed=0)
        knn = KNeighborsClassifier(n_neighbors=5).fit(ds.x_train.numpy(), ds.y_train.numpy())
        return knn.score(ds.x_test.numpy(), ds.y_test.numpy())

    assert knn_accuracy(0.05) > 0.95
    assert knn_accuracy(1.0) < 0.9


def test_spirals_without_noise_lie_on_two_point_symmetric_arms():
    x, y = data._make_spirals(400, 0.0, seed=0)
    r = np.hypot(x[:, 0], x[:, 1])
    theta = np.arctan2(x[:, 1], x[:, 0]) - np.pi * y  # undo the half-turn of class 1
    # On r = t / (2 pi) the polar angle equals 2 pi r modulo 2 pi.
    gap = np.angle(np.exp(1j * (theta - 2 * np.pi * r)))
    assert np.abs(gap).max() < 1e-9
    assert r.min() > 0.2 and r.max() < 1.8


def test_circles_without_noise_have_radius_ratio_one_half():
    from sklearn.datasets import make_circles

    x, y = make_circles(n_samples=200, noise=0.0, factor=0.5, random_state=0)
    ours, ours_y = data._make_toy("circles", 200, 0.0, 0)
    np.testing.assert_array_equal(ours, x)
    np.testing.assert_array_equal(ours_y, y)
    r = np.hypot(ours[:, 0], ours[:, 1])
    np.testing.assert_allclose(sorted(set(np.round(r, 9))), [0.5, 1.0])


# ------------------------------------------------------------------------------------------
# IDX files
# ------------------------------------------------------------------------------------------

IDX_DTYPES = [np.uint8, np.int8, np.int16, np.int32, np.float32, np.float64]


@pytest.mark.parametrize("dtype", IDX_DTYPES)
@pytest.mark.parametrize("suffix", ["", ".gz"])
@pytest.mark.parametrize("shape", [(7,), (3, 5), (4, 28, 28), (2, 3, 1, 4)])
def test_idx_round_trip(tmp_path, dtype, suffix, shape):
    rng = np.random.default_rng(0)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        arr = rng.integers(info.min, info.max, size=shape, endpoint=True).astype(dtype)
    else:
        arr = (rng.normal(size=shape) * 1e3).astype(dtype)
    path = tmp_path / f"a.idx{suffix}"
    write_idx(path, arr)
    assert (path.read_bytes()[:2] == b"\x1f\x8b") == (suffix == ".gz")
    back = read_idx(path)
    assert back.dtype == np.dtype(dtype) and back.dtype.isnative
    assert back.shape == shape
    np.testing.assert_array_equal(back, arr)
    back[...] = 0  # the result must be a writable array of its own


@settings(max_examples=60, deadline=None)
@given(
    arr=hnp.arrays(
        dtype=st.sampled_from([np.dtype(d) for d in IDX_DTYPES]),
        shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=5),
    ),
    gz=st.booleans(),
)
def test_idx_round_trip_property(arr, gz):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / ("x.idx.gz" if gz else "x.idx")
        write_idx(path, arr)
        back = read_idx(path)
    assert back.shape == arr.shape and back.dtype == arr.dtype
    np.testing.assert_array_equal(back, arr)


def test_idx_bytes_follow_the_standard_layout(tmp_path):
    arr = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "u8", arr)
    assert (tmp_path / "u8").read_bytes() == (
        b"\x00\x00\x08\x03" + struct.pack(">iii", 2, 3, 4) + bytes(range(24))
    )
    # A hand-made big-endian float file, as another tool would write it.
    values = [1.5, -2.25, 3.0e7]
    raw = b"\x00\x00\x0d\x01" + struct.pack(">i", 3) + struct.pack(">3f", *values)
    (tmp_path / "f32.gz").write_bytes(gzip.compress(raw))
    np.testing.assert_array_equal(read_idx(tmp_path / "f32.gz"), np.array(values, np.float32))
    # The MNIST label header: magic 0x00000801, then the count.
    write_idx(tmp_path / "labels", np.array([3, 1, 4], dtype=np.uint8))
    assert (tmp_path / "labels").read_bytes()[:8] == struct.pack(">II", 0x801, 3)


def test_write_idx_rejects_unsupported_arrays(tmp_path):
    with pytest.raises(ValueError, match="int64"):
        write_idx(tmp_path / "x", np.zeros(3, dtype=np.int64))
    with pytest.raises(ValueError, match="dimensions"):
        write_idx(tmp_path / "x", np.array(5, dtype=np.uint8))


def _valid_idx_bytes() -> bytes:
    return b"\x00\x00\x08\x02" + struct.pack(">ii", 2, 3) + bytes(range(6))


@pytest.mark.parametrize(
    ("payload", "match"),
    [
        (b"\x01\x02\x08\x02" + _valid_idx_bytes()[4:], "magic"),
        (b"<html>Not found</html>", "magic"),
        (b"\x00\x00", "truncated"),
        (b"\x00\x00\x08\x02" + struct.pack(">i", 2), "truncated IDX header"),
        (_valid_idx_bytes()[:-1], "truncated IDX data"),
        (_valid_idx_bytes() + b"\x00", "unexpected bytes"),
        (b"\x00\x00\x07\x01" + struct.pack(">i", 1) + b"\x00", "type code 0x07"),
        (b"\x00\x00\x08\x00", "0 dimensions"),
    ],
)
def test_read_idx_rejects_bad_files(tmp_path, payload, match):
    for path, content in (
        (tmp_path / "bad", payload),
        (tmp_path / "bad.gz", gzip.compress(payload)),
    ):
        path.write_bytes(content)
        with pytest.raises(ValueError, match=match) as info:
            read_idx(path)
        assert str(path) in str(info.value)


def test_read_idx_rejects_truncated_gzip(tmp_path):
    compressed = gzip.compress(_valid_idx_bytes() * 1)
    path = tmp_path / "cut.gz"
    path.write_bytes(compressed[: len(compressed) // 2])
    with pytest.raises(ValueError, match="gzip"):
        read_idx(path)


# ------------------------------------------------------------------------------------------
# MNIST-style loader, offline
# ------------------------------------------------------------------------------------------


def _fake_arrays(seed: int = 0, n_train: int = 50, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, size=(n_train, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(n_test, 28, 28), dtype=np.uint8)
    train[:, 0, 0] = 0  # a blank corner, as in real MNIST
    return {
        "train_images": train,
        "train_labels": (np.arange(n_train) % 10).astype(np.uint8),
        "test_images": test,
        "test_labels": rng.integers(0, 10, size=n_test, dtype=np.uint8),
    }


def _write_fake(directory: Path, arrays: dict[str, np.ndarray]) -> dict[str, str]:
    """Write the four files; return their MD5 sums by file name."""
    directory.mkdir(parents=True, exist_ok=True)
    sums = {}
    for role, fname in IDX_FILES.items():
        write_idx(directory / fname, arrays[role])
        sums[fname] = hashlib.md5((directory / fname).read_bytes()).hexdigest()
    return sums


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_dataset_loads_from_cache(tmp_path, name):
    arrays = _fake_arrays()
    _write_fake(tmp_path / name, arrays)
    ds = load_dataset(name, cache_dir=tmp_path, download=False, probe_size=10)
    assert ds.name == name and ds.description == DATASETS[name]
    assert ds.x_train.shape == (50, 784) and ds.x_test.shape == (20, 784)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.image_shape == (28, 28) and ds.num_classes == 10 and ds.input_dim == 784
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train_labels"])
    np.testing.assert_array_equal(ds.y_test.numpy(), arrays["test_labels"])
    scaled_train = arrays["train_images"].reshape(50, -1) / 255.0
    scaled_test = arrays["test_images"].reshape(20, -1) / 255.0
    want_train, want_test = _direct_standardize(scaled_train, scaled_test)
    np.testing.assert_allclose(ds.x_train.numpy(), want_train, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ds.x_test.numpy(), want_test, rtol=1e-5, atol=1e-5)
    assert (ds.x_train[:, 0] == 0).all() and torch.isfinite(ds.x_test).all()
    assert ds.x_probe.shape == (10, 784)
    assert _row_set(ds.x_probe) <= _row_set(ds.x_train)


def test_idx_split_is_official_and_ignores_toy_arguments(tmp_path):
    _write_fake(tmp_path / "mnist", _fake_arrays())
    a = load_dataset("mnist", cache_dir=tmp_path, download=False, seed=0, probe_size=10)
    b = load_dataset(
        "mnist",
        cache_dir=tmp_path,
        download=False,
        seed=9,
        test_fraction=0.5,
        n_samples=20,
        probe_size=10,
    )
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.x_probe, b.x_probe)  # only the probe follows the seed


def test_idx_second_load_uses_memory_cache_and_returns_fresh_tensors(tmp_path, monkeypatch):
    _write_fake(tmp_path / "mnist", _fake_arrays())
    calls = []
    real_read = data.read_idx
    monkeypatch.setattr(data, "read_idx", lambda p: calls.append(p) or real_read(p))
    first = load_dataset("mnist", cache_dir=tmp_path, download=False)
    assert len(calls) == 4
    first.x_train.zero_()
    first.y_train.fill_(3)
    second = load_dataset("mnist", cache_dir=tmp_path, download=False)
    assert len(calls) == 4
    assert not (second.x_train == 0).all()
    np.testing.assert_array_equal(second.y_train.numpy(), _fake_arrays()["train_labels"])


def test_idx_replaced_file_is_read_again(tmp_path):
    _write_fake(tmp_path / "mnist", _fake_arrays())
    load_dataset("mnist", cache_dir=tmp_path, download=False)
    new_labels = np.full(50, 9, dtype=np.uint8)
    write_idx(tmp_path / "mnist" / IDX_FILES["train_labels"], new_labels)
    again = load_dataset("mnist", cache_dir=tmp_path, download=False)
    assert (again.y_train == 9).all()


def test_default_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("BN_LAB_DATA", str(tmp_path / "data"))
    assert default_cache_dir() == tmp_path / "data"
    monkeypatch.delenv("BN_LAB_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "bn-lab"


def test_load_without_cache_dir_uses_the_default(tmp_path, monkeypatch):
    monkeypatch.setenv("BN_LAB_DATA", str(tmp_path))
    _write_fake(tmp_path / "fashion-mnist", _fake_arrays(seed=2))
    ds = load_dataset("fashion-mnist", download=False)
    np.testing.assert_array_equal(ds.y_test.numpy(), _fake_arrays(seed=2)["test_labels"])


def test_missing_files_without_download_explain_what_to_do(tmp_path):
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset("mnist", cache_dir=tmp_path, download=False)
    msg = str(info.value)
    assert str(tmp_path / "mnist") in msg
    for fname in FILE_NAMES:
        assert fname in msg
    assert data.MIRRORS["mnist"][0] in msg and "BN_LAB_DATA" in msg
    assert not (tmp_path / "mnist").exists()  # download=False creates nothing


def test_only_the_missing_file_is_named(tmp_path):
    _write_fake(tmp_path / "mnist", _fake_arrays())
    (tmp_path / "mnist" / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetUnavailable) as info:
        fetch_idx_files("mnist", tmp_path, download=False)
    msg = str(info.value)
    assert "t10k-labels-idx1-ubyte.gz" in msg
    assert "train-images-idx3-ubyte.gz" not in msg


def test_corrupt_cached_file_is_reported_with_its_path(tmp_path):
    _write_fake(tmp_path / "mnist", _fake_arrays())
    bad = tmp_path / "mnist" / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:100])
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset("mnist", cache_dir=tmp_path, download=False)
    assert str(bad) in str(info.value) and "Delete" in str(info.value)


def test_mismatched_cached_files_are_reported(tmp_path):
    arrays = _fake_arrays()
    arrays["train_labels"] = arrays["train_labels"][:40]
    _write_fake(tmp_path / "mnist", arrays)
    with pytest.raises(DatasetUnavailable, match="50 images but labels of shape"):
        load_dataset("mnist", cache_dir=tmp_path, download=False)


def test_fetch_idx_files_rejects_other_names(tmp_path):
    with pytest.raises(ValueError, match="moons"):
        fetch_idx_files("moons", tmp_path)


# ------------------------------------------------------------------------------------------
# Download through a local HTTP server
# ------------------------------------------------------------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


class _TruncatingHandler(_QuietHandler):
    """Announces the full length, sends half, hangs up: an interrupted transfer."""

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        body = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.close_connection = True


@contextlib.contextmanager
def _serve(directory: Path, handler=_QuietHandler):
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(handler, directory=str(directory))
    )
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


@pytest.fixture
def served(tmp_path):
    """Fake MNIST files under <tmp>/www/files/ and their MD5 sums."""
    arrays = _fake_arrays(seed=7)
    sums = _write_fake(tmp_path / "www" / "files", arrays)
    return tmp_path / "www", arrays, sums


def _cache_contents(cache: Path) -> list[str]:
    return sorted(p.name for p in cache.rglob("*") if p.is_file())


def test_download_fills_cache_and_loads(tmp_path, monkeypatch, served):
    www, arrays, sums = served
    cache = tmp_path / "cache"
    with _serve(www) as base:
        monkeypatch.setitem(data.MIRRORS, "mnist", (base + "files/",))
        monkeypatch.setitem(data.MD5, "mnist", sums)
        ds = load_dataset("mnist", cache_dir=cache, probe_size=5)
    assert _cache_contents(cache) == sorted(FILE_NAMES)
    for fname in FILE_NAMES:
        assert (cache / "mnist" / fname).read_bytes() == (www / "files" / fname).read_bytes()
    np.testing.assert_array_equal(ds.y_train.numpy(), arrays["train_labels"])
    assert ds.x_train.shape == (50, 784) and ds.x_test.shape == (20, 784)
    # Now cached: loads with the server gone and download forbidden.
    again = load_dataset("mnist", cache_dir=cache, probe_size=5, download=False)
    _assert_same(ds, again)


def test_download_falls_back_through_mirrors(tmp_path, monkeypatch, served):
    www, arrays, sums = served
    cache = tmp_path / "cache"
    with _serve(www) as base:
        mirrors = (_closed_port_url(), base + "nowhere/", base + "files/")
        monkeypatch.setitem(data.MIRRORS, "mnist", mirrors)
        monkeypatch.setitem(data.MD5, "mnist", sums)
        paths = fetch_idx_files("mnist", cache)
    assert set(paths) == set(IDX_FILES)
    assert all(p.parent == cache / "mnist" and p.is_file() for p in paths.values())
    np.testing.assert_array_equal(read_idx(paths["test_images"]), arrays["test_images"])


def test_download_only_fetches_missing_files(tmp_path, monkeypatch, served):
    www, _, sums = served
    cache = tmp_path / "cache"
    _write_fake(cache / "mnist", _fake_arrays(seed=99))
    (cache / "mnist" / "t10k-images-idx3-ubyte.gz").unlink()
    kept = (cache / "mnist" / "train-images-idx3-ubyte.gz").read_bytes()
    with _serve(www) as base:
        monkeypatch.setitem(data.MIRRORS, "mnist", (base + "files/",))
        monkeypatch.setitem(data.MD5, "mnist", sums)
        fetch_idx_files("mnist", cache)
    assert (cache / "mnist" / "train-images-idx3-ubyte.gz").read_bytes() == kept
    fetched = (cache / "mnist" / "t10k-images-idx3-ubyte.gz").read_bytes()
    assert fetched == (www / "files" / "t10k-images-idx3-ubyte.gz").read_bytes()


def test_unreachable_server_raises_and_leaves_no_partial_file(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    url = _closed_port_url()
    monkeypatch.setitem(data.MIRRORS, "mnist", (url,))
    with pytest.raises(DatasetUnavailable) as info:
        load_dataset("mnist", cache_dir=cache)
    msg = str(info.value)
    assert url in msg and str(cache / "mnist") in msg
    for fname in FILE_NAMES:
        assert fname in msg
    assert _cache_contents(cache) == []


def test_checksum_mismatch_is_rejected(tmp_path, monkeypatch, served):
    www, _, _ = served
    cache = tmp_path / "cache"
    with _serve(www) as base:
        # The real MNIST sums stay in place: the fake files must not pass for MNIST.
        monkeypatch.setitem(data.MIRRORS, "mnist", (base + "files/",))
        with pytest.raises(DatasetUnavailable, match="checksum mismatch"):
            fetch_idx_files("mnist", cache)
    assert _cache_contents(cache) == []


def test_interrupted_transfer_leaves_no_file(tmp_path, monkeypatch, served):
    www, _, _ = served
    cache = tmp_path / "cache"
    with _serve(www, _TruncatingHandler) as base:
        monkeypatch.setitem(data.MIRRORS, "mnist", (base + "files/",))
        monkeypatch.setitem(data.MD5, "mnist", {})  # only the length check can catch it
        with pytest.raises(DatasetUnavailable, match="incomplete download"):
            fetch_idx_files("mnist", cache)
    assert _cache_contents(cache) == []


def test_non_idx_response_is_rejected_without_checksum(tmp_path, monkeypatch):
    www = tmp_path / "www"
    www.mkdir()
    for fname in FILE_NAMES:
        (www / fname).write_bytes(b"<html>rate limited</html>")
    cache = tmp_path / "cache"
    with _serve(www) as base:
        monkeypatch.setitem(data.MIRRORS, "mnist", (base,))
        monkeypatch.setitem(data.MD5, "mnist", {})
        with pytest.raises(DatasetUnavailable, match="magic"):
            fetch_idx_files("mnist", cache)
    assert _cache_contents(cache) == []
