"""Measures taken on the worker thread (bn_core/background.py and the compiled
lockstep_mlp_telemetry / lockstep_mlp_evaluation): the same numbers as the measures taken
in line, in step order, deterministic, waited for by whoever reads the history."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import pytest
import torch
from small_runs import diverging_config, small

import bn_core.background as background
import bn_core.train as train_module
from bn_core import native
from bn_core.config import RunConfig
from bn_core.data import load_dataset
from bn_core.probes import BAND_PERCENTILES, FIG1_PERCENTILES
from bn_core.train import Trainer

pytestmark = [
    pytest.mark.skipif(native.load_telemetry() is None, reason="the compiled kernel is not built"),
    pytest.mark.usefixtures("one_torch_thread"),
]


_real_cores = background._cores


@pytest.fixture(autouse=True)
def _one_worker(monkeypatch):
    # Workers are only used with a second core; these tests are about what they compute,
    # and block_worker() needs the pool to be a single thread whatever the machine.
    monkeypatch.setattr(background, "_cores", lambda: 2)
    pool = ThreadPoolExecutor(max_workers=1)
    monkeypatch.setattr(background, "_executor", pool)
    yield
    pool.shutdown(wait=True)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, probe_size=50)


def frame(trainer: Trainer) -> pd.DataFrame:
    return (
        trainer.history.to_frame()
        .sort_values(["variant", "layer", "metric", "step"])
        .reset_index(drop=True)
    )


def assert_same_history(inline: Trainer, worker: Trainer) -> None:
    a, b = frame(inline), frame(worker)
    assert len(a) == len(b)
    keys = ["step", "variant", "layer", "metric"]
    pd.testing.assert_frame_equal(a[keys], b[keys])
    np.testing.assert_allclose(b["value"], a["value"], rtol=2e-5, atol=2e-6)
    for variant in inline.variant_names:
        for layer in inline.model.layer_names:
            for kind in ("preact", "postact"):
                sa, ca = inline.history.histograms(variant, layer, kind)
                sb, cb = worker.history.histograms(variant, layer, kind)
                np.testing.assert_array_equal(sa, sb)
                np.testing.assert_array_equal(ca, cb)


def both(cfg: RunConfig, digits) -> tuple[Trainer, Trainer]:
    inline = Trainer(cfg, digits, background=False)
    worker = Trainer(cfg, digits, background=True)
    assert not inline.measures_in_background and worker.measures_in_background
    return inline, worker


@pytest.mark.parametrize(
    "changes",
    [
        dict(variants=["plain", "batchnorm", "batchnorm-naive", "batchnorm-torch"]),
        dict(activation="tanh", placement="after", keep_bias=True, depth=3),
        dict(
            activation="relu",
            init="kaiming",
            variants=["batchnorm", "plain", {"name": "bn2", "norm": "batchnorm", "lr": 0.1}],
        ),
        dict(depth=1, probe_unit=15, variants=[{"name": "a", "norm": "none", "lr": 0.1}]),
        dict(hist_range=0.5, saturation_threshold=0.6, hist_bins=11),
    ],
    ids=["four-norms", "tanh-after-bias", "relu-split-runs", "one-layer", "narrow-bins"],
)
def test_worker_measures_equal_the_inline_measures(digits, changes):
    inline, worker = both(small(**changes), digits)
    inline.advance(steps=40)
    worker.advance(steps=40)
    assert_same_history(inline, worker)
    metrics = set(worker.history.metrics())
    assert {"preact_p15", "saturation", "grad_norm", "test_loss"} <= metrics
    if any(s.uses_bn for s in worker.config.variants):
        assert "running_var_error" in metrics


def test_a_diverged_variant_is_left_out_the_same_way(digits):
    inline, worker = both(diverging_config(), digits)
    inline.advance(steps=60)
    worker.advance(steps=60)
    assert worker.status[0].state == "diverged"
    assert inline.status[0].diverged_at == worker.status[0].diverged_at
    assert_same_history(inline, worker)


def test_same_config_gives_identical_numbers(digits):
    a = Trainer(small(), digits, background=True)
    b = Trainer(small(), digits, background=True)
    for t in (a, b):
        t.advance(steps=23)
        t.advance(steps=17)
    pd.testing.assert_frame_equal(frame(a), frame(b))


def test_measures_read_copies_not_the_live_weights(digits, monkeypatch):
    """A worker that starts each job late, while training goes on: the numbers are still
    the inline ones, so everything the worker reads was copied at the logged step."""
    for name in ("_telemetry_op", "_evaluation_op"):
        op = getattr(native, name)

        def late(*args, _op=op):
            time.sleep(0.02)
            return _op(*args)

        monkeypatch.setattr(native, name, late)
    cfg = small(variants=["plain", "batchnorm", "batchnorm-torch"], telemetry_every=2)
    inline, worker = both(cfg, digits)
    inline.advance(steps=40)
    worker.advance(steps=40)
    assert worker._background.pending  # measures were still out when training stopped
    assert_same_history(inline, worker)


def test_a_failed_measure_raises_once_and_the_rest_are_recorded(digits, monkeypatch):
    op = native._telemetry_op
    calls = []

    def fails_once(*args):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("worker fault")
        return op(*args)

    monkeypatch.setattr(native, "_telemetry_op", fails_once)
    t = Trainer(small(steps=100, eval_every=50), digits, background=True)
    t.wait_for_measures()
    release = block_worker()  # so the fault surfaces when waited for, not mid-advance
    try:
        t.advance(steps=11)  # logged steps 0, 5 (fails) and 10
    finally:
        release.set()
    with pytest.raises(RuntimeError, match="worker fault"):
        t.wait_for_measures()
    assert t.history.series("plain", "layer1", "preact_p50")[0].tolist() == [0, 10]


def test_in_line_measures_keep_their_place_behind_the_worker(digits):
    """ICS rows are measured in line; the history still meets layer1 first."""
    cfg = small(depth=3, ics_every=5, variants=["plain", "batchnorm"])
    inline, worker = both(cfg, digits)
    inline.advance(steps=20)
    worker.advance(steps=20)
    assert worker.history.layers() == ["layer1", "layer2", "layer3"]
    assert worker.history.layers() == inline.history.layers()
    assert_same_history(inline, worker)


@pytest.mark.parametrize(("text", "quota"), [("max 100000", None), ("150000 100000", 1.5)])
def test_container_cpu_limit_caps_the_cores(tmp_path, monkeypatch, text, quota):
    limit = tmp_path / "cpu.max"
    limit.write_text(text + "\n")
    assert background._cpu_quota(limit) == quota
    assert background._cpu_quota(tmp_path / "missing") is None
    monkeypatch.setattr(background, "_cores", _real_cores)  # not the fixture's stand-in
    monkeypatch.setattr(background.os, "sched_getaffinity", lambda _pid: {0, 1, 2, 3})
    monkeypatch.setattr(background, "_cpu_quota", lambda: quota)
    # 4 cores allowed; a 1.5-core limit leaves one, too few for a worker beside training.
    assert background._cores() == (4 if quota is None else 1)


def block_worker() -> threading.Event:
    """Occupy the (single, see _one_worker) worker thread until the returned event is set."""
    release = threading.Event()
    started = threading.Event()

    def hold():
        started.set()
        release.wait(30)

    background._worker().submit(hold)
    assert started.wait(10)
    return release


def test_reading_the_history_waits_for_measures_still_out(digits):
    t = Trainer(small(steps=100, eval_every=50), digits, background=True)
    t.wait_for_measures()  # the step-0 evaluation
    release = block_worker()
    try:
        t.advance(steps=11)  # logged steps 0, 5 and 10 queue behind the blocked worker
        assert len(t._background.pending) == 3
        assert len(t._history.series("plain", "layer1", "preact_p50")[0]) == 0
    finally:
        release.set()
    steps, _ = t.history.series("plain", "layer1", "preact_p50")
    assert steps.tolist() == [0, 5, 10]
    assert steps.tolist() == t.history.series("batchnorm", "", "loss")[0].tolist()
    assert not t._background.pending


def test_a_worker_that_falls_behind_slows_training_down(digits):
    cfg = small(steps=1000, telemetry_every=1, eval_every=1000)
    t = Trainer(cfg, digits, background=True)
    t.wait_for_measures()
    release = block_worker()
    timer = threading.Timer(0.5, release.set)
    t0 = time.perf_counter()
    timer.start()
    try:
        t.advance(steps=background.MAX_PENDING + 2)
        waited = time.perf_counter() - t0
    finally:
        release.set()
        timer.cancel()
    # The logged step after MAX_PENDING queued ones waited for the blocked worker.
    assert waited >= 0.5
    assert len(t._background.pending) <= background.MAX_PENDING
    assert t.history.series("plain", "", "loss")[0].tolist() == list(range(6))


def test_where_the_worker_is_not_used(digits, monkeypatch):
    lenet = small(model="lenet", probe_unit=2)
    assert not Trainer(lenet, digits).measures_in_background
    with pytest.raises(ValueError, match="only a lockstep MLP"):
        Trainer(lenet, digits, background=True)
    noisy = small(variants=["plain", "batchnorm-noisy"])
    reason = background.unavailable_reason(Trainer(noisy, digits).model, digits.x_probe, "sigmoid")
    assert "NoisyBatchNorm" in reason
    assert not Trainer(small(), digits, measure_layers=False).measures_in_background
    assert Trainer(small(), digits).measures_in_background
    monkeypatch.setattr(background, "_cores", lambda: 1)
    assert not Trainer(small(), digits).measures_in_background
    monkeypatch.setattr(native, "_telemetry_op", None)
    monkeypatch.setattr(native, "load", lambda: None)
    with pytest.raises(ValueError, match="not built"):
        Trainer(small(), digits, background=True)


def test_evaluation_in_several_chunks_equals_inline(digits, monkeypatch):
    monkeypatch.setattr(train_module, "_EVAL_CHUNK", 100)  # 360 test examples: 4 chunks
    inline, worker = both(small(variants=["plain", "batchnorm-torch", "batchnorm"]), digits)
    inline.advance(steps=20)
    worker.advance(steps=20)
    assert_same_history(inline, worker)


def direct_op(values: torch.Tensor, unit: int, cuts: torch.Tensor):
    """The compiled measures of a one-layer, one-variant identity MLP: its pre-activations
    are exactly ``values`` (N, C)."""
    N, C = values.shape
    eye = torch.eye(C).unsqueeze(0)
    zeros = torch.zeros(1, 1, C)
    table, counts, dead, grads = native.load_telemetry()(
        values,
        [eye],
        [zeros],
        torch.ones(1, 1, 1),
        [],
        [],
        [],
        [],
        [],
        [],
        2,
        True,
        unit,
        cuts,
        list(FIG1_PERCENTILES + BAND_PERCENTILES),
        list(FIG1_PERCENTILES),
        [torch.ones_like(eye)],
        [zeros],
        [torch.empty(0)],
        torch.tensor([0.1]),
    )
    return table[0, 0].numpy(), counts[0, 0].numpy(), float(dead[0, 0]), grads[0, 0].numpy()


def assert_percentiles(got, values: np.ndarray, percentiles) -> None:
    """numpy's percentiles, to float32 rounding of the two order statistics each one
    interpolates between (the compiled measure interpolates in float32)."""
    ordered = np.sort(values)
    pos = np.asarray(percentiles) / 100 * (len(values) - 1)
    lo, hi = np.floor(pos).astype(int), np.minimum(np.floor(pos).astype(int) + 1, len(values) - 1)
    scale = np.maximum(np.abs(ordered[lo]), np.abs(ordered[hi]))
    want = np.percentile(values, percentiles)
    assert np.all(np.abs(got - want) <= 4e-7 * scale + 1e-45), (got, want)


def test_compiled_counts_and_dead_units_with_nan():
    """NaN sorts last and is never below a cut (as torch.searchsorted on numpy's sort),
    and a unit that saw NaN counts as active, as the inline measure's amax makes it."""
    nan = float("nan")
    # A whole NaN example: the identity product passes it through unchanged.
    values = torch.tensor([[1.0, -1.0, -2.0], [nan, nan, nan], [-1.0, 0.0, -1.0]])
    cuts = torch.tensor([-2.5, -1.0, 0.0, 5.0])
    _, counts, dead, _ = direct_op(values, 0, cuts)
    want = np.searchsorted(np.sort(values.numpy().ravel()), cuts.numpy(), side="left")
    np.testing.assert_array_equal(counts, want)
    assert dead == 0.0  # units 1 and 2 never fire, but saw NaN


@pytest.mark.parametrize("kind", ["normal", "ties", "signed-zeros", "wide-range", "tiny"])
def test_compiled_percentiles_and_counts_match_numpy(kind):
    gen = torch.Generator().manual_seed(7)
    if kind == "normal":
        values = torch.randn(300, 100, generator=gen)
    elif kind == "ties":
        values = torch.randint(-3, 4, (300, 100), generator=gen).float() / 2
    elif kind == "signed-zeros":
        values = torch.where(torch.rand(50, 8, generator=gen) < 0.5, -0.0, 0.0)
        values[0, 0] = -1.0
    elif kind == "wide-range":
        values = torch.randn(40, 9, generator=gen) * 10.0 ** torch.randint(-30, 30, (40, 9))
    else:
        values = torch.randn(2, 3, generator=gen)
    values[:, -1] = -values[:, -1].abs()  # a unit that never fires: a dead ReLU unit
    cuts = torch.tensor([-2.0, -0.5, -0.0, 0.0, 0.25, 1.5, 3.0, 1e30])
    unit = 1
    table, counts, dead, grads = direct_op(values, unit, cuts)
    flat = values.numpy().ravel().astype(np.float64)
    percentiles = FIG1_PERCENTILES + BAND_PERCENTILES
    P = len(percentiles)
    assert_percentiles(table[:P], flat, percentiles)
    column = values[:, unit].numpy().astype(np.float64)
    assert_percentiles(table[P : P + 3], column, FIG1_PERCENTILES)
    np.testing.assert_allclose(table[P + 3], flat.mean(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(table[P + 4], flat.std(ddof=1), rtol=1e-9)
    want = np.searchsorted(np.sort(values.numpy().ravel()), cuts.numpy(), side="left")
    np.testing.assert_array_equal(counts, want)
    active = (values > 0).any(0).numpy()
    assert dead == pytest.approx(1.0 - active.mean())
    # The gradient measures of the all-ones gradient at lr 0.1: ||1|| and std(lr * 1) = 0.
    C = values.shape[1]
    assert grads[0] == pytest.approx(C)
    assert grads[1] == -np.inf
    assert np.isnan(grads[4])
