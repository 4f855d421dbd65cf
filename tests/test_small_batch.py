"""The small-batch study and its page: numbers against an independent computation on a short
real study, BN's batch-1 refusals, the checks across batch sizes, the chart, and the page
under AppTest (start, finish, stop, bad input)."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from chart_elements import page_charts
from streamlit.testing.v1 import AppTest

from bn_core import export
from bn_core.batchnorm import BatchNorm
from bn_core.claims import load_claims
from bn_core.config import ConfigError, RunConfig, load_preset
from bn_core.experiments import make_trainer
from bn_core.experiments.charts import EXPERIMENT_CHARTS, small_batch_chart
from bn_core.experiments.small_batch import (
    BATCH_SIZES,
    DEFAULT_STEPS,
    MAX_STEPS,
    MIN_STEPS,
    PRESET,
    BatchOne,
    BatchSizeRow,
    SmallBatchStudy,
    StudyResult,
    batch_statistics_accuracy,
    check_steps,
    study_checks,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PAGE = "pages/small_batches.py"
CHARTS = "small-batches"  # the page's chart-key prefix
SIZES = (2, 4, 60)  # the test study: the batch sizes every check reads
MAX_RERUNS = 40


@pytest.fixture(scope="module")
def study(one_torch_thread_for_module) -> SmallBatchStudy:
    """A finished study of MIN_STEPS steps at batch sizes 2, 4 and 60 (and 1)."""
    study = SmallBatchStudy(load_preset(PRESET), steps=MIN_STEPS, batch_sizes=SIZES)
    while not study.finished:
        study.advance(seconds=1.0)
    return study


# --- the numbers against an independent computation ----------------------------------------
def hand_train_mode_accuracy(trainer, variant: str, batch_size: int, seed: int) -> float:
    """The variant's net written out with torch.nn.functional, BN normalizing each batch of
    ``batch_size`` test examples with the batch's own statistics (F.batch_norm in training
    mode, no running buffers)."""
    model, v = trainer.model, trainer.variant_names.index(variant)
    x, y = trainer.dataset.x_test, trainer.dataset.y_test
    n = len(x)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    batches = [perm[i : i + batch_size] for i in range(0, n, batch_size)]
    scored_last = len(batches[-1])
    batches[-1] = batches[-1] + perm[: batch_size - scored_last]  # topped up, not scored
    correct = 0
    with torch.no_grad():
        for k, index in enumerate(batches):
            h = x[index]
            for W, b, norm in zip(model.weights, model.biases, model.norms, strict=True):
                z = h @ W[v] + b[v, 0] * model.bias_mask[v, 0]
                gamma, beta = norm.affine(v)
                h = torch.sigmoid(F.batch_norm(z, None, None, gamma, beta, training=True))
            logits = h @ model.out_weight[v] + model.out_bias[v, 0]
            scored = scored_last if k == len(batches) - 1 else batch_size
            correct += int((logits.argmax(1)[:scored] == y[index[:scored]]).sum())
    return correct / n


@pytest.mark.parametrize("batch_size", SIZES)
def test_train_mode_accuracy_is_a_hand_evaluation_with_batch_statistics(study, batch_size):
    trainer = study.trainer(batch_size)
    row = study.result().row(batch_size)
    n = len(trainer.dataset.x_test)
    expected = hand_train_mode_accuracy(trainer, "batchnorm", batch_size, seed=0)
    # Our BN and F.batch_norm round differently: at most one near-tie may flip.
    assert abs(row.bn_train_mode_accuracy - expected) <= 1 / n + 1e-12


def test_train_mode_pass_leaves_the_run_untouched_and_per_example_norms_unchanged(study):
    trainer = study.trainer(4)
    buffers = [b.clone() for b in trainer.model.buffers()]
    accuracy = batch_statistics_accuracy(trainer, 4, seed=0)
    for before, after in zip(buffers, trainer.model.buffers(), strict=True):
        assert torch.equal(before, after)  # running statistics neither read nor moved
    assert trainer.model.training
    # LayerNorm and GroupNorm do not depend on the batch: train mode is their eval mode.
    n = len(trainer.dataset.x_test)
    for variant in ("layernorm", "groupnorm", "plain"):
        v = trainer.variant_names.index(variant)
        _, evaluated = trainer.history.series(variant, "", "test_accuracy")
        assert abs(accuracy[v] - evaluated[-1]) <= 1 / n + 1e-12, variant


def test_rows_read_the_last_evaluation_and_the_running_buffers(study):
    result = study.result()
    assert [r.batch_size for r in result.rows] == list(SIZES)
    for row in result.rows:
        trainer = study.trainer(row.batch_size)
        h = trainer.history
        assert row.steps == MIN_STEPS and row.examples == MIN_STEPS * row.batch_size
        for variant in ("plain", "batchnorm", "layernorm", "groupnorm"):
            steps, values = h.series(variant, "", "test_accuracy")
            assert steps[-1] == MIN_STEPS and row.accuracy[variant] == values[-1]
        layers = h.layers("batchnorm")
        assert len(layers) == 3
        for metric, value in (
            ("running_mean_error", row.running_mean_error),
            ("running_var_error", row.running_var_error),
        ):
            last = [h.series("batchnorm", layer, metric)[1][-1] for layer in layers]
            assert value == pytest.approx(np.mean(last), rel=1e-12)
        # The relative error, from the BN layers of the net rebuilt as a torch Sequential.
        net = trainer.model.to_sequential(trainer.variant_names.index("batchnorm"))
        variances = [m.running_var.mean().item() for m in net if isinstance(m, BatchNorm)]
        errors = [h.series("batchnorm", layer, "running_var_error")[1][-1] for layer in layers]
        expected = np.mean([e / var for e, var in zip(errors, variances, strict=True)])
        assert row.relative_var_error == pytest.approx(expected, rel=1e-6)


def test_the_study_run_at_the_preset_batch_size_is_the_preset_run(study):
    """Same config but its length and probe cadence: the same test accuracies at every
    evaluation, so the page may read the preset's claims off the study's run."""
    preset = make_trainer(load_preset(PRESET).replace(steps=MIN_STEPS, device="cpu"))
    preset.advance(steps=MIN_STEPS)
    ours = study.trainer(load_preset(PRESET).batch_size)
    for variant in preset.variant_names:
        theirs_steps, theirs = preset.history.series(variant, "", "test_accuracy")
        our_steps, our_values = ours.history.series(variant, "", "test_accuracy")
        np.testing.assert_array_equal(our_steps, theirs_steps)
        np.testing.assert_array_equal(our_values, theirs)


def test_preset_claims_are_about_the_study_run():
    base = load_preset(PRESET)
    assert base.batch_size in BATCH_SIZES
    claims = load_claims(PRESET)
    assert claims and max(c.at for c in claims) <= DEFAULT_STEPS
    for claim in claims:
        assert set(claim.variants) <= {"plain", "batchnorm", "layernorm", "groupnorm"}
        # Metrics the study's runs record at the preset's own cadence.
        assert claim.metric in ("test_accuracy", "test_loss", "running_var_error")


# --- batch 1 -----------------------------------------------------------------------------
def test_batch_one_refusals_are_the_config_and_layer_messages(study):
    one = study.result().batch_one
    with pytest.raises(ConfigError) as refused:
        RunConfig(variants=["batchnorm"], batch_size=1)
    assert one.config_refusal == str(refused.value)
    assert one.config_refusal.startswith("batch_size = 1: allowed: ")
    # The layer's own words for one example of the study's width (100 units).
    with pytest.raises(ValueError) as layer:
        BatchNorm(100).train()(torch.zeros(1, 100))
    assert one.layer_refusal == str(layer.value)
    assert "(1, 100)" in one.layer_refusal


def test_per_example_norms_train_at_batch_one(study):
    trainer = study.trainer(1)
    assert trainer.config.batch_size == 1 and trainer.finished
    assert trainer.variant_names == ["plain", "layernorm", "groupnorm"]
    one = study.result().batch_one
    assert one.steps == MIN_STEPS
    for variant, value in one.accuracy.items():
        assert value == trainer.history.series(variant, "", "test_accuracy")[1][-1]
        assert 0 <= value <= 1


# --- steps -------------------------------------------------------------------------------
@pytest.mark.parametrize("value", [MIN_STEPS - 1, MAX_STEPS + 1, 0, -5, 150.5, math.nan, "100"])
def test_bad_steps_name_the_field_value_and_range(value):
    with pytest.raises(ConfigError) as err:
        check_steps(value)
    assert str(err.value) == f"steps = {value!r}: allowed: an integer in [100, 5,000]"


def test_good_steps_pass():
    assert check_steps(MIN_STEPS) == MIN_STEPS
    assert check_steps(float(MAX_STEPS)) == MAX_STEPS
    with pytest.raises(ConfigError, match="^steps = True: "):
        check_steps(True)


# --- the checks across batch sizes ---------------------------------------------------------
def _row(b: int, bn=0.9, train=0.9, ln=0.9, gn=0.9, plain=0.9, relative=0.1) -> BatchSizeRow:
    accuracy = {"plain": plain, "batchnorm": bn, "layernorm": ln, "groupnorm": gn}
    return BatchSizeRow(b, 100, accuracy, train, 0.0, 0.0, relative, {})


def _result(rows, one=None, sizes=BATCH_SIZES) -> StudyResult:
    return StudyResult(rows, BatchOne("", "", 100, one), 100, sizes, 359, 0, 600, None)


def test_checks_wait_for_their_batch_sizes():
    for check in study_checks(_result([])):
        assert check.holds is None and not check.measured
        assert check.reason.startswith("waits for batch"), check.reason
    checks = study_checks(_result([_row(8)], sizes=(8, 16)))
    assert checks[0].reason == "this study has no batch 2"
    assert checks[2].reason == "this study has no batch 2"


def test_checks_hold_and_fail_at_their_thresholds():
    one_good = {"plain": 0.1, "layernorm": 0.3, "groupnorm": 0.26}
    good = _result(
        [
            _row(2, bn=0.5, ln=0.56, gn=0.7, relative=0.5),
            _row(4, bn=0.9, train=0.81),
            _row(60, bn=0.97, train=0.95, relative=0.09),
        ],
        one_good,
    )
    checks = study_checks(good)
    assert [c.holds for c in checks] == [True] * 5, [c.measured for c in checks]
    assert [c.sentence for c in checks] == [c.says for c in checks]
    assert checks[0].measured["gap"] == pytest.approx(0.06)
    assert checks[1].measured["gap"] == pytest.approx(0.09)
    assert checks[2].measured["ratio"] == pytest.approx(0.5 / 0.09)
    assert checks[3].measured["gap"] == pytest.approx(0.02)
    assert checks[4].measured["gap"] == pytest.approx(0.16)

    bad = _result(
        [
            _row(2, bn=0.5, ln=0.54, gn=0.9, relative=0.4),
            _row(4, bn=0.9, train=0.83),
            _row(60, bn=0.97, train=0.93, relative=0.09),
        ],
        {"plain": 0.1, "layernorm": 0.24, "groupnorm": 0.9},
    )
    checks = study_checks(bad)
    assert [c.holds for c in checks] == [False] * 5, [c.measured for c in checks]
    assert [c.sentence for c in checks] == [c.otherwise for c in checks]
    assert "gap 0.04" in checks[0].measured_text()


def test_checks_on_the_real_study_are_settled(study):
    checks = study_checks(study.result())
    assert all(c.holds is not None and c.measured for c in checks), [c.reason for c in checks]


# --- the chart ---------------------------------------------------------------------------
def _values(trace, field):
    return np.asarray(getattr(trace, field), dtype=float)


def test_chart_draws_every_row(study):
    result = study.result()
    fig = small_batch_chart(result)
    traces = {t.name: t for t in fig.data}
    sizes = [float(b) for b in SIZES]
    rows = result.rows
    np.testing.assert_array_equal(
        _values(traces["batchnorm, eval mode (running statistics)"], "y"),
        [r.accuracy["batchnorm"] for r in rows],
    )
    np.testing.assert_array_equal(
        _values(traces["batchnorm, train mode (batch statistics)"], "y"),
        [r.bn_train_mode_accuracy for r in rows],
    )
    for variant in ("plain", "layernorm", "groupnorm"):  # these have a batch-1 point too
        np.testing.assert_array_equal(_values(traces[variant], "x"), [1.0, *sizes])
        np.testing.assert_array_equal(
            _values(traces[variant], "y"),
            [result.batch_one.accuracy[variant], *(r.accuracy[variant] for r in rows)],
        )
    error = traces["batchnorm: |running var − var| / running var"]
    np.testing.assert_array_equal(_values(error, "x"), sizes)
    np.testing.assert_array_equal(_values(error, "y"), [r.relative_var_error for r in rows])
    assert fig.layout.title.text == EXPERIMENT_CHARTS["small_batch"].title
    assert fig.layout.xaxis2.title.text == "batch size (log scale)"
    assert small_batch_chart(result, theme="print").layout.title.text  # the export's theme


def test_export_writes_the_chart_numbers(study):
    """The export panel's path: the page's figure as CSV rows and offline HTML."""
    result = study.result()
    info = EXPERIMENT_CHARTS["small_batch"]
    spec = export.spec_from_figure(
        "small-batches", "small_batch", small_batch_chart(result), info.caption
    )
    assert spec.filename == "small-batches_small-batch_none_step0"
    files = export.chart_files(spec, formats=("csv", "html"))
    rows = pd.read_csv(io.BytesIO(files["csv"]))
    train_mode = rows[rows.trace == "batchnorm, train mode (batch statistics)"]
    np.testing.assert_array_equal(train_mode.x, SIZES)
    np.testing.assert_allclose(train_mode.y, [r.bn_train_mode_accuracy for r in result.rows])
    assert info.title.encode() in files["html"]


def test_chart_before_any_row_says_no_data():
    fig = small_batch_chart(_result([]))
    notes = [a.text for a in fig.layout.annotations if a.name == "note"]
    assert notes.count("no data yet") == 2


# --- the page ----------------------------------------------------------------------------
def run(target) -> AppTest:
    at = target.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def open_page(app_path) -> AppTest:
    at = run(AppTest.from_file(str(app_path), default_timeout=60))
    return run(at.switch_page(PAGE))


def button(at: AppTest, label: str):
    (found,) = [b for b in at.button if b.label == label]
    return found


def start(at: AppTest, steps, seed=0) -> AppTest:
    run(at.number_input(key="sb_w_steps").set_value(steps))
    run(at.number_input(key="sb_w_seed").set_value(seed))
    return run(button(at, "Start study").click())


def progress(at: AppTest) -> str:
    (text,) = [p.proto.text for p in at.get("progress")]
    return text


def decode(values) -> np.ndarray:
    if isinstance(values, dict):  # plotly's base64 typed arrays
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    return np.asarray(values, dtype=float)


def test_page_waits_for_start_and_refuses_bad_input(app_path):
    at = open_page(app_path)
    assert at.title[0].value == "Small batches and inference"
    assert any("press **Start study**" in i.value for i in at.info)
    assert not at.get("progress") and not at.dataframe and not page_charts(at, CHARTS)
    assert not button(at, "Start study").disabled and button(at, "Stop").disabled
    for steps, seed, text in (
        (20, 0, "steps = 20: allowed: an integer in [100, 5,000]"),
        (200, -1, "seed = -1: allowed: an integer in [0, 2147483647]"),
    ):
        at = start(at, steps, seed)
        assert [e.value for e in at.error] == [
            f"The study did not start; the last one is kept. {text}"
        ]
        assert "sb_study" not in at.session_state and not at.session_state.sb_running


def test_page_runs_a_study_to_the_end_and_keeps_it(app_path):
    at = start(open_page(app_path), MIN_STEPS)
    study = at.session_state.sb_study
    assert at.session_state.sb_running and button(at, "Start study").disabled
    for _ in range(MAX_RERUNS):
        if not at.session_state.sb_running:
            break
        run(at)
    assert study.finished and not at.session_state.sb_running
    total = MIN_STEPS * (len(BATCH_SIZES) + 1)
    assert progress(at) == (
        f"Study finished: {total} of {total} steps (batch sizes 2, 4, 8, 16, 60 and 1, "
        f"{MIN_STEPS} steps each)"
    )
    assert not at.error

    result = study.result()
    table = at.dataframe[0].value
    assert list(table["batch size"]) == list(BATCH_SIZES)
    assert list(table["examples seen"]) == [MIN_STEPS * b for b in BATCH_SIZES]
    np.testing.assert_array_equal(
        table["BN, eval mode"], [r.accuracy["batchnorm"] for r in result.rows]
    )
    np.testing.assert_array_equal(
        table["BN, train mode"], [r.bn_train_mode_accuracy for r in result.rows]
    )
    fig = page_charts(at, CHARTS)["small_batch"]
    lines = {t["name"]: t for t in fig["data"]}
    np.testing.assert_array_equal(
        decode(lines["groupnorm"]["y"])[1:], [r.accuracy["groupnorm"] for r in result.rows]
    )
    assert EXPERIMENT_CHARTS["small_batch"].title in json.dumps(fig["layout"]["title"])
    assert EXPERIMENT_CHARTS["small_batch"].caption in [c.value for c in at.caption]

    markdown = [m.value for m in at.markdown]
    assert any(m.startswith("**What this study shows across batch sizes** · ") for m in markdown)
    assert any(m.startswith("**What the small-batch preset's run shows") for m in markdown)
    # The preset's claims are about step 1,000: at 100 steps they wait, and say why.
    claims = [m for m in markdown if "holds when batchnorm" in m and "at step 1,000" in m]
    assert claims and all("the run is at step 100" in m for m in claims)
    codes = [c.value for c in at.code]
    assert codes == [result.batch_one.config_refusal, result.batch_one.layer_refusal]
    metrics = {m.label: m.value for m in at.metric}
    for variant in ("layernorm", "groupnorm", "plain"):
        assert metrics[f"{variant}, batch 1"] == f"{result.batch_one.accuracy[variant]:.1%}"

    export = at.selectbox(key="w_export_small-batches")
    assert export.options == [EXPERIMENT_CHARTS["small_batch"].title]

    # A bad value now keeps this study on screen.
    at = start(at, MAX_STEPS + 1)
    assert [e.value for e in at.error] == [
        "The study did not start; the last one is kept. steps = 5001: allowed: an integer "
        "in [100, 5,000]"
    ]
    assert at.session_state.sb_study is study and len(at.dataframe[0].value) == len(BATCH_SIZES)


def test_stop_halts_the_study(app_path):
    at = start(open_page(app_path), MAX_STEPS)
    study = at.session_state.sb_study
    run(at)
    run(button(at, "Stop").click())
    assert not at.session_state.sb_running
    stopped = study.steps_done
    assert 0 < stopped < study.steps_total
    run(at)
    assert study.steps_done == stopped
    assert progress(at).startswith(f"Study stopped at batch 2: {stopped:,} of ")
    assert not button(at, "Start study").disabled and button(at, "Stop").disabled
