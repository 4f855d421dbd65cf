"""Trainer: determinism, cadence, telemetry checked against direct computations, live changes,
divergence, devices and bounded history."""

from __future__ import annotations

import copy
import math
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from small_runs import diverging_config, small
from torch import nn
from torch.testing import assert_close

import bn_core.telemetry as telemetry_module
from bn_core.batchnorm import BatchNorm
from bn_core.config import ConfigError, RunConfig, load_preset
from bn_core.data import load_dataset
from bn_core.history import Event
from bn_core.telemetry import STATS_EXAMPLES
from bn_core.train import DeviceUnavailable, Trainer, resolve_device

ACTS = (nn.Sigmoid, nn.Tanh, nn.ReLU)
BN_TYPES = (BatchNorm, nn.BatchNorm1d, nn.BatchNorm2d)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, probe_size=50)


def capture_batches(trainer: Trainer) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Record every training batch the trainer draws from now on."""
    got: list[tuple[torch.Tensor, torch.Tensor]] = []
    draw = trainer._next_batch

    def wrapped():
        x, y = draw()
        got.append((x.clone(), y.clone()))
        return x, y

    trainer._next_batch = wrapped
    return got


def value_at(trainer: Trainer, variant: str, layer: str, metric: str, step: int) -> float:
    steps, values = trainer.history.series(variant, layer, metric)
    hit = np.flatnonzero(steps == step)
    assert len(hit) == 1, f"{variant}/{layer}/{metric} has no point at step {step}: {steps}"
    return float(values[hit[0]])


def run_with_hooks(seq: nn.Sequential, x: torch.Tensor, retain: bool = False):
    """Forward through one variant as plain torch, collecting each activation's in and out."""
    pre, post, bn_in = [], [], []

    def on_act(_m, inputs, output):
        pre.append(inputs[0])
        if retain and output.requires_grad:
            output.retain_grad()
        post.append(output)

    def on_bn(_m, inputs):
        bn_in.append(inputs[0].detach().clone())

    handles = [m.register_forward_hook(on_act) for m in seq if isinstance(m, ACTS)]
    handles += [m.register_forward_pre_hook(on_bn) for m in seq if isinstance(m, BN_TYPES)]
    try:
        out = seq(x)
    finally:
        for h in handles:
            h.remove()
    return out, pre, post, bn_in


# --- determinism and stepping --------------------------------------------------------


def test_same_config_gives_identical_history(digits):
    cfg = small(steps=40)
    a, b = Trainer(cfg, digits), Trainer(cfg, digits)
    assert a.advance(steps=40) == 40 and b.advance(steps=40) == 40
    fa, fb = a.history.to_frame(), b.history.to_frame()
    assert len(fa) > 100
    pd.testing.assert_frame_equal(fa, fb, check_exact=True)
    for variant in ("plain", "batchnorm"):
        sa, ca = a.history.histograms(variant, "layer1", "preact")
        sb, cb = b.history.histograms(variant, "layer1", "preact")
        assert np.array_equal(sa, sb) and np.array_equal(ca, cb)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_default_dataset_loading_is_deterministic_and_seed_matters():
    cfg = small(steps=15)
    a, b, c = Trainer(cfg), Trainer(cfg), Trainer(cfg.replace(seed=1))
    for t in (a, b, c):
        t.advance(steps=15)
    fa, fb, fc = (t.history.to_frame() for t in (a, b, c))
    pd.testing.assert_frame_equal(fa, fb, check_exact=True)
    loss_a = fa[fa.metric == "loss"].value.to_numpy()
    loss_c = fc[fc.metric == "loss"].value.to_numpy()
    assert loss_a.shape == loss_c.shape
    assert not np.array_equal(loss_a, loss_c)


def test_advance_steps_exactly(digits):
    t = Trainer(small(steps=30), digits)
    assert t.step == 0 and not t.finished
    assert t.advance(steps=7) == 7 and t.step == 7
    assert t.advance(steps=1) == 1 and t.step == 8
    assert t.advance(steps=0) == 0 and t.step == 8
    assert [s.state for s in t.status] == ["running", "running"]
    assert t.advance(steps=100) == 22 and t.step == 30  # never past config.steps
    assert t.finished
    assert [s.label for s in t.status] == ["finished", "finished"]
    assert t.advance(steps=5) == 0
    with pytest.raises(ValueError):
        t.advance()
    assert "step 30" in t.status_line() and "plain: finished" in t.status_line()


def test_advance_seconds_budget(digits):
    t = Trainer(small(steps=1_000_000, eval_every=1_000_000), digits)
    assert t.advance(steps=4) == 4
    start = time.perf_counter()
    done = t.advance(seconds=0.05)
    # It stops at the first step that ends past the budget, never before it.
    assert done >= 1 and time.perf_counter() - start >= 0.05
    assert t.step == 4 + done
    assert t.steps_per_second > 0
    # A tiny budget still makes progress.
    assert t.advance(seconds=1e-9) == 1


# --- cadence -------------------------------------------------------------------------


@pytest.mark.parametrize(("steps", "test_steps"), [(60, [0, 20, 40, 60]), (50, [0, 20, 40, 50])])
def test_telemetry_and_eval_cadence(digits, steps, test_steps):
    t = Trainer(small(steps=steps, variants=["plain", "batchnorm-torch"]), digits)
    t.advance(steps=steps)
    train_steps = list(range(0, steps, 5))
    for variant in ("plain", "batchnorm-torch"):
        assert t.history.series(variant, "", "loss")[0].tolist() == train_steps
        for layer in ("layer1", "layer2"):
            for metric in (
                "preact_p15",
                "preact_p50",
                "preact_p85",
                "saturation",
                "grad_norm",
                "update_ratio",
                "unit_p50",
                "preact_band_p0",
            ):
                assert t.history.series(variant, layer, metric)[0].tolist() == train_steps
            hsteps, counts = t.history.histograms(variant, layer, "preact")
            assert hsteps.tolist() == train_steps
            assert counts.shape == (len(train_steps), t.config.hist_bins)
        assert t.history.series(variant, "", "test_loss")[0].tolist() == test_steps
        assert t.history.series(variant, "", "test_accuracy")[0].tolist() == test_steps
    # running-stat errors only for the variant with BN, at evaluation steps.
    steps_err = t.history.series("batchnorm-torch", "layer1", "running_mean_error")[0]
    assert steps_err.tolist() == test_steps
    assert len(t.history.series("plain", "layer1", "running_mean_error")[0]) == 0
    assert t.history.layers() == ["layer1", "layer2"]


# --- telemetry against direct computations ------------------------------------------


@pytest.mark.parametrize("placement", ["before", "after"])
def test_probe_percentiles_saturation_and_histograms_are_direct(digits, placement):
    cfg = small(
        variants=["plain", "batchnorm", "batchnorm-torch"], placement=placement, hist_range=3.0
    )
    t = Trainer(cfg, digits)
    t.advance(steps=10)
    snapshot = copy.deepcopy(t.model)
    t.advance(steps=1)  # step 10 is a telemetry step, measured on the weights after 10 updates
    for v, variant in enumerate(t.variant_names):
        seq = snapshot.to_sequential(v).train()
        with torch.no_grad():
            _, pre, post, _ = run_with_hooks(seq, digits.x_probe)
        assert len(pre) == 2
        for layer, (z, h) in enumerate(zip(pre, post, strict=True)):
            name = f"layer{layer + 1}"
            vals = z.numpy().astype(np.float64).ravel()
            want = np.percentile(vals, [15, 50, 85])
            got = [value_at(t, variant, name, f"preact_p{p}", 10) for p in (15, 50, 85)]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
            unit = z[:, cfg.probe_unit].numpy().astype(np.float64)
            got_unit = [value_at(t, variant, name, f"unit_p{p}", 10) for p in (15, 50, 85)]
            np.testing.assert_allclose(got_unit, np.percentile(unit, [15, 50, 85]), atol=1e-5)
            bands = [0, 6.68, 15.87, 30.85, 50, 69.15, 84.13, 93.32, 100]
            got_bands = [value_at(t, variant, name, f"preact_band_p{p:g}", 10) for p in bands]
            np.testing.assert_allclose(got_bands, np.percentile(vals, bands), rtol=1e-4, atol=1e-5)
            assert abs(value_at(t, variant, name, "preact_mean", 10) - vals.mean()) < 1e-5
            assert abs(value_at(t, variant, name, "preact_std", 10) - vals.std(ddof=1)) < 1e-4
            clipped = np.mean(np.abs(vals) > 3.0)
            assert abs(value_at(t, variant, name, "preact_clipped", 10) - clipped) < 1e-6
            hv = h.numpy().ravel()
            sat = np.mean((hv < 1 - 0.97) | (hv > 0.97))
            assert abs(value_at(t, variant, name, "saturation", 10) - sat) < 1e-6
            hsteps, counts = t.history.histograms(variant, name, "preact")
            row = counts[list(hsteps).index(10)]
            want_hist = np.histogram(np.clip(vals, -3, 3), bins=cfg.hist_bins, range=(-3, 3))[0]
            assert row.sum() == vals.size
            assert np.abs(row - want_hist).sum() <= 4  # float32 values on a bin edge may move
            psteps, pcounts = t.history.histograms(variant, name, "postact")
            prow = pcounts[list(psteps).index(10)]
            want_post = np.histogram(hv, bins=cfg.hist_bins, range=(0, 1))[0]
            assert np.abs(prow - want_post).sum() <= 4
    edges = t.history.bin_edges("preact")
    np.testing.assert_allclose(edges, np.linspace(-3, 3, cfg.hist_bins + 1), atol=1e-6)


def test_grad_norm_update_ratio_and_bias_norm_are_direct(digits):
    cfg = small(variants=["plain", "batchnorm", {"name": "fast", "norm": "none", "lr": 2.0}])
    t = Trainer(cfg, digits)
    t.advance(steps=10)
    snapshot = copy.deepcopy(t.model)
    batches = capture_batches(t)
    t.advance(steps=1)
    x, y = batches[0]
    for v, variant in enumerate(t.variant_names):
        lr = 2.0 if variant == "fast" else 0.5
        seq = snapshot.to_sequential(v).train()
        logits, _, post, _ = run_with_hooks(seq, x, retain=True)
        F.cross_entropy(logits, y).backward()
        lins = [m for m in seq if isinstance(m, nn.Linear)][:-1]
        for layer, (lin, h) in enumerate(zip(lins, post, strict=True)):
            name = f"layer{layer + 1}"
            g, W = lin.weight.grad, lin.weight.detach()
            got = value_at(t, variant, name, "grad_norm", 10)
            assert abs(got - g.norm().item()) <= 1e-4 * g.norm().item() + 1e-7
            # Plain SGD: the applied step is lr * grad.
            ratio = math.log10((lr * g).std().item() / W.std().item())
            assert abs(value_at(t, variant, name, "update_ratio", 10) - ratio) < 1e-3
            assert abs(value_at(t, variant, name, "out_grad_norm", 10) - h.grad.norm().item()) < (
                1e-4 * h.grad.norm().item() + 1e-7
            )
            bias = 0.0 if lin.bias is None else lin.bias.detach().norm().item()
            assert abs(value_at(t, variant, name, "bias_norm", 10) - bias) < 1e-6
        if variant == "batchnorm":
            assert value_at(t, variant, "layer1", "bias_norm", 10) == 0.0
        else:
            assert value_at(t, variant, "layer1", "bias_norm", 10) > 0.0


@pytest.mark.parametrize(
    "optimizer, momentum",
    [("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0)],
    ids=["sgd", "momentum", "adam"],
)
def test_update_ratio_is_the_step_actually_taken(digits, optimizer, momentum):
    lr = 0.01 if optimizer == "adam" else 0.5
    t = Trainer(small(optimizer=optimizer, momentum=momentum, lr=lr, telemetry_every=10), digits)
    t.advance(steps=20)  # momentum buffers and Adam's moments are warm
    before = [s.weight.detach().clone().double() for s in t.model.layer_stacks()]
    t.advance(steps=1)  # step 20 is logged
    after = [s.weight.detach().double() for s in t.model.layer_stacks()]
    for li, name in enumerate(t.model.layer_names):
        for v, variant in enumerate(t.variant_names):
            W0, W1 = before[li][v], after[li][v]
            want = math.log10((W1 - W0).std().item() / W0.std().item())
            assert abs(value_at(t, variant, name, "update_ratio", 20) - want) < 1e-3
            if optimizer == "adam":
                # Adam's step is about lr per element whatever the gradient's size, so
                # Karpathy's lr * grad form misses it by decades.
                g = t.model.layer_stacks()[li].weight_grad[v].double()
                naive = math.log10((lr * g).std().item() / W0.std().item())
                assert want - naive > 0.5, (want, naive)


def test_loss_is_the_mean_over_the_telemetry_window(digits):
    every = Trainer(small(steps=11, telemetry_every=1), digits)
    batches = capture_batches(every)
    first = copy.deepcopy(every.model)
    every.advance(steps=11)
    windowed = Trainer(small(steps=11, telemetry_every=5), digits)
    windowed.advance(steps=11)
    for v, variant in enumerate(every.variant_names):
        per_step = every.history.series(variant, "", "loss")[1]
        assert len(per_step) == 11
        # Step 0's loss, computed directly.
        x, y = batches[0]
        with torch.no_grad():
            direct = F.cross_entropy(first.to_sequential(v).train()(x), y).item()
        assert abs(per_step[0] - direct) < 1e-5
        steps, values = windowed.history.series(variant, "", "loss")
        assert steps.tolist() == [0, 5, 10]
        assert values[0] == per_step[0]
        assert abs(values[1] - per_step[1:6].mean()) < 1e-6
        assert abs(values[2] - per_step[6:11].mean()) < 1e-6


@pytest.mark.parametrize("eval_chunk", [None, 100])
def test_test_metrics_and_running_stat_errors_are_direct(digits, eval_chunk, monkeypatch):
    """Also with a test set of several evaluation chunks, the last one partial."""
    if eval_chunk is not None:
        monkeypatch.setattr(telemetry_module, "EVAL_CHUNK", eval_chunk)
        assert digits.x_test.shape[0] % eval_chunk != 0
    cfg = small(variants=["plain", "batchnorm", "batchnorm-naive", "batchnorm-torch"])
    t = Trainer(cfg, digits)
    t.advance(steps=20)  # step 20 is an evaluation step, measured after 20 updates
    model = copy.deepcopy(t.model)
    for v, variant in enumerate(t.variant_names):
        seq = model.to_sequential(v).eval()
        with torch.no_grad():
            logits = seq(digits.x_test)
        loss = F.cross_entropy(logits, digits.y_test).item()
        acc = (logits.argmax(1) == digits.y_test).double().mean().item()
        assert abs(value_at(t, variant, "", "test_loss", 20) - loss) < 1e-5
        assert abs(value_at(t, variant, "", "test_accuracy", 20) - acc) < 1e-6
        if v == 0:
            continue
        seq = model.to_sequential(v).train()
        stats = [
            (m.running_mean.clone(), m.running_var.clone()) for m in seq if isinstance(m, BN_TYPES)
        ]
        with torch.no_grad():
            _, _, _, bn_in = run_with_hooks(seq, digits.x_train[:STATS_EXAMPLES])
        for layer, ((rm, rv), z) in enumerate(zip(stats, bn_in, strict=True)):
            name = f"layer{layer + 1}"
            mean_err = (rm - z.mean(0)).abs().mean().item()
            var_err = (rv - z.var(0)).abs().mean().item()
            assert abs(value_at(t, variant, name, "running_mean_error", 20) - mean_err) < 1e-5
            assert abs(value_at(t, variant, name, "running_var_error", 20) - var_err) < 1e-5


def test_probe_and_eval_passes_leave_bn_buffers_alone(digits):
    cfg = small(variants=["plain", "batchnorm", "batchnorm-torch"], eval_every=4, steps=15)
    logged = Trainer(cfg.replace(telemetry_every=1), digits)
    quiet = Trainer(cfg.replace(telemetry_every=100_000), digits)
    logged.advance(steps=15)
    quiet.advance(steps=15)
    sa, sb = logged.model.state_dict(), quiet.model.state_dict()
    assert sa.keys() == sb.keys()
    assert any("running_mean" in k for k in sa)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def test_bn_running_stats_see_only_the_training_batch(digits):
    """After one logged step, layer 1's running mean moved by exactly momentum * batch mean."""
    t = Trainer(small(variants=["batchnorm", "batchnorm-torch"], telemetry_every=1), digits)
    before = copy.deepcopy(t.model)
    batches = capture_batches(t)
    t.advance(steps=1)
    x, _ = batches[0]
    for v in range(2):
        z = x @ before.weights[0][v]  # BN input of layer 1 (its bias is dropped)
        rm0, rv0 = before.bn_running_stats(v)[0]
        rm, rv = t.model.bn_running_stats(v)[0]
        assert_close(rm, 0.9 * rm0 + 0.1 * z.mean(0), rtol=1e-5, atol=1e-6)
        assert_close(rv, 0.9 * rv0 + 0.1 * z.var(0), rtol=1e-5, atol=1e-6)


# --- live changes --------------------------------------------------------------------


def test_set_live_lr_changes_the_next_update(digits):
    variants = ["plain", "batchnorm", {"name": "fixed", "norm": "none", "lr": 0.05}]
    t = Trainer(small(lr=0.1, momentum=0.0, variants=variants), digits)
    t.advance(steps=3)
    events = t.set_live(lr=0.3)
    assert events == [Event(3, "lr", 0.1, 0.3)]
    assert t.history.events == events
    assert t.live["lr"] == 0.3
    assert t.optimizer.lrs == [0.3, 0.3, 0.05]
    assert t.set_live(lr=0.3) == []  # no change, no event
    before = [W.detach().clone() for W in t.model.weights]
    t.advance(steps=1)
    for W, W0 in zip(t.model.weights, before, strict=True):
        delta = W.detach() - W0
        for v, lr in enumerate([0.3, 0.3, 0.05]):
            assert_close(delta[v], -lr * W.grad[v], rtol=1e-5, atol=1e-7)
            assert delta[v].abs().amax() > 0


def test_set_live_changes_in_quick_succession_are_one_event(digits):
    t = Trainer(small(lr=0.1, momentum=0.0), digits)
    t.advance(steps=2)
    assert t.set_live(momentum=0.3) == [Event(2, "momentum", 0.0, 0.3)]
    # Same step, nothing trained in between: the same change, whatever the caller says.
    assert t.set_live(momentum=0.5) == [Event(2, "momentum", 0.0, 0.5)]
    t.advance(steps=3)
    assert t.set_live(momentum=0.7) == [Event(5, "momentum", 0.5, 0.7)]  # a new change
    t.advance(steps=1)
    # merge=True: a UI says the change came in quick succession of the last one.
    assert t.set_live(merge=True, momentum=0.9) == [Event(5, "momentum", 0.5, 0.9, until=6)]
    assert t.optimizer.momentum == 0.9
    assert [e.label for e in t.history.events] == ["momentum 0 → 0.5", "momentum 0.5 → 0.9"]
    # Changed back to where its event started after a step trained at 0.9: a change of
    # its own, so the charts still show the step that ran at 0.9.
    assert t.set_live(merge=True, momentum=0.5) == [Event(6, "momentum", 0.9, 0.5)]
    assert t.live["momentum"] == t.optimizer.momentum == 0.5
    # Changed and changed back within one step, nothing trained in between: no event.
    t.advance(steps=1)
    assert t.set_live(momentum=0.2) == [Event(7, "momentum", 0.5, 0.2)]
    assert t.set_live(merge=True, momentum=0.5) == []
    labels = [e.label for e in t.history.events]
    assert labels == ["momentum 0 → 0.5", "momentum 0.5 → 0.9", "momentum 0.9 → 0.5"]
    assert t.live["momentum"] == t.optimizer.momentum == 0.5


def test_a_jump_to_a_large_rate_kills_the_plain_net_and_not_bn(one_torch_thread):
    """The live page's "×20 now" lesson: the Figure 1 nets, trained 250 steps at 0.5, then
    10 in one change. The plain net, its weights tuned to the small rate, falls to chance;
    BN trains on. (Raised a notch every 150 steps or more instead, the plain net adapts on
    seeds 0-2: too long a run for the suite.)"""
    t = Trainer(load_preset("ioffe-fig1").replace(steps=650, device="cpu"))
    t.advance(steps=250)
    t.set_live(lr=10.0)
    t.advance(steps=400)
    accuracy = {v: t.history.series(v, "", "test_accuracy")[1][-1] for v in t.variant_names}
    assert accuracy["plain"] < 0.2 and accuracy["batchnorm"] > 0.9, accuracy


def test_set_live_momentum(digits):
    t = Trainer(small(lr=0.1, momentum=0.5), digits)
    t.advance(steps=4)
    i = next(k for k, p in enumerate(t.optimizer.params) if p is t.model.weights[0])
    buf_before = t.optimizer.state[i].clone()
    W0 = t.model.weights[0].detach().clone()
    assert t.set_live(momentum=0.9) == [Event(4, "momentum", 0.5, 0.9)]
    t.advance(steps=1)
    g = t.model.weights[0].grad
    buf = t.optimizer.state[i]
    assert_close(buf, 0.9 * buf_before + g, rtol=1e-5, atol=1e-7)
    assert_close(t.model.weights[0].detach() - W0, -0.1 * buf, rtol=1e-5, atol=1e-7)


def test_set_live_bn_momentum(digits):
    t = Trainer(small(variants=["plain", "batchnorm", "batchnorm-torch"]), digits)
    t.advance(steps=4)
    assert t.set_live(bn_momentum=0.5) == [Event(4, "bn_momentum", 0.1, 0.5)]
    bn_modules = [m for m in t.model.modules() if isinstance(m, BN_TYPES)]
    assert len(bn_modules) == 4  # 2 layers x 2 BN kinds
    assert all(m.momentum == 0.5 for m in bn_modules)
    before = copy.deepcopy(t.model)
    batches = capture_batches(t)
    t.advance(steps=1)
    x, _ = batches[0]
    for v in (1, 2):
        z = x @ before.weights[0][v]
        rm0, _ = before.bn_running_stats(v)[0]
        rm, _ = t.model.bn_running_stats(v)[0]
        assert_close(rm, 0.5 * rm0 + 0.5 * z.mean(0), rtol=1e-5, atol=1e-6)
    (event,) = t.set_live(bn_momentum=None)
    assert (event.step, event.name, event.old) == (5, "bn_momentum", 0.5) and math.isnan(event.new)
    assert all(m.momentum is None for m in bn_modules)


@pytest.mark.parametrize(
    "changes",
    [
        {"lr": 11.0},
        {"lr": 0.0},
        {"lr": math.nan},
        {"lr": True},
        {"lr": "0.1"},
        {"momentum": 1.0},
        {"momentum": -0.1},
        {"bn_momentum": 0.0},
        {"width": 8},
        {"lr": 0.2, "momentum": 2.0},  # one bad value: nothing applied
        {"momentum": 0.3, "bn_momentum": 5.0},
    ],
)
def test_set_live_refuses_bad_values_and_changes_nothing(digits, changes):
    t = Trainer(small(lr=0.1, momentum=0.0), digits)
    t.advance(steps=2)
    live = dict(t.live)
    lrs = list(t.optimizer.lrs)
    momentum = t.optimizer.momentum
    bn_m = [m.momentum for m in t.model.modules() if isinstance(m, BN_TYPES)]
    with pytest.raises(ConfigError) as info:
        t.set_live(**changes)
    assert "allowed" in str(info.value)
    assert t.live == live
    assert t.optimizer.lrs == lrs
    assert t.optimizer.momentum == momentum
    assert [m.momentum for m in t.model.modules() if isinstance(m, BN_TYPES)] == bn_m
    assert t.history.events == []


# --- divergence ----------------------------------------------------------------------


def test_plain_diverges_while_batchnorm_trains_on(digits):
    t = Trainer(diverging_config(), digits)
    batches = capture_batches(t)
    snapshots = []
    while t.status[0].state == "running" and not t.finished:
        snapshots.append(copy.deepcopy(t.model))
        t.advance(steps=1)
    plain, bn = t.status
    assert plain.state == "diverged"
    n = plain.diverged_at
    assert plain.label == f"diverged at step {n}"
    assert t.step == n + 1
    # The loss is non-finite at step n and was finite at step n - 1.
    with torch.no_grad():
        x, y = batches[n]
        loss_n = F.cross_entropy(snapshots[n](x)[0][0], y).item()
        assert not math.isfinite(loss_n)
        if n > 0:
            x, y = batches[n - 1]
            assert math.isfinite(F.cross_entropy(snapshots[n - 1](x)[0][0], y).item())
    t.advance(steps=1000)
    assert t.step == 60
    assert plain.state == "diverged" and plain.diverged_at == n
    assert bn.state == "finished"
    frame = t.history.to_frame()
    plain_rows = frame[frame.variant == "plain"]
    assert plain_rows.step.max() <= n
    assert np.isfinite(plain_rows[plain_rows.metric == "loss"].value).all()
    assert value_at(t, "batchnorm", "", "test_accuracy", 60) > 0
    assert t.history.series("batchnorm", "", "loss")[0][-1] == 55
    bn_loss = t.history.series("batchnorm", "", "loss")[1]
    assert np.isfinite(bn_loss).all()
    assert t.optimizer.lrs[0] == 0.0
    assert "plain: diverged at step" in t.status_line()


def test_a_run_whose_only_variant_diverges_stops(digits):
    t = Trainer(diverging_config(variants=["plain"]), digits)
    done = t.advance(steps=60)
    (status,) = t.status
    assert status.state == "diverged"
    assert t.finished
    assert done == status.diverged_at + 1 < 60


# --- devices, limits, bounded history ------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_cuda_without_gpu_is_a_config_error(digits):
    with pytest.raises(DeviceUnavailable) as info:
        Trainer(small(device="cuda"), digits)
    err = info.value
    assert isinstance(err, ConfigError)
    assert err.field == "device" and err.value == "cuda"
    assert str(err).startswith("device = 'cuda': ") and "allowed" in str(err)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if not has_mps:
        with pytest.raises(DeviceUnavailable, match="^device = 'mps'"):
            resolve_device("mps")


def test_batch_larger_than_the_training_set(digits):
    with pytest.raises(ConfigError, match="^batch_size = 4000: allowed"):
        Trainer(small(batch_size=4000), digits)


def test_history_stays_bounded(digits):
    cfg = small(steps=150, telemetry_every=1, eval_every=1, max_points=10, max_histograms=10)
    t = Trainer(cfg, digits)
    t.advance(steps=150)
    frame = t.history.to_frame()
    counts = frame.groupby(["variant", "layer", "metric"]).size()
    assert counts.max() <= 10
    assert counts.min() >= 5  # thinning halves, never empties
    stride = t.history.stride
    assert (frame.step % stride == 0).all()
    for variant in ("plain", "batchnorm"):
        steps, counts_h = t.history.histograms(variant, "layer2", "preact")
        assert 5 <= len(steps) <= 10 and counts_h.shape[0] == len(steps)


def test_lenet_trains_with_telemetry(digits):
    cfg = RunConfig(
        model="lenet",
        dataset="digits",
        batch_size=16,
        steps=6,
        telemetry_every=3,
        eval_every=3,
        probe_size=50,
        probe_unit=2,
        device="cpu",
        lr=0.1,
    )
    t = Trainer(cfg, digits)
    assert t.advance(steps=6) == 6
    for variant in ("plain", "batchnorm"):
        for layer in ("conv1", "conv2", "fc1", "fc2"):
            assert t.history.series(variant, layer, "preact_p50")[0].tolist() == [0, 3]
            assert t.history.series(variant, layer, "unit_p50")[0].tolist() == [0, 3]
            assert t.history.series(variant, layer, "grad_norm")[0].tolist() == [0, 3]
        assert t.history.series(variant, "", "test_accuracy")[0].tolist() == [0, 3, 6]
    errs = t.history.series("batchnorm", "conv1", "running_mean_error")[0]
    assert errs.tolist() == [0, 3, 6]


def test_a_small_run_learns(digits):
    t = Trainer(small(steps=150, width=32, eval_every=150), digits)
    t.advance(steps=150)
    plain = t.history.series("plain", "", "test_accuracy")[1]
    bn = t.history.series("batchnorm", "", "test_accuracy")[1]
    assert plain[0] < 0.3 and bn[0] < 0.3  # chance is 0.1
    # Fig. 1(a) in small: both learn, BN faster.
    assert plain[-1] > 0.4 and bn[-1] > 0.85 and bn[-1] > plain[-1], (plain, bn)


@pytest.mark.parametrize("model", ["mlp", "lenet"])
def test_without_layer_measures_the_run_and_its_losses_are_the_same(digits, model):
    # The sweep page shows end points only, so its trainers skip the per-layer measures;
    # training must not notice, and the losses and test metrics must be the very same.
    cfg = small(model=model, variants=["plain", "batchnorm"], steps=40, eval_every=10)
    full, lean = Trainer(cfg, digits), Trainer(cfg, digits, measure_layers=False)
    full.advance(steps=40)
    lean.advance(steps=40)
    trained = zip(full.model.state_dict().items(), lean.model.state_dict().items(), strict=True)
    for (name, a), (_, b) in trained:
        assert torch.equal(a, b), name
    for variant in full.variant_names:
        for metric in ("loss", "test_loss", "test_accuracy"):
            steps_full, values_full = full.history.series(variant, "", metric)
            steps_lean, values_lean = lean.history.series(variant, "", metric)
            assert len(steps_full) > 2
            assert np.array_equal(steps_full, steps_lean)
            assert np.array_equal(values_full, values_lean)
    assert set(full.history.metrics()) > {"loss", "test_loss", "test_accuracy"}
    assert set(lean.history.metrics()) == {"loss", "test_loss", "test_accuracy"}
    assert lean.history.layers() == [] and full.history.layers() != []
    # The sweep's own trainers are built this way.
    from bn_core.experiments.sweep import LrSweep

    sweep = LrSweep(cfg, [0.1, 1.0], steps=20, dataset=digits)
    assert all(not t.measure_layers for t in sweep.trainers)


# --- the promise: the code that trains is the code a student reads -----------------------
def graph_nodes(root: torch.autograd.graph.Node) -> list[torch.autograd.graph.Node]:
    """Every node of an autograd graph reachable from ``root``, each once."""
    seen, stack, nodes = set(), [root], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        nodes.append(node)
        stack.extend(child for child, _ in node.next_functions)
    return nodes


def watch_graphs(trainer: Trainer) -> list[list[str]]:
    """The node names of each coming step's autograd graph, read off its losses."""
    graphs: list[list[str]] = []
    own_loss = trainer.loss_fn

    def loss_and_graph(logits, y):
        losses = own_loss(logits, y)
        graphs.append([node.name() for node in graph_nodes(losses.grad_fn)])
        return losses

    trainer.loss_fn = loss_and_graph
    return graphs


def test_default_live_run_trains_every_bn_layer_through_the_one_function():
    config = load_preset("ioffe-fig1")  # the live page's default set-up
    trainer = Trainer(config)
    bn_modules = [m for m in trainer.model.modules() if isinstance(m, BN_TYPES)]
    assert bn_modules and all(type(m) is BatchNorm for m in bn_modules)
    graphs = watch_graphs(trainer)
    trainer.advance(steps=20)
    assert len(graphs) == 20
    for names in graphs:
        # One node of the Function per BN layer, and no other normalization node
        # (torch's NativeBatchNormBackward0, CudnnBatchNormBackward0, ...).
        assert names.count("BatchNormFunctionBackward") == len(bn_modules)
        others = [n for n in names if "norm" in n.lower() and n != "BatchNormFunctionBackward"]
        assert others == []
    # The parameters' gradients came back through it.
    for m in bn_modules:
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0


def test_normalizer_variants_train_through_their_own_function_and_are_measured(digits):
    """LayerNorm, GroupNorm and RMSNorm beside plain and BN: each step's graph has one node
    of our Functions per normalized layer and no torch normalization node, and every
    measure the charts read exists for every variant."""
    norms = ["plain", "batchnorm", "layernorm", "groupnorm", "rmsnorm"]
    trainer = Trainer(small(variants=norms, steps=30, eval_every=10), digits)
    graphs = watch_graphs(trainer)
    trainer.advance(steps=30)
    depth = trainer.config.depth
    for names in graphs:
        assert names.count("BatchNormFunctionBackward") == depth
        # LayerNorm, GroupNorm and RMSNorm normalize every hidden layer in one call, as
        # one ExampleNormStack
        assert names.count("ExampleNormFunctionBackward") == depth
        ours = ("BatchNormFunctionBackward", "ExampleNormFunctionBackward")
        assert [n for n in names if "norm" in n.lower() and n not in ours] == []
    metrics = ("unit_p50", "preact_band_p50", "saturation", "grad_norm", "update_ratio")
    for variant in norms:
        for metric in metrics:
            steps, values = trainer.history.series(variant, "layer2", metric)
            assert len(steps) >= 3 and np.isfinite(values).all(), (variant, metric)
        assert len(trainer.history.histograms(variant, "layer1", "preact")[0]) >= 3
    # Running statistics, and their errors, belong to BN alone.
    assert trainer.history.series("batchnorm", "layer2", "running_var_error")[0].size
    for variant in ("plain", "layernorm", "groupnorm", "rmsnorm"):
        assert trainer.history.series(variant, "layer2", "running_var_error")[0].size == 0


def test_a_sweep_trains_every_normalization_it_is_given(digits):
    from bn_core.experiments.sweep import LrSweep

    norms = ("none", "layernorm", "groupnorm", "rmsnorm")
    sweep = LrSweep(small(), [0.1, 1.0], norms=norms, steps=20, dataset=digits)
    while not sweep.finished:
        sweep.advance(1.0)
    result = sweep.result()
    labels = {p.label for p in result.points}
    assert labels == {"plain", "layernorm", "groupnorm", "rmsnorm"}
    assert all(np.isfinite(p.loss) for p in result.points)


def test_skipping_the_steps_the_bounded_history_drops_changes_nothing_it_keeps(digits):
    # With 12 points per series the history thins from step 60 on (probes every 5 steps)
    # and the trainer stops measuring the steps it would drop (bench/ times the saving);
    # what it keeps must equal the same steps of a run that kept everything.
    cfg = small(steps=200, eval_every=1000)
    bounded = Trainer(cfg.replace(max_points=12, max_histograms=10), digits)
    full = Trainer(cfg.replace(max_points=10_000, max_histograms=10_000), digits)
    bounded.advance(steps=200)
    full.advance(steps=200)
    assert bounded.history.stride > 1
    for variant in bounded.variant_names:
        for metric in ("preact_p50", "unit_p85", "grad_norm", "update_ratio", "saturation"):
            steps, values = bounded.history.series(variant, "layer2", metric)
            all_steps, all_values = full.history.series(variant, "layer2", metric)
            assert len(steps) > 3
            np.testing.assert_array_equal(values, all_values[np.isin(all_steps, steps)])
        steps, counts = bounded.history.histograms(variant, "layer1", "postact")
        all_steps, all_counts = full.history.histograms(variant, "layer1", "postact")
        np.testing.assert_array_equal(counts, all_counts[np.isin(all_steps, steps)])
