"""Landscape probes along the gradient (Santurkar et al. 2018, section 3).

At a training step with parameters W and gradient g on the step's batch, step along
-g by eta for several eta in [low, high] x lr (a log grid) and record, per variant:

- loss variation: the min and max of L(W - eta g);
- gradient predictiveness: the min and max of ||grad L(W - eta g) - grad L(W)||;
- effective beta-smoothness: max over eta of ||grad L(W - eta g) - grad L(W)|| / ||eta g||.

A smooth landscape keeps all three small: the loss changes gently along the step and the
gradient at the start still predicts the gradient further on. The probe leaves the run
exactly as it was (parameters, gradients, optimizer state, BN buffers, noise generators).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bn_core.batchnorm import noise_states, set_noise_states
from bn_core.experiments.ics import LossFn
from bn_core.models import preserved_state
from bn_core.train import Measure, Trainer

__all__ = [
    "LANDSCAPE_METRICS",
    "LandscapeMeasure",
    "LandscapeProbe",
    "eta_grid",
    "per_variant_sq_norm",
    "probe_landscape",
]

LANDSCAPE_METRICS = (
    "landscape_loss_min",
    "landscape_loss_max",
    "landscape_grad_diff_min",
    "landscape_grad_diff_max",
    "landscape_beta",
)


def eta_grid(low: float, high: float, points: int) -> np.ndarray:
    """Step sizes in units of the learning rate, log-spaced: the ranges span decades."""
    return np.geomspace(low, high, points)


def per_variant_sq_norm(
    tensors: Sequence[torch.Tensor], owners: Sequence[torch.Tensor], variants: int
) -> torch.Tensor:
    """Sum of squares of ``tensors`` split by the variant each element belongs to."""
    out = torch.zeros(variants, dtype=torch.float64, device=tensors[0].device)
    for t, owner in zip(tensors, owners, strict=True):
        index = owner.expand_as(t).reshape(-1)
        out.index_add_(0, index, (t.detach().double() ** 2).reshape(-1))
    return out


@dataclass
class LandscapeProbe:
    """One probe: the step multipliers and, per variant, what was seen along -g."""

    etas: np.ndarray  # (points,) in units of each variant's lr
    loss: np.ndarray  # (variants, points): L(W - eta lr g)
    grad_diff: np.ndarray  # (variants, points): ||grad L(W - eta lr g) - g||
    step_norm: np.ndarray  # (variants, points): ||eta lr g||

    def summary(self) -> np.ndarray:
        """(variants, 5) in the order of ``LANDSCAPE_METRICS``."""
        moved = self.step_norm > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(moved, self.grad_diff / self.step_norm, -np.inf)
        beta = np.where(moved.any(1), ratio.max(1), np.nan)  # a variant at lr 0 has none
        return np.stack(
            [
                self.loss.min(1),
                self.loss.max(1),
                self.grad_diff.min(1),
                self.grad_diff.max(1),
                beta,
            ],
            axis=1,
        )


def probe_landscape(
    model: nn.Module,
    loss_fn: LossFn,
    x: torch.Tensor,
    y: torch.Tensor,
    params: Sequence[nn.Parameter],
    owners: Sequence[torch.Tensor],
    lrs: Sequence[torch.Tensor],
    etas: np.ndarray,
    noise: list | None = None,
    variants: int | None = None,
) -> LandscapeProbe:
    """Probe along -g, where g is each parameter's ``.grad`` (the step's gradient).

    ``owners[i]`` maps the elements of ``params[i]`` to variants and ``lrs[i]`` holds
    each element's learning rate (both broadcast against the parameter), so every
    variant steps by eta times its own learning rate. ``noise`` replays the step's noise.
    """
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    # The caller knows the count; finding it here costs a device sync per parameter.
    V = variants if variants is not None else int(max(int(o.max()) for o in owners)) + 1
    g_norm = per_variant_sq_norm(grads, owners, V).sqrt()
    lr_of_variant = torch.zeros(V, dtype=torch.float64)
    for owner, lr in zip(owners, lrs, strict=True):
        index, rate = (t.reshape(-1).cpu() for t in torch.broadcast_tensors(owner, lr))
        # A variant's rate is that of its elements the optimizer moves: the largest, as a
        # parameter the model holds still (a bias BN drops) has rate 0.
        lr_of_variant.scatter_reduce_(0, index, rate.double(), "amax")
    losses, diffs = [], []
    with preserved_state(model, params):
        start = [p.detach().clone() for p in params]
        for eta in etas:
            with torch.no_grad():
                for p, p0, g, lr in zip(params, start, grads, lrs, strict=True):
                    torch.addcmul(p0, g, lr, value=-float(eta), out=p)
            if noise is not None:
                set_noise_states(model, noise)
            logits, _ = model(x)
            loss = loss_fn(logits, y)
            moved = torch.autograd.grad(loss.sum(), params, allow_unused=True)
            moved = [
                torch.zeros_like(p) if m is None else m for p, m in zip(params, moved, strict=True)
            ]
            delta = [m - g for m, g in zip(moved, grads, strict=True)]
            losses.append(loss.detach().double().cpu())
            diffs.append(per_variant_sq_norm(delta, owners, V).sqrt().cpu())
    step_norm = np.outer(lr_of_variant.numpy(), etas) * g_norm.cpu().numpy()[:, None]
    return LandscapeProbe(
        np.asarray(etas, dtype=np.float64),
        torch.stack(losses, 1).numpy(),
        torch.stack(diffs, 1).numpy(),
        step_norm,
    )


class LandscapeMeasure(Measure):
    """The landscape along -g every ``config.landscape_every`` steps, before the update."""

    cadences = ("landscape_every",)

    def __init__(self, every: int, low: float, high: float, points: int) -> None:
        self.every = every
        self.etas = eta_grid(low, high, points)
        self._noise: list | None = None

    def _due(self, trainer: Trainer) -> bool:
        return self.every > 0 and trainer.step % self.every == 0 and bool(trainer.running())

    def before_forward(self, trainer: Trainer) -> None:
        # The noise this step's forward pass will draw, so the probe can replay it.
        self._noise = noise_states(trainer.model) if self._due(trainer) else None

    def before_update(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
        if not self._due(trainer):
            return
        opt = trainer.optimizer
        probe = probe_landscape(
            trainer.model,
            trainer.loss_fn,
            x,
            y,
            opt.params,
            opt.owner,
            opt.lr_of,
            self.etas,
            self._noise,
            variants=len(trainer.variant_names),
        )
        self._noise = None
        summary = probe.summary()
        trainer.record(
            {
                v: [
                    ("", m, float(val))
                    for m, val in zip(LANDSCAPE_METRICS, summary[v], strict=True)
                ]
                for v in trainer.running()
            }
        )
