"""bn_core's LayerNorm, GroupNorm and RMSNorm against torch.nn's, gradcheck and lockstep."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.func import functional_call
from torch.testing import assert_close

from bn_core.normalizers import (
    ExampleNormFunction,
    ExampleNormStack,
    GroupNorm,
    LayerNorm,
    RMSNorm,
)

F64 = torch.float64
RTOL = 1e-10
# Relative error is meaningless for entries that cancel to ~0; float64 rounding there is ~1e-14.
ATOL = 1e-12
OURS = {"LayerNorm": LayerNorm, "GroupNorm": GroupNorm, "RMSNorm": RMSNorm}
TORCH = {"LayerNorm": nn.LayerNorm, "GroupNorm": nn.GroupNorm, "RMSNorm": nn.RMSNorm}

# (layer, constructor arguments, input shape): N = 1, C = 1, (N, C, L), (N, C, H, W), a
# 1-D (unbatched) input where torch takes one, affine on and off, bias off.
CASES = [
    ("LayerNorm", (4,), {}, (3, 4)),
    ("LayerNorm", (4,), {}, (1, 4)),
    ("LayerNorm", (1,), {}, (3, 1)),
    ("LayerNorm", (4,), {}, (4,)),
    ("LayerNorm", (5,), {}, (2, 3, 5)),
    ("LayerNorm", ((3, 5),), {}, (2, 3, 5)),
    ("LayerNorm", ([3, 2, 4],), {}, (2, 3, 2, 4)),
    ("LayerNorm", ((2, 4),), {}, (1, 3, 2, 4)),
    ("LayerNorm", (4,), {"elementwise_affine": False}, (3, 4)),
    ("LayerNorm", (6,), {"bias": False}, (2, 3, 6)),
    ("LayerNorm", (4,), {"eps": 1e-3}, (5, 4)),
    ("GroupNorm", (2, 4), {}, (3, 4)),
    ("GroupNorm", (2, 4), {}, (1, 4)),
    ("GroupNorm", (1, 1), {}, (3, 1)),
    ("GroupNorm", (1, 1), {}, (3, 1, 5)),
    ("GroupNorm", (3, 6), {}, (2, 6, 5)),
    ("GroupNorm", (2, 4), {}, (2, 4, 3, 3)),
    ("GroupNorm", (1, 4), {}, (1, 4, 3, 2)),
    ("GroupNorm", (4, 4), {}, (2, 4, 5)),
    ("GroupNorm", (2, 4), {}, (2, 4, 2, 2, 2)),
    ("GroupNorm", (2, 4), {"affine": False}, (3, 4, 5)),
    ("GroupNorm", (2, 4), {"bias": False}, (3, 4, 5)),
    ("RMSNorm", (4,), {}, (3, 4)),
    ("RMSNorm", (4,), {}, (1, 4)),
    ("RMSNorm", (1,), {}, (3, 1)),
    ("RMSNorm", (4,), {}, (4,)),
    ("RMSNorm", (torch.Size([3, 5]),), {}, (2, 3, 5)),
    ("RMSNorm", ((3, 2, 2),), {"eps": 1e-6}, (2, 3, 2, 2)),
    ("RMSNorm", (4,), {"elementwise_affine": False}, (3, 4)),
]
CASE_IDS = [f"{kind}{args}{kw or ''}-{shape}" for kind, args, kw, shape in CASES]


def exact(actual, expected, **kw):
    assert_close(actual, expected, rtol=RTOL, atol=ATOL, **kw)


def make_pair(kind, args, kw, gen, dtype=F64):
    """Our layer and torch's, same settings and the same random parameters."""
    ours = OURS[kind](*args, **kw, dtype=dtype)
    ref = TORCH[kind](*args, **kw, dtype=dtype)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            scale = 3.0 if name == "bias" else 2.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=dtype) * scale)
            ref.get_parameter(name).copy_(p)
    return ours, ref


def make_x(shape, gen, offset=1.5, scale=2.0, dtype=F64):
    # Every example with its own offset and scale, which the layers must remove.
    per_example = (shape[0],) + (1,) * (len(shape) - 1)
    off = offset * torch.randn(per_example, generator=gen, dtype=dtype)
    sd = scale * (0.5 + torch.rand(per_example, generator=gen, dtype=dtype))
    return off + sd * torch.randn(shape, generator=gen, dtype=dtype)


def run(module, x, dy, forward=None):
    """Output and gradients w.r.t. input, weight and bias for upstream gradient dy."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y = (forward or module)(x)
    y.backward(dy)
    params = (module.weight, getattr(module, "bias", None))  # torch's RMSNorm has no bias
    grads = [None if p is None else p.grad for p in params]
    return y.detach(), x.grad, *grads


def paired(mine, theirs):
    """The (ours, torch's) pairs of two ``run`` results, None (no such parameter) in both or
    neither."""
    for a, e in zip(mine, theirs, strict=True):
        assert (a is None) == (e is None)
        if e is not None:
            yield a, e


def assert_runs_match(ours, ref, x, dy):
    for a, e in paired(run(ours, x, dy), run(ref, x, dy)):
        exact(a, e)


def torch_error(fn) -> type[BaseException]:
    with warnings.catch_warnings(), pytest.raises(Exception) as info:
        warnings.simplefilter("ignore")  # torch's rms_norm warns before it raises
        fn()
    return type(info.value)


# --- parity with torch in float64 ---------------------------------------------------------
@pytest.mark.parametrize(("kind", "args", "kw", "shape"), CASES, ids=CASE_IDS)
def test_forward_and_gradients_match_torch(kind, args, kw, shape):
    gen = torch.Generator().manual_seed(0)
    ours, ref = make_pair(kind, args, kw, gen)
    for _ in range(2):
        x, dy = make_x(shape, gen), torch.randn(shape, generator=gen, dtype=F64)
        assert_runs_match(ours, ref, x, dy)


@pytest.mark.parametrize(("kind", "args", "kw", "shape"), CASES[::3], ids=CASE_IDS[::3])
def test_non_contiguous_input_matches_torch(kind, args, kw, shape):
    gen = torch.Generator().manual_seed(1)
    x = make_x(shape, gen).transpose(0, -1).contiguous().transpose(0, -1)
    dy = torch.randn(shape, generator=gen, dtype=F64)
    assert_runs_match(*make_pair(kind, args, kw, gen), x, dy)


@pytest.mark.parametrize("dtype", [F64, torch.float16])
def test_channels_last_input_matches_torch(dtype):
    gen = torch.Generator().manual_seed(11)
    shape = (2, 6, 3, 4)
    x = make_x(shape, gen).to(dtype).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    ours, ref = make_pair("GroupNorm", (3, 6), {}, gen, dtype=dtype)
    for a, e in paired(run(ours, x, dy), run(ref, x, dy)):
        if dtype == F64:
            exact(a, e)
        else:
            assert_close(a, e, rtol=4e-3, atol=4e-3 * e.abs().max().item())


@pytest.mark.parametrize(
    ("shape", "norm"), [((2, 4, 5), nn.InstanceNorm1d), ((2, 3, 4, 4), nn.InstanceNorm2d)]
)
def test_group_norm_with_one_channel_per_group_is_instance_norm(shape, norm):
    gen = torch.Generator().manual_seed(2)
    C = shape[1]
    ours, _ = make_pair("GroupNorm", (C, C), {}, gen)
    ref = norm(C, affine=True, dtype=F64)
    with torch.no_grad():
        ref.weight.copy_(ours.weight)
        ref.bias.copy_(ours.bias)
    assert_runs_match(ours, ref, make_x(shape, gen), torch.randn(shape, generator=gen, dtype=F64))


@settings(max_examples=30, deadline=None)
@given(
    n=st.integers(1, 4),
    groups=st.integers(1, 3),
    per_group=st.integers(1, 3),
    positions=st.lists(st.integers(1, 3), max_size=2),
    seed=st.integers(0, 2**16),
)
def test_group_norm_matches_torch_on_any_shape(n, groups, per_group, positions, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (n, groups * per_group, *positions)
    ours, ref = make_pair("GroupNorm", (groups, groups * per_group), {}, gen)
    x, dy = make_x(shape, gen), torch.randn(shape, generator=gen, dtype=F64)
    if n * per_group * math.prod(positions) == 1:
        # torch refuses one example of one value per group, which normalizes to 0.
        expected = torch_error(lambda: ref(x))
        with pytest.raises(expected, match="one value per group"):
            ours(x)
    else:
        assert_runs_match(ours, ref, x, dy)


@pytest.mark.parametrize(
    ("kind", "args", "shape"),
    [("LayerNorm", (4,), (0, 4)), ("GroupNorm", (2, 4), (0, 4, 3)), ("RMSNorm", (4,), (0, 4))],
)
def test_empty_batch_matches_torch(kind, args, shape):
    ours, ref = make_pair(kind, args, {}, torch.Generator().manual_seed(3))
    x = torch.randn(shape, dtype=F64)
    assert_runs_match(ours, ref, x, torch.randn(shape, dtype=F64))


@pytest.mark.parametrize("kind", ["LayerNorm", "RMSNorm"])
def test_constant_examples_never_nan(kind):
    ours, ref = make_pair(kind, (4,), {}, torch.Generator().manual_seed(4))
    x = torch.full((3, 4), 2.5, dtype=F64)
    assert_runs_match(ours, ref, x, torch.randn(3, 4, dtype=F64))
    assert torch.isfinite(run(ours, x, torch.ones(3, 4, dtype=F64))[1]).all()


# --- the autograd Function ----------------------------------------------------------------
@pytest.mark.parametrize(("kind", "args", "kw", "shape"), CASES[::2], ids=CASE_IDS[::2])
def test_gradcheck_with_batched_grads(kind, args, kw, shape):
    # check_batched_grad runs the backward under vmap (is_grads_batched=True) as well.
    gen = torch.Generator().manual_seed(5)
    module, _ = make_pair(kind, args, kw, gen)
    names = [name for name, _ in module.named_parameters()]
    inputs = [make_x(shape, gen), *(p.detach() for p in module.parameters())]

    def f(x, *params):
        return functional_call(module, dict(zip(names, params, strict=True)), (x,))

    inputs = [t.clone().requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(f, inputs, check_batched_grad=True)


@pytest.mark.parametrize("center", [True, False])
def test_function_backward_runs_batched_over_upstream_gradients(center):
    gen = torch.Generator().manual_seed(6)
    x = make_x((3, 4, 5), gen).requires_grad_(True)
    gamma = torch.randn(4, 1, generator=gen, dtype=F64, requires_grad=True)
    beta = torch.randn(4, 1, generator=gen, dtype=F64, requires_grad=True)
    y = ExampleNormFunction.apply(x, gamma, beta, (1, 2), 1e-5, center)
    dys = torch.randn(6, *y.shape, generator=gen, dtype=F64)
    batched = torch.autograd.grad(
        y, (x, gamma, beta), dys, is_grads_batched=True, retain_graph=True
    )
    for i, dy in enumerate(dys):
        one = torch.autograd.grad(y, (x, gamma, beta), dy, retain_graph=True)
        for a, e in zip(batched, one, strict=True):
            exact(a[i], e)


@pytest.mark.parametrize("kind", ["LayerNorm", "GroupNorm", "RMSNorm"])
def test_every_layer_trains_through_the_one_function(kind):
    module = OURS[kind](*((2, 4) if kind == "GroupNorm" else (4,)))
    y = module(torch.randn(3, 4, requires_grad=True))
    names, pending = set(), [y.grad_fn]
    while pending:
        node = pending.pop()
        names.add(node.name())
        pending.extend(fn for fn, _ in node.next_functions if fn is not None)
    assert "ExampleNormFunctionBackward" in names


@pytest.mark.parametrize("kind", ["LayerNorm", "GroupNorm", "RMSNorm"])
def test_second_derivative_raises_instead_of_coming_out_wrong(kind):
    module = OURS[kind](*((2, 4) if kind == "GroupNorm" else (4,)), dtype=F64)
    x = torch.randn(5, 4, dtype=F64, requires_grad=True)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad((module(x) ** 3).sum(), x, create_graph=True)
    (g,) = torch.autograd.grad((module(x) ** 3).sum(), x)
    assert torch.isfinite(g).all()


@pytest.mark.parametrize(
    "module", [LayerNorm(4, elementwise_affine=False), GroupNorm(2, 4, affine=False)]
)
def test_output_without_affine_can_be_modified_in_place(module):
    x = torch.randn(5, 4, dtype=torch.float32, requires_grad=True)
    expected = torch.autograd.grad(module(x).relu().pow(2).sum(), x)[0]
    y = module(x)
    y.relu_()
    assert_close(torch.autograd.grad(y.pow(2).sum(), x)[0], expected)


# --- the torch.nn contract ------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["LayerNorm", "GroupNorm", "RMSNorm"])
def test_constructor_signature_equals_torchs(kind):
    def parameters(cls):
        return [
            (p.name, p.default, p.kind) for p in inspect.signature(cls.__init__).parameters.values()
        ]

    assert parameters(OURS[kind]) == parameters(TORCH[kind])


@pytest.mark.parametrize(("kind", "args", "kw", "shape"), CASES, ids=CASE_IDS)
def test_state_dict_and_repr_equal_torchs(kind, args, kw, shape):
    ours, ref = OURS[kind](*args, **kw), TORCH[kind](*args, **kw)
    mine, theirs = ours.state_dict(), ref.state_dict()
    assert list(mine) == list(theirs)
    for key in theirs:
        assert mine[key].shape == theirs[key].shape and mine[key].dtype == theirs[key].dtype
        exact(mine[key], theirs[key])  # the same initial values
    assert repr(ours) == repr(ref)


@pytest.mark.parametrize(("kind", "args", "kw", "shape"), CASES[::2], ids=CASE_IDS[::2])
def test_state_dict_loads_both_ways(kind, args, kw, shape):
    gen = torch.Generator().manual_seed(7)
    ours, ref = make_pair(kind, args, kw, gen)
    x, dy = make_x(shape, gen), torch.randn(shape, generator=gen, dtype=F64)
    fresh_ours, fresh_ref = OURS[kind](*args, **kw, dtype=F64), TORCH[kind](*args, **kw, dtype=F64)
    fresh_ours.load_state_dict(ref.state_dict())
    fresh_ref.load_state_dict(ours.state_dict())
    assert_runs_match(fresh_ours, ref, x, dy)
    assert_runs_match(ours, fresh_ref, x, dy)


def test_gamma_beta_are_weight_and_bias():
    layer = LayerNorm(3)
    assert layer.gamma is layer.weight and layer.beta is layer.bias
    assert RMSNorm(3).beta is None and GroupNorm(1, 3, affine=False).gamma is None


def test_device_and_dtype_keep_torchs_positions():
    for ours, ref in [
        (LayerNorm(3, 1e-3, True, True, "cpu", F64), nn.LayerNorm(3, 1e-3, True, True, "cpu", F64)),
        (GroupNorm(1, 3, 1e-3, True, "cpu", F64), nn.GroupNorm(1, 3, 1e-3, True, "cpu", F64)),
        (RMSNorm(3, 1e-3, True, "cpu", F64), nn.RMSNorm(3, 1e-3, True, "cpu", F64)),
    ]:
        assert ours.eps == ref.eps
        for a, b in zip(ours.parameters(), ref.parameters(), strict=True):
            assert a.dtype == b.dtype == F64 and a.device == b.device


# Inputs torch rejects: ours must raise the same class (or a subclass of it).
BAD_CONSTRUCTORS = [
    ("GroupNorm", (3, 10), {}, "num_groups = 3 must divide num_channels = 10"),
    ("GroupNorm", (4, 6), {"affine": False}, "num_groups = 4 must divide num_channels = 6"),
    ("GroupNorm", (2, -4), {}, "num_channels = -4"),
    ("LayerNorm", (-1,), {}, r"normalized_shape = \(-1,\)"),
    ("LayerNorm", ((2, -3),), {}, r"normalized_shape = \(2, -3\)"),
    ("LayerNorm", (3.0,), {}, "normalized_shape = 3.0"),
    ("RMSNorm", (-2,), {}, r"normalized_shape = \(-2,\)"),
    ("RMSNorm", ("ab",), {}, "normalized_shape = 'ab'"),
]


@pytest.mark.parametrize(("kind", "args", "kw", "match"), BAD_CONSTRUCTORS)
def test_bad_constructor_arguments_raise_torchs_error(kind, args, kw, match):
    expected = torch_error(lambda: TORCH[kind](*args, **kw))
    with pytest.raises(expected, match=match):
        OURS[kind](*args, **kw)


BAD_INPUTS = [
    ("LayerNorm", (4,), {}, (3, 5), r"shape \(3, 5\): expected \(\*, 4\)"),
    ("LayerNorm", ((2, 3),), {}, (4, 3, 2), r"expected \(\*, 2, 3\)"),
    ("LayerNorm", ((2, 3),), {}, (3,), r"shape \(3,\)"),
    ("LayerNorm", ((),), {}, (3,), r"normalized_shape = \(\)"),
    ("RMSNorm", (4,), {}, (3, 5), r"expected \(\*, 4\)"),
    ("RMSNorm", ((4, 2),), {}, (2, 4), r"expected \(\*, 4, 2\)"),
    ("GroupNorm", (2, 4), {}, (4,), r"shape \(4,\): expected \(N, C, \*\) with C = .* 4"),
    ("GroupNorm", (2, 4), {}, (3, 6), r"shape \(3, 6\)"),
    ("GroupNorm", (2, 4), {}, (3, 6, 5), r"shape \(3, 6, 5\)"),
    ("GroupNorm", (2, 4), {}, (4, 5), r"shape \(4, 5\)"),  # unbatched (C, L) is not taken
    ("GroupNorm", (2, 4), {"affine": False}, (3, 5), r"shape \(3, 5\)"),
]


@pytest.mark.parametrize(("kind", "args", "kw", "shape", "match"), BAD_INPUTS)
def test_bad_input_shapes_raise_torchs_error(kind, args, kw, shape, match):
    x = torch.randn(shape)
    expected = torch_error(lambda: TORCH[kind](*args, **kw)(x))
    with pytest.raises(expected, match=match):
        OURS[kind](*args, **kw)(x)


@pytest.mark.parametrize("dtype", [torch.long, torch.int32, torch.bool])
@pytest.mark.parametrize(
    ("kind", "args", "kw"),
    [
        ("LayerNorm", (4,), {}),
        ("LayerNorm", (4,), {"elementwise_affine": False}),
        ("GroupNorm", (2, 4), {}),
        ("GroupNorm", (2, 4), {"affine": False}),
        ("RMSNorm", (4,), {}),
    ],
)
def test_non_float_input_raises_torchs_error(kind, args, kw, dtype):
    x = torch.ones(3, 4, dtype=dtype)
    expected = torch_error(lambda: TORCH[kind](*args, **kw)(x))
    with pytest.raises(expected, match=f"dtype {dtype}: expected a floating-point tensor"):
        OURS[kind](*args, **kw)(x)


# --- deliberate differences from torch ------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: GroupNorm(0, 4), "num_groups = 0: must be an integer >= 1"),  # torch: 1/0
        (lambda: GroupNorm(-2, 4), "num_groups = -2"),  # torch: fails only in forward
        (lambda: LayerNorm(4, eps=0.0), "eps = 0.0: must be > 0"),  # constant rows give 0/0
        (lambda: GroupNorm(2, 4, eps=-1e-5), "eps = -1e-05"),
        (lambda: RMSNorm(4, eps=0), r"eps = 0: must be > 0 or None"),
    ],
)
def test_nonsense_arguments_torch_takes_are_refused(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_group_norm_refuses_a_channel_count_other_than_its_own():
    # torch's GroupNorm without affine normalizes any C that G divides; ours names the error.
    nn.GroupNorm(2, 4, affine=False)(torch.randn(3, 6))
    with pytest.raises(RuntimeError, match="C = num_channels = 4"):
        GroupNorm(2, 4, affine=False)(torch.randn(3, 6))


@pytest.mark.parametrize(
    ("kind", "args"), [("LayerNorm", (4,)), ("GroupNorm", (2, 4)), ("RMSNorm", (4,))]
)
def test_float64_input_to_a_float32_layer_is_computed_in_float64(kind, args):
    # As our BatchNorm does; torch's affine LayerNorm/GroupNorm refuse mixed dtypes.
    gen = torch.Generator().manual_seed(8)
    ours32, _ = make_pair(kind, args, {}, gen, dtype=torch.float32)
    ours64 = OURS[kind](*args, dtype=F64)
    ours64.load_state_dict(ours32.state_dict())
    x, dy = make_x((5, 4), gen), torch.randn(5, 4, generator=gen, dtype=F64)
    for a, e in paired(run(ours32, x, dy), run(ours64, x, dy)):
        exact(a, e.to(a.dtype))


# --- lockstep variants ----------------------------------------------------------------------
# ExampleNormStack normalizes a lockstep (V, N, C) stack of per-example variants in one call;
# each variant must get exactly what torch's own layer of C features gives it.
TORCH_OF = {
    "layernorm": lambda C, G: nn.LayerNorm(C, dtype=F64),
    "groupnorm": lambda C, G: nn.GroupNorm(G, C, dtype=F64),
    "rmsnorm": lambda C, G: nn.RMSNorm(C, eps=1e-5, dtype=F64),
}
STACK_CASES = [
    (["layernorm", "groupnorm", "rmsnorm"], 6, 8, 4),
    (["groupnorm", "layernorm"], 5, 6, 3),
    (["rmsnorm", "groupnorm", "groupnorm"], 4, 6, 2),
    (["layernorm", "layernorm"], 5, 3, 1),
    (["rmsnorm", "rmsnorm"], 4, 3, 1),
    (["groupnorm"], 1, 6, 3),
    (["layernorm", "rmsnorm"], 1, 4, 1),
    (["groupnorm", "rmsnorm", "layernorm", "groupnorm"], 3, 4, 2),
]


def make_stack(kinds, C, G, gen):
    stack = ExampleNormStack(kinds, C, G).double()
    with torch.no_grad():
        for name, p in stack.named_parameters():
            scale = 3.0 if name == "bias" else 2.0
            p.copy_(torch.randn(p.shape, generator=gen, dtype=F64) * scale)
    return stack


@pytest.mark.parametrize(("kinds", "N", "C", "G"), STACK_CASES)
def test_stack_equals_each_variants_own_torch_layer(kinds, N, C, G):
    gen = torch.Generator().manual_seed(9)
    stack = make_stack(kinds, C, G, gen)
    V = len(kinds)
    # Variants stacked along dim 0 but not contiguous in memory, as a transposed copy.
    h = make_x((V, N, C), gen).transpose(0, 1).contiguous().transpose(0, 1)
    dy = torch.randn(V, N, C, generator=gen, dtype=F64)
    out, dh, dweight, dbias = run(stack, h, dy, forward=stack.forward_variants)
    for v, kind in enumerate(kinds):
        sl = slice(v * C, (v + 1) * C)
        single = TORCH_OF[kind](C, G)
        with torch.no_grad():
            for name, p in single.named_parameters():
                p.copy_(stack.get_parameter(name)[sl])
        yv, dxv, dwv, dbv = run(single, h[v], dy[v])
        exact(out[v], yv)
        exact(dh[v], dxv)
        exact(dweight[sl], dwv)
        if kind == "rmsnorm":
            # RMSNorm has no beta: its slice of the stack's bias is held at 0.
            assert dbv is None
            assert dbias is None or dbias[sl].abs().max() == 0
        else:
            exact(dbias[sl], dbv)


def test_stack_gradcheck_with_batched_grads():
    # The merged sets (LayerNorm and GroupNorm mixed) and per-set centering through
    # ExampleNormFunction, against finite differences.
    gen = torch.Generator().manual_seed(10)
    stack = make_stack(["layernorm", "groupnorm", "rmsnorm"], 4, 2, gen)
    h = make_x((3, 5, 4), gen).requires_grad_(True)
    weight = stack.weight.detach().clone().requires_grad_(True)
    bias = stack.bias.detach().clone().requires_grad_(True)

    def f(h, weight, bias):
        return functional_call(stack, {"weight": weight, "bias": bias}, (h,))

    assert torch.autograd.gradcheck(f, (h, weight, bias), check_batched_grad=True)


@pytest.mark.parametrize(
    ("kinds", "C", "G", "shape", "match"),
    [
        (["layernorm"], 4, 1, (2, 6, 4), r"shape \(2, 6, 4\): expected \(V, N, C\) with V = 1"),
        (["rmsnorm", "layernorm"], 4, 1, (2, 6, 5), "C = 4 features"),
        (["groupnorm"], 4, 2, (6, 4), r"expected \(V, N, C\)"),
        (["groupnorm"], 4, 4, (1, 1, 4), "a single example with one value per group"),
    ],
)
def test_stack_rejects_what_the_layers_reject(kinds, C, G, shape, match):
    with pytest.raises((RuntimeError, ValueError), match=match):
        ExampleNormStack(kinds, C, G).forward_variants(torch.randn(shape))


@pytest.mark.parametrize(
    ("kinds", "C", "G", "match"),
    [
        (["groupnorm", "layernorm"], 6, 4, "groups = 4 must divide features = 6"),
        (["batchnorm"], 4, 1, "kinds = \\['batchnorm'\\]"),
        ([], 4, 1, "kinds = \\[\\]"),
    ],
)
def test_stack_refuses_a_grouping_that_does_not_fit(kinds, C, G, match):
    with pytest.raises(ValueError, match=match):
        ExampleNormStack(kinds, C, G)


def test_group_norm_variants_need_groups_that_divide_their_channels():
    # 3 variants of 4 channels in 9 groups: 3 groups each, which do not divide 4 channels.
    with pytest.raises(ValueError, match="num_groups = 9 must divide num_channels = 12"):
        GroupNorm(9, 12)


# --- half precision -------------------------------------------------------------------------
HALF_CASES = [
    ("LayerNorm", (4096,), (4, 4096)),
    ("GroupNorm", (4, 16), (2, 16, 32, 32)),
    ("RMSNorm", (4096,), (4, 4096)),
]


# Largest difference from torch, relative to the largest value: float16 keeps 11 bits and
# bfloat16 8, and sums over a few thousand values differ in their last bit or two.
HALF_TOL = {torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("layer_dtype", ["same", torch.float32])
@pytest.mark.filterwarnings("ignore:Mismatch dtype:UserWarning")  # torch's rms_norm, mixed
@pytest.mark.parametrize(("kind", "args", "shape"), HALF_CASES)
def test_half_input_with_many_values_matches_torch(kind, args, shape, dtype, layer_dtype):
    # |x| ~ 100 over 4096 values: a sum of squares (~4e7) beyond float16's range (65504) and
    # terms below bfloat16's resolution of the running sum. Only float32 accumulation copes.
    gen = torch.Generator().manual_seed(10)
    layer_dtype = dtype if layer_dtype == "same" else layer_dtype
    ours, ref = make_pair(kind, args, {}, gen, dtype=layer_dtype)
    x = make_x(shape, gen, offset=100.0, scale=30.0, dtype=torch.float32).to(dtype)
    dy = torch.randn(shape, generator=gen).to(dtype)
    mine, theirs = run(ours, x, dy), run(ref, x, dy)
    for a, e in paired(mine, theirs):
        assert a.dtype == e.dtype and torch.isfinite(a).all()
        assert (a.float() - e.float()).abs().max() <= HALF_TOL[dtype] * e.float().abs().max()
    # The output is the float64 one rounded once: within a unit in the last place of the
    # largest output, as torch's is.
    exact_layer = OURS[kind](*args, dtype=F64)
    exact_layer.load_state_dict(ours.state_dict())
    exact_y = run(exact_layer, x.double(), dy.double())[0]
    bound = torch.finfo(dtype).eps * exact_y.abs().max()
    for y in (mine[0], theirs[0]):
        assert (y.double() - exact_y).abs().max() <= bound


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_rms_norm_default_eps_is_float32s_for_half_inputs(dtype):
    # eps=None is the epsilon of the dtype torch computes in: float32's, not float16's
    # (1e-3) which would swamp a mean square of 1e-6.
    x = torch.full((2, 4), 1e-3).to(dtype)
    ours, ref = RMSNorm(4, dtype=dtype)(x), nn.RMSNorm(4, dtype=dtype)(x)
    assert_close(ours, ref)
    assert_close(ours.float(), torch.full((2, 4), 1.0), rtol=0, atol=0.06)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_stack_takes_inputs_of_another_dtype_as_the_layers_do(dtype):
    # A float32 stack on float64 input computes in float64, and on float16 input in float32
    # rounded back, as LayerNorm and GroupNorm do.
    gen = torch.Generator().manual_seed(11)
    kinds = ["layernorm", "groupnorm", "rmsnorm"]
    stack = ExampleNormStack(kinds, 8, 4)
    h = make_x((3, 5, 8), gen).to(dtype)
    out = stack(h)
    assert out.dtype == dtype
    singles = [LayerNorm(8), GroupNorm(4, 8), RMSNorm(8, eps=1e-5)]
    for v, single in enumerate(singles):
        tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
        assert_close(out[v], single(h[v]), **tol)
