"""The teaching pages' export panels: the charts they show, as files and as one zip."""

import io
import zipfile

import numpy as np
import plotly.graph_objects as go
import pytest
from streamlit.testing.v1 import AppTest

from bn_core import export

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_figure_rows_are_the_traces_numbers():
    fig = go.Figure([go.Scatter(name="a", x=[0, 1, 2], y=[3.0, 4.0, 5.0])])
    fig.add_trace(go.Scatter(name="b", x=np.arange(2), y=np.array([7.0, 8.0])))
    rows = export.figure_rows(fig)
    assert list(rows.columns) == ["trace", "x", "y"]
    assert rows[rows.trace == "a"].y.tolist() == [3.0, 4.0, 5.0]
    assert rows[rows.trace == "b"].x.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("page", "name"), [("pages/bias_blowup.py", "blowup"), ("pages/inside_batchnorm.py", "inside")]
)
def test_page_export_panel_makes_files_and_a_zip(page, name, app_path):
    at = AppTest.from_file(str(app_path), default_timeout=180).run()
    at.switch_page(page).run()
    assert not at.exception
    next(b for b in at.button if b.label == "Prepare files").click().run()
    labels = [d.label for d in at.get("download_button")]
    assert {"HTML", "CSV"} <= set(labels)
    if export.static_export_available()[0]:
        assert {"PNG", "SVG", "PDF"} <= set(labels)
    chart, _, files = at.session_state[f"export_{name}"]
    assert files["csv"].startswith(b"trace,x,y")
    assert b'<script src="http' not in files["html"]
    next(b for b in at.button if b.label.startswith("Build a zip")).click().run()
    assert not at.exception
    with zipfile.ZipFile(io.BytesIO(at.session_state[f"export_zip_{name}"])) as zf:
        names = zf.namelist()
        readme = zf.read("README.txt").decode()
    shown = at.session_state["shown_figures"][name]
    for key in shown:
        assert f"figures/{key}.html" in names and f"figures/{key}.csv" in names
        assert f"figures/{key}." in readme
