"""Inside a BatchNorm layer: its stages, its running statistics and its invariances, as numbers.

Every measurement goes through our own layer (``bn_core.batch_norm_train`` or
``bn_core.BatchNorm``), so what a page shows is what the layer computes; closed forms sit
next to the measurements as references. Nothing here draws.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from bn_core.batchnorm import BatchNorm, batch_norm_train
from bn_core.config import RunConfig, load_preset
from bn_core.data import Dataset, load_dataset
from bn_core.experiments import make_trainer
from bn_core.history import History
from bn_core.models import preserved_state
from bn_core.train import Trainer

__all__ = [
    "BatchSizeNoise",
    "MomentumConventions",
    "ScaleInvariance",
    "Stages",
    "TrainEvalGap",
    "batch_size_noise",
    "expected_running_mean",
    "identity_error",
    "identity_params",
    "layer_batch",
    "momentum_conventions",
    "placement_runs",
    "scale_invariance",
    "single_example_error",
    "stages",
    "synthetic_batch",
    "train_eval_gap",
]


# --- the four stages of one channel --------------------------------------------------------
@dataclass(frozen=True)
class Stages:
    """One channel through BN: x -> (mu_B, var_B) -> x_hat -> y = gamma * x_hat + beta."""

    x: np.ndarray  # (N,) the input
    # mu_B, var_B, std_B: the paper's subscript-B names for batch statistics.
    mu_B: float  # noqa: N815 - batch mean
    var_B: float  # noqa: N815 - biased batch variance, the one BN normalizes with
    x_hat: np.ndarray  # (N,) (x - mu_B) / sqrt(var_B + eps)
    y: np.ndarray  # (N,) gamma * x_hat + beta
    gamma: float
    beta: float
    eps: float

    @property
    def std_B(self) -> float:  # noqa: N802
        """sqrt(var_B + eps): the divisor actually used."""
        return math.sqrt(self.var_B + self.eps)

    @property
    def output_change(self) -> float:
        """max_i |y_i - x_i|: 0 up to rounding exactly when the layer acts as the identity."""
        return float(np.max(np.abs(self.y - self.x)))


def _as_column(x: torch.Tensor | Sequence[float] | np.ndarray) -> torch.Tensor:
    """A 1-D batch as an (N, 1) tensor: N examples of one channel; float64 unless given."""
    t = torch.as_tensor(x)
    if not t.is_floating_point():
        t = t.to(torch.float64)
    if t.dim() != 1:
        raise ValueError(f"x has shape {tuple(t.shape)}: expected a 1-D batch (N,)")
    return t.reshape(-1, 1)


def _param(value: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(value, dtype=like.dtype).reshape(1)


def stages(
    x: torch.Tensor | np.ndarray, gamma: float = 1.0, beta: float = 0.0, eps: float = 1e-5
) -> Stages:
    """Run one channel of N values through our BN in training mode and keep every stage."""
    col = _as_column(x)
    with torch.no_grad():
        # gamma = beta = None makes the layer return x_hat itself.
        x_hat, _, _ = batch_norm_train(col, None, None, eps)
        y, mu, var = batch_norm_train(col, _param(gamma, col), _param(beta, col), eps)
    return Stages(
        x=col[:, 0].numpy().copy(),
        mu_B=float(mu[0]),
        var_B=float(var[0]),
        x_hat=x_hat[:, 0].numpy().copy(),
        y=y[:, 0].numpy().copy(),
        gamma=float(gamma),
        beta=float(beta),
        eps=float(eps),
    )


def identity_params(x: torch.Tensor | np.ndarray, eps: float = 1e-5) -> tuple[float, float]:
    """(gamma, beta) = (sqrt(var_B + eps), mu_B): the affine step that undoes normalization."""
    s = stages(x, eps=eps)
    return s.std_B, s.mu_B


def identity_error(x: torch.Tensor | np.ndarray, eps: float = 1e-5) -> float:
    """max |y - x| when BN runs with identity_params: rounding only (about 1e-15 * |x|)."""
    gamma, beta = identity_params(x, eps)
    s = stages(x, gamma, beta, eps)
    return float(np.max(np.abs(s.y - s.x)))


def synthetic_batch(n: int, mean: float = 0.0, std: float = 1.0, seed: int = 0) -> torch.Tensor:
    """n float64 draws from N(mean, std^2), the same for the same seed."""
    gen = torch.Generator().manual_seed(seed)
    return mean + std * torch.randn(n, generator=gen, dtype=torch.float64)


def layer_batch(trainer: Trainer, layer: str, unit: int, variant: str | None = None) -> np.ndarray:
    """What one BN unit of a run normalizes on the run's fixed probe batch, as float64.

    ``variant`` defaults to the run's first BN variant (else its first). A conv layer's
    unit is a channel, so its values are taken over examples and positions, as BN does.
    The pass runs in training mode like the Trainer's own probe; the BN buffers (running
    statistics, batch counts) and the model's mode are restored, so training is untouched.
    """
    model = trainer.model
    names = trainer.variant_names
    if variant is None:
        bn_variants = [s.name for s in trainer.config.variants if s.uses_bn]
        variant = (bn_variants or names)[0]
    if variant not in names:
        raise ValueError(f"variant = {variant!r}: allowed: " + ", ".join(names))
    if layer not in model.layer_names:
        raise ValueError(f"layer = {layer!r}: allowed: " + ", ".join(model.layer_names))
    was_training = model.training
    try:
        model.train()
        # Buffers and noisy BN's generators come back as they were: viewing a layer
        # never changes the run.
        with torch.no_grad(), preserved_state(model, []):
            _, records = model(trainer.x_probe, record=True)
    finally:
        model.train(was_training)
    record = records[list(model.layer_names).index(layer)]
    values = record.bn_input[names.index(variant)]  # (N, C[, H, W])
    channels = values.shape[1]
    if not 0 <= unit < channels:
        raise ValueError(f"unit = {unit}: allowed: an integer in [0, {channels - 1}]")
    return values[:, unit].reshape(-1).to(torch.float64).cpu().numpy()


# --- running statistics ----------------------------------------------------------------------
@dataclass(frozen=True)
class TrainEvalGap:
    """Per momentum (rows) and step (columns, 0 = before any batch): how eval mode catches up."""

    momenta: np.ndarray  # (M,)
    steps: np.ndarray  # (k+1,)
    gap: np.ndarray  # (M, k+1) mean |train-mode output - eval-mode output| on the probe
    running_mean: np.ndarray  # (M, k+1)
    running_var: np.ndarray  # (M, k+1)
    mean_error: np.ndarray  # (M, k+1) |running_mean - population mean|
    var_error: np.ndarray  # (M, k+1) |running_var - population variance|
    population_mean: float
    population_var: float
    probe_mean: float  # the probe batch's own statistics, which train mode uses
    probe_var: float
    gap_at_population: float  # the gap if the running stats equalled the population exactly
    batch_means: np.ndarray  # (k,) mu_B of the batches fed, in order
    batch_vars: np.ndarray  # (k,) unbiased variances of those batches (what running_var takes)


def _gap(probe: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, eps: float) -> float:
    """mean |BN with the probe's own statistics - BN with (mean, var)| on the probe."""
    train_out, _, _ = batch_norm_train(probe, None, None, eps)
    eval_out = (probe - mean) / torch.sqrt(var + eps)
    return float((train_out - eval_out).abs().mean())


def train_eval_gap(
    momenta: Sequence[float] = (0.01, 0.1, 0.5),
    steps: int = 200,
    batch: int = 32,
    seed: int = 0,
    population_mean: float = 2.0,
    population_std: float = 3.0,
    probe_size: int = 256,
    eps: float = 1e-5,
) -> TrainEvalGap:
    """Feed the same batches from N(mean, std^2) to one BN per momentum and watch eval mode."""
    gen = torch.Generator().manual_seed(seed)
    batches = population_mean + population_std * torch.randn(
        steps, batch, 1, generator=gen, dtype=torch.float64
    )
    probe = population_mean + population_std * torch.randn(
        probe_size, 1, generator=gen, dtype=torch.float64
    )
    M = len(momenta)
    gap = np.zeros((M, steps + 1))
    r_mean = np.zeros((M, steps + 1))
    r_var = np.zeros((M, steps + 1))
    for i, m in enumerate(momenta):
        bn = BatchNorm(1, eps=eps, momentum=m, dtype=torch.float64)
        with torch.no_grad():
            for k in range(steps + 1):
                if k:
                    bn.train()
                    bn(batches[k - 1])  # only to update the running statistics
                bn.eval()
                # Train-mode output from the functional form, so the probe never touches
                # the buffers; gamma = 1 and beta = 0 throughout (nothing is trained).
                train_out, _, _ = batch_norm_train(probe, bn.weight, bn.bias, eps)
                gap[i, k] = float((train_out - bn(probe)).abs().mean())
                r_mean[i, k] = float(bn.running_mean[0])
                r_var[i, k] = float(bn.running_var[0])
    pop_var = population_std**2
    pop_m = torch.tensor(population_mean, dtype=torch.float64)
    pop_v = torch.tensor(pop_var, dtype=torch.float64)
    return TrainEvalGap(
        momenta=np.asarray(momenta, dtype=np.float64),
        steps=np.arange(steps + 1),
        gap=gap,
        running_mean=r_mean,
        running_var=r_var,
        mean_error=np.abs(r_mean - population_mean),
        var_error=np.abs(r_var - pop_var),
        population_mean=float(population_mean),
        population_var=float(pop_var),
        probe_mean=float(probe.mean()),
        probe_var=float(probe.var(unbiased=False)),
        gap_at_population=_gap(probe, pop_m, pop_v, eps),
        batch_means=batches[:, :, 0].mean(1).numpy(),
        batch_vars=batches[:, :, 0].var(1, unbiased=True).numpy(),
    )


def expected_running_mean(
    m: float, k: int, batch_means: Sequence[float] | np.ndarray, init: float = 0.0
) -> float:
    """r_k = (1-m)^k r_0 + sum_{j=1..k} m (1-m)^(k-j) mu_j, PyTorch's update unrolled.

    The same formula gives the running variance with the unbiased batch variances
    s_j^2 = n / (n - 1) * var_j in place of mu_j and r_0 = 1.
    """
    values = np.asarray(batch_means, dtype=np.float64)[:k]
    if len(values) < k:
        raise ValueError(f"k = {k}: only {len(values)} batch statistics given")
    j = np.arange(1, k + 1)
    weights = m * (1.0 - m) ** (k - j)
    return float((1.0 - m) ** k * init + np.dot(weights, values))


@dataclass(frozen=True)
class MomentumConventions:
    """Running means (index 0 = init) under three update rules, and how noisy each ends up."""

    torch: np.ndarray  # r = (1 - m) r + m b
    keras: np.ndarray  # r = m_k r + (1 - m_k) b, m_k = 1 - m
    mistaken: np.ndarray  # PyTorch's rule with the Keras number: r = 0.1 r + 0.9 b
    torch_noise: float  # std over the last half of the sequence
    keras_noise: float
    mistaken_noise: float
    batch_noise: float  # std over the last half of the batch means themselves
    m_torch: float
    m_keras: float

    @property
    def largest_gap(self) -> float:
        """max over steps of |PyTorch's running mean - Keras'|: 0 to rounding when the two
        conventions are given matching numbers."""
        return float(np.max(np.abs(self.torch - self.keras)))


def _last_half_std(seq: np.ndarray) -> float:
    return float(np.std(seq[len(seq) // 2 :]))


def momentum_conventions(
    batch_means: Sequence[float] | np.ndarray, m_torch: float = 0.1, init: float = 0.0
) -> MomentumConventions:
    """Run the three update rules over the same batch means."""
    b = np.asarray(batch_means, dtype=np.float64)
    m_keras = 1.0 - m_torch
    seqs = {"torch": [init], "keras": [init], "mistaken": [init]}
    for value in b:
        seqs["torch"].append((1.0 - m_torch) * seqs["torch"][-1] + m_torch * value)
        seqs["keras"].append(m_keras * seqs["keras"][-1] + (1.0 - m_keras) * value)
        # The Keras value m_k plugged into PyTorch's formula: the new batch gets weight m_k.
        seqs["mistaken"].append((1.0 - m_keras) * seqs["mistaken"][-1] + m_keras * value)
    arrays = {k: np.array(v) for k, v in seqs.items()}
    return MomentumConventions(
        torch=arrays["torch"],
        keras=arrays["keras"],
        mistaken=arrays["mistaken"],
        torch_noise=_last_half_std(arrays["torch"]),
        keras_noise=_last_half_std(arrays["keras"]),
        mistaken_noise=_last_half_std(arrays["mistaken"]),
        batch_noise=_last_half_std(b),
        m_torch=float(m_torch),
        m_keras=float(m_keras),
    )


# --- batch size ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BatchSizeNoise:
    """Spread of the batch statistics across independent batches, per batch size."""

    batch_sizes: np.ndarray  # (S,)
    mean_std: np.ndarray  # (S,) std of mu_B over trials
    var_std: np.ndarray  # (S,) std of the biased var_B over trials
    var_mean: np.ndarray  # (S,) average var_B: biased low by the factor (n-1)/n
    mean_std_theory: np.ndarray  # sigma / sqrt(n)
    var_std_theory: np.ndarray  # sigma^2 sqrt(2 (n-1)) / n, for normal data
    var_mean_theory: np.ndarray  # sigma^2 (n-1) / n
    trials: int
    population_std: float


def batch_size_noise(
    batch_sizes: Sequence[int] = (2, 4, 8, 16, 32, 64, 128),
    trials: int = 200,
    seed: int = 0,
    population_mean: float = 0.0,
    population_std: float = 1.0,
) -> BatchSizeNoise:
    """mu_B and var_B of ``trials`` independent normal batches per size, from our layer."""
    gen = torch.Generator().manual_seed(seed)
    mean_std, var_std, var_mean = [], [], []
    for n in batch_sizes:
        if n < 2:
            raise ValueError(f"batch size {n}: BN needs at least 2 values per channel")
        # Trials as channels: an (n, trials) input gives one (mu_B, var_B) per trial.
        x = population_mean + population_std * torch.randn(
            n, trials, generator=gen, dtype=torch.float64
        )
        with torch.no_grad():
            _, mu, var = batch_norm_train(x, None, None)
        mean_std.append(float(mu.std(unbiased=True)))
        var_std.append(float(var.std(unbiased=True)))
        var_mean.append(float(var.mean()))
    sizes = np.asarray(batch_sizes, dtype=np.float64)
    s2 = population_std**2
    return BatchSizeNoise(
        batch_sizes=np.asarray(batch_sizes, dtype=np.int64),
        mean_std=np.array(mean_std),
        var_std=np.array(var_std),
        var_mean=np.array(var_mean),
        mean_std_theory=population_std / np.sqrt(sizes),
        var_std_theory=s2 * np.sqrt(2.0 * (sizes - 1.0)) / sizes,
        var_mean_theory=s2 * (sizes - 1.0) / sizes,
        trials=int(trials),
        population_std=float(population_std),
    )


def single_example_error() -> str:
    """The message our BatchNorm gives for a training batch of one example."""
    bn = BatchNorm(1)
    bn.train()
    try:
        bn(torch.zeros(1, 1))
    except ValueError as err:
        return str(err)
    raise AssertionError("BatchNorm accepted a training batch of one example")


# --- scale invariance ------------------------------------------------------------------------
@dataclass(frozen=True)
class ScaleInvariance:
    """BN((aW)u) against BN(Wu), and dL/dW at aW against at W, per a."""

    a: np.ndarray  # (A,)
    max_change: np.ndarray  # max |BN_eps((aW)u) - BN_eps(Wu)|, eps fixed
    max_change_scaled_eps: np.ndarray  # same with eps * a^2 at aW: exact up to rounding
    grad_ratio: np.ndarray  # ||dL/dW at aW|| / ||dL/dW at W||, eps fixed
    grad_ratio_scaled_eps: np.ndarray  # the same with eps * a^2
    expected_ratio: np.ndarray  # 1 / a
    eps: float
    min_var: float  # smallest per-channel var_B of Wu, to set eps against


def _bn_loss_grad(
    W: torch.Tensor, u: torch.Tensor, target: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(BN(u W^T), dL/dW) for L = 0.5 ||BN(u W^T) - target||^2, gradient through the stats."""
    W = W.detach().clone().requires_grad_(True)
    y, _, _ = batch_norm_train(u @ W.T, None, None, eps)
    loss = 0.5 * (y - target).square().sum()
    (grad,) = torch.autograd.grad(loss, W)
    return y.detach(), grad


def scale_invariance(
    a_values: Sequence[float] = (1e-3, 1e-2, 0.1, 0.5, 2.0, 10.0, 100.0),
    seed: int = 0,
    eps: float = 1e-5,
    n: int = 64,
    d_in: int = 20,
    d_out: int = 10,
) -> ScaleInvariance:
    """Scale W by a: BN's output is unchanged and its weight gradient shrinks by 1/a.

    With eps, BN_eps(a z) = (z - mu) / sqrt(var + eps / a^2) = BN_{eps/a^2}(z), so the
    invariance is exact only when eps is scaled with a^2 as well; with eps fixed it fails
    once a^2 var is no longer large against eps. Both versions are returned.
    """
    gen = torch.Generator().manual_seed(seed)
    dt = torch.float64
    W = torch.randn(d_out, d_in, generator=gen, dtype=dt) / math.sqrt(d_in)
    u = torch.randn(n, d_in, generator=gen, dtype=dt)
    target = torch.randn(n, d_out, generator=gen, dtype=dt)
    y1, g1 = _bn_loss_grad(W, u, target, eps)
    g1_norm = float(g1.norm())
    change, change_s, ratio, ratio_s = [], [], [], []
    for a in a_values:
        for scaled, changes, ratios in ((False, change, ratio), (True, change_s, ratio_s)):
            ya, ga = _bn_loss_grad(a * W, u, target, eps * a * a if scaled else eps)
            changes.append(float((ya - y1).abs().max()))
            ratios.append(float(ga.norm()) / g1_norm)
    with torch.no_grad():
        min_var = float((u @ W.T).var(0, unbiased=False).min())
    a_arr = np.asarray(a_values, dtype=np.float64)
    return ScaleInvariance(
        a=a_arr,
        max_change=np.array(change),
        max_change_scaled_eps=np.array(change_s),
        grad_ratio=np.array(ratio),
        grad_ratio_scaled_eps=np.array(ratio_s),
        expected_ratio=1.0 / a_arr,
        eps=float(eps),
        min_var=min_var,
    )


# --- placement -------------------------------------------------------------------------------
def placement_runs(
    steps: int = 300, config: RunConfig | None = None, dataset: Dataset | None = None
) -> dict[str, History]:
    """BN before vs after the sigmoid, same seed and batches: {placement: History}.

    The default is the ``placement`` preset (digits, 3 x 100 sigmoid MLP) with the one
    variant "batchnorm"; a given ``config`` keeps its own variants.
    """
    base = config or load_preset("placement").replace(variants=["batchnorm"])
    if dataset is None:
        dataset = load_dataset(
            base.dataset, seed=base.seed, noise=base.noise, probe_size=base.probe_size
        )
    out = {}
    for placement in ("before", "after"):
        trainer = make_trainer(base.replace(placement=placement, steps=steps), dataset)
        trainer.advance(steps=steps)
        out[placement] = trainer.history
    return out
