"""Print-ready exports of a run: figures as PNG, SVG, PDF and offline HTML, their data as
CSV, and a teaching pack (one zip) with everything a lecture or handout needs.

Static images come from Kaleido 1.x, which drives a headless Chrome/Chromium. Starting
that browser and loading plotly.js into it takes seconds, so :func:`to_static` and the
pack render all their figures in ONE browser session (one ``kaleido.Kaleido``), never
one session per figure as ``plotly.io.to_image`` does. Where no browser can be found,
:func:`static_export_available` says so in one sentence, :func:`to_static` raises
:class:`StaticExportUnavailable` with that sentence, and the pack leaves out PNG, SVG and
PDF but still writes HTML, CSV and the run's data, and says so in its README.

Kaleido's page loads MathJax from a CDN unless told not to; the figures use no LaTeX, so
MathJax is switched off, which keeps rendering offline and saves the wait for the CDN.

Every file a page or the CLI writes for a chart is named by :func:`figure_filename`:
``page_chart_variants_stepN.ext``. A single chart's HTML embeds plotly.js, so it opens
anywhere offline; the HTML files of a pack or an export directory share one copy,
``figures/plotly.min.js`` beside them, instead of carrying ~4.8 MB each.

Export a consistent snapshot: pause training first (each figure reads the History under
its lock, but a run that goes on between two figures shows in the second one).
"""

from __future__ import annotations

import asyncio
import functools
import io
import json
import os
import queue
import re
import shutil
import threading
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
from plotly.offline import get_plotlyjs, get_plotlyjs_version

from bn_core import figures
from bn_core.claims import ClaimResult, claims_json
from bn_core.config import RunConfig
from bn_core.history import History

__all__ = [
    "ALL_FORMATS",
    "DEFAULT_WIDTH",
    "HISTOGRAM_COLUMNS",
    "PAGE",
    "PLOTLY_JS_FILE",
    "STATIC_FORMATS",
    "FigureSpec",
    "StaticExportUnavailable",
    "chart_name",
    "chart_title",
    "figure_filename",
    "figure_specs",
    "plotly_js",
    "static_export_available",
    "teaching_pack",
    "to_csv",
    "to_html",
    "to_static",
    "write_export",
]

PAGE = "live"  # the page the pack's figures come from
# The one copy of plotly.js in a pack or export directory, next to the HTML figures
# (figures/), which load it by this relative path.
PLOTLY_JS_FILE = "plotly.min.js"
STATIC_FORMATS = ("png", "svg", "pdf")
ALL_FORMATS = (*STATIC_FORMATS, "html", "csv")
# The figures of the Live training page, by spec key, with the names a menu shows.
SPEC_TITLES = {
    "loss_accuracy": "Training loss and test accuracy",
    "preact_heatmaps": "Distributions of the sigmoid input over time (heatmaps)",
    "histogram_overlay": "Histograms of the sigmoid input at one step",
    "saturation": "Saturation per layer",
    "grad_norms": "Gradient norm per layer",
    "percentile_bands": "Fig. 1 percentile bands, whole layer",
    "percentile_bands_unit": "Fig. 1 percentile bands, one unit (as in the paper)",
    "update_ratio": "Update:data ratio per layer",
}
HISTOGRAM_COLUMNS = ["step", "variant", "layer", "bin_low", "bin_high", "count"]
# Print figures are sized for a 16:9 slide or an A4 page in landscape; the print theme
# sets each figure's height from its rows of panels.
DEFAULT_WIDTH = 1200
DEFAULT_HEIGHT = 600  # only for a figure without a height of its own
PNG_SCALE = 2  # pack PNGs: 2400 px wide, sharp on a projector and in print
RENDER_TIMEOUT_S = 90.0  # per figure, as Kaleido's own default

StaticFormat = Literal["png", "svg", "pdf"]
ProgressFn = Callable[[int, int, str], None]

# What a browser search by name looks for when choreographer's own search is unavailable.
_BROWSER_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
_HOW_TO_GET_ONE = (
    "install Debian's chromium (sudo apt-get install chromium), "
    "or set BROWSER_PATH to a Chrome/Chromium binary"
)


class StaticExportUnavailable(RuntimeError):
    """PNG, SVG and PDF export need Kaleido and a Chrome/Chromium, and one is missing."""


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True, eq=False)
class FigureSpec:
    """One chart of a page, ready to export: the figure and the tidy rows it draws.

    ``key`` is unique within a pack; ``chart`` is the :data:`bn_core.figures.CHARTS` key
    it was built by (two specs can share one, e.g. the percentile bands of a layer and of
    one unit). ``filename`` is the stem of every file made from it, from
    :func:`figure_filename`; add the format's extension.
    """

    key: str
    figure: go.Figure
    title: str
    caption: str
    data: pd.DataFrame
    chart: str = ""
    filename: str = ""


# Underscores separate the name's fields, so inside a field anything but letters, digits
# and dots becomes one "-"; names stay readable, and safe on every file system.
_NOT_IN_A_FIELD = re.compile(r"[^a-z0-9.]+")


def _field(text: str) -> str:
    slug = _NOT_IN_A_FIELD.sub("-", str(text).lower())
    return re.sub(r"\.{2,}", ".", slug).strip("-.")  # no "..", no leading dot


def chart_name(page: str, chart: str, variants: Sequence[str]) -> str:
    """``page_chart_variants``: the scheme of :func:`figure_filename` without the step.

    Only for a name that must not change while a run goes on: the camera button of a
    chart on screen (plotly.js builds a chart anew when its config changes).
    """
    compared = "-vs-".join(f for f in map(_field, variants) if f) or "none"
    return "_".join((_field(page) or "page", _field(chart) or "chart", compared))


def figure_filename(
    page: str, chart: str, variants: Sequence[str], step: int | None, ext: str = ""
) -> str:
    """The name of a file made from a chart: ``page_chart_variants_stepN[.ext]``.

    ``figure_filename("live", "percentile_bands", ["plain", "batchnorm"], 1200, "png")``
    is ``"live_percentile-bands_plain-vs-batchnorm_step1200.png"``. Each field is lower
    case letters, digits, ``.`` and ``-``; ``variants`` are joined by ``-vs-`` (a variant's
    own name may hold a ``-``), ``none`` when a chart has none; ``step`` is the step of
    the run the chart shows (0 for a chart with no run behind it). Every file the pages
    and the CLI write for a chart (HTML, PNG, SVG, PDF, CSV, a zip of charts, the config
    JSON) is named by this function.
    """
    stem = f"{chart_name(page, chart, variants)}_step{max(int(step or 0), 0)}"
    suffix = _field(ext)
    return f"{stem}.{suffix}" if suffix else stem


def chart_title(chart: str, fig: go.Figure | None = None) -> str:
    """What a menu calls a chart: its registered title, else the figure's own title.

    Run charts are registered in :data:`bn_core.figures.CHARTS`, the teaching experiments'
    in ``EXPERIMENT_CHARTS``; a chart in neither is named by its figure's title, and only
    a chart with no title at all by its key, in words.
    """
    from bn_core.experiments.charts import EXPERIMENT_CHARTS  # imports torch: on demand

    info = figures.CHARTS.get(chart) or EXPERIMENT_CHARTS.get(chart)
    if info is not None:
        return info.title
    title = _title_of(fig) if fig is not None else ""
    return title or chart.replace("_", " ").capitalize()


def _title_of(fig: go.Figure) -> str:
    text = fig.layout.title.text
    return str(text) if text else ""


def _scalar_rows(history: History, metrics: Sequence[str], layer: str | None = None):
    """history.to_frame rows of ``metrics`` (of one layer if given), index renumbered."""
    frame = history.to_frame(metrics=list(metrics))
    if layer is not None:
        frame = frame[frame["layer"] == layer]
    return frame.reset_index(drop=True)


def _histogram_frame(
    history: History,
    kind: str,
    layers: Sequence[str],
    *,
    step: int | None = None,
) -> pd.DataFrame:
    """Histograms as tidy rows: step, variant, layer, bin_low, bin_high, count.

    All stored steps, or with ``step`` the histogram each variant shows at that step
    (the stored one at or before it, as :meth:`History.histogram_at` picks).
    """
    try:
        edges = history.bin_edges(kind)
    except KeyError:
        return pd.DataFrame({c: [] for c in HISTOGRAM_COLUMNS}, columns=HISTOGRAM_COLUMNS)
    blocks: list[tuple[str, str, np.ndarray, np.ndarray]] = []
    for variant in history.variants():
        for layer in layers:
            if step is None:
                steps, counts = history.histograms(variant, layer, kind)
            else:
                found = history.histogram_at(variant, layer, kind, step)
                if found is None:
                    continue
                steps, counts = np.array([found[0]], dtype=np.int64), found[1][None, :]
            if len(steps):
                blocks.append((variant, layer, steps, counts))
    n_bins = len(edges) - 1
    total = sum(len(steps) * n_bins for *_, steps, _ in blocks)
    columns: dict[str, Any] = {
        "step": np.empty(total, dtype=np.int64),
        "variant": np.empty(total, dtype=object),
        "layer": np.empty(total, dtype=object),
        "bin_low": np.empty(total, dtype=np.float64),
        "bin_high": np.empty(total, dtype=np.float64),
        "count": np.empty(total, dtype=np.float64),
    }
    start = 0
    for variant, layer, steps, counts in blocks:
        n = len(steps) * n_bins
        part = slice(start, start + n)
        columns["step"][part] = np.repeat(steps, n_bins)
        columns["variant"][part] = variant
        columns["layer"][part] = layer
        columns["bin_low"][part] = np.tile(edges[:-1], len(steps))
        columns["bin_high"][part] = np.tile(edges[1:], len(steps))
        columns["count"][part] = counts.ravel()
        start += n
    counts = columns["count"]
    if np.all(np.isfinite(counts)) and np.array_equal(counts, np.round(counts)):
        columns["count"] = counts.astype(np.int64)  # counts of values: whole numbers
    return pd.DataFrame(columns, columns=HISTOGRAM_COLUMNS)


def figure_specs(
    history: History,
    config: RunConfig,
    *,
    layer: str | None = None,
    step: int | None = None,
) -> list[FigureSpec]:
    """Every chart of the Live training page in the print theme, with its data.

    ``layer``: the layer of the percentile bands and the histogram overlay (default the
    last layer, as the page shows first); ``step``: the step of the histogram overlay
    (default the last step).
    """
    layers = history.layers()
    if layer is None:
        layer = layers[-1] if layers else "layer1"
    last = history.last_step() or 0
    if step is None:
        step = last
    variants = history.variants() or [v.name for v in config.variants]
    theme = "print"

    def spec(
        key: str,
        chart: str,
        fig: go.Figure,
        data: pd.DataFrame,
        *,
        caption_extra: str = "",
        at: int = last,
    ) -> FigureSpec:
        caption = figures.CHARTS[chart].caption + caption_extra
        name = figure_filename(PAGE, key, variants, at)
        return FigureSpec(key, fig, _title_of(fig), caption, data, chart, name)

    shown = [history.histogram_at(v, layer, "preact", step) for v in history.variants()]
    shown_steps = sorted({found[0] for found in shown if found is not None})
    hist_step = shown_steps[-1] if shown_steps else step
    bands = ("preact_p15", "preact_p50", "preact_p85")
    band_metrics = [m for m in history.metrics() if m.startswith("preact_band_p")]
    return [
        spec(
            "loss_accuracy",
            "loss_accuracy",
            figures.loss_accuracy(history, theme=theme),
            _scalar_rows(history, ["loss", "test_accuracy"]),
        ),
        spec(
            "preact_heatmaps",
            "preact_heatmaps",
            figures.preact_heatmaps(history, theme=theme),
            _histogram_frame(history, "preact", layers),
        ),
        spec(
            "histogram_overlay",
            "histogram_overlay",
            figures.histogram_overlay(history, layer=layer, step=step, theme=theme),
            _histogram_frame(history, "preact", [layer], step=step),
            at=hist_step,
        ),
        spec(
            "saturation",
            "saturation",
            figures.saturation(
                history,
                threshold=config.saturation_threshold,
                activation=config.activation,
                theme=theme,
            ),
            _scalar_rows(history, ["saturation"]),
        ),
        spec(
            "grad_norms",
            "grad_norms",
            figures.grad_norms(history, theme=theme),
            _scalar_rows(history, ["grad_norm"]),
        ),
        spec(
            "percentile_bands",
            "percentile_bands",
            figures.percentile_bands(history, layer=layer, unit=False, theme=theme),
            _scalar_rows(history, [*bands, *band_metrics], layer),
            caption_extra=f" Here: all units of {layer}.",
        ),
        spec(
            "percentile_bands_unit",
            "percentile_bands",
            figures.percentile_bands(history, layer=layer, unit=True, theme=theme),
            _scalar_rows(history, ["unit_p15", "unit_p50", "unit_p85"], layer),
            caption_extra=f" Here: one unit (#{config.probe_unit}) of {layer}, as in the paper.",
        ),
        spec(
            "update_ratio",
            "update_ratio",
            figures.update_ratio(history, theme=theme),
            _scalar_rows(history, ["update_ratio"]),
        ),
    ]


# --------------------------------------------------------------------------- browser


def _find_browser() -> str | None:
    """The browser Kaleido would launch, found the way it finds it.

    choreographer (Kaleido's browser driver) looks, in order, at its own downloaded
    Chrome (``kaleido_get_chrome``), then ``BROWSER_PATH`` (taken as is, even when it
    points nowhere), then Chrome, Chromium, Edge, Brave and Vivaldi on PATH and in
    their usual install paths. Without that lookup: BROWSER_PATH, then PATH by name.
    """
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:  # choreographer missing or its API changed: a plain search
        explicit = os.environ.get("BROWSER_PATH")
        if explicit:
            return explicit
        return next((p for p in map(shutil.which, _BROWSER_NAMES) if p), None)


def _is_executable_file(path: str) -> bool:
    return Path(path).is_file() and os.access(path, os.X_OK)


def static_export_available() -> tuple[bool, str]:
    """Whether PNG/SVG/PDF export can run here, and one sentence saying why (not).

    Cheap (no browser is started): Kaleido must import and find a Chrome/Chromium.
    """
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return False, (
            "Kaleido is not installed, so PNG/SVG/PDF export is off: pip install "
            "'kaleido>=1', then " + _HOW_TO_GET_ONE + "."
        )
    path = _find_browser()
    if path and _is_executable_file(path):
        return True, f"Static export uses the browser at {path}."
    explicit = os.environ.get("BROWSER_PATH")
    if explicit and path == explicit:
        return False, (
            f"BROWSER_PATH={explicit!r} is not a Chrome/Chromium binary, so PNG/SVG/PDF "
            "export is off: point it at one, or unset it and install Debian's chromium "
            "(sudo apt-get install chromium)."
        )
    return False, f"No Chrome/Chromium was found for PNG/SVG/PDF export: {_HOW_TO_GET_ONE}."


def _require_static() -> None:
    ok, message = static_export_available()
    if not ok:
        raise StaticExportUnavailable(message)


def _opts(
    fig_dict: dict[str, Any], fmt: str, scale: float, width: int | None, height: int | None
) -> dict[str, Any]:
    layout = fig_dict.get("layout", {})
    return {
        "format": fmt,
        "scale": scale,
        "width": width or layout.get("width") or DEFAULT_WIDTH,
        "height": height or layout.get("height") or DEFAULT_HEIGHT,
    }


def _png_without_alpha(png: bytes) -> bytes:
    """The same pixels without an alpha channel, when every pixel is opaque.

    The browser writes RGBA, though a figure on a white background has no transparent
    pixel: as RGB the same image is about a third smaller. An image with any transparency,
    or one Pillow is missing to read (or cannot read), is returned as it is.
    """
    try:
        from PIL import Image
    except ImportError:
        return png
    try:
        with Image.open(io.BytesIO(png)) as image:
            if image.mode != "RGBA" or image.getchannel("A").getextrema() != (255, 255):
                return png
            kept = {"dpi": image.info["dpi"]} if "dpi" in image.info else {}
            out = io.BytesIO()
            image.convert("RGB").save(out, format="PNG", **kept)
    except (OSError, ValueError):  # not a PNG Pillow can read: the browser's bytes stand
        return png
    return out.getvalue()


class _Renderer:
    """Renders ``(figure, format, scale)`` jobs in ONE Kaleido browser session.

    The session runs on a worker thread with its own event loop, so the caller can do
    other work meanwhile (the pack writes its HTML and CSV while the browser starts),
    and it works the same from scripts, Streamlit and Jupyter (which already runs a
    loop). Progress comes back through a queue: :meth:`poll` and :meth:`result` call
    ``on_done(i)`` in the caller's thread, never in the worker.

    One tab renders the jobs one after the other: Kaleido reloads a tab after every
    figure, and each extra tab loads plotly.js again at start-up, which on a machine
    with a couple of cores costs more than it saves.
    """

    def __init__(
        self,
        jobs: Sequence[tuple[go.Figure, str, float]],
        *,
        width: int | None = None,
        height: int | None = None,
    ) -> None:
        _require_static()
        # Each figure goes to JSON once, however many formats it is rendered in.
        dicts: dict[int, dict[str, Any]] = {}
        for fig, _, _ in jobs:
            if id(fig) not in dicts:
                dicts[id(fig)] = fig.to_dict() if hasattr(fig, "to_dict") else dict(fig)
        self._work = [
            (dicts[id(fig)], _opts(dicts[id(fig)], fmt, scale, width, height))
            for fig, fmt, scale in jobs
        ]
        self._events: queue.SimpleQueue[int | None] = queue.SimpleQueue()
        self._outcome: dict[str, Any] = {}
        self._finished = False
        self._thread = threading.Thread(target=self._run, name="bn-lab-kaleido", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._outcome["result"] = asyncio.run(self._render_all())
        except BaseException as err:  # re-raised in the caller's thread by result()
            self._outcome["error"] = err
        finally:
            self._events.put(None)

    async def _render_all(self) -> list[bytes]:
        import kaleido
        from choreographer.errors import BrowserFailedError, ChromeNotFoundError

        try:
            browser = kaleido.Kaleido(n=1, mathjax=False, timeout=RENDER_TIMEOUT_S)
        except ChromeNotFoundError as err:
            raise StaticExportUnavailable(static_export_available()[1]) from err
        loop = asyncio.get_running_loop()
        out: list[Any] = []
        try:
            async with browser as k:
                for i, (fig_dict, opts) in enumerate(self._work):
                    image = await k.calc_fig(fig_dict, opts=opts)
                    if opts["format"] == "png":
                        # Re-encoded on another thread while the browser draws the next.
                        image = loop.run_in_executor(None, _png_without_alpha, image)
                    out.append(image)
                    self._events.put(i)
                out = [await image if asyncio.isfuture(image) else image for image in out]
        except BrowserFailedError as err:
            raise StaticExportUnavailable(
                f"The browser at {_find_browser()} failed to start, so PNG/SVG/PDF export "
                f"is off ({err}): {_HOW_TO_GET_ONE}."
            ) from err
        return out

    def poll(self, on_done: Callable[[int], None], *, block: bool = False) -> bool:
        """Report the jobs done since the last call; True once the session has ended."""
        while not self._finished:
            try:
                event = self._events.get(block=block)
            except queue.Empty:
                break
            if event is None:
                self._finished = True
            else:
                on_done(event)
        return self._finished

    def result(self, on_done: Callable[[int], None] = lambda i: None) -> list[bytes]:
        """Wait for every job; the images in job order (or the session's error)."""
        self.poll(on_done, block=True)
        self._thread.join()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["result"]


def to_static(
    figs: Sequence[go.Figure],
    fmt: StaticFormat,
    *,
    scale: float = 2,
    width: int | None = None,
    height: int | None = None,
) -> list[bytes]:
    """Render figures as PNG, SVG or PDF bytes, all in one browser session.

    ``width``/``height`` in CSS pixels override the figure's own (its height comes from
    the theme; width defaults to :data:`DEFAULT_WIDTH`). ``scale`` multiplies the pixels
    of a PNG (2: sharp on slides and in print); for SVG and PDF it only multiplies the
    nominal size (a PDF page is ``0.75 * scale`` points per CSS pixel). Raises
    :class:`StaticExportUnavailable` when no browser is found.
    """
    if fmt not in STATIC_FORMATS:
        raise ValueError(f"fmt = {fmt!r}: allowed: " + ", ".join(STATIC_FORMATS))
    if not figs:
        _require_static()
        return []
    return _Renderer([(fig, fmt, scale) for fig in figs], width=width, height=height).result()


# --------------------------------------------------------------------------- html, csv


def to_html(fig: go.Figure, *, filename: str | None = None, plotlyjs: str | None = None) -> str:
    """An HTML page of ``fig`` that opens offline.

    Without ``plotlyjs`` the page stands alone: plotly.js is embedded (no
    ``<script src>``). With ``plotlyjs``, a path ending in ``.js`` relative to the page,
    the page loads plotly.js from that file instead (~4.8 MB less), as the figures of a
    pack do from :data:`PLOTLY_JS_FILE` beside them. MathJax is off, and nothing else is
    fetched: the charts use no maps (the only thing plotly.js would fetch, topojson and
    map tiles) and system fonts. The camera button saves a 3x PNG named ``filename``.
    """
    if plotlyjs is not None and not plotlyjs.endswith(".js"):
        raise ValueError(f"plotlyjs = {plotlyjs!r}: allowed: a relative path ending in .js")
    config: dict[str, Any] = {
        "displaylogo": False,
        "responsive": True,
        "toImageButtonOptions": {"format": "png", "scale": 3},
    }
    if filename:
        config["toImageButtonOptions"]["filename"] = filename
    return pio.to_html(
        fig,
        # plotly.py writes a string ending in ".js" as <script src="..."> verbatim.
        include_plotlyjs=plotlyjs if plotlyjs is not None else True,
        include_mathjax=False,
        full_html=True,
        config=config,
        default_width="100%",
    )


@functools.cache
def plotly_js() -> bytes:
    """The plotly.js bundle of the installed plotly, the one :func:`to_html` embeds."""
    return get_plotlyjs().encode("utf-8")


def to_csv(spec: FigureSpec) -> bytes:
    """The tidy rows behind a figure as UTF-8 CSV (no index column)."""
    return spec.data.to_csv(index=False).encode("utf-8")


# --------------------------------------------------------------------------- the pack


def _check_formats(formats: Iterable[str]) -> tuple[str, ...]:
    wanted = tuple(dict.fromkeys(formats))  # in order, without repeats
    unknown = [f for f in wanted if f not in ALL_FORMATS]
    if unknown:
        raise ValueError(f"formats = {unknown!r}: allowed: " + ", ".join(ALL_FORMATS))
    return wanted


def _readme(
    history: History,
    config: RunConfig,
    specs: Sequence[FigureSpec],
    files: dict[str, list[str]],
    skipped: str,
    claims: Sequence[ClaimResult],
) -> str:
    variants = history.variants() or [v.name for v in config.variants]
    last = history.last_step() or 0
    compact = json.dumps(config.to_dict(), separators=(",", ":"), ensure_ascii=False)
    lines = [
        "BatchNorm Lab teaching pack",
        "===========================",
        "",
        f"Run: {' vs '.join(variants)} on {config.dataset}, step {last:,} of {config.steps:,}.",
        f"Config: {compact}",
        "Reproduce: python -m bn_core run --config config.json --out run/",
    ]
    if history.events:
        changes = "; ".join(e.detail for e in history.events)
        lines.append(f"Live changes during the run (also in events.json): {changes}.")
    if skipped:
        lines += ["", f"PNG, SVG and PDF were skipped: {skipped}"]
    if claims:
        lines += ["", "What this run shows (checked, also in claims.json)", "-" * 50]
        for result in claims:
            lines.append(f"{result.mark} {result.sentence}")
            lines.append(f"   measured: {result.measured_text() or '-'}; {result.claim.threshold}")
    lines += ["", "Figures", "-------"]
    for i, spec in enumerate(specs, 1):
        lines += [
            "",
            f"{i}. {spec.title}",
            f"   {spec.caption}",
            f"   files: {_one_line(files[spec.key])}",
        ]
    lines += [
        "",
        "Other files",
        "-----------",
        "metrics.csv     every recorded scalar as tidy rows: step, variant, layer, metric, "
        "value (layer empty for run-level metrics such as loss)",
        "config.json     the run's settings; RunConfig.from_json reads it back",
        "events.json     live changes (learning rate, momentum) with the step they took effect",
        "claims.json     the preset's sentences about the outcome, each with its measured "
        "values, threshold and whether it holds on this run",
        "histograms.npz  all histograms: {kind}/{variant}/{layer}/steps and .../counts, "
        "and {kind}/edges (numpy.load)",
        "figures/*.csv   the rows each figure draws; histograms as step, variant, layer, "
        "bin_low, bin_high, count",
        "figures/*.html  interactive figures; they open offline in any browser, with "
        f"figures/{PLOTLY_JS_FILE} beside them",
        f"figures/{PLOTLY_JS_FILE}  plotly.js {get_plotlyjs_version()}, one copy for all "
        "the HTML figures: copy it along with them (a single chart's HTML from the app "
        "carries its own)",
        "",
        "File names: page_chart_variants_stepN.ext, the page the chart is from, the chart, "
        "the variants compared and the step of the run it shows.",
        "",
    ]
    return "\n".join(lines)


def _one_line(paths: Sequence[str]) -> str:
    """``figures/a.png, .svg, .csv``: one chart's files, its long name written once."""
    if not paths:
        return "(none)"
    stem = paths[0].rsplit(".", 1)[0]
    return ", ".join([paths[0], *(p[len(stem) :] for p in paths[1:])])


def _pack_files(
    history: History,
    config: RunConfig,
    formats: Iterable[str],
    progress: ProgressFn | None,
    claims: Sequence[ClaimResult] = (),
) -> list[tuple[str, bytes]]:
    """The pack's files as (relative path, bytes): figures in chart order, README last.

    The browser session starts first and renders on its own thread while this one
    writes the HTML, CSV and data files, so their time hides behind the browser's.
    """
    formats = _check_formats(formats)
    ok, message = static_export_available()
    static = [f for f in formats if f in STATIC_FORMATS] if ok else []
    skipped = "" if ok or not any(f in STATIC_FORMATS for f in formats) else message
    other = [f for f in formats if f not in STATIC_FORMATS]

    specs = figure_specs(history, config)
    # + metrics, config, events, claims, npz, README, and plotly.js for the HTML figures
    total = len(specs) * (len(static) + len(other)) + 6 + ("html" in other)
    done = 0

    def tick(label: str) -> None:
        nonlocal done
        done += 1
        if progress is not None:
            progress(done, total, label)

    if progress is not None:
        progress(0, total, "starting the browser" if static else "writing files")
    # PNG at twice the pixels; SVG and PDF are vector, so scale 1 keeps their page size.
    jobs = [(spec, fmt) for spec in specs for fmt in static]
    renderer = None
    if jobs:
        try:
            renderer = _Renderer(
                [(spec.figure, fmt, PNG_SCALE if fmt == "png" else 1) for spec, fmt in jobs]
            )
        except StaticExportUnavailable as err:  # the browser went away since the check
            skipped, jobs = str(err), []
            total -= len(specs) * len(static)

    n_rendered = 0

    def rendered_one(i: int) -> None:
        nonlocal n_rendered
        n_rendered += 1
        tick(_figure_path(jobs[i][0], jobs[i][1]))

    def poll() -> None:
        if renderer is not None:
            renderer.poll(rendered_one)

    by_path: dict[str, bytes] = {}
    for spec in specs:
        for fmt in other:
            if fmt == "html":
                html = to_html(spec.figure, filename=spec.filename, plotlyjs=PLOTLY_JS_FILE)
                data = html.encode("utf-8")
            else:
                data = to_csv(spec)
            by_path[_figure_path(spec, fmt)] = data
            tick(_figure_path(spec, fmt))
            poll()
    rest: list[tuple[str, bytes]] = []
    if "html" in other:
        rest.append((f"figures/{PLOTLY_JS_FILE}", plotly_js()))
    metrics = io.StringIO()
    history.to_csv(metrics)
    rest.append(("metrics.csv", metrics.getvalue().encode("utf-8")))
    rest.append(("config.json", (config.to_json() + "\n").encode("utf-8")))
    events = [e.__dict__ for e in history.events]
    rest.append(("events.json", (json.dumps(events, indent=2) + "\n").encode("utf-8")))
    rest.append(("claims.json", claims_json(list(claims)).encode("utf-8")))
    npz = io.BytesIO()
    history.save_histograms_npz(npz)
    rest.append(("histograms.npz", npz.getvalue()))
    for name, _ in rest:
        tick(name)
        poll()

    if renderer is not None:
        try:
            images = renderer.result(rendered_one)
        except StaticExportUnavailable as err:  # the browser failed to start
            skipped = str(err)
            total -= len(jobs) - n_rendered  # done never passes total
            images, jobs = [], []
        for (spec, fmt), data in zip(jobs, images, strict=True):
            by_path[_figure_path(spec, fmt)] = data

    # Figure files in chart order, each chart's in the order of ``formats``.
    files = {
        spec.key: [p for f in formats if (p := _figure_path(spec, f)) in by_path] for spec in specs
    }
    out = [(path, by_path[path]) for spec in specs for path in files[spec.key]]
    out += rest
    readme = _readme(history, config, specs, files, skipped, claims)
    out.append(("README.txt", readme.encode("utf-8")))
    tick("README.txt")
    return out


def _figure_path(spec: FigureSpec, fmt: str) -> str:
    """Where a pack or export directory keeps one format of a chart."""
    return f"figures/{spec.filename}.{fmt}"


def chart_files(
    spec: FigureSpec, formats: Iterable[str] = ALL_FORMATS, *, plotlyjs: str | None = None
) -> dict[str, bytes]:
    """One chart in several formats, ext -> bytes; the static ones share one browser session.

    The HTML embeds plotly.js unless ``plotlyjs`` names a shared copy (see :func:`to_html`).
    Static formats are left out (not an error) when no browser is available, so a caller
    can still offer HTML and CSV; :func:`static_export_available` says why.
    """
    formats = _check_formats(formats)
    out: dict[str, bytes] = {}
    if "html" in formats:
        out["html"] = to_html(spec.figure, filename=spec.filename, plotlyjs=plotlyjs).encode()
    if "csv" in formats:
        out["csv"] = to_csv(spec)
    static = [f for f in formats if f in STATIC_FORMATS]
    if static and static_export_available()[0]:
        jobs = [(spec.figure, f, PNG_SCALE if f == "png" else 1) for f in static]
        out.update(zip(static, _Renderer(jobs).result(), strict=True))
    return out


# PNG and npz are compressed already: deflating them again costs time for nothing.
_STORED = (".png", ".npz")


def _zip(files: Iterable[tuple[str, bytes]]) -> bytes:
    """A zip of (path, bytes). zlib's default level: with plotly.js in a pack once, not
    once per figure, the better compression of the one copy and of the CSVs is worth
    the fraction of a second it costs."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        for path, data in files:
            if path.endswith(_STORED):
                zf.writestr(path, data, compress_type=zipfile.ZIP_STORED)
            else:
                zf.writestr(path, data, compress_type=zipfile.ZIP_DEFLATED, compresslevel=6)
    return buffer.getvalue()


def teaching_pack(
    history: History,
    config: RunConfig,
    *,
    formats: Iterable[str] = ALL_FORMATS,
    progress: ProgressFn | None = None,
    claims: Sequence[ClaimResult] = (),
) -> bytes:
    """A zip with every chart of the Live training page in every format, and the run.

    Contents: ``figures/<name>.<ext>`` for each chart and format (``<name>`` from
    :func:`figure_filename`) and ``figures/plotly.min.js``, which the HTML figures share;
    ``metrics.csv``, ``config.json``, ``events.json``, ``claims.json`` (the checked
    ``claims``), ``histograms.npz`` and ``README.txt`` (each figure's title and caption,
    the config in one line). Without a browser PNG, SVG and PDF are left out and the
    README says why. ``progress(done, total, label)`` is called as files are made (first
    with ``done = 0``).
    """
    return _zip(_pack_files(history, config, formats, progress, claims))


def write_export(
    history: History,
    config: RunConfig,
    out_dir: str | os.PathLike[str],
    formats: Iterable[str] = ALL_FORMATS,
    progress: ProgressFn | None = None,
    claims: Sequence[ClaimResult] = (),
) -> list[Path]:
    """Write the teaching pack's files into ``out_dir`` (created); returns their paths."""
    out = Path(out_dir)
    files = _pack_files(history, config, formats, progress, claims)
    written = []
    for rel, data in files:
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    return written


def load_run_dir(run_dir: str | os.PathLike[str]) -> tuple[RunConfig, History]:
    """A finished CLI run (config.json, metrics.csv, histograms.npz, events.json) as a
    config and History again, so its figures can be exported without training."""
    run_dir = Path(run_dir)
    config = RunConfig.from_json((run_dir / "config.json").read_bytes())
    history = History(config.max_points, config.max_histograms)
    metrics = pd.read_csv(run_dir / "metrics.csv", keep_default_na=False)
    for row in metrics.itertuples(index=False):
        history.add(int(row.step), str(row.variant), str(row.layer), str(row.metric), row.value)
    npz_path = run_dir / "histograms.npz"
    if npz_path.exists():
        with np.load(npz_path) as arrays:
            for name in arrays.files:
                parts = name.split("/")
                if len(parts) == 2 and parts[1] == "edges":
                    history.set_bin_edges(parts[0], arrays[name])
            for name in arrays.files:
                parts = name.split("/")
                if len(parts) == 4 and parts[3] == "steps":
                    kind, variant, layer = parts[:3]
                    counts = arrays[f"{kind}/{variant}/{layer}/counts"]
                    for step, row in zip(arrays[name], counts, strict=True):
                        history.add_histogram(int(step), variant, layer, kind, row)
    events_path = run_dir / "events.json"
    if events_path.exists():
        for event in json.loads(events_path.read_text()):
            history.add_event(event["step"], event["name"], event["old"], event["new"])
    return config, history


def figure_rows(fig: go.Figure) -> pd.DataFrame:
    """The numbers a figure draws, as tidy rows (trace, x, y): the data behind a chart that
    has no History, such as the teaching experiments'."""
    frames = []
    for trace in fig.data:
        x, y = getattr(trace, "x", None), getattr(trace, "y", None)
        if x is None or y is None:
            continue
        x, y = np.asarray(x).ravel(), np.asarray(y).ravel()
        n = min(len(x), len(y))
        frames.append(pd.DataFrame({"trace": trace.name or "", "x": x[:n], "y": y[:n]}))
    if not frames:
        return pd.DataFrame(columns=["trace", "x", "y"])
    return pd.concat(frames, ignore_index=True)


def spec_from_figure(
    page: str,
    chart: str,
    fig: go.Figure,
    caption: str,
    variants: Sequence[str] = (),
    step: int | None = None,
) -> FigureSpec:
    """A FigureSpec for a figure already drawn on a page: a print-themed copy and its data.

    ``variants`` and ``step``: those of the run the chart shows, for its file name.
    """
    printed = figures.apply_theme(go.Figure(fig), "print")
    name = figure_filename(page, chart, variants, step)
    return FigureSpec(chart, printed, _title_of(printed), caption, figure_rows(fig), chart, name)


def page_pack(specs: Sequence[FigureSpec], formats: Iterable[str] = ALL_FORMATS) -> bytes:
    """A zip of the given charts in every format, with a README of titles and captions.

    As in the teaching pack, the HTML figures share one ``figures/plotly.min.js``, and the
    images of all the charts are rendered in one browser session.
    """
    formats = _check_formats(formats)
    available, why = static_export_available()
    static = [f for f in formats if f in STATIC_FORMATS] if available else []
    jobs = [(spec, fmt) for spec in specs for fmt in static]
    images: dict[tuple[int, str], bytes] = {}
    if jobs:
        renderer = _Renderer(
            [(spec.figure, fmt, PNG_SCALE if fmt == "png" else 1) for spec, fmt in jobs]
        )
        for (spec, fmt), data in zip(jobs, renderer.result(), strict=True):
            images[id(spec), fmt] = data
    files: list[tuple[str, bytes]] = []
    lines = ["BatchNorm Lab: figures of one page", ""]
    for i, spec in enumerate(specs, 1):
        other = chart_files(
            spec, [f for f in formats if f not in STATIC_FORMATS], plotlyjs=PLOTLY_JS_FILE
        )
        for fmt in formats:
            data = images.get((id(spec), fmt), other.get(fmt))
            if data is not None:
                files.append((_figure_path(spec, fmt), data))
        lines += [f"{i}. {spec.title} (figures/{spec.filename}.*)", f"   {spec.caption}", ""]
    if "html" in formats:
        files.append((f"figures/{PLOTLY_JS_FILE}", plotly_js()))
        lines.append(
            f"The HTML figures load plotly.js {get_plotlyjs_version()} from "
            f"figures/{PLOTLY_JS_FILE}: keep it beside them."
        )
    if not available and any(f in STATIC_FORMATS for f in formats):
        lines.append(f"PNG, SVG and PDF were skipped: {why}")
    lines.append(
        "File names: page_chart_variants_stepN.ext (variants none and step 0: a chart "
        "with no training run behind it)."
    )
    files.append(("README.txt", ("\n".join(lines) + "\n").encode("utf-8")))
    return _zip(files)
