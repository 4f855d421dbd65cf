"""Sharing and export in the real app: a Streamlit server and headless Chromium (Playwright).

Builds a teaching pack and downloads it the way a teacher would, opens its HTML figures
from disk with no network (the lone chart's HTML and the pack's, which share one
plotly.js), and opens shared links. The server and browser fixtures come from
tests/conftest.py.
"""

from __future__ import annotations

import io
import re
import time
import zipfile
from urllib.parse import parse_qs, urlparse

import pytest

from bn_core import export

sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser

STATUS_RE = re.compile(r"^step ([\d,]+) ·")
PLAY, STEP = re.compile(r"\bPlay$"), re.compile(r"\bStep$")
LOAD_MS = 90_000  # first page load: the server imports torch and builds a trainer
WAIT_MS = 60_000  # anything else the page should do (the machine may be busy)
EXPORT_MS = 240_000  # the teaching pack renders 24 images in one Chromium
# page_chart_variants_stepN.ext: fields of lower-case letters, digits, "." and "-".
NAME_RE = re.compile(r"[a-z0-9.-]+_[a-z0-9.-]+_[a-z0-9.-]+_step\d+\.[a-z]+")


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


def open_app(page, url: str) -> None:
    page.goto(url)
    page.get_by_role("button", name=PLAY).wait_for(timeout=LOAD_MS)
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 2")


def read_step(page) -> int:
    text = page.get_by_text(STATUS_RE).inner_text()
    return int(STATUS_RE.match(text).group(1).replace(",", ""))


def wait_for(predicate, timeout: float = WAIT_MS / 1000, interval: float = 0.1):
    """Poll until predicate() is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout} s"
        time.sleep(interval)


def query(page) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlparse(page.url).query).items()}


def sidebar(page):
    return page.locator('[data-testid="stSidebar"]')


def assert_draws_offline(browser, html_file) -> None:
    """Open an HTML figure from disk in a fresh tab that may fetch nothing from a network:
    plotly.js must come from the file itself or from a file beside it."""
    context = browser.new_context(offline=True)
    try:
        tab = context.new_page()
        fetched: list[str] = []
        tab.on("request", lambda request: fetched.append(request.url))
        tab.goto(html_file.as_uri())
        tab.wait_for_function(
            "window.Plotly && document.querySelector('.js-plotly-plot .main-svg')",
            timeout=WAIT_MS,
        )
        assert all(url.startswith("file:") for url in fetched), fetched
    finally:
        context.close()


def test_build_and_download_the_teaching_pack(server, page, browser, artifacts_dir, tmp_path):
    open_app(page, server)
    assert read_step(page) == 0
    for expected in (1, 2, 3):
        page.get_by_role("button", name=STEP).click()
        wait_for(lambda expected=expected: read_step(page) == expected)

    panel = page.locator('[data-testid="stExpander"]').filter(has_text="Export figures and data")
    panel.locator("summary").click()
    prepare = panel.get_by_role("button", name=re.compile(r"Prepare files$"))
    prepare.wait_for()
    downloads = panel.locator('[data-testid="stDownloadButton"]')
    assert downloads.count() == 0  # nothing prepared yet

    # One chart in every format.
    prepare.click()
    static_ok = export.static_export_available()[0]
    labels = ["HTML", "CSV"] + (["PNG", "SVG", "PDF"] if static_ok else [])
    for label in labels:
        downloads.filter(has_text=re.compile(rf"^{label}$")).wait_for(timeout=EXPORT_MS)
    # The lone chart's HTML stands alone: it embeds plotly.js.
    with page.expect_download(timeout=EXPORT_MS) as info:
        downloads.filter(has_text=re.compile(r"^HTML$")).click()
    lone = info.value
    assert NAME_RE.fullmatch(lone.suggested_filename), lone.suggested_filename
    assert lone.suggested_filename.startswith("live_loss-accuracy_plain-vs-batchnorm_step3")
    (tmp_path / "lone").mkdir()
    lone.save_as(tmp_path / "lone" / lone.suggested_filename)
    assert_draws_offline(browser, tmp_path / "lone" / lone.suggested_filename)

    # The teaching pack.
    panel.get_by_role("button", name=re.compile(r"Build teaching pack \(zip\)$")).click()
    pack_button = downloads.filter(has_text=re.compile(r"Download live_teaching-pack_.*\.zip"))
    pack_button.wait_for(timeout=EXPORT_MS)
    label = pack_button.inner_text()
    assert "plain-vs-batchnorm_step3.zip" in label and "MB)" in label

    page.wait_for_function("!document.querySelector('[data-stale=\"true\"]')")
    # No tooltip over the panel: the clicked button keeps focus (and its help tooltip).
    page.mouse.move(5, 5)
    page.evaluate("document.activeElement && document.activeElement.blur()")
    page.get_by_text("config.json and a README.txt").wait_for(state="hidden")
    panel.scroll_into_view_if_needed()
    panel.screenshot(path=artifacts_dir / "export_panel.png")

    with page.expect_download(timeout=EXPORT_MS) as info:
        pack_button.click()
    download = info.value
    assert download.suggested_filename == "live_teaching-pack_plain-vs-batchnorm_step3.zip"
    saved = tmp_path / download.suggested_filename
    download.save_as(saved)
    data = saved.read_bytes()
    assert data[:4] == b"PK\x03\x04"
    zf = zipfile.ZipFile(io.BytesIO(data))
    assert zf.testzip() is None
    names = set(zf.namelist())
    assert {"README.txt", "config.json", "metrics.csv"} <= names
    html = {n for n in names if n.startswith("figures/") and n.endswith(".html")}
    assert len(html) == len(export.SPEC_TITLES), sorted(names)
    for name in names - {"figures/plotly.min.js"}:
        if name.startswith("figures/"):
            assert NAME_RE.fullmatch(name.removeprefix("figures/")), name
    # The pack's HTML figures share figures/plotly.min.js and draw from it, offline.
    unpacked = tmp_path / "pack"
    zf.extractall(unpacked)
    for name in sorted(html)[:2]:
        assert_draws_offline(browser, unpacked / name)
    png = {n for n in names if n.startswith("figures/") and n.endswith(".png")}
    if static_ok:
        assert len(png) == len(export.SPEC_TITLES), sorted(names)
        for name in png:
            assert zf.read(name).startswith(b"\x89PNG\r\n\x1a\n"), name
    readme = zf.read("README.txt").decode("utf-8")
    assert readme.startswith("BatchNorm Lab teaching pack")


def test_a_shared_link_fills_the_sidebar(server, page):
    open_app(page, f"{server}/?preset=ioffe-fig1&depth=2&lr=0.2")
    assert sidebar(page).get_by_label("Hidden layers", exact=True).input_value() == "2"
    slider = sidebar(page).get_by_role("slider", name="Learning rate")
    assert slider.get_attribute("aria-valuetext") == "0.2"
    assert not page.locator('[data-testid="stAlertContentWarning"]').count()
    # The address bar still carries the set-up, so it can be passed on as it is.
    wait_for(lambda: query(page) == {"preset": "ioffe-fig1", "depth": "2", "lr": "0.2"})


def test_a_bad_link_warns_and_is_cleaned(server, page):
    open_app(page, f"{server}/?depth=99")
    warning = page.locator('[data-testid="stAlertContentWarning"]')
    warning.wait_for()
    assert warning.count() == 1
    text = warning.inner_text()
    assert "depth = 99" in text and "allowed" in text
    assert sidebar(page).get_by_label("Hidden layers", exact=True).input_value() == "3"
    wait_for(lambda: query(page) == {"preset": "ioffe-fig1"})
