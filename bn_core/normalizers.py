"""Layer, Group and RMS Normalization from scratch: one forward and its hand-derived backward.

BatchNorm averages each feature over the examples of a batch. These normalizers average
each example over its own features instead, so they need no batch statistics, behave the
same in training and evaluation, and keep no running averages. Per example, over the m
values of the dims ``dims`` (the last dims for LayerNorm and RMSNorm, a group's channels
and positions for GroupNorm):

    mu      = 1/m sum_i x_i                   0 for RMSNorm, which does not center
    var     = 1/m sum_i (x_i - mu)^2          the mean square for RMSNorm
    inv_std = 1 / sqrt(var + eps)
    x_hat_i = (x_i - mu) * inv_std
    y_i     = gamma_i * x_hat_i + beta_i      gamma, beta per feature (per channel)

Ba et al. 2016 (LayerNorm), Wu & He 2018 (GroupNorm; InstanceNorm is GroupNorm with one
channel per group), Zhang & Sennrich 2019 (RMSNorm). The three layers differ only in the
dims they reduce over and in whether they center, so all of them train through
``ExampleNormFunction``. In a lockstep run, ``ExampleNormStack`` normalizes a mix of them
in one call of that Function.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Sequence

import torch
from torch import nn

__all__ = [
    "PER_EXAMPLE_NORMS",
    "ExampleNormFunction",
    "ExampleNormStack",
    "GroupNorm",
    "LayerNorm",
    "RMSNorm",
    "example_norm",
]

# The variant names of the normalizers that average each example over its own features.
PER_EXAMPLE_NORMS = ("layernorm", "groupnorm", "rmsnorm")


def _set_mean(t: torch.Tensor, dims: tuple[int, ...], merge: torch.Tensor | None) -> torch.Tensor:
    """Each example's mean of ``t`` over its set of values, shaped to broadcast against t.

    Without ``merge`` an example's set is its values along ``dims``. With ``merge`` t is a
    lockstep (V, N, G, S) stack: each example's values in G subgroups of S, and a set may
    join several subgroups: merge[v, g', g] = 1/m when subgroups g' and g lie in one of
    variant v's sets, of m values, else 0, so that

        mean seen from subgroup g = sum_g' (sum of subgroup g') * merge[v, g', g]

    one small batched matrix product that serves LayerNorm (every subgroup in one set) and
    GroupNorm (each subgroup its own set) variants of a stack at once.
    """
    if merge is None:
        return t.mean(dims, keepdim=True)
    sums = t.sum(3)  # (V, N, G)
    return torch.bmm(sums, merge.to(sums.dtype)).unsqueeze(3)


class ExampleNormFunction(torch.autograd.Function):
    """y = gamma * x_hat + beta, each example normalized over its set of values.

    A set is the values along ``dims``, or the subgroups ``merge`` joins (see
    ``_set_mean``). ``center`` is True, False (RMSNorm), or a 0/1 tensor that broadcasts
    against the statistics and switches centering per set (RMSNorm variants in a stack).
    gamma and beta are already viewed to broadcast against x (one value per feature, and
    size 1 along the dims that index examples), or None: beta may be None with a gamma
    (LayerNorm with bias=False, RMSNorm), never the other way round.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, dims, eps, center, merge=None):
        if center is not False:
            mu = _set_mean(x, dims, merge)
            if center is not True:
                mu = mu * center  # 0 for the sets that are not centered
            x_hat = x - mu  # x - mu for now; scaled in place below, so one buffer holds both
            # From centered values: E[x^2] - E[x]^2 cancels catastrophically in float32.
            var = _set_mean(x_hat * x_hat, dims, merge)
            inv_std = (var + eps).rsqrt_()
            x_hat.mul_(inv_std)
        else:  # mu = 0: var is the mean square
            var = _set_mean(x * x, dims, merge)
            inv_std = (var + eps).rsqrt_()
            x_hat = x * inv_std
        # Without gamma the output must not be the saved x_hat itself, or an in-place op
        # after the layer would corrupt the backward pass.
        if gamma is None:
            y = x_hat.clone()
        elif beta is None:
            y = x_hat * gamma
        else:
            y = torch.addcmul(beta, gamma, x_hat)
        center_mask = center if isinstance(center, torch.Tensor) else None
        ctx.save_for_backward(x_hat, inv_std, gamma, merge, center_mask)
        ctx.dims, ctx.center, ctx.has_beta = dims, center is not False, beta is not None
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            # create_graph=True: x_hat and inv_std were saved without their dependence on x,
            # so differentiating this backward again would come out wrong. Refuse it.
            raise RuntimeError(
                "ExampleNormFunction has no second derivative: its backward is written by "
                "hand and is differentiable once (create_graph=True is not supported)"
            )
        x_hat, inv_std, gamma, merge, center_mask = ctx.saved_tensors
        dims = ctx.dims
        # gamma varies inside the set an example is averaged over (unlike BatchNorm's), so
        # it enters before the means: with g_i = dL/dx_hat_i = gamma_i * dy_i and
        #   dx_hat_j/dx_i = inv_std * (delta_ij - 1/m - x_hat_i * x_hat_j / m)
        # (no 1/m term without centering, as dmu/dx_i = 0 there), the chain rule gives
        #   dL/dx_i = inv_std * (g_i - mean(g) - x_hat_i * mean(g * x_hat))
        # built in one buffer: g - x_hat * mean(g x_hat), then - mean(g), then * inv_std.
        g = dy if gamma is None else dy * gamma
        dx = torch.addcmul(g, x_hat, _set_mean(g * x_hat, dims, merge), value=-1.0)
        if ctx.center:
            mean_g = _set_mean(g, dims, merge)
            dx.sub_(mean_g if center_mask is None else mean_g * center_mask)
        dx.mul_(inv_std)
        if gamma is None:
            return dx, None, None, None, None, None, None
        # dL/dgamma = sum over examples of dy * x_hat ;  dL/dbeta = sum over examples of dy
        dgamma = (dy * x_hat).sum_to_size(gamma.shape)
        dbeta = dy.sum_to_size(gamma.shape) if ctx.has_beta else None
        return dx, dgamma, dbeta, None, None, None, None


def example_norm(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    dims: tuple[int, ...],
    eps: float | None,
    center: bool | torch.Tensor = True,
    merge: torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalize each example of x over ``dims`` (or the sets ``merge`` forms; see
    ``_set_mean``); gamma and beta broadcast against x.

    Half inputs are normalized in float32 and the result is rounded back, as torch does:
    a sum of many float16 squares overflows or loses its small terms. ``eps=None`` is the
    machine epsilon of the dtype the statistics are computed in (float32 for half inputs).
    """
    if x.element_size() < 4:
        return example_norm(x.float(), gamma, beta, dims, eps, center, merge).to(x.dtype)
    if gamma is not None and gamma.dtype != x.dtype:  # e.g. a float64 input, float32 layer
        gamma = gamma.to(x.dtype)
        beta = None if beta is None else beta.to(x.dtype)
    if eps is None:
        eps = torch.finfo(x.dtype).eps
    return ExampleNormFunction.apply(x, gamma, beta, dims, eps, center, merge)


def _check_float(name: str, x: torch.Tensor) -> None:
    # NotImplementedError, as torch's kernels raise for these dtypes; it is a RuntimeError,
    # the class torch's affine layers raise for them, so either handler catches it.
    if not x.is_floating_point():
        raise NotImplementedError(
            f"{name} input has dtype {x.dtype}: expected a floating-point tensor "
            "(float16, bfloat16, float32 or float64)"
        )


def _check_eps(eps: float | None, allow_none: bool = False) -> None:
    if eps is None and allow_none:
        return
    if eps is None or not eps > 0:
        allowed = "> 0 or None" if allow_none else "> 0"
        raise ValueError(f"eps = {eps!r}: must be {allowed}")


def _shape_tuple(normalized_shape: int | Sequence[int] | torch.Size) -> tuple[int, ...]:
    """normalized_shape as a tuple of sizes >= 0; an int is a 1-D shape, as in torch."""
    if hasattr(normalized_shape, "__index__"):
        normalized_shape = (operator.index(normalized_shape),)
    try:
        shape = tuple(operator.index(size) for size in normalized_shape)
    except TypeError:
        raise TypeError(
            f"normalized_shape = {normalized_shape!r}: must be an int or a sequence of ints"
        ) from None
    if any(size < 0 for size in shape):
        # RuntimeError, the class torch raises when it makes the parameters.
        raise RuntimeError(f"normalized_shape = {shape}: sizes must be >= 0")
    return shape


def _check_group_values(N: int, m: int, shape: torch.Size, num_groups: int) -> None:
    """Refuse what torch's GroupNorm refuses: a single example whose groups hold m = 1
    value each, which normalizes to exactly 0 whatever the input (so y = beta, dL/dx = 0)."""
    if N * m == 1:
        raise ValueError(
            f"GroupNorm input has shape {tuple(shape)} with num_groups = {num_groups}: "
            "a single example with one value per group normalizes to 0; expected more "
            "than one value per group, or more than one example"
        )


class _ExampleNorm(nn.Module):
    """What the three layers share: the teaching names of their affine parameters."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None

    # The state_dict keeps torch's names.
    @property
    def gamma(self) -> nn.Parameter | None:
        return self.weight

    @property
    def beta(self) -> nn.Parameter | None:
        return self.bias


class _TrailingNorm(_ExampleNorm):
    """LayerNorm and RMSNorm: each example normalized over its last dims."""

    normalized_shape: tuple[int, ...]
    eps: float | None
    center = True

    def _check_input(self, x: torch.Tensor) -> None:
        name, shape = type(self).__name__, self.normalized_shape
        _check_float(name, x)
        # RuntimeError for a wrong shape, as torch raises.
        if not shape:
            raise RuntimeError(
                f"{name} normalized_shape = (): must have at least one dim to normalize over"
            )
        if tuple(x.shape[-len(shape) :]) != shape:
            raise RuntimeError(
                f"{name} input has shape {tuple(x.shape)}: expected (*, "
                f"{', '.join(map(str, shape))}), its last dims equal to normalized_shape"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        dims = tuple(range(x.dim() - len(self.normalized_shape), x.dim()))
        return example_norm(x, self.weight, self.bias, dims, self.eps, self.center)


class LayerNorm(_TrailingNorm):
    """Layer Normalization over the last dims of an input (*, *normalized_shape).

    A drop-in for torch.nn.LayerNorm: same arguments in the same positions, same
    parameters and state_dict. A lockstep run's variants use ``ExampleNormStack``.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | torch.Size,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_eps(eps)
        factory = {"device": device, "dtype": dtype}
        self.normalized_shape = _shape_tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(self.normalized_shape, **factory))
            if bias:
                self.bias = nn.Parameter(torch.zeros(self.normalized_shape, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}, bias={self.bias is not None}"
        )


class RMSNorm(_TrailingNorm):
    """RMS Normalization: y = x / sqrt(mean(x^2) + eps) * gamma over the last dims.

    A drop-in for torch.nn.RMSNorm: no centering and no bias. ``eps=None`` is the machine
    epsilon of the dtype the statistics are computed in (float32 for half inputs, as in
    torch). A lockstep run's variants use ``ExampleNormStack``.
    """

    center = False

    def __init__(
        self,
        normalized_shape: int | Sequence[int] | torch.Size,
        eps: float | None = None,
        elementwise_affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        _check_eps(eps, allow_none=True)
        self.normalized_shape = _shape_tuple(normalized_shape)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        if elementwise_affine:
            self.weight = nn.Parameter(
                torch.ones(self.normalized_shape, device=device, dtype=dtype)
            )
        else:
            self.register_parameter("weight", None)
        self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}"
        )


class GroupNorm(_ExampleNorm):
    """Group Normalization over (N, C, *) inputs: each example's C channels fall into
    ``num_groups`` groups of C / G consecutive channels, each normalized over its channels
    and positions. GroupNorm(C, C) is InstanceNorm with an affine transform, GroupNorm(1, C)
    is LayerNorm over (C, *) with per-channel parameters.

    A drop-in for torch.nn.GroupNorm: same arguments in the same positions (keyword-only
    ``bias``), same parameters and state_dict. A lockstep run's variants use
    ``ExampleNormStack``.
    """

    def __init__(
        self,
        num_groups: int,
        num_channels: int,
        eps: float = 1e-5,
        affine: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__()
        num_groups, num_channels = operator.index(num_groups), operator.index(num_channels)
        if num_groups < 1:
            raise ValueError(f"num_groups = {num_groups}: must be an integer >= 1")
        if num_channels < 0:
            # RuntimeError, the class torch raises when it makes the parameters.
            raise RuntimeError(f"num_channels = {num_channels}: must be an integer >= 0")
        if num_channels % num_groups:
            raise ValueError(f"num_groups = {num_groups} must divide num_channels = {num_channels}")
        _check_eps(eps)
        factory = {"device": device, "dtype": dtype}
        self.num_groups = num_groups
        self.num_channels = num_channels
        self.eps = eps
        self.affine = affine
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, **factory))
            if bias:
                self.bias = nn.Parameter(torch.zeros(num_channels, **factory))
            else:
                self.register_parameter("bias", None)
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_float("GroupNorm", x)
        # RuntimeError for a wrong shape, as torch raises.
        if x.dim() < 2 or x.shape[1] != self.num_channels:
            raise RuntimeError(
                f"GroupNorm input has shape {tuple(x.shape)}: expected (N, C, *) with "
                f"C = num_channels = {self.num_channels}"
            )
        N, C, *positions = x.shape
        G = self.num_groups
        _check_group_values(N, C // G * math.prod(positions), x.shape, G)
        # (N, G, C / G, *): an example's group is indexed by (n, g), its values by the rest.
        grouped = x.reshape(N, G, C // G, *positions)
        dims = tuple(range(2, grouped.dim()))
        param_shape = (G, C // G, *(1 for _ in positions))
        gamma = None if self.weight is None else self.weight.view(param_shape)
        beta = None if self.bias is None else self.bias.view(param_shape)
        return example_norm(grouped, gamma, beta, dims, self.eps).reshape(x.shape)

    def extra_repr(self) -> str:
        return (
            f"{self.num_groups}, {self.num_channels}, eps={self.eps}, "
            f"affine={self.affine}, bias={self.bias is not None}"
        )


class ExampleNormStack(_ExampleNorm):
    """The LayerNorm, GroupNorm and RMSNorm variants of a lockstep layer, in one pass.

    ``kinds`` names each variant's layer ("layernorm", "groupnorm" or "rmsnorm"), every one
    over C = ``features`` features, GroupNorm's in ``groups`` groups. A (V, N, C) stack is
    cut into G subgroups of C / G features per example (G = ``groups`` when GroupNorm is
    present, else one subgroup of all C features). Where GroupNorm is mixed with the
    others, merge matrices (see ``_set_mean``) join a LayerNorm or RMSNorm variant's
    subgroups into one set and keep a GroupNorm variant's apart; RMSNorm's sets are not
    centered. One ExampleNormFunction call thus gives every variant the numbers of its own
    layer, where separate layers would cost a call, a slice and a concatenation each (for
    LayerNorm, GroupNorm and RMSNorm over 60 examples of 100 features, one thread: 266 us
    for a forward and backward against 496 us).

    weight and bias hold the variants' gamma and beta side by side, (V * C,), variant v's
    feature c being v * C + c. RMSNorm has no beta: its slice of bias is multiplied by 0,
    so it gets no gradient and stays 0.
    """

    def __init__(self, kinds: Sequence[str], features: int, groups: int = 1, eps: float = 1e-5):
        super().__init__()
        unknown = [k for k in kinds if k not in PER_EXAMPLE_NORMS]
        if not kinds or unknown:
            raise ValueError(f"kinds = {list(kinds)!r}: expected names from {PER_EXAMPLE_NORMS}")
        if "groupnorm" in kinds and features % groups:
            raise ValueError(f"groups = {groups} must divide features = {features}")
        _check_eps(eps)
        self.kinds, self.features, self.eps = list(kinds), features, eps
        V, C = len(kinds), features
        mixed = "groupnorm" in kinds and len(set(kinds)) > 1
        G = groups if "groupnorm" in kinds else 1
        self.subgroups = G
        membership = set_values = None
        if mixed:
            # membership[v, g', g] = 1 when subgroups g' and g form one of variant v's sets,
            # of set_values[v] values. Stored as counts, exact in any dtype the layer is cast
            # to; the merge matrix membership / set_values is formed in the forward pass.
            membership = torch.stack(
                [torch.eye(G) if kind == "groupnorm" else torch.ones(G, G) for kind in kinds]
            )
            set_values = torch.tensor([C // G if k == "groupnorm" else C for k in kinds])
            set_values = set_values.view(V, 1, 1).float()
        self.register_buffer("membership", membership, persistent=False)
        self.register_buffer("set_values", set_values, persistent=False)
        # 1 where a variant centers (and has a beta), 0 for RMSNorm; True when all do.
        centered = torch.tensor([float(kind != "rmsnorm") for kind in kinds]).view(V, 1, 1, 1)
        self.register_buffer("centered", centered, persistent=False)
        self.all_centered = "rmsnorm" not in kinds
        self.any_centered = set(kinds) != {"rmsnorm"}
        self.weight = nn.Parameter(torch.ones(V * C))
        self.bias = nn.Parameter(torch.zeros(V * C))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Normalize a lockstep (V, N, C) stack, each variant as its own layer would."""
        _check_float("ExampleNormStack", h)
        V, C, G = len(self.kinds), self.features, self.subgroups
        if h.dim() != 3 or h.shape[0] != V or h.shape[2] != C:
            raise RuntimeError(
                f"ExampleNormStack input has shape {tuple(h.shape)}: expected (V, N, C) with "
                f"V = {V} variants and C = {C} features"
            )
        N = h.shape[1]
        if "groupnorm" in self.kinds:
            _check_group_values(N, C // G, h.shape, G)
        gamma = self.weight.view(V, 1, G, C // G)
        beta = self.bias.view(V, 1, G, C // G)
        center: bool | torch.Tensor = True
        if not self.any_centered:  # RMSNorm variants only
            beta, center = None, False
        elif not self.all_centered:
            beta = beta * self.centered  # RMSNorm's beta is held at 0
            center = self.centered
        grouped = h.reshape(V, N, G, C // G)
        merge = None if self.membership is None else self.membership / self.set_values
        return example_norm(grouped, gamma, beta, (3,), self.eps, center, merge).view(h.shape)

    forward_variants = forward  # the name a lockstep layer calls on our normalizers

    def extra_repr(self) -> str:
        return f"{self.kinds}, features={self.features}, subgroups={self.subgroups}, eps={self.eps}"
