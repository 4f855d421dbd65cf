"""Shared fixtures for the app tests (AppTest) and the browser tests (a real server)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


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


@pytest.fixture
def one_torch_thread():
    """One torch thread, as the app uses per server: the test machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
