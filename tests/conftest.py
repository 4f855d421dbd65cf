"""Shared fixtures for the app tests (AppTest) and the browser tests (a real server)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.serve import CHROMIUM, CHROMIUM_ARGS, streamlit_server

ROOT = Path(__file__).resolve().parent.parent
LONG_RUN_STEPS = int(os.environ.get("BN_LAB_LONG_RUN_STEPS", "100000"))
_long_run_key = pytest.StashKey[tuple[subprocess.Popen, Path, int]]()


@pytest.hookimpl(trylast=True)  # after -m / -k deselection
def pytest_collection_modifyitems(session, config, items):
    """Start the long headless run (tests/test_long_run.py) in the background right away.

    100,000 steps (ten times the history's default cap of 1,000 points per series) take
    about a minute on one core; run alongside the rest of the suite (which uses one torch
    thread), they cost little wall time. The tests that read the result are moved to the
    end. The million-step soak is a benchmark: ``python bench/long_run.py``.
    """
    waiting = [item for item in items if item.get_closest_marker("long_run")]
    if not waiting or config.option.collectonly:
        return
    items[:] = [item for item in items if item not in waiting] + waiting
    out = ROOT / "artifacts" / "long_run.json"
    out.parent.mkdir(exist_ok=True)
    out.unlink(missing_ok=True)
    command = [
        sys.executable,
        str(ROOT / "bench" / "long_run.py"),
        "--steps",
        str(LONG_RUN_STEPS),
        "--warmup",
        str(min(50_000, LONG_RUN_STEPS // 10)),
        "--json",
        str(out),
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    config.stash[_long_run_key] = (process, out, LONG_RUN_STEPS)


def pytest_unconfigure(config):
    started = config.stash.get(_long_run_key, None)
    if started is not None and started[0].poll() is None:
        started[0].kill()


@pytest.fixture(scope="session")
def long_run(pytestconfig) -> tuple[subprocess.Popen, Path, int]:
    """The background long run: its process, the JSON file it writes, and its length."""
    return pytestconfig.stash[_long_run_key]


@pytest.fixture(scope="session")
def app_path() -> Path:
    """The Streamlit entry point."""
    return ROOT / "app.py"


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Where tests leave screenshots and metrics for people to look at (gitignored)."""
    path = ROOT / "artifacts"
    path.mkdir(exist_ok=True)
    return path


@contextlib.contextmanager
def _torch_threads(n: int):
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_torch_thread():
    """One torch thread, as the app uses per server: the test machine's cores are shared."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_torch_thread_for_module():
    """The same, for module-scoped fixtures that train."""
    with _torch_threads(1):
        yield


# --- the real app, for the browser tests -----------------------------------------------------


@pytest.fixture(scope="module")
def server(request, artifacts_dir) -> str:
    """`streamlit run app.py` on a free loopback port, one per test module (so it stops
    when the module is done); the log goes to artifacts/streamlit_<module>.log."""
    log = artifacts_dir / f"streamlit_{Path(request.module.__file__).stem}.log"
    with streamlit_server(log) as running:
        yield running.url


@pytest.fixture(scope="module")
def browser():
    """Headless Chromium: Debian's, since Playwright's own download is not available."""
    sync_api = pytest.importorskip("playwright.sync_api")
    if not CHROMIUM.exists():
        pytest.skip(f"no Chromium at {CHROMIUM}")
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()
