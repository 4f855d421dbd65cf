"""Sharing the server among sessions that train at once (ui/load.py)."""

from __future__ import annotations

import pytest

from ui.load import MAX_TRAIN_SECONDS, STALE_SECONDS, TrainingShare


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
