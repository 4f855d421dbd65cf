"""The Player in Chromium: Enter on Play keeps the focus, a burst of slider key presses
while training leaves one marker and nothing in the server's log, and the projector
layout (1280 x 720) shows both charts without scrolling, stacked on a phone.

Screenshots go to /tmp/shots/player_*.png; the latencies measured in the page go to
artifacts/player_latency.json (reported, with loose bounds only: the machine is shared).
"""

from __future__ import annotations

import json
import re
import statistics
import time
from pathlib import Path

import pytest
from test_browser import LOAD_MS, STATUS_RE, VISIBLE_PLOTS_JS, WAIT_MS, read_step, wait_for

sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser

SHOTS = Path("/tmp/shots")
PLAY_BUTTON = ".st-key-live_play button"
FOCUS_ON_PLAY_JS = """() => {
    const el = document.activeElement;
    return !!el && el.tagName === 'BUTTON' && !!el.closest('.st-key-live_play');
}"""
# In the page's own clock: each key press, and each change of the momentum slider's value.
KEYS_JS = """() => {
    window.__keys = [];
    window.__values = [];
    document.addEventListener('keydown', () => window.__keys.push(performance.now()), true);
    new MutationObserver(ms => {
        for (const m of ms) window.__values.push(performance.now());
    }).observe(document.querySelector('[data-testid="stSidebar"]'),
        {subtree: true, attributes: true, attributeFilter: ['aria-valuetext']});
}"""
# The live-change labels on each chart, with their boxes on screen.
LABELS_JS = f"""() => {VISIBLE_PLOTS_JS}.map(p =>
    Array.from(p.querySelectorAll('.annotation'))
        .filter(a => /→/.test(a.textContent))
        .map(a => {{ const r = a.getBoundingClientRect();
                     return [a.textContent, r.left, r.top, r.right, r.bottom]; }}))"""
X_RANGES_JS = f"() => {VISIBLE_PLOTS_JS}.map(p => p._fullLayout.xaxis.range)"
BOXES_JS = f"""() => {VISIBLE_PLOTS_JS}.map(p => {{
    const r = p.getBoundingClientRect(); return [r.left, r.top, r.right, r.bottom]; }})"""
# A momentum label's value in a frame from the server (chart JSON, escaped or not).
MOMENTUM_RE = re.compile(rb"momentum 0 (?:\\+u2192|\xe2\x86\x92) (0\.\d+)")


def open_live(browser, width: int, height: int):
    page = browser.new_context(viewport={"width": width, "height": height}).new_page()
    page.set_default_timeout(WAIT_MS)
    return page


def goto(page, url: str) -> None:
    page.goto(url)
    page.locator(PLAY_BUTTON).wait_for(timeout=LOAD_MS)
    page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length >= 2")


def overlapping(boxes: list[list]) -> list[tuple[str, str]]:
    pairs = []
    for i, (a, *ra) in enumerate(boxes):
        for b, *rb in boxes[i + 1 :]:
            if ra[0] < rb[2] and rb[0] < ra[2] and ra[1] < rb[3] and rb[1] < ra[3]:
                pairs.append((a, b))
    return pairs


def test_enter_on_play_keeps_the_focus_so_enter_again_pauses(server, browser):
    page = open_live(browser, 1280, 720)
    goto(page, server)
    page.locator(PLAY_BUTTON).focus()
    page.keyboard.press("Enter")
    page.get_by_role("button", name=re.compile(r"\bPause$")).wait_for()
    wait_for(lambda: read_step(page) > 0)
    assert page.evaluate(FOCUS_ON_PLAY_JS), "the Play button lost the focus"
    page.wait_for_timeout(700)  # a second press this soon would be taken for a repeat
    page.keyboard.press("Enter")
    page.get_by_role("button", name=re.compile(r"\bPlay$")).wait_for()
    assert page.evaluate(FOCUS_ON_PLAY_JS)
    assert "paused" in page.get_by_text(STATUS_RE).inner_text()
    page.context.close()


def test_a_key_burst_on_momentum_while_training_is_one_marker_and_no_error(
    server, browser, artifacts_dir
):
    page = open_live(browser, 1280, 720)
    frames: list[tuple[float, bytes]] = []
    page.on(
        "websocket",
        lambda ws: ws.on(
            "framereceived",
            lambda d: frames.append((time.monotonic(), d if isinstance(d, bytes) else d.encode())),
        ),
    )
    goto(page, server)
    page.evaluate(KEYS_JS)
    page.locator(PLAY_BUTTON).click()
    wait_for(lambda: read_step(page) >= 20)
    slider = page.locator('[data-testid="stSidebar"]').get_by_role("slider", name="SGD momentum")
    slider.focus()
    pressed = []  # (time, the value the press asks for)
    for i in range(1, 41):
        pressed.append((time.monotonic(), i / 100))
        page.keyboard.press("ArrowRight")
        page.wait_for_timeout(60)
    assert slider.get_attribute("aria-valuetext") == "0.40"

    def final_label_drawn() -> bool:
        # The last change reaches 0.4: "momentum 0 → 0.4" as one event, or, where a busy
        # server left half a second between two presses' arrivals, "momentum 0.3 → 0.4".
        return any(
            text.startswith("momentum") and re.search(r"→ 0\.4(?!\d)", text)
            for labels in page.evaluate(LABELS_JS)
            for text, *_ in labels
        )

    wait_for(final_label_drawn)
    labels = page.evaluate(LABELS_JS)
    # One change (or a very few), the first from 0, labels that never overlap, and step
    # axes that start at 0.
    momentum = {text for plot in labels for text, *_ in plot if text.startswith("momentum")}
    assert 1 <= len(momentum) <= 3, momentum
    assert any(text.startswith("momentum 0 → ") for text in momentum), momentum
    for plot in labels:
        assert overlapping(plot) == [], plot
    assert all(low >= -1e-9 for low, _ in page.evaluate(X_RANGES_JS))

    # Latencies: the slider's own answer in the page, and the server's (a frame whose
    # chart shows the value pressed for, or a later one).
    keys, values = page.evaluate("window.__keys"), page.evaluate("window.__values")
    thumb = [(next(v for v in values if v >= k) - k) / 1000 for k in keys]
    shown = [(t, float(m)) for t, d in frames for m in MOMENTUM_RE.findall(d)]
    server_answer = [
        next((t for t, value in shown if t >= at and value >= wanted - 1e-9), None)
        for at, wanted in pressed
    ]
    answered = [t - at for t, (at, _) in zip(server_answer, pressed, strict=True) if t is not None]
    metrics = {
        "presses": len(keys),
        "slider_answer_s": {
            "median": round(statistics.median(thumb), 4),
            "max": round(max(thumb), 4),
        },
        "server_chart_answer_s": {
            "median": round(statistics.median(answered), 3),
            "max": round(max(answered), 3),
        },
        "momentum_labels": sorted(momentum),
        "status_line": page.get_by_text(STATUS_RE).inner_text(),
    }
    (artifacts_dir / "player_latency.json").write_text(json.dumps(metrics, indent=2) + "\n")
    assert metrics["slider_answer_s"]["median"] < 0.2
    page.get_by_role("button", name=re.compile(r"\bPause$")).click()
    page.get_by_role("button", name=re.compile(r"\bPlay$")).wait_for()
    page.context.close()

    log = (artifacts_dir / "streamlit_test_browser_player.log").read_text()
    assert not re.search(r"Traceback|Error|Exception", log), log[-3000:]


def test_projector_layout_shows_both_charts_and_a_phone_stacks_them(server, browser):
    SHOTS.mkdir(exist_ok=True)
    page = open_live(browser, 1280, 720)
    goto(page, server)
    page.locator(PLAY_BUTTON).click()
    wait_for(lambda: read_step(page) >= 150)

    def both_in_view(name: str) -> None:
        page.wait_for_function(f"{VISIBLE_PLOTS_JS}.length >= 2")
        (l1, t1, r1, b1), (l2, t2, r2, b2) = page.evaluate(BOXES_JS)[:2]
        assert abs(t1 - t2) < 2 and r1 <= l2, "not side by side"
        assert max(b1, b2) <= 720 and max(r1, r2) <= 1280, f"{name}: scrolls"
        page.screenshot(path=SHOTS / f"player_{name}.png")

    both_in_view("live_1280x720")
    view = page.get_by_role("radiogroup", name="View")
    view.get_by_role("radio", name="Saturation").click()
    page.wait_for_function(
        "(t) => Array.from(document.querySelectorAll('.js-plotly-plot .gtitle'))"
        ".some(e => e.textContent.includes(t))",
        arg="Saturated sigmoid",
    )
    both_in_view("saturation_1280x720")
    # The sidebar folds away; the charts then get its room.
    width_before = page.evaluate(BOXES_JS)[0][2] - page.evaluate(BOXES_JS)[0][0]
    page.locator('[data-testid="stSidebar"]').hover()  # the button shows on hover
    page.get_by_role("button", name="Collapse sidebar").click()
    wait_for(lambda: page.evaluate(BOXES_JS)[0][2] - page.evaluate(BOXES_JS)[0][0] > width_before)
    both_in_view("saturation_1280x720_sidebar_folded")
    page.get_by_role("button", name=re.compile(r"\bPause$")).click()
    page.context.close()

    phone = open_live(browser, 390, 844)
    goto(phone, server)
    phone.locator(PLAY_BUTTON).click()
    wait_for(lambda: read_step(phone) >= 100)
    (_, _, _, loss_bottom), (_, view_top, _, _) = phone.evaluate(BOXES_JS)[:2]
    assert view_top >= loss_bottom, "not stacked on a phone"
    phone.screenshot(path=SHOTS / "player_live_390x844.png")
    phone.get_by_role("button", name=re.compile(r"\bPause$")).click()
    phone.context.close()
