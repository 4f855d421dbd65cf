"""ui/player.py through AppTest: one writer per trainer, wishes applied by the tick, live
changes that coalesce, a failed tick shown on the page, the "×20 now" jump, the preset
rule, and links that keep the view and layer."""

from __future__ import annotations

import logging

import pytest
from chart_elements import figure_specs
from streamlit.testing.v1 import AppTest

from bn_core.config import load_preset
from ui import player as player_module

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run(target) -> AppTest:
    at = target.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


@pytest.fixture
def at(app_path) -> AppTest:
    return run(AppTest.from_file(str(app_path), default_timeout=60))


def new_app(app_path, query: dict[str, str]) -> AppTest:
    at = AppTest.from_file(str(app_path), default_timeout=60)
    for key, value in query.items():
        at.query_params[key] = value
    return run(at)


def button(at: AppTest, label: str):
    found = [b for b in at.button if b.label == label]
    assert len(found) == 1, f"button {label!r}: {[b.label for b in at.button]}"
    return found[0]


def sidebar_widget(widgets, label: str):
    found = [w for w in widgets if w.label == label]
    assert len(found) == 1, f"widget {label!r}: {[w.label for w in widgets]}"
    return found[0]


def event_labels(at: AppTest, chart: str = "loss_accuracy") -> list[str]:
    fig = figure_specs(at, "chart_live_")[chart]
    return [a["text"] for a in fig["layout"]["annotations"] if a.get("name") == "event"]


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.sidebar.caption)


# --- one writer per trainer ----------------------------------------------------------------
def test_a_run_that_holds_the_lock_is_the_only_one_that_steps(at):
    """While another script run of the session holds the trainer (a tick still training
    when a click started a new run), this run neither steps it nor applies the wishes; the
    wishes wait and the next run applies them."""
    trainer = at.session_state.trainer
    lock = at.session_state["live_player_lock"]
    lock.acquire()
    try:
        run(button(at, "Play").click())  # both the page's top and the tick wait, then give up
        assert trainer.step == 0 and at.session_state.playing is False
    finally:
        lock.release()
    run(at)
    assert at.session_state.playing is True and trainer.step > 0


def test_rapid_slider_changes_while_playing_are_one_event_and_one_marker(at, monkeypatch):
    """A momentum slider stepped 0 -> 0.15 one key press at a time while the run plays is
    one change "momentum 0 → 0.15" with one label; every step trained in between used the
    value of its moment. The window is widened so a slow machine's runs still count as
    "quick succession"."""
    monkeypatch.setattr(player_module, "COALESCE_SECONDS", 60.0)
    run(button(at, "Play").click())
    trainer = at.session_state.trainer
    start = trainer.step
    for hundredths in range(1, 16):
        run(sidebar_widget(at.sidebar.slider, "SGD momentum").set_value(hundredths / 100))
    assert at.session_state.trainer is trainer and trainer.live["momentum"] == 0.15
    (event,) = trainer.history.events
    assert (event.name, event.old, event.new) == ("momentum", 0.0, 0.15)
    assert start <= event.step < event.until <= trainer.step
    assert event_labels(at) == ["momentum 0 → 0.15"] * 2  # one on each of its panels
    # The markers leave the step axis to the data: it is clipped to the run's steps.
    fig = figure_specs(at, "chart_live_")["loss_accuracy"]
    assert fig["layout"]["xaxis"]["autorangeoptions"]["clipmin"] == 0
    # A change after a pause longer than the window is a change of its own.
    monkeypatch.setattr(player_module, "COALESCE_SECONDS", 0.0)
    run(sidebar_widget(at.sidebar.slider, "SGD momentum").set_value(0.5))
    assert [e.label for e in trainer.history.events] == [
        "momentum 0 → 0.15",
        "momentum 0.15 → 0.5",
    ]


def test_a_failed_tick_is_said_on_the_page_keeps_the_run_and_pauses(at, caplog):
    trainer = at.session_state.trainer
    run(button(at, "Step").click())
    good_inputs = trainer.x_train
    trainer.x_train = good_inputs[:, :5]  # a real failure: the net expects 64 inputs
    with caplog.at_level(logging.ERROR, logger="ui.player"):
        run(button(at, "Play").click())
    assert at.session_state.trainer is trainer and trainer.step == 1
    assert at.session_state.playing is False
    assert [b.label for b in at.button if b.key == "live_play"] == ["Play"]
    (error,) = [e.value for e in at.main.error]
    assert error.startswith("Training stopped at step 1: a training step failed (RuntimeError: ")
    assert "Traceback" not in error and "kept and paused" in error
    logged = [r for r in caplog.records if r.name == "ui.player"]
    assert logged and logged[0].exc_info is not None  # the trace is in the server's log
    trainer.x_train = good_inputs
    run(button(at, "Play").click())
    assert at.session_state.playing is True and trainer.step > 1
    assert not at.main.error


def test_play_and_pause_is_one_button_under_one_key(at):
    assert at.button(key="live_play").label == "Play"
    run(at.button(key="live_play").click())
    assert at.button(key="live_play").label == "Pause"
    assert at.session_state.playing is True


# --- the learning-rate jump ---------------------------------------------------------------
def test_jump_multiplies_the_rate_by_20_in_one_change(at, monkeypatch):
    """Even right after a slider move (inside the coalescing window), the jump is a change
    of its own: the chart shows where the plain net met the large rate."""
    monkeypatch.setattr(player_module, "COALESCE_SECONDS", 60.0)
    run(button(at, "Step").click())
    run(sidebar_widget(at.sidebar.select_slider, "Learning rate").set_value(1.0))
    run(button(at, "Step").click())  # (changes at one step, with nothing trained between, are one)
    jump = at.button(key="w_lr_jump")
    assert jump.label == "×20 now" and not jump.disabled
    run(jump.click())
    trainer = at.session_state.trainer
    assert trainer.live["lr"] == 10.0
    assert sidebar_widget(at.sidebar.select_slider, "Learning rate").value == 10.0
    assert [e.label for e in trainer.history.events] == ["lr 0.5 → 1", "lr 1 → 10"]
    assert at.button(key="w_lr_jump").disabled  # 10 is the slider's top
    assert "A jump and a ramp are different lessons" in captions(at)


# --- presets: one rule, and "Custom" once the set-up differs -------------------------------
def test_a_picked_preset_changes_nothing_until_reset_learning_rate_included(at):
    run(button(at, "Step").click())
    trainer = at.session_state.trainer
    run(at.selectbox(key="w_preset").set_value("high-lr-sigmoid"))
    assert at.session_state.trainer is trainer
    assert trainer.live["lr"] == 0.5 and trainer.history.events == []
    # The live slider still shows, and drives, the running run.
    assert sidebar_widget(at.sidebar.select_slider, "Learning rate").value == 0.5
    (warning,) = [w.value for w in at.warning]
    assert "Learning rate (lr)" in warning and "init_std" in warning and "Reset" in warning
    assert "wait for **Reset**" in captions(at) and "learning rate and momenta" in captions(at)
    run(button(at, "Reset").click())
    new = at.session_state.trainer
    assert new is not trainer and new.config == load_preset("high-lr-sigmoid")
    assert sidebar_widget(at.sidebar.select_slider, "Learning rate").value == 5.0
    assert not at.warning


def test_a_live_change_after_picking_a_preset_is_kept_by_reset(at):
    run(at.selectbox(key="w_preset").set_value("high-lr-sigmoid"))
    run(sidebar_widget(at.sidebar.select_slider, "Learning rate").set_value(2.0))
    assert at.session_state.trainer.live["lr"] == 2.0  # acted on the running run
    run(button(at, "Reset").click())
    assert at.session_state.trainer.config.lr == 2.0  # the later choice wins


def test_a_changed_set_up_says_custom_and_lists_the_changes(at):
    assert "Custom" not in captions(at) and "three sigmoid layers" in captions(at)
    run(sidebar_widget(at.sidebar.number_input, "Hidden layers").set_value(2))
    run(sidebar_widget(at.sidebar.number_input, "Batch size").set_value(32))
    text = captions(at)
    assert "**Custom (from Ioffe & Szegedy, Figure 1)**" in text
    assert "Hidden layers 3 → 2" in text and "Batch size 60 → 32" in text
    assert "three sigmoid layers" not in text  # instead of the preset's description
    run(sidebar_widget(at.sidebar.number_input, "Hidden layers").set_value(3))
    run(sidebar_widget(at.sidebar.number_input, "Batch size").set_value(60))
    assert "Custom" not in captions(at) and "three sigmoid layers" in captions(at)


# --- links keep the view and the layer ------------------------------------------------------
def test_a_link_keeps_the_view_and_the_layer(at, app_path):
    run(at.button_group(key="w_view").set_value("Distributions"))
    run(at.selectbox(key="w_layer").set_value("layer1"))
    link = dict(at.query_params)
    assert (link["view"], link["layer"]) == ("preact_heatmaps", "layer1")
    again = new_app(app_path, link)
    assert not again.warning
    assert again.button_group(key="w_view").value == "Distributions"
    assert again.selectbox(key="w_layer").value == "layer1"
    assert sorted(figure_specs(again, "chart_live_")) == [
        "histogram_overlay",
        "loss_accuracy",
        "preact_heatmaps",
    ]
    # The defaults (first view, last layer) stay out of the link.
    run(again.button_group(key="w_view").set_value("Fig. 1 percentiles"))
    run(again.selectbox(key="w_layer").set_value("layer3"))
    assert "view" not in dict(again.query_params) and "layer" not in dict(again.query_params)


def test_a_bad_view_or_layer_in_a_link_is_named_and_the_page_loads(app_path):
    at = new_app(app_path, {"view": "nope", "layer": "layer9", "depth": "2"})
    (warning,) = [w.value for w in at.warning]
    assert "view = 'nope': allowed: percentile_bands, preact_heatmaps" in warning
    assert "layer = 'layer9': allowed: layer1, layer2" in warning
    assert at.session_state.trainer.config.depth == 2  # the rest of the link applies
    assert at.button_group(key="w_view").value == "Fig. 1 percentiles"
    assert sorted(figure_specs(at, "chart_live_")) == ["loss_accuracy", "percentile_bands"]
    run(button(at, "Step").click())
    assert at.session_state.trainer.step == 1
