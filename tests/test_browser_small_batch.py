"""The "Small batches and inference" page in the real app: a Streamlit server and headless
Chromium open the page's own URL first, run a short study to the end and draw its chart; a
screenshot goes to artifacts/. The server and browser fixtures come from tests/conftest.py."""

from __future__ import annotations

import re
import time

import pytest

sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser

TITLE = "Small batches and inference"
CHART_TITLE = "Test accuracy and BN's running statistics against the batch size"
CHART_KEY = "chart_small-batches_small_batch"
START = re.compile(r"\bStart study$")
LOAD_MS = 90_000  # first page load: the server imports torch
WAIT_MS = 60_000
STUDY_S = 240  # six runs of 100 steps, start to finish, on a busy machine

# The keyed chart has drawn a line with points, and its title is in the plot.
CHART_DRAWN_JS = """([key, title]) => {
    const gd = document.querySelector(`.st-key-${key} .js-plotly-plot`);
    if (!gd || !gd._fullData) return false;
    const lines = gd._fullData.filter(t => t.y && t.y.length > 0);
    const texts = Array.from(gd.querySelectorAll('text')).map(t => t.textContent || '');
    return lines.length >= 5 && texts.some(t => t.includes(title));
}"""


def wait_for(predicate, timeout: float, interval: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out after {timeout} s"
        time.sleep(interval)
    return value


def progress_text(page) -> str:
    bar = page.locator('[data-testid="stProgress"]')
    return bar.inner_text().strip() if bar.count() == 1 else ""


def test_small_batch_page_runs_a_short_study(server, browser, artifacts_dir):
    page = browser.new_context(viewport={"width": 1440, "height": 900}).new_page()
    page.set_default_timeout(WAIT_MS)
    # The module's server is fresh and this is its first request, as with a bookmark or a
    # shared link opened after a restart: the page must still run inside app.py (its
    # title, sidebar and named navigation), not as a lone file of pages/ (ui/routing.py).
    page.goto(f"{server}/small_batches")
    page.get_by_role("heading", name=TITLE).wait_for(timeout=LOAD_MS)
    page.get_by_text("press Start study").wait_for()
    assert page.title() == "BatchNorm Lab"
    nav = page.get_by_test_id("stSidebarNav").inner_text()
    assert "Small batches and inference" in nav and "Learning-rate sweep" in nav, nav
    assert page.get_by_text("See internal covariate shift").is_visible()

    steps = page.get_by_role("spinbutton", name="Steps per batch size")
    steps.fill("100")
    steps.press("Enter")
    wait_for(lambda: steps.input_value() == "100", timeout=WAIT_MS / 1000)
    page.wait_for_function("!document.querySelector('[data-stale=\"true\"]')")
    page.get_by_role("button", name=START).click()
    wait_for(lambda: progress_text(page).startswith("Study finished"), timeout=STUDY_S)
    assert progress_text(page).startswith("Study finished: 600 of 600 steps")

    page.wait_for_function(CHART_DRAWN_JS, arg=[CHART_KEY, CHART_TITLE])
    table = page.locator('[data-testid="stDataFrame"]')
    table.first.wait_for()  # the grid loads lazily
    assert table.count() == 1
    main = page.locator('[data-testid="stMain"]')
    assert main.get_by_role("heading", name="What happens at batch 1").count() == 1
    assert "batch_size = 1: allowed:" in main.inner_text()
    assert page.get_by_role("button", name=START).is_enabled()
    assert page.locator('[data-testid="stException"]').count() == 0
    assert "Traceback" not in page.locator("body").inner_text()
    page.screenshot(path=artifacts_dir / "small_batches_desktop_1440x900.png")
    page.context.close()
