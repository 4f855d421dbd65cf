"""What a reader sees of the look, in the real app and headless Chromium: charts that follow
the light or dark theme, no fading while a live page redraws, a phone-sized window, and the
keyboard (focus rings, no chart toolbar in the tab order, the charts' text alternative).

Screenshots go to artifacts/look_*.png. The logic behind these (the text alternative, the
theme settings) is tested in tests/test_look.py.
"""

from __future__ import annotations

import re
import time

import pytest

pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser

PLAY, PAUSE = re.compile(r"\bPlay$"), re.compile(r"\bPause$")
LOAD_MS = 90_000  # first page load: the server imports torch and builds a trainer
WAIT_MS = 30_000

PLOTS_JS = """Array.from(document.querySelectorAll('.js-plotly-plot'))
    .filter(p => p.getBoundingClientRect().width > 0)"""
# A colour's lightness, 0 (black) to 1 (white), from a computed "rgb(...)" value.
LIGHTNESS_JS = """const lightness = (c) => {
    const [r, g, b] = (c.match(/[\\d.]+/g) || [0, 0, 0]).map(Number);
    return (0.2126 * r + 0.7152 * g + 0.0722 * b) / 255;
};"""
# Per chart on screen: its background, its tick labels' colour and its lines' colours.
CHART_COLOURS_JS = f"""() => {{ {LIGHTNESS_JS}
    return {PLOTS_JS}.map(p => ({{
        background: lightness(getComputedStyle(p.querySelector('.main-svg')).backgroundColor),
        ticks: Math.min(...Array.from(p.querySelectorAll('.xtick text, .ytick text'))
            .map(t => lightness(getComputedStyle(t).fill))),
        lines: Array.from(p.querySelectorAll('.scatterlayer .js-line'))
            .map(l => getComputedStyle(l).stroke),
    }}));
}}"""
# Axis titles that lie over a panel's plot area (its own or a neighbour's): per chart.
AXIS_TITLES_OVER_PLOTS_JS = f"""() => {PLOTS_JS}.flatMap(p => {{
    const areas = Array.from(p.querySelectorAll('.nsewdrag'))
        .map(r => r.getBoundingClientRect());
    return Array.from(p.querySelectorAll('text[class*="title"]')).filter(t => {{
        const r = t.getBoundingClientRect();
        return !t.classList.contains('gtitle') && r.width > 0 && areas.some(a =>
            r.left < a.right && a.left < r.right && r.top < a.bottom && a.top < r.bottom);
    }}).map(t => t.textContent);
}})"""
# Step-axis tick labels that run into each other, or come closer than a space's width side
# by side (those of neighbouring panels): per chart, the pairs.
X_TICK_LABELS_TOUCHING_JS = f"""() => {PLOTS_JS}.flatMap(p => {{
    const labels = Array.from(p.querySelectorAll('.xaxislayer-above text'))
        .map(t => [t.textContent, t.getBoundingClientRect()])
        .filter(([, r]) => r.width > 0);
    const gap = 4;
    return labels.flatMap(([a, r], i) => labels.slice(i + 1).filter(([, s]) =>
        r.left < s.right + gap && s.left < r.right + gap
        && r.top < s.bottom - 1 && s.top < r.bottom - 1).map(([b]) => `${{a}} / ${{b}}`));
}})"""
DRAWN_JS = f"""(n) => {PLOTS_JS}.length >= n
    && {PLOTS_JS}.every(p => p.querySelector('.main-svg .cartesianlayer'))"""
OKABE_ORANGE, OKABE_BLUE = "rgb(230, 159, 0)", "rgb(0, 114, 178)"  # plain, batchnorm


def new_page(browser, **context_args):
    context = browser.new_context(**context_args)
    page = context.new_page()
    page.set_default_timeout(WAIT_MS)
    return context, page


def open_live(page, url: str, charts: int = 2) -> None:
    page.goto(url)
    page.get_by_role("button", name=PLAY).wait_for(timeout=LOAD_MS)
    page.wait_for_function(DRAWN_JS, arg=charts, timeout=LOAD_MS)


def test_charts_follow_the_light_or_dark_theme(server, browser, artifacts_dir):
    """Dark in the OS: dark charts, light text, the variants' colours unchanged; switching
    the OS back to light recolours the charts on the open page."""
    context, page = new_page(browser, viewport={"width": 1280, "height": 720}, color_scheme="dark")
    try:
        open_live(page, server)
        page.get_by_role("button", name="Step").click()  # lines to look at
        page.wait_for_function(f"() => {PLOTS_JS}[0].querySelector('.scatterlayer .js-line')")
        dark = page.evaluate(CHART_COLOURS_JS)
        assert all(c["background"] < 0.15 and c["ticks"] > 0.6 for c in dark), dark
        page.screenshot(path=artifacts_dir / "look_live_dark.png")

        page.emulate_media(color_scheme="light")
        page.wait_for_function(
            f"() => {{ {LIGHTNESS_JS} return {PLOTS_JS}.every(p =>"
            " lightness(getComputedStyle(p.querySelector('.main-svg')).backgroundColor) > 0.9); }"
        )
        # The background turns first; the tick labels follow when the chart redraws (a
        # chart in the middle of a redraw has no ticks for a moment).
        deadline = time.monotonic() + 10
        light = page.evaluate(CHART_COLOURS_JS)
        while not all(c["ticks"] < 0.5 for c in light) and time.monotonic() < deadline:
            page.wait_for_timeout(100)
            light = page.evaluate(CHART_COLOURS_JS)
        assert all(c["ticks"] < 0.5 for c in light), light
        for theme in (dark, light):
            assert {OKABE_ORANGE, OKABE_BLUE} <= set(theme[0]["lines"]), theme[0]["lines"]
        page.screenshot(path=artifacts_dir / "look_live_light.png")
    finally:
        context.close()


def test_phone_toolbars_clear_of_titles_and_no_sideways_scroll(server, browser, artifacts_dir):
    context, page = new_page(browser, viewport={"width": 390, "height": 844})
    try:
        open_live(page, server)
        page.locator(".js-plotly-plot").first.hover()  # the toolbar shows on hover
        covered = page.evaluate(
            f"""() => {PLOTS_JS}.flatMap(p => {{
                const bar = p.querySelector('.modebar').getBoundingClientRect();
                return Array.from(p.querySelectorAll('.gtitle')).filter(t => {{
                    const r = t.getBoundingClientRect();
                    return r.left < bar.right && bar.left < r.right
                        && r.top < bar.bottom && bar.top < r.bottom;
                }}).map(t => t.textContent);
            }})"""
        )
        assert covered == []
        widths = page.evaluate(
            """() => { const main = document.querySelector('[data-testid="stMain"]');
                return [document.documentElement.scrollWidth, window.innerWidth,
                        main.scrollWidth, main.clientWidth]; }"""
        )
        assert widths[0] <= widths[1] and widths[2] <= widths[3], widths
        page.screenshot(path=artifacts_dir / "look_live_phone.png")
    finally:
        context.close()


@pytest.mark.parametrize(("width", "height"), [(1280, 720), (390, 844)])
def test_axis_titles_stay_off_the_plots(server, browser, width, height):
    # Between two panels, an axis title can lie over the curves of its neighbour; at a
    # projector's width with the sidebar open, and on a phone, none may.
    context, page = new_page(browser, viewport={"width": width, "height": height})
    try:
        open_live(page, server)
        assert page.evaluate(AXIS_TITLES_OVER_PLOTS_JS) == []
    finally:
        context.close()


def test_tick_labels_of_neighbouring_panels_stay_apart(server, browser):
    # Small multiples put one panel's last step label next to the next panel's first. A
    # run of 1,050 steps ends its step axes just past 1000, the widest label at the right
    # edge; at a projector's width with the sidebar open, in every view, no two labels may
    # touch (a "1000" against the next panel's "0" reads "10000"). Five variants: the
    # per-layer charts have three panels in a row, as for any run, and the per-variant
    # ones (Fig. 1, Distributions) their most.
    context, page = new_page(browser, viewport={"width": 1280, "height": 720})
    try:
        open_live(page, f"{server}/?preset=normalizers&steps=1050")
        page.get_by_role("button", name=PLAY).click()
        page.get_by_text(re.compile(r"^step 1,050 · ")).wait_for(timeout=120_000)
        view = page.get_by_role("radiogroup", name="View")
        for name in (
            "Fig. 1 percentiles",
            "Distributions",
            "Saturation",
            "Gradient norms",
            "Update ratio",
        ):
            view.get_by_role("radio", name=name).click()
            page.wait_for_function(DRAWN_JS, arg=2)
            page.wait_for_function("() => !document.querySelector('[data-stale=\"true\"]')")
            assert page.evaluate(X_TICK_LABELS_TOUCHING_JS) == [], name
    finally:
        context.close()


# The focused element, and whether it (or the box it sits in) shows a ring.
FOCUSED_JS = """() => {
    const el = document.activeElement;
    const ring = (e) => { const s = getComputedStyle(e);
        return (s.outlineStyle !== 'none' && parseFloat(s.outlineWidth) >= 2)
            || s.boxShadow !== 'none'; };
    let shown = false;
    for (let e = el, up = 0; e && up < 4 && !shown; e = e.parentElement, up++) shown = ring(e);
    return {tag: el.tagName, testid: el.dataset.testid || '', ring: shown,
            toolbar: !!el.closest('.modebar'),
            sidebar: !!el.closest('[data-testid="stSidebarUserContent"]'),
            main: !!el.closest('[data-testid="stMain"]')};
}"""


def test_keyboard_focus_rings_no_toolbar_stops_and_text_alternatives(server, browser):
    context, page = new_page(browser, viewport={"width": 1280, "height": 720})
    try:
        open_live(page, server)
        # From the top of the page to the first control of the sidebar.
        page.locator("body").focus()
        stops = []
        for _ in range(40):
            page.keyboard.press("Tab")
            stops.append(page.evaluate(FOCUSED_JS))
            if stops[-1]["sidebar"]:
                break
        assert stops[-1]["sidebar"], stops
        assert any(s["testid"] == "stSidebarNavLink" for s in stops)
        # Then from Play to the end of the main area.
        page.get_by_role("button", name=PLAY).focus()
        for _ in range(60):
            page.keyboard.press("Tab")
            stops.append(page.evaluate(FOCUSED_JS))
            if not stops[-1]["main"]:
                break
        assert not any(s["toolbar"] for s in stops), stops
        unringed = [s for s in stops if not s["ring"] and s["tag"] not in ("BODY", "MAIN")]
        assert unringed == []

        # Every chart is one image to a screen reader, named by its title and numbers.
        labels = page.evaluate(
            f"""() => {PLOTS_JS}.map(p => [p.getAttribute('role'),
                p.getAttribute('aria-label') || '',
                JSON.parse(p.__figure).layout.title.text])"""
        )
        for role, label, title in labels:
            assert role == "img" and label.startswith(f"{title}: "), label
    finally:
        context.close()


# Every 50 ms: the lowest opacity of any element on the page, and whether any was stale.
SAMPLE_JS = """() => {
    const w = window.__fade = {samples: 0, stale: 0, lowest: 1};
    window.__fadeTimer = setInterval(() => {
        w.samples += 1;
        if (document.querySelector('[data-stale="true"]')) w.stale += 1;
        for (const el of document.querySelectorAll('[data-testid="stElementContainer"]')) {
            w.lowest = Math.min(w.lowest, +getComputedStyle(el).opacity);
        }
    }, 50);
}"""


def test_live_redraws_never_fade(server, browser, artifacts_dir):
    """While the ICS page plays (a fragment rerun every half second, slow to draw), nothing
    on the page dims, though Streamlit marks elements stale between their redraws."""
    context, page = new_page(browser, viewport={"width": 1280, "height": 720})
    try:
        open_live(page, server)
        page.get_by_role("link", name="Does BN reduce ICS?").click()
        page.wait_for_function(DRAWN_JS, arg=4, timeout=LOAD_MS)
        draws = f"() => {PLOTS_JS}.map(p => Number(p.dataset.draws || 0))"
        before = page.evaluate(draws)
        page.get_by_role("button", name=PLAY).click()
        page.evaluate(SAMPLE_JS)
        time.sleep(2)
        page.locator(".js-plotly-plot").nth(2).scroll_into_view_if_needed()
        page.screenshot(path=artifacts_dir / "look_ics_playing.png")
        time.sleep(1.5)
        fade = page.evaluate("() => { clearInterval(window.__fadeTimer); return window.__fade; }")
        after = page.evaluate(draws)
        page.get_by_role("button", name=PAUSE).click()
        assert fade["samples"] >= 10 and fade["stale"] > 0, fade  # it did rerun
        assert fade["lowest"] >= 0.99, fade
        assert sum(after) > sum(before), (before, after)
    finally:
        context.close()
