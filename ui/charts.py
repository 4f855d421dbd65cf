"""One way to put a bn_core figure on a page: the chart, its caption, print-ready downloads."""

from __future__ import annotations

import contextlib
import functools
import html
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import plotly
import plotly.graph_objects as go
import plotly.io as pio
import streamlit as st

from bn_core import export, figures
from bn_core.experiments.charts import EXPERIMENT_CHARTS
from bn_core.train import Trainer

# Streamlit serves this folder at app/static/ (server.enableStaticServing in
# .streamlit/config.toml); plotly.js is copied into it from the installed plotly package.
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"
PLOTLY_JS = f"plotly-{plotly.__version__}.min.js"
CHART_COMPONENT = "bnlab_react_chart"
# The chart toolbar: the PNG camera, box zoom and reset, in one group. plotly's own toolbar
# had nine buttons in four groups, among them one that uploads the chart to Plotly Cloud,
# and was too wide for a chart title to fit beside it on a phone (ui/plotly_react.js keeps
# titles clear of it); selecting, panning and zooming by steps add little to these charts.
MODEBAR_BUTTONS = [["toImage", "zoom2d", "resetScale2d"]]


@functools.cache
def _react_chart():
    """The chart component, registered on first use (inside a script run, where Streamlit
    expects it; the mount re-registers it on each new runtime, as AppTest makes)."""
    return st.components.v2.component(
        CHART_COMPONENT,
        js=Path(__file__).with_name("plotly_react.js").read_text(),
        # In the page's own DOM, not a shadow root: plotly.js puts its styles in the head.
        isolate_styles=False,
    )


_COPY_LOCK = threading.Lock()  # sessions start in threads of their own


@functools.cache
def plotly_js_src() -> str | None:
    """Where the browser loads plotly.js from, or None when it cannot be served.

    The first chart drawn copies plotly.js into static/ (once per server process; the
    answer is kept). Without the copy, or when the server does not serve static/ (one
    started with another config), charts fall back to st.plotly_chart, which works but
    redraws slowly.
    """
    with _COPY_LOCK:
        target = STATIC_DIR / PLOTLY_JS
        if not target.is_file():
            source = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
            try:
                STATIC_DIR.mkdir(exist_ok=True)
                # Written under a temporary name and renamed, so no server process (several
                # may share the folder) ever serves half a file.
                fd, partial = tempfile.mkstemp(dir=STATIC_DIR, suffix=".part")
                os.close(fd)
                try:
                    shutil.copyfile(source, partial)
                    os.replace(partial, target)
                finally:
                    Path(partial).unlink(missing_ok=True)
            except OSError:
                if not target.is_file():  # another process may have won the race
                    return None
        # What static/ serves is this copy alone: older plotly versions' copies go.
        for old in STATIC_DIR.glob("plotly-*.min.js"):
            if old != target:
                with contextlib.suppress(OSError):  # kept is harmless, just unused
                    old.unlink()
    return f"app/static/{PLOTLY_JS}"


def chart_filename(page: str, chart: str, trainer: Trainer | None) -> str:
    """The camera PNG's name: page, chart and the run's variants, as in every exported file.

    Not the step: the chart's config must stay the same from tick to tick, or the chart
    is built anew at every redraw instead of updated (Plotly.react starts over on a new
    config, as st.plotly_chart, the fallback, does). The export panel's files name the step.
    """
    return export.chart_name(page, chart, trainer.variant_names if trainer is not None else ())


def _plain(text: str | None) -> str:
    """Chart text as a sentence: no HTML tags or line breaks."""
    return " ".join(re.sub(r"<[^>]*>", " ", text or "").split())


def _number(value: float) -> str:
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def _numbers(values: Sequence | None) -> np.ndarray | None:
    """Plotly data as floats (None and missing values as NaN), or None if not numbers."""
    if values is None:
        return None
    try:
        return np.asarray(values, dtype=float).ravel()
    except (TypeError, ValueError):  # category names, dates
        return None


def _last_point(xs: Sequence | None, ys: Sequence | None) -> tuple[float | None, float] | None:
    """The newest finite (x, y) of a trace, or None when it has none."""
    y = _numbers(ys)
    if y is None or not len(y):
        return None
    finite = np.flatnonzero(np.isfinite(y))
    if not len(finite):
        return None
    i = finite[-1]
    x = _numbers(xs)
    newest_x = float(x[i]) if x is not None and i < len(x) and math.isfinite(x[i]) else None
    return newest_x, float(y[i])


def _panel_names(layout: dict) -> dict[tuple[str, str], str]:
    """Each panel's name, ``{("x2", "y2"): "Test accuracy"}``, from the subplot titles.

    A title above a panel (a column or subplot title) and one beside its row (a row title,
    turned 90 degrees) both name it: "plain layer1". Panels without titles are named by
    their y axis's title where there are several.
    """
    # bn_core's figures name their panel titles; make_subplots' own are unnamed, on paper.
    titles = [
        a
        for a in layout.get("annotations", ())
        if a.get("name") == "subplot_title"
        or (a.get("name") is None and a.get("xref") == a.get("yref") == "paper")
    ]
    # Titles placed on a panel's own domain ("x2 domain") name that panel outright.
    names = {
        (a["xref"].split()[0], a["yref"].split()[0]): _plain(a.get("text"))
        for a in titles
        if str(a.get("xref", "")).endswith(" domain")
    }
    on_paper = [
        a
        for a in titles
        if not str(a.get("xref", "")).endswith(" domain")
        and all(isinstance(a.get(k), int | float) for k in ("x", "y"))
    ]
    xaxes = [
        (f"x{m.group(1)}", axis.get("anchor") or f"y{m.group(1)}", axis)
        for key, axis in layout.items()
        if (m := re.fullmatch(r"xaxis(\d*)", key)) and isinstance(axis, dict)
    ]
    for xref, yref, xaxis in xaxes:
        yaxis = layout.get("yaxis" + yref[1:], {})
        if (xref, yref) in names:
            continue
        x0, x1 = xaxis.get("domain", (0, 1))
        y0, y1 = yaxis.get("domain", (0, 1))
        above = [
            a
            for a in on_paper
            if a.get("textangle") != 90 and x0 <= a["x"] <= x1 and a["y"] >= y1 - 1e-6
        ]
        beside = [a for a in on_paper if a.get("textangle") == 90 and y0 <= a["y"] <= y1]
        parts = [min(above, key=lambda a: a["y"])["text"]] if above else []
        parts += [beside[0]["text"]] if beside else []
        if not parts and len(xaxes) > 1:
            parts = [(yaxis.get("title") or {}).get("text") or ""]
        names[(xref, yref)] = _plain(" ".join(parts))
    return names


def chart_summary(fig: go.Figure) -> str:
    """A chart's text alternative: its title and the newest value of each named line.

    "Training loss and test accuracy: Training loss: plain 2.23, batchnorm 0.194 (step 110);
    Test accuracy: plain 0.1, batchnorm 0.972 (step 100)". Read off the figure's traces, so
    every chart has one: per panel (named by its subplot title), the last finite y of each
    named trace that shows data on hover; where a name occurs twice in a panel, the hover
    label tells the lines apart, and repeats of one line give a range. The x of those points
    ends the sentence, or each panel's part where the panels' differ. A histogram says how
    many values it counts and their range; a heatmap, with no one value to read, its name.
    """
    layout = fig.layout.to_plotly_json()
    title = _plain(layout.get("title", {}).get("text")) or "Chart"
    panels = _panel_names(layout)
    x_titles = {
        _plain(axis.get("title", {}).get("text"))
        for key, axis in layout.items()
        if key.startswith("xaxis") and isinstance(axis, dict)
    } - {""}
    x_name = "step" if figures.STEP_AXIS in x_titles else (min(x_titles) if x_titles else "")

    # panel -> (trace name, hover label) -> values; panel -> the newest x shown in it
    readings: dict[str, dict[tuple[str, str], list[float]]] = {}
    newest: dict[str, float] = {}
    counts: dict[str, list[str]] = {}  # panel -> what its histograms count
    maps: dict[str, None] = {}  # names of heatmaps
    for trace in fig.data:
        if not trace.name or trace.visible in (False, "legendonly"):
            continue
        panel = panels.get((trace.xaxis or "x", trace.yaxis or "y"), "")
        if trace.type in ("heatmap", "histogram"):
            values = _numbers(trace.x)
            values = values[np.isfinite(values)] if values is not None else ()
            if not len(values):
                continue
            if trace.type == "heatmap":
                maps[trace.name] = None
                newest[""] = max(newest.get("", -math.inf), float(values.max()))
            else:
                spread = f"{_number(values.min())} to {_number(values.max())}"
                counts.setdefault(panel, []).append(f"{trace.name} {len(values)} values, {spread}")
            continue
        if trace.type not in ("scatter", "scattergl", "bar") or trace.hoverinfo == "skip":
            continue
        point = _last_point(trace.x, trace.y)
        if point is None:
            continue
        label = _plain((trace.hovertemplate or "").split("%{", 1)[0])
        readings.setdefault(panel, {}).setdefault((trace.name, label), []).append(point[1])
        if point[0] is not None:
            newest[panel] = max(newest.get(panel, point[0]), point[0])

    def at(x: float) -> str:
        value = f"{x:,.0f}" if x_name == "step" else _number(x)
        return f"{x_name} {value}" if x_name else value

    one_x = len(set(newest.values())) == 1
    parts = []
    for panel in dict.fromkeys([*readings, *counts]):
        lines = readings.get(panel, {})
        labels = {label for _, label in lines}
        repeated = len({name for name, _ in lines}) < len(lines)
        items = []
        for (name, label), values in lines.items():
            words = (name if name != panel else "", label if repeated else "")
            who = " ".join(w for w in words if w)
            low, high = _number(min(values)), _number(max(values))
            items.append(f"{who} {low if low == high else f'{low} to {high}'}".strip())
        items += counts.get(panel, [])
        # The measure, once, where all lines share it and the panel's name does not say it.
        heading = [panel] if panel else []
        if not repeated and len(labels) == 1 and labels != {""}:
            (label,) = labels
            heading += [] if label.lower() in panel.lower() else [label]
        text = ", ".join(items)
        if heading:
            text = f"{', '.join(heading)}: {text}"
        if not one_x and panel in newest:
            text += f" ({at(newest[panel])})"
        parts.append(text)
    if maps:
        parts.append(", ".join(maps))
    if not parts:
        return f"{title}: no data yet"
    summary = f"{title}: " + "; ".join(parts)
    if one_x:
        summary += f" at {at(next(iter(newest.values())))}"
    return summary


def show_chart(
    fig: go.Figure, chart: str, trainer: Trainer | None = None, page: str = "live"
) -> None:
    """Draw a figure with its caption; the toolbar's camera saves a 3x PNG for slides."""
    config = {
        "displaylogo": False,
        "modeBarButtons": MODEBAR_BUTTONS,
        "toImageButtonOptions": {
            "format": "png",
            "scale": 3,
            "filename": chart_filename(page, chart, trainer),
        },
    }
    key = f"chart_{page}_{chart}"
    summary = chart_summary(fig)
    src = plotly_js_src() if st.get_option("server.enableStaticServing") else None
    if src is None:
        st.plotly_chart(fig, key=key, config=config)
        # Hidden from sight, read by screen readers (the class is in static/look.css).
        st.markdown(
            f'<span class="bnlab-sr-only">{html.escape(summary)}</span>', unsafe_allow_html=True
        )
    else:
        # A keyed component keeps its place from tick to tick, so the browser updates the
        # chart in place (Plotly.react) instead of building it anew. It labels the chart
        # with the summary and, on a dark page, recolours it with DARK_SCREEN.
        figure = pio.to_json(fig, validate=False)
        data = {"figure": figure, "config": config, "src": src, "summary": summary}
        _react_chart()(key=key, data={**data, "dark": figures.DARK_SCREEN})
    # Run charts and teaching-experiment charts keep their captions in separate registries.
    info = figures.CHARTS.get(chart) or EXPERIMENT_CHARTS.get(chart)
    if info is not None:
        st.caption(info.caption)
    # What the page showed last, for its export panel: figure, caption, variants, step.
    shown = st.session_state.setdefault("shown_figures", {}).setdefault(page, {})
    run = (tuple(trainer.variant_names), trainer.step) if trainer is not None else ((), None)
    shown[chart] = (fig, info.caption if info is not None else "", *run)
