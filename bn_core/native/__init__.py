"""The compiled BatchNorm kernel: build it once, load it if it was built.

``batch_norm.cpp`` repeats the training-mode forward and backward of
``bn_core/batchnorm.py`` in C++ (and holds the lockstep MLP's output layer, see
``load_output``). At this lab's layer sizes the Python version spends
most of its time in the interpreter between small tensor ops; the compiled one does the
same arithmetic in three passes over the data and keeps up with ``torch.nn.BatchNorm1d``.

Building needs a C++ compiler and ninja and takes about half a minute, so it happens at
install time (``python -m bn_core.native build``, which the README's commands run), never
on import. A build is named after a hash of the source, torch's version and Python's, so
a stale or foreign build is never loaded; without a matching build ``bn_core`` uses the
Python kernel and says so in ``status()``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import threading
from pathlib import Path

import torch

__all__ = [
    "BUILD_DIR",
    "SOURCE",
    "build",
    "build_name",
    "load",
    "load_output",
    "load_stacked",
    "load_evaluation",
    "load_telemetry",
    "status",
]

SOURCE = Path(__file__).with_name("batch_norm.cpp")
# Where builds go; BN_CORE_BUILD_DIR moves them (for a read-only checkout).
BUILD_DIR = Path(os.environ.get("BN_CORE_BUILD_DIR") or Path(__file__).with_name("build"))
_CFLAGS = ["-O3"]

_lock = threading.Lock()
_op = None  # the loaded operator, once loaded
_stacked_op = None  # its lockstep form, loaded with it
_output_op = None  # the lockstep output layer, loaded with it
_telemetry_op = None  # a lockstep MLP's logged-step measures, loaded with it
_evaluation_op = None  # a lockstep MLP's test metrics and running-stat errors, likewise
_error: str | None = None  # why it is not loaded, once a load was tried


def build_name() -> str:
    """The library's name: changes whenever the source, the flags, torch or Python change."""
    digest = hashlib.sha256(SOURCE.read_bytes())
    digest.update(f"{torch.__version__}|{sys.version_info[:2]}|{_CFLAGS}".encode())
    return f"bn_core_native_{digest.hexdigest()[:12]}"


def _library_path() -> Path:
    return BUILD_DIR / build_name() / f"{build_name()}.so"


def build(verbose: bool = False) -> Path:
    """Compile the kernel (a no-op when the current build exists); returns the library."""
    from torch.utils import cpp_extension

    if _library_path().exists():
        return _library_path()
    name = build_name()
    folder = BUILD_DIR / name
    folder.mkdir(parents=True, exist_ok=True)
    # Builds of earlier sources can never load again (their name no longer matches).
    for old in BUILD_DIR.glob("bn_core_native_*"):
        if old != folder and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
    cpp_extension.load(
        name=name,
        sources=[str(SOURCE)],
        extra_cflags=_CFLAGS,
        build_directory=str(folder),
        is_python_module=False,
        verbose=verbose,
    )
    return _library_path()


def load():
    """The compiled ``bn_core::batch_norm_train`` operator, or None when it is not built.

    Returns the raw C++ callable: going through ``torch.ops``' Python wrapper on every
    call would cost a few microseconds a layer.
    """
    global _op, _stacked_op, _output_op, _telemetry_op, _evaluation_op, _error
    if _op is not None or _error is not None:  # every forward pass asks: no lock then
        return _op
    with _lock:
        if _op is not None or _error is not None:
            return _op
        path = _library_path()
        if not path.exists():
            _error = "not built (run `python -m bn_core.native build`)"
            return None
        try:
            if not hasattr(torch.ops.bn_core, "batch_norm_train"):
                torch.ops.load_library(str(path))
            ops = torch.ops.bn_core
            stacked = ops.batch_norm_train_stacked.default._op
            output = ops.lockstep_output.default._op
            # These two run on a worker thread: torch.ops releases the interpreter lock
            # for the whole call.
            telemetry = ops.lockstep_mlp_telemetry.default._op
            evaluation = ops.lockstep_mlp_evaluation.default._op
            # _op last: the lock-free check above must never see it before the others.
            _stacked_op, _output_op = stacked, output
            _telemetry_op, _evaluation_op = telemetry, evaluation
            _op = ops.batch_norm_train.default._op
        except (OSError, RuntimeError, AttributeError) as err:  # a broken or foreign build
            _error = f"could not be loaded ({type(err).__name__}: {err})"
        return _op


def load_stacked():
    """``bn_core::batch_norm_train_stacked``, or None when the kernel is not built.

    It normalizes the variants [start, stop) of a lockstep (V, N, C) activation where
    they lie in that layout and passes the others through; see the C++ source.
    """
    load()
    return _stacked_op


def load_output():
    """``bn_core::lockstep_output``, or None when the kernel is not built.

    The lockstep MLP's output layer, logits = h @ W + b per variant, in the transposed
    form that is fast for a narrow (10-class) output; see the C++ source.
    """
    load()
    return _output_op


def load_telemetry():
    """``bn_core::lockstep_mlp_telemetry``, or None when the kernel is not built.

    Everything a logged step measures of a lockstep MLP, from snapshots of its weights and
    gradients, in one call that holds no interpreter lock; see bn_core/background.py.
    """
    load()
    return _telemetry_op


def load_evaluation():
    """``bn_core::lockstep_mlp_evaluation``, or None when the kernel is not built.

    A lockstep MLP's test loss, accuracy and running-statistic errors from snapshots of
    its parameters and buffers, in one call that holds no interpreter lock.
    """
    load()
    return _evaluation_op


def status() -> str:
    """One line for users: which BatchNorm kernel runs, and why."""
    if load() is not None:
        return "compiled C++ kernel"
    return f"Python kernel (the compiled kernel is {_error})"
