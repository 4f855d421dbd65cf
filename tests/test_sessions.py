"""Two concurrent sessions of the real server: each trains its own run and sees only it.

The 8-session measurement is the same code run on demand (bench/sessions.py --sessions 8);
its numbers go in the release notes rather than in CI, where the machine is shared.
"""

from __future__ import annotations

import pytest

from bench.serve import CHROMIUM
from bench.sessions import run_sessions

pytest.importorskip("playwright.sync_api")
pytestmark = pytest.mark.browser


@pytest.mark.skipif(not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM}")
def test_two_sessions_train_independently_and_the_server_stays_up(artifacts_dir):
    result = run_sessions(2, 10.0, artifacts_dir / "streamlit_sessions_2.log")
    print("\n2 sessions:", {k: v for k, v in result.items() if k != "per_session"})
    assert result["failures"] == []
    assert result["health_checks"] >= 10 and result["health_failures"] == 0
    first, second = result["per_session"]
    assert first["variants"] == ["plain", "s0"] and second["variants"] == ["plain", "s1"]
    assert first["steps"] > 0 and second["steps"] > 0
    assert first["steps_per_s"] > 0 and second["steps_per_s"] > 0
    # config.toml turns Streamlit's source watcher off: with it on, the server watched
    # every folder of .venv (thousands) and stalled when the watch queue overflowed.
    assert result["server_inotify_watches"] == 0
