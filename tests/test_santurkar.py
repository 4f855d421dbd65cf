"""Santurkar et al.'s measurements: ICS (G vs G'), noisy BN, landscape probes, the LR sweep.

Each measure is checked against a direct computation on plain torch modules, and every
measurement is checked to leave the run it measures bit for bit as it was.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bn_core.__main__ import main
from bn_core.batchnorm import (
    BatchNorm,
    NoiseSettings,
    NoisyBatchNorm,
    draw_bn_noise,
    noise_states,
)
from bn_core.config import ConfigError, RunConfig, from_query, load_preset, to_query
from bn_core.data import load_dataset
from bn_core.experiments import make_trainer
from bn_core.experiments.ics import (
    claims_summary,
    measure_ics,
    shifted_gradient,
    steps_to_accuracy,
)
from bn_core.experiments.landscape import LANDSCAPE_METRICS, eta_grid, probe_landscape
from bn_core.experiments.sweep import (
    LrSweep,
    SweepPoint,
    SweepResult,
    lr_grid,
    usable_range_text,
    usable_ranges,
)
from bn_core.models import LockstepMLP, preserved_state, variant_losses
from bn_core.train import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, probe_size=50)


def small_net(variants, *, depth=2, lrs=None, seed=0):
    """A float64 lockstep MLP (5 inputs, 3 classes) and a batch for it."""
    specs = [
        {"name": v, "norm": "none" if v == "plain" else v, **({"lr": lrs[i]} if lrs else {})}
        for i, v in enumerate(variants)
    ]
    config = RunConfig(
        depth=depth, width=6, activation="tanh", variants=specs, seed=seed, probe_unit=0
    )
    model = LockstepMLP(config, input_dim=5, num_classes=3).double()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # break the symmetry of zero biases and unit gammas
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    x = torch.randn(12, 5, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=gen)
    return model, x, y


def sequential_loss(seq: nn.Sequential, x, y) -> torch.Tensor:
    return F.cross_entropy(seq(x), y)


def linears(seq: nn.Sequential) -> list[nn.Linear]:
    return [m for m in seq if isinstance(m, nn.Linear)]


def layer_modules(seq: nn.Sequential, layer: int) -> list[nn.Module]:
    """The modules of hidden layer ``layer`` in a to_sequential copy: Linear and its BN."""
    out, seen = [], -1
    for m in seq:
        if isinstance(m, nn.Linear):
            seen += 1
        if seen == layer and not isinstance(m, nn.Tanh | nn.Sigmoid | nn.ReLU):
            out.append(m)
    return out


# --- ICS: G' against a direct computation ----------------------------------------------------
@pytest.mark.parametrize("variants", [["plain", "batchnorm"], ["batchnorm", "plain"]])
def test_shifted_gradient_equals_updating_the_earlier_layer_by_hand(variants):
    model, x, y = small_net(variants)
    lr = 0.3
    copies = [model.to_sequential(v) for v in range(len(variants))]
    params = list(model.parameters())
    variant_losses(model(x)[0], y).sum().backward()
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p in params:
            p.sub_(lr * p.grad)
    after = [p.detach().clone() for p in params]
    with preserved_state(model, params):
        G_shift = shifted_gradient(model, variant_losses, x, y, params, before, after, layer=1)
    for p, a in zip(params, after, strict=True):
        assert torch.equal(p, a)  # restored

    for v, seq in enumerate(copies):
        # The direct way: a torch Sequential, its first layer stepped by hand.
        G = torch.autograd.grad(sequential_loss(seq, x, y), linears(seq)[1].weight)[0]
        first = [p for m in layer_modules(seq, 0) for p in m.parameters()]
        grads = torch.autograd.grad(sequential_loss(seq, x, y), first)
        with torch.no_grad():
            for p, g in zip(first, grads, strict=True):
                p.sub_(lr * g)
        expected = torch.autograd.grad(sequential_loss(seq, x, y), linears(seq)[1].weight)[0]
        # Lockstep weights are (in, out); torch's Linear stores (out, in).
        torch.testing.assert_close(G_shift[v], expected.T.flatten(), rtol=1e-10, atol=1e-12)
        assert not torch.allclose(G_shift[v], G.T.flatten())  # the update did move it

    measured = measure_ics(model, variant_losses, x, y, params, before)
    assert list(measured) == ["layer2"]  # layer 1 has nothing below it
    l2, cos = measured["layer2"]
    G_rows = model.variant_rows([model.weights[1].grad])
    torch.testing.assert_close(l2, (G_rows - G_shift).norm(dim=1))
    torch.testing.assert_close(cos, F.cosine_similarity(G_rows, G_shift, dim=1))


def test_ics_of_a_deeper_net_updates_only_the_layers_below():
    model, x, y = small_net(["plain"], depth=3)
    params = list(model.parameters())
    variant_losses(model(x)[0], y).sum().backward()
    before = [p.detach().clone() for p in params]
    with torch.no_grad():
        model.weights[1].sub_(0.5 * model.weights[1].grad)  # only layer 2 moves
    measured = measure_ics(model, variant_losses, x, y, params, before)
    assert list(measured) == ["layer2", "layer3"]
    # Layer 2's G' sees layer 1 (unchanged) and itself at the old value: no shift.
    assert measured["layer2"][0].item() < 1e-14
    assert measured["layer2"][1].item() == pytest.approx(1.0)
    assert measured["layer3"][0].item() > 1e-6  # layer 2 below it moved


# --- landscape probes against a direct computation -------------------------------------------
def test_landscape_probe_matches_stepping_each_net_by_hand():
    variants, lrs = ["plain", "batchnorm"], [0.1, 0.3]
    model, x, y = small_net(variants, lrs=lrs)
    copies = [model.to_sequential(v) for v in range(2)]
    params = list(model.parameters())
    variant_losses(model(x)[0], y).sum().backward()
    owners = [model.variant_index_of(p) for p in params]
    table = torch.tensor(lrs, dtype=torch.float64)
    lr_of = [table[o] for o in owners]
    etas = eta_grid(0.5, 4.0, 3)
    probe = probe_landscape(model, variant_losses, x, y, params, owners, lr_of, etas)

    for v, seq in enumerate(copies):
        weights = list(seq.parameters())
        g = torch.autograd.grad(sequential_loss(seq, x, y), weights)
        g_norm = math.sqrt(sum(float((t**2).sum()) for t in g))
        start = [w.detach().clone() for w in weights]
        for k, eta in enumerate(etas):
            with torch.no_grad():
                for w, w0, gi in zip(weights, start, g, strict=True):
                    w.copy_(w0 - eta * lrs[v] * gi)
            loss = sequential_loss(seq, x, y)
            moved = torch.autograd.grad(loss, weights)
            diff = math.sqrt(
                sum(float(((m - gi) ** 2).sum()) for m, gi in zip(moved, g, strict=True))
            )
            assert probe.loss[v, k] == pytest.approx(loss.item(), rel=1e-10)
            assert probe.grad_diff[v, k] == pytest.approx(diff, rel=1e-8)
            assert probe.step_norm[v, k] == pytest.approx(eta * lrs[v] * g_norm, rel=1e-10)
    summary = probe.summary()
    assert summary.shape == (2, len(LANDSCAPE_METRICS))
    np.testing.assert_allclose(summary[:, 0], probe.loss.min(1))
    np.testing.assert_allclose(summary[:, 1], probe.loss.max(1))
    np.testing.assert_allclose(summary[:, 3], probe.grad_diff.max(1))
    np.testing.assert_allclose(summary[:, 4], (probe.grad_diff / probe.step_norm).max(1))


def test_eta_grid_is_log_spaced_between_the_ends():
    etas = eta_grid(0.01, 30.0, 5)
    assert etas[0] == pytest.approx(0.01) and etas[-1] == pytest.approx(30.0)
    np.testing.assert_allclose(np.diff(np.log(etas)), np.log(3000) / 4)


# --- measuring never changes the run ---------------------------------------------------------
def run_state(trainer: Trainer) -> list[torch.Tensor]:
    model = trainer.model
    return [
        *model.parameters(),
        *model.buffers(),
        *trainer.optimizer.state,
        trainer._batch_gen.get_state(),
        *[s for s in noise_states(model) if s is not None],
    ]


def test_measurements_leave_the_run_bitwise_identical(digits):
    base = load_preset("ioffe-fig1").replace(
        width=16,
        variants=["plain", "batchnorm", "batchnorm-noisy"],
        steps=25,
        momentum=0.9,
        probe_size=50,
    )
    quiet = make_trainer(base, digits)
    measured = make_trainer(base.replace(ics_every=1, landscape_every=1), digits)
    quiet.advance(steps=25)
    measured.advance(steps=25)
    assert len(measured.history.series("batchnorm-noisy", "layer3", "ics_l2")[0]) == 25
    assert len(measured.history.series("plain", "", "landscape_beta")[0]) == 25
    for a, b in zip(run_state(quiet), run_state(measured), strict=True):
        assert torch.equal(a, b)
    for v in quiet.variant_names:
        np.testing.assert_array_equal(
            quiet.history.series(v, "", "loss")[1], measured.history.series(v, "", "loss")[1]
        )


def test_a_probe_in_the_middle_of_a_step_restores_everything(digits):
    cfg = load_preset("ioffe-fig1").replace(
        width=16, variants=["plain", "batchnorm-noisy"], probe_size=50
    )
    trainer = make_trainer(cfg, digits)
    trainer.advance(steps=3)
    model, opt = trainer.model, trainer.optimizer
    x, y = trainer._next_batch()
    noise = noise_states(model)
    variant_losses(model(x)[0], y).sum().backward()
    grads = [p.grad.clone() for p in opt.params]
    state = [t.clone() for t in run_state(trainer)]
    global_rng = torch.get_rng_state()
    probe_landscape(
        model, variant_losses, x, y, opt.params, opt.owner, opt.lr_of, [1.0, 2.0], noise
    )
    before = [p.detach().clone() for p in opt.params]
    measure_ics(model, variant_losses, x, y, opt.params, before, noise)
    for a, b in zip(state, run_state(trainer), strict=True):
        assert torch.equal(a, b)
    for g, p in zip(grads, opt.params, strict=True):
        assert torch.equal(g, p.grad)
    assert torch.equal(global_rng, torch.get_rng_state())


def test_a_replayed_noise_draw_gives_the_training_step_its_own_loss(digits):
    """With the step's noise replayed, the probe at eta = 0 sees the training loss exactly."""
    cfg = load_preset("ioffe-fig1").replace(width=16, variants=["batchnorm-noisy"], probe_size=50)
    trainer = make_trainer(cfg, digits)
    model, opt = trainer.model, trainer.optimizer
    x, y = trainer._next_batch()
    noise = noise_states(model)
    losses = variant_losses(model(x)[0], y)
    losses.sum().backward()
    probe = probe_landscape(
        model, variant_losses, x, y, opt.params, opt.owner, opt.lr_of, np.array([0.0]), noise
    )
    assert probe.loss[0, 0] == losses.item()
    assert probe.grad_diff[0, 0] == 0.0
    other = probe_landscape(
        model, variant_losses, x, y, opt.params, opt.owner, opt.lr_of, np.array([0.0])
    )
    assert other.loss[0, 0] != losses.item()  # fresh noise: another loss


# --- noisy BN --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "settings",
    [
        NoiseSettings(),
        NoiseSettings(shift=2.0, scale_low=0.5, scale_high=0.6, shift_spread=0.3, scale_std=0.05),
    ],
)
def test_noise_statistics_match_the_settings(settings):
    gen = torch.Generator().manual_seed(0)
    # Within one draw: per element m ~ U(mu - spread, mu + spread), s ~ N(sigma, std).
    for _ in range(5):
        draw = draw_bn_noise((4000, 6), 2, settings, gen)
        for group in range(2):
            cols = slice(3 * group, 3 * group + 3)
            mu, sigma = draw.mu[group].item(), draw.sigma[group].item()
            m, s = draw.shift[:, cols], draw.scale[:, cols]
            assert m.min() >= mu - settings.shift_spread and m.max() <= mu + settings.shift_spread
            assert m.mean().item() == pytest.approx(mu, abs=0.05 * settings.shift_spread + 1e-3)
            assert m.std().item() == pytest.approx(settings.shift_spread / math.sqrt(3), rel=0.03)
            assert s.mean().item() == pytest.approx(sigma, abs=0.05 * settings.scale_std)
            assert s.std().item() == pytest.approx(settings.scale_std, rel=0.03)
    # Over steps: mu_t ~ U(-shift, shift), sigma_t ~ U(low, high).
    draws = [draw_bn_noise((2, 4), 4, settings, gen) for _ in range(1500)]
    mu = torch.cat([d.mu for d in draws])
    sigma = torch.cat([d.sigma for d in draws])
    assert mu.abs().max() <= settings.shift
    assert mu.mean().item() == pytest.approx(0.0, abs=0.05 * settings.shift)
    assert mu.var().item() == pytest.approx(settings.shift**2 / 3, rel=0.08)
    assert sigma.min() >= settings.scale_low and sigma.max() <= settings.scale_high
    mid = (settings.scale_low + settings.scale_high) / 2
    assert sigma.mean().item() == pytest.approx(
        mid, abs=0.02 * (settings.scale_high - settings.scale_low) + 1e-3
    )
    assert len(set(draws[0].mu.tolist())) == 4  # each group draws its own


def test_noisy_bn_is_bn_then_the_drawn_scale_and_shift():
    torch.manual_seed(0)
    x = torch.randn(32, 6, dtype=torch.float64) * 3 + 1
    noisy = NoisyBatchNorm(6, groups=2, seed=7).double()
    plain = BatchNorm(6).double()
    y = noisy(x)
    draw = draw_bn_noise((32, 6), 2, NoiseSettings(), torch.Generator().manual_seed(7))
    torch.testing.assert_close(y, draw.scale * plain(x) + draw.shift)
    torch.testing.assert_close(noisy.running_mean, plain.running_mean)
    noisy.eval(), plain.eval()
    # No draw at evaluation: the noise's expectation, E[s] = 1.125 and E[m] = 0.
    torch.testing.assert_close(noisy(x), plain(x) * 1.125)
    torch.testing.assert_close(noisy(x), noisy(x))


def test_noisy_bn_gradient_passes_gradcheck():
    layer = NoisyBatchNorm(3, seed=1).double()
    start = torch.Generator().manual_seed(1).get_state()

    def f(x):
        layer.set_noise_state(start)  # the same noise at every evaluation
        return layer(x)

    layer(torch.randn(5, 3, dtype=torch.float64))  # creates the generator
    x = torch.randn(5, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(f, (x,))


def test_noisy_runs_are_deterministic_by_seed(digits):
    cfg = load_preset("noisy-bn").replace(width=16, steps=15, probe_size=50)
    a, b = make_trainer(cfg, digits), make_trainer(cfg, digits)
    a.advance(steps=15), b.advance(steps=15)
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    c = make_trainer(cfg.replace(seed=1), digits)
    c.advance(steps=15)
    assert not torch.equal(a.model.weights[0], c.model.weights[0])


def test_noisy_variant_makes_the_distribution_move_more(digits):
    """The point of the noisy variant: its layer inputs jump around from probe to probe."""
    cfg = load_preset("noisy-bn").replace(steps=200, probe_size=100)
    trainer = make_trainer(cfg, digits)
    trainer.advance(steps=200)
    rows = {r.measure: r.values for r in claims_summary(trainer.history, "layer3")}
    moved = rows["How far the median input of layer3 moved"]
    assert moved["batchnorm-noisy"] > 5 * moved["batchnorm"]


# --- the claims table ------------------------------------------------------------------------
def test_claims_summary_is_computed_from_the_history(digits):
    cfg = load_preset("ics-smoothness").replace(width=16, steps=120, probe_size=50)
    trainer = make_trainer(cfg, digits)
    trainer.advance(steps=120)
    h = trainer.history
    rows = {r.measure: r for r in claims_summary(h, "layer3", target_accuracy=0.5)}
    for v in h.variants():
        p50 = h.series(v, "layer3", "preact_p50")[1]
        assert rows["How far the median input of layer3 moved"].values[v] == pytest.approx(
            p50.max() - p50.min()
        )
        ics = np.concatenate([h.series(v, layer, "ics_l2")[1] for layer in ("layer2", "layer3")])
        assert rows["ICS ‖G − G′‖ (median)"].values[v] == pytest.approx(np.median(ics))
        beta = h.series(v, "", "landscape_beta")[1]
        assert rows["Effective β-smoothness (median)"].values[v] == pytest.approx(np.median(beta))
        steps, acc = h.series(v, "", "test_accuracy")
        first = next((int(s) for s, a in zip(steps, acc, strict=True) if a >= 0.5), None)
        assert steps_to_accuracy(h, v, 0.5) == first
        assert rows["Steps to 50% test accuracy"].values[v] == first
    assert {r.claim for r in rows.values()} == {"Ioffe & Szegedy", "Santurkar et al."}


def test_cli_run_writes_the_ics_and_landscape_metrics(tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["run", "--preset", "ics-smoothness", "--steps", "21", "--out", str(out)])
    assert code == 0
    import pandas as pd

    table = pd.read_csv(out / "metrics.csv", keep_default_na=False)
    ics = table[table.metric == "ics_l2"]
    assert set(ics.layer) == {"layer2", "layer3"}
    assert set(ics.step) == {0, 10, 20}
    assert set(ics.variant) == {"plain", "batchnorm", "batchnorm-noisy"}
    assert set(table.metric) >= {"ics_cos", *LANDSCAPE_METRICS}
    assert set(table[table.metric == "landscape_beta"].step) == {0}


# --- config ----------------------------------------------------------------------------------
def test_config_checks_the_new_pairs_and_noisy_variants():
    with pytest.raises(
        ConfigError, match=r"landscape_low = 5.0: allowed: at most landscape_high \(4\)"
    ):
        RunConfig(landscape_low=5.0)
    with pytest.raises(ConfigError, match=r"bn_noise_scale_low = 2.0: allowed: at most"):
        RunConfig(bn_noise_scale_low=2.0)
    with pytest.raises(ConfigError, match=r"ics_every = -1: allowed: an integer in \[0, 100000\]"):
        RunConfig(ics_every=-1)
    cfg = load_preset("noisy-bn").replace(
        variants=["plain", {"name": "n2", "norm": "batchnorm-noisy", "lr": 0.1}]
    )
    query = to_query(cfg, "noisy-bn")
    assert query["variants"] == "plain,n2:batchnorm-noisy:0.1"
    again, _, warnings = from_query(query, "ioffe-fig1")
    assert again == cfg and not warnings


# --- the learning-rate sweep -----------------------------------------------------------------
def test_lr_grid_and_its_errors():
    assert lr_grid(0.01, 10, 4) == [0.01, 0.1, 1.0, 10.0]
    assert lr_grid(0.5, 0.5, 1) == [0.5]
    with pytest.raises(ConfigError, match=r"rates = 9: allowed: an integer in \[1, 8\]"):
        lr_grid(0.01, 1, 9)
    with pytest.raises(ConfigError, match=r"lr_low = 2: allowed: at most lr_high \(1\)"):
        lr_grid(2, 1, 3)
    with pytest.raises(ConfigError, match="lr_high = nan"):
        lr_grid(0.1, float("nan"), 3)
    with pytest.raises(ConfigError, match=r"lr_high = 0.5: allowed: above lr_low \(0.5\)"):
        lr_grid(0.5, 0.5, 3)


def test_sweep_splits_into_lockstep_runs_of_at_most_8(digits):
    base = load_preset("ioffe-fig1").replace(width=16, probe_size=50)
    rates = lr_grid(0.01, 10, 8)
    sweep = LrSweep(base, rates, steps=10, dataset=digits)
    assert len(sweep.trainers) == 2
    for trainer, chunk in zip(sweep.trainers, (rates[:4], rates[4:]), strict=True):
        specs = trainer.config.variants
        assert [s.lr for s in specs] == chunk * 2
        assert [s.norm for s in specs] == ["none"] * 4 + ["batchnorm"] * 4
    assert sweep.progress == 0
    while not sweep.finished:
        sweep.advance(0.5)
    assert sweep.progress == 1 and sweep.steps_done == 20
    result = sweep.result()
    assert [(p.label, p.lr) for p in result.points] == [
        *[("plain", r) for r in rates],
        *[("batchnorm", r) for r in rates],
    ]
    for p in result.points:
        assert math.isfinite(p.loss) and 0 <= p.test_accuracy <= 1


def test_usable_ranges_follow_the_rule():
    def point(norm, lr, acc, diverged=None):
        return SweepPoint(norm, lr, 0.1, 0.1, acc, diverged)

    points = [
        point("none", 0.01, 0.50),
        point("none", 0.1, 0.93),
        point("none", 1.0, 0.96),
        point("none", 10.0, 0.99, diverged=40),  # diverged: never usable, never the bar
        point("batchnorm", 0.01, 0.92),
        point("batchnorm", 0.1, 0.97),
        point("batchnorm", 1.0, 0.95),
        point("batchnorm", 10.0, 0.93),
    ]
    # best 0.97 (batchnorm at 0.1): usable means >= 0.92
    assert usable_ranges(points) == {"plain": (0.1, 1.0), "batchnorm": (0.01, 10.0)}
    assert usable_ranges([point("none", 0.1, 0.2, diverged=3)]) == {"plain": None}


def test_a_usable_range_that_touches_the_grid_end_is_a_lower_bound():
    def point(norm, lr, acc, diverged=None):
        return SweepPoint(norm, lr, 0.1, 0.1, acc, diverged)

    grid = [0.01, 0.1, 1.0, 10.0]
    accuracy = {"none": [0.5, 0.93, 0.96, 0.3], "batchnorm": [0.92, 0.97, 0.95, 0.93]}
    points = [
        point(norm, lr, acc)
        for norm, values in accuracy.items()
        for lr, acc in zip(grid, values, strict=True)
    ]
    result = SweepResult(points, 8, 8, usable_ranges(points))
    assert result.usable == {"plain": (0.1, 1.0), "batchnorm": (0.01, 10.0)}
    assert result.grid("batchnorm") == grid
    # Both ends reached: the ratio is only a lower bound, and the text says so.
    assert result.usable_text("batchnorm") == "0.01 – 10 (≥ 1,000×, the grid's whole span)"
    assert result.usable_text("batchnorm", short=True) == "0.01 – 10 (≥ 1,000×)"
    assert result.touches_grid_end("batchnorm")
    # Inside the grid on both sides: the ratio is what was measured.
    assert result.usable_text("plain") == result.usable_text("plain", short=True)
    assert result.usable_text("plain") == "0.1 – 1 (10×)"
    assert not result.touches_grid_end("plain")
    # One end reached.
    assert usable_range_text((0.1, 10.0), grid) == (
        "0.1 – 10 (≥ 100×, reaches the grid's highest rate)"
    )
    assert usable_range_text((0.01, 0.05), grid) == (
        "0.01 – 0.05 (≥ 5×, reaches the grid's lowest rate)"
    )
    assert usable_range_text((10.0, 10.0), grid) == "10 only (reaches the grid's highest rate)"
    assert usable_range_text((10.0, 10.0), grid, short=True) == "10 only"
    assert usable_range_text((1.0, 1.0), grid) == "1 only"
    assert usable_range_text((0.5, 0.5), [0.5]) == "0.5 only (the grid's only rate)"
    none = SweepResult([point("none", 0.1, 0.2, diverged=3)], 1, 1, {"plain": None})
    assert none.usable_text("plain") is None and not none.touches_grid_end("plain")


def test_a_sweep_run_that_diverged_entirely_counts_as_done(digits):
    base = load_preset("ioffe-fig1").replace(
        width=16, depth=2, activation="relu", init_std=1.0, momentum=0.9, probe_size=50
    )
    sweep = LrSweep(base, [10.0], norms=("none",), steps=200, dataset=digits)
    while not sweep.finished:
        sweep.advance(1.0)
    (trainer,) = sweep.trainers
    assert trainer.status[0].state == "diverged" and trainer.step < 200
    assert sweep.steps_done == sweep.steps_total == 200 and sweep.progress == 1


def test_a_noise_state_set_before_the_first_draw_is_kept():
    layer = NoisyBatchNorm(3, seed=5).double()
    x = torch.randn(8, 3, dtype=torch.float64)
    layer(x)
    state = layer.noise_state()
    expected = layer(x)
    fresh = NoisyBatchNorm(3, seed=99).double()
    fresh.set_noise_state(state)  # no generator yet: kept until the first draw
    assert torch.equal(fresh.noise_state(), state)
    torch.testing.assert_close(fresh(x), expected)


def test_viewing_a_layer_of_a_noisy_run_leaves_the_run_unchanged(digits):
    from bn_core.experiments.inside import layer_batch

    cfg = load_preset("noisy-bn").replace(width=16, probe_size=50)
    trainer = make_trainer(cfg, digits)
    trainer.advance(steps=3)
    before = [t.clone() for t in run_state(trainer)]
    layer_batch(trainer, layer="layer2", unit=0, variant="batchnorm-noisy")
    for a, b in zip(before, run_state(trainer), strict=True):
        assert torch.equal(a, b)
