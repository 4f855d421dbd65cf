"""History: round trips, the aligned stride thinning that bounds memory, histograms, events."""

from __future__ import annotations

import math
import threading

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bn_core.history import Event, History

VARIANTS = ["plain", "bn"]
LAYERS = ["fc1", "fc2", "fc3"]
METRICS = ["mean", "std", "grad_norm", "update_ratio"]


def value_of(step: int, v: int, layer: int, metric: int) -> float:
    """A value that identifies its series and step, to check what survived thinning."""
    return step * 1e-3 + v * 100 + layer * 10 + metric + 0.5


def record_run(h: History, first: int, end: int, cadence: int = 10) -> None:
    for step in range(first, end, cadence):
        for vi, variant in enumerate(VARIANTS):
            rows = [
                (layer, metric, value_of(step, vi, li, mi))
                for li, layer in enumerate(LAYERS)
                for mi, metric in enumerate(METRICS)
            ]
            h.add_many(step, variant, rows)


# ---------------------------------------------------------------- scalars


def test_add_series_round_trip():
    h = History()
    h.add(0, "bn", "fc1", "mean", 0.25)
    h.add(10, "bn", "fc1", "mean", -1.5)
    h.add(20, "bn", "fc1", "mean", math.inf)  # a diverged value is kept as given
    h.add(30, "bn", "fc1", "mean", math.nan)
    steps, values = h.series("bn", "fc1", "mean")
    assert steps.dtype == np.int64 and values.dtype == np.float64
    np.testing.assert_array_equal(steps, [0, 10, 20, 30])
    np.testing.assert_array_equal(values, [0.25, -1.5, math.inf, math.nan])  # NaN == NaN here


def test_series_are_copies_and_sorted():
    h = History()
    for step in (0, 20, 10, 30):  # an out-of-order step is slotted in
        h.add(step, "bn", "", "loss", float(step))
    h.add(20, "bn", "", "loss", -1.0)  # same step again: last write wins
    steps, values = h.series("bn", "", "loss")
    np.testing.assert_array_equal(steps, [0, 10, 20, 30])
    np.testing.assert_array_equal(values, [0.0, 10.0, -1.0, 30.0])
    values[:] = 99.0
    np.testing.assert_array_equal(h.series("bn", "", "loss")[1], [0.0, 10.0, -1.0, 30.0])


def test_unknown_series_are_empty():
    h = History()
    h.add(0, "bn", "fc1", "mean", 1.0)
    for steps, values in (h.series("bn", "fc1", "std"), h.series("plain", "fc1", "mean")):
        assert steps.shape == (0,) and steps.dtype == np.int64
        assert values.shape == (0,) and values.dtype == np.float64
    assert h.layers("nope") == []


def test_names_in_first_seen_order_without_run_level_layer():
    h = History()
    h.add_many(0, "plain", [("", "loss", 1.0), ("fc2", "mean", 0.0), ("fc1", "std", 1.0)])
    h.add_many(0, "bn", [("fc3", "mean", 0.0), ("", "acc", 0.5), ("fc2", "mean", 0.0)])
    assert h.variants() == ["plain", "bn"]
    assert h.layers() == ["fc2", "fc1", "fc3"]
    assert h.layers("plain") == ["fc2", "fc1"]
    assert h.layers("bn") == ["fc3", "fc2"]
    assert h.metrics() == ["loss", "mean", "std", "acc"]


def test_last_step():
    h = History()
    assert h.last_step() is None
    h.add_many(40, "bn", [("", "loss", 1.0)])
    h.add(30, "plain", "", "loss", 1.0)
    assert h.last_step() == 40


def test_to_frame_matches_direct_construction():
    rng = np.random.default_rng(0)
    h = History()
    expected = []
    # "zeta" is seen first, so variant order is not alphabetical
    for step in range(0, 50, 10):
        for variant in ("zeta", "alpha"):
            rows = []
            for layer in ("fc2", "", "fc1"):
                for metric in ("std", "loss", "mean"):
                    value = float(rng.normal())
                    rows.append((layer, metric, value))
                    expected.append((step, variant, layer, metric, value))
            h.add_many(step, variant, rows)
    want = pd.DataFrame(expected, columns=["step", "variant", "layer", "metric", "value"])
    want["variant_order"] = want["variant"].map({"zeta": 0, "alpha": 1})
    want = (
        want.sort_values(["variant_order", "layer", "metric", "step"])
        .drop(columns="variant_order")
        .reset_index(drop=True)
    )
    got = h.to_frame()
    assert list(got.columns) == ["step", "variant", "layer", "metric", "value"]
    assert got["step"].dtype == np.int64 and got["value"].dtype == np.float64
    pd.testing.assert_frame_equal(got, want)

    sub = h.to_frame(metrics=["mean", "loss"], variants=["alpha"])
    want_sub = want[want["metric"].isin(["mean", "loss"]) & (want["variant"] == "alpha")]
    pd.testing.assert_frame_equal(sub, want_sub.reset_index(drop=True))
    # a bare string is one name, not an iterable of letters
    pd.testing.assert_frame_equal(h.to_frame(metrics="loss"), h.to_frame(metrics=["loss"]))


def test_to_frame_empty_has_columns():
    got = History().to_frame()
    assert list(got.columns) == ["step", "variant", "layer", "metric", "value"]
    assert len(got) == 0


def test_to_csv_round_trip(tmp_path):
    h = History()
    h.add_many(0, "bn", [("", "loss", 2.5), ("fc1", "mean", 1 / 3)])
    h.add_many(10, "bn", [("", "loss", math.inf), ("fc1", "mean", -0.125)])
    path = tmp_path / "run.csv"
    h.to_csv(path)
    back = pd.read_csv(path, keep_default_na=False, na_values=["nan", "NaN"])
    pd.testing.assert_frame_equal(back, h.to_frame())


# ---------------------------------------------------------------- bounding


def check_aligned_bounded(h: History, end: int, cadence: int, max_points: int) -> np.ndarray:
    """Shared checks on every series; returns the common step array."""
    common = None
    for variant in VARIANTS:
        for layer in LAYERS:
            for metric in METRICS:
                steps, _ = h.series(variant, layer, metric)
                assert max_points / 2 < len(steps) <= max_points
                if common is None:
                    common = steps
                np.testing.assert_array_equal(steps, common)  # aligned across all series
    assert common is not None
    assert common[0] == 0
    diffs = np.diff(common)
    assert np.all(diffs == diffs[0]), "kept steps are not evenly spaced"
    last_recorded = (end - 1) // cadence * cadence
    assert 0 <= last_recorded - common[-1] < diffs[0]  # within one stride of the end
    assert np.all(common % h.stride == 0)
    return common


def test_million_steps_bounded_and_aligned():
    max_points, cadence = 1000, 10
    h = History(max_points=max_points)
    n_series = len(VARIANTS) * len(LAYERS) * len(METRICS)
    # each series holds at most max_points + 1 (steps int64 + values float64) slots
    bound = n_series * (max_points + 1) * (8 + 8)

    record_run(h, 0, 500_000, cadence)
    half_bytes = h.nbytes()
    check_aligned_bounded(h, 500_000, cadence, max_points)
    record_run(h, 500_000, 1_000_000, cadence)

    common = check_aligned_bounded(h, 1_000_000, cadence, max_points)
    assert h.last_step() == 999_990
    assert 0 < h.nbytes() <= bound
    assert h.nbytes() == half_bytes  # memory stops growing once the series are full

    # thinning kept the right values, not just the right steps
    for vi, variant in enumerate(VARIANTS):
        for li, layer in enumerate(LAYERS):
            for mi, metric in enumerate(METRICS):
                steps, values = h.series(variant, layer, metric)
                np.testing.assert_array_equal(values, [value_of(s, vi, li, mi) for s in steps])
    frame = h.to_frame()
    assert len(frame) == n_series * len(common)


def test_coarser_series_stay_on_the_fine_grid():
    """An eval metric every 100 steps is thinned by the same stride as the rest."""
    h = History(max_points=50)
    for step in range(0, 20_000, 10):
        h.add(step, "bn", "fc1", "mean", 1.0)
        if step % 100 == 0:
            h.add(step, "bn", "", "val_loss", 2.0)
    fine, _ = h.series("bn", "fc1", "mean")
    coarse, _ = h.series("bn", "", "val_loss")
    assert len(fine) <= 50 and len(coarse) <= 50
    assert set(coarse) <= set(fine)
    np.testing.assert_array_equal(coarse, [s for s in range(0, 20_000, 100) if s % h.stride == 0])


@settings(max_examples=60, deadline=None)
@given(
    max_points=st.integers(1, 40),
    cadence=st.integers(1, 12),
    n_records=st.integers(1, 400),
    n_layers=st.integers(1, 3),
)
def test_kept_steps_are_the_multiples_of_the_stride(max_points, cadence, n_records, n_layers):
    """Reference model: stored steps == recorded steps that are multiples of the final stride."""
    h = History(max_points=max_points)
    recorded = [i * cadence for i in range(n_records)]
    for step in recorded:
        h.add_many(step, "bn", [(f"l{i}", "m", float(step)) for i in range(n_layers)])
    want = [s for s in recorded if s % h.stride == 0]
    for i in range(n_layers):
        steps, values = h.series("bn", f"l{i}", "m")
        np.testing.assert_array_equal(steps, want)
        np.testing.assert_array_equal(values, np.asarray(want, dtype=float))
        assert len(steps) <= max_points
        if n_records > max_points:
            assert len(steps) > max_points / 2
    assert h.stride & (h.stride - 1) == 0  # a power of two
    if h.stride > 1:
        # the previous stride would have kept too many points: no needless thinning
        assert sum(s % (h.stride // 2) == 0 for s in recorded) > max_points


def test_invalid_arguments():
    with pytest.raises(ValueError):
        History(max_points=0)
    with pytest.raises(ValueError):
        History().add(-1, "bn", "", "loss", 1.0)


# ---------------------------------------------------------------- histograms

EDGES = np.linspace(-3.0, 3.0, 21)  # 20 bins


def counts_of(step: int, v: int, layer: int) -> np.ndarray:
    return ((step * 7 + np.arange(20) * 13 + v * 5 + layer) % 997).astype(float)


def test_histograms_bounded_and_exact():
    max_h, cadence, end = 30, 10, 200_000
    h = History(max_histograms=max_h)
    h.set_bin_edges("preact", EDGES)
    h.set_bin_edges("postact", np.linspace(0.0, 3.0, 11))
    for step in range(0, end, cadence):
        for vi, variant in enumerate(VARIANTS):
            for li, layer in enumerate(LAYERS):
                h.add_histogram(step, variant, layer, "preact", counts_of(step, vi, li))
    common = None
    for vi, variant in enumerate(VARIANTS):
        for li, layer in enumerate(LAYERS):
            steps, counts = h.histograms(variant, layer, "preact")
            assert counts.shape == (len(steps), 20) and counts.dtype == np.float64
            assert max_h / 2 < len(steps) <= max_h
            if common is None:
                common = steps
            np.testing.assert_array_equal(steps, common)
            np.testing.assert_array_equal(counts, [counts_of(s, vi, li) for s in steps])
    assert common[0] == 0
    diffs = np.diff(common)
    assert np.all(diffs == diffs[0])
    assert end - cadence - common[-1] < diffs[0]
    # 6 series of max_h + 1 rows (step + 20 counts) plus the two edge arrays
    bound = 6 * (max_h + 1) * (8 + 20 * 8) + (21 + 11) * 8
    assert h.nbytes() <= bound
    # histograms have their own stride: scalars are untouched
    assert h.stride == 1 and diffs[0] > cadence


def test_histograms_empty_and_validation():
    h = History()
    h.set_bin_edges("preact", EDGES)
    steps, counts = h.histograms("bn", "fc1", "preact")
    assert steps.shape == (0,) and counts.shape == (0, 20)
    assert h.histogram_at("bn", "fc1", "preact", 100) is None
    np.testing.assert_array_equal(h.bin_edges("preact"), EDGES)
    with pytest.raises(KeyError):
        h.add_histogram(0, "bn", "fc1", "postact", np.zeros(20))  # no edges for this kind
    with pytest.raises(ValueError):
        h.add_histogram(0, "bn", "fc1", "preact", np.zeros(19))
    with pytest.raises(ValueError):
        h.set_bin_edges("bad", np.array([0.0, 0.0, 1.0]))
    h.add_histogram(0, "bn", "fc1", "preact", np.ones(20))
    with pytest.raises(ValueError):  # counts would be read against the wrong bins
        h.set_bin_edges("preact", np.linspace(0, 1, 21))
    h.set_bin_edges("preact", EDGES.copy())  # the same edges again is fine


def test_histogram_at_nearest_step_at_or_before():
    h = History()
    h.set_bin_edges("preact", EDGES)
    for step in (100, 200, 300):
        h.add_histogram(step, "bn", "fc1", "preact", np.full(20, float(step)))
    for query, want in ((50, 100), (100, 100), (199, 100), (200, 200), (299, 200), (10**9, 300)):
        got = h.histogram_at("bn", "fc1", "preact", query)
        assert got is not None
        step, counts = got
        assert step == want and isinstance(step, int)
        np.testing.assert_array_equal(counts, np.full(20, float(want)))


def test_npz_round_trip(tmp_path):
    h = History()
    h.set_bin_edges("preact", EDGES)
    h.set_bin_edges("postact", np.linspace(0.0, 3.0, 11))
    for step in range(0, 50, 10):
        for vi, variant in enumerate(VARIANTS):
            for li, layer in enumerate(LAYERS[:2]):
                h.add_histogram(step, variant, layer, "preact", counts_of(step, vi, li))
                h.add_histogram(step, variant, layer, "postact", np.arange(10.0) * step)
    path = tmp_path / "hist.npz"
    h.save_histograms_npz(path)
    with np.load(path) as z:
        names = set(z.files)
        assert names == (
            {"preact/edges", "postact/edges"}
            | {
                f"{kind}/{v}/{layer}/{part}"
                for kind in ("preact", "postact")
                for v in VARIANTS
                for layer in LAYERS[:2]
                for part in ("steps", "counts")
            }
        )
        np.testing.assert_array_equal(z["preact/edges"], EDGES)
        for kind in ("preact", "postact"):
            for v in VARIANTS:
                for layer in LAYERS[:2]:
                    steps, counts = h.histograms(v, layer, kind)
                    np.testing.assert_array_equal(z[f"{kind}/{v}/{layer}/steps"], steps)
                    np.testing.assert_array_equal(z[f"{kind}/{v}/{layer}/counts"], counts)


# ---------------------------------------------------------------- events, memory, clear


@pytest.mark.parametrize(
    ("name", "old", "new", "label"),
    [
        ("lr", 0.1, 1.0, "lr 0.1 → 1"),
        ("momentum", 0.0, 0.9, "momentum 0 → 0.9"),
        ("lr", 0.123456, 1e-5, "lr 0.123 → 1e-5"),
        ("bn_momentum", 12345.0, -0.0, "bn_momentum 1.23e4 → 0"),
        ("lr", 1, 2, "lr 1 → 2"),
    ],
)
def test_event_label(name, old, new, label):
    assert Event(10, name, old, new).label == label


def test_add_event():
    h = History()
    event = h.add_event(120, "lr", 0.1, 1)
    assert event == Event(120, "lr", 0.1, 1.0)
    assert isinstance(event.new, float)
    assert h.events == [event]
    with pytest.raises(AttributeError):
        event.step = 5  # frozen


def test_merged_events_keep_the_first_step_and_old_value():
    h = History()
    h.add_event(10, "momentum", 0.0, 0.01)
    h.add_event(12, "lr", 0.5, 1.0)
    h.add_event(15, "momentum", 0.01, 0.02, merge=True)  # folded into momentum's last event
    merged = h.add_event(30, "momentum", 0.02, 0.9, merge=True)
    assert merged == Event(10, "momentum", 0.0, 0.9, until=30)
    assert h.events == [merged, Event(12, "lr", 0.5, 1.0)]
    assert merged.label == "momentum 0 → 0.9"
    assert merged.detail == "momentum 0 → 0.9 over steps 10–30"
    assert h.events[1].detail == "lr 0.5 → 1 at step 12"
    # Back to where the event started after steps trained at the new value: that is a
    # change of its own, and the merged event stays as the run saw it.
    back = h.add_event(31, "momentum", 0.9, 0.0, merge=True)
    assert back == Event(31, "momentum", 0.9, 0.0)
    assert h.events == [merged, Event(12, "lr", 0.5, 1.0), back]
    # Back to where the event started with no step trained in between: nothing changed
    # in the end, and the event goes.
    h.add_event(60, "lr", 1.0, 3.0)
    assert h.add_event(60, "lr", 3.0, 1.0, merge=True) is None
    assert h.events == [merged, Event(12, "lr", 0.5, 1.0), back]
    # None (nan) counts as a value like any other.
    h.add_event(40, "bn_momentum", 0.1, math.nan)
    assert h.add_event(40, "bn_momentum", math.nan, 0.1, merge=True) is None
    # With nothing to merge into, merge=True records a fresh event.
    fresh = History()
    assert fresh.add_event(50, "momentum", 0.0, 0.5, merge=True) == Event(50, "momentum", 0.0, 0.5)


def test_an_events_list_read_before_a_merge_stays_as_it_was():
    """A chart drawn in another thread may be iterating over the events while a tick merges."""
    h = History()
    h.add_event(10, "lr", 0.5, 1.0)
    seen = h.events
    h.add_event(20, "lr", 1.0, 2.0, merge=True)
    assert seen == [Event(10, "lr", 0.5, 1.0)] and h.events == [Event(10, "lr", 0.5, 2.0, 20)]


def test_nbytes_counts_arrays():
    h = History(max_points=1000)
    assert h.nbytes() == 0
    h.add(0, "bn", "", "loss", 1.0)
    small = h.nbytes()
    assert small > 0
    for step in range(10, 5000, 10):
        h.add(step, "bn", "", "loss", 1.0)
    assert small < h.nbytes() <= (1000 + 1) * 16


def test_clear():
    h = History()
    h.set_bin_edges("preact", EDGES)
    h.add_many(0, "bn", [("fc1", "mean", 1.0), ("", "loss", 2.0)])
    h.add_histogram(0, "bn", "fc1", "preact", np.ones(20))
    h.add_event(0, "lr", 0.1, 0.2)
    h.clear()
    assert h.variants() == [] and h.layers() == [] and h.metrics() == []
    assert h.events == [] and h.last_step() is None
    assert h.series("bn", "fc1", "mean")[0].shape == (0,)
    assert h.histograms("bn", "fc1", "preact")[0].shape == (0,)
    assert len(h.to_frame()) == 0
    assert h.nbytes() == EDGES.nbytes  # only the configured bin edges remain
    assert h.stride == 1
    h.add_histogram(0, "bn", "fc1", "preact", np.ones(20))  # edges survive clear()


def test_reads_while_recording_from_another_thread():
    """The UI reads while the trainer writes: every snapshot is a consistent series."""
    h = History(max_points=64)
    done = threading.Event()

    def train():
        for step in range(0, 200_000, 10):
            h.add_many(step, "bn", [("fc1", "mean", float(step)), ("fc1", "std", float(step))])
        done.set()

    thread = threading.Thread(target=train)
    thread.start()
    while not done.is_set():
        steps, values = h.series("bn", "fc1", "mean")
        np.testing.assert_array_equal(values, steps.astype(float))
        if len(steps) > 1:
            assert np.all(np.diff(steps) == steps[1] - steps[0])
    thread.join()
