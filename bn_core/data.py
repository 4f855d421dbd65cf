"""Datasets for BatchNorm Lab: small built-in sets, 2-D toy sets, MNIST and Fashion-MNIST.

Every loader returns a :class:`Dataset` of float32 features standardized with statistics of
the train split only (the test split reuses them), int64 labels and a fixed "probe" batch
drawn from the train split, used to watch activation distributions without batch noise.

MNIST and Fashion-MNIST are read from IDX files cached under :func:`default_cache_dir`;
missing files are downloaded from the mirrors in :data:`MIRRORS` and verified against the
published MD5 sums before they enter the cache. Everything else needs no network.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.client
import logging
import math
import os
import struct
import tempfile
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "DATASETS",
    "DOWNLOAD_TIMEOUT_S",
    "IDX_FILES",
    "MD5",
    "MIRRORS",
    "Dataset",
    "DatasetUnavailable",
    "default_cache_dir",
    "fetch_idx_files",
    "load_dataset",
    "read_idx",
    "write_idx",
]

log = logging.getLogger(__name__)

DATASETS: dict[str, str] = {
    "digits": "8x8 handwritten digits from scikit-learn (1,797 images, 10 classes, no download)",
    "moons": "two interleaving half circles in 2-D (2 classes)",
    "circles": "a small circle inside a large one in 2-D (2 classes)",
    "spirals": "two interleaved Archimedean spirals in 2-D (2 classes)",
    "blobs": "three Gaussian clusters in 2-D (3 classes)",
    "mnist": "28x28 handwritten digits, official 60k/10k split (10 classes, ~11 MB download)",
    "fashion-mnist": "28x28 clothing images, official 60k/10k split (10 classes, ~30 MB download)",
}

# Role -> file name; the same four names for MNIST and Fashion-MNIST.
IDX_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}

# Base URLs tried in order; a file is URL = base + file name.
MIRRORS: dict[str, tuple[str, ...]] = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": (
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://storage.googleapis.com/tensorflow/tf-keras-datasets/",
    ),
}

# Published MD5 sums of the official files (the ones torchvision checks). A mirror serving
# anything else (an HTML error page, a truncated file, the other dataset) is rejected.
MD5: dict[str, dict[str, str]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
}

DOWNLOAD_TIMEOUT_S = 30.0

_IDX_DATASETS = ("mnist", "fashion-mnist")
_TOY_DATASETS = ("moons", "circles", "spirals", "blobs")
_CACHE_ENV = "BN_LAB_DATA"
_USER_AGENT = "bn-lab/0.1 (Python urllib)"

# IDX type code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_IDX_CODES: dict[tuple[str, int], int] = {
    (dt.kind, dt.itemsize): c for c, dt in _IDX_DTYPES.items()
}

# Independent random streams derived from the one user seed.
_STREAM_DATA, _STREAM_SPLIT, _STREAM_PROBE = 0, 1, 2


class DatasetUnavailable(RuntimeError):  # noqa: N818 - name fixed by the public interface
    """A dataset's files are missing or unreadable and could not be downloaded.

    The message says which files are missing, where the cache directory is, and where to
    get the files to put there by hand.
    """


@dataclass(frozen=True, eq=False)  # eq=False: comparing tensors with == has no single truth value
class Dataset:
    """A loaded, standardized dataset. Tensors are fresh per :func:`load_dataset` call."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_probe: torch.Tensor
    num_classes: int
    image_shape: tuple[int, int] | None
    description: str

    @property
    def input_dim(self) -> int:
        return int(self.x_train.shape[1])

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, n_train={len(self.x_train)}, n_test={len(self.x_test)}, "
            f"n_probe={len(self.x_probe)}, input_dim={self.input_dim}, "
            f"num_classes={self.num_classes}, image_shape={self.image_shape})"
        )


def default_cache_dir() -> Path:
    """Where MNIST-style files are cached: ``$BN_LAB_DATA`` if set, else ``~/.cache/bn-lab``."""
    env = os.environ.get(_CACHE_ENV, "").strip()
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "bn-lab"


# --------------------------------------------------------------------------------------------
# IDX format
# --------------------------------------------------------------------------------------------


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (plain or gzip-compressed) into a native-byte-order numpy array.

    Raises ValueError when the file is not valid IDX: bad magic, unknown type code,
    truncated header or data, trailing bytes, or corrupt gzip data.
    """
    path = Path(path)
    raw = path.read_bytes()
    # Detect gzip by content, not name, so a renamed or un-gzipped file still reads.
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({exc})") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: truncated IDX file: {len(raw)} bytes, the header needs 4")
    if raw[0] != 0 or raw[1] != 0:
        raise ValueError(
            f"{path}: not an IDX file: bad magic number {raw[:4].hex()} "
            "(the first two bytes must be zero)"
        )
    code, ndim = raw[2], raw[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise ValueError(f"{path}: unknown IDX data type code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise ValueError(f"{path}: IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(
            f"{path}: truncated IDX header: {len(raw)} bytes, {ndim} dimensions need {header_len}"
        )
    shape = struct.unpack(f">{ndim}i", raw[4:header_len])
    if any(n < 0 for n in shape):
        raise ValueError(f"{path}: negative dimension in IDX header {shape}")
    dtype = _IDX_DTYPES[code]
    count = math.prod(shape)
    expected = count * dtype.itemsize
    actual = len(raw) - header_len
    if actual < expected:
        raise ValueError(
            f"{path}: truncated IDX data: shape {shape} needs {expected} bytes, file has {actual}"
        )
    if actual > expected:
        raise ValueError(
            f"{path}: {actual - expected} unexpected bytes after the IDX data of shape {shape}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header_len).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write ``array`` as an IDX file, gzip-compressed when ``path`` ends with ``.gz``.

    Supported dtypes: uint8, int8, int16, int32, float32, float64.
    """
    arr = np.asarray(array)
    code = _IDX_CODES.get((arr.dtype.kind, arr.dtype.itemsize))
    if code is None:
        raise ValueError(
            f"write_idx: dtype {arr.dtype} has no IDX type code "
            "(allowed: uint8, int8, int16, int32, float32, float64)"
        )
    if not 1 <= arr.ndim <= 255:
        raise ValueError(f"write_idx: array must have 1 to 255 dimensions, got {arr.ndim}")
    if any(n >= 2**31 for n in arr.shape):
        raise ValueError(f"write_idx: dimension too large for IDX in shape {arr.shape}")
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    payload = header + arr.astype(_IDX_DTYPES[code], copy=False).tobytes(order="C")
    path = Path(path)
    if path.name.endswith(".gz"):
        payload = gzip.compress(payload, mtime=0)  # mtime=0: same array, same bytes
    path.write_bytes(payload)


# --------------------------------------------------------------------------------------------
# Download and cache
# --------------------------------------------------------------------------------------------


def _manual_instructions(name: str, directory: Path, missing: list[str]) -> str:
    mirrors = MIRRORS.get(name, ())
    where = mirrors[0] if mirrors else "(no known mirror)"
    others = f" (or a mirror: {', '.join(mirrors[1:])})" if len(mirrors) > 1 else ""
    files = "\n".join(f"  {f}" for f in missing)
    return (
        f"To install {name} by hand, download these files from {where}{others} and put them, "
        f"still gzipped and under exactly these names, into {directory}:\n{files}\n"
        f"The cache directory is {directory.parent}; set the {_CACHE_ENV} environment "
        "variable to use another one."
    )


def _download_file(url: str, dest: Path, expected_md5: str | None) -> None:
    """Download ``url`` to ``dest`` via a temp file in the same directory and an atomic rename.

    Raises OSError, http.client.HTTPException or ValueError on any failure; ``dest`` is then
    untouched and no temporary file is left behind.
    """
    tmp: Path | None = None
    try:
        request = urllib.request.Request(url, headers={"User-Agent": _USER_AGENT})
        with urllib.request.urlopen(request, timeout=DOWNLOAD_TIMEOUT_S) as response:
            fd, tmp_name = tempfile.mkstemp(
                dir=dest.parent, prefix=f".{dest.name}.", suffix=".part"
            )
            tmp = Path(tmp_name)
            digest = hashlib.md5(usedforsecurity=False)
            received = 0
            with os.fdopen(fd, "wb") as out:
                while chunk := response.read(1 << 16):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                out.flush()
                os.fsync(out.fileno())
            # http.client returns b"" instead of raising when the peer closes early.
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and received != int(declared):
                raise ValueError(f"incomplete download: got {received} of {declared} bytes")
        if expected_md5 is not None and digest.hexdigest() != expected_md5:
            raise ValueError(
                f"checksum mismatch: MD5 {digest.hexdigest()}, expected {expected_md5}"
            )
        read_idx(tmp)
        tmp.chmod(0o644)  # mkstemp makes 0600; a shared classroom cache must be readable
        os.replace(tmp, dest)
        tmp = None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def fetch_idx_files(
    name: str, cache_dir: str | os.PathLike, download: bool = True
) -> dict[str, Path]:
    """Make sure the four IDX files of ``name`` are in ``cache_dir/<name>/``.

    Returns ``{"train_images", "train_labels", "test_images", "test_labels"} -> Path``.
    Missing files are downloaded (mirrors in :data:`MIRRORS` order, MD5-checked, atomically
    renamed into place) when ``download`` is true. Raises :class:`DatasetUnavailable` with
    by-hand instructions when a file is missing and cannot be downloaded.
    """
    if name not in _IDX_DATASETS:
        raise ValueError(f"dataset = {name!r}: IDX datasets are {', '.join(_IDX_DATASETS)}")
    directory = Path(cache_dir).expanduser() / name
    paths = {role: directory / fname for role, fname in IDX_FILES.items()}
    missing = [p for p in paths.values() if not p.is_file()]
    if not missing:
        return paths
    missing_names = [p.name for p in missing]
    if not download:
        raise DatasetUnavailable(
            f"{name} is not available: {', '.join(missing_names)} not found in {directory} "
            "and download=False.\n" + _manual_instructions(name, directory, missing_names)
        )
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetUnavailable(
            f"{name} is not available: cannot create the cache directory {directory} ({exc}).\n"
            + _manual_instructions(name, directory, missing_names)
        ) from exc

    mirrors = list(MIRRORS.get(name, ()))
    for dest in missing:
        errors: list[str] = []
        for base in mirrors:
            url = base + dest.name
            log.info("downloading %s to %s", url, dest)
            try:
                _download_file(url, dest, MD5.get(name, {}).get(dest.name))
            except (OSError, http.client.HTTPException, ValueError) as exc:
                if isinstance(exc, urllib.error.HTTPError):
                    exc.close()
                errors.append(f"  {url}: {exc}")
                continue
            # Try the mirror that worked first for the remaining files.
            mirrors.remove(base)
            mirrors.insert(0, base)
            break
        else:
            # Stop at the first file no mirror can serve: with the network down, going on
            # would only add more timeouts before the same answer.
            still_missing = [p.name for p in paths.values() if not p.is_file()]
            tried = "\n".join(errors) if errors else "  (no mirror configured)"
            raise DatasetUnavailable(
                f"{name} is not available: could not download {dest.name}; tried:\n{tried}\n"
                + _manual_instructions(name, directory, still_missing)
            )
    return paths


@functools.lru_cache(maxsize=2)
def _read_idx_set(
    name: str, files: tuple[tuple[str, int, int], ...]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Read and check the four arrays; keyed on (path, mtime, size) so replaced files reload.

    The returned arrays are read-only: they are shared between calls.
    """
    arrays = []
    for path_str, _, _ in files:
        path = Path(path_str)
        try:
            arr = read_idx(path)
        except ValueError as exc:
            raise DatasetUnavailable(
                f"{name}: cached file {path} is unreadable: {exc}\n"
                "Delete it and load again to download a fresh copy."
            ) from exc
        arr.flags.writeable = False
        arrays.append(arr)
    train_x, train_y, test_x, test_y = arrays
    for split, images, labels in (("train", train_x, train_y), ("test", test_x, test_y)):
        problem = None
        if images.ndim != 3:
            problem = f"images have shape {images.shape}, expected (n, rows, cols)"
        elif labels.ndim != 1 or len(labels) != len(images):
            problem = f"{len(images)} images but labels of shape {labels.shape}"
        elif images.dtype != np.uint8:
            problem = f"images have dtype {images.dtype}, expected uint8"
        elif len(labels) and (labels.min() < 0 or labels.max() > 9):
            problem = f"labels outside 0..9 (min {labels.min()}, max {labels.max()})"
        elif len(images) == 0:
            problem = "no images"
        if problem:
            raise DatasetUnavailable(
                f"{name}: the cached {split} files in {Path(files[0][0]).parent} do not match: "
                f"{problem}. Delete them and load again to download fresh copies."
            )
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DatasetUnavailable(
            f"{name}: train images are {train_x.shape[1:]} but test images {test_x.shape[1:]}"
        )
    return train_x, train_y, test_x, test_y


# --------------------------------------------------------------------------------------------
# Generators, split, standardization
# --------------------------------------------------------------------------------------------


def _rng(seed: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, stream])


def _make_spirals(n_samples: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two interleaved Archimedean spirals r = theta / (2 pi), 1.5 turns each."""
    rng = _rng(seed, _STREAM_DATA)
    counts = (n_samples // 2, n_samples - n_samples // 2)
    xs, ys = [], []
    for label, count in enumerate(counts):
        # sqrt spreads points evenly along the arc rather than bunching them at the centre.
        theta = np.pi / 2 + np.sqrt(rng.random(count)) * 3 * np.pi
        radius = theta / (2 * np.pi)
        angle = theta + label * np.pi
        pts = np.column_stack([radius * np.cos(angle), radius * np.sin(angle)])
        xs.append(pts + rng.normal(scale=noise, size=pts.shape))
        ys.append(np.full(count, label))
    return np.concatenate(xs), np.concatenate(ys)


def _make_toy(name: str, n_samples: int, noise: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn import datasets as skd

    if name == "moons":
        return skd.make_moons(n_samples=n_samples, noise=noise, random_state=seed)
    if name == "circles":
        return skd.make_circles(n_samples=n_samples, noise=noise, factor=0.5, random_state=seed)
    if name == "blobs":
        # Fixed centres on the unit circle so every seed gives the same, separable layout;
        # noise is the cluster standard deviation in those units.
        angles = np.pi / 2 + 2 * np.pi * np.arange(3) / 3
        centers = np.column_stack([np.cos(angles), np.sin(angles)])
        return skd.make_blobs(
            n_samples=n_samples, centers=centers, cluster_std=noise, random_state=seed
        )
    return _make_spirals(n_samples, noise, seed)


def _stratified_split(
    y: np.ndarray, test_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): per class, round(test_fraction * n_class) to test, by
    largest remainder so the total is round(test_fraction * n); both splits non-empty."""
    rng = _rng(seed, _STREAM_SPLIT)
    classes, counts = np.unique(y, return_counts=True)
    n = len(y)
    n_test = min(max(1, round(test_fraction * n)), n - 1)
    exact = counts * (n_test / n)
    per_class = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - per_class), kind="stable")[: n_test - per_class.sum()]:
        per_class[i] += 1
    train_idx, test_idx = [], []
    for cls, k in zip(classes, per_class, strict=True):
        idx = rng.permutation(np.flatnonzero(y == cls))
        test_idx.append(idx[:k])
        train_idx.append(idx[k:])
    return rng.permutation(np.concatenate(train_idx)), rng.permutation(np.concatenate(test_idx))


def _standardize(
    train: np.ndarray, test: np.ndarray, scale: float = 1.0, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """Standardize ``train * scale`` and ``test * scale`` (n, d) with the train mean and std.

    Statistics are accumulated in float64 over row chunks, so a 60000x784 uint8 array never
    becomes one float64 copy. Features constant on the train split get mean = that value and
    std = 1 (in scaled units), so they come out exactly 0 on train and never NaN.
    """
    n, d = train.shape
    lo, hi = train.min(axis=0), train.max(axis=0)
    constant = lo == hi
    mean = train.sum(axis=0, dtype=np.float64) / n
    mean[constant] = lo[constant]
    # float32 arithmetic for pixel bytes; float64 data keeps float64 so a constant feature
    # minus its mean is exactly 0 even when the value has no float32 representation.
    mean_c = mean.astype(np.promote_types(train.dtype, np.float32))
    sq = np.zeros(d)
    dev = np.empty((min(chunk, n), d), dtype=np.float32)
    for i in range(0, n, chunk):
        block = dev[: len(train[i : i + chunk])]
        np.subtract(train[i : i + chunk], mean_c, out=block, casting="same_kind")
        sq += np.square(block).sum(axis=0, dtype=np.float64)
    std = np.sqrt(sq / n)
    # Elsewhere scale cancels out; only this fallback std lives in scaled units.
    std[constant] = 1.0 / scale
    inv_std32 = (1.0 / std).astype(np.float32)

    def apply(a: np.ndarray) -> np.ndarray:
        out = np.empty(a.shape, dtype=np.float32)
        for i in range(0, len(a), chunk):
            block = out[i : i + chunk]
            np.subtract(a[i : i + chunk], mean_c, out=block, casting="same_kind")
            block *= inv_std32
        return out

    return apply(train), apply(test)


# --------------------------------------------------------------------------------------------
# Public loader
# --------------------------------------------------------------------------------------------


def _check_args(
    name: str,
    seed: int,
    test_fraction: float,
    noise: float,
    n_samples: int,
    probe_size: int,
) -> None:
    if name not in DATASETS:
        raise ValueError(f"dataset = {name!r}: allowed: {', '.join(DATASETS)}")

    def is_int(v: object) -> bool:
        return isinstance(v, int | np.integer) and not isinstance(v, bool)

    def is_real(v: object) -> bool:
        return isinstance(v, int | float | np.integer | np.floating) and not isinstance(v, bool)

    if not is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"seed = {seed!r}: must be an integer, allowed range is 0 <= seed < 2**32")
    if not is_real(test_fraction) or not 0 < test_fraction <= 0.9:
        raise ValueError(
            f"test_fraction = {test_fraction!r}: allowed range is 0 < test_fraction <= 0.9"
        )
    if not is_real(noise) or not 0 <= noise <= 1:
        raise ValueError(f"noise = {noise!r}: allowed range is 0 <= noise <= 1")
    if not is_int(n_samples) or n_samples < 20:
        raise ValueError(f"n_samples = {n_samples!r}: must be an integer >= 20")
    if not is_int(probe_size) or probe_size < 2:
        raise ValueError(f"probe_size = {probe_size!r}: must be an integer >= 2")


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    test_fraction: float = 0.2,
    noise: float = 0.1,
    n_samples: int = 2000,
    probe_size: int = 300,
    cache_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> Dataset:
    """Load dataset ``name`` (a key of :data:`DATASETS`), standardized and split.

    - ``seed`` drives everything random: toy-set generation, the stratified train/test split
      and the probe batch. The same arguments always give identical tensors.
    - ``test_fraction`` is the stratified test share for every set except MNIST and
      Fashion-MNIST, which keep their official 60k/10k split.
    - ``noise`` (0 to 1) and ``n_samples`` only apply to the 2-D toy sets; ``digits`` always
      has its 1,797 images.
    - ``probe_size`` train examples (fewer if the train split is smaller) form ``x_probe``,
      a copy of those ``x_train`` rows.
    - ``cache_dir`` (default :func:`default_cache_dir`) and ``download`` only matter for
      MNIST and Fashion-MNIST; see :func:`fetch_idx_files`.

    Raises ValueError for a bad argument and :class:`DatasetUnavailable` when MNIST-style
    files are missing and cannot be downloaded.
    """
    _check_args(name, seed, test_fraction, noise, n_samples, probe_size)
    seed = int(seed)

    if name in _IDX_DATASETS:
        paths = fetch_idx_files(
            name, default_cache_dir() if cache_dir is None else Path(cache_dir), download
        )
        stamp = []
        for role in IDX_FILES:
            st = paths[role].stat()
            stamp.append((str(paths[role].resolve()), st.st_mtime_ns, st.st_size))
        train_img, y_train, test_img, y_test = _read_idx_set(name, tuple(stamp))
        image_shape: tuple[int, int] | None = (int(train_img.shape[1]), int(train_img.shape[2]))
        x_train, x_test = _standardize(
            train_img.reshape(len(train_img), -1), test_img.reshape(len(test_img), -1), 1 / 255
        )
        num_classes = 10
    else:
        if name == "digits":
            from sklearn.datasets import load_digits

            bunch = load_digits()
            x, y = bunch.data, bunch.target
            scale, image_shape, num_classes = 1 / 16, (8, 8), 10
        else:
            x, y = _make_toy(name, n_samples, float(noise), seed)
            scale, image_shape, num_classes = 1.0, None, 3 if name == "blobs" else 2
        train_idx, test_idx = _stratified_split(y, float(test_fraction), seed)
        x_train, x_test = _standardize(x[train_idx], x[test_idx], scale)
        y_train, y_test = y[train_idx], y[test_idx]

    probe_rows = _rng(seed, _STREAM_PROBE).choice(
        len(x_train), size=min(probe_size, len(x_train)), replace=False
    )
    probe_rows.sort()
    # Every tensor owns fresh memory: callers may modify them without affecting other loads.
    return Dataset(
        name=name,
        x_train=torch.from_numpy(x_train),
        y_train=torch.from_numpy(np.array(y_train, dtype=np.int64)),
        x_test=torch.from_numpy(x_test),
        y_test=torch.from_numpy(np.array(y_test, dtype=np.int64)),
        x_probe=torch.from_numpy(x_train[probe_rows]),
        num_classes=num_classes,
        image_shape=image_shape,
        description=DATASETS[name],
    )
