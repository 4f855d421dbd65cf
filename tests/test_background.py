"""Measures taken on the worker thread (bn_core/background.py and the compiled
lockstep_mlp_telemetry / lockstep_mlp_evaluation): the same numbers as the measures taken
in line, in step order, deterministic, waited for by whoever reads the history."""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd
import pytest
import torch

import bn_core.background as background
import bn_core.train as train_module
from bn_core import native
from bn_core.config import RunConfig
from bn_core.data import load_dataset
from bn_core.probes import BAND_PERCENTILES, FIG1_PERCENTILES
from bn_core.train import Trainer

pytestmark = pytest.mark.skipif(
    native.load_telemetry() is None, reason="the compiled kernel is not built"
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _two_cores(monkeypatch):
    # The worker is only used with a second core; these tests are about what it computes.
    monkeypatch.setattr(background, "_cores", lambda: 2)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, probe_size=50)


def small(**kw) -> RunConfig:
    base = dict(
        dataset="digits",
        depth=2,
        width=16,
        batch_size=32,
        steps=40,
        lr=0.5,
        telemetry_every=5,
        eval_every=10,
        probe_size=50,
        probe_unit=3,
        device="cpu",
        variants=["plain", "batchnorm"],
    )
    return RunConfig(**{**base, **kw})


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
    cfg = small(activation="relu", init_std=1.0, lr=10.0, momentum=0.9, steps=60)
    inline, worker = both(cfg, digits)
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


def block_worker() -> threading.Event:
    """Occupy the shared worker thread until the returned event is set."""
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
    timer.start()
    try:
        t0 = time.perf_counter()
        t.advance(steps=background.MAX_PENDING + 2)
        waited = time.perf_counter() - t0
    finally:
        release.set()
        timer.cancel()
    # The step after MAX_PENDING queued measures waited for the worker.
    assert waited >= 0.4
    assert len(t._background.pending) <= background.MAX_PENDING + 1
    assert t.history.series("plain", "", "loss")[0].tolist() == list(range(6))


def test_where_the_worker_is_not_used(digits, monkeypatch):
    model_reason = background.unavailable_reason
    lenet = small(model="lenet", probe_unit=2)
    assert not Trainer(lenet, digits).measures_in_background
    with pytest.raises(ValueError, match="only a lockstep MLP"):
        Trainer(lenet, digits, background=True)
    noisy = small(variants=["plain", "batchnorm-noisy"])
    assert "NoisyBatchNorm" in model_reason(Trainer(noisy, digits).model, digits.x_probe, "sigmoid")
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
    # float32 interpolation against numpy's float64: within float32 rounding of the data
    atol = 1e-6 * np.abs(flat).max()
    np.testing.assert_allclose(table[:P], np.percentile(flat, percentiles), rtol=1e-6, atol=atol)
    column = values[:, unit].numpy().astype(np.float64)
    np.testing.assert_allclose(
        table[P : P + 3], np.percentile(column, FIG1_PERCENTILES), rtol=1e-6, atol=atol
    )
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
