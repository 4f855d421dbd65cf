"""Claims (bn_core/claims.py): every preset's claims hold on real runs of three seeds, a
broken threshold shows as a failed claim on a perturbed real run, each quantity equals a
hand computation on a small History, and claims reach claims.json and the live page."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from bn_core.__main__ import main
from bn_core.claims import (
    QUANTITIES,
    Claim,
    ClaimBook,
    check,
    check_claims,
    claims_from_list,
    load_claims,
)
from bn_core.config import ConfigError, list_presets, load_preset
from bn_core.experiments import make_trainer
from bn_core.history import History

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PRESETS = sorted(list_presets())
SEEDS = (0, 1, 2)


# --- every preset's claims hold on its own run, for three seeds ----------------------------
# The 24 runs happen in tests/preset_claims.py, which conftest starts in the background.
@pytest.mark.preset_claims
@pytest.mark.timeout(1800)  # waits for the background runs on a busy machine
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_claims_hold_on_its_default_run(preset_claims, preset, seed):
    assert len(load_claims(preset)) >= 1, f"{preset} makes no claim"
    results = preset_claims[preset][str(seed)]
    assert [r["claim"] for r in results] == [c.says for c in load_claims(preset)]
    failed = [
        f"{r['mark']} {r['claim']}\n    measured {r['measured']} · needs {r['threshold']} · "
        f"{r['reason'] or 'contradicted'}"
        for r in results
        if r["holds"] is not True
    ]
    assert not failed, f"{preset}, seed {seed}:\n" + "\n".join(failed)


# --- a broken threshold fails, on a real (perturbed) run -----------------------------------
def test_a_claim_fails_when_the_run_breaks_its_threshold():
    """ioffe-fig1 at lr 1e-4 instead of 0.5: in 300 steps neither net learns, so BN's loss
    is nowhere near half the plain net's, and the plain net's band does not widen 10-fold.
    The same claims, checked at step 300, hold on the preset's own learning rate."""
    by_metric = {(c.quantity, c.metric, c.variants): c for c in load_claims("ioffe-fig1")}
    faster = by_metric[("at", "loss", ("batchnorm", "plain"))]
    spreads = by_metric[("width_growth", "unit", ("plain",))]
    claims = [dataclasses.replace(c, at=300) for c in (faster, spreads)]

    def run(lr: float) -> History:
        config = load_preset("ioffe-fig1").replace(steps=300, lr=lr, device="cpu")
        trainer = make_trainer(config)
        trainer.advance(steps=300)
        return trainer.history

    held = check_claims(claims, run(0.5), final=True)
    assert [r.holds for r in held] == [True, True], [r.measured for r in held]

    broken = check_claims(claims, run(1e-4), final=True)
    for result, claim in zip(broken, claims, strict=True):
        assert result.holds is False, f"{claim.says}: {result.measured_text()}"
        assert result.sentence == claim.otherwise
        assert result.mark == "✗" and not result.reason
    ratio = broken[0].measured["value"]
    assert ratio > 0.5 and ratio == pytest.approx(
        broken[0].measured["batchnorm"] / broken[0].measured["plain"]
    )
    assert broken[1].measured["value"] < 10


# --- each quantity against a hand computation --------------------------------------------
STEPS = np.array([0, 10, 20, 30, 40])
VALUES = {
    "m": np.array([2.0, 3.5, 1.0, 4.0, 6.0]),
    "m_min": np.array([1.0, 1.5, 0.5, 2.0, 3.0]),
    "m_max": np.array([1.5, 4.0, 2.5, 2.25, 7.0]),
    "unit_p15": np.array([-0.1, -0.3, -0.2, -0.8, -1.0]),
    "unit_p85": np.array([0.1, 0.5, 0.4, 1.2, 2.0]),
}
OTHER = {"m": np.array([1.0, 2.0, 2.0, 2.0, 3.0])}  # variant "b"


@pytest.fixture
def history() -> History:
    """Variant "a" logs VALUES on layer "l1" at STEPS; variant "b" logs OTHER; step 45."""
    h = History()
    for i, step in enumerate(STEPS):
        h.add_many(int(step), "a", [("l1", m, v[i]) for m, v in VALUES.items()])
        h.add_many(int(step), "b", [("l1", m, v[i]) for m, v in OTHER.items()])
    h.note_step(45)
    return h


def claim(quantity: str, metric: str = "m", at: int = 30, **kw) -> Claim:
    kw.setdefault("variants", ("a",))
    kw.setdefault("layer", "l1")
    kw.setdefault("at_least", -math.inf)
    return Claim("says", "otherwise", quantity, metric, at=at, **kw)


def upto(values: np.ndarray, at: int) -> np.ndarray:
    return values[np.less_equal(STEPS, at)]


@pytest.mark.parametrize("at", [0, 25, 30, 40])
def test_each_quantity_equals_a_hand_computation(history, at):
    m = VALUES["m"]
    last = upto(m, at)[-1]  # the value at or before ``at``
    width = VALUES["unit_p85"] - VALUES["unit_p15"]
    expected = {
        "at": last,
        "change": last - m[0],
        "abs_change": abs(last - m[0]),
        "growth": last / m[0],
        "max": upto(m, at).max(),
        "min": upto(m, at).min(),
        "median": np.median(upto(m, at)),
        "median_span": np.median(upto(VALUES["m_max"] - VALUES["m_min"], at)),
        "jitter": np.abs(np.diff(upto(m, at))).mean() if at >= 10 else None,
        "width": upto(width, at)[-1],
        "width_growth": upto(width, at)[-1] / width[0],
    }
    assert sorted(expected) == sorted(QUANTITIES)
    for quantity, value in expected.items():
        metric = "unit" if quantity.startswith("width") else "m"
        result = check(claim(quantity, metric, at=at), history)
        if value is None:  # one logged value: no jump to average
            assert result.holds is None and "m of a not measured" in result.reason
            continue
        assert result.holds is True, (quantity, result.reason)
        assert result.measured["a"] == pytest.approx(float(value), rel=1e-12), quantity
        assert result.measured["value"] == result.measured["a"]


def test_difference_and_ratio_compare_two_variants(history):
    a, b = VALUES["m"][3], OTHER["m"][3]  # at step 30: 4.0 and 2.0
    diff = check(claim("at", variants=("a", "b"), compare="difference", at_least=2.0), history)
    assert diff.measured == {"a": a, "b": b, "value": a - b} and diff.holds is True
    assert diff.measured_text() == "a 4, b 2 (difference 2)"
    ratio = check(claim("at", variants=("b", "a"), compare="ratio", at_most=0.4), history)
    assert ratio.measured["value"] == pytest.approx(b / a) and ratio.holds is False
    assert ratio.sentence == "otherwise" and ratio.mark == "✗"
    # One layer per variant: operands named by variant and layer.
    layers = check(
        claim("at", variants=("a", "b"), layer="", layers=("l1", "last"), compare="ratio"),
        history,
    )
    assert layers.measured == {"a l1": a, "b last": b, "value": a / b}
    # The same operand twice (a degenerate claim) still compares, to exactly 1.
    same = check(claim("at", variants=("a", "a"), compare="ratio", at_least=1.0), history)
    assert same.measured["value"] == 1.0 and same.holds is True


def test_thresholds_are_inclusive_and_both_bounds_apply(history):
    assert check(claim("at", at_least=4.0), history).holds is True
    assert check(claim("at", at_least=4.0 + 1e-9), history).holds is False
    assert check(claim("at", at_least=3.0, at_most=4.0), history).holds is True
    assert check(claim("at", at_least=3.0, at_most=3.9), history).holds is False
    assert claim("at", at_least=3.0, at_most=3.9).threshold == "a ≥ 3 and ≤ 3.9 at step 30"


def test_a_claim_is_pending_until_the_run_reaches_its_step(history):
    result = check(claim("at", at=1000, at_least=0.0), history)
    assert result.holds is None and result.mark == "…"
    assert result.reason == "checked at step 1,000; the run is at step 45"
    assert result.measured["a"] == VALUES["m"][-1]  # the numbers so far are shown
    assert result.sentence == "says"
    # At step 1,000 itself the measurements due at that step are not in yet...
    history.note_step(1000)
    assert check(claim("at", at=1000, at_least=0.0), history).holds is None
    # ...unless the run ended there; once past it, the claim is settled.
    assert check(claim("at", at=1000, at_least=0.0), history, final=True).holds is True
    history.note_step(1001)
    assert check(claim("at", at=1000, at_least=0.0), history).holds is True


def test_a_missing_variant_or_metric_leaves_the_claim_unchecked(history):
    missing = check(claim("at", variants=("a", "plain"), compare="ratio"), history)
    assert missing.holds is None and missing.reason == "this run has no plain variant"
    unmeasured = check(claim("at", metric="loss"), history)
    assert unmeasured.holds is None and unmeasured.reason == "loss of a not measured on this run"
    # "first" and "last" resolve to the variant's layers; a run-level metric has layer "".
    assert check(claim("at", layer="last"), history).measured["a"] == VALUES["m"][3]


def test_a_variant_that_diverged_by_the_claims_step_contradicts_it(history):
    history.add(20, "b", "", "diverged", 20.0)
    result = check(claim("at", variants=("a", "b"), compare="difference"), history)
    assert result.holds is False and result.reason == "b diverged at step 20"
    assert result.sentence == "otherwise"
    # A divergence after the step the claim is about does not touch it.
    assert check(claim("at", variants=("b",), at=10), history).holds is True


def test_a_zero_denominator_leaves_the_ratio_unchecked(history):
    history.add_many(30, "b", [("l1", "zero", 0.0)])
    history.add_many(30, "a", [("l1", "zero", 1.0)])
    result = check(claim("at", "zero", variants=("a", "b"), compare="ratio"), history)
    assert result.holds is None and "denominator is 0" in result.reason


def test_a_diverging_run_records_its_divergence_for_the_claims():
    from small_runs import diverging_config

    trainer = make_trainer(diverging_config())
    trainer.advance(steps=60)
    plain = trainer.status[trainer.variant_names.index("plain")]
    assert plain.state == "diverged"
    steps, _ = trainer.history.series("plain", "", "diverged")
    assert steps.tolist() == [plain.diverged_at]


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"quantity": "mean"}, "quantity"),
        ({"compare": "product"}, "compare"),
        ({"variants": ["a", "b"]}, "variants"),  # two variants need a comparison
        ({"variants": ["a"], "compare": "ratio"}, "variants"),
        ({"layers": ["l1", "l2"]}, "layers"),  # one layer per variant
        ({"at_least": None}, "at_least"),  # no threshold at all
        ({"at": -1}, "at"),
        ({"colour": "red"}, "colour"),  # unknown key
    ],
)
def test_bad_claim_definitions_name_the_field(change, field):
    raw = {
        "says": "s",
        "otherwise": "o",
        "quantity": "at",
        "metric": "loss",
        "variants": ["a"],
        "at": 10,
        "at_least": 0.0,
        **change,
    }
    raw = {k: v for k, v in raw.items() if v is not None}
    with pytest.raises(ConfigError, match=rf"\b{field}\b"):
        claims_from_list([raw], "preset.claims")


def test_a_claim_without_a_required_key_is_an_error():
    raw = {"says": "s", "quantity": "at", "metric": "loss", "variants": ["a"], "at": 5}
    with pytest.raises(ConfigError, match=r"preset\.claims\[0\]\.otherwise = None: required"):
        claims_from_list([raw], "preset.claims")
    with pytest.raises(ConfigError, match="a list of claim objects"):
        claims_from_list({"says": "s"}, "preset.claims")


# --- claims.json from the CLI ----------------------------------------------------------------
def test_a_claim_book_keeps_each_claim_as_the_run_showed_it_at_its_step():
    # A History of 30 points thins from step 300 on (probes every 10 steps). The jitter
    # claim about step 200 is settled by the book while the run is still unthinned;
    # re-read after thinning, the same claim rests on half the points and measures less.
    claim = dataclasses.replace(
        next(c for c in load_claims("noisy-bn") if c.quantity == "jitter"), at=200
    )
    config = load_preset("noisy-bn").replace(steps=1200, max_points=30, device="cpu")
    trainer = make_trainer(config)
    book = ClaimBook([claim])
    trainer.advance(steps=250)
    (settled,) = book.results(trainer.history)
    assert settled.holds is not None and trainer.history.stride == 1
    trainer.advance(steps=950)
    assert trainer.history.stride > 1
    (kept,) = book.results(trainer.history)
    assert kept == settled
    reread = check(claim, trainer.history)
    assert reread.measured != settled.measured


def test_cli_run_writes_claims_json(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "--preset", "ioffe-fig1", "--steps", "40", "--out", str(out)]) == 0
    assert "claims.json" in capsys.readouterr().out
    written = json.loads((out / "claims.json").read_text())
    claims = load_claims("ioffe-fig1")
    assert isinstance(written, list) and len(written) == len(claims)
    for item, c in zip(written, claims, strict=True):
        assert {"claim", "measured", "threshold", "holds"} <= set(item)
        assert item["claim"] == c.says and item["threshold"] == c.threshold
        assert item["holds"] is None  # 40 steps: short of the step each claim is checked at
        assert f"checked at step {c.at:,}" in item["reason"]
        assert all(isinstance(v, float) for v in item["measured"].values())


# --- the live page shows them ----------------------------------------------------------------
def test_the_live_page_shows_the_presets_claims_checked(app_path):
    at = AppTest.from_file(str(app_path), default_timeout=60).run()
    assert not at.exception
    assert at.session_state.preset == "ioffe-fig1"
    for _ in range(3):
        at = [b for b in at.button if b.label == "Step"][0].click().run()
        assert not at.exception, [e.value for e in at.exception]
    assert at.session_state.trainer.step == 3
    markdown = [md.value for md in at.main.markdown]
    heading = [i for i, text in enumerate(markdown) if text.startswith("**What this run shows")]
    assert len(heading) == 1, markdown
    claims = load_claims("ioffe-fig1")
    assert f"0 of {len(claims)} hold" in markdown[heading[0]]  # none is due before step 1,000
    panel = "\n".join(markdown[heading[0] + 1 : heading[0] + 1 + len(claims)])
    for c in claims:
        assert c.says in panel or c.otherwise in panel, c.says
        assert f"holds when {c.threshold}" in panel
    assert panel.count("measured:") == len(claims)
    assert panel.count("the run is at step 3") == len(claims)
