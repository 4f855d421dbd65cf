"""Batch Normalization from scratch: the forward pass and its hand-derived backward.

Notation (Ioffe & Szegedy 2015, Algorithm 1), per channel c over the m values of a batch
(m = N for (N, C) inputs, m = N*L or N*H*W for (N, C, L) / (N, C, H, W)):

    mu      = 1/m sum_i x_i
    var     = 1/m sum_i (x_i - mu)^2          biased; computed from centered values
    inv_std = 1 / sqrt(var + eps)
    x_hat_i = (x_i - mu) * inv_std
    y_i     = gamma * x_hat_i + beta

The backward pass is derived by hand, not left to autograd, and keeps only x_hat and
inv_std from the forward pass (plus gamma, a parameter), the same as torch's fused kernel.

Two kernels compute the training-mode pass. This file's ``_BatchNormTrain`` is the one to
read. ``bn_core/native/batch_norm.cpp`` repeats the same formulas in C++, once built,
because at this lab's layer sizes the interpreter between the small tensor ops costs
more than the arithmetic. ``kernel="auto"`` (the default) uses the compiled one when it
is built; the tests hold both to torch.nn and gradcheck.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from bn_core import native

__all__ = [
    "KERNELS",
    "BatchNorm",
    "NoiseDraw",
    "NoiseSettings",
    "NoisyBatchNorm",
    "batch_norm_train",
    "draw_bn_noise",
    "noise_states",
    "set_noise_states",
    "use_kernel",
]

KERNELS = ("auto", "python", "cpp")
# The process-wide choice; BN_CORE_KERNEL=python runs the readable kernel everywhere.
_default_kernel = os.environ.get("BN_CORE_KERNEL", "auto")
if _default_kernel not in KERNELS:
    raise ValueError(f"BN_CORE_KERNEL = {_default_kernel!r}: allowed: {', '.join(KERNELS)}")


@contextlib.contextmanager
def use_kernel(kernel: str) -> Iterator[None]:
    """Run layers whose ``kernel`` is None (the default) on ``kernel`` inside the block."""
    global _default_kernel
    if kernel not in KERNELS:
        raise ValueError(f"kernel = {kernel!r}: allowed: {', '.join(KERNELS)}")
    saved, _default_kernel = _default_kernel, kernel
    try:
        yield
    finally:
        _default_kernel = saved


def lockstep_output_op():
    """The compiled lockstep output layer (``native.load_output``) unless the kernel in
    use is the Python one, which keeps every step of a run readable; else None."""
    if _compiled_op(_default_kernel) is None:
        return None
    return native.load_output()


def _compiled_op(kernel: str):
    """The compiled operator if ``kernel`` asks for it (or allows it), else None."""
    if kernel == "python":
        return None
    op = native.load()
    if op is None and kernel == "cpp":
        raise RuntimeError(f"kernel = 'cpp': the BatchNorm kernel is {native.status()}")
    return op


def _reduce_dims(ndim: int) -> tuple[int, ...]:
    """The dimensions a (N, C, *) input is averaged over: all but the channel dim 1."""
    return (0, *range(2, ndim))


@functools.lru_cache(maxsize=256)
def _scalar(value: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A cached 0-dim tensor holding value; never modified.

    An op given a Python float as an operand wraps it in a fresh tensor on every call,
    which at this lab's layer sizes costs about as much as the op itself.
    """
    return torch.tensor(value, dtype=dtype, device=device)


class _BatchNormTrain(torch.autograd.Function):
    """y = gamma * (x - mu_B) / sqrt(var_B + eps) + beta with batch statistics.

    At this lab's layer sizes (60 x 100) each tensor op costs about as much as its
    launch, so the code keeps the op count low: (N, C) inputs take a keepdim-free path
    where (C,) vectors broadcast as they are, and the statistics go to the callback
    ``stats(mu_B, sum_sq, m)`` (sum_sq = m * var_B) instead of being extra autograd
    outputs.
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, eps, grad_through_stats, stats):
        flat = x.dim() == 2
        if flat:
            m = x.shape[0]
            mu = x.mean(0)
            x_hat = x - mu
            # Centered two-pass variance: E[x^2] - E[x]^2 cancels catastrophically in
            # float32 when |mean| >> std and can go negative (then sqrt gives NaN).
            sum_sq = torch.linalg.vecdot(x_hat, x_hat, dim=0)
            g, b = gamma, beta
        else:
            dims = _reduce_dims(x.dim())
            m = x.numel() // x.shape[1]
            mu = x.mean(dims, keepdim=True)
            x_hat = x - mu
            sum_sq = x_hat.square().sum(dims, keepdim=True)
            if gamma is not None:
                g, b = gamma.view(mu.shape), beta.view(mu.shape)
        # var + eps as eps + sum_sq / m: one op
        inv_std = torch.add(_scalar(eps, x.dtype, x.device), sum_sq, alpha=1.0 / m).rsqrt_()
        x_hat.mul_(inv_std)  # x_hat is our own temporary: scale it in place
        # Without gamma the output must not be the saved x_hat itself, or an in-place
        # op after the layer (ReLU(inplace=True)) would corrupt the backward pass.
        y = x_hat.clone() if gamma is None else torch.addcmul(b, x_hat, g)
        ctx.save_for_backward(x_hat, inv_std, gamma)
        ctx.m = m
        ctx.grad_through_stats = grad_through_stats
        if stats is not None:
            if flat:
                stats(mu, sum_sq, m)
            else:
                stats(mu.view(-1), sum_sq.view(-1), m)
        return y

    @staticmethod
    def backward(ctx, dy):
        x_hat, inv_std, gamma = ctx.saved_tensors
        need_x, need_gamma, need_beta = ctx.needs_input_grad[:3]
        through_stats = need_x and ctx.grad_through_stats
        flat = dy.dim() == 2
        # Per-channel sums, (C,) for (N, C) inputs and keepdim (1, C, 1, ...) otherwise,
        # so that they broadcast against dy as they are:
        #   dL/dbeta = sum_i dy_i ;  dL/dgamma = sum_i dy_i * x_hat_i
        sum_dy = sum_dy_xhat = dx = None
        if flat:
            if need_beta or through_stats:
                sum_dy = dy.sum(0)
            if need_gamma or through_stats:
                sum_dy_xhat = torch.linalg.vecdot(dy, x_hat, dim=0)
            g = gamma
        else:
            dims = _reduce_dims(dy.dim())
            if need_beta or through_stats:
                sum_dy = dy.sum(dims, keepdim=True)
            if need_gamma or through_stats:
                sum_dy_xhat = (dy * x_hat).sum(dims, keepdim=True)
            g = None if gamma is None else gamma.view(inv_std.shape)
        if need_x:
            scale = inv_std if g is None else g * inv_std
            if not through_stats:
                # Naive gradient (section 2 of the paper): mu and var held constant,
                #   dL/dx_i = gamma * inv_std * dy_i
                dx = dy * scale
            else:
                # Through the statistics, with g_i = dL/dx_hat_i = gamma * dy_i:
                #   dL/dx_i = inv_std * (g_i - mean(g) - x_hat_i * mean(g * x_hat))
                #           = gamma * inv_std * (dy_i - mean(dy) - x_hat_i * mean(dy * x_hat))
                # dx is a fresh tensor, so the last two steps run in place on it.
                m = ctx.m
                dx = torch.addcmul(dy, x_hat, sum_dy_xhat, value=-1.0 / m)
                dx.sub_(sum_dy, alpha=1.0 / m)
                dx.mul_(scale)
        if gamma is None:
            return dx, None, None, None, None, None
        # Only a gradient that was asked for is returned as one.
        dgamma = dbeta = None
        if need_gamma:
            dgamma = sum_dy_xhat if flat else sum_dy_xhat.view(-1)
        if need_beta:
            dbeta = sum_dy if flat else sum_dy.view(-1)
        return dx, dgamma, dbeta, None, None, None


def batch_norm_train(
    x: torch.Tensor,
    gamma: torch.Tensor | None,
    beta: torch.Tensor | None,
    eps: float = 1e-5,
    grad_through_stats: bool = True,
    kernel: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Normalize x of shape (N, C, *) with its batch statistics; returns (y, mu_B, var_B)."""
    op = _compiled_op(kernel or _default_kernel)
    if op is not None:
        # The compiled kernel reports its statistics through running buffers: with
        # factor 1 they become mu_B and the unbiased variance.
        c, m = x.shape[1], x.numel() // x.shape[1]
        mean = torch.zeros(c, dtype=x.dtype, device=x.device)
        var = torch.zeros(c, dtype=x.dtype, device=x.device)
        y = op(x, gamma, beta, mean, var, eps, 1.0, grad_through_stats)
        return y, mean, var * ((m - 1) / m)
    stats: list[torch.Tensor] = []

    def keep(mu: torch.Tensor, sum_sq: torch.Tensor, m: int) -> None:
        stats.extend((mu, sum_sq / m))

    y = _BatchNormTrain.apply(x, gamma, beta, eps, grad_through_stats, keep)
    return y, stats[0], stats[1]


class BatchNorm(nn.Module):
    """Batch Normalization over (N, C), (N, C, L) or (N, C, H, W) inputs.

    A drop-in for torch.nn.BatchNorm1d/2d: same arguments, same running-statistics
    contract, same state_dict. ``grad_through_stats=False`` gives the naive gradient that
    treats mu_B and var_B as constants (Ioffe & Szegedy section 2).
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        grad_through_stats: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        kernel: str | None = None,
    ) -> None:
        super().__init__()
        if kernel is not None and kernel not in KERNELS:
            raise ValueError(f"kernel = {kernel!r}: allowed: None, {', '.join(KERNELS)}")
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
        # None follows the process-wide choice (use_kernel, BN_CORE_KERNEL); not saved in
        # the state_dict, which stays torch's.
        self.kernel = kernel
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **factory))
            self.bias = nn.Parameter(torch.zeros(num_features, **factory))
        else:
            self.register_parameter("weight", None)
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
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

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
        reference = self._parameters.get("weight")
        if reference is None:
            reference = self._buffers.get("running_mean")
        if reference is not None and x.dtype != reference.dtype and x.element_size() < 4:
            # Mixed precision, as torch does it: half inputs with float32 parameters are
            # normalized in float32 (statistics need the range) and returned in half.
            return self.forward(x.to(reference.dtype)).to(x.dtype)
        use_batch_stats = self.training or not self.track_running_stats
        if not use_batch_stats:
            # Inference: a fixed affine map from the population (running) statistics.
            scale = (self.running_var + self.eps).rsqrt()
            if self.affine:
                scale = scale * self.weight
            shift = -self.running_mean * scale
            if self.affine:
                shift = shift + self.bias
            shape = (1, -1) + (1,) * (x.dim() - 2)
            return torch.addcmul(shift.view(shape), x, scale.view(shape))

        values_per_channel = x.numel() // self.num_features
        if values_per_channel < 2:
            raise ValueError(
                f"BatchNorm input has shape {tuple(x.shape)}: training mode needs more than "
                "one value per channel, because the variance of a single value is 0 and "
                "normalizing it divides by sqrt(eps). Use a batch of at least 2, or .eval()."
            )
        # The running statistics are updated from inside the Function's forward (no
        # grad there), so mu_B and var_B never become autograd outputs. Parameters and
        # buffers are read from their dicts: nn.Module.__getattr__ is a Python fallback
        # that costs about as much as a small tensor op.
        params = self._parameters
        op = _compiled_op(self.kernel or _default_kernel)
        if op is not None:
            running_mean, running_var, factor = self._running_update()
            return op(
                x,
                params["weight"],
                params["bias"],
                running_mean,
                running_var,
                self.eps,
                factor,
                self.grad_through_stats,
            )
        return _BatchNormTrain.apply(
            x,
            params["weight"],
            params["bias"],
            self.eps,
            self.grad_through_stats,
            self._update_running_stats if self.training and self.track_running_stats else None,
        )

    def stacked_op(self):
        """The compiled lockstep operator when ``forward_variants`` can run, else None.

        It needs this exact class (subclasses change ``forward``), batch statistics
        (training mode), and the compiled kernel.
        """
        if type(self) is not BatchNorm or not self.training:
            return None
        if _compiled_op(self.kernel or _default_kernel) is None:
            return None
        return native.load_stacked()

    def forward_variants(self, h: torch.Tensor, start: int, stop: int, op) -> torch.Tensor:
        """Normalize variants [start, stop) of a lockstep (V, N, C) activation where they
        lie in that layout; the other variants pass through. ``op`` is ``stacked_op()``.

        This layer then has (stop - start) * C features, variant v's channel c being
        feature (v - start) * C + c: the same numbers as ``forward`` on the run's slice
        permuted to (N, (stop - start) * C), without the copies.
        """
        if h.dim() != 3 or (stop - start) * h.shape[2] != self.num_features:
            raise ValueError(
                f"BatchNorm input has shape {tuple(h.shape)}: expected (V, N, C) where "
                f"variants [{start}, {stop}) hold its {self.num_features} features"
            )
        params = self._parameters
        running_mean, running_var, factor = self._running_update()
        return op(
            h,
            params["weight"],
            params["bias"],
            running_mean,
            running_var,
            start,
            stop,
            self.eps,
            factor,
            self.grad_through_stats,
        )

    def _running_update(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(running_mean, running_var, factor) for the compiled kernel to update in this
        pass, counting the batch; (None, None, 0.0) when this pass updates nothing."""
        if not (self.training and self.track_running_stats):
            return None, None, 0.0
        factor = self._next_running_factor()
        buffers = self._buffers
        return buffers["running_mean"], buffers["running_var"], factor

    def _next_running_factor(self) -> float:
        """Count this batch and return f for running = (1 - f) * running + f * batch.

        PyTorch's contract: f = momentum, or f = 1 / num_batches_tracked (a cumulative
        average) when momentum is None.
        """
        num_batches = self._buffers["num_batches_tracked"]
        num_batches.add_(1)
        return 1.0 / float(num_batches) if self.momentum is None else self.momentum

    def _update_running_stats(self, mu: torch.Tensor, sum_sq: torch.Tensor, m: int) -> None:
        # running_var takes the unbiased batch variance, sum_sq / (m - 1).
        factor = self._next_running_factor()
        buffers = self._buffers
        running_mean, running_var = buffers["running_mean"], buffers["running_var"]
        var = sum_sq * _scalar(1.0 / (m - 1), sum_sq.dtype, sum_sq.device)
        if mu.dtype != running_mean.dtype:  # low-precision input, float32 buffers
            mu, var = mu.to(running_mean.dtype), var.to(running_var.dtype)
        # Both lerps in one op.
        torch._foreach_lerp_((running_mean, running_var), (mu, var), factor)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, "
            f"affine={self.affine}, track_running_stats={self.track_running_stats}, "
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
