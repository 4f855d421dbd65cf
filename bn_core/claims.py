"""Claims: the sentences the app says about an outcome, as checks over a run's History.

A claim is a sentence, the quantity it rests on, read from the run, and a threshold. The
app shows each claim beside its chart with the measured numbers and a tick or a cross, and
the CLI writes them to ``claims.json``. When a run contradicts a claim, the app shows the
claim's ``otherwise`` sentence instead of keeping a caption that is now false.

Presets declare their claims in their JSON file (``"claims": [...]``), one object each:

    {"says": "...", "otherwise": "...", "quantity": "abs_change", "metric": "unit_p50",
     "layer": "last", "variants": ["batchnorm"], "at": 3000, "at_most": 0.3}

Two variants compare ``a - b`` (``"compare": "difference"``) or ``a / b`` (``"ratio"``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bn_core.config import PRESET_DIR, ConfigError
from bn_core.history import History

__all__ = [
    "QUANTITIES",
    "Claim",
    "ClaimBook",
    "ClaimResult",
    "check_claims",
    "claims_from_list",
    "claims_json",
    "load_claims",
]


def _value_at(steps: np.ndarray, values: np.ndarray, at: int) -> float | None:
    """The metric's last logged value at or before step ``at``."""
    i = int(np.searchsorted(steps, at, side="right")) - 1
    return float(values[i]) if i >= 0 else None


def _first(steps: np.ndarray, values: np.ndarray, at: int) -> float | None:
    return float(values[0]) if len(steps) and steps[0] <= at else None


def _width(history: History, variant: str, layer: str, prefix: str, at: int, pick) -> float | None:
    """The 15-85 percentile width of ``prefix`` ("unit" or "preact") picked by ``pick``."""
    lo = history.series(variant, layer, f"{prefix}_p15")
    hi = history.series(variant, layer, f"{prefix}_p85")
    a, b = pick(*lo, at), pick(*hi, at)
    return None if a is None or b is None else b - a


def _ratio(new: float | None, old: float | None) -> float | None:
    if new is None or old is None or old == 0:
        return None
    return new / old


def _upto(steps: np.ndarray, values: np.ndarray, at: int) -> np.ndarray:
    return values[steps <= at]


def _finite(values: np.ndarray) -> np.ndarray:
    return values[np.isfinite(values)]


# quantity name -> f(history, variant, layer, metric, at): one number read off the run.
Quantity = Callable[[History, str, str, str, int], float | None]
QUANTITIES: dict[str, Quantity] = {
    # The metric's value at step ``at``.
    "at": lambda h, v, layer, m, at: _value_at(*h.series(v, layer, m), at),
    # How far the metric moved from its first logged value: value(at) - value(first).
    "change": lambda h, v, layer, m, at: (
        None
        if (a := _value_at(*h.series(v, layer, m), at)) is None
        or (b := _first(*h.series(v, layer, m), at)) is None
        else a - b
    ),
    "abs_change": lambda h, v, layer, m, at: (
        None if (c := QUANTITIES["change"](h, v, layer, m, at)) is None else abs(c)
    ),
    # value(at) / value(first)
    "growth": lambda h, v, layer, m, at: _ratio(
        _value_at(*h.series(v, layer, m), at), _first(*h.series(v, layer, m), at)
    ),
    # The largest and smallest value logged up to ``at``.
    "max": lambda h, v, layer, m, at: (
        float(x.max()) if (x := _finite(_upto(*h.series(v, layer, m), at))).size else None
    ),
    "min": lambda h, v, layer, m, at: (
        float(x.min()) if (x := _finite(_upto(*h.series(v, layer, m), at))).size else None
    ),
    # The median of the values logged up to ``at`` (NaNs left out).
    "median": lambda h, v, layer, m, at: (
        float(np.median(x)) if (x := _finite(_upto(*h.series(v, layer, m), at))).size else None
    ),
    # The median over logged steps of ``{metric}_max - {metric}_min``, the range a probe
    # saw (the landscape probe's loss range along the gradient).
    "median_span": lambda h, v, layer, m, at: (
        float(np.median(x))
        if (
            x := _finite(
                _upto(*h.series(v, layer, f"{m}_max"), at)
                - _upto(*h.series(v, layer, f"{m}_min"), at)
            )
        ).size
        else None
    ),
    # Mean |value_k - value_{k-1}| over consecutive logged steps up to ``at``: how much the
    # metric jumps from one measurement to the next.
    "jitter": lambda h, v, layer, m, at: (
        float(np.abs(np.diff(x)).mean())
        if (x := _upto(*h.series(v, layer, m), at)).size > 1
        else None
    ),
    # The 15-85 percentile width of "unit" (one sigmoid) or "preact" (the whole layer).
    "width": lambda h, v, layer, m, at: _width(h, v, layer, m, at, _value_at),
    # width(at) / width(first)
    "width_growth": lambda h, v, layer, m, at: _ratio(
        _width(h, v, layer, m, at, _value_at), _width(h, v, layer, m, at, _first)
    ),
}
COMPARISONS = ("value", "difference", "ratio")


@dataclass(frozen=True)
class Claim:
    """One sentence about a run's outcome and the check that backs it."""

    says: str  # shown when the run bears it out
    otherwise: str  # shown instead when the run contradicts it
    quantity: str  # a key of QUANTITIES
    metric: str  # the History metric read ("test_accuracy", "unit_p50", ...) or a prefix
    variants: tuple[str, ...]  # one variant, or two compared
    at: int  # the step at which the claim is checked
    layer: str = ""  # "" the whole net; "first", "last" or a layer name
    layers: tuple[str, ...] = ()  # one layer per variant instead, to compare two layers
    compare: str = "value"
    at_least: float | None = None
    at_most: float | None = None

    def __post_init__(self) -> None:
        where = f"claim {self.says[:40]!r}"
        if self.quantity not in QUANTITIES:
            raise ConfigError(
                f"{where}: quantity", self.quantity, "allowed: " + ", ".join(QUANTITIES)
            )
        if self.compare not in COMPARISONS:
            raise ConfigError(
                f"{where}: compare", self.compare, "allowed: " + ", ".join(COMPARISONS)
            )
        wanted = 1 if self.compare == "value" else 2
        if len(self.variants) != wanted:
            raise ConfigError(
                f"{where}: variants",
                list(self.variants),
                f"allowed: {wanted} variant name(s) for compare = {self.compare}",
            )
        if self.layers and len(self.layers) != len(self.variants):
            raise ConfigError(
                f"{where}: layers",
                list(self.layers),
                f"allowed: one layer per variant ({len(self.variants)})",
            )
        if self.at_least is None and self.at_most is None:
            raise ConfigError(f"{where}: at_least", None, "allowed: a number (or give at_most)")
        if not isinstance(self.at, int) or self.at < 0:
            raise ConfigError(f"{where}: at", self.at, "allowed: a step, an integer >= 0")

    @property
    def operands(self) -> list[tuple[str, str]]:
        """(variant, layer) of each number the claim compares."""
        layers = self.layers or (self.layer,) * len(self.variants)
        return list(zip(self.variants, layers, strict=True))

    def operand_name(self, variant: str, layer: str) -> str:
        return f"{variant} {layer}" if self.layers else variant

    @property
    def threshold(self) -> str:
        """The check in words, e.g. 'batchnorm − plain ≥ 0.01 at step 1,000'."""
        names = [self.operand_name(v, layer) for v, layer in self.operands]
        if self.compare == "value":
            lhs = names[0]
        else:
            lhs = f"{names[0]} {'−' if self.compare == 'difference' else '/'} {names[1]}"
        bounds = []
        if self.at_least is not None:
            bounds.append(f"≥ {self.at_least:g}")
        if self.at_most is not None:
            bounds.append(f"≤ {self.at_most:g}")
        return f"{lhs} {' and '.join(bounds)} at step {self.at:,}"

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "claim") -> Claim:
        if not isinstance(raw, dict):
            raise ConfigError(where, raw, "allowed: an object with says, quantity, ...")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ConfigError(
                f"{where}.{unknown[0]}",
                raw[unknown[0]],
                "allowed keys: " + ", ".join(sorted(known)),
            )
        missing = sorted({"says", "otherwise", "quantity", "metric", "variants", "at"} - set(raw))
        if missing:
            raise ConfigError(f"{where}.{missing[0]}", None, "required")
        return cls(
            **{**raw, "variants": tuple(raw["variants"]), "layers": tuple(raw.get("layers", ()))}
        )


@dataclass(frozen=True)
class ClaimResult:
    """A claim checked on one run."""

    claim: Claim
    measured: dict[str, float] = field(default_factory=dict)  # per variant, and "value"
    holds: bool | None = None  # None: not checkable on this run (yet); see ``reason``
    reason: str = ""

    @property
    def sentence(self) -> str:
        return self.claim.otherwise if self.holds is False else self.claim.says

    @property
    def mark(self) -> str:
        return {True: "✓", False: "✗", None: "…"}[self.holds]

    def measured_text(self) -> str:
        """e.g. 'batchnorm 0.983, plain 0.958 (difference 0.025)'."""
        text = ", ".join(f"{v} {x:.3g}" for v, x in self.measured.items() if v != "value")
        if self.claim.compare != "value" and "value" in self.measured:
            text += f" ({self.claim.compare} {self.measured['value']:.3g})"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {
            "claim": self.claim.says,
            "measured": self.measured,
            "threshold": self.claim.threshold,
            "holds": self.holds,
            "reason": self.reason,
            "definition": {k: v for k, v in asdict(self.claim).items() if v not in (None, "", ())},
        }


def _resolve_layer(history: History, variant: str, layer: str) -> str | None:
    if layer not in ("first", "last"):
        return layer
    layers = history.layers(variant)
    if not layers:
        return None
    return layers[0] if layer == "first" else layers[-1]


def check(claim: Claim, history: History, *, final: bool = False) -> ClaimResult:
    """Measure ``claim`` on ``history``: its numbers, and whether it holds.

    A claim about step N waits until the run is past step N (``final``: the run has
    ended), so the measurements taken at step N itself are in. A variant that diverged
    by step N contradicts every claim about it.
    """
    missing = [v for v in claim.variants if v not in history.variants()]
    if missing:
        return ClaimResult(claim, reason=f"this run has no {missing[0]} variant")
    for v in claim.variants:
        steps, _ = history.series(v, "", "diverged")
        if len(steps) and steps[0] <= claim.at:
            return ClaimResult(claim, holds=False, reason=f"{v} diverged at step {int(steps[0]):,}")
    last = history.last_step() or 0
    settled = last > claim.at or (final and last >= claim.at)
    measured: dict[str, float] = {}
    values: list[float] = []  # one per operand, even where two operands share a name
    for v, wanted in claim.operands:
        layer = _resolve_layer(history, v, wanted)
        value = None
        if layer is not None:
            value = QUANTITIES[claim.quantity](history, v, layer, claim.metric, claim.at)
        if value is None or not math.isfinite(value):
            why = "yet" if not settled else "on this run"
            return ClaimResult(claim, measured, reason=f"{claim.metric} of {v} not measured {why}")
        measured[claim.operand_name(v, wanted)] = value
        values.append(value)
    if claim.compare == "value":
        value = values[0]
    elif claim.compare == "difference":
        value = values[0] - values[1]
    elif values[1] == 0:
        return ClaimResult(claim, measured, reason="the ratio's denominator is 0 on this run")
    else:
        value = values[0] / values[1]
    measured["value"] = value
    if not settled:
        return ClaimResult(
            claim, measured, reason=f"checked at step {claim.at:,}; the run is at step {last:,}"
        )
    holds = (claim.at_least is None or value >= claim.at_least) and (
        claim.at_most is None or value <= claim.at_most
    )
    return ClaimResult(claim, measured, holds=holds)


def check_claims(
    claims: list[Claim], history: History, *, final: bool = False
) -> list[ClaimResult]:
    return [check(c, history, final=final) for c in claims]


class ClaimBook:
    """A run's claims, each kept as it was checked once the run had reached its step.

    A long run's History thins its series (every other point goes when one is full), so a
    claim about step 1,000 re-read at step 50,000 would rest on fewer points than the run
    showed at the time. Calling ``results`` as the run goes (every tick, every chunk of
    the CLI's loop) settles each claim on the points it was made about.
    """

    def __init__(self, claims: list[Claim]) -> None:
        self.claims = list(claims)
        self._settled: dict[int, ClaimResult] = {}

    def __bool__(self) -> bool:
        return bool(self.claims)

    def results(self, history: History, *, final: bool = False) -> list[ClaimResult]:
        """Each claim's result; ``final``: the run has ended, settle what can be."""
        out = []
        for i, claim in enumerate(self.claims):
            result = self._settled.get(i) or check(claim, history, final=final)
            if result.holds is not None:
                self._settled[i] = result
            out.append(result)
        return out


def claims_from_list(raw: Any, where: str = "claims") -> list[Claim]:
    if not isinstance(raw, list):
        raise ConfigError(where, raw, "allowed: a list of claim objects")
    return [Claim.from_dict(item, f"{where}[{i}]") for i, item in enumerate(raw)]


def load_claims(preset: str, preset_dir: Path = PRESET_DIR) -> list[Claim]:
    """The claims a preset declares (none for a preset that makes no claim)."""
    path = preset_dir / f"{preset}.json"
    raw = json.loads(path.read_text())
    return claims_from_list(raw.get("claims", []), f"{preset}.claims")


def claims_json(results: list[ClaimResult]) -> str:
    """``claims.json``: a list of {claim, measured, threshold, holds}."""
    return json.dumps([r.to_dict() for r in results], indent=2, ensure_ascii=False) + "\n"
