"""The look and its accessibility, where it is logic: the charts' text alternative, what the
chart component is given, the theme settings and the page's style sheet (AppTest).

What the browser shows of them (dark charts, no fading, focus rings, the phone layout) is
checked in tests/test_browser_look.py.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from plotly.subplots import make_subplots
from small_runs import small
from streamlit.testing.v1 import AppTest

from bn_core import figures
from bn_core.train import Trainer
from ui.charts import CHART_COMPONENT, MODEBAR_BUTTONS, chart_summary

ROOT = Path(__file__).resolve().parent.parent


def line(name: str, ys, **kw) -> go.Scatter:
    return go.Scatter(x=np.arange(len(ys)) * 10, y=ys, name=name, **kw)


# --- the text alternative -----------------------------------------------------------------


def test_summary_reads_the_last_value_of_each_named_line():
    fig = go.Figure(
        [line("plain", [2.0, 1.0, 0.4213]), line("batchnorm", [2.0, 0.5, 0.1318])],
        layout={"title": {"text": "Loss", "subtitle": {"text": "not read"}}},
    )
    fig.update_xaxes(title_text=figures.STEP_AXIS)
    assert chart_summary(fig) == "Loss: plain 0.421, batchnorm 0.132 at step 20"


def test_summary_skips_what_is_not_a_reading():
    """Bands (no hover), unnamed and hidden traces, and missing or diverged values."""
    fig = go.Figure(
        [
            line("plain", [1.0, 0.5, math.nan]),  # diverged at the end: the last finite y
            line("batchnorm", [1.0, None, 0.25]),
            line("plain", [0.0, 9.0, 9.0], hoverinfo="skip", fill="toself"),  # a band
            line("", [7.0, 7.0, 7.0]),
            line("hidden", [7.0, 7.0, 7.0], visible="legendonly"),
        ],
        layout={"title": {"text": "A<br>chart"}},
    )
    # No step axis here: the newest x is given as it is.
    assert chart_summary(fig) == "A chart: plain 0.5, batchnorm 0.25 at 20"
    empty = go.Figure([line("plain", [])], layout={"title": {"text": "Loss"}})
    assert chart_summary(empty) == "Loss: no data yet"


def test_summary_names_panels_and_tells_lines_of_one_name_apart():
    fig = make_subplots(rows=1, cols=2, subplot_titles=["plain", "batchnorm"])
    for col, variant in enumerate(["plain", "batchnorm"], start=1):
        for pct, value in (("15th", -1.0), ("85th", 1.0)):
            trace = line(variant, [0.0, value], hovertemplate=f"{pct} percentile %{{y}}")
            fig.add_trace(trace, row=1, col=col)
    fig.update_layout(title_text="Bands")
    fig.update_xaxes(title_text=figures.STEP_AXIS)
    assert chart_summary(fig) == (
        "Bands: plain: 15th percentile -1, 85th percentile 1; "
        "batchnorm: 15th percentile -1, 85th percentile 1 at step 10"
    )


@pytest.fixture(scope="module")
def run(one_torch_thread_for_module) -> Trainer:
    trainer = Trainer(small(steps=40))
    trainer.advance(steps=40)
    return trainer


def test_summary_of_every_run_chart_starts_with_its_title(run):
    history = run.history
    layer = history.layers()[-1]
    built = [
        figures.loss_accuracy(history),
        figures.percentile_bands(history, layer=layer),
        figures.preact_heatmaps(history),
        figures.grad_norms(history),
        figures.update_ratio(history),
    ]
    for fig in built:
        summary = chart_summary(fig)
        assert summary.startswith(fig.layout.title.text + ": "), summary
        assert "no data yet" not in summary, summary
        assert all(v in summary for v in run.variant_names), summary
    # The loss panel's numbers are the newest losses, as the chart draws them.
    loss = chart_summary(built[0]).split("; ")[0]
    for trace in built[0].data:
        if trace.xaxis in (None, "x") and trace.name:
            assert f"{trace.name} {float(trace.y[-1]):.3g}" in loss


# --- the app: the chart component's inputs, the theme, the style sheet ---------------------


@pytest.fixture(scope="module")
def at(app_path, one_torch_thread_for_module) -> AppTest:
    at = AppTest.from_file(str(app_path), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def chart_inputs(at: AppTest) -> dict[str, dict]:
    return {
        el.proto.id.rpartition("chart_")[2]: json.loads(el.proto.json)
        for el in at.get("bidi_component")
        if el.proto.component_name == CHART_COMPONENT
    }


def test_every_chart_gets_its_summary_dark_colours_and_a_small_toolbar(at):
    inputs = chart_inputs(at)
    assert inputs, "no chart drawn"
    for key, data in inputs.items():
        title = json.loads(data["figure"])["layout"]["title"]["text"]
        assert data["summary"].startswith(title + ": "), (key, data["summary"])
        assert data["dark"] == figures.DARK_SCREEN
        # Nothing that sends a chart off the machine (plotly's "Share chart..." button).
        assert data["config"]["modeBarButtons"] == MODEBAR_BUTTONS
        assert "sendChartToCloud" not in json.dumps(data["config"])


def test_figures_for_export_stay_light(at):
    """The browser recolours a chart for a dark page; the figure kept for the export panel
    is the light one, and the print theme is white."""
    shown = at.session_state["shown_figures"]["live"]
    for fig, *_ in shown.values():
        assert fig.layout.paper_bgcolor == "white"
        printed = figures.apply_theme(go.Figure(fig), "print")
        assert printed.layout.paper_bgcolor == printed.layout.plot_bgcolor == "white"


def test_the_style_sheet_is_on_the_page(at):
    sheets = [el.proto.body for el in at.get("html") if "<style>" in el.proto.body]
    assert len(sheets) == 1
    css = sheets[0]
    assert '[data-stale="true"]' in css and ":focus-visible" in css
    # Streamlit's sanitizer drops a style element whose text looks like it holds a tag.
    body = css.removeprefix("<style>").removesuffix("</style>")
    assert "<" not in body


def test_theme_follows_the_reader_with_the_primary_colour_kept():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    theme = config["theme"]
    # A base, or colours of [theme]'s own, pin one theme and hide the theme menu's choice.
    assert set(theme) == {"light", "dark"}, theme
    assert theme["light"]["primaryColor"] == theme["dark"]["primaryColor"] == "#0072B2"
