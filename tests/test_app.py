"""The Live training page through Streamlit's AppTest: rendering, set-up vs live widgets,
Step/Play/Reset, live-change markers, bad set-ups and per-session trainers."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from chart_elements import figure_specs
from streamlit.testing.v1 import AppTest

from bn_core import figures

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# The page's "View" segmented control: option -> the charts (bn_core.figures.CHARTS keys).
VIEWS = {
    "Fig. 1 percentiles": ["percentile_bands"],
    "Distributions": ["preact_heatmaps", "histogram_overlay"],
    "Saturation": ["saturation"],
    "Gradient norms": ["grad_norms"],
    "Update ratio": ["update_ratio"],
}
STATUS_RE = re.compile(r"^\*\*step ([\d,]+) ·")


# --- helpers -----------------------------------------------------------------------------
def run(target) -> AppTest:
    """Run the script (after a widget interaction, if given one) and check it raised nothing."""
    at = target.run()  # AppTest.run and a widget's run both return the AppTest
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture
def at(app_path) -> AppTest:
    return run(AppTest.from_file(str(app_path), default_timeout=60))


def status_step(at: AppTest) -> int:
    """The step count shown in the status line above the charts."""
    for md in at.main.markdown:
        match = STATUS_RE.match(md.value)
        if match:
            return int(match.group(1).replace(",", ""))
    raise AssertionError(f"no status line in {[md.value for md in at.main.markdown]}")


def button(at: AppTest, label: str):
    found = [b for b in at.button if b.label == label]
    assert len(found) == 1, f"button {label!r}: {[b.label for b in at.button]}"
    return found[0]


def widget(widgets, label: str):
    found = [w for w in widgets if w.label == label]
    assert len(found) == 1, f"widget {label!r}: {[w.label for w in widgets]}"
    return found[0]


def charts(at: AppTest) -> dict[str, dict]:
    """The plotly figures on the page by chart name, as the JSON the browser gets.

    ui.charts.show_chart keys each chart "chart_live_<name>" (bn_core.figures.CHARTS keys).
    """
    out = figure_specs(at, "chart_live_")
    for name in out:
        assert name in figures.CHARTS, name
    return out


def chart(at: AppTest, key: str) -> dict:
    found = charts(at)
    assert key in found, f"chart {key!r} not among {list(found)}"
    return found[key]


def annotation_texts(fig: dict) -> list[str]:
    return [a.get("text", "") for a in fig["layout"].get("annotations", [])]


def texts(elements) -> str:
    return "\n".join(str(e.value) for e in elements)


# --- rendering -----------------------------------------------------------------------------
def test_page_renders_at_step_zero(at):
    assert status_step(at) == 0
    assert at.session_state.trainer.step == 0
    labels = [b.label for b in at.button]
    for label in ("Play", "Step", "Reset"):
        assert label in labels
    assert not at.error and not at.warning
    chart(at, "loss_accuracy")
    chart(at, "percentile_bands")  # the default view


@pytest.mark.parametrize("trained", [False, True], ids=["empty", "trained"])
def test_every_view_renders_a_chart(at, trained):
    if trained:  # some telemetry, so the figures draw lines and heat maps, not "no data yet"
        at.session_state.trainer.advance(steps=41)
        run(at)
    view = at.button_group(key="w_view")
    assert view.options == list(VIEWS)
    for name, keys in VIEWS.items():
        run(at.button_group(key="w_view").set_value(name))
        assert at.button_group(key="w_view").value == name
        chart(at, "loss_accuracy")
        for key in keys:
            fig = chart(at, key)
            assert fig["data"], f"{name}: {key} has no traces"
        assert sorted(charts(at)) == sorted(["loss_accuracy", *keys])


# --- set-up widgets wait for Reset ---------------------------------------------------------------
def test_setup_change_waits_for_reset_then_applies(at):
    run(button(at, "Step").click())
    run(button(at, "Step").click())
    old = at.session_state.trainer
    assert old.step == 2

    run(widget(at.sidebar.number_input, "Hidden layers").set_value(2))
    assert at.session_state.trainer is old and status_step(at) == 2
    assert len(at.warning) == 1
    assert "depth" in at.warning[0].value and "Reset" in at.warning[0].value

    run(widget(at.sidebar.selectbox, "Data set").set_value("moons"))
    warning = at.warning[0].value
    assert "depth" in warning and "dataset" in warning
    assert at.session_state.trainer is old and status_step(at) == 2

    run(button(at, "Reset").click())
    new = at.session_state.trainer
    assert new is not old
    assert (new.config.depth, new.config.dataset) == (2, "moons")
    assert new.step == 0 and status_step(at) == 0
    assert not at.warning and not at.error
    assert "fresh run" in texts(at.success)
    # The new run's charts render, including per-layer pickers built for the old depth.
    for name in VIEWS:
        run(at.button_group(key="w_view").set_value(name))


def test_fewer_layers_after_reset_with_last_layer_picked(at):
    """The Layer pickers keep their key across a Reset that removes the picked layer."""
    at.session_state.trainer.advance(steps=11)
    run(at)
    layers = at.selectbox(key="w_layer").options
    run(at.selectbox(key="w_layer").set_value(layers[-1]))
    run(widget(at.sidebar.number_input, "Hidden layers").set_value(1))
    run(button(at, "Reset").click())
    assert at.session_state.trainer.config.depth == 1
    assert len(at.selectbox(key="w_layer").options) == 1
    chart(at, "percentile_bands")


# --- Step, Play, live changes, Reset -----------------------------------------------------------
def test_step_advances_by_exactly_one(at):
    for expected in (1, 2, 3):
        run(button(at, "Step").click())
        assert status_step(at) == expected
        assert at.session_state.trainer.step == expected
    assert at.session_state.playing is False


def test_play_sets_playing_and_trains(at):
    run(button(at, "Play").click())
    assert at.session_state.playing is True
    # In AppTest the fragment runs once per script run, training ~0.12 s.
    assert at.session_state.trainer.step > 0
    assert "Pause" in [b.label for b in at.button]
    run(button(at, "Pause").click())
    assert at.session_state.playing is False
    assert "Play" in [b.label for b in at.button]


def test_pause_click_delivered_twice_stays_paused(at):
    """One Pause click that reaches the server twice must still leave the run paused.

    In the browser, while the fragment reruns every 0.2 s, a single Pause click is now and
    then handled twice (server log: playing True -> False, then False -> True 0.5 s later at
    the same step), so the run silently keeps playing. Here the click is delivered twice by
    re-sending the widget states of the page it was made on. Fails while the button's
    callback toggles instead of setting the state the label promised.
    """
    run(button(at, "Play").click())
    pause = button(at, "Pause")
    run(pause.click())
    assert at.session_state.playing is False
    run(pause.click())  # the same click again, from the page that showed "Pause"
    assert at.session_state.playing is False, "a repeated Pause click restarted the run"
    assert "Play" in [b.label for b in at.button]


def test_lr_change_records_event_and_marker(at):
    run(button(at, "Play").click())
    trainer = at.session_state.trainer
    step = trainer.step
    assert step > 0
    lr = widget(at.sidebar.select_slider, "Learning rate")
    assert lr.value == 0.5
    run(lr.set_value(1.0))
    assert at.session_state.trainer is trainer  # a live change never resets the run
    events = trainer.history.events
    assert len(events) == 1
    event = events[0]
    assert (event.name, event.old, event.new) == ("lr", 0.5, 1.0)
    assert event.step >= step
    assert trainer.live["lr"] == 1.0
    assert "lr 0.5 → 1" in annotation_texts(chart(at, "loss_accuracy"))
    assert not at.warning  # live settings are not set-up changes


def test_reset_clears_the_run(at):
    run(button(at, "Step").click())
    run(widget(at.sidebar.select_slider, "Learning rate").set_value(1.0))
    run(button(at, "Step").click())
    old = at.session_state.trainer
    assert old.step == 2 and len(old.history.events) == 1

    run(button(at, "Reset").click())
    new = at.session_state.trainer
    assert new is not old
    assert new.step == 0 and status_step(at) == 0
    assert new.history.events == []
    assert new.config.lr == 1.0  # the live widgets seed the new run
    assert not any("→" in t for t in annotation_texts(chart(at, "loss_accuracy")))
    assert at.session_state.playing is False


# --- bad set-ups keep the running trainer ----------------------------------------------------
def test_batch_size_one_with_bn_is_an_error_and_disables_reset(at):
    run(button(at, "Step").click())
    trainer = at.session_state.trainer
    run(widget(at.sidebar.number_input, "Batch size").set_value(1))
    assert len(at.error) == 1 and "batch_size" in at.error[0].value
    assert button(at, "Reset").disabled
    assert at.session_state.trainer is trainer and trainer.step == 1 and status_step(at) == 1
    run(button(at, "Step").click())  # the current run goes on
    assert at.session_state.trainer is trainer and status_step(at) == 2
    # Removing the BN variants makes batch size 1 valid again.
    run(widget(at.sidebar.multiselect, "Variants").set_value(["plain"]))
    assert not at.error and not button(at, "Reset").disabled
    assert "batch_size" in at.warning[0].value


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA GPU")
def test_unavailable_device_keeps_the_old_run(at):
    run(button(at, "Step").click())
    trainer = at.session_state.trainer
    run(widget(at.sidebar.selectbox, "Device").set_value("cuda"))
    assert "device" in at.warning[0].value  # a valid config; the machine decides on Reset
    run(button(at, "Reset").click())
    assert len(at.error) == 1
    assert "device" in at.error[0].value and "kept" in at.error[0].value
    assert at.session_state.trainer is trainer and trainer.step == 1 and status_step(at) == 1
    run(button(at, "Step").click())
    assert at.session_state.trainer is trainer and status_step(at) == 2
    assert not at.error  # the message is shown once


# --- sessions ----------------------------------------------------------------------------------
def test_two_sessions_have_independent_trainers(app_path):
    one = run(AppTest.from_file(str(app_path), default_timeout=60))
    two = run(AppTest.from_file(str(app_path), default_timeout=60))
    assert one.session_state.trainer is not two.session_state.trainer
    run(button(one, "Step").click())
    run(button(one, "Step").click())
    run(two)
    assert status_step(one) == 2 and status_step(two) == 0
    assert two.session_state.trainer.step == 0
    run(widget(two.sidebar.select_slider, "Learning rate").set_value(2.0))
    run(one)
    assert one.session_state.trainer.live["lr"] == 0.5
    assert one.session_state.trainer.history.events == []


# --- how charts reach the browser ---------------------------------------------------------
@pytest.fixture
def fresh_static(tmp_path, monkeypatch):
    """ui.charts copying plotly.js into an empty static folder of the test's own."""
    from ui import charts as ui_charts

    monkeypatch.setattr(ui_charts, "STATIC_DIR", tmp_path / "static")
    ui_charts.plotly_js_src.cache_clear()
    yield ui_charts
    ui_charts.plotly_js_src.cache_clear()


def test_plotly_js_is_copied_once_into_the_static_folder(fresh_static):
    import plotly

    stale = fresh_static.STATIC_DIR / "plotly-0.0.1.min.js"  # an older plotly's copy
    stale.parent.mkdir(parents=True)
    stale.write_text("old")
    # Sessions start in threads of their own: all of them starting at once get the copy.
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: fresh_static.plotly_js_src(), range(8)))
    assert answers == [f"app/static/{fresh_static.PLOTLY_JS}"] * 8
    copied = fresh_static.STATIC_DIR / fresh_static.PLOTLY_JS
    package_js = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert copied.read_bytes() == package_js.read_bytes()
    # Nothing else is served from there: no temporary file, no older version.
    assert [p.name for p in fresh_static.STATIC_DIR.iterdir()] == [copied.name]
    copied_at = copied.stat().st_mtime_ns
    fresh_static.plotly_js_src.cache_clear()  # a new server process: the copy is reused
    assert fresh_static.plotly_js_src() == answers[0]
    assert copied.stat().st_mtime_ns == copied_at


def test_plotly_js_that_cannot_be_copied_means_no_src(fresh_static):
    fresh_static.STATIC_DIR.parent.mkdir(parents=True, exist_ok=True)
    fresh_static.STATIC_DIR.write_text("a file where the folder should be")
    assert fresh_static.plotly_js_src() is None


def test_charts_are_keyed_chart_components_with_served_plotly_js(at):
    # Keyed, so the browser keeps one chart per key and redraws it with Plotly.react (that
    # it does, with no chart built anew, is checked in Chromium by tests/test_browser.py).
    components = list(at.get("bidi_component"))
    keys = sorted(el.proto.id.rpartition("-")[2] for el in components)
    assert keys == ["chart_live_loss_accuracy", "chart_live_percentile_bands"]
    assert not at.get("plotly_chart")
    data = json.loads(components[0].proto.json)
    assert data["src"].startswith("app/static/plotly-")
    assert data["config"]["toImageButtonOptions"]["scale"] == 3


def test_without_static_serving_charts_fall_back_to_st_plotly_chart(app_path):
    from streamlit import config

    assert config.get_option("server.enableStaticServing")  # .streamlit/config.toml
    config.set_option("server.enableStaticServing", False)
    try:
        at = run(AppTest.from_file(str(app_path), default_timeout=60))
    finally:
        config.set_option("server.enableStaticServing", True)
    assert not at.get("bidi_component")
    assert sorted(charts(at)) == ["loss_accuracy", "percentile_bands"]
