"""The learning-rate sweep: K learning rates x {plain, batchnorm}, trained in lockstep.

Ioffe & Szegedy (section 4.2) train BN nets at 5 and 30 times the plain net's learning
rate (BN-x5, BN-x30), while the plain Inception at x5 diverged: BN widens the range of
learning rates that work. The sweep measures that range on a small net. A run holds at
most 8 variants, so a sweep of more than 8 (lr, variant) pairs is split into several
lockstep runs over the same data, trained in turn.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from bn_core.config import ConfigError, RunConfig, VariantSpec
from bn_core.data import Dataset, load_dataset
from bn_core.train import RunQueue, Trainer

__all__ = [
    "MAX_RATES",
    "SweepPoint",
    "SweepResult",
    "LrSweep",
    "USABLE_WITHIN",
    "lr_grid",
    "sweep_variant_name",
    "usable_range_text",
    "usable_ranges",
]

MAX_RATES = 8
MAX_PER_RUN = 8  # variants in one lockstep run (RunConfig's limit)
# A learning rate is "usable" when its run did not diverge and ends within this many
# accuracy points of the best run in the sweep.
USABLE_WITHIN = 0.05


def lr_grid(low: float, high: float, count: int) -> list[float]:
    """``count`` log-spaced learning rates from ``low`` to ``high``, to 3 significant digits."""
    if not 1 <= count <= MAX_RATES:
        raise ConfigError("rates", count, f"allowed: an integer in [1, {MAX_RATES}]")
    for name, value in (("lr_low", low), ("lr_high", high)):
        if not (isinstance(value, int | float) and math.isfinite(value) and 1e-5 <= value <= 10):
            raise ConfigError(name, value, "allowed: a number in [1e-05, 10]")
    if low > high:
        raise ConfigError("lr_low", low, f"allowed: at most lr_high ({high:g})")
    if count > 1 and low == high:
        raise ConfigError(
            "lr_high", high, f"allowed: above lr_low ({low:g}) for {count} rates, or 1 rate"
        )
    if count == 1:
        return [float(f"{low:.3g}")]
    return [float(f"{v:.3g}") for v in np.geomspace(low, high, count)]


def sweep_variant_name(norm: str, lr: float) -> str:
    return f"{'plain' if norm == 'none' else norm}-lr{lr:g}"


@dataclass(frozen=True)
class SweepPoint:
    """Where one (variant, learning rate) run stands."""

    norm: str
    lr: float
    loss: float  # training loss, mean over the last logging window
    test_loss: float
    test_accuracy: float
    diverged_at: int | None

    @property
    def label(self) -> str:
        return "plain" if self.norm == "none" else self.norm


@dataclass(frozen=True)
class SweepResult:
    points: list[SweepPoint]
    steps_done: int
    steps_total: int
    usable: dict[str, tuple[float, float] | None]  # variant label -> (lowest, highest) lr

    def grid(self, label: str) -> list[float]:
        """The learning rates swept for one variant, lowest first."""
        return sorted({p.lr for p in self.points if p.label == label})

    def usable_text(self, label: str, *, short: bool = False) -> str | None:
        """The usable range of one variant in words (``usable_range_text``); None if none."""
        span = self.usable.get(label)
        if span is None:
            return None
        return usable_range_text(span, self.grid(label), short=short)

    def touches_grid_end(self, label: str) -> bool:
        """Whether the usable range reaches the lowest or highest rate swept."""
        span, grid = self.usable.get(label), self.grid(label)
        return span is not None and (span[0] <= grid[0] or span[1] >= grid[-1])


class LrSweep(RunQueue):
    """Trains every (learning rate, variant) pair of a sweep; advance it in time slices."""

    def __init__(
        self,
        base: RunConfig,
        rates: list[float],
        norms: tuple[str, ...] = ("none", "batchnorm"),
        steps: int = 1000,
        dataset: Dataset | None = None,
    ) -> None:
        if not 1 <= len(rates) <= MAX_RATES:
            raise ConfigError("rates", list(rates), f"allowed: 1 to {MAX_RATES} learning rates")
        per_run = max(1, MAX_PER_RUN // len(norms))
        if dataset is None:
            dataset = load_dataset(
                base.dataset, seed=base.seed, noise=base.noise, probe_size=base.probe_size
            )
        self.rates = list(rates)
        self.norms = norms
        self.steps = steps
        self.trainers: list[Trainer] = []
        for start in range(0, len(rates), per_run):
            chunk = rates[start : start + per_run]
            # Variants of one normalization next to each other: one BN module per run.
            variants = [
                VariantSpec(sweep_variant_name(norm, lr), norm, lr)
                for norm in norms
                for lr in chunk
            ]
            config = base.replace(
                variants=[{"name": v.name, "norm": v.norm, "lr": v.lr} for v in variants],
                steps=steps,
                # The page draws end points, so 10 logs and evaluations per run are plenty;
                # the distribution probe that comes with each log is the costly part.
                telemetry_every=max(1, steps // 10),
                eval_every=max(1, steps // 10),
                ics_every=0,
                landscape_every=0,
            )
            # The page shows end points only: no per-layer measurements, which at 8
            # variants add about 15% to the training time.
            self.trainers.append(Trainer(config, dataset, measure_layers=False))

    def queue(self) -> list[Trainer]:
        return self.trainers

    def result(self) -> SweepResult:
        points = []
        for trainer in self.trainers:
            h = trainer.history
            for spec, status in zip(trainer.config.variants, trainer.status, strict=True):
                points.append(
                    SweepPoint(
                        spec.norm,
                        float(spec.lr),
                        _last(h, spec.name, "loss"),
                        _last(h, spec.name, "test_loss"),
                        _last(h, spec.name, "test_accuracy"),
                        status.diverged_at,
                    )
                )
        points.sort(key=lambda p: (self.norms.index(p.norm), p.lr))
        return SweepResult(points, self.steps_done, self.steps_total, usable_ranges(points))


def _last(history, variant: str, metric: str) -> float:
    _, values = history.series(variant, "", metric)
    return float(values[-1]) if len(values) else math.nan


def usable_range_text(span: tuple[float, float], grid: list[float], *, short: bool = False) -> str:
    """``span`` in words, e.g. "0.1 – 1 (10×)".

    A range that reaches an end of the swept ``grid`` may go on past it, so its ratio is
    only a lower bound: "0.01 – 10 (≥ 1,000×, the grid's whole span)". ``short`` leaves
    out the words after the ratio (for a metric tile), never the "≥".
    """
    low, high = span
    at_low = bool(grid) and low <= min(grid)
    at_high = bool(grid) and high >= max(grid)
    if at_low and at_high:
        end = "the grid's whole span" if low < high else "the grid's only rate"
    elif at_low:
        end = "reaches the grid's lowest rate"
    elif at_high:
        end = "reaches the grid's highest rate"
    else:
        end = ""
    note = f", {end}" if end and not short else ""
    if low == high:
        return f"{low:g} only" + (f" ({end})" if end and not short else "")
    ratio = high / low
    times = f"{ratio:,.0f}×" if ratio >= 10 else f"{ratio:.2g}×"
    return f"{low:g} – {high:g} ({'≥ ' if end else ''}{times}{note})"


def usable_ranges(points: list[SweepPoint]) -> dict[str, tuple[float, float] | None]:
    """Per variant, the lowest and highest learning rate that did not diverge and ends
    within ``USABLE_WITHIN`` accuracy of the sweep's best run."""
    # Only runs that did not diverge set the bar: a diverged run's last accuracy is from
    # before it blew up.
    finite = [
        p.test_accuracy for p in points if p.diverged_at is None and math.isfinite(p.test_accuracy)
    ]
    best = max(finite, default=math.nan)
    out: dict[str, tuple[float, float] | None] = {}
    for label in dict.fromkeys(p.label for p in points):
        good = [
            p.lr
            for p in points
            if p.label == label
            and p.diverged_at is None
            and math.isfinite(p.test_accuracy)
            and p.test_accuracy >= best - USABLE_WITHIN
        ]
        out[label] = (min(good), max(good)) if good else None
    return out
