"""Plotly figures of the teaching experiments: one pure builder per chart.

Each builder takes the result of one function in ``blowup`` or ``inside`` (plus display
options and ``theme``), never computes a statistic the experiment did not return, and
comes back styled by the same theme code as ``bn_core.figures``, so the app and an export
draw the same chart. Traces keep the experiments' float64 arrays as they are: the
experiments are small, and a test can compare a trace with its array exactly.

``EXPERIMENT_CHARTS`` holds each chart's title and the caption a page shows under it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import plotly.graph_objects as go

from bn_core.experiments.blowup import BlowupResult, NetworkBlowup, blowup_summary
from bn_core.experiments.inside import (
    BatchSizeNoise,
    MomentumConventions,
    ScaleInvariance,
    Stages,
    TrainEvalGap,
)
from bn_core.experiments.small_batch import StudyResult
from bn_core.experiments.sweep import USABLE_WITHIN, SweepResult
from bn_core.figures import (
    GUIDE_COLOR,
    SIDE_BY_SIDE_GAP,
    STEP_AXIS,
    THEMES,
    ChartInfo,
    _Canvas,
    _check_theme,
    _finite,
    _log_axis,
    _Panel,
    _panel_title,
    variant_color,
)
from bn_core.history import History

__all__ = [
    "AWARE_COLOR",
    "EXPERIMENT_CHARTS",
    "NAIVE_COLOR",
    "batch_size_noise_chart",
    "blowup_bias",
    "blowup_loss",
    "lr_sweep_chart",
    "momentum_chart",
    "network_bias_grads",
    "network_bias_norms",
    "placement_chart",
    "scale_invariance_chart",
    "sci_format",
    "small_batch_chart",
    "stages_histograms",
    "train_eval_gap_chart",
]

# The section 2 comparison is batchnorm-naive against batchnorm: the same two colors as
# those variants have in every run chart.
NAIVE_COLOR = variant_color("batchnorm-naive", 1)  # vermillion
AWARE_COLOR = variant_color("batchnorm", 0)  # blue
INPUT_COLOR = "#E69F00"  # orange: the un-normalized input (the plain net's color)
NORMALIZED_COLOR = "#56B4E9"  # sky blue: x_hat, halfway to the BN output
PREDICTED_COLOR = "#000000"
# Several momenta or conventions in one chart: Okabe-Ito hues that no variant pair uses.
SERIES_COLORS = ("#56B4E9", "#0072B2", "#CC79A7", "#009E73", "#E69F00")
PLACEMENT_COLORS = {"before": "#0072B2", "after": "#009E73"}
# A log axis cannot show 0: exact zeros (perfect invariance) are drawn at this floor.
LOG_FLOOR = 1e-16

EXPERIMENT_CHARTS: dict[str, ChartInfo] = {
    info.key: info
    for info in (
        ChartInfo(
            "blowup_bias",
            "The bias b over gradient steps",
            "The naive gradient pushes b by the same amount every step, so it climbs on a "
            "straight line, exactly on the predicted ramp (dashed). With the gradient "
            "taken through the batch mean, b gets zero gradient and never moves.",
        ),
        ChartInfo(
            "blowup_loss",
            "The loss over the same steps",
            "Top: the loss of both runs on an axis from 0; it never moves. Bottom: the "
            "change since step 0, which is rounding noise of order 1e-12, however far b "
            "has gone.",
        ),
        ChartInfo(
            "network_bias_norms",
            "Bias norm before each BN layer",
            "With the naive gradient every layer's bias drifts away from 0: fast at first, "
            "then more and more slowly as the push on it shrinks. With the correct "
            "gradient the biases stay at their initial value 0: BN's beta does their job.",
        ),
        ChartInfo(
            "network_bias_grads",
            "Bias-gradient norm (log scale)",
            "Correct BN gives the bias a gradient of about 1e-8, float32 rounding of an "
            "exact 0. The naive gradient starts at about 0.08 to 0.3 and shrinks as the "
            "net learns, to about 0.01 by step 1,000 (single batches dip lower), so the "
            "drift slows; it stays far above the correct gradient's rounding.",
        ),
        ChartInfo(
            "network_loss_accuracy",
            "Training loss and test accuracy",
            "Both nets see the same batches. The drifting biases do not help the naive "
            "net: BN removes whatever they add, so what it learns comes from the weights, "
            "whose gradients the naive rule bends. It still trains, to a higher loss.",
        ),
        ChartInfo(
            "bn_stages",
            "One mini-batch through BN",
            "Top: the input x with its batch mean and ±1 standard deviation. Middle: after "
            "normalizing, mean 0 and spread 1 whatever x was. Bottom: gamma sets the "
            "spread and beta the centre of what the next layer sees.",
        ),
        ChartInfo(
            "train_eval_gap",
            "How eval mode catches up",
            "Eval mode normalizes with the running averages. A small momentum averages over "
            "many batches: slow to reach the population values (dashed) but smooth once "
            "there; a large one gets there fast and then jitters with every batch.",
        ),
        ChartInfo(
            "momentum_conventions",
            "Running mean, three update rules",
            "PyTorch's m and Keras' m_K = 1 − m are the same rule, so their lines lie on "
            "top of each other. Putting m_K into PyTorch's formula weights the newest "
            "batch by m_K (90% for m = 0.1): the 'average' just follows the noisy batch means.",
        ),
        ChartInfo(
            "batch_size_noise",
            "Batch-statistic noise vs batch size",
            "Both spreads fall like 1/sqrt(n) (dashed: the closed forms for normal data). "
            "Small batches give BN noisy statistics; a batch of one leaves nothing to "
            "normalize.",
        ),
        ChartInfo(
            "scale_invariance",
            "Scaling the weights by a",
            "Top: the weight gradient shrinks like 1/a (dashed), so larger weights take "
            "smaller steps. Bottom: with ε scaled by a² the output is the same to rounding; "
            "with ε fixed it moves slightly, and a lot once a²·var(Wu) is no bigger than ε.",
        ),
        ChartInfo(
            "placement",
            "BN before or after the sigmoid",
            "Same net, same batches, BN placed before or after the nonlinearity. Compare "
            "how fast the loss falls (top) and what share of sigmoid outputs sits on a flat "
            "end in each layer (below, on an axis fitted to the data).",
        ),
        ChartInfo(
            "lr_sweep",
            "Final loss and accuracy against the learning rate",
            "Each point is one run, all from the same initial weights and batches; the "
            "shaded span is the range of learning rates that works for that variant. "
            "BN's span is typically much wider, the effect behind the paper's BN-x5 and "
            "BN-x30.",
        ),
        ChartInfo(
            "small_batch",
            "Test accuracy and BN's running statistics against the batch size",
            "Top: each point is one net's test accuracy after the same number of steps at "
            "that batch size, all from the same initial weights; solid blue is BN with its "
            "running statistics (eval mode), dashed blue the same BN normalizing each test "
            "batch by itself (train mode). Bottom: how far BN's running variances are from "
            "the variances they estimate, relative to their size. Compare BN with LayerNorm "
            "and GroupNorm at each size.",
        ),
    )
}


# --------------------------------------------------------------------------- helpers


def _trace(
    x: Sequence[float] | np.ndarray,
    y: Sequence[float] | np.ndarray,
    name: str,
    color: str,
    *,
    width: float = 2.0,
    dash: str | None = None,
    mode: str = "lines",
    showlegend: bool = True,
    legendgroup: str | None = None,
    hover: str = "%{y:.4g}",
) -> dict[str, Any]:
    """A line (and/or markers) trace holding the arrays as given (no float32 rounding)."""
    line: dict[str, Any] = {"color": color, "width": width}
    if dash:
        line["dash"] = dash
    trace: dict[str, Any] = {
        "type": "scatter",
        "x": np.asarray(x),
        "y": np.asarray(y),
        "mode": mode,
        "line": line,
        "name": name,
        "legendgroup": legendgroup or name,
        "showlegend": showlegend,
        "hovertemplate": f"{hover}<extra>{name}</extra>",
    }
    if "markers" in mode:
        trace["marker"] = {"color": color, "size": 7}
    return trace


def _spacing(pixels: float, rows: int, scale: float = 1.0) -> float | None:
    """make_subplots' vertical_spacing for a gap of ``pixels`` between rows on screen."""
    if rows < 2:
        return None
    return round(pixels / (rows * scale * THEMES["screen"].panel_height), 4)


def _vline(canvas: _Canvas, panel: _Panel, x: float, text: str, dash: str = "dash") -> None:
    """A labelled vertical reference line across one panel."""
    canvas.layout["shapes"].append(
        {
            "type": "line",
            "name": "guide",
            "xref": panel.x,
            "yref": panel.y + " domain",
            "x0": x,
            "x1": x,
            "y0": 0,
            "y1": 1,
            "line": {"color": "#555555", "width": 1.5, "dash": dash},
            "layer": "above",
        }
    )
    if text:
        canvas.layout["annotations"].append(
            {
                "name": "guide",
                "text": text,
                "xref": panel.x,
                "yref": panel.y + " domain",
                "x": x,
                "y": 1,
                "xanchor": "left",
                "yanchor": "top",
                "xshift": 3,
                "showarrow": False,
                "font": {"color": "#333333"},
                "bgcolor": "rgba(255,255,255,0.75)",
            }
        )


def _guide_trace(x0: float, x1: float, y: float, name: str) -> dict[str, Any]:
    """A dashed horizontal reference as a trace, so it gets a legend entry."""
    return _trace([x0, x1], [y, y], name, GUIDE_COLOR, width=2.0, dash="dash", hover="%{y:.4g}")


def sci_format(x: float) -> str:
    """1.2e-12 style for tiny or huge numbers, 3 significant digits otherwise."""
    if not math.isfinite(x):
        return "–"
    if x == 0:
        return "0"
    return f"{x:.1e}" if abs(x) < 1e-3 or abs(x) >= 1e5 else f"{x:.3g}"


# --------------------------------------------------------------------------- bias blow-up


def blowup_bias(result: BlowupResult, *, theme: str = "screen") -> go.Figure:
    """b over steps, naive and aware, with the predicted naive ramp dashed on top."""
    _check_theme(theme)
    canvas = _Canvas()
    panel = canvas.panel(1, 1)
    steps = result.steps
    # The measured naive line is drawn wide, the prediction thin and dashed over it: where
    # they agree the dashes sit inside the vermillion band.
    canvas.add(
        panel,
        _trace(steps, result.bias_naive, "naive (μ_B held constant)", NAIVE_COLOR, width=5),
    )
    canvas.add(
        panel,
        _trace(
            steps,
            result.predicted_bias(steps),
            "predicted b₀ + k·(−lr·g)",
            PREDICTED_COLOR,
            width=1.5,
            dash="dash",
        ),
    )
    canvas.add(panel, _trace(steps, result.bias_aware, "aware (through μ_B)", AWARE_COLOR, width=3))
    canvas.axis(panel, x_title="gradient step k", y_title="bias b")
    canvas.layout["hovermode"] = "x unified"
    how = "x̂ = (x − μ_B)/√(σ²_B + ε)" if result.scale else "x̂ = x − μ_B"
    subtitle = f"{how}, n = {len(result.u)}, lr = {result.lr:g}; g = {result.g:.4g} every step"
    return canvas.figure(EXPERIMENT_CHARTS["blowup_bias"].title, theme, subtitle=subtitle)


def blowup_loss(result: BlowupResult, *, theme: str = "screen") -> go.Figure:
    """The loss of both runs (axis from 0) above its change since step 0 (rounding size)."""
    _check_theme(theme)
    scale = 0.62
    canvas = _Canvas(2, 1, shared_x=True, vertical_spacing=_spacing(48, 2, scale))
    canvas.panel_scale = scale
    loss_panel, change_panel = canvas.panel(1, 1), canvas.panel(2, 1)
    steps = result.steps
    runs = (
        ("naive (μ_B held constant)", result.loss_naive, result.loss_change_naive, NAIVE_COLOR),
        ("aware (through μ_B)", result.loss_aware, result.loss_change_aware, AWARE_COLOR),
    )
    for (name, loss, loss_change, color), width, dash in zip(
        runs, (5.0, 2.0), (None, "dash"), strict=True
    ):
        canvas.add(loss_panel, _trace(steps, loss, name, color, width=width, dash=dash))
        canvas.add(
            change_panel,
            _trace(
                steps,
                loss_change,
                name,
                color,
                width=width / 2 + 0.5,
                dash=dash,
                showlegend=False,
                hover="%{y:.2e}",
            ),
        )
    top = 1.25 * float(max(result.loss_naive.max(), result.loss_aware.max()))
    canvas.axis(loss_panel, y_title="loss L", y={"range": [0, top], "nticks": 4})
    change = blowup_summary(result).loss_change
    bound = 1.3 * change if change > 0 else 1e-15
    canvas.axis(
        change_panel,
        x_title="gradient step k",
        y_title="L_k − L_0",
        y={"range": [-bound, bound], "tickformat": ".0e", "nticks": 5},
    )
    canvas.layout["hovermode"] = "x unified"
    subtitle = (
        f"L = ½ Σ(x̂ᵢ − tᵢ)² = {result.loss_naive[0]:.6g}; largest change {sci_format(change)}"
    )
    return canvas.figure(EXPERIMENT_CHARTS["blowup_loss"].title, theme, subtitle=subtitle)


def _per_layer_panels(
    steps: np.ndarray,
    layers: Sequence[str],
    series: Mapping[str, tuple[np.ndarray, str, str]],
    y_title: str,
    *,
    log_y: bool = False,
) -> _Canvas:
    """Small multiples, one panel per layer: series = {label: ((layers, steps), color, dash)}."""
    cols = min(max(len(layers), 1), 3)
    rows = math.ceil(max(len(layers), 1) / cols)
    canvas = _Canvas(
        rows,
        cols,
        shared_y=True,
        horizontal_spacing=SIDE_BY_SIDE_GAP,
        vertical_spacing=_spacing(100, rows),
    )
    panels = [canvas.panel(i // cols + 1, i % cols + 1) for i in range(len(layers))]
    canvas.use(panels or [canvas.panel(1, 1)])
    arrays = []
    for name, (values, color, dash) in series.items():
        for li, panel in enumerate(panels):
            arrays.append(values[li])
            canvas.add(
                panel,
                _trace(
                    steps,
                    values[li],
                    name,
                    color,
                    dash=dash,
                    showlegend=li == 0,
                    hover="%{y:.3g}",
                ),
            )
    y: dict[str, Any] = {}
    if log_y:
        # Eight decades between correct and naive: powers of ten read better than 0.000001.
        y = {**_log_axis(arrays), "exponentformat": "power"}
        y.pop("tickformat", None)
    for i, (layer, panel) in enumerate(zip(layers, panels, strict=True)):
        _panel_title(canvas, panel, layer)
        canvas.axis(panel, x_title=STEP_AXIS, y_title=y_title if i % cols == 0 else None, y=y)
    canvas.layout["hovermode"] = "x unified"
    return canvas


def _network_series(net: NetworkBlowup, metric: str) -> dict[str, tuple[np.ndarray, str, str]]:
    out = {}
    for i, variant in enumerate(net.variants):
        label = {"batchnorm": "batchnorm (correct gradient)"}.get(variant, variant)
        if variant == "batchnorm-naive":
            label = "batchnorm-naive (μ_B, σ²_B held constant)"
        out[label] = (net.series(variant, metric), variant_color(variant, i), None)
    return out


def network_bias_norms(net: NetworkBlowup, *, theme: str = "screen") -> go.Figure:
    """‖b‖ of each hidden layer's linear bias over steps, one line per variant."""
    _check_theme(theme)
    canvas = _per_layer_panels(
        net.steps, net.layers, _network_series(net, "bias_norm"), "‖b‖ (Euclidean norm)"
    )
    return canvas.figure(
        EXPERIMENT_CHARTS["network_bias_norms"].title,
        theme,
        subtitle="before each step's update; all start at 0",
    )


def network_bias_grads(net: NetworkBlowup, *, theme: str = "screen") -> go.Figure:
    """‖dL/db‖ of each hidden layer's bias over steps (log scale)."""
    _check_theme(theme)
    canvas = _per_layer_panels(
        net.steps,
        net.layers,
        _network_series(net, "bias_grad_norm"),
        "‖dL/db‖ (log scale)",
        log_y=True,
    )
    return canvas.figure(
        EXPERIMENT_CHARTS["network_bias_grads"].title,
        theme,
        subtitle="on each step's training batch, float32",
    )


# --------------------------------------------------------------------------- inside BN


def _stage_bins(stages: Stages, bins: int) -> list[dict[str, float] | None]:
    """Bins of x, x_hat and y that are images of each other under the affine maps.

    x = mu_B + std_B * x_hat and y = beta + gamma * x_hat map one set of bins onto the
    next, so every value lands in the same bin number in all three panels and the
    histograms differ only in their axes: normalization shifts and rescales, nothing else.
    """
    low, high = float(np.min(stages.x_hat)), float(np.max(stages.x_hat))
    if not high > low:
        return [None, None, None]  # a constant batch: let plotly pick
    pad = 1e-9 * (high - low)  # the largest value must fall inside the last bin
    low, high = low - pad, high + pad
    size = (high - low) / bins
    out: list[dict[str, float] | None] = []
    for shift, scale in ((stages.mu_B, stages.std_B), (0.0, 1.0), (stages.beta, stages.gamma)):
        if abs(scale) < 1e-12:
            out.append(None)  # gamma = 0: every y is beta
            continue
        ends = sorted((shift + scale * low, shift + scale * high))
        out.append({"start": ends[0], "end": ends[1], "size": abs(scale) * size})
    return out


def stages_histograms(stages: Stages, *, bins: int = 24, theme: str = "screen") -> go.Figure:
    """Histograms of x, x_hat and y = gamma x_hat + beta, with the statistics as lines."""
    _check_theme(theme)
    scale = 0.62
    canvas = _Canvas(3, 1, vertical_spacing=_spacing(84, 3, scale))
    canvas.panel_scale = scale
    std = stages.std_B
    gamma = abs(stages.gamma)
    rows = (
        (
            "input x",
            stages.x,
            INPUT_COLOR,
            f"input x: μ_B = {stages.mu_B:.4g}, σ²_B = {stages.var_B:.4g}",
            "x",
            (stages.mu_B, "μ_B"),
            (stages.mu_B - std, stages.mu_B + std),
        ),
        (
            "normalized x̂",
            stages.x_hat,
            NORMALIZED_COLOR,
            "normalized x̂ = (x − μ_B) / √(σ²_B + ε): mean 0, std 1",
            "x̂",
            (0.0, "0"),
            (-1.0, 1.0),
        ),
        (
            "output y",
            stages.y,
            AWARE_COLOR,
            f"output y = γ·x̂ + β: γ = {stages.gamma:.4g}, β = {stages.beta:.4g}",
            "y",
            (stages.beta, "β"),
            (stages.beta - gamma, stages.beta + gamma),
        ),
    )
    for r, ((name, values, color, title, x_title, centre, spread), xbins) in enumerate(
        zip(rows, _stage_bins(stages, bins), strict=True)
    ):
        panel = canvas.panel(r + 1, 1)
        trace = {
            "type": "histogram",
            "x": np.asarray(values),
            "marker": {"color": color, "line": {"color": "white", "width": 0.5}},
            "name": name,
            "legendgroup": name,
            "showlegend": True,
            "hovertemplate": "%{x}: %{y} values<extra>" + name + "</extra>",
        }
        if xbins is None:
            trace["nbinsx"] = bins
        else:
            trace["xbins"] = xbins
        canvas.add(panel, trace)
        _panel_title(canvas, panel, title)
        _vline(canvas, panel, centre[0], centre[1])
        if spread[1] > spread[0]:
            _vline(canvas, panel, spread[0], "", "dot")
            _vline(canvas, panel, spread[1], "±1 std", "dot")
        canvas.axis(
            panel,
            x_title=f"value of {x_title}",
            y_title="count",
            y={"rangemode": "tozero", "nticks": 4},
        )
    canvas.layout["hovermode"] = "closest"
    canvas.layout["bargap"] = 0.02
    subtitle = f"{len(stages.x)} values of one channel; dotted: ±1 std"
    return canvas.figure(EXPERIMENT_CHARTS["bn_stages"].title, theme, subtitle=subtitle)


def train_eval_gap_chart(
    result: TrainEvalGap, *, batch_size: int | None = None, theme: str = "screen"
) -> go.Figure:
    """Per momentum over steps: train/eval output gap, running mean, running variance."""
    _check_theme(theme)
    scale = 0.72
    canvas = _Canvas(3, 1, shared_x=True, vertical_spacing=_spacing(40, 3, scale))
    canvas.panel_scale = scale
    gap_panel, mean_panel, var_panel = (canvas.panel(r, 1) for r in (1, 2, 3))
    steps = result.steps
    for i, m in enumerate(result.momenta):
        color = SERIES_COLORS[i % len(SERIES_COLORS)]
        name = f"momentum m = {m:g}"
        canvas.add(gap_panel, _trace(steps, result.gap[i], name, color, hover="%{y:.3g}"))
        for panel, values in ((mean_panel, result.running_mean), (var_panel, result.running_var)):
            canvas.add(
                panel, _trace(steps, values[i], name, color, showlegend=False, hover="%{y:.3g}")
            )
    end = float(steps[-1])
    canvas.add(
        gap_panel,
        _guide_trace(0, end, result.gap_at_population, "population statistics (reference)"),
    )
    for panel, value in ((mean_panel, result.population_mean), (var_panel, result.population_var)):
        guide = _guide_trace(0, end, value, "population statistics (reference)")
        guide["showlegend"] = False
        canvas.add(panel, guide)
    canvas.axis(gap_panel, y_title="mean |train − eval|", y=_log_axis([result.gap]))
    canvas.axis(mean_panel, y_title="running mean")
    canvas.axis(var_panel, x_title="batches seen", y_title="running var")
    canvas.layout["hovermode"] = "x unified"
    batches = f"batches of {batch_size}" if batch_size else "batches"
    subtitle = (
        f"{batches} from N({result.population_mean:g}, {math.sqrt(result.population_var):g}²); "
        "gap measured on a fixed probe batch"
    )
    return canvas.figure(EXPERIMENT_CHARTS["train_eval_gap"].title, theme, subtitle=subtitle)


def momentum_chart(
    result: MomentumConventions,
    batch_means: np.ndarray,
    *,
    population_mean: float | None = None,
    theme: str = "screen",
) -> go.Figure:
    """Running means of the same batch means under PyTorch's, Keras' and the mixed-up rule."""
    _check_theme(theme)
    canvas = _Canvas()
    panel = canvas.panel(1, 1)
    steps = np.arange(len(result.torch))
    canvas.add(
        panel,
        _trace(
            steps[1:],
            batch_means,
            "μ_B of each batch",
            "#BBBBBB",
            mode="markers",
            hover="%{y:.3g}",
        ),
    )
    canvas.traces[-1]["marker"]["size"] = 5
    canvas.add(
        panel,
        _trace(
            steps,
            result.mistaken,
            f"mixed up: PyTorch's rule with m = {result.m_keras:g}",
            NAIVE_COLOR,
            width=1.5,
        ),
    )
    canvas.add(
        panel,
        _trace(steps, result.torch, f"PyTorch, m = {result.m_torch:g}", AWARE_COLOR, width=5),
    )
    canvas.add(
        panel,
        _trace(
            steps,
            result.keras,
            f"Keras, m = {result.m_keras:g}",
            PREDICTED_COLOR,
            width=1.5,
            dash="dash",
        ),
    )
    if population_mean is not None:
        canvas.add(panel, _guide_trace(0, float(steps[-1]), population_mean, "population mean"))
    canvas.axis(panel, x_title="batches seen", y_title="running mean")
    canvas.layout["hovermode"] = "x unified"
    subtitle = f"largest |PyTorch − Keras| = {sci_format(result.largest_gap)}"
    return canvas.figure(EXPERIMENT_CHARTS["momentum_conventions"].title, theme, subtitle=subtitle)


def batch_size_noise_chart(result: BatchSizeNoise, *, theme: str = "screen") -> go.Figure:
    """Std of mu_B and var_B over trials against batch size, with closed forms (log-log)."""
    _check_theme(theme)
    canvas = _Canvas()
    panel = canvas.panel(1, 1)
    n = result.batch_sizes
    mean_color, var_color = AWARE_COLOR, "#009E73"
    canvas.add(
        panel, _trace(n, result.mean_std, "std of μ_B (measured)", mean_color, mode="lines+markers")
    )
    canvas.add(
        panel,
        _trace(n, result.mean_std_theory, "σ/√n", mean_color, width=1.5, dash="dash"),
    )
    canvas.add(
        panel,
        _trace(n, result.var_std, "std of σ²_B (measured)", var_color, mode="lines+markers"),
    )
    canvas.add(
        panel,
        _trace(n, result.var_std_theory, "σ²·√(2(n−1))/n", var_color, width=1.5, dash="dash"),
    )
    arrays = [result.mean_std, result.var_std, result.mean_std_theory, result.var_std_theory]
    canvas.axis(
        panel,
        x_title="batch size n (log scale)",
        y_title="std across batches (log scale)",
        x={"type": "log", "tickvals": list(n), "ticktext": [str(int(v)) for v in n]},
        y=_log_axis(arrays),
    )
    canvas.layout["hovermode"] = "x unified"
    subtitle = f"{result.trials} normal batches per size, σ = {result.population_std:g}"
    return canvas.figure(EXPERIMENT_CHARTS["batch_size_noise"].title, theme, subtitle=subtitle)


def scale_invariance_chart(
    result: ScaleInvariance, *, selected: float | None = None, theme: str = "screen"
) -> go.Figure:
    """Gradient-norm ratio against 1/a, above max |BN(aWu) − BN(Wu)|, over a (log-log)."""
    _check_theme(theme)
    scale = 0.75
    canvas = _Canvas(2, 1, shared_x=True, vertical_spacing=_spacing(48, 2, scale))
    canvas.panel_scale = scale
    ratio_panel, change_panel = canvas.panel(1, 1), canvas.panel(2, 1)
    a = result.a
    fixed, scaled = AWARE_COLOR, "#009E73"
    fixed_name, scaled_name = f"ε = {result.eps:g} fixed", "ε scaled by a²"
    canvas.add(ratio_panel, _trace(a, result.grad_ratio, fixed_name, fixed, mode="lines+markers"))
    canvas.add(
        ratio_panel,
        _trace(
            a, result.grad_ratio_scaled_eps, scaled_name, scaled, width=1.5, mode="lines+markers"
        ),
    )
    canvas.traces[-1]["marker"].update(symbol="circle-open", size=11)
    canvas.add(
        ratio_panel,
        _trace(a, result.expected_ratio, "1/a", PREDICTED_COLOR, width=1.5, dash="dash"),
    )
    for values, name, color, width in (
        (result.max_change, fixed_name, fixed, 2.0),
        (result.max_change_scaled_eps, scaled_name, scaled, 1.5),
    ):
        canvas.add(
            change_panel,
            _trace(
                a,
                np.maximum(values, LOG_FLOOR),
                name,
                color,
                width=width,
                mode="lines+markers",
                showlegend=False,
                hover="%{y:.2e}",
            ),
        )
    canvas.traces[-1]["marker"].update(symbol="circle-open", size=11)
    power = {"type": "log", "exponentformat": "power"}
    _panel_title(canvas, ratio_panel, "‖dL/dW at aW‖ / ‖dL/dW at W‖")
    _panel_title(canvas, change_panel, "max |BN(aWu) − BN(Wu)|")
    # Matched axes must share their type: the top panel's x is log too.
    canvas.axis(
        ratio_panel, y_title="gradient ratio", x={**power, "dtick": 1}, y={**power, "dtick": 2}
    )
    canvas.axis(
        change_panel,
        x_title="weight scale a (log scale)",
        y_title="largest change",
        x={**power, "dtick": 1},
        y={**power, "dtick": 4},
    )
    if selected is not None:
        for panel in (ratio_panel, change_panel):
            _vline(canvas, panel, selected, "", "dot")
    canvas.layout["hovermode"] = "x unified"
    subtitle = f"log-log; exact zeros drawn at {LOG_FLOOR:g}"
    if selected is not None:
        subtitle += f"; dotted: a = {selected:g}"
    return canvas.figure(EXPERIMENT_CHARTS["scale_invariance"].title, theme, subtitle=subtitle)


def placement_chart(
    runs: Mapping[str, History], *, threshold: float | None = None, theme: str = "screen"
) -> go.Figure:
    """Training loss, then each layer's saturation, of the BN-before and BN-after runs."""
    _check_theme(theme)
    layers: list[str] = []
    for history in runs.values():
        layers += [layer for layer in history.layers() if layer and layer not in layers]
    rows = 1 + len(layers)
    scale = 0.55
    # One column: the panels stay wide on a phone, and share the step axis.
    canvas = _Canvas(rows, 1, shared_x=True, vertical_spacing=_spacing(36, rows, scale))
    canvas.panel_scale = scale
    loss_panel = canvas.panel(1, 1)
    sat_panels = [canvas.panel(r + 2, 1) for r in range(len(layers))]
    losses, shares = [], []
    for placement, history in runs.items():
        color = PLACEMENT_COLORS.get(placement, SERIES_COLORS[0])
        name = f"BN {placement} the sigmoid"
        variant = (history.variants() or [""])[0]
        steps, loss = history.series(variant, "", "loss")
        losses.append(loss)
        canvas.add(loss_panel, _trace(steps, loss, name, color, hover="%{y:.3g}"))
        for layer, panel in zip(layers, sat_panels, strict=True):
            steps, share = history.series(variant, layer, "saturation")
            shares.append(share)
            canvas.add(panel, _trace(steps, share, name, color, showlegend=False, hover="%{y:.1%}"))
    _panel_title(canvas, loss_panel, "training loss")
    canvas.axis(loss_panel, y_title="loss (log)", y=_log_axis(losses))
    # Saturation is often a few percent: an axis up to 100% would flatten every line.
    found = _finite(shares)
    top = max(0.05, 1.15 * float(found.max())) if len(found) else 1.0
    for i, (layer, panel) in enumerate(zip(layers, sat_panels, strict=True)):
        _panel_title(canvas, panel, f"saturated share, {layer}")
        canvas.axis(
            panel,
            x_title=STEP_AXIS if i == len(layers) - 1 else None,
            y_title="saturated",
            y={"range": [0, min(top, 1.02)], "tickformat": ".0%", "nticks": 4},
        )
    canvas.layout["hovermode"] = "x unified"
    subtitle = "saturated: sigmoid output"
    if threshold is not None:
        subtitle += f" < {1 - threshold:.3g} or > {threshold:.3g}"
    return canvas.figure(EXPERIMENT_CHARTS["placement"].title, theme, subtitle=subtitle)


# Heights (in accuracy units, below the 0% line) of the usable-range bars, per variant.
_SPAN_BAR_Y = (-0.06, -0.12)


def lr_sweep_chart(result: SweepResult, *, theme: str = "screen") -> go.Figure:
    """Final training loss and test accuracy per learning rate (log x), a line per variant,
    an x where a run diverged, and each variant's usable range shaded."""
    _check_theme(theme)
    canvas = _Canvas(2, 1, shared_x=True, row_titles=(), vertical_spacing=_spacing(60, 2))
    loss_panel, acc_panel = canvas.panel(1, 1), canvas.panel(2, 1)
    labels = list(dict.fromkeys(p.label for p in result.points))
    losses = []
    for i, label in enumerate(labels):
        color = variant_color(label, i)
        points = [p for p in result.points if p.label == label]
        lrs = np.array([p.lr for p in points])
        loss = np.array([p.loss for p in points])
        acc = np.array([p.test_accuracy for p in points])
        losses.append(loss)
        canvas.add(
            loss_panel, _trace(lrs, loss, label, color, mode="lines+markers", hover="loss %{y:.3g}")
        )
        canvas.add(
            acc_panel,
            _trace(
                lrs,
                acc,
                label,
                color,
                mode="lines+markers",
                showlegend=False,
                hover="accuracy %{y:.1%}",
            ),
        )
        gone = [p for p in points if p.diverged_at is not None]
        if gone:
            marks = _trace(
                [p.lr for p in gone],
                [1.0] * len(gone),
                f"{label}: diverged",
                color,
                mode="markers",
                hover="diverged",
            )
            marks["marker"] = {
                "symbol": "x-thin-open",
                "size": 14,
                "color": color,
                "line": {"width": 3},
            }
            marks["text"] = [f"diverged at step {p.diverged_at}" for p in gone]
            marks["hovertemplate"] = "%{text}<extra>" + label + "</extra>"
            canvas.add(acc_panel, marks)
        span = result.usable.get(label)
        if span is not None:
            canvas.layout["shapes"].append(
                {
                    "type": "rect",
                    "name": "usable",
                    "xref": loss_panel.x,
                    "yref": loss_panel.y + " domain",
                    "x0": span[0],
                    "x1": span[1],
                    "y0": 0,
                    "y1": 1,
                    "fillcolor": color,
                    "opacity": 0.08,
                    "line": {"width": 0},
                    "layer": "below",
                }
            )
            # Under the accuracy axis's 0%: one bar per variant, so spans never hide a line.
            bar = _trace(
                list(span),
                [_SPAN_BAR_Y[i % len(_SPAN_BAR_Y)]] * 2,
                label,
                color,
                width=7,
                showlegend=False,
                hover=f"usable: {result.usable_text(label)}",
            )
            bar["name"] = f"{label}: usable"
            bar["meta"] = "usable"
            canvas.add(acc_panel, bar)
    canvas.axis(loss_panel, y_title="training loss (log)", y=_log_axis(losses), x={"type": "log"})
    canvas.axis(
        acc_panel,
        x_title="learning rate (log scale)",
        y_title="test accuracy",
        x={"type": "log", "tickformat": "~g"},
        y={
            "tickformat": ".0%",
            "range": [_SPAN_BAR_Y[-1] - 0.04, 1.05],
            "tickvals": [0, 0.2, 0.4, 0.6, 0.8, 1.0],
        },
    )
    canvas.layout["hovermode"] = "closest"
    done = f"{result.steps_done:,} of {result.steps_total:,} steps"
    if result.steps_done < result.steps_total:
        done += " (points move until every run is done)"
    return canvas.figure(
        EXPERIMENT_CHARTS["lr_sweep"].title,
        theme,
        subtitle=f"{done}; usable (shaded, and the bars under 0%): did not diverge and "
        f"ended within {USABLE_WITHIN:.0%} of the best accuracy",
    )


# --------------------------------------------------------------------------- small batches
# BN's two ways to predict share its colour; train mode is dashed.
_BN_MODES = (("eval mode (running statistics)", None), ("train mode (batch statistics)", "dash"))


def small_batch_chart(result: StudyResult, *, theme: str = "screen") -> go.Figure:
    """Per batch size (log x): every variant's test accuracy, BN's in both modes, the
    per-example norms and the plain net at batch 1 too; below, BN's relative
    running-variance error (log y)."""
    _check_theme(theme)
    scale = 0.8
    canvas = _Canvas(2, 1, shared_x=True, vertical_spacing=_spacing(56, 2, scale))
    canvas.panel_scale = scale
    acc_panel, err_panel = canvas.panel(1, 1), canvas.panel(2, 1)
    rows = result.rows
    sizes = np.array([r.batch_size for r in rows], dtype=float)
    one = result.batch_one.accuracy or {}
    for i, variant in enumerate(("plain", "batchnorm", "layernorm", "groupnorm")):
        color = variant_color(variant, i)
        if variant == "batchnorm":
            for (mode, dash), values in zip(
                _BN_MODES,
                (
                    [r.accuracy["batchnorm"] for r in rows],
                    [r.bn_train_mode_accuracy for r in rows],
                ),
                strict=True,
            ):
                name = f"batchnorm, {mode}"
                trace = _trace(
                    sizes, values, name, color, dash=dash, mode="lines+markers", hover="%{y:.1%}"
                )
                if dash:
                    trace["marker"]["symbol"] = "circle-open"
                canvas.add(acc_panel, trace)
            continue
        x, y = list(sizes), [r.accuracy[variant] for r in rows]
        if variant in one:  # trained at batch 1 as well
            x, y = [1.0, *x], [one[variant], *y]
        canvas.add(
            acc_panel,
            _trace(x, y, variant, color, mode="lines+markers", hover="%{y:.1%}"),
        )
    relative = np.array([r.relative_var_error for r in rows])
    canvas.add(
        err_panel,
        _trace(
            sizes,
            relative,
            "batchnorm: |running var − var| / running var",
            variant_color("batchnorm", 1),
            mode="lines+markers",
            showlegend=False,
            hover="%{y:.3g}",
        ),
    )
    ticks = sorted({1, *result.batch_sizes})
    x_axis = {
        "type": "log",
        "tickvals": ticks,
        # BN has no point at batch 1: it refuses to train there.
        "ticktext": ["1<br>BN refuses" if b == 1 else str(b) for b in ticks],
        "range": [math.log10(0.75), math.log10(max(ticks) * 1.3)],
    }
    _panel_title(canvas, acc_panel, "test accuracy at the last step")
    _panel_title(canvas, err_panel, "BN's running-variance error, relative")
    canvas.axis(
        acc_panel,
        y_title="test accuracy",
        x=x_axis,
        y={"tickformat": ".0%", "range": [0, 1.05], "tickvals": [0, 0.2, 0.4, 0.6, 0.8, 1.0]},
    )
    canvas.axis(
        err_panel,
        x_title="batch size (log scale)",
        y_title="mean over layers (log)",
        x=x_axis,
        y=_log_axis([relative]),
    )
    canvas.layout["hovermode"] = "x unified"
    done = f"{result.steps:,} steps at each batch size (examples seen: steps × batch size)"
    if len(rows) < len(result.batch_sizes):
        # Only what changes with a row: a figure that stays the same is not redrawn.
        done += f"; {len(rows)} of {len(result.batch_sizes)} batch sizes done"
    subtitle = f"{done}; accuracy on {result.test_examples} test images"
    return canvas.figure(EXPERIMENT_CHARTS["small_batch"].title, theme, subtitle=subtitle)
