"""The two teaching-experiment pages through Streamlit's AppTest, reached from the app's router:
they render, their widgets move the numbers they should, and heavy runs stay in the session."""

from __future__ import annotations

import base64
import math

import numpy as np
import pytest
import torch
from chart_elements import page_charts
from streamlit.testing.v1 import AppTest

from bn_core.claims import load_claims
from bn_core.experiments.blowup import run_blowup
from bn_core.experiments.charts import EXPERIMENT_CHARTS
from bn_core.experiments.inside import single_example_error

pytestmark = pytest.mark.usefixtures("one_torch_thread")

BLOWUP, INSIDE = "pages/bias_blowup.py", "pages/inside_batchnorm.py"
SECTIONS = {
    "Stages": ["bn_stages"],
    "Train vs eval": ["train_eval_gap"],
    "Momentum conventions": ["momentum_conventions"],
    "Batch size": ["batch_size_noise"],
    "Scale invariance": ["scale_invariance"],
    "Placement": [],  # its chart waits for the button
}


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
def blowup_page(app_path) -> AppTest:
    return open_page(app_path, BLOWUP)


@pytest.fixture
def inside_page(app_path) -> AppTest:
    return open_page(app_path, INSIDE)


def metric(at: AppTest, label: str) -> str:
    found = [m.value for m in at.metric if m.label == label]
    assert len(found) == 1, f"metric {label!r}: {[m.label for m in at.metric]}"
    return found[0]


def push_metric(at: AppTest) -> tuple[float, float]:
    """The naive push on layer 1: (its value at the last step, at step 0 from the delta)."""
    (tile,) = [m for m in at.metric if m.label == "Naive push, layer1"]
    return float(tile.value), float(tile.delta.removesuffix(" at step 0"))


def metric_starting(at: AppTest, prefix: str) -> float:
    found = [float(m.value) for m in at.metric if m.label.startswith(prefix)]
    assert len(found) == 1, f"metric {prefix!r}...: {[m.label for m in at.metric]}"
    return found[0]


def button(at: AppTest, prefix: str):
    found = [b for b in at.button if b.label.startswith(prefix)]
    assert len(found) == 1, f"button {prefix!r}: {[b.label for b in at.button]}"
    return found[0]


def claims_panel(at: AppTest, missing_ok: bool = False) -> list[str]:
    """The claims panel's markdown: its heading, then one line per claim."""
    markdown = [md.value for md in at.main.markdown]
    heads = [i for i, text in enumerate(markdown) if text.startswith("**What this run shows")]
    if missing_ok and not heads:
        return []
    assert len(heads) == 1, markdown
    lines = markdown[heads[0] :]
    return [lines[0], *(line for line in lines[1:] if "measured:" in line)]


def captions(at: AppTest) -> str:
    return "\n".join(c.value for c in at.caption)


def decode(values) -> np.ndarray:
    """Trace data from the figure JSON: plotly sends numpy arrays as base64 typed arrays."""
    if isinstance(values, dict):  # {"dtype": "f8", "bdata": ...}
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"])
    return np.asarray(values, dtype=float)


def trace_data(fig: dict, name: str, field: str = "y") -> np.ndarray:
    for t in fig["data"]:
        if t.get("name") == name:
            return decode(t[field])
    raise AssertionError(f"no trace {name!r} in {[t.get('name') for t in fig['data']]}")


# --- bias blow-up ------------------------------------------------------------------------
def test_blowup_page_renders_with_captions(blowup_page):
    at = blowup_page
    assert at.title[0].value == "Bias blow-up"
    shown = page_charts(at, "blowup")
    assert sorted(shown) == ["blowup_bias", "blowup_loss"]
    for key in shown:
        assert EXPERIMENT_CHARTS[key].caption in captions(at)
    assert not at.error
    assert at.latex  # the math is typeset, not written out
    assert "Train both nets" in [b.label for b in at.button]


def test_lr_slider_moves_the_slope_proportionally(blowup_page):
    at = blowup_page
    slope = float(metric(at, "Measured slope of b"))
    predicted = metric_starting(at, "Predicted")
    assert slope == pytest.approx(0.1 * 32, rel=1e-9) and predicted == pytest.approx(slope)
    run(at.select_slider(key="bb_lr").set_value(1.0))
    assert float(metric(at, "Measured slope of b")) == pytest.approx(10 * slope, rel=1e-9)
    assert metric_starting(at, "Predicted") == pytest.approx(10 * predicted, rel=1e-9)
    naive = trace_data(page_charts(at, "blowup")["blowup_bias"], "naive (μ_B held constant)")
    expected = run_blowup(steps=200, lr=1.0).bias_naive
    np.testing.assert_allclose(naive, expected, rtol=1e-12)
    # The loss never moves, and the page says how little.
    assert float(metric(at, "Loss change")) <= 1e-9


def test_also_scale_divides_the_slope_by_the_batch_std(blowup_page):
    at = blowup_page
    plain = float(metric(at, "Measured slope of b"))
    run(at.toggle(key="bb_scale").set_value(True))
    scaled = float(metric(at, "Measured slope of b"))
    reference = run_blowup(steps=200, lr=0.1, scale=True)
    s = math.sqrt(np.var(reference.u) + reference.eps)
    assert scaled != pytest.approx(plain)
    assert scaled == pytest.approx(plain / s, rel=1e-5)  # the metric shows 6 digits
    assert any("grows linearly" in i.value for i in at.info)


def test_network_button_trains_once_and_keeps_the_result(blowup_page):
    at = blowup_page
    run(at.slider(key="bb_net_steps").set_value(20))
    run(button(at, "Train both nets").click())
    net = at.session_state.bb_network
    assert len(net.steps) == 20
    shown = page_charts(at, "blowup")
    for key in ("network_bias_norms", "network_bias_grads", "network_loss_accuracy"):
        assert key in shown
        assert EXPERIMENT_CHARTS[key].caption in captions(at)
    assert float(metric(at, "Max ‖dL/db‖, correct")) <= 1e-6
    assert float(metric(at, "Min ‖dL/db‖, naive")) > 1e-3
    # The push on layer 1 at the first and the last step, as measured.
    push = net.series("batchnorm-naive", "bias_grad_norm")[0]
    last, first = push_metric(at)
    assert first == pytest.approx(push[0], rel=5e-3)
    assert last == pytest.approx(push[-1], rel=5e-3)
    # The preset's claims: the one checked at step 0 already holds, the rest wait for
    # step 1,000 and say so.
    claims = load_claims("bias-blowup")
    panel = claims_panel(at)
    assert panel[0].startswith("**What this run shows")
    assert f"1 of {len(claims)} hold" in panel[0]
    for c, line in zip(claims, panel[1:], strict=True):
        assert c.says in line and "measured:" in line
        if c.at == 0:
            assert "✓" in line
        else:
            assert "…" in line and "checked at step 1,000; the run is at step 20" in line
    # Another widget reruns the page without training again.
    run(at.select_slider(key="bb_lr").set_value(0.5))
    assert at.session_state.bb_network is net
    assert "network_bias_grads" in page_charts(at, "blowup")


def test_network_default_run_bears_out_every_claim(blowup_page):
    """The section's default length is the claims' step: on it, every claim holds."""
    at = blowup_page
    assert at.slider(key="bb_net_steps").value == 1000
    assert not at.session_state.get("bb_network")
    assert not claims_panel(at, missing_ok=True)  # nothing to check before a run
    run(button(at, "Train both nets").click())
    assert len(at.session_state.bb_network.steps) == 1000
    claims = load_claims("bias-blowup")
    panel = claims_panel(at)
    assert f"{len(claims)} of {len(claims)} hold" in panel[0], "\n".join(panel)
    assert all("✓" in line for line in panel[1:])
    naive_min = float(metric(at, "Min ‖dL/db‖, naive"))
    assert 1e-4 < naive_min < 0.01  # the floor shown is the one measured, well under 0.01
    last, first = push_metric(at)
    assert last < first / 2


# --- inside BN ---------------------------------------------------------------------------
def test_every_inside_section_renders(inside_page):
    at = inside_page
    assert at.title[0].value == "Inside a BatchNorm layer"
    assert at.button_group(key="ib_section").options == list(SECTIONS)
    for section, keys in SECTIONS.items():
        run(at.button_group(key="ib_section").set_value(section))
        assert sorted(page_charts(at, "inside")) == sorted(keys), section
        for key in keys:
            assert EXPERIMENT_CHARTS[key].caption in captions(at)
        assert not at.error, section
    run(at.button_group(key="ib_section").set_value("Batch size"))
    assert at.code[0].value == single_example_error()


def test_identity_button_gives_back_the_input(inside_page):
    at = inside_page
    assert float(metric(at, "max |y − x|")) > 0.1  # gamma = 1, beta = 0 normalizes
    run(button(at, "Identity").click())
    assert float(metric(at, "max |y − x|")) <= 1e-6
    mu, std = float(metric(at, "μ_B")), float(metric(at, "√(σ²_B + ε)"))
    assert at.slider(key="ib_gamma").value == pytest.approx(std, rel=1e-3)
    assert at.slider(key="ib_beta").value == pytest.approx(mu, rel=1e-3)
    run(button(at, "γ = 1, β = 0").click())
    assert float(metric(at, "max |y − x|")) > 0.1


def test_gamma_and_beta_act_live(inside_page):
    at = inside_page
    run(at.slider(key="ib_gamma").set_value(2.0))
    run(at.slider(key="ib_beta").set_value(-1.0))
    fig = page_charts(at, "inside")["bn_stages"]
    x_hat = trace_data(fig, "normalized x̂", "x")
    y = trace_data(fig, "output y", "x")
    np.testing.assert_allclose(y, 2.0 * x_hat - 1.0, rtol=1e-12, atol=1e-12)


def test_synthetic_batch_sliders_change_the_statistics(inside_page):
    at = inside_page
    run(at.slider(key="ib_mean").set_value(-4.0))
    run(at.slider(key="ib_n").set_value(100))
    assert metric(at, "n") == "100"
    assert float(metric(at, "μ_B")) == pytest.approx(-4.0, abs=0.6)


def test_a_layer_of_the_current_run_leaves_training_untouched(inside_page):
    at = inside_page
    trainer = at.session_state.trainer  # the Live training page started it
    trainer.advance(steps=3)
    buffers = [b.clone() for b in trainer.model.buffers()]
    run(at.radio(key="ib_source").set_value("A layer of the current run"))
    assert "on the run's fixed probe batch" in captions(at)
    assert metric(at, "n") == str(trainer.x_probe.shape[0])
    assert trainer.step == 3
    assert all(torch.equal(a, b) for a, b in zip(buffers, trainer.model.buffers(), strict=True))
    run(button(at, "Identity").click())
    assert float(metric(at, "max |y − x|")) <= 1e-6
    # A unit the layer does not have is an error message, not a traceback.
    run(at.number_input(key="ib_unit").set_value(500))
    assert any("unit = 500" in e.value for e in at.error)


def test_inside_page_alone_falls_back_to_a_synthetic_batch(app_path):
    """Run directly, the page has no trainer in the session: it says so and carries on."""
    at = run(AppTest.from_file(str(app_path.parent / INSIDE), default_timeout=60))
    run(at.radio(key="ib_source").set_value("A layer of the current run"))
    assert any("Live training" in i.value for i in at.info)
    assert "bn_stages" in page_charts(at, "inside")


def test_scale_slider_updates_the_metrics(inside_page):
    at = inside_page
    run(at.button_group(key="ib_section").set_value("Scale invariance"))
    assert float(metric(at, "1/a")) == pytest.approx(0.1)
    run(at.select_slider(key="ib_a").set_value(100.0))
    assert float(metric(at, "1/a")) == pytest.approx(0.01)
    assert float(metric(at, "Gradient-norm ratio")) == pytest.approx(0.01, rel=1e-3)
    assert float(metric(at, "… with ε·a²")) <= 1e-12


def test_placement_button_trains_both_placements(inside_page):
    at = inside_page
    run(at.button_group(key="ib_section").set_value("Placement"))
    assert any("Train both placements" in i.value for i in at.info)
    run(at.slider(key="ib_place_steps").set_value(50))
    run(button(at, "Train both placements").click())
    assert set(at.session_state.ib_placement) == {"before", "after"}
    assert "placement" in page_charts(at, "inside")
    assert not at.error
