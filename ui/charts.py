"""One way to put a bn_core figure on a page: the chart, its caption, print-ready downloads."""

from __future__ import annotations

import re

import plotly.graph_objects as go
import streamlit as st

from bn_core import figures
from bn_core.experiments.charts import EXPERIMENT_CHARTS
from bn_core.train import Trainer


def chart_filename(page: str, chart: str, trainer: Trainer | None) -> str:
    """A file name that says what the figure is: page, chart, and the run's variants.

    Not the step: the chart's config must stay the same from tick to tick, or the
    browser builds the chart anew at every redraw instead of updating it (the export
    panel's files do name the step).
    """
    name = f"bnlab_{page}_{chart}"
    if trainer is not None:
        name += f"_{'-vs-'.join(trainer.variant_names)}"
    return re.sub(r"[^A-Za-z0-9_.\-]+", "-", name)


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
    st.plotly_chart(fig, key=f"chart_{page}_{chart}", config=config)
    # Run charts and teaching-experiment charts keep their captions in separate registries.
    info = figures.CHARTS.get(chart) or EXPERIMENT_CHARTS.get(chart)
    if info is not None:
        st.caption(info.caption)
    # What the page showed last, for its export panel.
    shown = st.session_state.setdefault("shown_figures", {}).setdefault(page, {})
    shown[chart] = (fig, info.caption if info is not None else "")
