"""Shared fixtures for the app tests (AppTest) and the browser tests (a real server)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.serve import CHROMIUM, CHROMIUM_ARGS, streamlit_server

ROOT = Path(__file__).resolve().parent.parent
LONG_RUN_STEPS = int(os.environ.get("BN_LAB_LONG_RUN_STEPS", "100000"))


def _background_commands(out: Path) -> dict[str, list[str]]:
    """marker -> the command of the real run its tests read, writing JSON to ``out``."""
    return {
        # 100,000 steps (ten times the history's default cap of 1,000 points per series)
        # take about a minute on one core. The million-step soak is a benchmark:
        # ``python bench/long_run.py``.
        "long_run": [
            sys.executable,
            str(ROOT / "bench" / "long_run.py"),
            "--steps",
            str(LONG_RUN_STEPS),
            "--warmup",
            str(min(50_000, LONG_RUN_STEPS // 10)),
            "--json",
            str(out),
        ],
        # Every preset on seeds 0, 1 and 2 up to its claims' last step: about 90 s.
        "preset_claims": [
            sys.executable,
            str(ROOT / "tests" / "preset_claims.py"),
            "--json",
            str(out),
        ],
    }


_background_key = pytest.StashKey[dict[str, tuple[subprocess.Popen, Path]]]()


@pytest.hookimpl(trylast=True)  # after -m / -k deselection
def pytest_collection_modifyitems(session, config, items):
    """Start the long runs that some tests read (tests/test_long_run.py, the presets'
    claims in tests/test_claims.py) in background processes right away.

    Run alongside the rest of the suite, which uses one torch thread, they take the
    second core and cost little wall time. The tests that read them are moved to the end.
    """
    if config.option.collectonly:
        return
    started = {}
    for marker in ("preset_claims", "long_run"):
        waiting = [item for item in items if item.get_closest_marker(marker)]
        if not waiting:
            continue
        items[:] = [item for item in items if item not in waiting] + waiting
        out = ROOT / "artifacts" / f"{marker}.json"
        out.parent.mkdir(exist_ok=True)
        out.unlink(missing_ok=True)
        command = _background_commands(out)[marker]
        # At a low priority: they use the time the suite leaves idle (it runs on one
        # thread, but its browser tests want both cores), and still end long before the
        # tests that read them.
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            preexec_fn=lambda: os.nice(15),
        )
        started[marker] = (process, out)
    config.stash[_background_key] = started


def pytest_unconfigure(config):
    for process, _ in config.stash.get(_background_key, {}).values():
        if process.poll() is None:
            process.kill()


@pytest.fixture(scope="session")
def long_run(pytestconfig) -> tuple[subprocess.Popen, Path, int]:
    """The background long run: its process, the JSON file it writes, and its length."""
    process, out = pytestconfig.stash[_background_key]["long_run"]
    return process, out, LONG_RUN_STEPS


@pytest.fixture(scope="session")
def preset_claims(pytestconfig) -> dict:
    """Every preset's claims checked on its runs with seeds 0, 1 and 2 (tests/preset_claims.py),
    once the background process has written them: {preset: {seed: [result, ...]}}."""
    process, out = pytestconfig.stash[_background_key]["preset_claims"]
    output, _ = process.communicate(timeout=1700)
    assert process.returncode == 0, output
    return json.loads(out.read_text())


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
