"""The experiments' numbers against closed forms: the section 2 bias blow-up, the stages of
one BN channel, running-statistics conventions, batch-size noise and scale invariance."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from bn_core.batchnorm import BatchNorm, batch_norm_train
from bn_core.config import load_preset
from bn_core.data import load_dataset
from bn_core.experiments.blowup import network_blowup, run_blowup, run_blowup_frame
from bn_core.experiments.inside import (
    batch_size_noise,
    expected_running_mean,
    identity_error,
    identity_params,
    momentum_conventions,
    placement_runs,
    scale_invariance,
    single_example_error,
    stages,
    synthetic_batch,
    train_eval_gap,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, probe_size=50)


# --- section 2: the minimal model -----------------------------------------------------------
@pytest.mark.parametrize("scale", [False, True])
@pytest.mark.parametrize("lr", [0.01, 0.1, 1.0])
def test_naive_bias_moves_linearly_and_aware_bias_stays(lr, scale):
    r = run_blowup(steps=200, lr=lr, scale=scale, b0=0.5)
    k = r.steps
    # The naive gradient is the same at every step, so b_k = b0 - k * lr * g.
    assert r.g == pytest.approx(r.g_closed_form, rel=1e-12)
    np.testing.assert_allclose(r.grad_naive, r.g, rtol=1e-12)
    predicted = r.b0 - k * lr * r.g
    np.testing.assert_allclose(r.bias_naive, predicted, rtol=1e-9)
    np.testing.assert_allclose(r.predicted_bias(k), predicted, rtol=1e-15)
    assert abs(r.bias_naive[-1] - r.b0) > 0.1 * lr * 200 * abs(r.g)  # it really moved
    # Through the statistics dx_hat/db = 0: the bias stays put up to rounding.
    assert np.max(np.abs(r.grad_aware)) <= 1e-13
    assert np.max(np.abs(r.bias_aware - r.b0)) <= 1e-12


@pytest.mark.parametrize("scale", [False, True])
def test_loss_and_x_hat_never_change(scale):
    r = run_blowup(steps=200, lr=0.1, scale=scale)
    # Loss: relative 1e-12; u + b rounds at |b| ~ 600 by ~1e-13, which the loss (16) sees.
    for loss in (r.loss_naive, r.loss_aware):
        assert np.max(np.abs(loss - loss[0])) <= 1e-12 * loss[0]
    # The target is the b = 0 output shifted by c, so L = n c^2 / 2 exactly.
    assert r.loss_naive[0] == pytest.approx(0.5 * len(r.u) * r.offset**2, rel=1e-12)
    assert r.x_hat_unchanged
    assert r.x_hat_max_change < 1e-12


def test_scaled_blowup_matches_our_batchnorm_gradients():
    # scale=True is BN without the affine step: its two gradients must be the layer's own.
    r = run_blowup(steps=1, lr=0.1, scale=True, b0=0.3)
    x = torch.tensor(r.u + r.b0).view(-1, 1).requires_grad_(True)
    for through_stats, expected in ((False, r.grad_naive[0]), (True, r.grad_aware[0])):
        y, _, _ = batch_norm_train(x, None, None, r.eps, grad_through_stats=through_stats)
        (dx,) = torch.autograd.grad(0.5 * (y[:, 0] - torch.tensor(r.target)).square().sum(), x)
        assert float(dx.sum()) == pytest.approx(expected, abs=1e-12)


def test_scaling_multiplies_the_naive_slope_by_the_inverse_std():
    plain, scaled = run_blowup(scale=False), run_blowup(scale=True)
    inv_std = 1.0 / math.sqrt(np.var(plain.u) + scaled.eps)
    assert scaled.predicted_slope == pytest.approx(plain.predicted_slope * inv_std, rel=1e-12)


def test_blowup_frame_is_tidy():
    frame = run_blowup_frame(steps=5, lr=0.1)
    assert list(frame.columns) == ["step", "variant", "layer", "metric", "value"]
    assert set(frame["variant"]) == {"naive", "aware"}
    assert set(frame["metric"]) == {"bias", "loss"}
    assert set(frame["layer"]) == {""}
    assert len(frame) == 2 * 2 * 6
    naive_bias = frame.query("variant == 'naive' and metric == 'bias'")
    assert naive_bias["step"].tolist() == list(range(6))
    assert naive_bias["value"].iloc[-1] == pytest.approx(5 * 0.1 * 32, rel=1e-12)


# --- section 2 in a network ------------------------------------------------------------------
@pytest.fixture(scope="module")
def net(digits, one_torch_thread_for_module):
    cfg = load_preset("bias-blowup").replace(width=32, device="cpu", probe_size=50)
    return network_blowup(cfg, steps=150, dataset=digits)


def test_network_aware_bias_gets_no_gradient(net):
    aware = net.series("batchnorm", "bias_grad_norm")
    assert aware.shape == (3, 150)
    assert aware.max() <= 1e-6  # float32 rounding of sum_i dL/dx_i = 0
    assert net.series("batchnorm", "bias_norm").max() <= 1e-5


def test_network_naive_bias_drifts(net):
    grads = net.series("batchnorm-naive", "bias_grad_norm")
    norms = net.series("batchnorm-naive", "bias_norm")
    assert grads.min() > 1e-3  # a real push at every step in every layer
    assert np.all(norms[:, 0] == 0.0)  # the preset starts the biases at 0
    assert np.all(norms[:, -1] > 3.0 * norms[:, 10])
    assert np.all(norms[:, -1] > 0.3)


def test_network_history_has_bias_telemetry(net):
    h, every = net.history, net.trainer.config.telemetry_every
    for variant in net.variants:
        for li, layer in enumerate(net.layers):
            steps, values = h.series(variant, layer, "bias_grad_norm")
            assert steps.tolist() == list(range(0, 150, every))
            np.testing.assert_allclose(
                values, net.bias_grad_norm[net.variants.index(variant)][li, steps], rtol=1e-6
            )
            steps, values = h.series(variant, layer, "bias_norm")
            np.testing.assert_allclose(
                values, net.series(variant, "bias_norm")[li, steps], rtol=1e-6, atol=1e-12
            )
    assert set(h.variants()) == {"batchnorm", "batchnorm-naive"}


# --- inside one BN channel -------------------------------------------------------------------
def test_stages_equal_direct_formulas():
    x = synthetic_batch(16, mean=5.0, std=2.0, seed=3)
    s = stages(x, gamma=1.5, beta=-0.25, eps=1e-3)
    xn = x.numpy()
    mu = xn.mean()
    var = ((xn - mu) ** 2).mean()
    x_hat = (xn - mu) / math.sqrt(var + 1e-3)
    assert s.mu_B == pytest.approx(mu, rel=1e-14)
    assert s.var_B == pytest.approx(var, rel=1e-13)
    np.testing.assert_allclose(s.x_hat, x_hat, rtol=0, atol=1e-13)
    np.testing.assert_allclose(s.y, 1.5 * x_hat - 0.25, rtol=0, atol=1e-13)
    np.testing.assert_array_equal(s.x, xn)
    assert s.output_change == np.max(np.abs(1.5 * x_hat - 0.25 - xn))
    gamma, beta = identity_params(x, eps=1e-3)
    assert stages(x, gamma=gamma, beta=beta, eps=1e-3).output_change < 1e-12


@pytest.mark.parametrize(("mean", "std"), [(0.0, 1.0), (5.0, 2.0), (-300.0, 0.01)])
def test_identity_params_recover_the_input(mean, std):
    x = synthetic_batch(64, mean, std, seed=1)
    gamma, beta = identity_params(x)
    assert beta == pytest.approx(float(x.mean()), rel=1e-14)
    assert gamma == pytest.approx(math.sqrt(float(x.var(unbiased=False)) + 1e-5), rel=1e-13)
    assert identity_error(x) <= 1e-12


def test_synthetic_batch_is_seeded():
    a, b = synthetic_batch(10, 1.0, 2.0, seed=7), synthetic_batch(10, 1.0, 2.0, seed=7)
    assert a.dtype == torch.float64 and torch.equal(a, b)
    assert not torch.equal(a, synthetic_batch(10, 1.0, 2.0, seed=8))


def test_single_example_error_names_the_shape():
    msg = single_example_error()
    assert "(1, 1)" in msg and "more than one value per channel" in msg


# --- running statistics ----------------------------------------------------------------------
@pytest.mark.parametrize("m", [0.01, 0.1, 0.5, 1.0])
def test_running_stats_follow_the_geometric_formula(m):
    bn = BatchNorm(1, momentum=m, dtype=torch.float64)
    gen = torch.Generator().manual_seed(4)
    batches = 2.0 + 3.0 * torch.randn(40, 8, 1, generator=gen, dtype=torch.float64)
    means = batches[:, :, 0].numpy().mean(1)
    unbiased = batches[:, :, 0].numpy().var(1, ddof=1)
    biased = batches[:, :, 0].numpy().var(1, ddof=0)
    with torch.no_grad():
        for k in range(1, 41):
            bn(batches[k - 1])
            r_mean = expected_running_mean(m, k, means, init=0.0)
            r_var = expected_running_mean(m, k, unbiased, init=1.0)
            assert float(bn.running_mean[0]) == pytest.approx(r_mean, abs=1e-12)
            assert float(bn.running_var[0]) == pytest.approx(r_var, abs=1e-12)
    # The biased variance would be a different (visibly lower) sequence.
    assert float(bn.running_var[0]) - expected_running_mean(m, 40, biased, 1.0) > 1e-2


def test_expected_running_mean_closed_form():
    # Constant batch means c: r_k = c + (1-m)^k (r0 - c).
    c, m, r0 = 3.0, 0.2, -1.0
    for k in (0, 1, 5, 50):
        expected = c + (1 - m) ** k * (r0 - c)
        assert expected_running_mean(m, k, [c] * 50, init=r0) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        expected_running_mean(m, 5, [1.0, 2.0])


def test_train_eval_gap_tracks_the_layer():
    r = train_eval_gap(momenta=(0.01, 0.1, 0.5), steps=200, batch=32, seed=0)
    assert r.gap.shape == r.running_mean.shape == (3, 201)
    for i, m in enumerate(r.momenta):
        for k in (0, 1, 17, 200):
            expected = expected_running_mean(m, k, r.batch_means)
            assert r.running_mean[i, k] == pytest.approx(expected, abs=1e-12)
            expected = expected_running_mean(m, k, r.batch_vars, init=1.0)
            assert r.running_var[i, k] == pytest.approx(expected, abs=1e-12)
    # Step 0: running stats (0, 1), the same gap for every momentum.
    assert np.ptp(r.gap[:, 0]) == 0.0 and r.gap[0, 0] > 1.0
    # After 200 batches the running stats of m >= 0.1 are near the population, so the
    # gap is down to the size of the probe's own sampling error; m = 0.01 still lags.
    assert np.all(r.gap[1:, -1] < 3 * r.gap_at_population)
    assert r.gap[0, -1] > r.gap[1, -1]
    # m = 0.01 from r_0 = 0: the bias 2 * 0.99^200 remains, give or take the EMA's noise
    # (3 / sqrt(32)) * sqrt(0.01 / 1.99) = 0.04; we allow 4 of those.
    assert r.mean_error[0, -1] == pytest.approx(2.0 * 0.99**200, abs=0.16)


def test_momentum_conventions():
    means = synthetic_batch(4000, 2.0, 1.0, seed=0).numpy()
    mc = momentum_conventions(means, m_torch=0.1)
    assert mc.m_keras == pytest.approx(0.9)
    # 1 - (1 - 0.1) is not exactly 0.1 in floating point; the sequences agree to 1e-12.
    np.testing.assert_allclose(mc.torch, mc.keras, rtol=0, atol=1e-12)
    assert len(mc.torch) == 4001 and mc.torch[0] == 0.0
    # PyTorch's rule with m = 0.9 weights the newest batch by 0.9: it follows the batches.
    np.testing.assert_allclose(mc.mistaken[1:] - means, 0.1 * (mc.mistaken[:-1] - means))
    # Stationary noise of an EMA of white noise: sigma * sqrt(m / (2 - m)). The last half
    # holds 2000 values; at m = 0.1 neighbours are correlated over ~1/m = 10 steps, so about
    # 200 independent ones: the std estimate is good to ~1/sqrt(400) = 5%; we allow 4x that.
    sigma = mc.batch_noise
    assert mc.torch_noise == pytest.approx(sigma * math.sqrt(0.1 / 1.9), rel=0.2)
    assert mc.mistaken_noise == pytest.approx(sigma * math.sqrt(0.9 / 1.1), rel=0.2)
    assert mc.mistaken_noise > 3 * mc.torch_noise


def test_batch_size_noise_matches_sigma_over_sqrt_n():
    trials = 2000
    r = batch_size_noise(trials=trials, seed=0, population_std=2.0)
    np.testing.assert_allclose(r.mean_std_theory, 2.0 / np.sqrt(r.batch_sizes))
    # The sample std over T trials has relative standard error about 1 / sqrt(2 (T - 1))
    # (1.6% at T = 2000); 4 of those is 6.3%, a margin that a correct layer passes.
    tol = 4.0 / math.sqrt(2 * (trials - 1))
    np.testing.assert_allclose(r.mean_std, r.mean_std_theory, rtol=tol)
    # var_B is chi-squared shaped (heavier tail), its std estimate noisier: twice the margin.
    np.testing.assert_allclose(r.var_std, r.var_std_theory, rtol=2 * tol)
    # E[var_B] = sigma^2 (n-1)/n: the biased estimator; std of the average ~ var_std / sqrt(T).
    np.testing.assert_allclose(
        r.var_mean, r.var_mean_theory, atol=4 * np.max(r.var_std_theory) / math.sqrt(trials)
    )
    assert np.all(np.diff(r.mean_std) < 0)


# --- scale invariance ------------------------------------------------------------------------
def test_scale_invariance():
    a = np.array([1e-3, 1e-2, 0.1, 0.5, 2.0, 10.0, 1e3])
    r = scale_invariance(a, seed=0, eps=1e-5)
    # Scaling eps by a^2 along with W makes BN((aW)u) = BN(Wu) an identity of real numbers.
    assert np.max(r.max_change_scaled_eps) <= 1e-10
    np.testing.assert_allclose(r.grad_ratio_scaled_eps, 1.0 / a, rtol=1e-8)
    # With eps fixed, a^2 var >> eps keeps the invariance close; tiny a breaks it.
    big = a * a * r.min_var > 1e3 * r.eps
    assert np.all(r.max_change[big] < 1e-3)
    np.testing.assert_allclose(r.grad_ratio[big], 1.0 / a[big], rtol=1e-3)
    assert r.max_change[0] > 0.5  # a = 1e-3: a^2 var ~ 4e-7 is below eps
    assert r.grad_ratio[0] * a[0] < 0.5


# --- placement -------------------------------------------------------------------------------
def test_placement_runs(digits):
    base = load_preset("placement").replace(
        variants=["batchnorm"], width=16, depth=2, device="cpu", probe_size=50, eval_every=20
    )
    runs = placement_runs(steps=40, config=base, dataset=digits)
    assert set(runs) == {"before", "after"}
    for history in runs.values():
        steps, loss = history.series("batchnorm", "", "loss")
        assert steps[-1] == 30 and np.all(np.isfinite(loss))
        _, sat = history.series("batchnorm", "layer1", "saturation")
        assert len(sat) == len(steps)
    # The two nets differ only in placement, so their losses differ.
    assert not np.array_equal(
        runs["before"].series("batchnorm", "", "loss")[1],
        runs["after"].series("batchnorm", "", "loss")[1],
    )
