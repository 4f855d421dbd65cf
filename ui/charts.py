"""One way to put a bn_core figure on a page: the chart, its caption, print-ready downloads."""

from __future__ import annotations

import contextlib
import functools
import os
import shutil
import tempfile
import threading
from pathlib import Path

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


def show_chart(
    fig: go.Figure, chart: str, trainer: Trainer | None = None, page: str = "live"
) -> None:
    """Draw a figure with its caption; the toolbar's camera saves a 3x PNG for slides."""
    config = {
        "displaylogo": False,
        "toImageButtonOptions": {
            "format": "png",
            "scale": 3,
            "filename": chart_filename(page, chart, trainer),
        },
    }
    key = f"chart_{page}_{chart}"
    src = plotly_js_src() if st.get_option("server.enableStaticServing") else None
    if src is None:
        st.plotly_chart(fig, key=key, config=config)
    else:
        # A keyed component keeps its place from tick to tick, so the browser updates the
        # chart in place (Plotly.react) instead of building it anew.
        figure = pio.to_json(fig, validate=False)
        _react_chart()(key=key, data={"figure": figure, "config": config, "src": src})
    # Run charts and teaching-experiment charts keep their captions in separate registries.
    info = figures.CHARTS.get(chart) or EXPERIMENT_CHARTS.get(chart)
    if info is not None:
        st.caption(info.caption)
    # What the page showed last, for its export panel: figure, caption, variants, step.
    shown = st.session_state.setdefault("shown_figures", {}).setdefault(page, {})
    run = (tuple(trainer.variant_names), trainer.step) if trainer is not None else ((), None)
    shown[chart] = (fig, info.caption if info is not None else "", *run)
