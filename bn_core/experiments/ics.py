"""Internal covariate shift measured as Santurkar et al. (2018, Definition 2.1) define it.

For layer i at step t, on the step's own batch:

    G  = dL/dW_i at (W_1^t,     ..., W_{i-1}^t,     W_i^t, ..., W_k^t)
    G' = dL/dW_i at (W_1^{t+1}, ..., W_{i-1}^{t+1}, W_i^t, ..., W_k^t)

G' is the gradient layer i would see if only the layers before it had taken this step's
update: the change in what layer i is asked to do that comes from the layers under it
moving. ICS_i = ||G - G'||_2, and cos(G, G') says whether the direction survives.

The trainer calls ``measure_ics`` right after the optimizer step, with a copy of the
parameters from before it. Everything is restored afterwards (parameters, BN running
statistics, noisy BN's generators), so measuring never changes the run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bn_core.batchnorm import noise_states, set_noise_states
from bn_core.history import History
from bn_core.models import preserved_state
from bn_core.train import Measure, Trainer

__all__ = [
    "ClaimRow",
    "IcsMeasure",
    "claims_summary",
    "measure_ics",
    "shifted_gradient",
    "steps_to_accuracy",
]

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits, y) -> (V,)


def shifted_gradient(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    params: Sequence[nn.Parameter],
    before: Sequence[torch.Tensor],
    after: Sequence[torch.Tensor],
    layer: int,
    noise: list | None = None,
) -> torch.Tensor:
    """G' of hidden layer ``layer`` (0-based) as (variants, weights), one row per variant.

    ``before`` and ``after`` hold the values of ``params`` before and after the step.
    Layers below ``layer`` get the ``after`` values; ``layer`` itself, the layers above
    and the output layer get ``before``. ``noise`` replays the step's noise draws of
    noisy BN layers, so G and G' see the same noise. The caller restores the state.
    """
    earlier = {id(p) for j in range(layer) for p in model.layer_parameters(j)}
    with torch.no_grad():
        for p, old, new in zip(params, before, after, strict=True):
            p.copy_(new if id(p) in earlier else old)
    if noise is not None:
        set_noise_states(model, noise)
    logits, _ = model(x)
    grads = torch.autograd.grad(loss_fn(logits, y).sum(), model.layer_weights(layer))
    return model.variant_rows(list(grads))


def measure_ics(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    params: Sequence[nn.Parameter],
    before: Sequence[torch.Tensor],
    noise: list | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{layer name: (ics_l2, ics_cos)} of every hidden layer but the first, per variant.

    G is read from the weights' ``.grad``: the training step's own gradient. The first
    layer has no layers below it, so its G' is G and its ICS is 0 by definition; it is
    not reported.
    """
    out = {}
    after = [p.detach().clone() for p in params]
    with preserved_state(model, params):
        for layer in range(1, len(model.layer_names)):
            G = model.variant_rows([w.grad for w in model.layer_weights(layer)])
            G_shift = shifted_gradient(model, loss_fn, x, y, params, before, after, layer, noise)
            diff = (G - G_shift).norm(dim=1)
            cos = torch.nn.functional.cosine_similarity(G, G_shift, dim=1, eps=1e-30)
            out[model.layer_names[layer]] = (diff, cos)
    return out


class IcsMeasure(Measure):
    """ics_l2 and ics_cos per layer (2 and up) every ``config.ics_every`` steps, taken
    right after the optimizer step from a copy of the parameters made before it."""

    cadences = ("ics_every",)

    def __init__(self, every: int) -> None:
        self.every = every
        self._noise: list | None = None
        self._before: list[torch.Tensor] | None = None

    def _due(self, trainer: Trainer) -> bool:
        return self.every > 0 and trainer.step % self.every == 0 and bool(trainer.running())

    def before_forward(self, trainer: Trainer) -> None:
        # The noise this step's forward pass will draw, so G' can replay it.
        self._noise = noise_states(trainer.model) if self._due(trainer) else None

    def before_update(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
        due = self._due(trainer)
        self._before = [p.detach().clone() for p in trainer.optimizer.params] if due else None

    def after_update(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
        if self._before is None:
            return
        params = trainer.optimizer.params
        measured = measure_ics(
            trainer.model, trainer.loss_fn, x, y, params, self._before, self._noise
        )
        self._before = self._noise = None
        rows = {v: [] for v in trainer.running()}
        for layer, (l2, cos) in measured.items():
            l2, cos = l2.tolist(), cos.tolist()
            for v in rows:
                rows[v] += [(layer, "ics_l2", l2[v]), (layer, "ics_cos", cos[v])]
        trainer.record(rows)


# --- the two claims side by side -----------------------------------------------------------
@dataclass(frozen=True)
class ClaimRow:
    """One measured number per variant, for one of the two papers' claims."""

    claim: str  # "Ioffe & Szegedy" or "Santurkar et al."
    measure: str
    values: dict[str, float | None]  # variant -> value (None: not measured yet)
    fmt: str  # how a page shows a value: "{:.3g}", "{:,.0f}" ...
    help: str


def _series(history: History, variant: str, layer: str, metric: str) -> np.ndarray:
    return history.series(variant, layer, metric)[1]


def _median_over_layers(history: History, variant: str, metric: str) -> float | None:
    values = [_series(history, variant, layer, metric) for layer in history.layers(variant)]
    values = [v[np.isfinite(v)] for v in values if len(v)]
    if not values:
        return None
    return float(np.median(np.concatenate(values)))


def steps_to_accuracy(history: History, variant: str, target: float) -> int | None:
    """The first evaluated step at which test accuracy reached ``target`` (None: not yet)."""
    steps, accuracy = history.series(variant, "", "test_accuracy")
    reached = np.flatnonzero(accuracy >= target)
    return int(steps[reached[0]]) if len(reached) else None


def claims_summary(history: History, layer: str, target_accuracy: float = 0.9) -> list[ClaimRow]:
    """The numbers behind both views, per variant, from a run's history.

    Ioffe & Szegedy: BN keeps each layer's input distribution still (how far the median
    and the 15-85 width of ``layer``'s input moved over the run) and so trains faster
    (steps to ``target_accuracy``). Santurkar et al.: BN does not lower ICS (median
    ||G - G'|| and cos(G, G') over layers and probes) but smooths the landscape (median
    loss range along the gradient and median effective beta).
    """
    variants = history.variants()

    def per_variant(fn) -> dict[str, float | None]:
        return {v: fn(v) for v in variants}

    def moved(v: str) -> float | None:
        p50 = _series(history, v, layer, "preact_p50")
        return float(np.ptp(p50)) if len(p50) else None

    def width_ratio(v: str) -> float | None:
        width = _series(history, v, layer, "preact_p85") - _series(history, v, layer, "preact_p15")
        width = width[width > 0]
        return float(width.max() / width.min()) if len(width) else None

    def loss_range(v: str) -> float | None:
        low = _series(history, v, "", "landscape_loss_min")
        high = _series(history, v, "", "landscape_loss_max")
        span = (high - low)[np.isfinite(high - low)]
        return float(np.median(span)) if len(span) else None

    def beta(v: str) -> float | None:
        b = _series(history, v, "", "landscape_beta")
        b = b[np.isfinite(b)]
        return float(np.median(b)) if len(b) else None

    ioffe, santurkar = "Ioffe & Szegedy", "Santurkar et al."
    target = f"{target_accuracy:.0%}"
    return [
        ClaimRow(
            ioffe,
            f"How far the median input of {layer} moved",
            per_variant(moved),
            "{:.3g}",
            "max − min over the run of the 50th percentile on the probe batch; small: a "
            "still distribution",
        ),
        ClaimRow(
            ioffe,
            f"Largest / smallest 15–85 width of {layer}'s input",
            per_variant(width_ratio),
            "{:.3g}",
            "1 means the spread never changed",
        ),
        ClaimRow(
            ioffe,
            f"Steps to {target} test accuracy",
            per_variant(lambda v: steps_to_accuracy(history, v, target_accuracy)),
            "{:,.0f}",
            "first evaluation at or above the target; fewer is faster",
        ),
        ClaimRow(
            santurkar,
            "ICS ‖G − G′‖ (median)",
            per_variant(lambda v: _median_over_layers(history, v, "ics_l2")),
            "{:.3g}",
            "over layers 2 and up and every measurement; lower is less shift",
        ),
        ClaimRow(
            santurkar,
            "cos(G, G′) (median)",
            per_variant(lambda v: _median_over_layers(history, v, "ics_cos")),
            "{:.3f}",
            "1: the layers below moving leaves this layer's gradient direction alone",
        ),
        ClaimRow(
            santurkar,
            "Loss range along the gradient (median)",
            per_variant(loss_range),
            "{:.3g}",
            "max − min of L(W − ηg) over the probe's step sizes; smaller is smoother",
        ),
        ClaimRow(
            santurkar,
            "Effective β-smoothness (median)",
            per_variant(beta),
            "{:.3g}",
            "largest ‖∇L(W − ηg) − ∇L(W)‖ / ‖ηg‖; smaller is smoother",
        ),
    ]
