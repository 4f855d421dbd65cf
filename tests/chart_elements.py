"""The figures an AppTest run drew, read back from its elements as the browser gets them.

ui.charts.show_chart draws with the app's own chart component (Plotly.react in the
browser), or with st.plotly_chart where plotly.js cannot be served; both are read here.
"""

from __future__ import annotations

import json

from streamlit.testing.v1 import AppTest

from ui.charts import CHART_COMPONENT


def figure_specs(at: AppTest, prefix: str) -> dict[str, dict]:
    """Plotly JSON of each chart whose key starts with ``prefix``, by the rest of the key."""
    out = {}
    for el in at.get("bidi_component"):
        if el.proto.component_name == CHART_COMPONENT and prefix in el.proto.id:
            name = el.proto.id.rpartition(prefix)[2]
            out[name] = json.loads(json.loads(el.proto.json)["figure"])
    for el in at.get("plotly_chart"):
        if prefix in el.proto.id:
            out[el.proto.id.rpartition(prefix)[2]] = json.loads(el.proto.spec)
    return out


def page_charts(at: AppTest, page: str) -> dict[str, dict]:
    """Plotly figures on a page by chart key (ui.charts keys them "chart_<page>_<key>")."""
    return figure_specs(at, f"chart_{page}_")
