"""The bias blow-up of Ioffe & Szegedy section 2, as numbers.

Two settings:

* ``run_blowup``: the paper's minimal model. One fixed batch u of n scalars, one scalar
  bias b, x = u + b and x_hat = x - mean(x) (optionally also divided by the batch std).
  The normalization removes b entirely, so no value of b can change the loss. A gradient
  that treats the batch statistics as constants still sees a non-zero dL/db, and because
  the output never changes, the same gradient returns every step: b drifts linearly
  while the loss stays where it was. The gradient taken through the statistics is 0.
* ``network_blowup``: the ``bias-blowup`` preset, a sigmoid MLP that keeps the linear
  biases in front of BN, trained by the lockstep Trainer with the correct ("batchnorm")
  and the naive ("batchnorm-naive") gradient side by side.

Everything here returns arrays, dataclasses or a History; nothing draws.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import torch

from bn_core.config import RunConfig, load_preset
from bn_core.data import Dataset
from bn_core.experiments import make_trainer
from bn_core.train import Trainer

__all__ = [
    "BlowupResult",
    "BlowupSummary",
    "NetworkBlowup",
    "blowup_summary",
    "network_blowup",
    "run_blowup",
    "run_blowup_frame",
]

FRAME_COLUMNS = ["step", "variant", "layer", "metric", "value"]


@dataclass(frozen=True)
class BlowupResult:
    """Both runs of the minimal model: naive (statistics held constant) and aware."""

    steps: np.ndarray  # (k+1,) 0..k
    bias_naive: np.ndarray  # (k+1,) b before step 0, after step 1, ...
    bias_aware: np.ndarray  # (k+1,)
    loss_naive: np.ndarray  # (k+1,) the loss at that bias
    loss_aware: np.ndarray  # (k+1,)
    grad_naive: np.ndarray  # (k+1,) dL/db as the naive backward measures it at that bias
    grad_aware: np.ndarray  # (k+1,) dL/db through the statistics, measured by autograd
    g: float  # the naive gradient at step 0; it is the same at every step
    g_closed_form: float  # -n * c / s with s = 1 (centering) or sqrt(var(u) + eps) (scaling)
    predicted_slope: float  # -lr * g: b_k = b0 + k * predicted_slope
    x_hat_max_change: float  # max over steps and both runs of |x_hat_k - x_hat_0|
    x_hat_tolerance: float  # what rounding of u + b alone can explain
    u: np.ndarray  # (n,) the fixed batch
    target: np.ndarray  # (n,) the fixed, unreachable target
    x_hat: np.ndarray  # (n,) the normalized batch at step 0
    lr: float
    scale: bool
    b0: float
    eps: float
    offset: float  # c, the mean of the target

    @property
    def loss_change_naive(self) -> np.ndarray:
        """L_k - L_0 of the naive run: rounding only, since x_hat never changes."""
        return self.loss_naive - self.loss_naive[0]

    @property
    def loss_change_aware(self) -> np.ndarray:
        return self.loss_aware - self.loss_aware[0]

    @property
    def x_hat_unchanged(self) -> bool:
        """True when x_hat moved by no more than rounding over the whole run."""
        return self.x_hat_max_change <= self.x_hat_tolerance

    def predicted_bias(self, k: int | np.ndarray) -> float | np.ndarray:
        """b0 + k * predicted_slope: where the naive bias should be after k steps."""
        return self.b0 + np.asarray(k) * self.predicted_slope

    def to_frame(self) -> pd.DataFrame:
        """Tidy rows step, variant (naive/aware), layer "", metric (bias/loss), value."""
        frames = []
        for variant, series in (
            ("naive", {"bias": self.bias_naive, "loss": self.loss_naive}),
            ("aware", {"bias": self.bias_aware, "loss": self.loss_aware}),
        ):
            for metric, values in series.items():
                columns = {
                    "step": self.steps.astype(np.int64),
                    "variant": variant,
                    "layer": "",
                    "metric": metric,
                    "value": values.astype(np.float64),
                }
                frames.append(pd.DataFrame(columns, columns=FRAME_COLUMNS))
        return pd.concat(frames, ignore_index=True)


def _normalize(x: torch.Tensor, scale: bool, eps: float, detach_stats: bool) -> torch.Tensor:
    """x - mean(x), or (x - mean) / sqrt(var + eps); detached statistics give the naive grad."""
    mu = x.mean()
    if detach_stats:
        mu = mu.detach()
    centered = x - mu
    if not scale:
        return centered
    # Biased variance from centered values, as the BN layer computes it. var does not depend
    # on b at all (a shift leaves it alone), so detaching it changes no number here: under
    # scaling the naive step is still the detached mean's, now multiplied by 1 / sqrt(var + eps).
    var = (x - x.mean()).square().mean()
    if detach_stats:
        var = var.detach()
    return centered / torch.sqrt(var + eps)


def _step_values(
    u: torch.Tensor, b: float, target: torch.Tensor, scale: bool, eps: float, naive: bool
) -> tuple[float, float, torch.Tensor]:
    """(loss, dL/db, x_hat) at bias b, the gradient measured by autograd."""
    bias = torch.tensor(b, dtype=u.dtype, requires_grad=True)
    x_hat = _normalize(u + bias, scale, eps, detach_stats=naive)
    loss = 0.5 * (x_hat - target).square().sum()
    loss.backward()
    return loss.item(), bias.grad.item(), x_hat.detach()


def run_blowup(
    steps: int = 200,
    lr: float = 0.1,
    scale: bool = False,
    seed: int = 0,
    n: int = 32,
    b0: float = 0.0,
    dtype: torch.dtype = torch.float64,
    offset: float = 1.0,
    eps: float = 1e-5,
) -> BlowupResult:
    """Gradient descent on the bias of the minimal model, naive and aware side by side."""
    if steps < 0 or n < 2:
        raise ValueError(f"steps = {steps}, n = {n}: need steps >= 0 and n >= 2")
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(n, generator=gen, dtype=dtype)
    # The target is what normalization gives at b = 0, shifted by a constant c = offset.
    # Normalized values always have mean 0, while the target has mean c, so no bias can
    # reach it: the residual x_hat - t = -c never vanishes, and so neither does the naive
    # gradient sum_i dL/dx_hat_i = -n c (divided by the batch std when scaling).
    with torch.no_grad():
        target = _normalize(u, scale, eps, detach_stats=False) + offset
    runs = {}
    for naive in (True, False):
        b = float(b0)
        bias, loss, grad, x_hats = [], [], [], []
        for k in range(steps + 1):
            value, db, x_hat = _step_values(u, b, target, scale, eps, naive)
            bias.append(b)
            loss.append(value)
            grad.append(db)
            x_hats.append(x_hat)
            if k < steps:
                b = b - lr * db  # plain SGD on b
        runs[naive] = (bias, loss, grad, torch.stack(x_hats))
    x_hat0 = runs[True][3][0]
    change = max(float((r[3] - x_hat0).abs().max()) for r in runs.values())
    # u + b rounds to the ulp of |u + b|; the mean and the division add a few more ulps.
    finfo = torch.finfo(dtype)
    biggest = max(float(np.max(np.abs(r[0]))) for r in runs.values()) + float(u.abs().max())
    inv_std = 1.0 / math.sqrt(float(u.var(unbiased=False)) + eps) if scale else 1.0
    tolerance = 8 * finfo.eps * max(biggest, 1.0) * inv_std
    g = runs[True][2][0]
    return BlowupResult(
        steps=np.arange(steps + 1),
        bias_naive=np.array(runs[True][0]),
        bias_aware=np.array(runs[False][0]),
        loss_naive=np.array(runs[True][1]),
        loss_aware=np.array(runs[False][1]),
        grad_naive=np.array(runs[True][2]),
        grad_aware=np.array(runs[False][2]),
        g=g,
        g_closed_form=-n * offset * inv_std,
        predicted_slope=-lr * g,
        x_hat_max_change=change,
        x_hat_tolerance=tolerance,
        u=u.numpy().copy(),
        target=target.numpy().copy(),
        x_hat=x_hat0.numpy().copy(),
        lr=float(lr),
        scale=bool(scale),
        b0=float(b0),
        eps=float(eps),
        offset=float(offset),
    )


def run_blowup_frame(**kwargs: Any) -> pd.DataFrame:
    """``run_blowup(**kwargs)`` as the CLI's tidy table (see ``BlowupResult.to_frame``)."""
    return run_blowup(**kwargs).to_frame()


@dataclass(frozen=True)
class BlowupSummary:
    """The numbers a page shows next to the minimal model's charts."""

    measured_slope: float  # (b_K - b_0) / K of the naive run
    predicted_slope: float  # lr * |sum_i dL/dx_hat_i| (divided by s when scaling): lr n c / s
    aware_drift: float  # max_k |b_k - b_0| of the aware run
    loss_change: float  # max_k |L_k - L_0| over both runs
    grad_sum: float  # |sum_i dL/dx_hat_i| = n c
    divisor: float  # s: 1 when centering only, sqrt(var(u) + eps) when also scaling
    batch_std: float  # sqrt(var(u) + eps), biased variance as BN takes it, in either mode


def blowup_summary(result: BlowupResult) -> BlowupSummary:
    """Measured against predicted slope, and how still the aware bias and the loss stay."""
    k = int(result.steps[-1])
    measured = (result.bias_naive[-1] - result.bias_naive[0]) / k if k else math.nan
    loss_change = max(
        float(np.max(np.abs(change)))
        for change in (result.loss_change_naive, result.loss_change_aware)
    )
    return BlowupSummary(
        measured_slope=float(measured),
        predicted_slope=result.lr * abs(result.g_closed_form),
        aware_drift=float(np.max(np.abs(result.bias_aware - result.b0))),
        loss_change=loss_change,
        grad_sum=len(result.u) * abs(result.offset),
        divisor=len(result.u) * abs(result.offset) / abs(result.g_closed_form),
        batch_std=math.sqrt(float(np.var(result.u)) + result.eps),
    )


@dataclass
class NetworkBlowup:
    """A finished bias-blowup Trainer and its bias measurements at every step.

    ``bias_norm`` and ``bias_grad_norm`` are (variants, layers, steps) arrays of the
    Trainer's own telemetry, logged at every step: ``steps[i]`` is the step whose gradient
    (and whose bias, before that step's update) is stored at index i. A variant that
    diverged has NaN after its last step.
    """

    trainer: Trainer
    steps: np.ndarray
    variants: list[str]
    layers: list[str]
    bias_norm: np.ndarray
    bias_grad_norm: np.ndarray

    @property
    def history(self):
        """The Trainer's History (loss, test_accuracy, bias_norm, bias_grad_norm, ...)."""
        return self.trainer.history

    def series(self, variant: str, metric: str) -> np.ndarray:
        """(layers, steps) array of ``bias_norm`` or ``bias_grad_norm`` of one variant."""
        return getattr(self, metric)[self.variants.index(variant)]

    def first_and_last(self, variant: str, metric: str, layer: int = 0) -> tuple[float, float]:
        """One layer's ``metric`` at the first and the last step it was measured (NaN if never)."""
        values = self.series(variant, metric)[layer]
        values = values[np.isfinite(values)]
        return (float(values[0]), float(values[-1])) if values.size else (math.nan, math.nan)

    def bias_grad_range(self) -> dict[str, tuple[float, float]]:
        """{variant: (smallest, largest) ‖dL/db‖ over all layers and steps}; NaN if no steps."""
        out = {}
        for variant in self.variants:
            values = self.series(variant, "bias_grad_norm")
            values = values[np.isfinite(values)]
            out[variant] = (
                (float(values.min()), float(values.max())) if values.size else (math.nan, math.nan)
            )
        return out


def network_blowup(
    config: RunConfig | None = None, steps: int = 300, dataset: Dataset | None = None
) -> NetworkBlowup:
    """Train the ``bias-blowup`` preset (or ``config``) for ``steps`` steps, logging every step."""
    config = (config or load_preset("bias-blowup")).replace(steps=steps, telemetry_every=1)
    if config.model != "mlp":
        raise ValueError(f"model = {config.model!r}: the bias blow-up runs on the MLP")
    if config.placement == "before" and not config.keep_bias:
        # Without keep_bias the biases in front of BN are masked to 0: nothing can drift.
        raise ValueError("keep_bias = False: the biases in front of BN are dropped")
    trainer = make_trainer(config, dataset)
    trainer.advance(steps=steps)
    names, layers = trainer.variant_names, list(trainer.model.layer_names)
    done = trainer.step
    measured = {}
    for metric in ("bias_norm", "bias_grad_norm"):
        table = np.full((len(names), len(layers), done), np.nan)
        for v, variant in enumerate(names):
            for li, layer in enumerate(layers):
                logged, values = trainer.history.series(variant, layer, metric)
                table[v, li, logged] = values
        measured[metric] = table
    return NetworkBlowup(
        trainer=trainer,
        steps=np.arange(done),
        variants=names,
        layers=layers,
        bias_norm=measured["bias_norm"],
        bias_grad_norm=measured["bias_grad_norm"],
    )
