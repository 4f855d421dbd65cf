"""The nets a run trains: all variants of a run side by side, on the same batches.

``LockstepMLP`` stacks the variants of an MLP run so every linear layer of every variant
is one batched matmul: variants only differ in normalization and learning rate, never in
shape. ``LockstepLeNet`` keeps one conv net per variant and loops.

Both return logits of shape (V, N, classes) and, when asked, a ``LayerRecord`` per hidden
layer with tensors of shape (V, N, ...), which is what the probes measure.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from bn_core.batchnorm import (
    BatchNorm,
    NoiseSettings,
    NoisyBatchNorm,
    noise_states,
    set_noise_states,
)
from bn_core.config import RunConfig, VariantSpec
from bn_core.normalizers import (
    PER_EXAMPLE_NORMS,
    ExampleNormStack,
    GroupNorm,
    LayerNorm,
    RMSNorm,
)

__all__ = [
    "LayerRecord",
    "LayerStack",
    "LockstepLeNet",
    "LockstepMLP",
    "batch_statistics_pass",
    "build_model",
    "make_norm",
    "noise_settings",
    "preserved_state",
    "variant_losses",
]

ACTIVATIONS = {"sigmoid": torch.sigmoid, "tanh": torch.tanh, "relu": torch.relu}


@dataclass
class LayerRecord:
    """What one hidden layer computed, stacked over variants: (V, N, C[, H, W])."""

    name: str
    preact: torch.Tensor  # the nonlinearity's input
    postact: torch.Tensor  # the nonlinearity's output
    bn_input: torch.Tensor  # what the BN layer normalizes (before or after the nonlinearity)
    output: torch.Tensor  # what the block hands to the next layer


@dataclass
class LayerStack:
    """One hidden layer's weight, bias and their gradients, stacked over variants (V, ...).

    A dropped bias (BN right after the layer) is zeros, and so is its gradient.
    """

    weight: torch.Tensor
    weight_grad: torch.Tensor
    bias: torch.Tensor
    bias_grad: torch.Tensor


def make_norm(
    norm: str,
    features: int,
    dims: int,
    bn_momentum: float | None,
    *,
    groups: int = 1,
    channel_groups: int = 1,
    noise: NoiseSettings | None = None,
    seed: int = 0,
) -> nn.Module | None:
    """The normalization layer of one variant, or of a run of ``groups`` BatchNorm variants
    sharing it (its ``features`` are theirs side by side); None for the plain net.

    ``groups`` matters for batchnorm-noisy's noise draw, one per variant.
    ``channel_groups`` is GroupNorm's group count, and ``seed`` seeds noisy BN's noise
    generator. ``dims`` is 1 for (N, C) features and 2 for (N, C, H, W) feature maps.
    A lockstep run's per-example variants share an ``ExampleNormStack`` instead.
    """
    if norm == "none":
        return None
    if norm == "batchnorm-torch":
        cls = nn.BatchNorm1d if dims == 1 else nn.BatchNorm2d
        return cls(features, momentum=bn_momentum)
    if norm == "batchnorm-noisy":
        return NoisyBatchNorm(features, momentum=bn_momentum, groups=groups, noise=noise, seed=seed)
    if norm == "groupnorm":
        return GroupNorm(channel_groups, features)
    if norm == "layernorm":
        # A feature map's LayerNorm: each example over all its channels and positions,
        # with a gamma and beta per channel (GroupNorm with one group per example).
        return LayerNorm(features) if dims == 1 else GroupNorm(1, features)
    if norm == "rmsnorm":
        return RMSNorm(features, eps=1e-5)
    return BatchNorm(features, momentum=bn_momentum, grad_through_stats=(norm != "batchnorm-naive"))


def noise_settings(config: RunConfig) -> NoiseSettings:
    return NoiseSettings(
        shift=config.bn_noise_shift,
        scale_low=config.bn_noise_scale_low,
        scale_high=config.bn_noise_scale_high,
        shift_spread=config.bn_noise_shift_spread,
        scale_std=config.bn_noise_scale_std,
    )


def _noise_seed(config: RunConfig, layer: int, variant: int = 0) -> int:
    # A different stream per layer and per net, reproducible from the run's seed.
    return (config.seed * 1_000_003 + 1009 * (layer + 1) + variant) % 2**63


def _bias_kept(spec: VariantSpec, config: RunConfig) -> bool:
    # BN right after a linear layer makes its bias redundant (beta takes its role,
    # section 3.2), so it is dropped unless the run asks to keep it. In a residual net the
    # normalizer sits on the block's input or after the addition, not after the linear map.
    return (
        not spec.uses_bn
        or config.placement == "after"
        or config.keep_bias
        or config.residual != "none"
    )


def _init_weight(shape_in: int, shape_out: int, config: RunConfig, gen: torch.Generator):
    if config.init == "gaussian":
        return torch.randn(shape_in, shape_out, generator=gen) * config.init_std
    if config.init == "xavier":
        bound = math.sqrt(6.0 / (shape_in + shape_out))  # Glorot & Bengio's normalized init
        return (torch.rand(shape_in, shape_out, generator=gen) * 2 - 1) * bound
    return torch.randn(shape_in, shape_out, generator=gen) * math.sqrt(2.0 / shape_in)


class _NormGroups(nn.Module):
    """Applies each variant's normalization to its slice of a (V, N, C) activation.

    Consecutive variants with the same BatchNorm form a run that shares one module over
    V_run * C features: per-feature statistics over N are exactly per-variant, per-channel
    statistics. Consecutive per-example variants (LayerNorm, GroupNorm, RMSNorm, in any mix)
    form a run that one ``ExampleNormStack`` normalizes, each variant over its own
    features. Runs are contiguous slices, so no gather or scatter is needed.
    """

    def __init__(
        self,
        specs: tuple[VariantSpec, ...],
        width: int,
        bn_momentum: float | None,
        noise: NoiseSettings | None = None,
        seed: int = 0,
        channel_groups: int = 1,
    ):
        super().__init__()
        self.width = width
        self.channel_groups = channel_groups
        self.norm_of = [spec.norm for spec in specs]  # each variant's normalization

        def family(norm: str) -> str:
            return "per-example" if norm in PER_EXAMPLE_NORMS else norm

        self.runs: list[tuple[int, int, str]] = []  # (start, stop, family)
        for i, spec in enumerate(specs):
            if self.runs and self.runs[-1][2] == family(spec.norm):
                self.runs[-1] = (self.runs[-1][0], i + 1, self.runs[-1][2])
            else:
                self.runs.append((i, i + 1, family(spec.norm)))
        norm_runs = [r for r in self.runs if r[2] != "none"]
        self.group_index = [list(range(a, b)) for a, b, _ in norm_runs]
        self.groups = nn.ModuleList(
            [
                ExampleNormStack(self.norm_of[a:b], width, channel_groups)
                if kind == "per-example"
                else make_norm(
                    kind,
                    (b - a) * width,
                    1,
                    bn_momentum,
                    groups=b - a,
                    noise=noise,
                    seed=seed + a,
                )
                for a, b, kind in norm_runs
            ]
        )
        # The module that normalizes each run, None for the plain ones.
        modules = iter(self.groups)
        self._run_modules = [None if kind == "none" else next(modules) for *_, kind in self.runs]

    def forward(self, h: torch.Tensor, variants: list[int] | None = None) -> torch.Tensor:
        """Normalize h, (V, N, C); or, given ``variants`` (whole runs, in order), the stack of
        just those variants."""
        if not self.groups:
            return h
        runs, modules = self.runs, self._run_modules
        if variants is not None:
            picked = [k for k, (a, b, _) in enumerate(runs) if a in variants]
            runs, modules = [runs[k] for k in picked], [modules[k] for k in picked]
            if [v for a, b, _ in runs for v in range(a, b)] != list(variants):
                raise ValueError(f"variants {variants} are not whole runs of {self.runs}")
            if all(m is None for m in modules):
                return h
        V, N, C = h.shape
        pieces = []
        # One split rather than a slice per run: its backward is a single concatenation,
        # where each slice's backward would write a full-size tensor of zeros.
        parts = (h,) if len(runs) == 1 else h.split([b - a for a, b, _ in runs])
        for (a, b, _), bn, part in zip(runs, modules, parts, strict=True):
            if bn is None:
                pieces.append(part)
            elif type(bn) in (BatchNorm, ExampleNormStack):
                # Our layers normalize the run's (V_run, N, C) slice where it lies.
                pieces.append(bn.forward_variants(part))
            else:
                # torch's BatchNorm1d and the noisy BN take (N, V_run * C) features.
                flat = part.permute(1, 0, 2).reshape(N, (b - a) * C)
                pieces.append(bn(flat).view(N, b - a, C).permute(1, 0, 2))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, 0)

    def running_stat_variants(self) -> list[int]:
        """The variants whose layers keep running statistics (BatchNorm's), whole runs."""
        return [
            v
            for index, bn in zip(self.group_index, self.groups, strict=True)
            if getattr(bn, "running_mean", None) is not None
            for v in index
        ]

    def stats(self, variant: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(running_mean, running_var) of one variant, or None if it has no BN here."""
        for index, bn in zip(self.group_index, self.groups, strict=True):
            if variant in index and getattr(bn, "running_mean", None) is not None:
                k = index.index(variant)
                sl = slice(k * self.width, (k + 1) * self.width)
                return bn.running_mean[sl], bn.running_var[sl]
        return None

    def affine(self, variant: int) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """(gamma, beta) of one variant, or None if it has no normalization here; beta is
        None for RMSNorm, which has none."""
        for index, bn in zip(self.group_index, self.groups, strict=True):
            if variant in index:
                k = index.index(variant)
                sl = slice(k * self.width, (k + 1) * self.width)
                no_beta = bn.bias is None or self.norm_of[variant] == "rmsnorm"
                return bn.weight[sl], None if no_beta else bn.bias[sl]
        return None


class LockstepMLP(nn.Module):
    """V MLPs of one shape, stacked: layer l's weights are one (V, in, out) tensor."""

    def __init__(self, config: RunConfig, input_dim: int, num_classes: int) -> None:
        super().__init__()
        specs = config.variants
        V, width = len(specs), config.width
        gen = torch.Generator().manual_seed(config.seed)
        self.activation = ACTIVATIONS[config.activation]
        self.placement = config.placement
        self.residual = config.residual
        self.layer_names = [f"layer{i + 1}" for i in range(config.depth)]
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        self.norms = nn.ModuleList()
        # 1 for the variants that keep their linear bias, 0 where the layer feeds BN directly:
        # BN subtracts the batch mean, so such a bias would have no effect (Ioffe & Szegedy,
        # section 3.2). It starts at 0 and the optimizer never moves it (``update_mask``),
        # which costs nothing per step, where multiplying it by this mask in every forward
        # pass cost 3.5 % of the default run's step.
        mask = torch.tensor([float(_bias_kept(s, config)) for s in specs]).view(V, 1, 1)
        self.register_buffer("bias_mask", mask, persistent=False)
        fan_in = input_dim
        noise = noise_settings(config)
        for layer in range(config.depth):
            # Every variant starts from the same weights: a fair side-by-side comparison.
            w = _init_weight(fan_in, width, config, gen)
            self.weights.append(nn.Parameter(w.expand(V, -1, -1).clone()))
            self.biases.append(nn.Parameter(torch.zeros(V, 1, width)))
            self.norms.append(
                _NormGroups(
                    specs,
                    width,
                    config.bn_momentum,
                    noise,
                    _noise_seed(config, layer),
                    config.groups,
                )
            )
            fan_in = width
        w = _init_weight(fan_in, num_classes, config, gen)
        self.out_weight = nn.Parameter(w.expand(V, -1, -1).clone())
        self.out_bias = nn.Parameter(torch.zeros(V, 1, num_classes))

    def forward(
        self, x: torch.Tensor, record: bool = False, variants: list[int] | None = None
    ) -> tuple[torch.Tensor, list[LayerRecord]]:
        """x: (N, d) shared by all variants; returns logits (V, N, classes) and records.

        ``variants`` restricts the pass to those variants, whole runs of a normalization
        layer (``running_stat_variants``): a measurement that needs only BN's layers then
        skips the others' work. Their logits and records come in that order."""
        weights, biases = self.weights, self.biases
        out_weight, out_bias = self.out_weight, self.out_bias
        if variants is not None:
            pick = torch.tensor(variants, device=x.device)
            weights, biases = [W[pick] for W in weights], [b[pick] for b in biases]
            out_weight, out_bias = out_weight[pick], out_bias[pick]
        V = out_weight.shape[0]
        h = x.unsqueeze(0).expand(V, -1, -1)
        records: list[LayerRecord] = []
        for i, (name, W, b, norm) in enumerate(
            zip(self.layer_names, weights, biases, self.norms, strict=True)
        ):
            if self.residual != "none" and i > 0:
                # A residual block, h + f(h), with f(h) = act(W h + b). The first layer maps
                # the input to the width and has no skip.
                if self.residual == "pre":
                    # Normalize the branch's input: h + act(W N(h) + b)
                    bn_input = h
                    preact = torch.baddbmm(b, norm(h, variants), W)
                    post = self.activation(preact)
                    h = h + post
                else:
                    # Normalize after the addition: N(h + act(W h + b))
                    preact = torch.baddbmm(b, h, W)
                    post = self.activation(preact)
                    bn_input = h + post
                    h = norm(bn_input, variants)
            else:
                z = torch.baddbmm(b, h, W)
                if self.placement == "before":
                    preact = norm(z, variants)
                    h = post = self.activation(preact)
                    bn_input = z
                else:
                    preact = z
                    post = self.activation(z)
                    h = norm(post, variants)
                    bn_input = post
            if record:
                records.append(LayerRecord(name, preact, post, bn_input, h))
        return torch.baddbmm(out_bias, h, out_weight), records

    @torch.no_grad()
    def layer_stacks(self) -> list[LayerStack]:
        out = []
        for W, b in zip(self.weights, self.biases, strict=True):
            bias_grad = torch.zeros_like(b) if b.grad is None else b.grad
            grad = torch.zeros_like(W) if W.grad is None else W.grad
            # A held bias never moves, so its gradient reads 0: through BN's full gradient it
            # is float rounding of sum_i dL/dx_i = 0, through the naive one a push never taken.
            held = self.bias_mask
            out.append(LayerStack(W, grad, (b * held)[:, 0], (bias_grad * held)[:, 0]))
        return out

    def layer_parameters(self, layer: int) -> list[nn.Parameter]:
        """Every parameter of hidden layer ``layer`` (0-based): weight, bias and its BN's."""
        return [self.weights[layer], self.biases[layer], *self.norms[layer].parameters()]

    def layer_weights(self, layer: int) -> list[nn.Parameter]:
        """The weight tensors of hidden layer ``layer``: one, stacked over variants."""
        return [self.weights[layer]]

    def variant_rows(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``layer_weights``-shaped tensors (or their gradients) as one row per variant."""
        return tensors[0].flatten(1)

    def running_stat_variants(self) -> list[int]:
        """The variants whose layers keep running statistics (BatchNorm's): whole runs, as
        every layer groups the variants alike."""
        return self.norms[0].running_stat_variants()

    def bn_running_stats(self, variant: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        return [norm.stats(variant) for norm in self.norms]

    def bias_vectors(self, variant: int) -> list[torch.Tensor]:
        """Each hidden layer's linear bias of one variant (zeros where BN dropped it)."""
        return [(b * self.bias_mask)[variant, 0] for b in self.biases]

    def bias_grads(self, variant: int) -> list[torch.Tensor | None]:
        """Each hidden layer's bias gradient of one variant (0 where BN dropped the bias)."""
        return [
            None if b.grad is None else (b.grad * self.bias_mask)[variant, 0] for b in self.biases
        ]

    def variant_index_of(self, param: torch.Tensor) -> torch.Tensor:
        """Which variant each element of a parameter belongs to (for per-variant lr)."""
        return _variant_index(self, param)

    def update_mask(self, param: torch.Tensor) -> torch.Tensor | None:
        """A 0/1 tensor that broadcasts against ``param``, 0 where the optimizer must hold
        it still (a bias BN drops); None when all of it moves."""
        if any(param is b for b in self.biases):
            return self.bias_mask
        return None

    def to_sequential(self, variant: int) -> nn.Sequential:
        """One variant as a plain torch Sequential of Linear/BN/activation (same numbers)."""
        if self.residual != "none":
            raise ValueError("a residual net is not a Sequential: its blocks add their input")
        layers: list[nn.Module] = []
        act = {torch.sigmoid: nn.Sigmoid, torch.tanh: nn.Tanh, torch.relu: nn.ReLU}
        for W, b, norm in zip(self.weights, self.biases, self.norms, strict=True):
            keep = bool(self.bias_mask[variant, 0, 0])
            lin = nn.Linear(W.shape[1], W.shape[2], bias=keep, device=W.device, dtype=W.dtype)
            with torch.no_grad():
                lin.weight.copy_(W[variant].T)
                if keep:
                    lin.bias.copy_(b[variant, 0])
            block: list[nn.Module] = [lin]
            bn = _extract_bn(norm, variant)
            act_mod = act[self.activation]()
            block += [bn, act_mod] if self.placement == "before" else [act_mod, bn]
            layers += [m for m in block if m is not None]
        W = self.out_weight
        out = nn.Linear(W.shape[1], W.shape[2], device=W.device, dtype=W.dtype)
        with torch.no_grad():
            out.weight.copy_(self.out_weight[variant].T)
            out.bias.copy_(self.out_bias[variant, 0])
        return nn.Sequential(*layers, out)


def _extract_bn(norm: _NormGroups, variant: int) -> nn.Module | None:
    """One variant's normalization layer of a lockstep layer, as a module of its own."""
    for index, bn in zip(norm.group_index, norm.groups, strict=True):
        if variant in index:
            kind = norm.norm_of[variant]
            single = make_norm(
                kind,
                norm.width,
                1,
                getattr(bn, "momentum", None),
                channel_groups=norm.channel_groups,
                noise=getattr(bn, "noise", None),
            )
            single = single.to(bn.weight.device, bn.weight.dtype)
            k = index.index(variant)
            sl = slice(k * norm.width, (k + 1) * norm.width)
            with torch.no_grad():
                single.weight.copy_(bn.weight[sl])
                if single.bias is not None:
                    single.bias.copy_(bn.bias[sl])
                if getattr(bn, "running_mean", None) is not None:
                    single.running_mean.copy_(bn.running_mean[sl])
                    single.running_var.copy_(bn.running_var[sl])
                    single.num_batches_tracked.copy_(bn.num_batches_tracked)
            return single
    return None


def _variant_index(model: nn.Module, param: torch.Tensor) -> torch.Tensor:
    for norm in model.modules():
        if isinstance(norm, _NormGroups):
            for index, bn in zip(norm.group_index, norm.groups, strict=True):
                if param is bn.weight or (bn.bias is not None and param is bn.bias):
                    return torch.tensor(index).repeat_interleave(norm.width)
    return torch.arange(param.shape[0]).view(-1, *([1] * (param.dim() - 1)))


class _LeNet(nn.Module):
    """conv(6,5)-N-act-pool, conv(16,5)-N-act-pool, fc120-N-act, fc84-N-act, fc10."""

    def __init__(
        self, spec: VariantSpec, config: RunConfig, side: int, num_classes: int, variant: int = 0
    ):
        super().__init__()
        # 28x28: conv1 pads by 2 (LeNet-5's 32x32 input), conv2 runs unpadded: 16*5*5 = 400.
        # 8x8 digits: both convolutions pad by 2 so the 5x5 kernels fit: 16*2*2 = 64.
        pad2 = 0 if side >= 20 else 2
        side2 = (side // 2 + 2 * pad2 - 4) // 2
        m = config.bn_momentum
        self.layer_names = ["conv1", "conv2", "fc1", "fc2"]
        self.linears = nn.ModuleList(
            [
                nn.Conv2d(1, 6, 5, padding=2),
                nn.Conv2d(6, 16, 5, padding=pad2),
                nn.Linear(16 * side2 * side2, 120),
                nn.Linear(120, 84),
            ]
        )
        # The run's init rule from the run's seed, so every variant starts from the same
        # weights whatever biases it keeps.
        gen = torch.Generator().manual_seed(config.seed)
        for layer in self.linears:
            w = _init_weight(layer.weight[0].numel(), layer.weight.shape[0], config, gen)
            with torch.no_grad():
                layer.weight.copy_(w.T.reshape(layer.weight.shape))
            if _bias_kept(spec, config):
                nn.init.zeros_(layer.bias)
            else:
                layer.register_parameter("bias", None)
        noise = noise_settings(config)
        self.norms = nn.ModuleList(
            [
                make_norm(
                    spec.norm,
                    features,
                    dims,
                    m,
                    channel_groups=config.groups,
                    noise=noise,
                    seed=_noise_seed(config, layer, variant),
                )
                or nn.Identity()
                for layer, (features, dims) in enumerate(((6, 2), (16, 2), (120, 1), (84, 1)))
            ]
        )
        self.head = nn.Linear(84, num_classes)
        with torch.no_grad():
            self.head.weight.copy_(_init_weight(84, num_classes, config, gen).T)
            self.head.bias.zero_()
        self.activation = ACTIVATIONS[config.activation]
        self.placement = config.placement
        self.side = side

    def forward(self, x: torch.Tensor, record: bool):
        h = x.view(-1, 1, self.side, self.side)
        records = []
        for i, (name, lin, norm) in enumerate(
            zip(self.layer_names, self.linears, self.norms, strict=True)
        ):
            if i == 2:
                h = h.flatten(1)
            z = lin(h)
            if self.placement == "before":
                preact = norm(z)
                post = out = self.activation(preact)
                bn_input = z
            else:
                preact = z
                post = self.activation(z)
                out = norm(post)
                bn_input = post
            h = F.max_pool2d(out, 2) if i < 2 else out
            if record:
                records.append((name, preact, post, bn_input, out))
        return self.head(h), records


class LockstepLeNet(nn.Module):
    """One LeNet-style conv net per variant, all started from the same weights."""

    def __init__(self, config: RunConfig, side: int, num_classes: int) -> None:
        super().__init__()
        nets = [
            _LeNet(spec, config, side, num_classes, v) for v, spec in enumerate(config.variants)
        ]
        self.nets = nn.ModuleList(nets)
        self.layer_names = nets[0].layer_names

    def forward(self, x: torch.Tensor, record: bool = False, variants: list[int] | None = None):
        """Logits (V, N, classes) and records of every variant's net, or of ``variants``'."""
        nets = self.nets if variants is None else [self.nets[v] for v in variants]
        outs, recs = zip(*(net(x, record) for net in nets), strict=True)
        records = []
        if record:
            for k, name in enumerate(self.layer_names):
                cols = [torch.stack([r[k][j] for r in recs]) for j in range(1, 5)]
                records.append(LayerRecord(name, *cols))
        return torch.stack(outs), records

    @torch.no_grad()
    def layer_stacks(self) -> list[LayerStack]:
        def stacked(values: list[torch.Tensor | None], like: list[torch.Tensor]) -> torch.Tensor:
            return torch.stack(
                [torch.zeros_like(x) if v is None else v for v, x in zip(values, like, strict=True)]
            )

        out = []
        for k in range(len(self.layer_names)):
            layers = [net.linears[k] for net in self.nets]
            weights = [m.weight for m in layers]
            zeros = [torch.zeros(m.weight.shape[0], device=m.weight.device) for m in layers]
            biases = [m.bias for m in layers]
            out.append(
                LayerStack(
                    torch.stack(weights),
                    stacked([m.weight.grad for m in layers], weights),
                    stacked(biases, zeros),
                    stacked([None if b is None else b.grad for b in biases], zeros),
                )
            )
        return out

    def layer_parameters(self, layer: int) -> list[nn.Parameter]:
        """Every parameter of hidden layer ``layer`` (0-based) in every variant's net."""
        out: list[nn.Parameter] = []
        for net in self.nets:
            out += [*net.linears[layer].parameters(), *net.norms[layer].parameters()]
        return out

    def layer_weights(self, layer: int) -> list[nn.Parameter]:
        """The weight tensors of hidden layer ``layer``: one per variant."""
        return [net.linears[layer].weight for net in self.nets]

    def variant_rows(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """``layer_weights``-shaped tensors (or their gradients) as one row per variant."""
        return torch.stack([t.flatten() for t in tensors])

    def running_stat_variants(self) -> list[int]:
        """The variants whose nets keep running statistics (BatchNorm's)."""
        return [
            v
            for v, net in enumerate(self.nets)
            if any(getattr(n, "running_mean", None) is not None for n in net.norms)
        ]

    def bn_running_stats(self, variant: int) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        return [
            (n.running_mean, n.running_var)
            if getattr(n, "running_mean", None) is not None
            else None
            for n in self.nets[variant].norms
        ]

    def bias_vectors(self, variant: int) -> list[torch.Tensor]:
        out = []
        for m in self.nets[variant].linears:
            out.append(m.bias.detach() if m.bias is not None else torch.zeros(m.weight.shape[0]))
        return out

    def bias_grads(self, variant: int) -> list[torch.Tensor | None]:
        return [None if m.bias is None else m.bias.grad for m in self.nets[variant].linears]

    def variant_index_of(self, param: torch.Tensor) -> torch.Tensor:
        for v, net in enumerate(self.nets):
            if any(param is p for p in net.parameters()):
                return torch.full((1,) * param.dim(), v)
        raise KeyError("parameter not in this model")

    def update_mask(self, param: torch.Tensor) -> torch.Tensor | None:
        """None: each net builds its layers without the biases BN would drop."""
        return None


@contextmanager
def preserved_state(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Run extra passes through ``model`` and leave it exactly as it was.

    Restores the values of ``params``, every buffer (BN running statistics and counters)
    and the noise generators of noisy BN layers, bit for bit.
    """
    values = [p.detach().clone() for p in params]
    buffers = list(model.buffers())
    saved = [b.clone() for b in buffers]
    noise = noise_states(model)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, values, strict=True):
                p.copy_(v)
            for b, v in zip(buffers, saved, strict=True):
                b.copy_(v)
        if noise:  # a model with noisy BN layers
            set_noise_states(model, noise)


@contextmanager
def batch_statistics_pass(model: nn.Module) -> Iterator[None]:
    """Extra train-mode passes that normalize with their own batch's statistics and leave
    the running averages, their counters and the noise generators of noisy BN untouched.

    Cheaper than ``preserved_state`` for a measurement pass: BN layers simply stop tracking
    for its duration (in training mode they then neither read nor update their buffers),
    so no buffer is copied and restored.
    """
    layers = [m for m in model.modules() if getattr(m, "running_mean", None) is not None]
    tracking = [m.track_running_stats for m in layers]
    noise = noise_states(model)
    for m in layers:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, tracked in zip(layers, tracking, strict=True):
            m.track_running_stats = tracked
        if noise:
            set_noise_states(model, noise)


def build_model(
    config: RunConfig, input_dim: int, num_classes: int, image_shape: tuple[int, int] | None
) -> LockstepMLP | LockstepLeNet:
    """The lockstep model of a run, on the CPU (the trainer moves it)."""
    if config.model == "lenet":
        if image_shape is None or image_shape[0] != image_shape[1]:
            raise ValueError(f"model = 'lenet' needs square images, got {image_shape}")
        return LockstepLeNet(config, image_shape[0], num_classes)
    return LockstepMLP(config, input_dim, num_classes)


def variant_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each variant's mean cross-entropy on the batch: (V, N, classes) logits -> (V,).

    Variants never share a parameter, so the gradient of the sum is each variant's own.
    """
    V, N, K = logits.shape
    targets = y.expand(V, N).reshape(V * N)  # cheaper than y.repeat(V) for the same values
    return F.cross_entropy(logits.reshape(V * N, K), targets, reduction="none").view(V, N).mean(1)
