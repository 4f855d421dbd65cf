"""Every page's export panel, in the real app under AppTest: what its chart picker calls the
charts (their titles, never their keys), the name of every file it offers
(page_chart_variants_stepN.ext), and the zip of a page's charts with one shared plotly.js.
"""

import io
import json
import re
import zipfile

import numpy as np
import plotly.graph_objects as go
import pytest
from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage
from streamlit.testing.v1 import AppTest

from bn_core import export
from bn_core.experiments.charts import EXPERIMENT_CHARTS
from bn_core.figures import CHARTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TIMEOUT = 180  # a page's first run builds its nets; a zip renders its charts in Chromium
# page_chart_variants_stepN.ext: fields of lower-case letters, digits, "." and "-".
NAME_RE = re.compile(r"[a-z0-9.-]+_[a-z0-9.-]+_[a-z0-9.-]+_step\d+\.[a-z]+")
STATIC_OK = export.static_export_available()[0]
FORMATS = {"html", "csv"} | ({"png", "svg", "pdf"} if STATIC_OK else set())


@pytest.fixture
def download_names(monkeypatch) -> dict[str, str]:
    """The file name of every download the app offers, by its file id: what a browser
    saves it as. Streamlit keeps it in its media store; this records it on the way in."""
    names: dict[str, str] = {}
    store = MemoryMediaFileStorage.load_and_get_id

    def recording(self, path_or_data, mimetype, kind, filename=None):
        file_id = store(self, path_or_data, mimetype, kind, filename)
        names[file_id] = filename
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", recording)
    return names


def offered(at: AppTest, names: dict[str, str]) -> dict[str, str]:
    """Label -> file name of each download button on the page."""
    out = {}
    for button in at.get("download_button"):
        file_id = button.proto.url.rsplit("/", 1)[-1].split(".")[0]
        out[button.label] = names[file_id]
    return out


def run(target, timeout: float = TIMEOUT) -> AppTest:
    at = target.run(timeout=timeout)
    assert not at.exception, [e.value for e in at.exception]
    return at


def click(at: AppTest, label: str, timeout: float = TIMEOUT) -> AppTest:
    found = [b for b in at.button if b.label == label or b.label.startswith(label)]
    assert len(found) == 1, (label, [b.label for b in at.button])
    return run(found[0].click(), timeout)


def assert_safe_name(name: str, page: str) -> None:
    assert NAME_RE.fullmatch(name), name
    assert name.startswith(f"{page}_") and not name.startswith(".")
    assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in name), name


def test_figure_rows_are_the_traces_numbers():
    fig = go.Figure([go.Scatter(name="a", x=[0, 1, 2], y=[3.0, 4.0, 5.0])])
    fig.add_trace(go.Scatter(name="b", x=np.arange(2), y=np.array([7.0, 8.0])))
    rows = export.figure_rows(fig)
    assert list(rows.columns) == ["trace", "x", "y"]
    assert rows[rows.trace == "a"].y.tolist() == [3.0, 4.0, 5.0]
    assert rows[rows.trace == "b"].x.tolist() == [0, 1]


def open_blowup(at: AppTest) -> AppTest:
    """The minimal model, and a 20-step run of the real nets (charts with a run behind them)."""
    run(at.slider(key="bb_net_steps").set_value(20))
    return click(at, "Train both nets")


def open_sweep(at: AppTest) -> AppTest:
    """A sweep of two rates of 50 steps, stopped after its first tick if it is still on."""
    run(at.number_input(key="sweep_w_count").set_value(2))
    run(at.number_input(key="sweep_w_steps").set_value(50))
    at = click(at, "Start sweep")
    stop = next(b for b in at.button if b.label == "Stop")
    return at if stop.disabled else run(stop.click())


PAGES = {  # page name: (its file, what opens its charts, the zip's variants and step)
    "blowup": ("pages/bias_blowup.py", open_blowup, "batchnorm-vs-batchnorm-naive_step20"),
    "inside": ("pages/inside_batchnorm.py", None, "none_step0"),  # no training run behind
    "ics": ("pages/ics_question.py", None, "plain-vs-batchnorm-vs-batchnorm-noisy_step0"),
    "sweep": ("pages/lr_sweep.py", open_sweep, "none_step0"),
}


@pytest.mark.parametrize("name", list(PAGES))
def test_page_export_panel_names_its_charts_and_files(name, app_path, download_names):
    path, open_charts, run_fields = PAGES[name]
    at = run(AppTest.from_file(str(app_path), default_timeout=TIMEOUT))
    at = run(at.switch_page(path))
    if open_charts is not None:
        at = open_charts(at)
    shown = at.session_state["shown_figures"][name]
    assert shown

    # The picker offers the charts by their titles, in the order the page shows them.
    picker = at.selectbox(key=f"w_export_{name}")
    registry = {**CHARTS, **EXPERIMENT_CHARTS}
    assert picker.options == [registry[key].title for key in shown]
    assert not set(picker.options) & set(shown)  # no raw key anywhere

    # One chart in every format, each file named page_chart_variants_stepN.ext.
    at = click(at, "Prepare files")
    chart, stem, files = at.session_state[f"export_{name}"]
    assert set(files) == FORMATS
    names = offered(at, download_names)
    for ext in files:
        assert names[ext.upper()] == f"{stem}.{ext}"
        assert_safe_name(names[ext.upper()], name)
    assert stem.split("_")[1] == chart.replace("_", "-")
    assert files["csv"].startswith(b"trace,x,y")
    assert export.PLOTLY_JS_FILE not in files["html"].decode()  # a lone file carries its own
    assert b'<script src="http' not in files["html"]

    # Every chart of the page in one zip, its name in the same scheme.
    at = click(at, "Build a zip of every chart on this page")
    zip_stem, data = at.session_state[f"export_zip_{name}"]
    zip_name = offered(at, download_names)[f"Download {zip_stem}.zip ({len(data) / 1e6:.1f} MB)"]
    assert zip_name == f"{name}_all-charts_{run_fields}.zip" == f"{zip_stem}.zip"
    assert_safe_name(zip_name, name)
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        in_zip = set(zf.namelist())
        readme = zf.read("README.txt").decode()
        shared = zf.read(f"figures/{export.PLOTLY_JS_FILE}")
        pages = {n: zf.read(n).decode() for n in in_zip if n.endswith(".html")}
    assert shared == export.plotly_js()
    figure_files = in_zip - {"README.txt", f"figures/{export.PLOTLY_JS_FILE}"}
    assert len(figure_files) == len(shown) * len(FORMATS)
    for file in figure_files:
        assert file.startswith("figures/")
        assert_safe_name(file.removeprefix("figures/"), name)
    for key in shown:
        slug = key.replace("_", "-")
        stems = {f.rsplit(".", 1)[0] for f in figure_files if f.split("_")[1] == slug}
        assert len(stems) == 1, (key, stems)  # every format of a chart shares one name
        assert f"{stems.pop()}.*" in readme
    for file, html in pages.items():
        assert re.findall(r'<script\b[^>]*\bsrc="([^"]*)"', html) == [export.PLOTLY_JS_FILE]
        assert len(html) < len(shared) // 10, file  # plotly.js is not embedded


def camera_names(at: AppTest) -> list[str]:
    """The file name each chart's camera button saves its PNG as."""
    configs = [json.loads(c.proto.json)["config"] for c in at.get("bidi_component")]
    return [config["toImageButtonOptions"]["filename"] for config in configs]


def test_live_page_picker_shows_titles_and_every_file_is_named_by_the_scheme(
    app_path, download_names
):
    at = run(AppTest.from_file(str(app_path), default_timeout=TIMEOUT))
    trainer = at.session_state.trainer
    assert trainer.step == 0
    cameras = camera_names(at)
    assert "live_loss-accuracy_plain-vs-batchnorm" in cameras
    run(next(b for b in at.button if b.label == "Step").click())
    step = at.session_state.trainer.step
    assert step >= 1
    # page_chart_variants, without the step: a new name would make plotly.js build the
    # chart anew at every tick instead of updating it.
    assert camera_names(at) == cameras
    config_name = offered(at, download_names)["Download config JSON"]
    assert config_name == f"live_config_plain-vs-batchnorm_step{step}.json"

    picker = at.selectbox(key="w_export_chart")
    assert picker.options == list(export.SPEC_TITLES.values())
    assert not set(picker.options) & set(export.SPEC_TITLES)

    at = click(at, "Prepare files")
    key, stem, files = at.session_state.export_chart
    names = offered(at, download_names)
    assert stem == f"live_{key.replace('_', '-')}_plain-vs-batchnorm_step{step}"
    for ext in files:
        assert names[ext.upper()] == f"{stem}.{ext}"
        assert_safe_name(names[ext.upper()], "live")
    assert names["Download config JSON"] == config_name

    at = click(at, "Build teaching pack (zip)")
    pack_stem, data = at.session_state.export_pack
    pack_name = offered(at, download_names)[f"Download {pack_stem}.zip ({len(data) / 1e6:.1f} MB)"]
    assert pack_name == f"live_teaching-pack_plain-vs-batchnorm_step{step}.zip"
    with zipfile.ZipFile(io.BytesIO(data)) as zf:
        figure_files = [n for n in zf.namelist() if n.startswith("figures/")]
    assert f"figures/{export.PLOTLY_JS_FILE}" in figure_files
    for file in figure_files:
        if not file.endswith(export.PLOTLY_JS_FILE):
            assert_safe_name(file.removeprefix("figures/"), "live")
