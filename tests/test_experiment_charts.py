"""The teaching-experiment figures: every chart is labelled, and plots the experiment's arrays."""

from __future__ import annotations

import math

import numpy as np
import plotly.graph_objects as go
import pytest

from bn_core import figures
from bn_core.config import load_preset
from bn_core.data import load_dataset
from bn_core.experiments import charts
from bn_core.experiments.blowup import blowup_summary, network_blowup, run_blowup
from bn_core.experiments.inside import (
    batch_size_noise,
    momentum_conventions,
    placement_runs,
    scale_invariance,
    stages,
    synthetic_batch,
    train_eval_gap,
)
from bn_core.experiments.sweep import LrSweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --- the experiments, small ------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits", seed=0, probe_size=50)


@pytest.fixture(scope="module")
def blowup():
    return run_blowup(steps=60, lr=0.2, b0=0.5)


@pytest.fixture(scope="module")
def blowup_scaled():
    return run_blowup(steps=60, lr=0.2, scale=True)


@pytest.fixture(scope="module")
def net(digits):
    cfg = load_preset("bias-blowup").replace(width=16, device="cpu", probe_size=50)
    return network_blowup(cfg, steps=25, dataset=digits)


@pytest.fixture(scope="module")
def batch_stages():
    return stages(synthetic_batch(40, mean=3.0, std=2.0), gamma=1.5, beta=-1.0)


@pytest.fixture(scope="module")
def gap():
    return train_eval_gap(momenta=(0.05, 0.5), steps=30, batch=16)


@pytest.fixture(scope="module")
def conventions(gap):
    return momentum_conventions(gap.batch_means, m_torch=0.1)


@pytest.fixture(scope="module")
def noise():
    return batch_size_noise(batch_sizes=(2, 8, 32), trials=60)


@pytest.fixture(scope="module")
def invariance():
    return scale_invariance(a_values=(1e-3, 0.1, 1.0, 10.0, 1000.0))


@pytest.fixture(scope="module")
def placement(digits):
    cfg = load_preset("placement").replace(
        variants=["batchnorm"], width=16, depth=2, device="cpu", probe_size=50
    )
    return placement_runs(steps=21, config=cfg, dataset=digits)


@pytest.fixture(scope="module")
def sweep(digits):
    """Three learning rates x {plain, batchnorm}, the last one high enough to diverge."""
    base = load_preset("ioffe-fig1").replace(
        width=16, depth=2, activation="relu", init_std=1.0, momentum=0.9, probe_size=50
    )
    run = LrSweep(base, [0.01, 0.5, 10.0], steps=40, dataset=digits)
    while not run.finished:
        run.advance(1.0)
    return run.result()


@pytest.fixture
def builders(
    blowup, net, batch_stages, gap, conventions, noise, invariance, placement, sweep
) -> dict[str, object]:
    """{EXPERIMENT_CHARTS key: builder(theme) -> Figure} for every experiment chart."""
    return {
        "blowup_bias": lambda theme: charts.blowup_bias(blowup, theme=theme),
        "blowup_loss": lambda theme: charts.blowup_loss(blowup, theme=theme),
        "network_bias_norms": lambda theme: charts.network_bias_norms(net, theme=theme),
        "network_bias_grads": lambda theme: charts.network_bias_grads(net, theme=theme),
        "network_loss_accuracy": lambda theme: figures.loss_accuracy(net.history, theme=theme),
        "bn_stages": lambda theme: charts.stages_histograms(batch_stages, theme=theme),
        "train_eval_gap": lambda theme: charts.train_eval_gap_chart(
            gap, batch_size=16, theme=theme
        ),
        "momentum_conventions": lambda theme: charts.momentum_chart(
            conventions, gap.batch_means, population_mean=gap.population_mean, theme=theme
        ),
        "batch_size_noise": lambda theme: charts.batch_size_noise_chart(noise, theme=theme),
        "scale_invariance": lambda theme: charts.scale_invariance_chart(
            invariance, selected=10.0, theme=theme
        ),
        "placement": lambda theme: charts.placement_chart(placement, threshold=0.97, theme=theme),
        "lr_sweep": lambda theme: charts.lr_sweep_chart(sweep, theme=theme),
        "small_batch": lambda theme: charts.small_batch_chart(_small_batch_result(), theme=theme),
    }


def _small_batch_result():
    """A made-up study: the chart draws whatever numbers it is given (the study's own
    numbers are tested in tests/test_small_batch.py)."""
    from bn_core.experiments.small_batch import BatchOne, BatchSizeRow, StudyResult

    rows = [
        BatchSizeRow(
            b,
            100,
            {"plain": 0.8, "batchnorm": 0.9, "layernorm": 0.85, "groupnorm": 0.86},
            0.8,
            0.1,
            0.2,
            0.3 / b,
            {},
        )
        for b in (2, 4, 8)
    ]
    one = BatchOne("refused", "refused", 100, {"plain": 0.2, "layernorm": 0.6, "groupnorm": 0.5})
    return StudyResult(rows, one, 100, (2, 4, 8), 359, 0, 300, None)


# --- helpers ---------------------------------------------------------------------------------
def trace(fig: go.Figure, name: str) -> go.Scatter:
    found = [t for t in fig.data if t.name == name]
    assert found, f"no trace {name!r} in {[t.name for t in fig.data]}"
    return found[0]


def traces(fig: go.Figure, name: str) -> list:
    return [t for t in fig.data if t.name == name]


def used_axes(fig: go.Figure) -> set[str]:
    """Layout keys ("xaxis", "yaxis2", ...) of the axes that carry a trace."""
    out = set()
    for t in fig.data:
        for ref, prefix in ((t.xaxis or "x", "xaxis"), (t.yaxis or "y", "yaxis")):
            out.add(prefix + ref[1:])
    return out


def legend_names(fig: go.Figure) -> list[str]:
    return [t.name for t in fig.data if t.showlegend is not False and t.name]


# --- every chart -----------------------------------------------------------------------------
def test_registry_has_a_title_and_a_short_caption_per_chart(builders):
    assert set(charts.EXPERIMENT_CHARTS) == set(builders)
    assert not set(charts.EXPERIMENT_CHARTS) & set(figures.CHARTS)  # one lookup, no clashes
    for key, info in charts.EXPERIMENT_CHARTS.items():
        assert info.key == key and info.title and info.caption
        sentences = [s for s in info.caption.replace("e.g.", "eg").split(". ") if s.strip()]
        assert 1 <= len(sentences) <= 3, key  # one or two sentences (three short at most)


@pytest.mark.parametrize("theme", ["screen", "print"])
def test_every_chart_has_title_axis_titles_and_legend(builders, theme):
    for key, build in builders.items():
        fig = build(theme)
        assert isinstance(fig, go.Figure), key
        assert fig.layout.title.text, key
        assert fig.layout.meta["theme"] == theme, key
        for axis in used_axes(fig):
            # Shared x axes title only the bottom panel: a matched axis may go without.
            layout_axis = fig.layout[axis]
            if axis.startswith("xaxis") and layout_axis.matches:
                continue
            if axis.startswith("xaxis") and not layout_axis.title.text:
                assert any(
                    fig.layout[a].title.text for a in used_axes(fig) if a.startswith("xaxis")
                ), key
                continue
            if axis.startswith("yaxis") and not layout_axis.title.text:
                # Small multiples title the first column's y axes only.
                assert any(
                    fig.layout[a].title.text for a in used_axes(fig) if a.startswith("yaxis")
                ), key
                continue
            assert layout_axis.title.text, (key, axis)
        assert fig.layout.showlegend, key
        assert len(legend_names(fig)) >= 2, (key, legend_names(fig))


def test_print_theme_is_larger_and_switches_back(builders):
    for key, build in builders.items():
        screen, printed = build("screen"), build("print")
        assert printed.layout.font.size > screen.layout.font.size, key
        assert printed.layout.title.font.size > screen.layout.title.font.size, key
        # apply_theme on a built figure gives the same look as building it for print.
        again = figures.apply_theme(build("screen"), "print")
        assert again.layout.font.size == printed.layout.font.size, key
        assert again.layout.height == printed.layout.height, key
        back = figures.apply_theme(again, "screen")
        assert back.layout.height == screen.layout.height, key


def test_unknown_theme_is_refused(blowup):
    with pytest.raises(ValueError, match="theme"):
        charts.blowup_bias(blowup, theme="poster")


def test_naive_and_aware_keep_their_variant_colors(blowup, net):
    fig = charts.blowup_bias(blowup)
    assert trace(fig, "naive (μ_B held constant)").line.color == "#D55E00"
    assert trace(fig, "aware (through μ_B)").line.color == "#0072B2"
    fig = charts.network_bias_norms(net)
    colors = {t.name.split()[0]: t.line.color for t in fig.data}
    assert colors["batchnorm"] == figures.VARIANT_COLORS["batchnorm"]
    assert colors["batchnorm-naive"] == figures.VARIANT_COLORS["batchnorm-naive"]


# --- the data behind each chart --------------------------------------------------------------
def test_blowup_bias_plots_the_runs_and_the_predicted_ramp(blowup):
    fig = charts.blowup_bias(blowup)
    naive = trace(fig, "naive (μ_B held constant)")
    np.testing.assert_array_equal(naive.x, blowup.steps)
    np.testing.assert_array_equal(naive.y, blowup.bias_naive)
    np.testing.assert_array_equal(trace(fig, "aware (through μ_B)").y, blowup.bias_aware)
    predicted = trace(fig, "predicted b₀ + k·(−lr·g)")
    assert predicted.line.dash == "dash"
    np.testing.assert_allclose(
        predicted.y, blowup.b0 + blowup.steps * blowup.predicted_slope, rtol=1e-15
    )
    # The dashed prediction lies on the measured line.
    np.testing.assert_allclose(predicted.y, naive.y, rtol=1e-9)


def test_blowup_loss_is_flat_on_an_axis_from_zero(blowup):
    fig = charts.blowup_loss(blowup)
    loss_traces = traces(fig, "naive (μ_B held constant)")
    assert len(loss_traces) == 2  # the loss, and its change since step 0
    loss, change = loss_traces
    np.testing.assert_array_equal(loss.y, blowup.loss_naive)
    np.testing.assert_array_equal(change.y, blowup.loss_naive - blowup.loss_naive[0])
    np.testing.assert_array_equal(traces(fig, "aware (through μ_B)")[0].y, blowup.loss_aware)
    low, high = fig.layout[f"yaxis{loss.yaxis[1:]}"].range
    assert low == 0 and high > blowup.loss_naive.max()
    assert np.max(np.abs(change.y)) <= 1e-10  # rounding, shown on its own axis
    assert "largest change" in fig.layout.title.subtitle.text


@pytest.mark.parametrize("scaled", [False, True])
def test_blowup_summary_measured_slope_matches_the_prediction(blowup, blowup_scaled, scaled):
    result = blowup_scaled if scaled else blowup
    s = blowup_summary(result)
    assert s.measured_slope == pytest.approx(s.predicted_slope, rel=1e-9)
    assert s.predicted_slope == pytest.approx(result.predicted_slope, rel=1e-12)
    assert s.grad_sum == pytest.approx(len(result.u) * result.offset)
    expected_divisor = math.sqrt(np.var(result.u) + result.eps) if scaled else 1.0
    assert s.divisor == pytest.approx(expected_divisor, rel=1e-12)
    assert s.aware_drift <= 1e-12 and s.loss_change <= 1e-10


def test_network_charts_plot_every_layer_and_step(net):
    for build, metric in (
        (charts.network_bias_norms, "bias_norm"),
        (charts.network_bias_grads, "bias_grad_norm"),
    ):
        fig = build(net)
        for variant in net.variants:
            lines = [t for t in fig.data if t.name.split()[0] == variant]
            assert len(lines) == len(net.layers)
            for li, line in enumerate(lines):
                np.testing.assert_array_equal(line.x, net.steps)
                np.testing.assert_array_equal(line.y, net.series(variant, metric)[li])
        titles = [a.text for a in fig.layout.annotations if a.name == "subplot_title"]
        assert titles == net.layers
    assert charts.network_bias_grads(net).layout.yaxis.type == "log"
    ranges = net.bias_grad_range()
    assert ranges["batchnorm"][1] <= 1e-6 < ranges["batchnorm-naive"][0]


def test_stage_histograms_plot_the_three_stages_on_matching_bins(batch_stages):
    fig = charts.stages_histograms(batch_stages)
    x, x_hat, y = fig.data
    np.testing.assert_array_equal(x.x, batch_stages.x)
    np.testing.assert_array_equal(x_hat.x, batch_stages.x_hat)
    np.testing.assert_array_equal(y.x, batch_stages.y)
    # The bins of x and y are the x_hat bins under x = mu + std x_hat, y = beta + gamma x_hat.
    assert x.xbins.size == pytest.approx(batch_stages.std_B * x_hat.xbins.size)
    assert y.xbins.size == pytest.approx(batch_stages.gamma * x_hat.xbins.size)
    assert x.xbins.start == pytest.approx(
        batch_stages.mu_B + batch_stages.std_B * x_hat.xbins.start
    )
    lines = [s.x0 for s in fig.layout.shapes if s.name == "guide"]
    assert batch_stages.mu_B in lines and batch_stages.beta in lines


def test_stage_histograms_of_a_constant_batch_still_draw():
    fig = charts.stages_histograms(stages(np.full(8, 2.0)))
    assert len(fig.data) == 3


def test_train_eval_gap_chart(gap):
    fig = charts.train_eval_gap_chart(gap, batch_size=16)
    for i, m in enumerate(gap.momenta):
        gap_line, mean_line, var_line = traces(fig, f"momentum m = {m:g}")
        np.testing.assert_array_equal(gap_line.y, gap.gap[i])
        np.testing.assert_array_equal(mean_line.y, gap.running_mean[i])
        np.testing.assert_array_equal(var_line.y, gap.running_var[i])
    references = traces(fig, "population statistics (reference)")
    levels = sorted(t.y[0] for t in references)
    expected = sorted([gap.gap_at_population, gap.population_mean, gap.population_var])
    assert levels == pytest.approx(expected)
    assert all(t.line.dash == "dash" for t in references)
    assert "batches of 16" in fig.layout.title.subtitle.text


def test_momentum_chart_pytorch_and_keras_coincide(conventions, gap):
    fig = charts.momentum_chart(conventions, gap.batch_means, population_mean=2.0)
    torch_line = trace(fig, "PyTorch, m = 0.1")
    keras_line = trace(fig, "Keras, m = 0.9")
    np.testing.assert_array_equal(torch_line.y, conventions.torch)
    np.testing.assert_array_equal(keras_line.y, conventions.keras)
    np.testing.assert_allclose(torch_line.y, keras_line.y, rtol=0, atol=1e-12)
    assert conventions.largest_gap == np.max(np.abs(torch_line.y - keras_line.y)) < 1e-12
    assert charts.sci_format(conventions.largest_gap) in fig.layout.title.subtitle.text
    np.testing.assert_array_equal(
        trace(fig, "mixed up: PyTorch's rule with m = 0.9").y, conventions.mistaken
    )
    np.testing.assert_array_equal(trace(fig, "μ_B of each batch").y, gap.batch_means)
    assert conventions.mistaken_noise > 2 * conventions.torch_noise


def test_batch_size_noise_chart_is_log_log_with_closed_forms(noise):
    fig = charts.batch_size_noise_chart(noise)
    np.testing.assert_array_equal(trace(fig, "std of μ_B (measured)").y, noise.mean_std)
    np.testing.assert_array_equal(trace(fig, "σ/√n").y, noise.mean_std_theory)
    np.testing.assert_array_equal(trace(fig, "std of σ²_B (measured)").y, noise.var_std)
    assert trace(fig, "σ/√n").line.dash == "dash"
    assert fig.layout.xaxis.type == "log" and fig.layout.yaxis.type == "log"


def test_scale_invariance_chart(invariance):
    fig = charts.scale_invariance_chart(invariance, selected=10.0)
    fixed = traces(fig, f"ε = {invariance.eps:g} fixed")
    np.testing.assert_array_equal(fixed[0].y, invariance.grad_ratio)
    np.testing.assert_array_equal(fixed[1].y, np.maximum(invariance.max_change, charts.LOG_FLOOR))
    np.testing.assert_array_equal(trace(fig, "1/a").y, 1.0 / invariance.a)
    # The picked a is marked on both panels, in data coordinates of the log axis.
    assert [s.x0 for s in fig.layout.shapes] == [10.0, 10.0]
    assert fig.layout.xaxis.type == fig.layout.xaxis2.type == "log"


def test_placement_chart_plots_loss_and_saturation_per_layer(placement):
    fig = charts.placement_chart(placement, threshold=0.97)
    for where, history in placement.items():
        lines = traces(fig, f"BN {where} the sigmoid")
        assert len(lines) == 1 + len(history.layers())
        _, loss = history.series("batchnorm", "", "loss")
        np.testing.assert_array_equal(lines[0].y, loss)
        for line, layer in zip(lines[1:], history.layers(), strict=True):
            _, share = history.series("batchnorm", layer, "saturation")
            np.testing.assert_array_equal(line.y, share)
    assert "0.03" in fig.layout.title.subtitle.text and "0.97" in fig.layout.title.subtitle.text
    # The saturation axis fits the data (often a few percent) instead of running to 100%.
    top = max(float(np.max(t.y)) for t in fig.data if t.yaxis not in (None, "y"))
    low, high = fig.layout.yaxis2.range
    assert low == 0 and top <= high <= max(0.05, 1.15 * top) + 1e-12


def test_sci_format():
    assert charts.sci_format(0.0) == "0"
    assert charts.sci_format(3.2e-12) == "3.2e-12"
    assert charts.sci_format(0.5) == "0.5"
    assert charts.sci_format(math.nan) == "–"


def test_lr_sweep_chart_draws_each_run_and_marks_divergence_and_usable_spans(sweep):
    fig = charts.lr_sweep_chart(sweep)
    for label in ("plain", "batchnorm"):
        points = [p for p in sweep.points if p.label == label]
        loss_line, acc_line = [t for t in fig.data if t.name == label]
        assert list(loss_line.x) == [p.lr for p in points] == [0.01, 0.5, 10.0]
        np.testing.assert_array_equal(loss_line.y, [p.loss for p in points])
        np.testing.assert_array_equal(acc_line.y, [p.test_accuracy for p in points])
        assert loss_line.line.color == figures.VARIANT_COLORS[label]
        gone = [p for p in points if p.diverged_at is not None]
        marks = [t for t in fig.data if t.name == f"{label}: diverged"]
        assert len(marks) == (1 if gone else 0)
        if gone:
            assert list(marks[0].x) == [p.lr for p in gone]
            assert marks[0].text[0] == f"diverged at step {gone[0].diverged_at}"
        shades = [
            s
            for s in fig.layout.shapes
            if s.name == "usable" and s.fillcolor == loss_line.line.color
        ]
        bars = [t for t in fig.data if t.name == f"{label}: usable"]
        span = sweep.usable[label]
        assert len(shades) == len(bars) == (0 if span is None else 1)
        if span is not None:
            assert (shades[0].x0, shades[0].x1) == span == tuple(bars[0].x)
            assert bars[0].xaxis == acc_line.xaxis and max(bars[0].y) < 0  # under 0%
            # The hover says the range in words, a lower bound (≥) where it reaches an
            # end of the grid.
            text = sweep.usable_text(label)
            assert f"usable: {text}<extra>" in bars[0].hovertemplate
            assert ("≥" in text) == (span[0] <= 0.01 or span[1] >= 10.0)
    assert any(p.diverged_at is not None for p in sweep.points)  # the test needs one
    assert any(sweep.usable.values())  # and a usable span
    assert fig.layout.xaxis2.type == "log"
    assert fig.layout.title.subtitle.text.startswith("40 of 40 steps")
