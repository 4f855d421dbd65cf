"""What is measured at a logged step, computed for all variants and layers at once.

The measures work on stacked rows (one row per variant x layer) so a logged step costs a
few tensor ops however many variants a run has, and its numbers reach the host in one copy.
"""

from __future__ import annotations

import functools
import math

import numpy as np
import torch

__all__ = [
    "BAND_PERCENTILES",
    "FIG1_PERCENTILES",
    "postact_range",
    "quantiles_of_sorted",
    "preact_edges",
    "row_std",
    "saturation_cut",
    "saturation_fraction",
    "sort_rows",
]

# Ioffe & Szegedy Fig. 1 shows the 15th, 50th and 85th percentiles.
FIG1_PERCENTILES = (15.0, 50.0, 85.0)
# TensorBoard's distribution bands: min, the normal CDF at -1.5 .. 1.5 sigma in steps of 0.5, max.
BAND_PERCENTILES = (0.0, 6.68, 15.87, 30.85, 50.0, 69.15, 84.13, 93.32, 100.0)


def sort_rows(rows: torch.Tensor) -> torch.Tensor:
    """Each row of a (rows, n) tensor sorted ascending.

    On the CPU numpy's vectorized sort is about 20x faster than torch.sort for the
    30,000-value rows a logged step sorts, which keeps telemetry cheap.
    """
    if rows.device.type == "cpu":
        return torch.from_numpy(np.sort(rows.detach().numpy(), axis=1))
    return rows.sort(dim=1).values


@functools.lru_cache(maxsize=64)
def _ranks(
    n: int, percentiles: tuple[float, ...], dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(lower rank, upper rank, weight of the upper) for each percentile of n values."""
    pos = torch.tensor(percentiles, dtype=torch.float64) / 100.0 * (n - 1)
    lo = pos.floor().long().clamp(0, n - 1)
    hi = (lo + 1).clamp(max=n - 1)
    frac = (pos - lo).to(dtype)
    return lo.to(device), hi.to(device), frac.to(device)


def quantiles_of_sorted(sorted_rows: torch.Tensor, percentiles: tuple[float, ...]) -> torch.Tensor:
    """Percentiles of each row of an already sorted (rows, n) tensor.

    Linear interpolation between closest ranks, the same rule as numpy.percentile's default.
    """
    lo, hi, frac = _ranks(
        sorted_rows.shape[-1], tuple(percentiles), sorted_rows.dtype, sorted_rows.device
    )
    a = sorted_rows[..., lo]
    return torch.lerp(a, sorted_rows[..., hi], frac)


def row_std(rows: torch.Tensor) -> torch.Tensor:
    """The sample standard deviation (n - 1) of each row of a (rows, n) tensor.

    The same number as ``rows.std(dim=1)``, as the norm of the centered rows: on the CPU
    torch's std kernel takes 2-7x longer at the sizes of a layer's weights.
    """
    centered = rows - rows.mean(1, keepdim=True)
    return torch.linalg.vector_norm(centered, dim=1) / math.sqrt(rows.shape[1] - 1)


def saturation_cut(activation: str, threshold: float) -> float | None:
    """The nonlinearity's input beyond which its output is saturated (None for ReLU).

    sigmoid(x) > t  <=>  x > log(t / (1 - t));  |tanh(x)| > t  <=>  |x| > atanh(t).
    """
    if activation == "sigmoid":
        return math.log(threshold / (1.0 - threshold))
    if activation == "tanh":
        return math.atanh(threshold)
    return None


def preact_edges(activation: str, post_edges: torch.Tensor) -> torch.Tensor:
    """Bin edges on the nonlinearity's input that map to `post_edges` on its output.

    The activations are monotone, so a histogram of outputs is a histogram of inputs over
    the inverse edges; only the interior edges are used, so logit(0) = -inf never occurs.
    """
    inner = post_edges[1:-1].double()
    if activation == "sigmoid":
        inner = torch.log(inner / (1.0 - inner))
    elif activation == "tanh":
        inner = torch.atanh(inner)
    # relu: an output below e > 0 is exactly an input below e
    return torch.cat([post_edges[:1].double(), inner, post_edges[-1:].double()]).float()


def postact_range(activation: str, hist_range: float) -> tuple[float, float]:
    """The range the nonlinearity's output can take (clipped for ReLU)."""
    return {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}.get(activation, (0.0, hist_range))


def saturation_fraction(post: torch.Tensor, activation: str, threshold: float) -> torch.Tensor:
    """Per row of post-activations (rows, N, C, ...): the saturated share.

    sigmoid: output < 1 - threshold or > threshold (0.03 / 0.97 by default);
    tanh: |output| > threshold; relu: share of units that output 0 for every probe example.
    """
    rows = post.shape[0]
    if activation == "sigmoid":
        sat = (post < 1.0 - threshold) | (post > threshold)
        return sat.reshape(rows, -1).float().mean(1)
    if activation == "tanh":
        return (post.abs() > threshold).reshape(rows, -1).float().mean(1)
    # A ReLU unit (a channel for conv layers) is dead when no example activates it.
    per_unit = post.transpose(1, 2).reshape(rows, post.shape[2], -1)
    return (per_unit.amax(-1) <= 0).float().mean(1)
