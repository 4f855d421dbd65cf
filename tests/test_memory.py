"""The process keeps freed memory for reuse where glibc's malloc allows it."""

from __future__ import annotations

import platform
import sys

import pytest

from bn_core import memory


@pytest.fixture
def fresh(monkeypatch):
    """keep_freed_memory as if no Trainer had called it yet in this process."""
    monkeypatch.setattr(memory, "_done", None)


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt is Linux-with-glibc only",
)
def test_glibc_takes_both_thresholds(fresh):
    # mallopt returns 0 for a value it refuses (above the mmap threshold's ceiling, say);
    # True means glibc took both.
    assert memory.keep_freed_memory() is True
    assert memory.keep_freed_memory() is True  # once per process; later calls just report


def test_other_systems_are_left_alone(fresh, monkeypatch):
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    assert memory.keep_freed_memory() is False


def test_a_c_library_without_mallopt_is_left_alone(fresh, monkeypatch):
    class NoMallopt:
        def __init__(self, name):
            pass

    monkeypatch.setattr(memory.sys, "platform", "linux")
    monkeypatch.setattr(memory.ctypes, "CDLL", NoMallopt)
    assert memory.keep_freed_memory() is False


def test_a_refused_value_reports_false(fresh, monkeypatch):
    # mallopt answers 0 for a value it refuses; the function says so.
    calls = []

    class Refusing:
        def __init__(self, name):
            self.mallopt = self

        def __call__(self, parameter, value):
            calls.append((parameter, value))
            return 0

    monkeypatch.setattr(memory.sys, "platform", "linux")
    monkeypatch.setattr(memory.ctypes, "CDLL", Refusing)
    assert memory.keep_freed_memory() is False
    assert calls == [(memory._M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD)]
