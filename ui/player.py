"""Play, Pause, Step and Reset for a page's run, the tick that trains it, its status line.

One Player serves every page that trains while it draws (live training, the ICS question,
the learning-rate sweep), as TensorFlow Playground's Player drives ``oneStep()`` and then
``updateUI()``. A page tells it where its run lives in the session and how to draw it;
the Player owns the buttons, the pacing of the ticks, the status line and what a failed
tick does.

**One writer per run.** A click on a widget outside a fragment makes Streamlit stop the
script it is running and start a new one at once (``runner.fastReruns``), but the old one
stops only at its next Streamlit call: a tick in the middle of training trains on. Two
script runs of one session then stepped one Trainer together, and autograd raised
"modified by an inplace operation". So buttons and sliders only record wishes (play,
pause, one step, a restart, live settings), and only code holding the run's lock touches
the run: the top of a page run, which applies the wishes so that the page draws what they
did, and the tick, which applies what is left and then trains.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import streamlit as st

from ui import load

# How long a script run waits for the run's lock: longer than the longest tick trains
# (load.MAX_TRAIN_SECONDS) plus a step, so it only gives up on a lock that is not freed.
LOCK_WAIT_SECONDS = 1.0
# Changes of one live setting this close together are one change, with one chart marker:
# a slider moved key press by key press from 0 to 0.9 is "momentum 0 → 0.9".
COALESCE_SECONDS = 0.5
# Play and Pause are one button under one key, so a click that reaches the server twice
# (seen in the browser: a Pause, then a Play 0.5 s later at the same step) would toggle
# back. A reversal this soon after a change, with the run not moved on in between, is
# taken for such a repeat and ignored.
REPEAT_SECONDS = 0.6

_LOG = logging.getLogger(__name__)


@dataclass
class _LiveWish:
    value: Any
    first: float  # time.monotonic() of the first change of this burst, and of the last
    last: float
    jump: bool  # a change of its own, never merged with the one before


@dataclass
class _Wishes:
    restart: Callable[[], bool] | None = None  # builds the fresh run; False if it could not
    play: bool | None = None
    step_from: int | None = None  # one step, if the run is still at this step
    live: dict[str, _LiveWish] = field(default_factory=dict)


class Player:
    """Drives one page's run: ``run_key`` and ``playing_key`` name it and its state in the
    session. The run needs ``advance(seconds=...)`` and ``finished``; Step also needs
    ``step`` and ``advance(steps=...)``, live settings ``set_live``.

    ``fit_to_tick``: a lone session's tick trains only what is left of its interval after
    the last tick's drawing (``ui/load.py``), for a page whose drawing is most of a tick.
    """

    def __init__(
        self,
        name: str,
        *,
        run_key: str,
        playing_key: str,
        tick_seconds: float,
        train_seconds: float,
        fit_to_tick: bool = False,
    ) -> None:
        self.name = name
        self.run_key = run_key
        self.playing_key = playing_key
        self.tick_seconds = tick_seconds
        self.train_seconds = train_seconds
        self.fit_to_tick = fit_to_tick
        ss = st.session_state
        ss.setdefault(playing_key, False)
        ss.setdefault(self._key("wishes"), _Wishes())
        ss.setdefault(self._key("lock"), threading.Lock())
        ss.setdefault(self._key("wish_lock"), threading.Lock())
        ss.setdefault(self._key("live_applied"), {})

    def _key(self, what: str) -> str:
        return f"{self.name}_player_{what}"

    # --- state ----------------------------------------------------------------------------
    @property
    def run(self) -> Any:
        return st.session_state.get(self.run_key)

    @property
    def playing(self) -> bool:
        return bool(st.session_state.get(self.playing_key))

    @property
    def state(self) -> str:
        """'playing', 'paused' or 'finished'."""
        if self.playing:
            return "playing"
        run = self.run
        return "finished" if run is not None and run.finished else "paused"

    @property
    def error(self) -> str | None:
        """Why the last tick failed, for the page; None once Play or a restart is asked for."""
        return st.session_state.get(self._key("error"))

    # --- wishes (widget callbacks: they record, the run's lock holder applies) --------------
    def wish(
        self,
        *,
        restart: Callable[[], bool] | None = None,
        play: bool | None = None,
        step_from: int | None = None,
    ) -> None:
        """Ask for a restart, for play or pause, or for one step from ``step_from``.

        Play and pause set a state rather than toggle one, and a reversal within
        REPEAT_SECONDS is dropped, so a click that reaches the server twice cannot undo
        itself.
        """
        ss = st.session_state
        with ss[self._key("wish_lock")]:
            wishes = ss[self._key("wishes")]
            if restart is not None:
                wishes.restart = restart
            if play is not None:
                now, run = time.monotonic(), self.run
                where = (id(run), getattr(run, "step", getattr(run, "steps_done", None)))
                last = ss.get(self._key("last_play"))
                repeat = (
                    restart is None
                    and last is not None
                    and (last[0] != play, last[2]) == (True, where)
                    and now - last[1] < REPEAT_SECONDS
                )
                if not repeat:  # else it is the click before, delivered again
                    ss[self._key("last_play")] = (play, now, where)
                    wishes.play = play
            if step_from is not None:
                wishes.step_from = step_from

    def wish_live(self, name: str, value: Any, *, jump: bool = False) -> None:
        """Ask for live setting ``name`` = ``value`` from the next step.

        ``jump``: a change of its own (a button's), never folded into the one before.
        """
        now = time.monotonic()
        with st.session_state[self._key("wish_lock")]:
            pending = st.session_state[self._key("wishes")].live
            wish = pending.get(name)
            if wish is None or jump:
                pending[name] = _LiveWish(value, now, now, jump)
            else:
                wish.value, wish.last = value, now

    def apply_wishes(self) -> None:
        """Apply the wishes, at the top of a page run, so the page draws their outcome.

        Waits for a tick of an older script run of this session that is still training;
        if it does not end in time the wishes stay for the next tick.
        """
        lock = st.session_state[self._key("lock")]
        if not lock.acquire(timeout=LOCK_WAIT_SECONDS):
            return
        try:
            self._apply(restart_ok=True)
        except Exception as err:  # shown on the page and logged: never only in the log
            self._fail(err, "applying a change (a setting, a step or a restart)")
        finally:
            lock.release()

    def _take_wishes(self) -> _Wishes:
        with st.session_state[self._key("wish_lock")]:
            wishes = st.session_state[self._key("wishes")]
            st.session_state[self._key("wishes")] = _Wishes()
        return wishes

    def _apply(self, *, restart_ok: bool) -> None:
        """Apply the wishes in order: restart, live settings, play or pause, one step.
        The caller holds the run's lock."""
        ss = st.session_state
        if not restart_ok:
            with ss[self._key("wish_lock")]:
                if ss[self._key("wishes")].restart is not None:
                    # A restart fills the page's widgets, which a tick drawn after them
                    # may not change: all of it waits for the next page run, which the
                    # tick asks for.
                    return
        wishes = self._take_wishes()
        if wishes.restart is not None:
            if wishes.restart():
                ss[self.playing_key] = False
                ss[self._key("error")] = None
                ss[self._key("live_applied")] = {}
            else:
                wishes.play = None  # a restart that failed leaves the old run as it was
        run = self.run
        if run is None:
            return
        applied = ss[self._key("live_applied")]
        for name, wish in wishes.live.items():
            previous = applied.get(name)
            merge = not wish.jump and previous is not None
            merge = merge and wish.first - previous <= COALESCE_SECONDS
            if run.set_live(merge=merge, **{name: wish.value}):
                applied[name] = -math.inf if wish.jump else wish.last
            else:
                # No event stands for this change (none, or undone): a later change must
                # not fold into an older event of the setting.
                applied.pop(name, None)
        if wishes.play is not None:
            ss[self.playing_key] = wishes.play and not run.finished
            if wishes.play:
                ss[self._key("error")] = None
        if wishes.step_from is not None:
            ss[self.playing_key] = False
            if run.step == wishes.step_from:
                run.advance(steps=1)

    def _fail(self, err: Exception, what: str = "a training step") -> None:
        """A failed tick or wish: pause, keep the run, say so on the page, log the trace."""
        ss = st.session_state
        step = getattr(self.run, "step", None)
        where = f" at step {step:,}" if isinstance(step, int) else ""
        _LOG.error("%s page: training failed%s; the run is paused", self.name, where, exc_info=err)
        ss[self.playing_key] = False
        lines = str(err).strip().splitlines()
        reason = lines[0] if lines else ""
        if len(reason) > 160:
            reason = reason[:159] + "…"
        ss[self._key("error")] = (
            f"Training stopped{where}: {what} failed ({type(err).__name__}"
            + (f": {reason}" if reason else "")
            + "). The run so far is kept and paused: play it again to retry, or start a "
            "fresh run."
        )

    # --- the tick -------------------------------------------------------------------------
    def _tick(self) -> None:
        ss = st.session_state
        was_playing = self.playing
        lock = ss[self._key("lock")]
        if not lock.acquire(timeout=LOCK_WAIT_SECONDS):
            return  # another script run of this session has the run: draw what there is
        try:
            self._apply(restart_ok=False)
            run = self.run
            if self.playing and run is not None and not run.finished:
                tick = self.tick_seconds if self.fit_to_tick else None
                run.advance(seconds=load.training_seconds(self.train_seconds, tick=tick))
        except Exception as err:  # shown on the page and logged: never only in the log
            self._fail(err)
        finally:
            lock.release()
        run = self.run
        if self.playing and run is not None and run.finished:
            ss[self.playing_key] = False
        with ss[self._key("wish_lock")]:
            restart_waiting = ss[self._key("wishes")].restart is not None
        if was_playing != self.playing or restart_waiting:
            st.rerun()  # the whole page: its buttons show the new state, the ticks stop

    def panel(self, draw: Callable[[], None]) -> None:
        """``draw()`` in a fragment that, while playing, reruns every ``tick_seconds``:
        apply the wishes, train, draw.

        In a container of its own: the panel's element count changes between its reruns,
        and the elements after it must not move (or a stale copy of them lingers).
        """

        @st.fragment(run_every=self.tick_seconds if self.playing else None)
        def tick() -> None:
            self._tick()
            if self.error:
                st.error(self.error, icon=":material/error:")
            if self.fit_to_tick:
                with load.drawing():
                    draw()
            else:
                draw()

        with st.container():
            tick()

    # --- buttons and status ---------------------------------------------------------------
    def button(
        self,
        container: Any,
        label: str,
        *,
        key: str,
        icon: str,
        primary: bool = False,
        disabled: bool = False,
        help: str | None = None,
        **wish: Any,
    ) -> None:
        """A button whose click records ``wish`` (restart=, play=, step_from=)."""
        container.button(
            label,
            key=f"{self.name}_{key}",
            on_click=self.wish,
            kwargs=wish,
            type="primary" if primary else "secondary",
            icon=icon,
            disabled=disabled,
            help=help,
            width="stretch",
        )

    def play_button(self, container: Any, *, key: str = "play") -> None:
        """Play or Pause: one button under one key whose label and icon change, so the
        browser keeps it, and keyboard focus with it: Enter plays, Enter again pauses."""
        playing, run = self.playing, self.run
        self.button(
            container,
            "Pause" if playing else "Play",
            key=key,
            icon=":material/pause:" if playing else ":material/play_arrow:",
            primary=True,
            disabled=run is None or run.finished,
            play=not playing,
        )

    def step_button(self, container: Any) -> None:
        """One step from the step the button was drawn at; a repeated click does nothing."""
        self.button(
            container, "Step", key="step", icon=":material/skip_next:", step_from=self.run.step
        )

    def reset_button(
        self,
        container: Any,
        restart: Callable[[], bool],
        *,
        label: str = "Reset",
        icon: str = ":material/restart_alt:",
        primary: bool = False,
        disabled: bool = False,
        then_play: bool = False,
        help: str | None = None,
    ) -> None:
        """Start a fresh run with ``restart()`` (and play it, ``then_play``)."""
        wish: dict[str, Any] = {"restart": restart}
        if then_play:
            wish["play"] = True
        self.button(
            container,
            label,
            key="reset",
            icon=icon,
            primary=primary,
            disabled=disabled,
            help=help,
            **wish,
        )

    def pause_button(self, container: Any, label: str = "Pause", icon: str = ":material/stop:"):
        """A Pause of its own, for a page that starts with a restart (the sweep)."""
        self.button(container, label, key="pause", icon=icon, disabled=not self.playing, play=False)

    @staticmethod
    def status(text: str, progress: float | None = None) -> None:
        """The status line above the charts, with a progress bar when ``progress`` is given."""
        if progress is None:
            st.markdown(f"**{text}**")
        else:
            st.progress(min(max(progress, 0.0), 1.0), text=text)
