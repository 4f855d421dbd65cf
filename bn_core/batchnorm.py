"""Batch Normalization from scratch: the forward pass and its hand-derived backward.

Notation (Ioffe & Szegedy 2015, Algorithm 1), per channel over the m values the layer
averages over (the dims ``dims``: N for (N, C), N*L or N*H*W for (N, C, L) / (N, C, H, W),
and N for each variant of a lockstep (V, N, C) stack):

    mu      = 1/m sum_i x_i
    var     = 1/m sum_i (x_i - mu)^2          biased
    inv_std = 1 / sqrt(var + eps)
    x_hat_i = (x_i - mu) * inv_std
    y_i     = gamma * x_hat_i + beta

The backward pass is derived by hand, not left to autograd, and needs only x_hat and
inv_std from the forward pass (plus gamma, a parameter): x itself is not kept.
Every BatchNorm in the lab, in every model, trains through ``BatchNormFunction``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "BatchNorm",
    "BatchNormFunction",
    "NoiseDraw",
    "NoiseSettings",
    "NoisyBatchNorm",
    "batch_norm_train",
    "draw_bn_noise",
    "noise_states",
    "set_noise_states",
]


class BatchNormFunction(torch.autograd.Function):
    """y = BN(x) with the batch statistics over ``dims``.

    gamma and beta are the layer's parameters as they are stored (one value per
    normalized feature), or None: both without affine, beta alone for ``bias=False``. They
    are viewed like mu to broadcast against x.
    ``running`` is None or (running_mean, running_var, f): the population statistics
    that inference uses (section 3.1), moved towards this batch's in place.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, dims, eps, grad_through_stats, running):
        mu = x.mean(dims, keepdim=True)
        m = x.numel() // mu.numel()  # values averaged per feature
        x_hat = x - mu  # x - mu for now; scaled in place below, so one buffer holds both
        # From centered values: E[x^2] - E[x]^2 cancels catastrophically in float32 when
        # |mean| >> std, and can go negative.
        var = (x_hat * x_hat).mean(dims, keepdim=True)
        inv_std = (var + eps).rsqrt_()
        x_hat.mul_(inv_std)
        # Without gamma the output must not be the saved x_hat itself, or an in-place op
        # after the layer (ReLU(inplace=True)) would corrupt the backward pass.
        if gamma is None:
            y = x_hat.clone()
        elif beta is None:
            y = x_hat * gamma.view_as(mu)
        else:
            y = torch.addcmul(beta.view_as(mu), gamma.view_as(mu), x_hat)
        if running is not None:
            # running = (1 - f) * running + f * batch, PyTorch's contract: the variance
            # enters unbiased, var * m / (m - 1).
            running_mean, running_var, f = running
            batch_mean, unbiased_var = mu.view_as(running_mean), var.view_as(running_var)
            unbiased_var = unbiased_var * (m / (m - 1))
            if batch_mean.dtype != running_mean.dtype:  # a float64 input, a float32 layer
                batch_mean = batch_mean.to(running_mean.dtype)
                unbiased_var = unbiased_var.to(running_var.dtype)
            running_mean.lerp_(batch_mean, f)
            running_var.lerp_(unbiased_var, f)
        ctx.save_for_backward(x_hat, inv_std, gamma)
        ctx.dims, ctx.m, ctx.grad_through_stats = dims, m, grad_through_stats
        return y

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled():
            # create_graph=True: this backward would be differentiated again, and x_hat and
            # inv_std were saved without their dependence on x, so the second derivative
            # would come out wrong. Refuse it.
            raise RuntimeError(
                "BatchNormFunction has no second derivative: its backward is written by "
                "hand and is differentiable once (create_graph=True is not supported)"
            )
        x_hat, inv_std, gamma = ctx.saved_tensors
        dims, m = ctx.dims, ctx.m
        # dL/dbeta = sum_i dy_i ;  dL/dgamma = sum_i dy_i * x_hat_i
        sum_dy = dy.sum(dims, keepdim=True)
        sum_dy_x_hat = (dy * x_hat).sum(dims, keepdim=True)
        scale = inv_std if gamma is None else gamma.view_as(inv_std) * inv_std
        if ctx.grad_through_stats:
            # Through the statistics, as the chain rule over mu(x) and var(x) gives:
            #   dL/dx_i = gamma * inv_std * (dy_i - mean(dy) - x_hat_i * mean(dy * x_hat))
            # built in one buffer: dy - x_hat * mean(dy x_hat), then - mean(dy), then * scale
            dx = torch.addcmul(dy, x_hat, sum_dy_x_hat, value=-1.0 / m)
            dx.sub_(sum_dy, alpha=1.0 / m).mul_(scale)
        else:
            # The naive gradient of section 2: mu and var held constant,
            #   dL/dx_i = gamma * inv_std * dy_i
            dx = scale * dy
        # No gradient for a gamma or beta that is None (bias=False) or frozen; beta, when
        # present, has gamma's shape.
        _, needs_dgamma, needs_dbeta, *_ = ctx.needs_input_grad
        dgamma = sum_dy_x_hat.view_as(gamma) if needs_dgamma else None
        dbeta = sum_dy.view_as(gamma) if needs_dbeta else None
        return dx, dgamma, dbeta, None, None, None, None


def _channel_dims(ndim: int) -> tuple[int, ...]:
    """The dims a (N, C, *) input is averaged over: all but the channel dim 1."""
    return (0, *range(2, ndim))


def batch_norm_train(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float = 1e-5,
    grad_through_stats: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize x of shape (N, C, *) with its batch statistics; returns (y, mu_B, var_B),
    the statistics as (C,) vectors and var_B biased."""
    # Running statistics with f = 1 become the batch's own: mu_B and the unbiased var_B.
    C, m = x.shape[1], x.numel() // x.shape[1]
    if m < 2:
        raise ValueError(
            f"batch_norm_train input has shape {tuple(x.shape)}: batch statistics need more "
            "than one value per channel"
        )
    mu = torch.zeros(C, dtype=x.dtype, device=x.device)
    var = torch.zeros(C, dtype=x.dtype, device=x.device)
    y = BatchNormFunction.apply(
        x, gamma, beta, _channel_dims(x.dim()), eps, grad_through_stats, (mu, var, 1.0)
    )
    return y, mu, var * ((m - 1) / m)


class BatchNorm(nn.Module):
    """Batch Normalization over (N, C), (N, C, L) or (N, C, H, W) inputs.

    A drop-in for torch.nn.BatchNorm1d/2d: same arguments in the same positions (``bias``
    keyword-only, as in torch), same running-statistics contract, same state_dict, and
    old (version 1) state_dicts without ``num_batches_tracked`` still load. The
    keyword-only ``grad_through_stats=False`` gives the naive gradient that treats mu_B and
    var_B as constants (Ioffe & Szegedy section 2). ``forward_variants`` normalizes a
    lockstep (V, N, C) stack of variants in place of V separate layers.
    """

    # torch's _NormBase numbering: version 2 added num_batches_tracked.
    _version = 2

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        grad_through_stats: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features = {num_features!r}: must be an integer >= 1")
        if not eps > 0:
            raise ValueError(f"eps = {eps!r}: must be > 0")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum = {momentum!r}: must be in [0, 1] or None")
        factory = {"device": device, "dtype": dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.grad_through_stats = grad_through_stats
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
        else:
            self.register_parameter("weight", None)
        if affine and bias:
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features, **factory))
            self.register_buffer("running_var", torch.ones(num_features, **factory))
            self.register_buffer(
                "num_batches_tracked",
                torch.tensor(0, dtype=torch.long, device=device),
            )
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)

    # Teaching names for the affine parameters; the state_dict keeps torch's names.
    @property
    def gamma(self) -> nn.Parameter | None:
        return self.weight

    @property
    def beta(self) -> nn.Parameter | None:
        return self.bias

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1.0)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def _load_from_state_dict(
        self,
        state_dict,
        prefix,
        local_metadata,
        strict,
        missing_keys,
        unexpected_keys,
        error_msgs,
    ) -> None:
        # A version 1 state_dict (or one without a version) predates num_batches_tracked:
        # keep this layer's count, as torch does, or start from 0 where this layer's is a
        # meta placeholder, so a meta-built layer loaded with assign=True gets a real one.
        key = prefix + "num_batches_tracked"
        version = local_metadata.get("version", None)
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            count = self.num_batches_tracked
            if count is None or count.device.type == "meta":
                count = torch.tensor(0, dtype=torch.long)
            state_dict[key] = count
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3, 4):
            raise ValueError(
                f"BatchNorm input has shape {tuple(x.shape)}: expected (N, C), (N, C, L) "
                f"or (N, C, H, W) with C = {self.num_features}"
            )
        if x.shape[1] != self.num_features:
            raise ValueError(
                f"BatchNorm input has shape {tuple(x.shape)}: expected C = "
                f"{self.num_features} channels in dimension 1, got {x.shape[1]}"
            )
        if not x.is_floating_point():
            raise TypeError(
                f"BatchNorm input has dtype {x.dtype}: expected a floating-point tensor "
                "(float16, bfloat16, float32 or float64)"
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        return self._normalize(x, _channel_dims(x.dim()))

    def forward_variants(self, h: torch.Tensor) -> torch.Tensor:
        """Normalize a lockstep (V, N, C) stack, each variant over its own N examples.

        This layer then has V * C features, variant v's channel c being feature v * C + c:
        the same numbers as V separate layers of C features, in one pass.
        """
        if h.dim() != 3 or h.shape[0] * h.shape[2] != self.num_features:
            raise ValueError(
                f"BatchNorm input has shape {tuple(h.shape)}: expected (V, N, C) with "
                f"V * C = {self.num_features} features"
            )
        return self._normalize(h, (1,))

    def _normalize(self, x: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
        """x normalized over ``dims``: every other dim indexes a feature."""
        if x.element_size() < 4:
            # Half inputs (and half layers) are normalized in float32, as torch does it:
            # the sums of a channel's values and squares need float32's range and precision.
            return self._normalize(x.float(), dims).to(x.dtype)
        gamma, beta = self.weight, self.bias
        if gamma is not None and gamma.dtype != x.dtype:  # e.g. a float64 input, float32 layer
            gamma = gamma.to(x.dtype)
        if beta is not None and beta.dtype != x.dtype:
            beta = beta.to(x.dtype)
        # torch's rule: batch statistics in training, and in eval too when there are no
        # running statistics to use. Buffers kept while track_running_stats was switched
        # off are still used in eval, and are not updated in training.
        running_mean, running_var = self.running_mean, self.running_var
        if not self.training and (running_mean is not None or running_var is not None):
            return self._normalize_with_running_stats(x, dims, gamma, beta)
        m = math.prod(x.shape[d] for d in dims)
        if m == 1:
            raise ValueError(
                f"BatchNorm input has shape {tuple(x.shape)}: batch statistics (training "
                "mode) need more than one value per channel, because the variance of a single "
                "value is 0 and normalizing it divides by sqrt(eps). Use a batch of at least "
                "2, or .eval() with running statistics."
            )
        running = None
        if self.training and self.track_running_stats:
            count = self.num_batches_tracked
            if count is not None:
                count.add_(1)
            if running_mean is not None and running_var is not None:
                # f = momentum, or for momentum None the cumulative average, f = 1 / batches
                # seen (0 without a count, as in torch)
                f = self.momentum
                if f is None:
                    f = 0.0 if count is None else 1.0 / float(count)
                running = (running_mean, running_var, f)
        if m == 0:
            # An empty batch has no statistics and, as in torch, leaves the running ones
            # alone. The empty output still depends on gamma and beta, so backward gives
            # them zero gradients rather than none.
            shape = [1 if d in dims else x.shape[d] for d in range(x.dim())]
            y = x.clone() if gamma is None else x * gamma.view(shape)
            return y if beta is None else y + beta.view(shape)
        return BatchNormFunction.apply(
            x, gamma, beta, dims, self.eps, self.grad_through_stats, running
        )

    def _normalize_with_running_stats(
        self,
        x: torch.Tensor,
        dims: tuple[int, ...],
        gamma: torch.Tensor | None,
        beta: torch.Tensor | None,
    ) -> torch.Tensor:
        """Inference: y = x * scale + shift, a fixed affine map from the population (running)
        statistics, scale = gamma / sqrt(running_var + eps), shift = beta - running_mean * scale."""
        shape = [1 if d in dims else x.shape[d] for d in range(x.dim())]
        scale = (self.running_var.view(shape).to(x.dtype) + self.eps).rsqrt()
        shift = -self.running_mean.view(shape).to(x.dtype) * scale
        if gamma is not None:
            scale, shift = scale * gamma.view(shape), shift * gamma.view(shape)
        if beta is not None:
            shift = shift + beta.view(shape)
        return torch.addcmul(shift, x, scale)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, bias={self.bias is not None}, "
            f"track_running_stats={self.track_running_stats}, "
            f"grad_through_stats={self.grad_through_stats}"
        )


# --- noisy BatchNorm (Santurkar et al. 2018, section 2.1) --------------------------------
@dataclass(frozen=True)
class NoiseSettings:
    """The distributions of noisy BN: a <- s * a + m after each BN layer.

    Each step and layer (and variant) draws mu_t ~ U(-shift, shift) and
    sigma_t ~ U(scale_low, scale_high); each element then draws
    m ~ U(mu_t - shift_spread, mu_t + shift_spread) and s ~ N(sigma_t, scale_std).
    """

    shift: float = 0.5
    scale_low: float = 1.0
    scale_high: float = 1.25
    shift_spread: float = 0.1
    scale_std: float = 0.1


@dataclass
class NoiseDraw:
    """One step's noise for one layer: per-group step values and per-element s and m."""

    mu: torch.Tensor  # (groups,)
    sigma: torch.Tensor  # (groups,)
    scale: torch.Tensor  # like the activation
    shift: torch.Tensor  # like the activation


def draw_bn_noise(
    shape: tuple[int, ...], groups: int, settings: NoiseSettings, generator: torch.Generator
) -> NoiseDraw:
    """Noise for an activation of ``shape`` (N, C, ...) whose C channels form ``groups``
    equal groups (one per variant in a lockstep run), each with its own mu_t and sigma_t."""
    dev = generator.device
    channels = shape[1]
    mu = (torch.rand(groups, generator=generator, device=dev) * 2 - 1) * settings.shift
    span = settings.scale_high - settings.scale_low
    sigma = settings.scale_low + span * torch.rand(groups, generator=generator, device=dev)
    per_channel = (1, channels) + (1,) * (len(shape) - 2)
    mu_c = mu.repeat_interleave(channels // groups).view(per_channel)
    sigma_c = sigma.repeat_interleave(channels // groups).view(per_channel)
    uniform = torch.rand(shape, generator=generator, device=dev) * 2 - 1
    normal = torch.randn(shape, generator=generator, device=dev)
    return NoiseDraw(
        mu,
        sigma,
        sigma_c + settings.scale_std * normal,
        mu_c + settings.shift_spread * uniform,
    )


class NoisyBatchNorm(BatchNorm):
    """Our BatchNorm followed, in training mode, by a fresh random scale and shift.

    Santurkar et al. inject this noise to make the distributions *less* stable than in a
    plain net, and find that such a net still trains about as well as BN: evidence that
    BN's benefit is not stable distributions. Evaluation mode draws no noise and applies
    its expectation instead (scale (low + high) / 2, shift 0), as inverted dropout does.
    The noise has its own seeded generator, so a run stays reproducible and a measurement
    can replay a step's noise exactly (``noise_state`` / ``set_noise_state``).
    """

    def __init__(
        self,
        num_features: int,
        *args,
        groups: int = 1,
        noise: NoiseSettings | None = None,
        seed: int = 0,
        **kwargs,
    ) -> None:
        super().__init__(num_features, *args, **kwargs)
        if num_features % groups:
            raise ValueError(f"groups = {groups}: must divide num_features = {num_features}")
        self.groups = groups
        self.noise = noise or NoiseSettings()
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending: torch.Tensor | None = None  # a state set before the first draw

    def generator(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != device:
            # Created lazily on the input's device, from the seed or a state set earlier.
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            if self._pending is not None:
                self._generator.set_state(self._pending)
                self._pending = None
        return self._generator

    def noise_state(self) -> torch.Tensor | None:
        if self._generator is None:
            return self._pending
        return self._generator.get_state()

    def set_noise_state(self, state: torch.Tensor | None) -> None:
        if state is None:
            self._generator = self._pending = None
        elif self._generator is not None:
            self._generator.set_state(state)
        else:
            self._pending = state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        if not self.training:
            # The noise's expectation, as inverted dropout keeps it: E[m] = 0 (mu_t is
            # symmetric about 0) and E[s] = (low + high) / 2.
            return y * ((self.noise.scale_low + self.noise.scale_high) / 2)
        draw = draw_bn_noise(tuple(y.shape), self.groups, self.noise, self.generator(y.device))
        return torch.addcmul(draw.shift.to(y.dtype), y, draw.scale.to(y.dtype))


def noise_states(model: nn.Module) -> list[torch.Tensor | None]:
    """The noise generators' states of every noisy BN layer in ``model``, in module order."""
    return [m.noise_state() for m in model.modules() if isinstance(m, NoisyBatchNorm)]


def set_noise_states(model: nn.Module, states: list[torch.Tensor | None]) -> None:
    layers = [m for m in model.modules() if isinstance(m, NoisyBatchNorm)]
    for layer, state in zip(layers, states, strict=True):
        layer.set_noise_state(state)
