"""Export: print-ready figures (PNG/SVG/PDF through Kaleido, offline HTML), their data as
CSV, the teaching pack, and the one scheme that names every exported file.

Tests that render through Kaleido need a Chrome/Chromium; they are skipped only where
``static_export_available()`` says there is none (CI installs Debian's chromium).
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import plotly
import pytest
from PIL import Image

from bench.export_pack import _history as benchmark_run
from bn_core import export
from bn_core.config import RunConfig
from bn_core.figures import CHARTS
from bn_core.history import History
from bn_core.train import Trainer

# The run bench/export_pack.py packs, so the pack's size here is the benchmark's.
STEPS = 600
LR_CHANGE_STEP = STEPS // 2
PACK_LIMIT_BYTES = 4_000_000
# page_chart_variants_stepN.ext: fields of lower-case letters, digits, "." and "-".
NAME_RE = re.compile(r"[a-z0-9][a-z0-9.-]*_[a-z0-9.-]+_[a-z0-9.-]+_step\d+(\.[a-z]+)?")
KEYS = [
    "loss_accuracy",
    "preact_heatmaps",
    "histogram_overlay",
    "saturation",
    "grad_norms",
    "percentile_bands",
    "percentile_bands_unit",
    "update_ratio",
]
DATA_FILES = {
    "metrics.csv",
    "config.json",
    "events.json",
    "claims.json",
    "histograms.npz",
    "README.txt",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PLOTLY_JS = (Path(plotly.__file__).parent / "package_data" / "plotly.min.js").read_text("utf-8")


@pytest.fixture(scope="module")
def run(one_torch_thread_for_module) -> tuple[History, RunConfig]:
    """The benchmark's run: the paper's Fig. 1 set-up for 600 steps on one thread, the
    learning rate raised half way (a live change the pack must record)."""
    return benchmark_run(STEPS, threads=1, seed=0)


@pytest.fixture(scope="module")
def history(run) -> History:
    return run[0]


@pytest.fixture(scope="module")
def config(run) -> RunConfig:
    return run[1]


@pytest.fixture(scope="module")
def specs(history, config) -> dict[str, export.FigureSpec]:
    return {spec.key: spec for spec in export.figure_specs(history, config)}


@pytest.fixture(scope="module")
def static_ok() -> bool:
    return export.static_export_available()[0]


def needs_browser() -> None:
    ok, reason = export.static_export_available()
    if not ok:
        pytest.skip(reason)


@pytest.fixture(scope="module")
def pack(history, config) -> dict:
    """One teaching pack in all formats, with every progress call it made."""
    calls: list[tuple[int, int, str]] = []
    data = export.teaching_pack(history, config, progress=lambda *a: calls.append(a))
    return {"zip": zipfile.ZipFile(io.BytesIO(data)), "progress": calls, "bytes": len(data)}


def figure_paths(specs, formats) -> set[str]:
    return {f"figures/{spec.filename}.{ext}" for spec in specs.values() for ext in formats}


SHARED_JS = f"figures/{export.PLOTLY_JS_FILE}"
DIV_ID = re.compile(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}")


def read_csv(data: bytes) -> pd.DataFrame:
    # keep_default_na=False: the run-level layer "" stays "" rather than NaN.
    return pd.read_csv(io.BytesIO(data), keep_default_na=False)


def assert_same_rows(got: pd.DataFrame, expected: pd.DataFrame) -> None:
    expected = expected.reset_index(drop=True)
    assert list(got.columns) == list(expected.columns)
    for column in got.columns:
        if expected[column].dtype.kind in "iuf":
            # CSV writes the shortest repr, so floats come back bit for bit.
            np.testing.assert_array_equal(got[column].to_numpy(), expected[column].to_numpy())
        else:
            assert got[column].astype(str).tolist() == expected[column].astype(str).tolist()


# --------------------------------------------------------------------------- names, specs


def test_figure_filename_says_page_chart_variants_and_step():
    name = export.figure_filename("live", "grad_norms", ["plain", "batchnorm"], 1200, "png")
    assert name == "live_grad-norms_plain-vs-batchnorm_step1200.png"
    one = export.figure_filename("live", "grad_norms", ["plain"], 7)
    assert one == "live_grad-norms_plain_step7"
    odd = export.figure_filename("Live", "a chart/with:odd*chars", ["x y", "BN_naive"], None)
    assert odd == "live_a-chart-with-odd-chars_x-y-vs-bn-naive_step0"
    assert export.figure_filename("inside", "bn_stages", [], None, "csv") == (
        "inside_bn-stages_none_step0.csv"
    )
    # The camera button's name: the same fields but the step, which moves while it plays.
    assert export.chart_name("live", "grad_norms", ["plain", "batchnorm"]) == (
        "live_grad-norms_plain-vs-batchnorm"
    )
    # Four fields, split at "_": page, chart, variants, step.
    page, chart, variants, step = name.removesuffix(".png").split("_")
    assert (page, chart, variants, step) == ("live", "grad-norms", "plain-vs-batchnorm", "step1200")


@pytest.mark.parametrize(
    "hostile", ["../../etc/passwd", "a\\b", "..", ".hidden", "x\x00y", "ñ数据", "CON:", "", "_"]
)
def test_figure_filename_is_safe_on_any_file_system(hostile):
    name = export.figure_filename(hostile, hostile, [hostile, "plain"], 3, "png")
    assert NAME_RE.fullmatch(name), name
    assert ".." not in name and not name.startswith(".")
    assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in name), name
    assert len(name.removesuffix(".png").split("_")) == 4


def test_chart_titles_are_words_not_keys():
    assert export.chart_title("percentile_bands") == CHARTS["percentile_bands"].title
    assert export.chart_title("bn_stages") == "One mini-batch through BN"  # an experiment's
    assert export.chart_title("made_up_chart") == "Made up chart"


def test_figure_specs_cover_the_live_page_in_the_print_theme(specs, history, config):
    assert list(specs) == KEYS
    last_layer = history.layers()[-1]
    for key, spec in specs.items():
        assert spec.chart in CHARTS
        assert spec.figure.layout.meta["theme"] == "print"
        assert spec.title == spec.figure.layout.title.text and spec.title
        assert spec.caption.startswith(CHARTS[spec.chart].caption)
        assert len(spec.data), key
        chart = key.replace("_", "-")
        assert re.fullmatch(rf"live_{chart}_plain-vs-batchnorm_step\d+", spec.filename)
        assert spec.filename == export.figure_filename(
            "live", key, ["plain", "batchnorm"], int(spec.filename.rsplit("step", 1)[1])
        )
    # Percentile bands and the histogram default to the last layer, as the page does.
    assert last_layer in specs["percentile_bands"].title
    assert f"One unit's input in {last_layer}" in specs["percentile_bands_unit"].title
    assert f"#{config.probe_unit}" in specs["percentile_bands_unit"].caption
    assert specs["histogram_overlay"].title.startswith(f"{last_layer}:")


def test_histogram_overlay_takes_the_step_asked_for(history, config):
    spec = {s.key: s for s in export.figure_specs(history, config, layer="layer1", step=20)}
    overlay = spec["histogram_overlay"]
    assert overlay.title == "layer1: pre-activation histogram, step 20"
    assert set(overlay.data["step"]) == {20} and set(overlay.data["layer"]) == {"layer1"}
    assert overlay.filename.endswith("_step20")
    assert set(spec["percentile_bands"].data["layer"]) == {"layer1"}


def test_figure_specs_of_a_run_without_steps_still_build(config):
    fresh = Trainer(config).history  # only the step-0 evaluation
    specs = export.figure_specs(fresh, config)
    assert [s.key for s in specs] == KEYS
    assert all(s.title for s in specs)


# --------------------------------------------------------------------------- csv


SCALAR_DATA = {  # key: (metrics the chart draws, only the last layer?)
    "loss_accuracy": (["loss", "test_accuracy"], False),
    "saturation": (["saturation"], False),
    "grad_norms": (["grad_norm"], False),
    "update_ratio": (["update_ratio"], False),
    "percentile_bands_unit": (["unit_p15", "unit_p50", "unit_p85"], True),
}


@pytest.mark.parametrize("key", list(SCALAR_DATA))
def test_csv_holds_the_history_rows_the_chart_draws(key, specs, history):
    metrics, last_layer_only = SCALAR_DATA[key]
    expected = history.to_frame(metrics=metrics)
    if last_layer_only:
        expected = expected[expected["layer"] == history.layers()[-1]]
    assert len(expected)
    assert_same_rows(read_csv(export.to_csv(specs[key])), expected)


def test_percentile_bands_csv_has_the_lines_and_the_tensorboard_bands(specs, history):
    layer = history.layers()[-1]
    got = read_csv(export.to_csv(specs["percentile_bands"]))
    frame = history.to_frame()
    wanted = frame["metric"].isin(["preact_p15", "preact_p50", "preact_p85"]) | frame[
        "metric"
    ].str.startswith("preact_band_p")
    expected = frame[wanted & (frame["layer"] == layer)]
    assert {"preact_p50", "preact_band_p0", "preact_band_p100"} <= set(got["metric"])
    assert_same_rows(got, expected)


def test_csv_of_a_line_is_what_the_figure_plots(specs, history):
    """The rows behind the loss curve are the curve: same steps, same values."""
    fig, data = specs["loss_accuracy"].figure, specs["loss_accuracy"].data
    plain_loss = next(t for t in fig.data if t.name == "plain" and t.xaxis == "x")
    rows = data[(data["variant"] == "plain") & (data["metric"] == "loss")]
    np.testing.assert_array_equal(np.asarray(plain_loss.x), rows["step"].to_numpy())
    np.testing.assert_allclose(np.asarray(plain_loss.y), rows["value"], rtol=1e-6)


def test_heatmap_csv_is_every_stored_histogram(specs, history):
    got = read_csv(export.to_csv(specs["preact_heatmaps"]))
    assert list(got.columns) == export.HISTOGRAM_COLUMNS
    edges = history.bin_edges("preact")
    n_bins = len(edges) - 1
    for variant in history.variants():
        for layer in history.layers():
            steps, counts = history.histograms(variant, layer, "preact")
            part = got[(got["variant"] == variant) & (got["layer"] == layer)]
            assert len(part) == len(steps) * n_bins
            np.testing.assert_array_equal(part["step"].to_numpy(), np.repeat(steps, n_bins))
            np.testing.assert_array_equal(part["count"].to_numpy(), counts.ravel())
            np.testing.assert_array_equal(part["bin_low"].to_numpy()[:n_bins], edges[:-1])
            np.testing.assert_array_equal(part["bin_high"].to_numpy()[:n_bins], edges[1:])


def test_histogram_csv_is_the_histogram_shown(specs, history):
    spec = specs["histogram_overlay"]
    layer = history.layers()[-1]
    got = read_csv(export.to_csv(spec))
    for trace in spec.figure.data:
        if trace.type != "bar":
            continue
        at, counts = history.histogram_at(trace.name, layer, "preact", history.last_step())
        part = got[got["variant"] == trace.name]
        assert set(part["step"]) == {at} and set(part["layer"]) == {layer}
        np.testing.assert_array_equal(part["count"].to_numpy(), counts)
        np.testing.assert_allclose(np.asarray(trace.y), counts / counts.sum(), rtol=1e-6)


# --------------------------------------------------------------------------- html


def test_html_is_standalone_and_opens_offline(specs):
    html = export.to_html(specs["grad_norms"].figure, filename=specs["grad_norms"].filename)
    assert html.lstrip().lower().startswith("<!doctype html>")
    assert "plotly" in html and "Plotly.newPlot" in html
    assert '<script src="http' not in html
    assert not re.search(r"""<(script|link|img|iframe)\b[^>]*\b(src|href)\s*=""", html)
    assert "MathJax.js" not in html and "mathjax@" not in html.lower()
    # plotly.js is inlined verbatim. Its bundle holds two CDN addresses of its own,
    # defaults for map and geo traces (topojson, map icons) that these charts never
    # use; everything outside the bundle (page, config, data) names no URL at all.
    assert PLOTLY_JS in html
    page = html.replace(PLOTLY_JS, "")
    assert "https://cdn" not in page
    assert not re.search(r"https?://", page)
    assert '"filename":"' + specs["grad_norms"].filename + '"' in page.replace(" ", "")


def test_html_figures_use_no_map_or_geo_traces(specs):
    """The only things plotly.js would fetch from a CDN are for maps and globes."""
    for spec in specs.values():
        types = {t.type for t in spec.figure.data}
        assert types <= {"scatter", "heatmap", "bar"}, spec.key


# --------------------------------------------------------------------------- static


def test_static_export_available_answers_in_one_sentence():
    ok, message = export.static_export_available()
    assert isinstance(ok, bool)
    assert message.endswith(".") and ". " not in message[:-1]


@pytest.fixture
def no_browser(monkeypatch, tmp_path):
    """No Chrome/Chromium: BROWSER_PATH points nowhere, PATH is empty, and the browser
    choreographer may have downloaded itself is hidden."""
    missing = tmp_path / "no-chromium-here"
    monkeypatch.setenv("BROWSER_PATH", str(missing))
    monkeypatch.setenv("PATH", "")
    import choreographer.browsers.chromium as chromium

    for name in ("get_chrome_download_path", "get_old_chrome_download_path"):
        monkeypatch.setattr(chromium, name, lambda *a, **k: None, raising=False)
    return missing


def test_without_a_browser_static_export_says_how_to_get_one(no_browser):
    ok, message = export.static_export_available()
    assert ok is False
    assert str(no_browser) in message and "BROWSER_PATH" in message
    assert "sudo apt-get install chromium" in message
    assert message.endswith(".") and ". " not in message[:-1]  # one sentence
    with pytest.raises(export.StaticExportUnavailable) as err:
        export.to_static([], "png")  # refused before anything is rendered
    assert str(err.value) == message
    assert isinstance(err.value, RuntimeError)


def test_no_browser_anywhere_names_debians_chromium_and_browser_path(monkeypatch):
    monkeypatch.delenv("BROWSER_PATH", raising=False)
    monkeypatch.setattr(export, "_find_browser", lambda: None)
    ok, message = export.static_export_available()
    assert ok is False
    assert message == (
        "No Chrome/Chromium was found for PNG/SVG/PDF export: install Debian's chromium "
        "(sudo apt-get install chromium), or set BROWSER_PATH to a Chrome/Chromium binary."
    )


def test_without_a_browser_the_pack_still_has_html_csv_and_the_run(
    no_browser, history, config, specs
):
    calls = []
    data = export.teaching_pack(history, config, progress=lambda *a: calls.append(a))
    zf = zipfile.ZipFile(io.BytesIO(data))
    expected = figure_paths(specs, ("html", "csv")) | DATA_FILES | {SHARED_JS}
    assert set(zf.namelist()) == expected
    readme = zf.read("README.txt").decode("utf-8")
    assert "PNG, SVG and PDF were skipped: " + export.static_export_available()[1] in readme
    assert RunConfig.from_json(zf.read("config.json")) == config
    assert calls[-1][0] == calls[-1][1] == len(expected)


def test_to_static_renders_many_figures_in_one_browser_session(monkeypatch, specs):
    needs_browser()
    import kaleido

    launches, renders = [], []
    real_popen, real_calc = subprocess.Popen, kaleido.Kaleido.calc_fig

    class CountingPopen(real_popen):
        def __init__(self, args, *rest, **kwargs):
            if any("--headless" in str(a) for a in args):
                launches.append(args)
            super().__init__(args, *rest, **kwargs)

    async def counting_calc(self, *args, **kwargs):
        renders.append(id(self))
        return await real_calc(self, *args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", CountingPopen)
    monkeypatch.setattr(kaleido.Kaleido, "calc_fig", counting_calc)
    figs = [specs[k].figure for k in ("loss_accuracy", "grad_norms", "histogram_overlay")]

    async def from_a_running_loop() -> list[bytes]:  # as in Jupyter
        return export.to_static(figs, "png", scale=1, width=800)

    images = asyncio.run(from_a_running_loop())
    assert len(launches) == 1, "one browser for all figures"
    assert len(renders) == 3 and len(set(renders)) == 1, "every figure in that one session"
    assert [img[:8] for img in images] == [PNG_SIGNATURE] * 3
    width = int.from_bytes(images[0][16:20], "big")  # the IHDR chunk's width
    assert width == 800


def test_to_static_rejects_an_unknown_format(specs):
    with pytest.raises(ValueError, match="allowed: png, svg, pdf"):
        export.to_static([specs["grad_norms"].figure], "jpeg")  # type: ignore[arg-type]


def test_pack_png_svg_pdf_are_real_images(pack, specs):
    needs_browser()
    zf = pack["zip"]
    for spec in specs.values():
        png = zf.read(f"figures/{spec.filename}.png")
        assert png[:8] == PNG_SIGNATURE
        assert int.from_bytes(png[16:20], "big") == export.DEFAULT_WIDTH * export.PNG_SCALE
        assert Image.open(io.BytesIO(png)).mode == "RGB"  # opaque: no alpha channel stored
        root = ET.fromstring(zf.read(f"figures/{spec.filename}.svg"))
        assert root.tag == "{http://www.w3.org/2000/svg}svg"
        pdf = zf.read(f"figures/{spec.filename}.pdf")
        assert pdf.startswith(b"%PDF") and pdf.rstrip().endswith(b"%%EOF")


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def test_an_opaque_png_loses_its_alpha_channel_and_keeps_its_pixels():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    opaque = np.dstack([rgb, np.full((40, 60), 255, np.uint8)])
    smaller = export._png_without_alpha(png_bytes(Image.fromarray(opaque, "RGBA")))
    with Image.open(io.BytesIO(smaller)) as image:
        assert image.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(image), rgb)
    see_through = opaque.copy()
    see_through[0, 0, 3] = 0
    data = png_bytes(Image.fromarray(see_through, "RGBA"))
    assert export._png_without_alpha(data) == data  # transparency is kept as it is


# --------------------------------------------------------------------------- the pack


def test_pack_holds_exactly_the_listed_files(pack, specs, static_ok):
    formats = ("png", "svg", "pdf", "html", "csv") if static_ok else ("html", "csv")
    expected = figure_paths(specs, formats) | DATA_FILES | {SHARED_JS}
    assert sorted(pack["zip"].namelist()) == sorted(expected)
    for path in expected - DATA_FILES - {SHARED_JS}:
        assert NAME_RE.fullmatch(path.removeprefix("figures/")), path


def test_pack_html_figures_share_one_plotly_js_in_the_zip(pack):
    zf = pack["zip"]
    assert zf.read(SHARED_JS).decode("utf-8") == PLOTLY_JS
    html_files = [n for n in zf.namelist() if n.endswith(".html")]
    assert len(html_files) == len(KEYS)
    for name in html_files:
        html = zf.read(name).decode("utf-8")
        assert PLOTLY_JS[:2000] not in html and len(html) < len(PLOTLY_JS) // 10, name
        sources = re.findall(r"""<script\b[^>]*\bsrc\s*=\s*["']([^"']+)["']""", html)
        assert sources == [export.PLOTLY_JS_FILE], (name, sources)
        # The relative path, from the HTML file's folder, is a file of the zip.
        folder = name.rsplit("/", 1)[0]
        assert f"{folder}/{sources[0]}" in zf.namelist()
        assert "Plotly.newPlot" in html and not re.search(r"https?://", html)


def test_pack_of_the_benchmark_run_is_under_4_mb(pack, static_ok):
    """bench/export_pack.py's run, every format: one plotly.js, not one per figure."""
    assert static_ok or pack["bytes"] < PACK_LIMIT_BYTES  # trivially, without images
    if static_ok:
        assert pack["bytes"] <= PACK_LIMIT_BYTES, f"{pack['bytes'] / 1e6:.2f} MB"


def test_pack_config_reproduces_the_run(pack, config):
    assert RunConfig.from_json(pack["zip"].read("config.json")) == config


def test_pack_keeps_every_metric_histogram_and_live_change(pack, history):
    zf = pack["zip"]
    assert_same_rows(read_csv(zf.read("metrics.csv")), history.to_frame())
    with np.load(io.BytesIO(zf.read("histograms.npz"))) as npz:
        for variant in history.variants():
            for layer in history.layers():
                steps, counts = history.histograms(variant, layer, "preact")
                np.testing.assert_array_equal(npz[f"preact/{variant}/{layer}/steps"], steps)
                np.testing.assert_array_equal(npz[f"preact/{variant}/{layer}/counts"], counts)
    events = json.loads(zf.read("events.json"))
    assert [(e["step"], e["name"], e["new"]) for e in events] == [(LR_CHANGE_STEP, "lr", 1.0)]


def test_pack_figure_csv_and_html_match_to_csv_and_to_html(pack, specs):
    zf = pack["zip"]
    for spec in specs.values():
        assert zf.read(f"figures/{spec.filename}.csv") == export.to_csv(spec)
        html = zf.read(f"figures/{spec.filename}.html").decode("utf-8")
        shared = export.to_html(spec.figure, filename=spec.filename, plotlyjs="plotly.min.js")
        assert DIV_ID.sub("id", html) == DIV_ID.sub("id", shared)  # each page draws a new id


def test_readme_lists_every_figure_and_the_config_in_one_line(pack, specs, config, static_ok):
    readme = pack["zip"].read("README.txt").decode("utf-8")
    for key, spec in specs.items():
        assert spec.title in readme, key
        assert spec.caption in readme, key
        line = next(x for x in readme.splitlines() if f"files: figures/{spec.filename}." in x)
        assert line.endswith(".csv"), line  # every format, the data last
    assert f"figures/{export.PLOTLY_JS_FILE}" in readme
    config_lines = [line for line in readme.splitlines() if line.startswith("Config: ")]
    assert len(config_lines) == 1
    assert RunConfig.from_dict(json.loads(config_lines[0][len("Config: ") :])) == config
    assert f"lr 0.5 → 1 at step {LR_CHANGE_STEP}" in readme
    assert ("skipped" in readme) is (not static_ok)


def test_pack_progress_counts_up_to_its_total(pack):
    calls = pack["progress"]
    done = [c[0] for c in calls]
    assert done == list(range(len(calls)))  # 0 first, then one per file
    assert {c[1] for c in calls} == {len(pack["zip"].namelist())}
    assert calls[-1][2] == "README.txt"


def test_write_export_writes_the_pack_files_into_a_directory(tmp_path, history, config, specs):
    out = tmp_path / "export"
    written = export.write_export(history, config, out, ("csv", "html"))
    rel = {p.relative_to(out).as_posix() for p in written}
    assert rel == figure_paths(specs, ("csv", "html")) | DATA_FILES | {SHARED_JS}
    assert all(p.is_file() and p.stat().st_size for p in written)
    assert RunConfig.from_json((out / "config.json").read_text()) == config
    assert "skipped" not in (out / "README.txt").read_text("utf-8")


def test_unknown_format_is_refused(history, config):
    with pytest.raises(ValueError, match="allowed: png, svg, pdf, html, csv"):
        export.teaching_pack(history, config, formats=("png", "gif"))
