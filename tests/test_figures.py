"""Figures: every builder draws what the History holds, labelled, colored and themed."""

from __future__ import annotations

import json

import numpy as np
import plotly.graph_objects as go
import pytest

from bn_core import figures
from bn_core.config import load_preset
from bn_core.experiments import make_trainer
from bn_core.figures import CHARTS, OKABE_ITO, VARIANT_COLORS, apply_theme, variant_color
from bn_core.history import History
from bn_core.train import Trainer

LR_CHANGE_STEP = 100


@pytest.fixture(scope="module")
def trainer(one_torch_thread_for_module) -> Trainer:
    """The paper's Fig. 1 set-up for 200 steps, with a learning-rate change half way
    and Santurkar et al.'s measurements on."""
    config = load_preset("ioffe-fig1").replace(
        steps=200, telemetry_every=10, eval_every=50, ics_every=10, landscape_every=50
    )
    tr = make_trainer(config)
    tr.advance(steps=LR_CHANGE_STEP)
    tr.set_live(lr=1.0)
    tr.advance(steps=200 - LR_CHANGE_STEP)
    return tr


@pytest.fixture(scope="module")
def history(trainer: Trainer) -> History:
    return trainer.history


@pytest.fixture(scope="module")
def fresh_history() -> History:
    """A trainer's history before its first step: only the step-0 evaluation."""
    return Trainer(load_preset("ioffe-fig1")).history


# Every builder with the options a page would pass.
BUILDERS = {
    "loss_accuracy": lambda h, theme="screen": figures.loss_accuracy(h, theme=theme),
    "preact_heatmaps": lambda h, theme="screen": figures.preact_heatmaps(h, theme=theme),
    "histogram_overlay": lambda h, theme="screen": figures.histogram_overlay(
        h, layer="layer3", step=150, theme=theme
    ),
    "saturation": lambda h, theme="screen": figures.saturation(
        h, threshold=0.97, activation="sigmoid", theme=theme
    ),
    "grad_norms": lambda h, theme="screen": figures.grad_norms(h, theme=theme),
    "percentile_bands": lambda h, theme="screen": figures.percentile_bands(
        h, layer="layer3", theme=theme
    ),
    "update_ratio": lambda h, theme="screen": figures.update_ratio(h, theme=theme),
    "ics_l2": lambda h, theme="screen": figures.ics_l2(h, theme=theme),
    "ics_cos": lambda h, theme="screen": figures.ics_cos(h, theme=theme),
    "landscape": lambda h, theme="screen": figures.landscape(h, theme=theme),
}
TIME_SERIES = [k for k in BUILDERS if k != "histogram_overlay"]


def data_traces(fig: go.Figure) -> list:
    """Traces that draw data (not legend keys or empty placeholders)."""
    return [t for t in fig.data if t.x is not None and len(t.x) and t.x[0] is not None]


def hex_of(color: str) -> str:
    """'#e69f00' or 'rgba(230,159,0,0.25)' -> '#E69F00' (the alpha dropped)."""
    if color.startswith("rgba("):
        r, g, b, _ = color[5:-1].split(",")
        return f"#{int(r):02X}{int(g):02X}{int(b):02X}"
    return color.upper()


def trace_color(trace) -> str:
    if trace.type == "heatmap":
        return hex_of(trace.colorscale[-1][1])
    if trace.type == "bar":
        assert hex_of(trace.marker.color) == hex_of(trace.marker.line.color)
        return hex_of(trace.marker.line.color)
    if trace.fill:
        return hex_of(trace.fillcolor)
    return hex_of(trace.line.color)


def axis_titles(fig: go.Figure, prefix: str) -> list[str]:
    layout = fig.layout.to_plotly_json()
    return [
        axis["title"]["text"]
        for key, axis in layout.items()
        if key.startswith(prefix) and axis.get("title", {}).get("text")
    ]


def lines_of(fig: go.Figure, variant: str, panel_x: str | None = None) -> list:
    return [
        t
        for t in data_traces(fig)
        if t.name == variant and t.type == "scatter" and t.fill is None and t.line.width
        if panel_x is None or t.xaxis == panel_x
    ]


# --------------------------------------------------------------------------- catalogue


def test_charts_describe_every_builder():
    assert set(CHARTS) == set(BUILDERS)
    for key, info in CHARTS.items():
        assert info.key == key
        assert info.title.strip() and len(info.caption) > 40
        assert info.caption.endswith(".") and info.caption.count(". ") <= 1  # 1-2 sentences
        assert callable(getattr(figures, key))


def test_variant_colors_are_okabe_ito_and_fixed_for_known_names():
    assert len(OKABE_ITO) == 8 and len(set(OKABE_ITO)) == 8
    assert len(set(VARIANT_COLORS.values())) == len(VARIANT_COLORS)  # one colour per kind
    for i, (name, color) in enumerate(VARIANT_COLORS.items()):
        assert color in OKABE_ITO
        assert variant_color(name, i) == color == variant_color(name, 7)
    others = [variant_color(f"lr-{i}", i) for i in range(2, 5)]
    assert len(set(others)) == 3  # three extra variants get three different colors
    assert not set(others) & set(VARIANT_COLORS.values())
    assert figures.variant_colors(["plain", "lr-x5"]) == {
        "plain": VARIANT_COLORS["plain"],
        "lr-x5": variant_color("lr-x5", 1),
    }


# --------------------------------------------------------------------------- every builder


@pytest.mark.parametrize("key", BUILDERS)
def test_builder_has_title_axis_labels_and_one_legend_entry_per_variant(key, history):
    fig = BUILDERS[key](history)
    assert isinstance(fig, go.Figure)
    assert fig.layout.title.text.strip()
    assert axis_titles(fig, "xaxis") and axis_titles(fig, "yaxis")
    legend = [t.name for t in fig.data if t.showlegend is not False]
    assert sorted(legend) == sorted(history.variants()), legend


@pytest.mark.parametrize("key", BUILDERS)
def test_variant_colors_match_across_figures(key, history):
    fig = BUILDERS[key](history)
    drawn = {}
    for trace in data_traces(fig):
        drawn.setdefault(trace.name, set()).add(trace_color(trace))
    assert set(drawn) == set(history.variants())
    for variant, colors in drawn.items():
        assert colors == {VARIANT_COLORS[variant]}, (variant, colors)


@pytest.mark.parametrize("key", TIME_SERIES)
def test_event_marker_with_label_on_every_panel(key, history):
    (event,) = history.events
    assert event.step == LR_CHANGE_STEP and event.label == "lr 0.5 → 1"
    fig = BUILDERS[key](history)
    panels = {t.xaxis for t in data_traces(fig)}
    assert panels
    for panel in panels:
        lines = [
            s
            for s in fig.layout.shapes
            if s.xref == panel and s.x0 == s.x1 == event.step and s.yref.endswith("domain")
        ]
        assert len(lines) == 1, panel
        assert lines[0].line.dash == "dot"
        labels = [a for a in fig.layout.annotations if a.xref == panel and a.x == event.step]
        assert [a.text for a in labels] == [event.label], panel


@pytest.mark.parametrize("key", BUILDERS)
def test_empty_history_gives_a_figure_saying_no_data_yet(key, fresh_history):
    for empty in (History(), fresh_history):
        fig = BUILDERS[key](empty)
        assert fig.layout.title.text.strip()
        notes = [a.text for a in fig.layout.annotations if a.name == "note"]
        assert notes and set(notes) == {figures.NO_DATA}
        fig.to_json()  # serializes


@pytest.mark.parametrize("key", BUILDERS)
def test_print_theme_has_larger_fonts_and_thicker_lines(key, history):
    screen, print_ = BUILDERS[key](history), BUILDERS[key](history, theme="print")
    assert print_.layout.font.size >= 16 > screen.layout.font.size
    assert print_.layout.title.font.size > screen.layout.title.font.size
    assert print_.layout.paper_bgcolor == print_.layout.plot_bgcolor == "white"
    widths = [
        (s.line.width, p.line.width)
        for s, p in zip(screen.data, print_.data, strict=True)
        if s.type == "scatter" and s.line.width
    ]
    if key not in ("preact_heatmaps", "histogram_overlay"):  # these draw no lines
        assert widths
    for screen_width, print_width in widths:
        assert print_width >= 3 and print_width > screen_width
    events = [s.line.width for s in print_.layout.shapes if s.name == "event"]
    assert all(w > 1.5 for w in events)


def test_apply_theme_switches_back_and_forth(history):
    fig = figures.grad_norms(history)
    before = [t.line.width for t in fig.data]
    apply_theme(fig, "print")
    apply_theme(fig, "print")  # twice changes nothing more
    assert all(w >= 3 for w in (t.line.width for t in fig.data))
    apply_theme(fig, "screen")
    assert [t.line.width for t in fig.data] == before
    assert fig.layout.font.size == figures.THEMES["screen"].font
    with pytest.raises(ValueError, match="theme"):
        apply_theme(fig, "poster")
    with pytest.raises(ValueError, match="theme"):
        figures.loss_accuracy(history, theme="poster")


@pytest.mark.parametrize("key", BUILDERS)
def test_builders_send_typed_arrays(key, history):
    fig = BUILDERS[key](history)
    payload = json.loads(fig.to_json())
    for trace in payload["data"]:
        if trace.get("x") and len(trace["x"]) != 1:  # legend keys are [null]
            assert "bdata" in trace["y"], trace.get("name")


# --------------------------------------------------------------------------- data


def test_loss_accuracy_draws_the_recorded_series(history):
    fig = figures.loss_accuracy(history)
    assert fig.layout.yaxis.type == "log" and "log" in fig.layout.yaxis.title.text
    assert fig.layout.xaxis.title.text == "training step"
    for variant in history.variants():
        loss, accuracy = (t for t in data_traces(fig) if t.name == variant)
        steps, values = history.series(variant, "", "loss")
        np.testing.assert_array_equal(loss.x, steps)
        np.testing.assert_array_equal(loss.y, values.astype(np.float32))
        assert (loss.xaxis, accuracy.xaxis) == ("x", "x2")
        steps, values = history.series(variant, "", "test_accuracy")
        np.testing.assert_array_equal(accuracy.x, steps)
        np.testing.assert_array_equal(accuracy.y, values.astype(np.float32))
        assert list(accuracy.x) == [0, 50, 100, 150, 200]


@pytest.mark.parametrize("unit", [False, True])
def test_percentile_bands_draw_the_fig1_percentiles(history, unit):
    fig = figures.percentile_bands(history, layer="layer3", unit=unit)
    prefix = "unit_p" if unit else "preact_p"
    variants = history.variants()
    assert [a.text for a in fig.layout.annotations if a.name == "subplot_title"] == variants
    assert fig.layout.yaxis2.matches == "y"  # one shared y scale, as in the paper
    for i, variant in enumerate(variants):
        panel = "x" if i == 0 else f"x{i + 1}"
        lines = {t.meta: t for t in lines_of(fig, variant, panel)}
        assert set(lines) == {"p15", "p50", "p85"}
        for p in ("15", "50", "85"):
            steps, values = history.series(variant, "layer3", prefix + p)
            np.testing.assert_array_equal(lines["p" + p].x, steps)
            np.testing.assert_array_equal(lines["p" + p].y, values.astype(np.float32))
        assert lines["p50"].line.width > lines["p15"].line.width
        bands = [t for t in fig.data if t.name == variant and t.fill == "toself"]
        assert len(bands) == (1 if unit else 5)  # 15-85, plus TensorBoard's four
        if not unit:
            _, low = history.series(variant, "layer3", "preact_band_p0")
            _, high = history.series(variant, "layer3", "preact_band_p100")
            outer = bands[0]  # min-max, drawn first so it lies beneath
            np.testing.assert_array_equal(
                outer.y, np.concatenate([low, high[::-1]]).astype(np.float32)
            )


def test_heatmap_columns_are_the_normalized_histograms(history):
    fig = figures.preact_heatmaps(history)
    heatmaps = [t for t in fig.data if t.type == "heatmap"]
    assert len(heatmaps) == len(history.variants()) * len(history.layers())
    edges = history.bin_edges("preact")
    for trace in heatmaps:
        variant, layer = trace.hovertemplate.split("<extra>")[1].removesuffix("</extra>").split()
        steps, counts = history.histograms(variant, layer, "preact")
        assert trace.z.dtype == np.uint8 and trace.z.shape == (len(edges) - 1, len(steps))
        np.testing.assert_array_equal(trace.x, steps)
        np.testing.assert_allclose(trace.y, (edges[:-1] + edges[1:]) / 2, rtol=1e-6)
        for j in (0, len(steps) // 2, len(steps) - 1):
            expected = counts[j] / counts[j].max()
            np.testing.assert_allclose(trace.z[:, j] / 255, expected, atol=0.5 / 255 + 1e-9)
            assert trace.z[:, j].max() == 255
    assert {a.text for a in fig.layout.annotations if a.name == "subplot_title"} == {
        *history.variants(),
        *history.layers(),
    }


@pytest.mark.parametrize("max_columns", [7, 8, 12])
def test_heatmaps_downsample_to_evenly_spaced_columns(history, max_columns):
    """At most max_columns stored histograms, evenly spaced in step (plotly.js draws such a
    heatmap as one image, several times faster), the newest always among them."""
    steps, _ = history.histograms("plain", "layer1", "preact")
    assert len(steps) > 12 and len(set(np.diff(steps))) == 1
    fig = figures.preact_heatmaps(history, kind="postact", max_columns=max_columns)
    for trace in (t for t in fig.data if t.type == "heatmap"):
        x = np.asarray(trace.x)
        assert trace.z.shape[1] == len(x) <= max_columns
        assert x[-1] == steps[-1] and set(x) <= set(steps)
        gaps = set(np.diff(x))
        assert len(gaps) == 1, gaps
        # No more history is left out at the start than one spacing.
        assert x[0] - steps[0] < gaps.pop()


def synthetic_history(n_hist=200, bins=60, variants=("plain", "batchnorm"), layers=3):
    h = History(max_points=1000, max_histograms=n_hist)
    h.set_bin_edges("preact", np.linspace(-8, 8, bins + 1))
    rng = np.random.default_rng(0)
    for step in range(0, n_hist * 10, 10):
        for variant in variants:
            for layer in range(layers):
                counts = rng.poisson(50 * np.exp(-(np.linspace(-3, 3, bins) ** 2)), bins)
                h.add_histogram(step, variant, f"layer{layer + 1}", "preact", counts)
    return h


@pytest.mark.parametrize(
    ("variants", "layers", "variant_rows"),
    [
        (("plain", "batchnorm"), 3, False),
        (("plain", "batchnorm", "layernorm"), 5, False),
        (("plain", "batchnorm", "layernorm", "groupnorm", "rmsnorm"), 3, True),
        (("plain", "batchnorm", "layernorm", "groupnorm"), 5, False),
    ],
)
def test_heatmaps_put_many_variants_in_rows(variants, layers, variant_rows):
    """A column per variant, unless more than three variants would stand beside fewer
    layers: then a row per variant, so no name sits above a column too narrow for it."""
    h = synthetic_history(n_hist=20, variants=variants, layers=layers)
    fig = figures.preact_heatmaps(h)
    rows, columns = (variants, h.layers()) if variant_rows else (h.layers(), variants)
    titles = [a for a in fig.layout.annotations if a.name == "subplot_title"]
    # Column titles along the top, left to right; row titles turned along the right edge.
    on_top = sorted((a for a in titles if a.textangle != 90), key=lambda a: a.x)
    on_right = sorted((a for a in titles if a.textangle == 90), key=lambda a: -a.y)
    assert [a.text for a in on_top] == list(columns)
    assert [a.text for a in on_right] == list(rows)
    for trace in (t for t in fig.data if t.type == "heatmap"):
        variant, layer = trace.hovertemplate.split("<extra>")[1].removesuffix("</extra>").split()
        row, col = (variant, layer) if variant_rows else (layer, variant)
        n = list(rows).index(row) * len(columns) + list(columns).index(col) + 1
        assert trace.xaxis == ("x" if n == 1 else f"x{n}"), (variant, layer)


def test_heatmap_json_stays_small():
    """A run's default 200 histograms are all shown, in a figure that stays small."""
    h = synthetic_history()
    fig = figures.preact_heatmaps(h)
    assert {t.z.shape[1] for t in fig.data if t.type == "heatmap"} == {200}
    text = fig.to_json()
    assert len(text) < 150_000, len(text)
    z = json.loads(text)["data"][-1]["z"]
    assert z["dtype"] == "u1" and "bdata" in z  # base64 typed array, not nested lists
    # A run that keeps more histograms is thinned to the same size.
    more = figures.preact_heatmaps(synthetic_history(n_hist=450))
    assert {t.z.shape[1] for t in more.data if t.type == "heatmap"} == {150}  # every 3rd
    assert len(more.to_json()) < 150_000


@pytest.mark.parametrize("max_columns", [-1, 0, 1, 2, 3, 7, 120, 200])
def test_evenly_spaced_columns_for_every_length(max_columns):
    most = max(max_columns, 1)
    for n in range(0, 450):
        keep = figures._evenly_spaced_columns(n, max_columns)
        if n <= most:
            assert keep.tolist() == list(range(n))
        else:  # thinned, but never to less than half of what is allowed
            assert most // 2 < len(keep) <= most, (n, max_columns, len(keep))
        if n == 0:
            continue
        assert keep[-1] == n - 1 and keep[0] >= 0
        gaps = set(np.diff(keep).tolist())
        assert len(gaps) <= 1, (n, max_columns, gaps)
        # The columns left out at the start are fewer than one spacing (a lone column's
        # spacing is the whole run: ceil(n / most)).
        assert keep[0] < (gaps.pop() if gaps else -(-n // most))


def test_histogram_overlay_shows_shares_at_the_step_actually_stored(history):
    fig = figures.histogram_overlay(history, layer="layer2", step=155)
    assert "step 150" in fig.layout.title.text and "layer2" in fig.layout.title.text
    assert fig.layout.yaxis.title.text == "share of values"
    assert fig.layout.barmode == "overlay"
    for trace in fig.data:
        found = history.histogram_at(trace.name, "layer2", "preact", 155)
        assert found is not None and found[0] == 150
        np.testing.assert_allclose(trace.y, found[1] / found[1].sum(), rtol=1e-6)
        assert trace.marker.color.startswith("rgba")  # see-through, so both show


def test_diverged_variant_has_shorter_lines_and_its_own_step():
    h = History()
    h.set_bin_edges("preact", np.linspace(-8, 8, 61))
    for step in range(0, 100, 10):
        for variant in ("plain", "batchnorm"):
            if variant == "plain" and step > 40:
                continue  # diverged
            h.add(step, variant, "", "loss", 1.0 / (step + 1))
            h.add(step, variant, "layer1", "grad_norm", 0.1)
            h.add_histogram(step, variant, "layer1", "preact", np.ones(60))
    fig = figures.loss_accuracy(h)
    lengths = {t.name: len(t.x) for t in data_traces(fig)}
    assert lengths == {"plain": 5, "batchnorm": 10}
    assert len(data_traces(figures.grad_norms(h))[0].x) == 5
    title = figures.histogram_overlay(h, layer="layer1", step=90).layout.title.text
    assert "plain at step 40" in title and "batchnorm at step 90" in title


@pytest.mark.parametrize(
    ("activation", "threshold", "rule"),
    [
        ("sigmoid", 0.97, "< 0.03 or > 0.97"),
        ("tanh", 0.9, "|tanh output| > 0.9"),
        ("relu", 0.97, "ReLU output 0 for every probe example"),
    ],
)
def test_saturation_states_its_rule_and_draws_shares(history, activation, threshold, rule):
    fig = figures.saturation(history, threshold=threshold, activation=activation)
    assert rule in fig.layout.title.subtitle.text
    # From 0, zoomed in to the data but never to less than 0-5 %, so small shares show.
    y = fig.layout.yaxis
    assert (y.rangemode, list(y.autorangeoptions.include), y.autorangeoptions.clipmax) == (
        "tozero",
        [0, 0.05],
        1.02,
    )
    for variant in history.variants():
        traces = lines_of(fig, variant)
        assert len(traces) == len(history.layers())
        for trace, layer in zip(traces, history.layers(), strict=True):
            _, values = history.series(variant, layer, "saturation")
            np.testing.assert_array_equal(trace.y, values.astype(np.float32))


def test_saturation_rejects_an_unknown_activation(history):
    with pytest.raises(ValueError, match="activation"):
        figures.saturation(history, threshold=0.9, activation="gelu")


def test_grad_norms_are_log_scale_per_layer(history):
    fig = figures.grad_norms(history)
    layers = history.layers()
    assert [a.text for a in fig.layout.annotations if a.name == "subplot_title"] == layers
    assert all(fig.layout[f"yaxis{i or ''}"].type == "log" for i in (0, 2, 3))
    assert "log" in fig.layout.yaxis.title.text
    for variant in history.variants():
        for trace, layer in zip(lines_of(fig, variant), layers, strict=True):
            steps, values = history.series(variant, layer, "grad_norm")
            np.testing.assert_array_equal(trace.x, steps)
            np.testing.assert_array_equal(trace.y, values.astype(np.float32))


def test_update_ratio_has_the_healthy_guide_on_every_panel(history):
    fig = figures.update_ratio(history)
    guides = [s for s in fig.layout.shapes if s.name == "guide"]
    assert len(guides) == len(history.layers())
    assert all(s.y0 == s.y1 == -3 and s.line.dash == "dash" for s in guides)
    assert [a.text for a in fig.layout.annotations if a.name == "guide"] == ["≈1e-3 healthy"] * 3
    low, high = fig.layout.yaxis.range
    assert low < -3 < high
    trace = lines_of(fig, "batchnorm")[0]
    np.testing.assert_array_equal(
        trace.y, history.series("batchnorm", "layer1", "update_ratio")[1].astype(np.float32)
    )


def test_many_layers_wrap_into_rows_and_hide_spare_cells():
    h = History()
    for layer in range(6):
        for step in (0, 10):
            h.add(step, "plain", f"fc{layer}", "update_ratio", -2.5)
    fig = figures.update_ratio(h)
    assert len(data_traces(fig)) == 6
    # 6 layers: 2 rows of 4, the last 2 cells hidden, no "no data yet" in them
    assert fig.layout.xaxis8.visible is False and fig.layout.yaxis7.visible is False
    assert not [a for a in fig.layout.annotations if a.name == "note"]


def test_changes_at_one_step_share_a_line_and_a_label():
    h = History()
    for step in range(0, 100, 10):
        h.add(step, "plain", "", "loss", 1.0)
    h.add_event(40, "lr", 8.0, 0.5)
    h.add_event(40, "momentum", 0.0, 0.9)
    h.add_event(90, "lr", 0.5, 0.1)
    fig = figures.loss_accuracy(h)
    for panel in ("x", "x2"):
        lines = [s.x0 for s in fig.layout.shapes if s.name == "event" and s.xref == panel]
        assert lines == [40, 90]
        labels = [a for a in fig.layout.annotations if a.name == "event" and a.xref == panel]
        assert [a.text for a in labels] == ["lr 8 → 0.5, momentum 0 → 0.9", "lr 0.5 → 0.1"]
        assert labels[1].xanchor == "right"  # late in the run: left of its line


def test_many_live_changes_label_the_newest_on_rows_of_their_own_and_never_widen_the_axis():
    """90 changes close together (a slider stepped by keyboard before changes coalesced)
    drew 90 overlapping labels and stretched the step axis to -2,000."""
    h = History()
    for step in range(0, 1000, 10):
        h.add(step, "plain", "", "loss", 1.0)
    for i in range(90):
        h.add_event(100 + i, "momentum", i / 100, (i + 1) / 100)
    fig = figures.loss_accuracy(h)
    for panel in ("x", "x2"):
        lines = [s for s in fig.layout.shapes if s.name == "event" and s.xref == panel]
        marks = [a for a in fig.layout.annotations if a.name == "event" and a.xref == panel]
        assert len(lines) == len(marks) == 90  # every change keeps its line and its hover
        labelled = [a for a in marks if a.text != "▴"]
        assert [a.text for a in labelled] == [
            "momentum 0.87 → 0.88",
            "momentum 0.88 → 0.89",
            "momentum 0.89 → 0.9",
        ]
        rows = [a.yshift for a in labelled]
        assert len(set(rows)) == 3 and rows[-1] == 0  # one row each, the newest on top
        assert all(a.hovertext.startswith("momentum ") for a in marks)
        assert {a.y for a in marks if a.text == "▴"} == {0}  # feet of the older lines
    for axis in (fig.layout.xaxis, fig.layout.xaxis2):
        assert (axis.autorangeoptions.clipmin, axis.autorangeoptions.clipmax) == (0, 990)


# --------------------------------------------------------------------------- Santurkar et al.


def test_ics_charts_draw_layers_two_and_up_with_the_recorded_values(history):
    for key, metric in (("ics_l2", "ics_l2"), ("ics_cos", "ics_cos")):
        fig = BUILDERS[key](history)
        titles = [a.text for a in fig.layout.annotations if a.name == "subplot_title"]
        assert titles == ["layer2", "layer3"]  # layer 1 has no layers below: no ICS
        for variant in history.variants():
            for layer, panel in zip(titles, ("x", "x2"), strict=True):
                (line,) = lines_of(fig, variant, panel)
                steps, values = history.series(variant, layer, metric)
                assert list(line.x) == list(steps) and len(steps) == 20
                np.testing.assert_allclose(line.y, values, rtol=1e-6)
    cos = BUILDERS["ics_cos"](history)
    guides = [s for s in cos.layout.shapes if s.name == "guide"]
    assert guides and all(s.y0 == 1.0 for s in guides)
    assert BUILDERS["ics_l2"](history).layout.yaxis.type == "log"


def test_landscape_draws_bands_min_to_max_and_beta(history):
    fig = BUILDERS["landscape"](history)
    for variant in history.variants():
        bands = [t for t in data_traces(fig) if t.name == variant and t.fill == "toself"]
        assert {t.xaxis for t in bands} == {"x", "x2"}
        for band, (low_m, high_m) in zip(
            sorted(bands, key=lambda t: t.xaxis),
            (
                ("landscape_loss_min", "landscape_loss_max"),
                ("landscape_grad_diff_min", "landscape_grad_diff_max"),
            ),
            strict=True,
        ):
            steps, low = history.series(variant, "", low_m)
            _, high = history.series(variant, "", high_m)
            assert len(steps) == 4  # every 50 steps of 200
            np.testing.assert_allclose(band.y, np.concatenate([low, high[::-1]]), rtol=1e-6)
        (beta,) = lines_of(fig, variant, "x3")
        np.testing.assert_allclose(
            beta.y, history.series(variant, "", "landscape_beta")[1], rtol=1e-6
        )
