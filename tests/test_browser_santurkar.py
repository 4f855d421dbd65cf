"""The Santurkar et al. pages in the real app: a Streamlit server and headless Chromium.

Opens "Does BN reduce ICS?" from the sidebar, plays it until the ICS chart has data, and
runs a short learning-rate sweep to the end; screenshots go to artifacts/. The server and
browser fixtures come from tests/conftest.py.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser

ICS_STATUS_RE = re.compile(r"^step ([\d,]+) ·")
SWEEP_STATUS_RE = re.compile(r"^Sweep (running|stopped|finished): ([\d,]+) of ([\d,]+) ")
PLAY, PAUSE = re.compile(r"\bPlay$"), re.compile(r"\bPause$")
START = re.compile(r"\bStart sweep$")
ICS_TITLE = "Does BN reduce internal covariate shift?"
ICS_CHART_TITLE = "Internal covariate shift per layer"
SWEEP_CHART_TITLE = "Final loss and accuracy against the learning rate"
ICS_PLOTS, SWEEP_PLOTS = 5, 1
LOAD_MS = 90_000  # first page load: the server imports torch and builds a trainer
WAIT_MS = 60_000  # anything else the page should do (the machine may be busy)
SWEEP_S = 120  # a short sweep, start to finish

# Plotly charts that are on screen (a rerun may leave a hidden 0x0 copy for a moment).
VISIBLE_PLOTS_JS = """Array.from(document.querySelectorAll('.js-plotly-plot'))
    .filter(p => p.getBoundingClientRect().width > 0)"""
# A keyed chart (ui.charts keys it "chart_<page>_<name>") has drawn a trace with points.
CHART_HAS_DATA_JS = """(key) => {
    const gd = document.querySelector(`.st-key-${key} .js-plotly-plot`);
    return !!(gd && gd._fullData && gd._fullData.some(t => t.y && t.y.length > 0));
}"""
PLOT_TEXT_JS = """(needle) => Array.from(document.querySelectorAll('.js-plotly-plot text'))
    .some(t => (t.textContent || '').includes(needle))"""
# Ready for a screenshot: the charts drawn and fitted to the window, none faded as stale,
# and the sidebar fully open or fully closed (not sliding).
SETTLED_JS = f"""(count) => {{
    const plots = {VISIBLE_PLOTS_JS};
    const sidebar = document.querySelector('[data-testid="stSidebar"]');
    const edge = sidebar.getBoundingClientRect();
    return plots.length >= count
        && plots.every(p => p.getBoundingClientRect().right <= window.innerWidth
            && p.querySelector('.main-svg .cartesianlayer'))
        && !document.querySelector('[data-stale="true"]')
        && (edge.left >= 0 || edge.right <= 0)
        && sidebar.getAnimations({{subtree: true}}).length === 0;
}}"""
NEXT_FRAME_JS = "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))"


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


def wait_for(predicate, timeout: float = WAIT_MS / 1000, interval: float = 0.1):
    """Poll until predicate() is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s"
        time.sleep(interval)


def sidebar(page):
    return page.locator('[data-testid="stSidebar"]')


def progress_text(page) -> str:
    return page.locator('[data-testid="stProgress"]').inner_text().strip()


def read_step(page) -> int:
    match = ICS_STATUS_RE.match(progress_text(page))
    assert match, progress_text(page)
    return int(match.group(1).replace(",", ""))


def assert_no_traceback(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0
    assert "Traceback" not in page.locator("body").inner_text()


def open_ics(page) -> None:
    """The ICS page as loaded: its title, Play, every chart and the run at step 0."""
    page.get_by_role("heading", name=ICS_TITLE).wait_for(timeout=LOAD_MS)
    page.get_by_role("button", name=PLAY).wait_for(timeout=LOAD_MS)
    page.wait_for_function(f"{VISIBLE_PLOTS_JS}.length >= {ICS_PLOTS}")
    wait_for(lambda: page.locator('[data-testid="stProgress"]').count() == 1)
    assert read_step(page) == 0


def play_until(page, steps: int) -> list[int]:
    """Press Play and watch the progress text until the run passes `steps`; the steps seen."""
    page.get_by_role("button", name=PLAY).click()
    page.get_by_role("button", name=PAUSE).wait_for()
    seen = [read_step(page)]

    def grown() -> bool:
        step = read_step(page)
        if step != seen[-1]:
            seen.append(step)
        return step >= steps

    wait_for(grown, interval=0.2)
    return seen


def pause(page) -> int:
    """Press Pause and wait until the step stands still for 2 s; that step."""
    page.get_by_role("button", name=PAUSE).click()
    page.get_by_role("button", name=PLAY).wait_for()
    last, since = read_step(page), time.monotonic()
    while time.monotonic() - since < 2.0:
        time.sleep(0.2)
        step = read_step(page)
        if step != last:
            last, since = step, time.monotonic()
        assert time.monotonic() - since < WAIT_MS / 1000
    assert progress_text(page).startswith(f"step {last:,} · paused · ")
    return last


def screenshots(page, directory: Path, name: str, width: int, height: int, plots: int) -> None:
    """<name>.png: the window as a newcomer sees it; <name>_full.png: all of the main area.

    Streamlit scrolls its main area inside the page, so a "full page" shot is taken by
    making the window as tall as that area's content.
    """
    page.set_viewport_size({"width": width, "height": height})
    page.wait_for_function(SETTLED_JS, arg=plots)
    page.screenshot(path=directory / f"{name}.png")
    full = page.evaluate("document.querySelector('[data-testid=\"stMain\"]').scrollHeight")
    page.set_viewport_size({"width": width, "height": max(height, full)})
    page.wait_for_function(SETTLED_JS, arg=plots)
    page.evaluate(NEXT_FRAME_JS)
    page.screenshot(path=directory / f"{name}_full.png", full_page=True)
    page.set_viewport_size({"width": width, "height": height})


def test_ics_page_plays_and_draws_the_ics_chart(server, browser, page, artifacts_dir):
    page.goto(server)
    page.get_by_role("button", name=PLAY).wait_for(timeout=LOAD_MS)  # Live training
    sidebar(page).get_by_role("link", name="Does BN reduce ICS?").click()
    open_ics(page)
    assert page.url.endswith("/ics_question")

    seen = play_until(page, 30)
    assert seen == sorted(seen) and len(seen) >= 2, seen
    page.wait_for_function(CHART_HAS_DATA_JS, arg="chart_ics_ics_l2")
    page.wait_for_function(CHART_HAS_DATA_JS, arg="chart_ics_landscape")
    page.wait_for_function(PLOT_TEXT_JS, arg=ICS_CHART_TITLE)
    # The claims table and the three sections are on the page.
    main = page.locator('[data-testid="stMain"]')
    table = main.locator('[data-testid="stDataFrame"]')
    table.first.wait_for()  # a lazily loaded component, like every table
    assert table.count() == 1
    for heading in ("1 · Stable distributions", "2 · Internal covariate shift", "3 · Smooth"):
        assert main.get_by_role("heading", name=re.compile(re.escape(heading))).count() == 1
    assert_no_traceback(page)

    step = pause(page)
    assert step >= 30
    screenshots(page, artifacts_dir, "ics_desktop_1400x1000", 1400, 1000, ICS_PLOTS)

    # A phone-sized window of its own (a new session), straight to the page's address.
    phone = browser.new_context(viewport={"width": 420, "height": 900}).new_page()
    phone.set_default_timeout(WAIT_MS)
    phone.goto(f"{server}/ics_question")
    open_ics(phone)  # its own run, not the desktop one
    play_until(phone, 20)
    phone.wait_for_function(CHART_HAS_DATA_JS, arg="chart_ics_ics_l2")
    pause(phone)
    assert_no_traceback(phone)
    screenshots(phone, artifacts_dir, "ics_narrow_420x900", 420, 900, ICS_PLOTS)
    phone.context.close()


def test_sweep_page_runs_a_short_sweep(server, page, artifacts_dir):
    page.goto(server)
    page.get_by_role("button", name=PLAY).wait_for(timeout=LOAD_MS)  # Live training
    sidebar(page).get_by_role("link", name="Learning-rate sweep").click()
    page.get_by_role("heading", name="Learning-rate sweep").wait_for(timeout=LOAD_MS)
    page.get_by_text("press Start sweep").wait_for()
    assert page.url.endswith("/lr_sweep")

    # 6 rates (the default) of 100 steps: two lockstep runs of 100 steps each.
    steps = page.get_by_label("Steps each")
    steps.fill("100")
    steps.press("Enter")
    wait_for(lambda: steps.input_value() == "100")
    page.wait_for_function("!document.querySelector('[data-stale=\"true\"]')")
    page.get_by_role("button", name=START).click()
    status = page.locator('[data-testid="stProgress"]')
    status.wait_for()
    wait_for(lambda: progress_text(page).startswith("Sweep finished"), timeout=SWEEP_S)
    match = SWEEP_STATUS_RE.match(progress_text(page))
    assert match and match.groups() == ("finished", "200", "200"), progress_text(page)
    assert "12 nets of 100 steps" in progress_text(page)

    page.wait_for_function(PLOT_TEXT_JS, arg=SWEEP_CHART_TITLE)
    page.wait_for_function(CHART_HAS_DATA_JS, arg="chart_sweep_lr_sweep")
    # .first: while a redrawn chart replaces the old one, both are briefly in the page.
    title = page.locator(".st-key-chart_sweep_lr_sweep .gtitle").first
    assert SWEEP_CHART_TITLE in title.text_content() and title.is_visible()
    metrics = page.locator('[data-testid="stMetricLabel"]').all_inner_texts()
    assert [m.strip() for m in metrics] == [
        "Usable learning rates, plain",
        "Usable learning rates, batchnorm",
    ]
    table = page.locator('[data-testid="stDataFrame"]')
    table.first.wait_for()  # the grid loads lazily: it can appear after the chart
    assert table.count() == 1
    assert page.get_by_role("button", name=START).is_enabled()
    assert_no_traceback(page)
    screenshots(page, artifacts_dir, "sweep_desktop_1400x1000", 1400, 1000, SWEEP_PLOTS)
