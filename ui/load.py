"""How long one tick trains when several browser sessions train on one server at once.

Every tick trains for a while and then redraws its charts. Drawing is Python work that
holds the interpreter lock, so with N sessions ticking, each one's training time gets
about 1/N of the CPU while its drawing costs as much as ever: at a fixed training time
per tick, 8 sessions on a 2-core server mostly drew, and trained 3.9 steps/s in all
(one session alone: 95). Stretching each tick's training time by the number of sessions
training keeps the training:drawing ratio of a lone session; each session then redraws
less often instead of hardly training (8 sessions: 9-12 steps/s in all, with their 8
browsers on the same 2 cores; 39 steps/s since charts update in place and Streamlit no
longer collects garbage after every tick). The stretch is capped so that Pause still
acts within half a second.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator

import streamlit as st

MAX_TRAIN_SECONDS = 0.4  # a tick in flight when Pause is pressed still finishes
MIN_TRAIN_SECONDS = 0.02  # a busy machine still sees the run move
CLICK_ROOM_SECONDS = 0.06  # left free in each tick, so a click does not wait for a tick
STALE_SECONDS = 2.0  # a session that has not ticked for this long (paused) no longer counts


class TrainingShare:
    """The sessions that trained lately (process-wide: all sessions share one server)."""

    def __init__(self) -> None:
        self._last_tick: dict[str, float] = {}
        self._lock = threading.Lock()  # sessions tick in threads of their own

    def training_seconds(
        self, session: str, base: float, now: float | None = None, room: float | None = None
    ) -> float:
        """This tick's training time for ``session``.

        Several sessions: ``base`` times the number of sessions training, at least ``base``
        and at most MAX_TRAIN_SECONDS. Each of them then redraws less often, by design.

        A lone session: ``base``, or less when ``room`` is given. ``room`` is what its tick
        has left for training once it has drawn and kept CLICK_ROOM_SECONDS free. On a
        machine busy with other work drawing takes longer, and a tick that still trained
        ``base`` would run into the next one: the page would tick back to back and a click
        on Pause would wait behind the queued ticks. Such a tick trains less (at least
        MIN_TRAIN_SECONDS, or ``base`` if that is shorter) and keeps its redraw rate.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            self._last_tick[session] = now
            for other, last in list(self._last_tick.items()):
                if now - last > STALE_SECONDS:
                    del self._last_tick[other]
            training = len(self._last_tick)
        if training == 1 and room is not None:
            return max(min(MIN_TRAIN_SECONDS, base), min(base, room))
        return max(base, min(base * training, MAX_TRAIN_SECONDS))


SHARE = TrainingShare()


def _session() -> str:
    # A token of the browser session's own, kept in its state: no global per-user data.
    return st.session_state.setdefault("load_session", uuid.uuid4().hex)


def training_seconds(base: float, tick: float | None = None) -> float:
    """How long this session's tick trains, given the sessions training right now.

    With ``tick`` (the page's interval between ticks), a lone session's tick also fits
    its training around the time its last drawing took (see ``drawing``).
    """
    last_drawing = st.session_state.get("load_drawing_seconds")
    room = (
        None if tick is None or last_drawing is None else tick - CLICK_ROOM_SECONDS - last_drawing
    )
    return SHARE.training_seconds(_session(), base, room=room)


@contextlib.contextmanager
def drawing() -> Iterator[None]:
    """Times a tick's drawing, for the next tick's training time (``training_seconds``).

    Only a drawing that ends normally counts: one cut short by a rerun says nothing about
    what the next one will cost.
    """
    start = time.perf_counter()
    yield
    st.session_state["load_drawing_seconds"] = time.perf_counter() - start
