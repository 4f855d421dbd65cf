"""The two Santurkar et al. pages through Streamlit's AppTest, reached from the app's router:
"Does BN reduce ICS?" (Play, Restart, the claims table, ICS and landscape charts) and the
"Learning-rate sweep" (Start, Stop, results). Runs are kept short so the file stays quick."""

from __future__ import annotations

import base64
import json
import re

import numpy as np
import pytest
from chart_elements import page_charts
from streamlit.testing.v1 import AppTest

from bn_core.claims import load_claims
from bn_core.experiments.charts import EXPERIMENT_CHARTS
from bn_core.experiments.sweep import lr_grid
from bn_core.figures import CHARTS

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LIVE, ICS, SWEEP = "pages/live_training.py", "pages/ics_question.py", "pages/lr_sweep.py"
VARIANTS = ["plain", "batchnorm", "batchnorm-noisy"]  # the ics-smoothness preset
ICS_CHARTS = ["percentile_bands", "loss_accuracy", "ics_l2", "ics_cos", "landscape"]
ICS_STATUS_RE = re.compile(r"^step ([\d,]+) · ")
SWEEP_STATUS_RE = re.compile(r"^Sweep (running|stopped|finished): ([\d,]+) of ([\d,]+) ")
MAX_RERUNS = 40  # a short sweep or run finishes well within this many script runs


# --- helpers -----------------------------------------------------------------------------
def run(target) -> AppTest:
    """Run the script (after a widget interaction, if given one) and check it raised nothing."""
    at = target.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def open_page(app_path, page: str) -> AppTest:
    """The app as a student reaches the page: the router's default page first, then ours."""
    at = run(AppTest.from_file(str(app_path), default_timeout=60))
    return run(at.switch_page(page))


@pytest.fixture
def ics_page(app_path) -> AppTest:
    return open_page(app_path, ICS)


@pytest.fixture
def sweep_page(app_path) -> AppTest:
    return open_page(app_path, SWEEP)


def button(at: AppTest, label: str):
    found = [b for b in at.button if b.label == label]
    assert len(found) == 1, f"button {label!r}: {[b.label for b in at.button]}"
    return found[0]


def progress_text(at: AppTest) -> str:
    found = [p.proto.text for p in at.get("progress")]
    assert len(found) == 1, f"progress bars: {found}"
    return found[0]


def ics_step(at: AppTest) -> int:
    """The step count in the ICS page's progress text."""
    match = ICS_STATUS_RE.match(progress_text(at))
    assert match, progress_text(at)
    return int(match.group(1).replace(",", ""))


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.caption)


def decode(values) -> np.ndarray:
    """Trace data from the figure JSON: plotly sends numpy arrays as base64 typed arrays."""
    if isinstance(values, dict):  # {"dtype": "f8", "bdata": ...}
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    return np.asarray(values, dtype=float)


def points_per_variant(fig: dict) -> dict[str, int]:
    """Finite y values per trace name, over all of a figure's traces."""
    out: dict[str, int] = {}
    for t in fig["data"]:
        if t.get("name") is None or "y" not in t:
            continue
        y = decode(t["y"]) if t["y"] is not None else np.array([])
        out[t["name"]] = out.get(t["name"], 0) + int(np.isfinite(y).sum())
    return out


def claims(at: AppTest) -> dict[str, object]:
    """The claims table split by view: "Ioffe & Szegedy" and "Santurkar et al." rows."""
    assert len(at.dataframe) == 1, f"{len(at.dataframe)} tables"
    table = at.dataframe[0].value
    return {view: rows for view, rows in table.groupby("view", sort=False)}


def play(at: AppTest, reruns: int = 2) -> AppTest:
    """Press Play, then let the fragment tick `reruns` more times (one tick per script run)."""
    run(at.button(key="ics_play").click())
    assert at.session_state.ics_playing
    for _ in range(reruns):
        run(at)
    return at


def start_sweep(at: AppTest, low: float, high: float, count: int, steps: int) -> AppTest:
    run(at.select_slider(key="sweep_w_range").set_value((low, high)))
    run(at.number_input(key="sweep_w_count").set_value(count))
    run(at.number_input(key="sweep_w_steps").set_value(steps))
    return run(button(at, "Start sweep").click())


# --- Does BN reduce ICS? -------------------------------------------------------------------
def test_ics_page_renders_paused_at_step_zero(ics_page):
    at = ics_page
    assert at.title[0].value == "Does BN reduce internal covariate shift?"
    assert not at.error
    trainer = at.session_state.ics_trainer
    assert trainer.step == 0 and trainer.variant_names == VARIANTS
    assert not at.session_state.ics_playing
    assert at.button(key="ics_play").label == "Play"
    assert "Restart" in [b.label for b in at.button]
    assert progress_text(at).startswith("step 0 · paused · ")
    assert sorted(page_charts(at, "ics")) == sorted(ICS_CHARTS)
    for key in ICS_CHARTS:
        assert CHARTS[key].caption in captions(at), key
    keys = [w.key for w in at.sidebar.number_input]
    for field in ("steps", "ics_every", "landscape_every", "seed", "landscape_low"):
        assert f"ics_w_{field}" in keys, keys


def test_play_trains_and_draws_ics_and_landscape_for_every_variant(ics_page):
    at = play(ics_page)
    trainer = at.session_state.ics_trainer
    assert trainer.step > 0
    assert ics_step(at) == trainer.step
    assert at.button(key="ics_play").label == "Pause"
    assert not at.error
    shown = page_charts(at, "ics")
    for key in ("ics_l2", "ics_cos", "landscape"):
        assert key in shown, f"{key} not among {list(shown)}"
        counts = points_per_variant(shown[key])
        for variant in VARIANTS:
            assert counts.get(variant, 0) > 0, f"{key}: no data for {variant}: {counts}"
    # A further tick goes on from there.
    before = trainer.step
    run(at)
    assert at.session_state.ics_trainer is trainer and trainer.step > before


def test_claims_table_has_one_column_per_variant(ics_page):
    at = play(ics_page)
    assert list(at.dataframe[0].value.columns) == ["view", "measure", *VARIANTS]
    views = claims(at)
    assert list(views) == ["Ioffe & Szegedy", "Santurkar et al."]
    assert len(views["Ioffe & Szegedy"]) == 3 and len(views["Santurkar et al."]) == 4
    # ICS and the landscape were measured for every variant: no "–" left in Santurkar's.
    for variant in VARIANTS:
        assert "–" not in list(views["Santurkar et al."][variant]), views["Santurkar et al."]


def test_ics_page_checks_the_presets_claims_on_its_run(ics_page):
    at = play(ics_page, reruns=1)
    step = at.session_state.ics_trainer.step
    markdown = [md.value for md in at.main.markdown]
    heads = [i for i, text in enumerate(markdown) if text.startswith("**What this run shows")]
    assert len(heads) == 1, markdown
    claims = load_claims("ics-smoothness")
    lines = [m for m in markdown[heads[0] + 1 :] if "measured:" in m]
    assert len(lines) == len(claims)
    for c, line in zip(claims, lines, strict=True):
        assert c.says in line or c.otherwise in line, c.says
        assert f"holds when {c.threshold}" in line
        assert f"checked at step {c.at:,}; the run is at step {step:,}" in line
    # The prose says the smoother landscape is Santurkar et al.'s report, and leaves what
    # this run reproduces to the checked claims; the noise note says what evaluation does.
    text = "\n".join(markdown)
    assert "They report that what BN does change is the landscape" in text
    assert "reproduces on your run, measured" in text
    assert "scale (low + high) / 2, 1.125 here, and shift 0" in captions(at)


def test_pause_stops_the_run(ics_page):
    at = play(ics_page, reruns=1)
    run(at.button(key="ics_play").click())
    assert not at.session_state.ics_playing
    assert at.button(key="ics_play").label == "Play"
    step = at.session_state.ics_trainer.step
    run(at)
    run(at)
    assert at.session_state.ics_trainer.step == step
    assert progress_text(at).startswith(f"step {step:,} · paused · ")


def test_ics_off_shows_a_note_instead_of_the_ics_charts(ics_page):
    at = ics_page
    run(at.number_input(key="ics_w_ics_every").set_value(0))
    assert at.session_state.ics_trainer.config.ics_every == 10  # only Restart applies it
    run(button(at, "Restart").click())
    assert at.session_state.ics_trainer.config.ics_every == 0
    assert any(i.value.startswith("ICS measurement is off") for i in at.info)
    shown = page_charts(at, "ics")
    assert "ics_l2" not in shown and "ics_cos" not in shown
    assert "landscape" in shown
    at = play(at, reruns=1)
    assert "ics_l2" not in page_charts(at, "ics")
    santurkar = claims(at)["Santurkar et al."]
    ics_row = santurkar[santurkar["measure"].str.startswith("ICS")].iloc[0]
    assert all(ics_row[v] == "–" for v in VARIANTS), ics_row
    # And the landscape probe off as well.
    run(at.number_input(key="ics_w_landscape_every").set_value(0))
    run(button(at, "Restart").click())
    assert any(i.value.startswith("Landscape probes are off") for i in at.info)
    assert sorted(page_charts(at, "ics")) == ["loss_accuracy", "percentile_bands"]
    assert not at.error


def test_restart_gives_a_fresh_run_with_the_sidebar_set_up(ics_page):
    at = play(ics_page, reruns=1)
    old = at.session_state.ics_trainer
    assert old.step > 0
    run(at.number_input(key="ics_w_steps").set_value(100))
    run(at.number_input(key="ics_w_seed").set_value(3))
    run(button(at, "Restart").click())
    trainer = at.session_state.ics_trainer
    assert trainer is not old
    assert trainer.step == 0 and trainer.config.steps == 100 and trainer.config.seed == 3
    assert not at.session_state.ics_playing  # Restart pauses
    assert progress_text(at).startswith("step 0 · paused · ")
    # Played to the end, the run stops by itself at exactly its length.
    run(at.button(key="ics_play").click())
    for _ in range(MAX_RERUNS):
        if trainer.finished:
            break
        run(at)
    assert trainer.finished and trainer.step == 100
    run(at)  # the rerun after the last tick
    assert not at.session_state.ics_playing
    assert at.button(key="ics_play").disabled
    assert ics_step(at) == 100


@pytest.mark.parametrize(
    ("low_key", "high_key", "field"),
    [
        ("ics_w_landscape_low", "ics_w_landscape_high", "landscape_low"),
        ("ics_w_bn_noise_scale_low", "ics_w_bn_noise_scale_high", "bn_noise_scale_low"),
    ],
)
def test_a_bad_restart_keeps_the_old_run(ics_page, low_key, high_key, field):
    """Each bound is within its widget's range, but "from" above "to" is no config."""
    at = play(ics_page, reruns=1)
    old = at.session_state.ics_trainer
    step = old.step
    run(at.number_input(key="ics_w_steps").set_value(200))
    run(at.number_input(key=high_key).set_value(2.0))
    run(at.number_input(key=low_key).set_value(3.0))
    run(button(at, "Restart").click())
    assert at.session_state.ics_trainer is old
    assert old.config.steps == 5000
    assert len(at.error) == 1
    message = at.error[0].value
    assert message.startswith(f"Not restarted, the current run is kept. {field} = 3"), message
    assert "at most" in message
    assert at.session_state.ics_playing and old.step >= step  # the old run goes on
    run(at)
    assert not at.error  # shown once
    # Put right, the next Restart starts the run asked for.
    run(at.number_input(key=low_key).set_value(1.0))
    run(button(at, "Restart").click())
    assert at.session_state.ics_trainer is not old
    assert at.session_state.ics_trainer.config.steps == 200
    assert getattr(at.session_state.ics_trainer.config, field) == 1.0
    assert not at.error


# --- Learning-rate sweep -------------------------------------------------------------------
def test_sweep_page_waits_for_start(sweep_page):
    at = sweep_page
    assert at.title[0].value == "Learning-rate sweep"
    assert not at.error
    assert any("press **Start sweep**" in i.value for i in at.info)
    assert "sweep" not in at.session_state and not at.session_state.sweep_running
    assert not button(at, "Start sweep").disabled and button(at, "Stop").disabled
    assert not page_charts(at, "sweep") and not at.dataframe and not at.get("progress")


def test_sweep_runs_to_the_end(sweep_page):
    # Five rates: more than one lockstep run holds (4 per run with plain and batchnorm).
    # 2 x 250 steps of 8 variants take longer than the first tick's 0.4 s of training.
    at = start_sweep(sweep_page, 0.1, 1.0, count=5, steps=250)
    sweep = at.session_state.sweep
    assert at.session_state.sweep_running
    assert button(at, "Start sweep").disabled and not button(at, "Stop").disabled
    assert len(sweep.trainers) == 2 and sweep.steps_total == 500
    done = [sweep.steps_done]
    for _ in range(MAX_RERUNS):
        if not at.session_state.sweep_running:
            break
        run(at)
        done.append(sweep.steps_done)
    assert not at.session_state.sweep_running and sweep.finished
    assert done == sorted(done)
    match = SWEEP_STATUS_RE.match(progress_text(at))
    assert match and match.groups() == ("finished", "500", "500"), progress_text(at)
    assert "10 nets of 250 steps" in progress_text(at)
    assert not button(at, "Start sweep").disabled and button(at, "Stop").disabled
    assert not at.error

    table = at.dataframe[0].value
    assert len(table) == 2 * 5
    rates = lr_grid(0.1, 1.0, 5)
    for label in ("plain", "batchnorm"):
        assert list(table[table["variant"] == label]["lr"]) == rates
    assert table["test accuracy"].between(0, 1).all()

    labels = [m.label for m in at.metric]
    assert labels == ["Usable learning rates, plain", "Usable learning rates, batchnorm"]
    # A range that reaches an end of the grid is a lower bound, and the page says so.
    result = sweep.result()
    for m, label in zip(at.metric, ("plain", "batchnorm"), strict=True):
        assert m.value == (result.usable_text(label, short=True) or "none")
        assert ("≥" in m.value) == result.touches_grid_end(label), m.value
        if result.touches_grid_end(label):
            assert f"{label}: {result.usable_text(label)}" in captions(at)
    bounded = any(result.touches_grid_end(label) for label in ("plain", "batchnorm"))
    assert ("is a lower bound" in captions(at)) == bounded
    fig = page_charts(at, "sweep")["lr_sweep"]
    lines = [t for t in fig["data"] if t.get("mode") == "lines+markers"]
    assert sorted({t["name"] for t in lines}) == ["batchnorm", "plain"]
    legend = [t["name"] for t in lines if t.get("showlegend", True)]
    assert sorted(legend) == ["batchnorm", "plain"]  # one line per variant in the legend
    for t in lines:
        np.testing.assert_allclose(decode(t["x"]), rates)
    assert EXPERIMENT_CHARTS["lr_sweep"].title in json.dumps(fig["layout"]["title"])
    assert EXPERIMENT_CHARTS["lr_sweep"].caption in captions(at)


def test_stop_halts_the_sweep(sweep_page):
    at = start_sweep(sweep_page, 0.01, 1.0, count=2, steps=5000)
    sweep = at.session_state.sweep
    run(at)
    assert at.session_state.sweep_running and 0 < sweep.steps_done < sweep.steps_total
    run(button(at, "Stop").click())
    assert not at.session_state.sweep_running
    stopped = sweep.steps_done
    run(at)
    run(at)
    assert sweep.steps_done == stopped and not sweep.finished
    match = SWEEP_STATUS_RE.match(progress_text(at))
    assert match and match.group(1) == "stopped", progress_text(at)
    assert int(match.group(2).replace(",", "")) == stopped
    assert not button(at, "Start sweep").disabled and button(at, "Stop").disabled
    assert len(at.dataframe[0].value) == 2 * 2  # partial results are still shown


# --- leaving and coming back ---------------------------------------------------------------
@pytest.mark.parametrize("page", [ICS, SWEEP])
def test_back_to_live_training_after_a_santurkar_page(app_path, page):
    """Widgets keep their values while another page shows (persist_state="session")."""
    at = run(AppTest.from_file(str(app_path), default_timeout=60))
    run(at.sidebar.number_input(key="w_batch_size").set_value(30))  # a pending set-up change
    run(at.switch_page(page))
    run(at.switch_page(LIVE))
    assert at.sidebar.number_input(key="w_batch_size").value == 30
    assert any("batch_size" in w.value for w in at.warning)  # still waiting for Reset
    assert at.session_state.trainer.config.batch_size == 60


def test_ics_sidebar_still_shows_the_run_after_a_round_trip(ics_page):
    at = ics_page
    run(at.number_input(key="ics_w_steps").set_value(100))
    run(button(at, "Restart").click())
    run(at.switch_page(SWEEP))
    run(at.switch_page(ICS))
    assert at.session_state.ics_trainer.config.steps == 100
    assert at.number_input(key="ics_w_steps").value == 100
