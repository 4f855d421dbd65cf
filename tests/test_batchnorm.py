"""bn_core.BatchNorm against torch.nn.BatchNorm1d/2d, gradcheck and closed-form gradients."""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from torch import nn
from torch.testing import assert_close

from bn_core import BatchNorm, batch_norm_train
from bn_core.batchnorm import BatchNormFunction

F64 = torch.float64
RTOL = 1e-10
# Relative error is meaningless for entries that cancel to ~0; float64 rounding there is ~1e-14.
ATOL = 1e-12
HYP = settings(max_examples=60, deadline=None)
MOMENTA = [0.1, 0.5, 1.0, 0.0, None]


def exact(actual, expected, **kw):
    assert_close(actual, expected, rtol=RTOL, atol=ATOL, **kw)


def ref_class(ndim: int) -> type[nn.Module]:
    return nn.BatchNorm2d if ndim == 4 else nn.BatchNorm1d


def make_pair(shape, gen=None, dtype=F64, **kw):
    """Our layer and torch's, same settings; random gamma/beta (same values) when affine."""
    c = shape[1]
    ours = BatchNorm(c, dtype=dtype, **kw)
    kw.pop("grad_through_stats", None)
    ref = ref_class(len(shape))(c, dtype=dtype, **kw)
    if ours.affine:
        gen = gen or torch.Generator().manual_seed(0)
        with torch.no_grad():
            ours.weight.copy_(torch.randn(c, generator=gen, dtype=dtype) * 2)
            ours.bias.copy_(torch.randn(c, generator=gen, dtype=dtype) * 3)
            ref.weight.copy_(ours.weight)
            ref.bias.copy_(ours.bias)
    return ours, ref


def make_x(shape, gen, offset=0.0, scale=1.0, dtype=F64):
    # Per-channel offsets and scales on top of the global ones.
    view = (1, -1) + (1,) * (len(shape) - 2)
    c = shape[1]
    ch_off = (offset * (1 + torch.rand(c, generator=gen, dtype=dtype))).view(view)
    ch_scale = (scale * (0.5 + torch.rand(c, generator=gen, dtype=dtype))).view(view)
    return ch_off + ch_scale * torch.randn(shape, generator=gen, dtype=dtype)


def run(module, x, dy):
    """Output and gradients w.r.t. input, weight and bias for upstream gradient dy."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = module(x)
    y.backward(dy)
    w = None if module.weight is None else module.weight.grad
    b = None if module.bias is None else module.bias.grad
    return y.detach(), x.grad, w, b


def assert_runs_match(ours, ref, x, dy):
    for a, e in zip(run(ours, x, dy), run(ref, x, dy), strict=True):
        if e is None:
            assert a is None
        else:
            exact(a, e)


def assert_buffers_match(ours, ref):
    exact(ours.running_mean, ref.running_mean)
    exact(ours.running_var, ref.running_var)
    assert ours.num_batches_tracked.dtype == torch.long
    assert ours.num_batches_tracked.item() == ref.num_batches_tracked.item()


@st.composite
def cases(draw):
    ndim = draw(st.sampled_from([2, 3, 4]))
    n = draw(st.integers(2, 6))
    c = draw(st.integers(1, 4))
    spatial = tuple(draw(st.integers(1, 4)) for _ in range(ndim - 2))
    seed = draw(st.integers(0, 2**31 - 1))
    # |offset| / scale stays <= 500 so float64 centering keeps ~1e-13 absolute accuracy.
    offset = draw(st.floats(-50, 50))
    scale = 10 ** draw(st.floats(-1, 1))
    return (n, c, *spatial), seed, offset, scale


# ---------------------------------------------------------------- parity with torch, float64


@HYP
@given(cases())
@example(((2, 1, 1, 1), 0, 0.0, 1.0))
@example(((2, 1), 1, 5.0, 0.1))
@example(((2, 1, 1), 2, -3.0, 10.0))
def test_training_forward_and_gradients_match_torch(case):
    shape, seed, offset, scale = case
    gen = torch.Generator().manual_seed(seed)
    ours, ref = make_pair(shape, gen)
    x = make_x(shape, gen, offset, scale)
    dy = torch.randn(shape, generator=gen, dtype=F64)
    assert_runs_match(ours, ref, x, dy)
    assert_buffers_match(ours, ref)


@HYP
@given(cases(), st.sampled_from(MOMENTA), st.integers(1, 4))
@example(((2, 1, 1, 1), 0, 1.0, 1.0), None, 3)
def test_running_stats_and_eval_output_match_torch(case, momentum, steps):
    shape, seed, offset, scale = case
    gen = torch.Generator().manual_seed(seed)
    ours, ref = make_pair(shape, gen, momentum=momentum)
    for step in range(steps):
        # Each batch has different statistics so the averaging rule matters.
        x = make_x(shape, gen, offset + step, scale * (1 + step))
        exact(ours(x), ref(x))
        assert_buffers_match(ours, ref)
    ours.eval()
    ref.eval()
    x = make_x(shape, gen, offset, scale)
    dy = torch.randn(shape, generator=gen, dtype=F64)
    assert_runs_match(ours, ref, x, dy)
    assert_buffers_match(ours, ref)


@pytest.mark.parametrize("shape", [(5, 3), (4, 3, 5), (3, 2, 3, 2), (2, 1, 1, 1)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_affine_and_tracking_options_match_torch(shape, affine, track):
    gen = torch.Generator().manual_seed(7)
    ours, ref = make_pair(shape, gen, affine=affine, track_running_stats=track)
    for _ in range(3):
        dy = torch.randn(shape, generator=gen, dtype=F64)
        assert_runs_match(ours, ref, make_x(shape, gen, 2.0, 3.0), dy)
    ours.eval()
    ref.eval()
    x = make_x(shape, gen, -1.0, 0.5)
    dy = torch.randn(shape, generator=gen, dtype=F64)
    assert_runs_match(ours, ref, x, dy)
    if affine:
        assert isinstance(ours.weight, nn.Parameter) and isinstance(ours.bias, nn.Parameter)
    else:
        assert ours.weight is None and ours.bias is None and ours.gamma is None
        assert list(ours.parameters()) == []
    if track:
        assert_buffers_match(ours, ref)
    else:
        assert ours.running_mean is None and ours.running_var is None
        assert ours.num_batches_tracked is None
        # Not tracking: eval still normalizes with the batch's own statistics.
        y_eval = ours(x)
        y_batch = batch_norm_train(x, ours.weight, ours.bias, ours.eps)[0]
        exact(y_eval, y_batch)


# ---------------------------------------------------------------- state_dict


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 2, 2)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_state_dict_keys_and_shapes_equal_torch(shape, affine, track):
    ours, ref = make_pair(shape, affine=affine, track_running_stats=track)
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref)
    for key in sd_ref:
        assert sd_ours[key].shape == sd_ref[key].shape, key
        assert sd_ours[key].dtype == sd_ref[key].dtype, key


def _trained(module, shape, gen, steps=3):
    for step in range(steps):
        module(make_x(shape, gen, 1.0 + step, 2.0))
    if module.affine:
        with torch.no_grad():
            module.weight.mul_(1.5).add_(0.25)
            module.bias.sub_(0.75)
    return module


@pytest.mark.parametrize("shape", [(6, 3), (4, 3, 5), (3, 3, 2, 2)])
@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_loads_both_ways(shape, direction):
    gen = torch.Generator().manual_seed(3)
    ours, ref = make_pair(shape, gen, momentum=0.3)
    src, dst = (ours, ref) if direction == "ours_to_torch" else (ref, ours)
    _trained(src, shape, gen)
    dst.load_state_dict(src.state_dict(), strict=True)
    assert_buffers_match(ours, ref)
    x = make_x(shape, gen, 0.5, 1.5)
    dy = torch.randn(shape, generator=gen, dtype=F64)
    for mode in ("eval", "train"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        assert_runs_match(ours, ref, x, dy)
    assert_buffers_match(ours, ref)
    # Loading copies into the existing parameters; the teaching names still alias them.
    assert ours.gamma is ours.weight and ours.beta is ours.bias


def test_gamma_beta_are_weight_and_bias():
    bn = BatchNorm(4)
    assert bn.gamma is bn.weight and bn.beta is bn.bias
    names = dict(bn.named_parameters())
    assert set(names) == {"weight", "bias"}
    assert names["weight"] is bn.gamma and names["bias"] is bn.beta
    bn(torch.randn(5, 4)).sum().backward()
    assert bn.gamma.grad is bn.weight.grad is not None


# ---------------------------------------------------------------- gradcheck and naive gradient


GRAD_SHAPES = [(5, 3), (3, 2, 2, 3)]


def _leaf_inputs(shape, seed=0, gamma_needed=True):
    gen = torch.Generator().manual_seed(seed)
    c = shape[1]
    x = make_x(shape, gen, 1.0, 2.0).requires_grad_(True)
    gamma = (torch.randn(c, generator=gen, dtype=F64) + 2).requires_grad_(gamma_needed)
    beta = torch.randn(c, generator=gen, dtype=F64).requires_grad_(gamma_needed)
    return x, gamma, beta


@pytest.mark.parametrize("shape", GRAD_SHAPES)
def test_gradcheck_through_stats(shape):
    x, gamma, beta = _leaf_inputs(shape)
    fn = lambda x, g, b: batch_norm_train(x, g, b, grad_through_stats=True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, gamma, beta))
    fn_plain = lambda x: batch_norm_train(x, None, None, grad_through_stats=True)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn_plain, (x,))


@pytest.mark.parametrize("shape", GRAD_SHAPES)
def test_gradcheck_naive_mode(shape):
    """The naive gradient is the exact derivative of BN with mu_B, var_B frozen, nothing else."""
    x, gamma, beta = _leaf_inputs(shape)
    naive = lambda x, g, b: batch_norm_train(x, g, b, grad_through_stats=False)[0]  # noqa: E731
    # gamma and beta enter after the statistics: their gradients are the true ones.
    assert torch.autograd.gradcheck(naive, (x.detach(), gamma, beta))
    # For x, frozen(x) uses the statistics of the unperturbed x0. The detached term only
    # replaces the forward value with frozen(x); the gradient is still our naive backward.
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    view = (1, -1) + (1,) * (x.dim() - 2)
    mu0 = x.detach().mean(dims, keepdim=True)
    inv0 = (x.detach().var(dims, unbiased=False, keepdim=True) + 1e-5).rsqrt()

    def frozen(x, g, b):
        y = naive(x, g, b)
        value = (x - mu0) * inv0 * g.view(view) + b.view(view)
        return y + (value - y).detach()

    assert torch.autograd.gradcheck(frozen, (x, gamma, beta))
    # ...and it is not the derivative of the actual (batch-statistics) function.
    assert not torch.autograd.gradcheck(naive, (x, gamma, beta), raise_exception=False)


@pytest.mark.parametrize("shape", GRAD_SHAPES + [(2, 1, 1, 1)])
def test_naive_gradient_closed_form(shape):
    eps = 1e-5
    x, gamma, beta = _leaf_inputs(shape, seed=11)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(12), dtype=F64)
    grads = {}
    for mode in (True, False):
        y = batch_norm_train(x, gamma, beta, eps, grad_through_stats=mode)[0]
        grads[mode] = torch.autograd.grad(y, (x, gamma, beta), dy)
    (dx_true, dg_true, db_true), (dx_naive, dg_naive, db_naive) = grads[True], grads[False]

    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    view = (1, -1) + (1,) * (x.dim() - 2)
    var_b = x.detach().var(dims, unbiased=False, keepdim=True)
    exact(dx_naive, gamma.detach().view(view) * dy / torch.sqrt(var_b + eps))
    assert (dx_naive - dx_true).abs().max() > 1e-2 * dx_true.abs().max()
    exact(dg_naive, dg_true)
    exact(db_naive, db_true)
    # Both agree with torch's parameter gradients.
    ref = ref_class(x.dim())(shape[1], dtype=F64)
    with torch.no_grad():
        ref.weight.copy_(gamma)
        ref.bias.copy_(beta)
    _, dx_ref, dg_ref, db_ref = run(ref, x, dy)
    exact(dx_true, dx_ref)
    exact(dg_true, dg_ref)
    exact(db_true, db_ref)


@pytest.mark.parametrize("shape", GRAD_SHAPES)
def test_bias_before_bn_gets_zero_gradient_only_through_stats(shape):
    """A per-channel constant added before BN is cancelled by the mean, so its gradient is 0."""
    x, gamma, beta = _leaf_inputs(shape, seed=5, gamma_needed=False)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(6), dtype=F64)
    view = (1, -1) + (1,) * (x.dim() - 2)
    dims = (0,) if x.dim() == 2 else (0, 2, 3)
    inv_std = (x.detach().var(dims, unbiased=False) + 1e-5).rsqrt()
    for mode in (True, False):
        c = torch.zeros(shape[1], dtype=F64, requires_grad=True)
        y = batch_norm_train(x.detach() + c.view(view), gamma, beta, grad_through_stats=mode)[0]
        (dc,) = torch.autograd.grad(y, c, dy)
        # dc is the per-channel sum of dx over the batch.
        if mode:
            assert dc.abs().max() < 1e-12 * dy.abs().sum()
        else:
            exact(dc, gamma * inv_std * dy.sum(dims))
            assert dc.abs().min() > 1e-3


# ---------------------------------------------------------------- float32 numerics


@pytest.mark.parametrize("seed", range(5))
def test_float32_large_mean_small_std(seed):
    gen = torch.Generator().manual_seed(seed)
    x = (1e4 + 1e-2 * torch.randn(64, 5, generator=gen, dtype=F64)).float()
    ours, ref = make_pair(x.shape, affine=False, dtype=torch.float32)
    y, y_ref = ours(x), ref(x)
    assert torch.isfinite(y).all()
    # Truth: exact BN of the float32 values themselves, in float64.
    xd = x.double()
    truth = (xd - xd.mean(0)) / (xd.var(0, unbiased=False) + 1e-5).sqrt()
    err, err_ref = (y.double() - truth).abs().max(), (y_ref.double() - truth).abs().max()
    # One float32 ulp at 1e4 is 2**-10 ~ 0.1 std, and a float32 mean of 64 such values is
    # off by a few ulps, so either output may be ~0.2 off: compare to torch at 0.4.
    assert_close(y, y_ref, rtol=0, atol=0.4)
    # Margin: half an input ulp (0.05 std), the rounding of mu_B itself to float32.
    assert err <= err_ref + 0.05, (err, err_ref)
    # Running statistics still follow torch (var to within the ~5% the mean error allows).
    assert_close(ours.running_mean, ref.running_mean, rtol=1e-6, atol=0)
    assert_close(ours.running_var, ref.running_var, rtol=0.05, atol=0)


def test_float32_textbook_variance_formula_fails():
    """Why we center: E[x^2] - E[x]^2 cancels catastrophically on the same data."""
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(64, 5, generator=gen, dtype=F64)).float()
    true_var = x.double().var(0, unbiased=False)
    textbook = (x * x).mean(0) - x.mean(0) ** 2
    assert (textbook < 0).any()  # a negative variance: rsqrt(var + eps) is NaN
    assert torch.isnan((textbook + 1e-5).rsqrt()).any()
    assert ((textbook.double() - true_var).abs() / true_var).max() > 1e3
    _, _, var_b = batch_norm_train(x, None, None)
    assert (var_b >= 0).all()
    assert_close(var_b.double(), true_var, rtol=0.05, atol=0)


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("shape", [(1, 3), (1, 3, 1), (1, 3, 1, 1)])
def test_single_value_per_channel_rejected_in_training(shape):
    bn = BatchNorm(3)
    before = copy.deepcopy(bn.state_dict())
    with pytest.raises(ValueError, match="more than one value") as info:
        bn(torch.randn(shape))
    assert str(shape) in str(info.value)
    for key, value in bn.state_dict().items():
        assert torch.equal(value, before[key]), key
    # Eval uses running statistics: a single sample is fine and matches torch.
    ours, ref = make_pair(shape, momentum=0.5)
    gen = torch.Generator().manual_seed(1)
    big = (4, *shape[1:])
    for _ in range(2):
        xb = make_x(big, gen, 3.0, 2.0)
        exact(ours(xb), ref(xb))
    ours.eval()
    ref.eval()
    x = torch.randn(shape, dtype=F64)
    y = ours(x)
    assert torch.isfinite(y).all()
    exact(y, ref(x))


@pytest.mark.parametrize("shape", [(1, 3, 2), (1, 3, 2, 1)])
def test_batch_of_one_with_spatial_values_trains(shape):
    ours, ref = make_pair(shape)
    dy = torch.randn(shape, dtype=F64)
    assert_runs_match(ours, ref, torch.randn(shape, dtype=F64), dy)
    assert_buffers_match(ours, ref)


@pytest.mark.parametrize(
    "shape, expected",
    [((4, 2), "C = 3"), ((4, 5, 6), "C = 3"), ((2, 4, 3, 3), "C = 3"), ((3,), "(N, C)")],
)
@pytest.mark.parametrize("training", [True, False])
def test_wrong_shape_raises(shape, expected, training):
    bn = BatchNorm(3).train(training)
    with pytest.raises(ValueError) as info:
        bn(torch.randn(shape))
    message = str(info.value)
    assert str(shape) in message and expected in message


@pytest.mark.parametrize("training", [True, False])
def test_five_dims_rejected(training):
    bn = BatchNorm(3).train(training)
    with pytest.raises(ValueError, match=r"\(2, 3, 2, 2, 2\).*expected") as info:
        bn(torch.randn(2, 3, 2, 2, 2))
    assert "(N, C, H, W)" in str(info.value)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.uint8, torch.bool])
@pytest.mark.parametrize("training", [True, False])
def test_integer_input_raises_type_error(dtype, training):
    bn = BatchNorm(3).train(training)
    with pytest.raises(TypeError, match=str(dtype)):
        bn(torch.ones(4, 3, dtype=dtype))


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("shape", [(2, 3), (4, 3, 2), (2, 3, 1, 1), (3, 3, 2, 2)])
def test_constant_channels_never_nan(dtype, shape):
    """Zero batch variance: x_hat = 0, so y = beta and gradients stay finite."""
    ours, ref = make_pair(shape, dtype=dtype)
    x = torch.full(shape, 1234.5, dtype=dtype)
    x[:, 0] = 0.0
    dy = torch.randn(shape, dtype=dtype)
    for mode in (True, False):
        ours.train(mode)
        ref.train(mode)
        outs = run(ours, x, dy)
        for t in outs:
            assert torch.isfinite(t).all()
        y_ref = run(ref, x, dy)[0]
        if mode:
            # Exact would be y = beta. A mean off by one ulp of 1234.5 (1.2e-4 in float32)
            # times 1/sqrt(eps) ~ 316 gives 0.04 * gamma; torch's float32 kernel is ~4e-3 off.
            tol = 0.1 if dtype == torch.float32 else 1e-9
            beta = ours.bias.detach().view((1, -1) + (1,) * (len(shape) - 2)).expand(shape)
            assert_close(outs[0], beta, atol=tol, rtol=0)
            assert_close(outs[0], y_ref, atol=tol, rtol=0)
        else:
            assert_close(outs[0], y_ref, atol=1e-9, rtol=1e-5)


# ---------------------------------------------------------------- train / eval switching


def test_train_eval_switch_uses_batch_or_running_stats():
    shape = (8, 3, 4)
    gen = torch.Generator().manual_seed(9)
    bn = BatchNorm(3, momentum=0.5, dtype=F64)
    for step in range(3):
        bn(make_x(shape, gen, 2.0 + step, 3.0))
    x = make_x(shape, gen, -4.0, 0.5)  # statistics far from the running ones
    saved = {k: v.clone() for k, v in bn.state_dict().items()}

    bn.eval()
    assert not bn.training
    y_eval = bn(x)
    view = (1, -1, 1)
    expected = (x - bn.running_mean.view(view)) / (bn.running_var.view(view) + bn.eps).sqrt()
    exact(y_eval, expected * bn.weight.view(view) + bn.bias.view(view))
    # Inference is per sample: it does not depend on the rest of the batch.
    exact(bn(x[:1]), y_eval[:1])
    bn(make_x(shape, gen, 10.0, 5.0))
    for key, value in bn.state_dict().items():
        assert torch.equal(value, saved[key]), f"{key} changed in eval mode"

    bn.train()
    assert bn.training
    y_train = bn(x)
    exact(y_train, batch_norm_train(x, bn.weight, bn.bias, bn.eps)[0])
    assert (y_train - y_eval).abs().max() > 1.0
    assert bn.num_batches_tracked.item() == saved["num_batches_tracked"].item() + 1
    assert not torch.equal(bn.running_mean, saved["running_mean"])


# ---------------------------------------------------------------- in a real training loop


def _net(bn: nn.Module) -> nn.Sequential:
    return nn.Sequential(nn.Linear(6, 8), bn, nn.ReLU(), nn.Linear(8, 1))


def test_sgd_training_matches_torch_float32():
    torch.manual_seed(0)
    ours = _net(BatchNorm(8))
    ref = _net(nn.BatchNorm1d(8))
    ref.load_state_dict(ours.state_dict())  # same init; BN keys are torch's
    gen = torch.Generator().manual_seed(1)
    X = torch.randn(32, 6, generator=gen) * 3 + 1
    target = (X[:, :1] * X[:, 1:2]).tanh() + 0.1 * torch.randn(32, 1, generator=gen)
    opts = [torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9) for net in (ours, ref)]
    losses = torch.zeros(2, 20)
    for step in range(20):
        batch = slice((step % 4) * 8, (step % 4) * 8 + 8)
        for i, (net, opt) in enumerate(zip((ours, ref), opts, strict=True)):
            opt.zero_grad()
            loss = nn.functional.mse_loss(net(X[batch]), target[batch])
            loss.backward()
            opt.step()
            losses[i, step] = loss.item()
    assert_close(losses[0], losses[1], rtol=1e-4, atol=1e-6)
    assert losses[0, -4:].mean() < losses[0, :4].mean()  # it actually trains
    sd_ours, sd_ref = ours.state_dict(), ref.state_dict()
    assert list(sd_ours) == list(sd_ref)
    for key in sd_ref:
        assert_close(sd_ours[key], sd_ref[key], rtol=1e-4, atol=1e-5, msg=key)
    ours.eval()
    ref.eval()
    assert_close(ours(X), ref(X), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- drop-in details


@pytest.mark.parametrize("shape", [(8, 3), (4, 3, 2, 2)])
def test_affine_false_output_can_be_modified_in_place(shape):
    """BN -> ReLU(inplace=True) is a common torch pattern; it must not break backward."""
    ours, ref = make_pair(shape, affine=False)
    x = torch.randn(shape, dtype=F64)
    grads = []
    for bn in (ours, ref):
        xi = x.clone().requires_grad_(True)
        nn.functional.relu(bn(xi), inplace=True).sum().backward()
        grads.append(xi.grad)
    exact(*grads)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("training", [True, False])
def test_low_precision_input_with_float32_parameters(dtype, training):
    """Mixed precision as in torch: half input, float32 module -> half output."""
    shape = (16, 3, 2)
    ours, ref = make_pair(shape, dtype=torch.float32)
    ours.train(training)
    ref.train(training)
    x = torch.randn(shape).to(dtype)
    y, y_ref = ours(x), ref(x)
    assert y_ref.dtype == dtype
    assert y.dtype == dtype
    assert_close(y.float(), y_ref.float(), rtol=2e-2, atol=2e-2)
    if training:
        assert ours.running_mean.dtype == torch.float32
        assert_close(ours.running_mean, ref.running_mean, rtol=1e-3, atol=1e-3)
        assert_close(ours.running_var, ref.running_var, rtol=1e-3, atol=1e-3)


# ---------------------------------------------------------------- one Function


def test_every_layout_trains_through_the_one_function():
    for shape in [(4, 3), (4, 3, 5), (4, 3, 2, 2)]:
        x = torch.randn(shape, requires_grad=True)
        assert BatchNorm(3)(x).grad_fn.name() == "BatchNormFunctionBackward"


def test_lockstep_stack_matches_separate_layers():
    # (V, N, C) through forward_variants: variant v's channel c is feature v * C + c.
    gen = torch.Generator().manual_seed(5)
    V, N, C = 3, 6, 4
    h = torch.randn(V, N, C, generator=gen, dtype=F64) * 2 + 1
    dy = torch.randn(V, N, C, generator=gen, dtype=F64)
    stacked = BatchNorm(V * C, dtype=F64)
    with torch.no_grad():
        stacked.weight.copy_(torch.randn(V * C, generator=gen, dtype=F64))
        stacked.bias.copy_(torch.randn(V * C, generator=gen, dtype=F64))
    hs = h.clone().requires_grad_(True)
    out = stacked.forward_variants(hs)
    out.backward(dy)
    for v in range(V):
        ref = nn.BatchNorm1d(C, dtype=F64)
        with torch.no_grad():
            ref.weight.copy_(stacked.weight[v * C : (v + 1) * C])
            ref.bias.copy_(stacked.bias[v * C : (v + 1) * C])
        xv = h[v].clone().requires_grad_(True)
        yv = ref(xv)
        yv.backward(dy[v])
        exact(out[v].detach(), yv.detach())
        exact(hs.grad[v], xv.grad)
        exact(stacked.weight.grad[v * C : (v + 1) * C], ref.weight.grad)
        exact(stacked.running_mean[v * C : (v + 1) * C], ref.running_mean)
        exact(stacked.running_var[v * C : (v + 1) * C], ref.running_var)
    with pytest.raises(ValueError, match=r"expected \(V, N, C\) with V \* C = 12 features"):
        stacked.forward_variants(torch.randn(2, 6, 4))


def test_second_derivative_raises_instead_of_coming_out_wrong():
    x = torch.randn(5, 3, dtype=F64, requires_grad=True)
    y = BatchNorm(3, dtype=F64)(x)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((y**3).sum(), x, create_graph=True)
    # A first derivative still works after the refusal.
    (g,) = torch.autograd.grad((BatchNorm(3, dtype=F64)(x) ** 3).sum(), x)
    assert torch.isfinite(g).all()


def test_device_and_dtype_keep_torchs_positions():
    # torch's order: num_features, eps, momentum, affine, track_running_stats, device, dtype.
    ours = BatchNorm(3, 1e-3, 0.2, True, True, "cpu", F64)
    ref = nn.BatchNorm1d(3, 1e-3, 0.2, True, True, "cpu", F64)
    for (name, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items(), strict=True):
        assert a.dtype == b.dtype and a.device == b.device, name
    assert ours.eps == ref.eps and ours.momentum == ref.momentum
    with pytest.raises(TypeError):
        BatchNorm(3, 1e-5, 0.1, True, True, None, None, False)  # grad_through_stats is keyword-only


def test_function_passes_gradcheck_over_a_lockstep_stack():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(2, 5, 3, generator=gen, dtype=F64, requires_grad=True)
    gamma = torch.randn(2, 1, 3, generator=gen, dtype=F64, requires_grad=True)
    beta = torch.randn(2, 1, 3, generator=gen, dtype=F64, requires_grad=True)
    for through in (True, False):

        def f(x, gamma, beta, through=through):
            return BatchNormFunction.apply(x, gamma, beta, (1,), 1e-5, through, None)

        if through:
            assert torch.autograd.gradcheck(f, (x, gamma, beta))
        else:
            # The naive gradient holds mu and var constant, so it is not the true one.
            assert not torch.autograd.gradcheck(f, (x, gamma, beta), raise_exception=False)


@pytest.mark.parametrize("shape", [(4096, 96), (256, 16, 8, 8), (64, 40, 300)])
def test_large_inputs_match_torch_on_any_thread_count(shape):
    # Large enough that torch's reductions split over threads; the result must match torch
    # and must not depend on how many threads there are.
    gen = torch.Generator().manual_seed(3)
    x = make_x(shape, gen, offset=2.0)
    dy = torch.randn(shape, generator=gen, dtype=F64)
    threads = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            ours, ref = make_pair(shape, torch.Generator().manual_seed(1))
            assert_runs_match(ours, ref, x, dy)
            assert_buffers_match(ours, ref)
            results.append(run(ours, x, dy))
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(*results, strict=True):
        assert_close(a, b, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("shape", [(6, 4), (5, 4, 3), (3, 4, 2, 2)])
def test_non_contiguous_input_matches_torch(shape):
    gen = torch.Generator().manual_seed(4)
    x = make_x(shape, gen, offset=1.0).transpose(0, -1).contiguous().transpose(0, -1)
    assert not x.is_contiguous()
    dy = torch.randn(shape, generator=gen, dtype=F64)
    ours, ref = make_pair(shape, gen)
    assert_runs_match(ours, ref, x, dy)
    assert_buffers_match(ours, ref)


def test_float64_input_trains_a_float32_layer_and_keeps_its_buffers_float32():
    x = torch.randn(8, 3, dtype=F64) * 3 + 1
    ours, ref = BatchNorm(3), nn.BatchNorm1d(3, dtype=F64)
    y = ours(x)
    assert y.dtype == F64 and ours.running_mean.dtype == torch.float32
    assert_close(y, ref(x), rtol=1e-6, atol=1e-6)
    assert_close(ours.running_mean.double(), ref.running_mean, rtol=1e-6, atol=1e-7)
    assert_close(ours.running_var.double(), ref.running_var, rtol=1e-6, atol=1e-7)


def test_functional_batch_norm_refuses_one_value_per_channel():
    with pytest.raises(ValueError, match="more than one value per channel"):
        batch_norm_train(torch.randn(1, 4), None, None)


# ---------------------------------------------------------------- torch 2.13's contract


def test_constructor_signature_matches_torch():
    """torch's parameters in torch's positions and kinds; our extra stays keyword-only."""
    ours = inspect.signature(BatchNorm).parameters
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d):
        theirs = inspect.signature(cls).parameters
        shared = [(p.name, p.kind, p.default) for p in theirs.values()]
        assert [(p.name, p.kind, p.default) for p in ours.values()][: len(shared)] == shared
    assert ours["bias"].kind is inspect.Parameter.KEYWORD_ONLY
    assert ours["grad_through_stats"].kind is inspect.Parameter.KEYWORD_ONLY


@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 5), (2, 4, 3, 3)])
def test_bias_false_matches_torch(shape):
    ours = BatchNorm(shape[1], dtype=F64, bias=False)
    ref = ref_class(len(shape))(shape[1], dtype=F64, bias=False)
    assert ours.bias is None and ref.bias is None
    assert isinstance(ours.weight, nn.Parameter)
    assert list(ours.state_dict()) == list(ref.state_dict())
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(shape[1], generator=gen, dtype=F64))
        ref.weight.copy_(ours.weight)
    for mode in ("train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = make_x(shape, gen, 1.0, 2.0)
        dy = torch.randn(shape, generator=gen, dtype=F64)
        assert_runs_match(ours, ref, x, dy)
        assert_buffers_match(ours, ref)
    assert "bias=False" in repr(ours)


@pytest.mark.parametrize("shape", [(0, 3), (0, 3, 4), (2, 3, 0), (0, 3, 2, 2), (1, 3, 0)])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("affine", [True, False])
def test_empty_batch_matches_torch(shape, momentum, affine):
    """An empty batch: empty output, zero gradients, running statistics untouched and
    num_batches_tracked counted (as torch counts it), then training goes on as torch's."""
    ours, ref = make_pair(shape, momentum=momentum, affine=affine)
    gen = torch.Generator().manual_seed(4)
    full = tuple(4 if s == 0 else s for s in shape)
    for batch in (shape, full, shape, full):
        for mode in ("train", "eval"):
            ours.train(mode == "train")
            ref.train(mode == "train")
            x = make_x(batch, gen, 1.0, 2.0)
            dy = torch.randn(batch, generator=gen, dtype=F64)
            outs = run(ours, x, dy)
            assert outs[0].shape == batch
            if x.numel() == 0 and affine:
                assert torch.equal(outs[2], torch.zeros(3, dtype=F64))
                assert torch.equal(outs[3], torch.zeros(3, dtype=F64))
            for a, e in zip(outs, run(ref, x, dy), strict=True):
                if e is None:
                    assert a is None
                else:
                    exact(a, e)
            assert_buffers_match(ours, ref)


def test_eval_uses_kept_buffers_when_tracking_is_switched_off():
    """torch's rule: eval normalizes with the running statistics whenever the buffers
    exist, even with track_running_stats switched off; training then neither updates nor
    counts. A layer built without buffers and switched on later uses batch statistics."""
    shape = (8, 3, 4)
    gen = torch.Generator().manual_seed(8)
    ours, ref = make_pair(shape, gen, momentum=0.5)
    for step in range(2):
        x = make_x(shape, gen, 2.0 + step, 3.0)
        exact(ours(x), ref(x))
    for bn in (ours, ref):
        bn.track_running_stats = False
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    for mode in ("eval", "train", "eval"):
        ours.train(mode == "train")
        ref.train(mode == "train")
        x = make_x(shape, gen, -3.0, 0.5)
        dy = torch.randn(shape, generator=gen, dtype=F64)
        assert_runs_match(ours, ref, x, dy)
        assert_buffers_match(ours, ref)
        for key, value in ours.state_dict().items():
            assert torch.equal(value, before[key]), key
    ours.eval()
    x = make_x(shape, gen, -3.0, 0.5)
    view = (1, -1, 1)
    x_hat = (x - ours.running_mean.view(view)) / (ours.running_var.view(view) + ours.eps).sqrt()
    exact(ours(x), x_hat * ours.weight.view(view) + ours.bias.view(view))

    ours, ref = make_pair(shape, gen, track_running_stats=False)
    for bn in (ours, ref):
        bn.track_running_stats = True
        bn.eval()
    x = make_x(shape, gen, 1.0, 2.0)
    dy = torch.randn(shape, generator=gen, dtype=F64)
    assert_runs_match(ours, ref, x, dy)
    assert ours.running_mean is None and ours.num_batches_tracked is None


def test_state_dict_says_version_2_and_old_ones_load():
    ours, ref = BatchNorm(3), nn.BatchNorm2d(3)
    assert ours.state_dict()._metadata[""] == ref.state_dict()._metadata[""]
    old = ref.state_dict()
    del old["num_batches_tracked"]
    old._metadata[""]["version"] = 1
    ours.num_batches_tracked.fill_(7)
    ours.load_state_dict(old)  # strict: the missing count is filled in
    assert ours.num_batches_tracked.item() == 7


@pytest.mark.parametrize("through", [True, False])
@pytest.mark.parametrize(
    "kw", [{}, {"bias": False}, {"affine": False}], ids=["affine", "no_bias", "plain"]
)
def test_batched_backward_matches_one_vector_at_a_time(through, kw):
    """autograd.grad(..., is_grads_batched=True) runs our backward under vmap: each row of
    the result is the gradient for that row of upstream gradients."""
    shape = (5, 3, 2)
    gen = torch.Generator().manual_seed(9)
    bn = BatchNorm(3, dtype=F64, grad_through_stats=through, **kw)
    x = make_x(shape, gen, 1.0, 2.0).requires_grad_(True)
    inputs = [x, *bn.parameters()]
    y = bn(x)
    dys = torch.randn(4, *shape, generator=gen, dtype=F64)
    batched = torch.autograd.grad(y, inputs, dys, retain_graph=True, is_grads_batched=True)
    for i, dy in enumerate(dys):
        single = torch.autograd.grad(y, inputs, dy, retain_graph=True)
        for b, s in zip(batched, single, strict=True):
            exact(b[i], s)
    if through:
        params = tuple(bn.parameters())
        assert torch.autograd.gradcheck(lambda x, *p: bn(x), (x, *params), check_batched_grad=True)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_layer_matches_torch(dtype):
    """A layer wholly in float16/bfloat16 (parameters and buffers too) against torch's:
    statistics in float32, then output, gradients and running statistics in the dtype."""
    shape = (16, 3, 5, 5)
    ours, ref = BatchNorm(3).to(dtype), nn.BatchNorm2d(3).to(dtype)
    gen = torch.Generator().manual_seed(10)
    for _ in range(2):
        x = (torch.randn(shape, generator=gen) * 3 + 2).to(dtype)
        dy = torch.randn(shape, generator=gen).to(dtype)
        (y, dx, dw, db), (y_ref, dx_ref, dw_ref, db_ref) = run(ours, x, dy), run(ref, x, dy)
        assert y.dtype == dx.dtype == dw.dtype == dtype
        tol = {"rtol": 2e-2, "atol": 2e-2}
        assert_close(y.float(), y_ref.float(), **tol)
        assert_close(dx.float(), dx_ref.float(), **tol)
        assert_close(dw.float(), dw_ref.float(), **tol)
        assert_close(db.float(), db_ref.float(), **tol)
    assert ours.running_mean.dtype == dtype
    assert_close(ours.running_mean.float(), ref.running_mean.float(), rtol=1e-2, atol=1e-2)
    assert_close(ours.running_var.float(), ref.running_var.float(), rtol=1e-2, atol=1e-2)
