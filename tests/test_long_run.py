"""100,000 steps headless with the default telemetry: bounded history, flat memory.

tests/conftest.py starts ``bench/long_run.py`` in a separate process when this file is
collected (a fresh process, so its RSS is the run's own, not pytest's), and runs these
tests last. BN_LAB_LONG_RUN_STEPS changes the length; the million-step soak is
``python bench/long_run.py --steps 1000000``, a benchmark.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.long_run


@pytest.fixture(scope="module")
def result(long_run) -> dict:
    process, out, steps = long_run
    output, _ = process.communicate(timeout=5400)
    assert process.returncode == 0, output
    print(output)  # the summary line, for the CI log
    found = json.loads(out.read_text())
    found["expected_steps"] = steps
    return found


@pytest.mark.timeout(5600)
def test_the_run_reaches_its_last_step(result):
    assert result["steps"] == result["expected_steps"]
    assert result["trace"][-1]["step"] == result["expected_steps"]


def test_history_stays_within_its_configured_bound(result):
    assert max(t["history_mb"] for t in result["trace"]) <= result["history_bound_mb"]
    assert result["series_points_max"] <= result["max_points"]
    if result["expected_steps"] >= 20 * result["max_points"]:  # logs every 10: it thinned
        # Thinning halves a series at most: the bound never comes from dropping it all.
        assert result["series_points_max"] >= result["max_points"] // 2


def test_process_memory_stays_flat_after_warm_up(result):
    assert result["rss_growth_mb"] <= 50.0
