"""PyTorch's own BatchNorm tests, ported: each runs on torch's class and on ours.

Every test takes ``impl``. With "torch" it runs on ``torch.nn.BatchNorm1d/2d``, the
control: a failure there means the port is wrong, not our layer. With "ours" it runs on
``bn_core.BatchNorm``. Each docstring names the upstream test it mirrors, in
pytorch/pytorch's test/test_nn.py, test/test_modules.py (over the BatchNorm1d/2d
ModuleInputs of torch/testing/_internal/common_modules.py) or
test/nn/test_load_state_dict.py, and says where ours is expected to differ and why.
The ports are rewritten for pytest and use smaller tensors where upstream's sizes only
add run time; the property each test checks is upstream's.
"""

from __future__ import annotations

import copy
import io
from collections import OrderedDict
from itertools import product
from typing import NamedTuple

import pytest
import torch
from torch import nn
from torch.autograd import gradcheck, gradgradcheck
from torch.testing import assert_close

from bn_core import BatchNorm

IMPLS = ("torch", "ours")
F64 = torch.float64
CL = torch.channels_last
# Ours has a first derivative only; its backward refuses create_graph (see
# test_gradgrad for where that applies).
NO_GRADGRAD = "no second derivative"


@pytest.fixture(params=IMPLS)
def impl(request) -> str:
    return request.param


def bn_class(impl: str, ndim: int) -> type[nn.Module]:
    """The class under test for (N, C, *) inputs of ``ndim`` dims."""
    if impl == "ours":
        return BatchNorm
    return nn.BatchNorm2d if ndim == 4 else nn.BatchNorm1d


def make_bn(impl: str, ndim: int, *args, **kwargs) -> nn.Module:
    return bn_class(impl, ndim)(*args, **kwargs)


def uniform(shape, dtype=torch.float32, seed=0, low=-9.0, high=9.0) -> torch.Tensor:
    """Seeded values in [low, high), the range of upstream's make_tensor for floats."""
    gen = torch.Generator().manual_seed(seed)
    return torch.empty(shape, dtype=torch.float64).uniform_(low, high, generator=gen).to(dtype)


class ModuleCase(NamedTuple):
    """One ModuleInput: constructor arguments and the shape of the forward input."""

    name: str
    args: tuple
    kwargs: dict
    shape: tuple[int, ...]

    def build(self, impl: str, **extra) -> nn.Module:
        return make_bn(impl, len(self.shape), *self.args, **self.kwargs, **extra)

    @property
    def batch_stats(self) -> bool:
        """Whether eval mode still normalizes with batch statistics (no buffers)."""
        return len(self.args) >= 5 and not self.args[4]


# module_inputs_torch_nn_BatchNorm1d / _BatchNorm2d, case for case.
MODULE_CASES = [
    ModuleCase("1d_affine", (10,), {}, (4, 10)),
    ModuleCase("1d_3d_input", (5,), {}, (4, 5, 3)),
    ModuleCase("1d_affine_simple_average", (10, 1e-3, None), {}, (4, 10)),
    ModuleCase("1d_not_affine", (10, 1e-3, 0.3, False), {}, (4, 10)),
    ModuleCase("1d_not_tracking_stats", (10, 1e-3, 0.3, True, False), {}, (4, 10)),
    ModuleCase("1d_3d_input_not_affine", (5, 1e-3, 0.3, False), {}, (4, 5, 3)),
    ModuleCase("1d_zero_batch", (5, 1e-3, 0.3, False), {}, (0, 5, 9)),
    ModuleCase("1d_affine_not_bias", (10,), {"bias": False}, (4, 10)),
    ModuleCase("2d", (3,), {}, (2, 3, 6, 6)),
    ModuleCase("2d_simple_average", (3, 1e-3, None), {}, (2, 3, 6, 6)),
    ModuleCase("2d_momentum", (3, 1e-3, 0.8), {}, (2, 3, 6, 6)),
    ModuleCase("2d_not_affine", (3, 1e-3, 0.8, False), {}, (2, 3, 6, 6)),
    ModuleCase("2d_not_tracking_stats", (3, 1e-3, 0.8, True, False), {}, (2, 3, 6, 6)),
    ModuleCase("2d_zero_batch", (5, 1e-3, 0.3, False), {}, (0, 5, 2, 2)),
    ModuleCase("2d_affine_not_bias", (3,), {"bias": False}, (2, 3, 6, 6)),
]
CASE_IDS = [c.name for c in MODULE_CASES]
cases = pytest.mark.parametrize("case", MODULE_CASES, ids=CASE_IDS)
modes = pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])


def leaf(t: torch.Tensor, requires_grad: bool = True) -> torch.Tensor:
    return t.detach().clone().requires_grad_(requires_grad)


def grads_of(tensors) -> list[torch.Tensor | None]:
    return [None if t.grad is None else t.grad.clone() for t in tensors]


def assert_floating_on(module: nn.Module, device: str, dtype: torch.dtype) -> None:
    for name, t in [*module.named_parameters(), *module.named_buffers()]:
        assert t.device == torch.device(device), name
        if t.is_floating_point():
            assert t.dtype == dtype, name
        else:
            assert t.dtype == torch.long, name


# ------------------------------------------------------------ test/test_modules.py


@cases
@modes
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_forward(impl, case, training, dtype):
    """test_modules.py TestModule.test_forward: build, .to(dtype), forward; then .float() /
    .double() and forward again, and every parameter and buffer has that dtype. Also checks
    the output and buffers against torch's class built from the same arguments."""
    m = case.build(impl).to(dtype).train(training)
    twin = case.build("torch").to(dtype).train(training)
    x = uniform(case.shape, dtype)
    y = m(x)
    assert y.shape == x.shape and y.dtype == dtype
    assert_close(y, twin(x))
    for (name, a), (_, b) in zip(m.named_buffers(), twin.named_buffers(), strict=True):
        assert_close(a, b, msg=name)
    (m.float if dtype == torch.float32 else m.double)()
    m(x)
    assert_floating_on(m, "cpu", dtype)


@cases
@modes
@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["float32", "float64"])
def test_factory_kwargs(impl, case, training, dtype):
    """test_modules.py TestModule.test_factory_kwargs: device= and dtype= given to the
    constructor reach every parameter and buffer (num_batches_tracked stays long)."""
    m = case.build(impl, device="cpu", dtype=dtype).train(training)
    assert_floating_on(m, "cpu", dtype)


@cases
@modes
def test_repr(impl, case, training):
    """test_modules.py TestModule.test_repr: repr and str work. Added: both say whether
    there is a bias (bias=False without affine or with bias=False), as torch 2.13's does."""
    m = case.build(impl).train(training)
    text = repr(m)
    assert str(m) == text
    assert f"bias={m.bias is not None}" in text


@cases
@modes
def test_pickle(impl, case, training):
    """test_modules.py TestModule.test_pickle: torch.save / torch.load of the whole module
    gives a module with the same output."""
    m = case.build(impl).train(training)
    x = uniform(case.shape)
    y = m(x)
    buffer = io.BytesIO()
    torch.save(m, buffer)
    buffer.seek(0)
    # weights_only=False: a whole module is a pickled object, not just tensors.
    copied = torch.load(buffer, weights_only=False)
    assert type(copied) is type(m)
    assert_close(copied(x), y)


@cases
@modes
def test_non_contiguous_tensors(impl, case, training):
    """test_modules.py TestModule.test_non_contiguous_tensors: non-contiguous input and
    upstream gradient (every other element of a repeated tensor) give the same output and
    the same input and parameter gradients as contiguous ones."""
    m = case.build(impl).train(training)

    def non_contiguous(t):
        return t.repeat_interleave(2, dim=-1)[..., ::2]

    x = leaf(uniform(case.shape))
    y0 = m(x)
    dy = torch.randn(y0.shape, generator=torch.Generator().manual_seed(1))
    y0.backward(dy)
    want_x, want_params = x.grad.clone(), grads_of(m.parameters())
    inputs = [x.detach(), non_contiguous(x.detach())]
    upstream = [dy, non_contiguous(dy)]
    if x.numel():
        assert not inputs[1].is_contiguous() and not upstream[1].is_contiguous()
    for xin, dyi in product(inputs, upstream):
        xi = xin.detach().requires_grad_(True)  # detach keeps the strides; clone would not
        m.zero_grad(set_to_none=True)
        y = m(xi)
        y.backward(dyi)
        assert_close(y, y0.detach())
        assert_close(xi.grad, want_x, atol=1e-4, rtol=0)
        for got, want in zip(grads_of(m.parameters()), want_params, strict=True):
            assert_close(got, want)


def _check_gradients(m: nn.Module, x: torch.Tensor, check) -> None:
    """Upstream's _test_gradients_helper: the check over (input, *parameters) together,
    then over the input with one parameter at a time; check_batched_grad and fast_mode on,
    as upstream's gradcheck wrapper sets them."""
    params = tuple(m.parameters())

    def fn(x, *params):
        return m(x)

    assert check(fn, (x, *params), check_batched_grad=True, fast_mode=True)
    for p in params:
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
        assert check(fn, (x, *params), check_batched_grad=True, fast_mode=True)
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)


@cases
@modes
def test_grad(impl, case, training):
    """test_modules.py TestModule.test_grad: gradcheck in float64, with
    check_batched_grad=True as upstream's wrapper sets it, so the backward also runs
    under vmap (autograd.grad with is_grads_batched=True)."""
    m = case.build(impl).double().train(training)
    x = leaf(uniform(case.shape, F64))
    _check_gradients(m, x, gradcheck)


@cases
@modes
def test_gradgrad(impl, case, training):
    """test_modules.py TestModule.test_gradgrad: gradgradcheck in float64.

    Exception for ours: BatchNormFunction's backward is written by hand and is not itself
    differentiable, so wherever a batch is normalized with its own statistics (training,
    or eval without buffers) ours raises a RuntimeError naming the missing second
    derivative instead of returning a wrong one. Inference with running statistics and an
    empty batch are plain torch ops in ours, so those pass gradgradcheck as torch does.
    """
    m = case.build(impl).double().train(training)
    x = leaf(uniform(case.shape, F64))
    through_function = (training or case.batch_stats) and x.numel() > 0
    if impl == "ours" and through_function:
        with pytest.raises(RuntimeError, match=NO_GRADGRAD):
            _check_gradients(m, x, gradgradcheck)
    else:
        _check_gradients(m, x, gradgradcheck)


FOUR_D = [c for c in MODULE_CASES if len(c.shape) == 4]


@pytest.mark.parametrize("case", FOUR_D, ids=[c.name for c in FOUR_D])
@modes
def test_memory_format(impl, case, training):
    """test_modules.py TestModule.test_memory_format: a channels_last input (and the module
    moved to each memory format) gives the contiguous run's output and gradients, and the
    output and input gradient come back channels_last exactly when the input is."""
    m = case.build(impl).train(training)
    x = leaf(uniform(case.shape))
    params = [p for p in m.parameters() if p.requires_grad]
    want = m(x)
    dy = torch.rand(want.shape, generator=torch.Generator().manual_seed(2))
    want_grads = torch.autograd.grad(want, [x, *params], dy) if training else None
    for input_format in (torch.contiguous_format, CL):
        xi = leaf(x.contiguous(memory_format=input_format))
        for module_format in (torch.preserve_format, torch.contiguous_format, CL):
            m.to(memory_format=module_format)
            y = m(xi)
            assert_close(y, want)
            assert y.is_contiguous(memory_format=input_format)
            if training:
                grads = torch.autograd.grad(y, [xi, *params], torch.empty_like(y).copy_(dy))
                assert_close(grads, want_grads)
                assert grads[0].is_contiguous(memory_format=input_format)
                assert all(g.is_contiguous() for g in grads[1:])


@cases
def test_if_train_and_eval_modes_differ(impl, case):
    """test_modules.py TestModule.test_if_train_and_eval_modes_differ: BatchNorm's
    ModuleInfo says train_and_eval_differ=True, so forward must read ``training``."""
    m = case.build(impl)
    del m.training
    with pytest.raises(AttributeError, match="training"):
        m(uniform(case.shape))


@cases
def test_device_ctx_init(impl, case):
    """test_modules.py TestModule.test_device_ctx_init: built under torch.device("meta"),
    every parameter and buffer is meta with the CPU build's shape, dtype and strides."""
    cpu = case.build(impl)
    with torch.device("meta"):
        meta = case.build(impl)
    pairs = [
        *zip(meta.named_parameters(), cpu.named_parameters(), strict=True),
        *zip(meta.named_buffers(), cpu.named_buffers(), strict=True),
    ]
    for (name, a), (_, b) in pairs:
        assert a.is_meta, name
        assert (a.shape, a.dtype, a.stride(), a.requires_grad) == (
            b.shape,
            b.dtype,
            b.stride(),
            b.requires_grad,
        ), name


@pytest.mark.parametrize("eps", [-1.0, 0.0])
@pytest.mark.parametrize("shape", [(2, 10), (2, 10, 5, 5)], ids=["1d", "2d"])
def test_errors(impl, eps, shape):
    """test_modules.py TestModule.test_errors (module_error_inputs_torch_nn_BatchNorm1d_2d_3d):
    eps <= 0 raises a ValueError about eps.

    Exception for ours: torch raises it from the training forward ("batch_norm eps must be
    positive ..."); ours raises it from the constructor, in the project's error style
    ("eps = -1.0: must be > 0"), so a bad layer never exists. The test accepts either point.
    """
    with pytest.raises(ValueError, match="eps"):
        m = make_bn(impl, len(shape), 10, eps=eps)
        m(uniform(shape))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@cases
@modes
def test_cpu_gpu_parity(impl, case, training):
    """test_modules.py TestModule.test_cpu_gpu_parity: the same module on CPU and on CUDA
    gives the same output and gradients (upstream's float32 tolerance, 5e-2 relative)."""
    cpu = case.build(impl).train(training)
    gpu = copy.deepcopy(cpu).cuda()
    x_cpu = leaf(uniform(case.shape))
    x_gpu = leaf(x_cpu.detach().cuda())
    y_cpu, y_gpu = cpu(x_cpu), gpu(x_gpu)
    assert_close(y_gpu.cpu(), y_cpu, rtol=5e-2, atol=1e-5)
    dy = torch.randn(y_cpu.shape, generator=torch.Generator().manual_seed(3))
    y_cpu.backward(dy)
    y_gpu.backward(dy.cuda())
    assert_close(x_gpu.grad.cpu(), x_cpu.grad, rtol=5e-2, atol=1e-4)
    for a, b in zip(gpu.parameters(), cpu.parameters(), strict=True):
        assert_close(a.grad.cpu(), b.grad, rtol=5e-2, atol=1e-4)
    for (name, a), (_, b) in zip(gpu.named_buffers(), cpu.named_buffers(), strict=True):
        assert_close(a.cpu(), b, rtol=5e-2, atol=1e-5, msg=name)


# ------------------------------------------------------------ test/test_nn.py


def test_batchnorm_raises_error_if_less_than_one_value_per_channel(impl):
    """test_nn.py TestNN.test_batchnorm_raises_error_if_less_than_one_value_per_channel:
    training on (1, 10, 1), one value per channel, raises ValueError."""
    x = torch.rand(10)[None, :, None]
    with pytest.raises(ValueError):
        make_bn(impl, 3, 10)(x)


def test_batchnorm_buffer_update_when_stats_are_not_tracked(impl):
    """test_nn.py TestNN.test_batchnorm_buffer_update_when_stats_are_not_tracked: with
    track_running_stats switched off after construction, training leaves all three
    buffers (running_mean, running_var, num_batches_tracked) untouched."""
    bn = make_bn(impl, 2, 4, track_running_stats=True)
    bn.track_running_stats = False
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bn(torch.rand(32, 4))
    for key in ("num_batches_tracked", "running_mean", "running_var"):
        assert torch.equal(bn.state_dict()[key], before[key]), key


def test_batchnorm_load_state_dict(impl):
    """test_nn.py TestNN.test_batchnorm_load_state_dict: num_batches_tracked is saved;
    loading an empty (unversioned) state_dict with strict=False keeps the layer's count;
    and a layer built on the meta device, loaded that way with assign=True, gets a real
    count of 0 instead of keeping its meta placeholder."""
    bn = make_bn(impl, 4, 3)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(0))
    bn.num_batches_tracked = torch.tensor(10)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(10))
    empty = OrderedDict()
    bn.load_state_dict(empty, strict=False)
    assert torch.equal(bn.state_dict()["num_batches_tracked"], torch.tensor(10))

    with torch.device("meta"):
        meta_bn = make_bn(impl, 4, 3)
    assert meta_bn.num_batches_tracked.device == torch.device("meta")
    meta_bn.load_state_dict(empty, assign=True, strict=False)
    count = meta_bn.state_dict()["num_batches_tracked"]
    assert not count.is_meta
    assert torch.equal(count, torch.tensor(0))


def _nhwc_case(impl, shape, dtype, mixed, seed=0):
    """One helper() call of upstream's test_batchnorm_nhwc_cpu: the same layer, once on a
    channels_last input and upstream gradient and once on contiguous copies."""
    gen = torch.Generator().manual_seed(seed)
    channels = shape[1]
    x = leaf(torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=CL))
    dy = torch.randn(shape, generator=gen).to(dtype).contiguous(memory_format=CL)
    bn = make_bn(impl, 4, channels).to(dtype)
    with torch.no_grad():
        bn.weight.uniform_(generator=gen)
        bn.bias.uniform_(generator=gen)
    ref_x, ref_dy = leaf(x.contiguous()), dy.contiguous()
    ref_bn = make_bn(impl, 4, channels).to(dtype)
    ref_bn.load_state_dict(bn.state_dict())
    if mixed:
        bn.float()
        ref_bn.float()
    y = bn(x)
    y.backward(dy)
    ref_y = ref_bn(ref_x)
    ref_y.backward(ref_dy)
    assert y.is_contiguous(memory_format=CL)
    assert ref_y.is_contiguous()
    return (y, bn, x), (ref_y, ref_bn, ref_x)


@pytest.mark.parametrize("shape", [(4, 8, 10, 10), (4, 1, 9, 9), (4, 9, 1, 1)])
@pytest.mark.parametrize(
    "dtype, mixed",
    [
        (torch.float32, False),
        (torch.bfloat16, False),
        (torch.bfloat16, True),
        (torch.float16, False),
        (torch.float16, True),
    ],
    ids=["float32", "bfloat16", "bfloat16_mixed", "float16", "float16_mixed"],
)
def test_batchnorm_nhwc_cpu(impl, shape, dtype, mixed):
    """test_nn.py TestNN.test_batchnorm_nhwc_cpu (its BatchNorm2d half): channels_last
    input gives a channels_last output equal to the contiguous run, with equal weight,
    bias and input gradients, in float32, bfloat16 and float16, with the layer in the
    input's dtype or (mixed) in float32. Tolerances are assert_close's for the dtype, as
    upstream's assertEqual."""
    (y, bn, x), (ref_y, ref_bn, ref_x) = _nhwc_case(impl, shape, dtype, mixed)
    assert_close(y, ref_y)
    assert_close(bn.weight.grad, ref_bn.weight.grad)
    assert_close(bn.bias.grad, ref_bn.bias.grad)
    assert_close(x.grad, ref_x.grad)


# Upstream uses (4, 80, 500, 500) and (16, 3, 224, 224); this keeps more than 65,504
# (float16's largest value) values per channel at a fraction of the run time.
HALF_OVERFLOW_SHAPE = (4, 2, 150, 150)
FORMATS = {"contiguous": torch.contiguous_format, "cl": CL}


def _half_input_run(impl: str, half_layer: bool, fwd: str, bwd: str):
    """Output and input gradient of a fresh layer (float16 or float32) on the same float16
    input, laid out as ``fwd``, with a float16 upstream gradient laid out as ``bwd``."""
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(HALF_OVERFLOW_SHAPE, generator=gen).half()
    dy0 = torch.empty(HALF_OVERFLOW_SHAPE).uniform_(0, 1, generator=gen).half()
    bn = make_bn(impl, 4, 2)
    if half_layer:
        bn.half()
    x = leaf(x0.contiguous(memory_format=FORMATS[fwd]))
    y = bn(x)
    y.backward(dy0.contiguous(memory_format=FORMATS[bwd]))
    return y.detach(), x.grad


def _assert_layout_spread_within_torchs(impl: str, half_layer: bool, fwd: str, bwd: str):
    """The input gradient for layouts (fwd, bwd) against the all-contiguous run differs by
    no more than torch's own does on the same data, or one float16 ulp of the largest
    gradient where torch's agree more closely than that."""
    _, dx = _half_input_run(impl, half_layer, fwd, bwd)
    _, base = _half_input_run(impl, half_layer, "contiguous", "contiguous")
    _, torch_dx = _half_input_run("torch", half_layer, fwd, bwd)
    _, torch_base = _half_input_run("torch", half_layer, "contiguous", "contiguous")
    ulp = torch.finfo(torch.float16).eps * base.abs().max().item()
    allowed = max((torch_dx.float() - torch_base.float()).abs().max().item(), ulp)
    assert (dx.float() - base.float()).abs().max().item() <= allowed


@pytest.mark.parametrize("fmt", ["contiguous", "cl"])
def test_batchnorm_half_overflow_half_layer(impl, fmt):
    """test_nn.py TestNN.test_batchnorm_half_overflow, float16 layer part: a float16 layer
    on a float16 input whose channels hold more than 65,504 values gives no inf or NaN and
    the output of a float32 layer with the same state (statistics accumulate in float32).

    Added: each channel of the output has mean 0 and standard deviation 1, and the input
    gradient (upstream checks none for a float16 layer) depends on the memory layout no
    more than torch's own does.
    """
    y, dx = _half_input_run(impl, True, fmt, fmt)
    x = torch.randn(HALF_OVERFLOW_SHAPE, generator=torch.Generator().manual_seed(1)).half()
    ref_y = make_bn(impl, 4, 2).float()(x.contiguous(memory_format=FORMATS[fmt]))
    assert y.dtype == torch.float16
    assert not y.isinf().any() and not y.isnan().any()
    assert not dx.isinf().any() and not dx.isnan().any()
    assert_close(y, ref_y)
    per_channel = y.double().transpose(0, 1).reshape(2, -1)
    assert_close(per_channel.mean(1), torch.zeros(2, dtype=F64), atol=1e-3, rtol=0)
    assert_close(per_channel.std(1), torch.ones(2, dtype=F64), atol=1e-3, rtol=0)
    _assert_layout_spread_within_torchs(impl, True, "cl", "cl")


@pytest.mark.parametrize("fwd, bwd", list(product(FORMATS, repeat=2)))
def test_batchnorm_half_overflow_float_layer(impl, fwd, bwd):
    """test_nn.py TestNN.test_batchnorm_half_overflow, float32 layer part: a float32 layer
    on a float16 input of more than 65,504 values per channel, forward in one memory format
    and upstream gradient in another, gives finite outputs and input gradients equal to a
    second float32 layer's.

    Added: the output does not depend on the layouts, and the input gradient no more than
    torch's own does (torch's float16 input gradients differ across layouts by up to a few
    ulps, beyond assert_close's float16 tolerance, so that is the bound).
    """
    y, dx = _half_input_run(impl, False, fwd, bwd)
    ref_y, ref_dx = _half_input_run(impl, False, fwd, bwd)
    assert not y.isinf().any() and not y.isnan().any()
    assert not dx.isinf().any() and not dx.isnan().any()
    assert_close(y, ref_y)
    assert_close(dx, ref_dx)
    assert_close(y, _half_input_run(impl, False, "contiguous", "contiguous")[0])
    _assert_layout_spread_within_torchs(impl, False, fwd, bwd)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_batchnorm_non_contig_cpu(impl, dtype):
    """test_nn.py TestNN.test_batchnorm_non_contig_cpu (BatchNorm2d): in eval, an input
    permuted to a channels_last layout gives a channels_last output equal to the
    contiguous input's; and a bfloat16/float16 permuted input into a float32 layer gives
    the float32 input's output within 0.05."""
    gen = torch.Generator().manual_seed(0)
    x = torch.arange(6, dtype=torch.float32).reshape(1, 3, 2, 1).permute(0, 2, 1, 3)
    bn = make_bn(impl, 4, 2).float().eval()
    with torch.no_grad():
        bn.weight.uniform_(generator=gen)
        bn.bias.uniform_(generator=gen)
    ref_bn = make_bn(impl, 4, 2).float().eval()
    ref_bn.load_state_dict(bn.state_dict())
    y, ref_y = bn(x), ref_bn(x.contiguous())
    assert y.is_contiguous(memory_format=CL)
    assert ref_y.is_contiguous()
    assert_close(y, ref_y)

    x_low = torch.arange(24, dtype=dtype).reshape(1, 3, 2, 4).permute(0, 2, 1, 3)
    mixed = make_bn(impl, 4, 2).float().eval()
    ref_mixed = copy.deepcopy(mixed)
    assert_close(mixed(x_low).float(), ref_mixed(x_low.float()), atol=0.05, rtol=0.05)


def test_BatchNorm_empty(impl):  # noqa: N802 (upstream's name)
    """test_nn.py TestNNDeviceType.test_BatchNorm_empty (with common_nn's
    _test_module_empty_input): a float64 batch of 0 through a float32 BatchNorm2d(3)
    gives an output of the input's size, zero gradients for input, weight and bias, and
    leaves running_mean and running_var at their initial values."""
    mod = make_bn(impl, 4, 3)
    x = leaf(torch.randn(0, 3, 2, 2, dtype=F64))
    y = mod(x)
    y.backward(torch.rand_like(y))
    assert y.shape == x.shape
    for p in mod.parameters():
        assert torch.equal(p.grad, torch.zeros_like(p))
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert torch.equal(mod.running_mean, torch.zeros(3))
    assert torch.equal(mod.running_var, torch.ones(3))


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_batchnorm_grad(impl, training):
    """test_nn.py TestNNDeviceType.test_batchnorm_grad: gradcheck and gradgradcheck in
    float64 w.r.t. input, weight and bias, for input arange(120) as (4, 5, 6), weight
    1..5, bias 0..4, running_mean 1 - arange(5), running_var 2 * arange(5), momentum 0.1,
    eps 1e-4. Upstream calls F.batch_norm with these; the port sets them on the module.

    Exception for ours: gradgradcheck in training raises the RuntimeError naming the
    missing second derivative (see test_gradgrad); in eval it passes as torch's does.
    """
    n_feat = 5
    x = torch.arange(4 * n_feat * 6, dtype=F64).view(4, n_feat, 6).requires_grad_()
    bn = make_bn(impl, 3, n_feat, eps=1e-4, momentum=0.1, dtype=F64).train(training)
    with torch.no_grad():
        bn.weight.copy_(torch.arange(1, n_feat + 1, dtype=F64))
        bn.bias.copy_(torch.arange(n_feat, dtype=F64))
        bn.running_mean.copy_(1 - torch.arange(n_feat, dtype=F64))
        bn.running_var.copy_(2 * torch.arange(n_feat, dtype=F64))

    def fn(x, weight, bias):
        return bn(x)

    inputs = (x, bn.weight, bn.bias)
    # Upstream's gradcheck wrapper: batched gradients checked, fast mode.
    checks = {"check_batched_grad": True, "fast_mode": True}
    assert gradcheck(fn, inputs, **checks)
    if impl == "ours" and training:
        with pytest.raises(RuntimeError, match=NO_GRADGRAD):
            gradgradcheck(fn, inputs, **checks)
    else:
        assert gradgradcheck(fn, inputs, **checks)


@pytest.mark.parametrize("ndim", [2, 3])
def test_batchnorm_eval(impl, ndim):
    """test_nn.py TestNNDeviceType.test_batchnorm_eval: in eval, two passes give the same
    output and input gradient; and a layer with track_running_stats=False gives the same
    output and gradient in train and in eval (batch statistics in both)."""
    gen = torch.Generator().manual_seed(0)
    module = make_bn(impl, ndim, 3).eval()
    data = torch.rand([3] * ndim, generator=gen).requires_grad_()
    grad = torch.rand([3] * ndim, generator=gen)
    results = []
    for _ in range(2):
        data.grad = None
        out = module(data)
        out.backward(grad)
        results.append((out.detach(), data.grad.clone()))
    assert_close(*[r[0] for r in results])
    assert_close(*[r[1] for r in results])

    module = make_bn(impl, ndim, 3, track_running_stats=False)
    data = torch.rand(4, 3, generator=gen).requires_grad_()
    grad = torch.rand(4, 3, generator=gen)
    results = []
    for mode in ("train", "eval"):
        module.train(mode == "train")
        data.grad = None
        out = module(data)
        out.backward(grad)
        results.append((out.detach(), data.grad.clone()))
    assert_close(*[r[0] for r in results])
    assert_close(*[r[1] for r in results])


@pytest.mark.parametrize("ndim", [2, 3])
def test_batchnorm_affine(impl, ndim):
    """test_nn.py TestNNDeviceType.test_batchnorm_affine: affine with weight 1 and bias 0
    gives the same output and input gradient as affine=False."""
    gen = torch.Generator().manual_seed(0)
    plain = make_bn(impl, ndim, 3, affine=False)
    affine = make_bn(impl, ndim, 3, affine=True)
    with torch.no_grad():
        affine.weight.fill_(1.0)
        affine.bias.zero_()
    data = torch.rand([3] * ndim, generator=gen).requires_grad_()
    grad = torch.ones_like(data)
    results = []
    for module in (affine, plain):
        data.grad = None
        out = module(data)
        out.backward(grad)
        results.append((out.detach(), data.grad.clone()))
    assert_close(*[r[0] for r in results])
    assert_close(*[r[1] for r in results])


def test_batchnorm_simple_average(impl):
    """test_nn.py TestNNDeviceType.test_batchnorm_simple_average: with momentum=None the
    running statistics are the plain average over batches: after reset_running_stats,
    two batches give the mean of what each gave alone, with the same outputs."""
    gen = torch.Generator().manual_seed(0)
    module = make_bn(impl, 2, 3, momentum=None)
    zeros, ones = torch.zeros(3), torch.ones(3)
    assert torch.equal(module.running_mean, zeros)
    assert torch.equal(module.running_var, ones)
    data1, data2 = torch.rand(4, 3, generator=gen), torch.rand(4, 3, generator=gen)

    alone = []
    for data in (data1, data2):
        out = module(data)
        mean, var = module.running_mean.clone(), module.running_var.clone()
        assert not torch.equal(mean, zeros) and not torch.equal(var, ones)
        alone.append((out, mean, var))
        module.reset_running_stats()
        assert torch.equal(module.running_mean, zeros)
        assert torch.equal(module.running_var, ones)
        assert module.num_batches_tracked.item() == 0

    assert_close(module(data1), alone[0][0])
    assert_close(module(data2), alone[1][0])
    assert_close(module.running_mean, (alone[0][1] + alone[1][1]) / 2)
    assert_close(module.running_var, (alone[0][2] + alone[1][2]) / 2)


# ------------------------------------------------------------ test/nn/test_load_state_dict.py


def test_load_state_dict(impl):
    """test_load_state_dict.py TestLoadStateDict.test_load_state_dict, the parts about its
    BatchNorm2d: a net's state_dict with a new bn.running_mean loads (strict) and sets it;
    an unexpected key fails strict loading and is reported by strict=False; a running_mean
    of the wrong size fails with strict and without."""
    net = nn.Module()
    net.linear = nn.Linear(5, 5)
    net.bn = make_bn(impl, 4, 2)
    sd = net.state_dict()
    new_mean = torch.randn(2)
    sd["bn.running_mean"] = new_mean
    result = net.load_state_dict(sd)
    assert not result.missing_keys and not result.unexpected_keys
    assert torch.equal(net.bn.running_mean, new_mean)

    sd = net.state_dict()
    sd["bn.extra"] = torch.ones(2)
    with pytest.raises(RuntimeError):
        net.load_state_dict(sd)
    result = net.load_state_dict(sd, strict=False)
    assert result.unexpected_keys == ["bn.extra"] and not result.missing_keys

    sd = net.state_dict()
    sd["bn.running_mean"] = torch.rand(14, 4)
    for strict in (True, False):
        with pytest.raises(RuntimeError):
            net.load_state_dict(sd, strict=strict)


def test_load_state_dict_BC(impl):  # noqa: N802 (upstream's name)
    """test_load_state_dict.py TestLoadStateDict.test_load_state_dict_BC: a state_dict
    without num_batches_tracked, marked version 1 or carrying no version, loads strictly
    and leaves a long count of 0. Also: our state_dict says version 2, as torch's does."""
    bn = make_bn(impl, 4, 3)
    sd = bn.state_dict()
    assert sd._metadata[""]["version"] == 2
    del sd["num_batches_tracked"]
    sd._metadata[""]["version"] = 1
    bn.load_state_dict(sd)
    assert bn.num_batches_tracked.dtype == torch.long
    assert bn.num_batches_tracked.item() == 0
    del sd._metadata[""]["version"]
    bn.load_state_dict(sd)
    assert bn.num_batches_tracked.dtype == torch.long
    assert bn.num_batches_tracked.item() == 0


class _NetWithBN(nn.Module):
    """Upstream's MyModule: fc1 = Linear(3, 5), bn over its 5 features, a frozen x."""

    def __init__(self, impl: str, with_x: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(3, 5)
        self.bn = make_bn(impl, 2, 5)
        if with_x:
            self.x = nn.Parameter(torch.rand(5), requires_grad=False)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        out = self.bn(self.fc1(t))
        return out + self.x if hasattr(self, "x") else out


@pytest.mark.parametrize("keep_vars", [True, False])
@pytest.mark.parametrize("swap", [True, False])
def test_load_state_dict_assign_meta(impl, keep_vars, swap):
    """test_load_state_dict.py TestLoadStateDict.test_load_state_dict_assign_meta: a net
    built on the meta device takes the state_dict's own tensors with assign=True (its
    parameters keep their requires_grad; its buffers, the bn's included, are the very
    tensors given, or with swap their values in the existing objects), parameter and
    buffer order is kept, and it computes what the source net computes. Upstream checks
    identity for top-level entries only; the port checks the bn's buffers as well."""
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(swap)
    try:
        net = _NetWithBN(impl)
        sd = net.state_dict(keep_vars=keep_vars)
        for v in sd.values():
            v.requires_grad_(False)
        with torch.device("meta"):
            net_meta = _NetWithBN(impl)
        old = net_meta.state_dict(keep_vars=True)
        net_meta.load_state_dict(sd, assign=True)
        new = net_meta.state_dict(keep_vars=True)
        params = dict(net_meta.named_parameters())
        buffers = dict(net_meta.named_buffers())
        for key, value in sd.items():
            if key in params:
                if keep_vars and not swap:
                    assert value is new[key]
                elif swap:
                    assert new[key] is old[key]
                else:
                    assert new[key] is not old[key]
                assert new[key].requires_grad == old[key].requires_grad
                assert torch.equal(value, new[key])
            elif key in buffers:
                # swap puts the values into the existing tensor objects, assign alone
                # takes the state_dict's tensors as they are
                assert (new[key] is old[key]) if swap else (value is new[key]), key
                assert torch.equal(value, new[key])
        assert not any(t.is_meta for t in new.values())
        assert [n for n, _ in net.named_parameters()] == list(params)
        assert [n for n, _ in net.named_buffers()] == list(buffers)
        t = torch.randn(4, 3)
        assert_close(net(t), net_meta(t.clone()))
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)


def test_load_state_dict_assign_with_optimizer(impl):
    """test_load_state_dict.py TestLoadStateDict.test_load_state_dict_assign_with_optimizer:
    after 3 Adam steps, a meta-built copy loaded with assign=True and given a new optimizer
    with the old optimizer's state trains in step with the original for 3 more steps: same
    optimizer state and same state_dict (running statistics included)."""
    torch.manual_seed(0)
    net = _NetWithBN(impl, with_x=False)
    opt = torch.optim.Adam(net.parameters(), lr=1000)
    x = torch.randn(4, 3)
    for _ in range(3):
        opt.zero_grad()
        net(x).sum().backward()
        opt.step()
    opt_sd, net_sd = copy.deepcopy(opt.state_dict()), copy.deepcopy(net.state_dict())
    with torch.device("meta"):
        net_meta = _NetWithBN(impl, with_x=False)
    net_meta.load_state_dict(net_sd, assign=True)
    opt2 = torch.optim.Adam(net_meta.parameters(), lr=1000)
    opt2.load_state_dict(opt_sd)
    y = x.clone()
    for _ in range(3):
        for model, optimizer, inp in ((net, opt, x), (net_meta, opt2, y)):
            optimizer.zero_grad()
            model(inp).sum().backward()
            optimizer.step()
    assert_close(opt.state_dict(), opt2.state_dict())
    assert_close(net.state_dict(), net_meta.state_dict())
