"""Plotly figures of a run's History: one pure builder per chart.

The app and the export both call these builders, so a chart has one code path. Every
builder takes a History (plus display options), never trains or mutates, and returns a
``plotly.graph_objects.Figure`` styled by :func:`apply_theme`.

Speed: plotly validates every property it is given, and ``make_subplots`` plus the full
``plotly_white`` template cost tens of milliseconds per figure. So the subplot grid is
built by ``make_subplots`` once per shape and cached as a plain dict, traces are plain
dicts of numpy arrays, and the figure is validated once at the end. The template is the
2-D part of ``plotly_white`` only (colors, grid, fonts), which also keeps the JSON small.
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import plotly.graph_objects as go
import plotly.io as pio
from plotly.subplots import make_subplots

from bn_core.history import Event, History

__all__ = [
    "CHARTS",
    "DARK_SCREEN",
    "OKABE_ITO",
    "THEMES",
    "VARIANT_COLORS",
    "ChartInfo",
    "apply_theme",
    "grad_norms",
    "ics_cos",
    "ics_l2",
    "landscape",
    "histogram_overlay",
    "loss_accuracy",
    "percentile_bands",
    "preact_heatmaps",
    "saturation",
    "update_ratio",
    "variant_color",
    "variant_colors",
]

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common form
# of color blindness. Black, orange, sky blue, bluish green, yellow, blue, vermillion,
# reddish purple.
OKABE_ITO = [
    "#000000",
    "#E69F00",
    "#56B4E9",
    "#009E73",
    "#F0E442",
    "#0072B2",
    "#D55E00",
    "#CC79A7",
]
VARIANT_COLORS = {
    "plain": "#E69F00",
    "batchnorm": "#0072B2",
    "batchnorm-naive": "#D55E00",
    "batchnorm-torch": "#000000",
    "batchnorm-noisy": "#CC79A7",
    "layernorm": "#009E73",
    "groupnorm": "#56B4E9",
    "rmsnorm": "#F0E442",
}
# Names outside that table (a loaded config's own variant names) take Paul Tol's
# colour-blind-safe indigo, teal and wine, by their index in the run, so they never share
# a colour with a known variant.
_OTHER_COLORS = ("#332288", "#44AA99", "#882255")

EVENT_COLOR = "#7F7F7F"
EVENT_LABELS = 3  # live changes labelled on a chart: the newest, one row each
GUIDE_COLOR = "#999999"
NO_DATA = "no data yet"
STEP_AXIS = "training step"
# Between panels side by side whose step axes carry labels, as a share of the plot width.
# On a projector's 1280 px with the sidebar open a per-layer chart's three panels share
# about 330 px; a "1000" at a panel's right edge runs 14 px past it and the next panel's
# "0" 4 px before its own, so 0.035 (12 px) let them touch and read "10000". 0.08 (26 px)
# keeps a space between them.
SIDE_BY_SIDE_GAP = 0.08


def variant_color(name: str, index: int) -> str:
    """The color of a variant: fixed for known names, else by its index in the run.

    ``index`` is the variant's position in the run (``config.variants`` and
    ``History.variants()`` share that order), so every chart and widget agrees.
    """
    known = VARIANT_COLORS.get(name)
    if known is not None:
        return known
    return _OTHER_COLORS[(index - 2) % len(_OTHER_COLORS)]


def variant_colors(names: Sequence[str]) -> dict[str, str]:
    """``{name: color}`` for the variants of one run, in run order."""
    return {name: variant_color(name, i) for i, name in enumerate(names)}


# --------------------------------------------------------------------------- chart info


@dataclass(frozen=True)
class ChartInfo:
    """What a chart is called and what a student should look for in it."""

    key: str
    title: str
    caption: str


CHARTS: dict[str, ChartInfo] = {
    info.key: info
    for info in (
        ChartInfo(
            "loss_accuracy",
            "Training loss and test accuracy",
            "Both nets see the same batches in the same order, and test accuracy is "
            "measured in eval mode, where BN uses its running averages. Compare how fast "
            "the loss falls and the accuracy rises, and what each net does after a "
            "learning-rate change (dotted line).",
        ),
        ChartInfo(
            "preact_heatmaps",
            "Pre-activation distributions over training",
            "Each column is one step's histogram of a layer's inputs to the nonlinearity, "
            "darkest where values are densest. Without BN the band drifts and spreads as "
            "training goes on; with BN it stays centred and the same width.",
        ),
        ChartInfo(
            "histogram_overlay",
            "Pre-activation histogram at one step",
            "The distributions of both nets at the same step, on the same bins. Mass piled "
            "up in the outer bins means inputs far out on the flat parts of the sigmoid, "
            "where the gradient almost vanishes.",
        ),
        ChartInfo(
            "saturation",
            "Saturated units per layer",
            "The share of activations stuck on a flat part of the nonlinearity, where "
            "little gradient gets through; a rising curve means the layer learns less and "
            "less. The axis zooms in (to at least 5 %) so small shares show: near zero, as "
            "in the Figure 1 preset, is the finding, the sigmoids staying in their "
            "sensitive range.",
        ),
        ChartInfo(
            "grad_norms",
            "Weight-gradient norms per layer",
            "How big each layer's weight gradient is (log scale). Gradients that shrink "
            "layer by layer or collapse over time mean the early layers barely learn.",
        ),
        ChartInfo(
            "percentile_bands",
            "Percentiles of the sigmoid input (Ioffe & Szegedy, Fig. 1)",
            "The 15th, 50th and 85th percentiles of the input to the nonlinearity over "
            "training, on a fixed probe batch in training mode (BN uses that batch's "
            "statistics). Compare how far the band's centre and width move with and without "
            "BN; where the preset makes claims about them, the checked claims beside the "
            "chart give this run's numbers.",
        ),
        ChartInfo(
            "update_ratio",
            "Update-to-weight ratio per layer",
            "log10 of the size of the step the optimizer actually took, relative to the "
            "weights (for SGD with momentum and Adam too). Around -3 (dashed line) is the "
            "usual rule of thumb; far above means the step is large, far below that the "
            "layer hardly moves.",
        ),
        ChartInfo(
            "ics_l2",
            "Internal covariate shift per layer (Santurkar et al., Def. 2.1)",
            "How much a layer's gradient changes when only the layers below it take this "
            "step's update, ‖G − G′‖ on the same batch (log scale). If BN worked by "
            "reducing internal covariate shift, its curves would sit below the plain net's; "
            "in Santurkar et al.'s measurements, and often here, they do not.",
        ),
        ChartInfo(
            "ics_cos",
            "Gradient direction kept under the shift, cos(G, G′)",
            "1 means the earlier layers' update left the direction of this layer's gradient "
            "unchanged; lower means the layer is chasing a moving target. Read it next to "
            "the loss: a net can train fast with low values here.",
        ),
        ChartInfo(
            "landscape",
            "The loss landscape along the gradient (Santurkar et al., section 3)",
            "At each probe the step runs along −g from 0.5 to 4 learning rates (by default): "
            "bands show the range of the loss and of the gradient change met on the way, "
            "and β the steepest change of the gradient per unit step. Narrower bands and a "
            "smaller β mean a smoother landscape, on which larger steps are safe.",
        ),
    )
}


# --------------------------------------------------------------------------- themes


@dataclass(frozen=True)
class _Theme:
    font: int  # tick labels, legend
    title: int
    subtitle: int
    panel_title: int  # subplot titles
    label: int  # event labels, guides
    note: int  # "no data yet"
    line_extra: float  # added to every builder's screen line width
    shape_extra: float
    margin: tuple[int, int, int]  # left, right, bottom
    panel_height: int  # pixels per row of panels
    axis_line: str  # color of the axis lines


THEMES: dict[str, _Theme] = {
    "screen": _Theme(12, 16, 12, 13, 10, 14, 0.0, 0.0, (60, 24, 48), 240, "#EBF0F8"),
    # Slides and handouts: readable from the back of a room, with dark axis lines.
    "print": _Theme(18, 24, 17, 19, 15, 20, 2.0, 1.0, (80, 34, 70), 320, "#444444"),
}

# The screen theme on a dark page. Figures are always built light, so every export (print
# theme included) stays white; the chart component (ui/plotly_react.js) recolours a chart
# when the app's own theme is dark, at once when a reader switches. The page's background
# and text colours come from the app's theme; dark greys (labels, black lines) turn light,
# white fills take the page's background, and the other colours, the variants', stay as
# they are. Grid, zero and axis lines take this one colour, as faint on the dark page as the
# screen theme's are on white.
DARK_SCREEN = {"grid": "#2E2C29"}


@functools.cache
def _template() -> dict[str, Any]:
    """The 2-D part of plotly_white (colors, grid, fonts), with Okabe-Ito as colorway."""
    full = pio.templates["plotly_white"].layout.to_plotly_json()
    keep = ("font", "hovermode", "hoverlabel", "paper_bgcolor", "plot_bgcolor")
    layout = {k: full[k] for k in keep if k in full}
    layout["xaxis"] = full.get("xaxis", {})
    layout["yaxis"] = full.get("yaxis", {})
    layout["colorway"] = OKABE_ITO
    return {"layout": layout}


def _check_theme(theme: str) -> _Theme:
    if theme not in THEMES:
        raise ValueError(f"theme = {theme!r}: allowed: " + ", ".join(THEMES))
    return THEMES[theme]


def _sub(d: dict[str, Any], key: str) -> dict[str, Any]:
    """``d[key]`` as a dict, created if missing (None counts as missing)."""
    value = d.get(key)
    if not isinstance(value, dict):
        value = d[key] = {}
    return value


def _style(data: list[dict[str, Any]], layout: dict[str, Any], theme: str) -> None:
    """Apply ``theme`` to a figure held as plain dicts (the builders' fast path)."""
    spec = _check_theme(theme)
    meta = dict(layout["meta"]) if isinstance(layout.get("meta"), dict) else {}
    previous = THEMES.get(meta.get("theme", "screen"), THEMES["screen"])
    line_delta = spec.line_extra - previous.line_extra
    shape_delta = spec.shape_extra - previous.shape_extra
    annotations = layout.get("annotations") or []

    title = _sub(layout, "title")
    has_subtitle = bool(_sub(title, "subtitle").get("text"))
    has_legend = layout.get("showlegend") is not False and any(
        t.get("showlegend") is not False for t in data
    )
    panel_titles = [a for a in annotations if a.get("name") == "subplot_title"]
    # The top margin holds, from the top: title, subtitle, the legend's row, panel titles.
    title_h = 10 + 1.4 * spec.title + (2.2 * spec.subtitle if has_subtitle else 0)
    legend_h = 2.0 * spec.font if has_legend else 0
    top = int(title_h + legend_h + (1.8 * spec.panel_title if panel_titles else 10))
    left, right, bottom = spec.margin
    if any(a.get("textangle") == 90 for a in panel_titles):
        right += int(1.6 * spec.panel_title)  # row titles stand on the right edge
    rows, scale = int(meta.get("rows", 1)), float(meta.get("panel_scale", 1.0))
    height = int(top + bottom + rows * scale * spec.panel_height)

    layout["template"] = _template()
    layout["showlegend"] = has_legend  # plotly hides a one-entry legend unless told
    layout["height"] = height
    layout["margin"] = {"l": left, "r": right, "t": top, "b": bottom}
    layout["font"] = {"size": spec.font}
    layout["paper_bgcolor"] = layout["plot_bgcolor"] = "white"
    title.update(
        x=0, xref="paper", xanchor="left", y=1 - 8 / height, yref="container", yanchor="top"
    )
    title["font"] = {"size": spec.title}
    _sub(title, "subtitle")["font"] = {"size": spec.subtitle, "color": "#555555"}
    layout["legend"] = {
        "orientation": "h",
        "x": 0,
        "xref": "paper",
        "xanchor": "left",
        "y": 1 - title_h / height,
        "yref": "container",
        "yanchor": "top",
        "font": {"size": spec.font},
        "bgcolor": "rgba(255,255,255,0)",
    }
    layout["meta"] = {**meta, "theme": theme}
    for key, axis in layout.items():
        if key.startswith(("xaxis", "yaxis")) and isinstance(axis, dict):
            axis["linecolor"] = spec.axis_line
            _sub(_sub(axis, "title"), "font")["size"] = spec.font + 1
    for trace in data:
        line = trace.get("line")
        is_scatter = trace.get("type", "scatter") == "scatter"
        # Width 0 marks an outline-free band: it stays that way.
        if is_scatter and isinstance(line, dict) and (line.get("width") or 0) > 0:
            line["width"] = max(line["width"] + line_delta, 0.5)
    for shape in layout.get("shapes") or []:
        line = shape.get("line")
        if isinstance(line, dict) and (line.get("width") or 0) > 0:
            line["width"] = max(line["width"] + shape_delta, 0.5)
    sizes = {"subplot_title": spec.panel_title, "event": spec.label, "guide": spec.label}
    sizes["note"] = spec.note
    for annotation in annotations:
        name = annotation.get("name")
        if name in sizes:
            _sub(annotation, "font")["size"] = sizes[name]
        if name == "event":
            # Labels of nearby changes are staggered by whole label lines.
            level = round(-(annotation.get("yshift") or 0) / (1.4 * previous.label))
            annotation["yshift"] = -level * 1.4 * spec.label


def apply_theme(fig: go.Figure, theme: str) -> go.Figure:
    """Style ``fig`` in place for "screen" (compact) or "print" (large type, thick lines).

    Applying it again, or switching back, is safe: line widths stay relative to the
    screen widths the builders use (the current theme is remembered in ``layout.meta``).
    """
    _check_theme(theme)
    figure = fig.to_plotly_json()
    data, layout = figure["data"], figure["layout"]
    _style(data, layout, theme)
    with fig.batch_update():
        fig.layout = layout
        for trace, styled in zip(fig.data, data, strict=True):
            width = styled.get("line", {}).get("width") if trace.type == "scatter" else None
            if width is not None:
                trace.line.width = width
    return fig


# --------------------------------------------------------------------------- canvas


@functools.lru_cache(maxsize=64)
def _grid_layout(
    rows: int,
    cols: int,
    shared_x: bool | str,
    shared_y: bool | str,
    column_titles: tuple[str, ...],
    row_titles: tuple[str, ...],
    horizontal_spacing: float | None,
    vertical_spacing: float | None,
) -> dict[str, Any]:
    """make_subplots' layout (axis domains, matching, titles) as a plain dict."""
    fig = make_subplots(
        rows=rows,
        cols=cols,
        shared_xaxes=shared_x,
        shared_yaxes=shared_y,
        column_titles=list(column_titles) or None,
        row_titles=list(row_titles) or None,
        horizontal_spacing=horizontal_spacing,
        vertical_spacing=vertical_spacing,
        figure=go.Figure(layout={"template": "none"}),  # skip validating a full template
    )
    layout = fig.layout.to_plotly_json()
    layout.pop("template", None)
    for annotation in layout.get("annotations", []):
        annotation["name"] = "subplot_title"
        annotation.pop("font", None)  # sized by the theme
    return layout


@dataclass(frozen=True)
class _Panel:
    x: str  # trace reference: "x", "x2", ...
    y: str

    @property
    def xaxis(self) -> str:  # layout key: "xaxis", "xaxis2", ...
        return "xaxis" + self.x[1:]

    @property
    def yaxis(self) -> str:
        return "yaxis" + self.y[1:]


class _Canvas:
    """A subplot grid collecting plain-dict traces, shapes and annotations."""

    def __init__(
        self,
        rows: int = 1,
        cols: int = 1,
        *,
        shared_x: bool | str = False,
        shared_y: bool | str = False,
        column_titles: Sequence[str] = (),
        row_titles: Sequence[str] = (),
        horizontal_spacing: float | None = None,
        vertical_spacing: float | None = None,
    ) -> None:
        self.rows, self.cols = rows, cols
        self.layout = copy.deepcopy(
            _grid_layout(
                rows,
                cols,
                shared_x,
                shared_y,
                tuple(column_titles),
                tuple(row_titles),
                horizontal_spacing,
                vertical_spacing,
            )
        )
        self.layout.setdefault("annotations", [])
        self.layout["shapes"] = []
        self.traces: list[dict[str, Any]] = []
        self.active = self.panels()  # panels in use; the rest of the grid is hidden
        self.panel_scale = 1.0  # height of a row of panels, relative to the theme's
        self.filled: set[str] = set()  # x refs of panels that got data

    def use(self, panels: Sequence[_Panel]) -> None:
        """Only ``panels`` are in use: hide the other cells of the grid."""
        self.active = list(panels)
        for panel in self.panels():
            if panel not in self.active:
                self.layout[panel.xaxis]["visible"] = False
                self.layout[panel.yaxis]["visible"] = False

    def panel(self, row: int, col: int) -> _Panel:
        n = (row - 1) * self.cols + col
        suffix = "" if n == 1 else str(n)
        return _Panel("x" + suffix, "y" + suffix)

    def panels(self) -> list[_Panel]:
        return [self.panel(r, c) for r in range(1, self.rows + 1) for c in range(1, self.cols + 1)]

    def add(self, panel: _Panel, trace: dict[str, Any]) -> None:
        trace["xaxis"], trace["yaxis"] = panel.x, panel.y
        self.traces.append(trace)
        x = trace.get("x")
        if x is not None and len(x) and x[0] is not None:
            self.filled.add(panel.x)

    def axis(
        self,
        panel: _Panel,
        *,
        x_title: str | None = None,
        y_title: str | None = None,
        x: dict[str, Any] | None = None,
        y: dict[str, Any] | None = None,
    ) -> None:
        """Set a panel's axis titles and other x / y axis properties."""
        x_axis, y_axis = self.layout[panel.xaxis], self.layout[panel.yaxis]
        if x_title is not None:
            x_axis["title"] = {"text": x_title}
        if y_title is not None:
            y_axis["title"] = {"text": y_title}
        x_axis.update(x or {})
        y_axis.update(y or {})

    def legend_key(self, name: str, color: str, symbol: str = "square") -> None:
        """A legend entry for a variant drawn by traces that have none (heatmaps)."""
        self.traces.append(
            {
                "type": "scatter",
                "x": [None],
                "y": [None],
                "mode": "markers",
                "marker": {"symbol": symbol, "size": 12, "color": color},
                "name": name,
                "legendgroup": name,
                "showlegend": True,
                "hoverinfo": "skip",
            }
        )

    def events(self, history: History, panels: Sequence[_Panel] | None = None) -> None:
        """A dotted grey vertical line at every live change, on every panel.

        Changes made at the same step share one line and one label ("lr 8 → 0.5,
        momentum 0 → 0.9"). Only the newest EVENT_LABELS steps are labelled, the newest
        on the top row and each on a row of its own, so no two labels overlap however
        close their steps are; older lines carry a small mark at their foot that shows
        their label on hover. Labels never widen the step axis (see ``_clip_steps``).
        """
        by_step: dict[int, list[Event]] = {}
        for event in history.events:
            by_step.setdefault(event.step, []).append(event)
        if not by_step:
            return
        end = max([history.last_step() or 0, *by_step])
        labelled = sorted(by_step)[-EVENT_LABELS:]
        for panel in panels if panels is not None else self.active:
            _clip_steps(self.layout[panel.xaxis], end)
            for step, events in by_step.items():
                text = ", ".join(e.label for e in events)
                hover = "<br>".join(e.detail for e in events)
                self.layout["shapes"].append(
                    {
                        "type": "line",
                        "name": "event",
                        "xref": panel.x,
                        "yref": panel.y + " domain",
                        "x0": step,
                        "x1": step,
                        "y0": 0,
                        "y1": 1,
                        "line": {"color": EVENT_COLOR, "width": 1.5, "dash": "dot"},
                        "layer": "above",
                    }
                )
                annotation = {
                    "name": "event",
                    "xref": panel.x,
                    "yref": panel.y + " domain",
                    "x": step,
                    "showarrow": False,
                    "font": {"color": "#555555"},
                    "hovertext": hover,
                }
                if step in labelled:
                    row = len(labelled) - 1 - labelled.index(step)  # the newest on top
                    right = step > 0.7 * end  # late in the run: left of its line, inside
                    annotation.update(
                        text=text,
                        y=1,
                        xanchor="right" if right else "left",
                        yanchor="top",
                        xshift=-3 if right else 3,
                        yshift=-row * 1.4 * THEMES["screen"].label,
                        bgcolor="rgba(255,255,255,0.75)",
                    )
                else:
                    annotation.update(text="▴", y=0, xanchor="center", yanchor="bottom")
                self.layout["annotations"].append(annotation)

    def _note_empty(self, panel: _Panel) -> None:
        """Say "no data yet" in an empty panel, drawn with blank axes rather than left out."""
        self.traces.append(
            {
                "type": "scatter",
                "x": [],
                "y": [],
                "xaxis": panel.x,
                "yaxis": panel.y,
                "showlegend": False,
                "hoverinfo": "skip",
            }
        )
        self.layout["annotations"].append(
            {
                "name": "note",
                "text": NO_DATA,
                "xref": panel.x + " domain",
                "yref": panel.y + " domain",
                "x": 0.5,
                "y": 0.5,
                "showarrow": False,
                "font": {"color": "#555555"},
                "bgcolor": "white",  # over any guide line
            }
        )
        for axis in (self.layout[panel.xaxis], self.layout[panel.yaxis]):
            axis.update(showticklabels=False, showgrid=False, zeroline=False)

    def guide(self, panel: _Panel, y: float, text: str) -> None:
        """A dashed horizontal reference line across a panel, labelled at its right end."""
        self.layout["shapes"].append(
            {
                "type": "line",
                "name": "guide",
                "xref": panel.x + " domain",
                "yref": panel.y,
                "x0": 0,
                "x1": 1,
                "y0": y,
                "y1": y,
                "line": {"color": GUIDE_COLOR, "width": 1.5, "dash": "dash"},
                "layer": "below",
            }
        )
        self.layout["annotations"].append(
            {
                "name": "guide",
                "text": text,
                "xref": panel.x + " domain",
                "yref": panel.y,
                "x": 1,
                "y": y,
                "xanchor": "right",
                "yanchor": "bottom",
                "showarrow": False,
                "font": {"color": "#555555"},
                "bgcolor": "rgba(255,255,255,0.75)",
            }
        )

    def figure(self, title: str, theme: str, *, subtitle: str = "") -> go.Figure:
        for panel in self.active:
            if panel.x not in self.filled:
                self._note_empty(panel)
        self.layout["title"] = {"text": title, "subtitle": {"text": subtitle}}
        self.layout["meta"] = {"rows": self.rows, "panel_scale": self.panel_scale}
        self.layout.setdefault("hovermode", "x unified")
        _style(self.traces, self.layout, theme)
        return go.Figure(data=self.traces, layout=self.layout)


def _gap(pixels: float, rows: int) -> float | None:
    """make_subplots' vertical_spacing (a share of the plot height) for a gap in pixels."""
    if rows < 2:
        return None
    return round(pixels / (rows * THEMES["screen"].panel_height), 4)


def _clip_steps(axis: dict[str, Any], end: int) -> None:
    """Keep an autoranged step axis within the run's steps, 0 to ``end``.

    plotly.js widens an autoranged axis until every annotation placed on it fits, so the
    labels of live changes near either end of a run stretched the step axis far past
    it (to -2,000 with many labels). The data never reach past the run's steps.
    """
    if end > 0:
        axis["autorangeoptions"] = {"clipmin": 0, "clipmax": end}


def _layer_grid(n: int) -> tuple[int, int]:
    """Rows and columns of small multiples for n layers: at most 4 side by side."""
    n = max(n, 1)
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def _line(
    x: np.ndarray,
    y: np.ndarray,
    name: str,
    color: str,
    *,
    width: float = 2.0,
    showlegend: bool = False,
    mode: str = "lines",
    hover: str = "",
) -> dict[str, Any]:
    """A line trace; y goes out as float32, which halves the JSON of long runs."""
    trace = {
        "type": "scatter",
        "x": x,
        "y": np.asarray(y, dtype=np.float32),
        "mode": mode,
        "line": {"color": color, "width": width},
        "name": name,
        "legendgroup": name,
        "showlegend": showlegend,
        "hovertemplate": f"{hover}%{{y:.4g}}<extra>{name}</extra>" if hover else None,
    }
    if "markers" in mode:
        trace["marker"] = {"color": color, "size": 5}
    return {k: v for k, v in trace.items() if v is not None}


def _rgba(color: str, alpha: float) -> str:
    r, g, b = (int(color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r},{g},{b},{alpha})"


def _band(x: np.ndarray, low: np.ndarray, high: np.ndarray, name: str, fill: str) -> dict:
    """The region between two curves as one closed polygon (one trace, not two)."""
    return {
        "type": "scatter",
        "x": np.concatenate([x, x[::-1]]),
        "y": np.concatenate([low, high[::-1]]).astype(np.float32),
        "mode": "lines",
        "line": {"width": 0, "color": fill},
        "fill": "toself",
        "fillcolor": fill,
        "name": name,
        "legendgroup": name,
        "showlegend": False,
        "hoverinfo": "skip",
    }


def _finite(arrays: Sequence[np.ndarray], positive: bool = False) -> np.ndarray:
    values = np.concatenate([np.ravel(a) for a in arrays]) if arrays else np.empty(0)
    keep = np.isfinite(values) & (values > 0) if positive else np.isfinite(values)
    return values[keep]


def _log_axis(arrays: Sequence[np.ndarray]) -> dict[str, Any]:
    """A log y axis with readable ticks: 1-2-5 steps over a short range, else decades."""
    axis: dict[str, Any] = {"type": "log", "tickformat": "~g"}
    values = _finite(arrays, positive=True)
    if len(values):
        decades = math.log10(values.max() / values.min())
        if decades <= 2.5:
            axis["dtick"] = "D2"  # 0.02, 0.05, 0.1, 0.2 ...
        elif decades <= 10:
            axis["dtick"] = 1  # one label per power of ten
    return axis


def _range_including(arrays: Sequence[np.ndarray], y: float) -> list[float]:
    """An axis range over the finite data and ``y``, with 8% room on each side."""
    values = _finite(arrays)
    low = min(float(values.min()), y) if len(values) else y - 1
    high = max(float(values.max()), y) if len(values) else y + 1
    pad = 0.08 * (high - low) or 0.5
    return [low - pad, high + pad]


def _fmt(x: float) -> str:
    return f"{x:.3g}"


# --------------------------------------------------------------------------- builders


def loss_accuracy(history: History, *, theme: str = "screen") -> go.Figure:
    """Training loss (log scale) and test accuracy over steps, one color per variant."""
    _check_theme(theme)
    canvas = _Canvas(
        1,
        2,
        # Short: the two titles share one line, which is narrow on a phone.
        column_titles=("Training loss", "Test accuracy"),
        horizontal_spacing=0.1,
    )
    loss_panel, acc_panel = canvas.panel(1, 1), canvas.panel(1, 2)
    losses = []
    for i, variant in enumerate(history.variants()):
        color = variant_color(variant, i)
        steps, loss = history.series(variant, "", "loss")
        losses.append(loss)
        canvas.add(loss_panel, _line(steps, loss, variant, color, showlegend=True, hover="loss "))
        steps, accuracy = history.series(variant, "", "test_accuracy")
        canvas.add(
            acc_panel,
            _line(steps, accuracy, variant, color, mode="lines+markers", hover="test accuracy "),
        )
    canvas.axis(
        loss_panel,
        x_title=STEP_AXIS,
        y_title="mean loss since last point (log)",
        y=_log_axis(losses),
    )
    # No y title here: between the panels it would lie over the loss curves. The column
    # title and the percent ticks say what this axis is, and the caption says eval mode.
    canvas.axis(
        acc_panel,
        x_title=STEP_AXIS,
        x={"matches": loss_panel.x},  # one step range for both panels
        y={"tickformat": ".0%", "range": [0, 1.02]},
    )
    canvas.events(history)
    return canvas.figure(CHARTS["loss_accuracy"].title, theme)


def _value_label(kind: str) -> str:
    return {
        "preact": "pre-activation (input to the nonlinearity)",
        "postact": "post-activation (output of the nonlinearity)",
    }.get(kind, kind)


def _short_value_label(kind: str) -> str:
    return {"preact": "pre-activation", "postact": "post-activation"}.get(kind, kind)


def _bin_centres(history: History, kind: str) -> np.ndarray | None:
    try:
        edges = history.bin_edges(kind)
    except KeyError:
        return None
    return ((edges[:-1] + edges[1:]) / 2).astype(np.float32)


def _quantize_columns(counts: np.ndarray) -> np.ndarray:
    """(steps, bins) counts -> (bins, steps) uint8, each step scaled so its peak is 255."""
    peak = counts.max(axis=1, keepdims=True)
    scaled = np.divide(counts, peak, out=np.zeros_like(counts), where=peak > 0)
    return np.rint(scaled.T * 255).astype(np.uint8)


def _downsample(n: int, max_columns: int) -> np.ndarray:
    """At most max_columns indices into n, evenly spread, first and last included."""
    if n <= max_columns:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, max(max_columns, 1)).round().astype(np.int64))


def _evenly_spaced_columns(n: int, max_columns: int) -> np.ndarray:
    """At most max_columns indices into n at one fixed spacing, ending with the last.

    A heatmap whose columns are evenly spaced is drawn by plotly.js as one small image
    that the browser scales; uneven columns are painted brick by brick. For the 6 heatmaps
    of the live page that took 110 ms a redraw in Chromium, against 45 ms evenly spaced.
    Stored histograms lie on multiples of the history's stride, so every k-th of them is
    evenly spaced too. The newest is always kept; the oldest only when the spacing lands
    on it (otherwise the first column is within k - 1 stored steps of it).
    """
    most = max(max_columns, 1)
    if n <= most:
        return np.arange(n)
    k = -(-n // most)  # ceil(n / most): then (n - 1) // k + 1 <= most indices
    return np.arange((n - 1) % k, n, k)


def preact_heatmaps(
    history: History, *, kind: str = "preact", max_columns: int = 200, theme: str = "screen"
) -> go.Figure:
    """Histograms over steps as heatmaps (TensorBoard's offset view): a row per layer and
    a column per variant, or the other way round for more than three variants and fewer
    layers (five variant names above five narrow columns ran into each other).

    Color is the density of values in each step's histogram, scaled per step so its peak
    is darkest, and sent as uint8 so the figure stays small. By default every histogram
    a run keeps (200, its default max_histograms) is a column; a run that keeps more shows
    every k-th, evenly spaced.
    """
    _check_theme(theme)
    variants, layers = history.variants(), history.layers()
    variant_rows = len(variants) > 3 and len(variants) > len(layers)
    row_names, column_names = (variants, layers) if variant_rows else (layers, variants)
    canvas = _Canvas(
        max(len(row_names), 1),
        max(len(column_names), 1),
        shared_x=True,
        shared_y=True,
        column_titles=column_names,
        row_titles=row_names,
        horizontal_spacing=SIDE_BY_SIDE_GAP,
        vertical_spacing=_gap(28, len(row_names)),
    )
    # Deep nets: shorter rows, so all layers fit on a screen or two.
    canvas.panel_scale = 1.0 if canvas.rows <= 3 else max(0.6, 3 / canvas.rows)
    centres = _bin_centres(history, kind)
    for c, variant in enumerate(variants):
        color = variant_color(variant, c)
        canvas.legend_key(variant, color)
        if centres is None:
            continue
        for r, layer in enumerate(layers):
            steps, counts = history.histograms(variant, layer, kind)
            if not len(steps):
                continue
            keep = _evenly_spaced_columns(len(steps), max_columns)
            canvas.add(
                canvas.panel(c + 1, r + 1) if variant_rows else canvas.panel(r + 1, c + 1),
                {
                    "type": "heatmap",
                    "x": steps[keep],
                    "y": centres,
                    "z": _quantize_columns(counts[keep]),
                    "zmin": 0,
                    "zmax": 255,
                    "colorscale": [[0.0, "#FFFFFF"], [1.0, color]],
                    "showscale": False,
                    "name": variant,
                    "legendgroup": variant,
                    "showlegend": False,
                    "hovertemplate": f"step %{{x}}<br>value %{{y:.2f}}<br>density %{{z}}/255"
                    f"<extra>{variant} {layer}</extra>",
                },
            )
    for r in range(1, canvas.rows + 1):
        for c in range(1, canvas.cols + 1):
            plain_axis = {"showgrid": False, "zeroline": False}
            canvas.axis(
                canvas.panel(r, c),
                x_title=STEP_AXIS if r == canvas.rows else None,
                y_title=_short_value_label(kind) if c == 1 else None,
                x=plain_axis,
                y=plain_axis,
            )
    canvas.events(history)
    canvas.layout["hovermode"] = "closest"
    return canvas.figure(
        f"{_value_label(kind).capitalize()} over training, per layer",
        theme,
        subtitle="color: share of values in each bin, each step scaled so its peak is darkest",
    )


def histogram_overlay(
    history: History, *, layer: str, step: int, kind: str = "preact", theme: str = "screen"
) -> go.Figure:
    """All variants' histograms of one layer at the stored step nearest below ``step``."""
    _check_theme(theme)
    canvas = _Canvas()
    panel = canvas.panel(1, 1)
    centres = _bin_centres(history, kind)
    shown: dict[str, int] = {}
    if centres is not None:
        edges = history.bin_edges(kind)
        width = float(edges[1] - edges[0])
        # Fills add up where bars overlap: lighter when more variants share a bin.
        alpha = 0.45 if len(history.variants()) <= 2 else 0.3
        for i, variant in enumerate(history.variants()):
            found = history.histogram_at(variant, layer, kind, step)
            if found is None:
                continue
            at, counts = found
            total = counts.sum()
            share = counts / total if total > 0 else counts
            shown[variant] = at
            color = variant_color(variant, i)
            canvas.add(
                panel,
                {
                    "type": "bar",
                    "x": centres,
                    "y": share.astype(np.float32),
                    "width": width,
                    "marker": {
                        "color": _rgba(color, alpha),
                        "line": {"color": color, "width": 1},
                    },
                    "name": variant,
                    "legendgroup": variant,
                    "hovertemplate": f"%{{x:.2f}}: %{{y:.1%}}<extra>{variant}</extra>",
                },
            )
    steps = set(shown.values())
    if not shown:
        where = f"step {step}"
    elif len(steps) == 1:
        where = f"step {steps.pop()}"
    else:
        # A diverged variant stops early: say which step each histogram is from.
        where = ", ".join(f"{v} at step {s}" for v, s in shown.items())
    subtitle = ""
    if centres is not None:
        edges = history.bin_edges(kind)
        subtitle = (
            f"{len(edges) - 1} bins on [{_fmt(edges[0])}, {_fmt(edges[-1])}]; "
            "values outside are counted in the end bins"
        )
    canvas.axis(
        panel, x_title=_value_label(kind), y_title="share of values", y={"tickformat": ".0%"}
    )
    canvas.layout["barmode"] = "overlay"
    canvas.layout["bargap"] = 0
    return canvas.figure(
        f"{layer}: {_short_value_label(kind)} histogram, {where}", theme, subtitle=subtitle
    )


def _panel_title(canvas: _Canvas, panel: _Panel, text: str) -> None:
    """A title above one panel, sized by the theme like make_subplots' subplot_titles
    (placed by hand, so the cached grid does not depend on the names)."""
    canvas.layout["annotations"].append(
        {
            "name": "subplot_title",
            "text": text,
            "xref": panel.x + " domain",
            "yref": panel.y + " domain",
            "x": 0.5,
            "y": 1,
            "xanchor": "center",
            "yanchor": "bottom",
            "showarrow": False,
        }
    )


def _panel_titles(canvas: _Canvas, panels: Sequence[_Panel], names: Sequence[str]) -> None:
    for name, panel in zip(names, panels, strict=False):
        _panel_title(canvas, panel, name)


def _per_layer(
    history: History,
    metric: str,
    y_title: str,
    *,
    log_y: bool = False,
    y_range: Sequence[float] | None = None,
    include: float | None = None,
    tickformat: str | None = None,
    hover: str = "",
    layers: Sequence[str] | None = None,
) -> tuple[_Canvas, list[_Panel]]:
    """Small multiples of one per-layer metric over steps, a line per variant.

    ``include``: a y value the shared axis must show (a guide line), with some margin.
    ``layers``: the panels, when not every layer has the metric (default all layers).
    """
    layers = history.layers() if layers is None else list(layers)
    rows, cols = _layer_grid(len(layers))
    # Between rows: the x tick labels and title of the row above, and the layer names.
    canvas = _Canvas(
        rows,
        cols,
        shared_y=True,
        horizontal_spacing=SIDE_BY_SIDE_GAP,
        vertical_spacing=_gap(100, rows),
    )
    panels = [canvas.panel(i // cols + 1, i % cols + 1) for i in range(len(layers))] or [
        canvas.panel(1, 1)
    ]
    canvas.use(panels)
    seen: list[np.ndarray] = []
    for i, variant in enumerate(history.variants()):
        color = variant_color(variant, i)
        legend_shown = False
        for layer, panel in zip(layers, panels, strict=False):
            steps, values = history.series(variant, layer, metric)
            if not len(steps):
                continue
            seen.append(values)
            canvas.add(
                panel,
                _line(steps, values, variant, color, showlegend=not legend_shown, hover=hover),
            )
            legend_shown = True
    y: dict[str, Any] = _log_axis(seen) if log_y else {}
    if y_range is not None:
        y["range"] = list(y_range)
    elif include is not None:
        y["range"] = _range_including(seen, include)
    if tickformat:
        y["tickformat"] = tickformat
    for j, panel in enumerate(panels):
        first_column = j % cols == 0
        canvas.axis(panel, x_title=STEP_AXIS, y_title=y_title if first_column else None, y=y)
    _panel_titles(canvas, panels, layers)
    canvas.events(history, panels)
    return canvas, panels


def saturation(
    history: History, *, threshold: float, activation: str, theme: str = "screen"
) -> go.Figure:
    """Share of saturated activations (dead units for ReLU) per layer over steps."""
    _check_theme(theme)
    t = float(threshold)
    if activation == "sigmoid":
        rule = f"saturated: sigmoid output < {_fmt(1 - t)} or > {_fmt(t)}"
        y_title, title = "share saturated", "Saturated sigmoid activations per layer"
    elif activation == "tanh":
        rule = f"saturated: |tanh output| > {_fmt(t)}"
        y_title, title = "share saturated", "Saturated tanh activations per layer"
    elif activation == "relu":
        rule = "dead unit: ReLU output 0 for every probe example"
        y_title, title = "share of dead units", "Dead ReLU units per layer"
    else:
        raise ValueError(f"activation = {activation!r}: allowed: sigmoid, tanh, relu")
    canvas, panels = _per_layer(history, "saturation", y_title, hover="saturated ")
    # A fixed 0-100 % axis drew the usual outcome, a share under 1 %, as a line on the
    # floor. So the axis zooms in to the data, from 0 and to at least 5 %.
    zoom = {
        "rangemode": "tozero",
        "autorangeoptions": {"include": [0, 0.05], "clipmax": 1.02},
        "tickformat": ".2~%",
    }
    for panel in panels:
        canvas.axis(panel, y=zoom)
    return canvas.figure(title, theme, subtitle=rule + " (on the fixed probe batch)")


def grad_norms(history: History, *, theme: str = "screen") -> go.Figure:
    """||dL/dW|| of each hidden layer's weights over steps (log scale)."""
    _check_theme(theme)
    canvas, _ = _per_layer(
        history,
        "grad_norm",
        "‖dL/dW‖ (log scale)",
        log_y=True,
        hover="‖dL/dW‖ ",
    )
    return canvas.figure(
        CHARTS["grad_norms"].title,
        theme,
        subtitle="Frobenius norm of the weight gradient on the training batch",
    )


def update_ratio(history: History, *, theme: str = "screen") -> go.Figure:
    """log10(std(W_{t+1} - W_t) / std(W_t)) per layer over steps, with the -3 guide line."""
    _check_theme(theme)
    canvas, panels = _per_layer(
        history,
        "update_ratio",
        "log10(update / weights)",
        include=-3.0,
        hover="log10 ratio ",
    )
    for panel in panels:
        canvas.guide(panel, -3.0, "≈1e-3 healthy")
    return canvas.figure(
        CHARTS["update_ratio"].title,
        theme,
        subtitle="log10(std(W after − W before) / std(W)) for each weight matrix, one step",
    )


_BAND_PAIRS = (("0", "100"), ("6.68", "93.32"), ("15.87", "84.13"), ("30.85", "69.15"))
# The light TensorBoard bands are shading behind the lines: this many points each is
# plenty, and keeps a long run's figure small (the lines keep every point).
_BAND_POINTS = 300


def percentile_bands(
    history: History, *, layer: str, unit: bool = True, theme: str = "screen"
) -> go.Figure:
    """Ioffe & Szegedy Fig. 1(b)/(c): 15/50/85th percentiles of the sigmoid input.

    One panel per variant, shared y, at most three side by side: five in a row left each
    panel about 45 px on a projector with the sidebar open, too narrow for its step labels
    and axis title. ``unit=True`` (the default) follows the one probed unit, as the paper
    does; ``unit=False`` pools all units of the layer, with TensorBoard's nested bands
    (min-max, ±1.5, ±1, ±0.5 sigma) lightly shaded.
    """
    _check_theme(theme)
    variants = history.variants()
    cols = min(max(len(variants), 1), 3)
    rows = math.ceil(max(len(variants), 1) / cols)
    canvas = _Canvas(
        rows,
        cols,
        shared_y=True,
        horizontal_spacing=SIDE_BY_SIDE_GAP,
        vertical_spacing=_gap(100, rows),
    )
    panels = [canvas.panel(i // cols + 1, i % cols + 1) for i in range(len(variants))]
    canvas.use(panels or [canvas.panel(1, 1)])
    _panel_titles(canvas, panels, variants)
    prefix = "unit_p" if unit else "preact_p"
    for i, (variant, panel) in enumerate(zip(variants, panels, strict=True)):
        color = variant_color(variant, i)
        if not unit:
            for lo, hi in _BAND_PAIRS:
                steps, low = history.series(variant, layer, f"preact_band_p{lo}")
                _, high = history.series(variant, layer, f"preact_band_p{hi}")
                if len(steps) and len(low) == len(high):
                    keep = _downsample(len(steps), _BAND_POINTS)
                    shade = _rgba(color, 0.08)
                    canvas.add(panel, _band(steps[keep], low[keep], high[keep], variant, shade))
        steps, p15 = history.series(variant, layer, f"{prefix}15")
        _, p50 = history.series(variant, layer, f"{prefix}50")
        _, p85 = history.series(variant, layer, f"{prefix}85")
        if len(steps) and len(p15) == len(p85):
            canvas.add(panel, _band(steps, p15, p85, variant, _rgba(color, 0.25)))
        for name, values, width in (("15", p15, 1.25), ("50", p50, 2.5), ("85", p85, 1.25)):
            trace = _line(
                steps,
                values,
                variant,
                color,
                width=width,
                showlegend=name == "50",
                hover=f"{name}th percentile ",
            )
            trace["meta"] = f"p{name}"
            canvas.add(panel, trace)
        y_title = f"{_short_value_label('preact')} in {layer}" if i % cols == 0 else None
        canvas.axis(panel, x_title=STEP_AXIS, y_title=y_title)
    canvas.events(history, panels)
    if unit:
        title = f"One unit's input in {layer} (Ioffe & Szegedy, Fig. 1b/c)"
        subtitle = "lines: 15th, 50th (bold) and 85th percentiles over the probe batch"
    else:
        title = f"Inputs to the nonlinearity in {layer}, all units pooled"
        subtitle = (
            "pooled: lines are 15th, 50th (bold), 85th percentiles over all units and probe "
            "examples, so they mix units with different means; "
            "light bands: min-max and ±1.5, ±1, ±0.5 σ (TensorBoard)"
        )
    return canvas.figure(title, theme, subtitle=subtitle)


def _layers_with(history: History, metric: str) -> list[str]:
    return [
        layer
        for layer in history.layers()
        if any(len(history.series(v, layer, metric)[0]) for v in history.variants())
    ]


def ics_l2(history: History, *, theme: str = "screen") -> go.Figure:
    """||G - G'|| per layer over steps (log scale): Santurkar et al.'s ICS measure."""
    _check_theme(theme)
    layers = _layers_with(history, "ics_l2")
    canvas, _ = _per_layer(
        history, "ics_l2", "‖G − G′‖ (log scale)", log_y=True, hover="ICS ", layers=layers
    )
    return canvas.figure(
        CHARTS["ics_l2"].title,
        theme,
        subtitle="G: the layer's weight gradient; G′: the same after only the layers below "
        "it took the step (same batch). Layer 1 has none below: its ICS is 0.",
    )


def ics_cos(history: History, *, theme: str = "screen") -> go.Figure:
    """cos(G, G') per layer over steps, with the guide at 1 (direction unchanged)."""
    _check_theme(theme)
    layers = _layers_with(history, "ics_cos")
    canvas, panels = _per_layer(
        history, "ics_cos", "cos(G, G′)", include=1.0, hover="cos ", layers=layers
    )
    for panel in panels:
        canvas.guide(panel, 1.0, "1: same direction")
    return canvas.figure(
        CHARTS["ics_cos"].title,
        theme,
        subtitle="cosine between each layer's gradient before and after the layers below it moved",
    )


_LANDSCAPE_PANELS = (
    ("landscape_loss_min", "landscape_loss_max", "L(W − ηg)", True),
    ("landscape_grad_diff_min", "landscape_grad_diff_max", "‖∇L(W−ηg) − ∇L(W)‖", True),
    ("landscape_beta", None, "β", False),  # spans little: a linear axis reads better
)


def landscape(history: History, *, theme: str = "screen") -> go.Figure:
    """Loss variation, gradient predictiveness (bands, min to max over the step sizes)
    and effective beta-smoothness over training, a color per variant."""
    _check_theme(theme)
    # Stacked, not side by side: three panels in a row leave no room for their titles
    # and y axes on a phone, and the shared step axis lines the three measures up.
    canvas = _Canvas(3, 1, shared_x=True, vertical_spacing=_gap(60, 3))
    panels = [canvas.panel(r, 1) for r in (1, 2, 3)]
    titles = ("Loss variation", "Gradient predictiveness", "Effective β-smoothness")
    _panel_titles(canvas, panels, titles)
    seen: list[list[np.ndarray]] = [[], [], []]
    for i, variant in enumerate(history.variants()):
        color = variant_color(variant, i)
        for k, ((low_m, high_m, label, _), panel) in enumerate(
            zip(_LANDSCAPE_PANELS, panels, strict=True)
        ):
            steps, low = history.series(variant, "", low_m)
            if not len(steps):
                continue
            seen[k].append(low)
            if high_m is not None:
                _, high = history.series(variant, "", high_m)
                seen[k].append(high)
                canvas.add(panel, _band(steps, low, high, variant, _rgba(color, 0.3)))
                for values in (low, high):
                    canvas.add(
                        panel, _line(steps, values, variant, color, width=1.25, hover=label + " ")
                    )
            else:
                canvas.add(
                    panel,
                    _line(steps, low, variant, color, width=2.0, showlegend=True, hover="β "),
                )
    for k, ((*_, label, log_y), panel) in enumerate(zip(_LANDSCAPE_PANELS, panels, strict=True)):
        canvas.axis(
            panel,
            x_title=STEP_AXIS if k == 2 else None,
            y_title=label + (" (log)" if log_y else ""),
            y=_log_axis(seen[k]) if log_y else None,
        )
    canvas.events(history)
    return canvas.figure(
        CHARTS["landscape"].title,
        theme,
        subtitle="at each probe, steps of η·lr along −g on the step's batch; "
        "bands: min to max over η",
    )
