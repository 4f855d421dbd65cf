"""Bounded telemetry store for training runs: scalar series, histograms and live-change events.

Scalars live in one growable (steps, values) pair of numpy arrays per series
(variant, layer, metric); histograms in one (steps, counts) pair per (variant, layer, kind)
with fixed bin edges per kind. Run-level metrics use the layer "".

Memory is bounded the way TensorBoard bounds it, but deterministically so that every series
stays aligned on the same steps: a stride (starting at 1) says which steps are kept. A point
is stored only if ``step % stride == 0``; when a series would exceed ``max_points`` the stride
doubles and *every* series drops the steps that are not multiples of the new stride (again
while still over). Strides only grow and each divides the next, so the points kept are always
exactly the recorded steps that are multiples of the current stride: for a trainer that
records at a fixed cadence from step 0 they are evenly spread over the whole run, step 0
included, and identical across variants and layers. Histograms have their own stride,
bounded by ``max_histograms``.

A lock guards every read and write: an export or a second browser tab may read a run's
series from another Streamlit script thread while its tick records, and thinning compacts
arrays in place.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from typing import IO

import numpy as np
import pandas as pd

__all__ = ["Event", "History"]

_COLUMNS = ["step", "variant", "layer", "metric", "value"]


def _compact(x: float) -> str:
    """3 significant digits, no trailing zeros, short exponents: 0.1, 1, 0.9, 1e-5, 1.23e4."""
    if x == 0:
        return "0"  # also turns -0.0 into "0"
    if not math.isfinite(x):
        return str(float(x))  # "inf", "-inf", "nan"
    text = f"{x:.3g}"
    if "e" in text:
        mantissa, exponent = text.split("e")
        text = f"{mantissa}e{int(exponent)}"  # "1e-05" -> "1e-5", "1.23e+04" -> "1.23e4"
    return text


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))  # nan stands for None (bn_momentum)


@dataclass(frozen=True)
class Event:
    """A live change of a hyper-parameter between steps, e.g. the learning rate.

    Several changes of one setting made in quick succession (a slider moved key press by
    key press) are one event: ``old`` is the value before the first, ``new`` the value
    after the last, and ``until`` the step of the last when it came later than ``step``.
    """

    step: int
    name: str  # e.g. "lr", "momentum", "bn_momentum"
    old: float
    new: float
    until: int | None = None

    @property
    def label(self) -> str:
        """Short chart annotation, e.g. ``"lr 0.1 → 1"``."""
        return f"{self.name} {_compact(self.old)} → {_compact(self.new)}"

    @property
    def detail(self) -> str:
        """The label with where it happened, e.g. ``"lr 0.1 → 1 over steps 1,200–1,450"``."""
        if self.until is None:
            return f"{self.label} at step {self.step:,}"
        return f"{self.label} over steps {self.step:,}–{self.until:,}"


class _Track:
    """Growable, step-sorted (steps, values) arrays; values rows may be vectors (histograms).

    Capacity doubles up to ``limit`` (max points + 1: room for the point that triggers a
    thinning), so a full track holds O(limit) memory and never reallocates again. ``last``
    mirrors the last stored step as a Python int so the hot path needs no numpy read.
    """

    __slots__ = ("steps", "values", "n", "last")

    def __init__(self, row_shape: tuple[int, ...], capacity: int) -> None:
        self.steps = np.empty(capacity, dtype=np.int64)
        self.values = np.empty((capacity, *row_shape), dtype=np.float64)
        self.n = 0
        self.last = -1  # steps are >= 0

    def _grow(self, limit: int) -> None:
        capacity = min(max(2 * len(self.steps), 1), limit)
        steps = np.empty(capacity, dtype=np.int64)
        values = np.empty((capacity, *self.values.shape[1:]), dtype=np.float64)
        steps[: self.n] = self.steps[: self.n]
        values[: self.n] = self.values[: self.n]
        self.steps, self.values = steps, values

    def put(self, step: int, value: float | np.ndarray, limit: int) -> None:
        """Store ``value`` at ``step``; a step already present is overwritten (last wins)."""
        n = self.n
        if step > self.last:  # the usual case: steps arrive in order
            if n == len(self.steps):
                self._grow(limit)
            self.steps[n] = step
            self.values[n] = value
            self.n = n + 1
            self.last = int(step)
            return
        i = int(np.searchsorted(self.steps[:n], step))
        if self.steps[i] == step:
            self.values[i] = value
            return
        # Out-of-order step (rare): shift the tail right to keep steps sorted.
        if n == len(self.steps):
            self._grow(limit)
        self.steps[i + 1 : n + 1] = self.steps[i:n]
        self.values[i + 1 : n + 1] = self.values[i:n]
        self.steps[i] = step
        self.values[i] = value
        self.n = n + 1

    def thin(self, stride: int) -> None:
        """Drop, in place, the points whose step is not a multiple of ``stride``."""
        n = self.n
        keep = self.steps[:n] % stride == 0
        k = int(np.count_nonzero(keep))
        if k == n:
            return
        # Boolean indexing copies before the write, so compacting in place is safe.
        self.steps[:k] = self.steps[:n][keep]
        self.values[:k] = self.values[:n][keep]
        self.n = k
        self.last = int(self.steps[k - 1]) if k else -1

    def nbytes(self) -> int:
        # Allocated capacity, not just the used part: that is what the process holds.
        return int(self.steps.nbytes + self.values.nbytes)


def _names(selection: Iterable[str] | None) -> set[str] | None:
    if selection is None:
        return None
    if isinstance(selection, str):  # to_frame(metrics="loss") means ["loss"], not its letters
        return {selection}
    return set(selection)


class History:
    """Bounded telemetry of a run: scalar series, per-layer histograms and live-change events.

    Args:
        max_points: most points kept per scalar series (at least 1).
        max_histograms: most histograms kept per (variant, layer, kind) (at least 1).
    """

    _INITIAL_CAPACITY = 64

    def __init__(self, max_points: int = 1000, max_histograms: int = 200) -> None:
        if int(max_points) < 1 or int(max_histograms) < 1:
            raise ValueError("max_points and max_histograms must be at least 1")
        self.max_points = int(max_points)
        self.max_histograms = int(max_histograms)
        self._lock = threading.Lock()
        self._edges: dict[str, np.ndarray] = {}  # configuration: survives clear()
        self.clear()

    # ------------------------------------------------------------------ bookkeeping

    def clear(self) -> None:
        """Forget all recorded data (series, histograms, events, strides).

        Bin edges are configuration, not data, and are kept so a restarted run can record
        histograms straight away.
        """
        with self._lock:
            self._series: dict[tuple[str, str, str], _Track] = {}
            self._hists: dict[tuple[str, str, str], _Track] = {}
            # dicts as insertion-ordered sets: first-seen order for the UI's pickers
            self._variants: dict[str, None] = {}
            self._layers: dict[str, dict[str, None]] = {}  # variant -> layers
            self._all_layers: dict[str, None] = {}
            self._metrics: dict[str, None] = {}
            self._stride = 1
            self._hist_stride = 1
            self._last_step: int | None = None
            self.events: list[Event] = []

    @property
    def stride(self) -> int:
        """Current scalar stride: stored scalar steps are exactly the multiples of it."""
        return self._stride

    def _see(self, step: int) -> int:
        """Validate ``step``, note it for last_step() and return it as a Python int."""
        step = int(step)  # numpy ints would make every comparison below slower
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        if self._last_step is None or step > self._last_step:
            self._last_step = step
        return step

    def _register(self, variant: str, layer: str) -> None:
        self._variants.setdefault(variant, None)
        if layer != "":
            self._layers.setdefault(variant, {}).setdefault(layer, None)
            self._all_layers.setdefault(layer, None)

    def _store_scalar(self, step: int, key: tuple[str, str, str], value: float) -> None:
        """Store one point (lock held, ``step % stride == 0`` checked); thin if over."""
        track = self._series.get(key)
        if track is None:
            track = self._series[key] = _Track((), min(self._INITIAL_CAPACITY, self.max_points + 1))
            self._register(key[0], key[1])
            self._metrics.setdefault(key[2], None)
        track.put(step, value, self.max_points + 1)
        if track.n > self.max_points:
            # Thin everything, not just this track, so all series keep the same steps.
            while track.n > self.max_points:
                self._stride *= 2
                for other in self._series.values():
                    other.thin(self._stride)

    # ------------------------------------------------------------------ scalars

    def add(self, step: int, variant: str, layer: str, metric: str, value: float) -> None:
        """Record one scalar; use layer "" for run-level metrics (loss, accuracy)."""
        with self._lock:
            step = self._see(step)
            if step % self._stride == 0:
                self._store_scalar(step, (variant, layer, metric), float(value))

    def add_many(self, step: int, variant: str, rows: Iterable[tuple[str, str, float]]) -> None:
        """Record ``(layer, metric, value)`` rows of one variant at one step (the hot path).

        Steps that the stride drops cost one modulo and never touch ``rows``.
        """
        with self._lock:
            step = self._see(step)
            if step % self._stride:
                return
            series, max_points = self._series, self.max_points
            for layer, metric, value in rows:
                track = series.get((variant, layer, metric))
                if (
                    track is not None
                    and step > track.last
                    and track.n < max_points  # so no thinning is due after this point
                    and track.n < len(track.steps)
                ):
                    # Inlined in-order append: this runs for every row, every few steps.
                    n = track.n
                    track.steps[n] = step
                    track.values[n] = float(value)
                    track.n = n + 1
                    track.last = step
                    continue
                self._store_scalar(step, (variant, layer, metric), float(value))
                if step % self._stride:
                    # A thinning just dropped this step everywhere; storing the rest of the
                    # rows would leave them on a step the other series no longer have.
                    return

    def series(self, variant: str, layer: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps int64, values float64)`` sorted by step; copies, safe to keep and mutate."""
        with self._lock:
            track = self._series.get((variant, layer, metric))
            if track is None:
                return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float64)
            return track.steps[: track.n].copy(), track.values[: track.n].copy()

    def variants(self) -> list[str]:
        """Variants in first-seen order (from scalars or histograms)."""
        with self._lock:
            return list(self._variants)

    def layers(self, variant: str | None = None) -> list[str]:
        """Layers in first-seen order, of one variant or of all; never the run-level ""."""
        with self._lock:
            if variant is None:
                return list(self._all_layers)
            return list(self._layers.get(variant, {}))

    def metrics(self) -> list[str]:
        """Scalar metric names in first-seen order."""
        with self._lock:
            return list(self._metrics)

    def note_step(self, step: int) -> None:
        """Record that the run has reached ``step`` even where nothing was logged there."""
        with self._lock:
            self._see(step)

    def last_step(self) -> int | None:
        """Latest step passed to any add, stored or thinned away; None before the first."""
        with self._lock:
            return self._last_step

    def to_frame(
        self, metrics: Iterable[str] | None = None, variants: Iterable[str] | None = None
    ) -> pd.DataFrame:
        """Tidy long table: columns step, variant, layer, metric, value.

        Rows are sorted by variant (first-seen order), layer, metric (by name), then step.
        """
        wanted_metrics, wanted_variants = _names(metrics), _names(variants)
        with self._lock:
            order = {v: i for i, v in enumerate(self._variants)}
            keys = sorted(
                (
                    key
                    for key, track in self._series.items()
                    if track.n
                    and (wanted_variants is None or key[0] in wanted_variants)
                    and (wanted_metrics is None or key[2] in wanted_metrics)
                ),
                key=lambda key: (order[key[0]], key[1], key[2]),
            )
            lengths = [self._series[key].n for key in keys]
            total = sum(lengths)
            steps = np.empty(total, dtype=np.int64)
            values = np.empty(total, dtype=np.float64)
            names = [np.empty(total, dtype=object) for _ in range(3)]
            start = 0
            for key, n in zip(keys, lengths, strict=True):
                track = self._series[key]
                steps[start : start + n] = track.steps[:n]
                values[start : start + n] = track.values[:n]
                for column, name in zip(names, key, strict=True):
                    column[start : start + n] = name
                start += n
        columns = dict(zip(_COLUMNS, [steps, *names, values], strict=True))
        return pd.DataFrame(columns, columns=_COLUMNS)

    def to_csv(self, path: str | os.PathLike[str] | IO[str]) -> None:
        """Write :meth:`to_frame` as CSV (no index column)."""
        self.to_frame().to_csv(path, index=False)

    # ------------------------------------------------------------------ histograms

    def set_bin_edges(self, kind: str, edges: np.ndarray) -> None:
        """Fix the bin edges of a histogram kind (e.g. "preact"), shared by all variants.

        Changing the edges of a kind that already has histograms is refused: their counts
        would silently be read against the wrong bins.
        """
        edges = np.array(edges, dtype=np.float64)  # our own copy
        if edges.ndim != 1 or len(edges) < 2 or not np.all(np.diff(edges) > 0):
            raise ValueError("bin edges must be 1-D, at least 2 long and strictly increasing")
        edges.flags.writeable = False
        with self._lock:
            old = self._edges.get(kind)
            if old is not None and not np.array_equal(old, edges):
                if any(key[2] == kind and track.n for key, track in self._hists.items()):
                    raise ValueError(f"histograms of kind {kind!r} exist; clear() first")
                # no data of this kind: drop empty tracks sized for the old bin count
                self._hists = {k: t for k, t in self._hists.items() if k[2] != kind}
            self._edges[kind] = edges

    def bin_edges(self, kind: str) -> np.ndarray:
        """The bin edges of ``kind``; KeyError if never set."""
        with self._lock:
            return self._edges[kind].copy()

    def keeps(self, step: int) -> bool:
        """Whether scalars recorded at ``step`` would be stored: the stride drops the rest,
        so a recorder can skip measuring them."""
        return step % self._stride == 0

    def keeps_histograms(self, step: int) -> bool:
        """Whether histograms recorded at ``step`` would be stored."""
        return step % self._hist_stride == 0

    def add_histogram(
        self, step: int, variant: str, layer: str, kind: str, counts: np.ndarray
    ) -> None:
        """Record one histogram; ``counts`` must have one entry per bin of ``kind``."""
        with self._lock:
            edges = self._edges.get(kind)
            if edges is None:
                raise KeyError(f"no bin edges set for histogram kind {kind!r}")
            counts = np.asarray(counts, dtype=np.float64)
            if counts.shape != (len(edges) - 1,):
                raise ValueError(f"{kind!r} counts must have shape ({len(edges) - 1},)")
            step = self._see(step)
            if step % self._hist_stride:
                return
            key = (variant, layer, kind)
            track = self._hists.get(key)
            if track is None:
                capacity = min(self._INITIAL_CAPACITY // 8, self.max_histograms + 1)
                track = self._hists[key] = _Track(counts.shape, capacity)
                self._register(variant, layer)
            track.put(step, counts, self.max_histograms + 1)
            while track.n > self.max_histograms:  # same aligned thinning as the scalars
                self._hist_stride *= 2
                for other in self._hists.values():
                    other.thin(self._hist_stride)

    def histograms(self, variant: str, layer: str, kind: str) -> tuple[np.ndarray, np.ndarray]:
        """``(steps (k,), counts (k, n_bins))``; shapes (0,), (0, n_bins) if none recorded."""
        with self._lock:
            track = self._hists.get((variant, layer, kind))
            if track is None or track.n == 0:
                edges = self._edges.get(kind)
                n_bins = 0 if edges is None else len(edges) - 1
                return np.empty(0, dtype=np.int64), np.empty((0, n_bins), dtype=np.float64)
            return track.steps[: track.n].copy(), track.values[: track.n].copy()

    def histogram_at(
        self, variant: str, layer: str, kind: str, step: int
    ) -> tuple[int, np.ndarray] | None:
        """The stored histogram at the latest step <= ``step`` (the first one if ``step``
        precedes them all) as ``(its step, counts)``; None if there is none."""
        with self._lock:
            track = self._hists.get((variant, layer, kind))
            if track is None or track.n == 0:
                return None
            i = max(int(np.searchsorted(track.steps[: track.n], step, side="right")) - 1, 0)
            return int(track.steps[i]), track.values[i].copy()

    def save_histograms_npz(self, path: str | os.PathLike[str] | IO[bytes]) -> None:
        """Save all histograms as a compressed npz.

        Arrays: ``{kind}/{variant}/{layer}/steps`` and ``.../counts`` per series, and
        ``{kind}/edges`` per kind with edges set.
        """
        with self._lock:
            arrays: dict[str, np.ndarray] = {
                f"{kind}/edges": edges.copy() for kind, edges in self._edges.items()
            }
            for (variant, layer, kind), track in self._hists.items():
                if track.n:
                    arrays[f"{kind}/{variant}/{layer}/steps"] = track.steps[: track.n].copy()
                    arrays[f"{kind}/{variant}/{layer}/counts"] = track.values[: track.n].copy()
        np.savez_compressed(path, **arrays)

    # ------------------------------------------------------------------ events

    def add_event(
        self, step: int, name: str, old: float, new: float, *, merge: bool = False
    ) -> Event | None:
        """Record a live change of hyper-parameter ``name`` taking effect at ``step``.

        ``merge=True`` folds it into the last event of ``name``, which keeps its step and
        its ``old`` and takes this ``new``. When that would bring the setting back to where
        the event started, the event is dropped and None returned if no step trained at
        the changed value (nothing changed in the end); if steps did, the return is a
        change of its own, recorded as a new event.
        """
        step, old, new = int(step), float(old), float(new)
        with self._lock:
            events = self.events
            last = next((i for i in range(len(events) - 1, -1, -1) if events[i].name == name), None)
            # A new list on every change, never one edited in place: a chart drawn in
            # another thread may be iterating over the old one.
            if merge and last is not None:
                first = events[last]
                trained = step > first.step or first.until is not None
                if not _same(first.old, new):
                    until = step if step > first.step else first.until
                    event = Event(first.step, name, first.old, new, until)
                    self.events = [*events[:last], event, *events[last + 1 :]]
                    return event
                if not trained:
                    self.events = events[:last] + events[last + 1 :]
                    return None
            event = Event(step, name, old, new)
            self.events = [*events, event]
        return event

    def last_event(self, name: str) -> Event | None:
        """The latest event of setting ``name``, or None."""
        return next((e for e in reversed(self.events) if e.name == name), None)

    # ------------------------------------------------------------------ memory

    def nbytes(self) -> int:
        """Bytes allocated by all stored arrays (series, histograms, bin edges).

        Counts capacity, not just used length; ignores the small per-series Python objects.
        """
        with self._lock:
            total = sum(track.nbytes() for track in self._series.values())
            total += sum(track.nbytes() for track in self._hists.values())
            total += sum(edges.nbytes for edges in self._edges.values())
            return int(total)

    def bound_nbytes(self) -> int:
        """The most ``nbytes`` can reach with the series and histograms stored so far.

        Every track is capped at its limit plus one row (the row that triggers a
        thinning), 8 bytes per step and 8 per value, so a run of any length stays under
        this once all its series exist.
        """
        with self._lock:
            total = len(self._series) * (self.max_points + 1) * 16
            for track in self._hists.values():
                row = int(np.prod(track.values.shape[1:]))
                total += (self.max_histograms + 1) * (8 + 8 * row)
            total += sum(edges.nbytes for edges in self._edges.values())
            return int(total)
