"""Sharing the server among sessions that train at once (ui/load.py)."""

from __future__ import annotations

import pytest

from ui import load
from ui.load import (
    CLICK_ROOM_SECONDS,
    MAX_TRAIN_SECONDS,
    MIN_TRAIN_SECONDS,
    STALE_SECONDS,
    TrainingShare,
)


def test_a_lone_session_trains_its_base_time():
    share = TrainingShare()
    assert share.training_seconds("a", 0.12, now=0.0) == 0.12
    assert share.training_seconds("a", 0.12, now=0.25) == 0.12  # the same session again


@pytest.mark.parametrize("sessions", [2, 3])
def test_each_session_trains_base_times_the_sessions_training(sessions):
    share = TrainingShare()
    for k in range(sessions - 1):
        share.training_seconds(f"other{k}", 0.12, now=0.0)
    assert share.training_seconds("me", 0.12, now=0.1) == pytest.approx(0.12 * sessions)


def test_the_stretch_is_capped_so_pause_still_acts_quickly():
    share = TrainingShare()
    for k in range(8):
        seconds = share.training_seconds(f"s{k}", 0.12, now=0.0)
    assert seconds == MAX_TRAIN_SECONDS
    # A base already above the cap is never shortened.
    assert share.training_seconds("sweep", 0.5, now=0.0) == 0.5


def test_a_session_that_stopped_ticking_no_longer_counts():
    share = TrainingShare()
    share.training_seconds("paused", 0.1, now=0.0)
    assert share.training_seconds("me", 0.1, now=STALE_SECONDS - 0.5) == pytest.approx(0.2)
    assert share.training_seconds("me", 0.1, now=STALE_SECONDS + 0.5) == pytest.approx(0.1)


def test_a_lone_session_trains_only_the_room_its_tick_leaves():
    share = TrainingShare()
    # Plenty of room: the base time.
    assert share.training_seconds("a", 0.08, now=0.0, room=0.11) == 0.08
    # A slow drawing leaves less: the tick trains less instead of running into the next.
    assert share.training_seconds("a", 0.08, now=0.2, room=0.03) == pytest.approx(0.03)
    # Drawing alone fills the tick: the run still moves a little.
    assert share.training_seconds("a", 0.08, now=0.4, room=-0.05) == MIN_TRAIN_SECONDS
    # ... but never longer than its base time.
    assert share.training_seconds("a", 0.01, now=0.6, room=-0.05) == 0.01


def test_several_sessions_keep_their_stretched_time_whatever_the_room():
    share = TrainingShare()
    share.training_seconds("other", 0.08, now=0.0)
    assert share.training_seconds("me", 0.08, now=0.1, room=0.01) == pytest.approx(0.16)


def test_a_tick_fits_its_training_around_the_last_drawing(monkeypatch):
    monkeypatch.setattr(load, "SHARE", TrainingShare())
    monkeypatch.setattr(load.st, "session_state", {})
    clock = iter([10.0, 10.1, 20.0])  # the drawing below takes 0.1 s
    monkeypatch.setattr(load.time, "perf_counter", lambda: next(clock))
    # No drawing measured yet (the first tick): the base time.
    assert load.training_seconds(0.08, tick=0.2) == 0.08
    with load.drawing():
        pass
    assert load.training_seconds(0.08, tick=0.2) == pytest.approx(0.2 - CLICK_ROOM_SECONDS - 0.1)
    # Pages that do not pace their ticks keep the base time.
    assert load.training_seconds(0.08) == 0.08
    # A drawing cut short (by a rerun) leaves the last measurement as it was.
    with pytest.raises(RuntimeError), load.drawing():
        raise RuntimeError("rerun")
    assert load.training_seconds(0.08, tick=0.2) == pytest.approx(0.2 - CLICK_ROOM_SECONDS - 0.1)
