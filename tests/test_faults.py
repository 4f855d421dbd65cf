"""Faults the product must survive with nothing lost: a diverging variant, no Chromium for
static export, MNIST offline, and (in test_app.py) a cuda device on a machine without one.

Pause latency and Reset during a tick need a real browser: tests/test_browser.py.
"""

from __future__ import annotations

import io
import math
import zipfile

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from bn_core import data, export, figures
from bn_core.config import RunConfig, load_preset
from bn_core.train import Trainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NOWHERE = "/nonexistent/chromium"


@pytest.fixture(scope="module")
def diverged() -> Trainer:
    """plain at lr 10 blows up within a few steps; batchnorm at lr 0.5 trains on."""
    config = load_preset("ioffe-fig1").replace(
        activation="relu",
        init_std=1.0,
        momentum=0.9,
        width=16,
        probe_size=50,
        steps=120,
        telemetry_every=5,
        eval_every=20,
        variants=[
            {"name": "plain", "norm": "none", "lr": 10.0},
            {"name": "batchnorm", "norm": "batchnorm", "lr": 0.5},
        ],
    )
    trainer = Trainer(config)
    trainer.advance(steps=120)
    return trainer


def test_a_diverged_variant_stops_and_the_other_trains_on(diverged):
    plain, bn = diverged.status
    assert plain.state == "diverged" and bn.state == "finished"
    n = plain.diverged_at
    assert n is not None and 0 < n < 120
    assert plain.label == f"diverged at step {n}"
    assert f"plain: diverged at step {n}" in diverged.status_line()
    h = diverged.history
    steps, loss = h.series("plain", "", "loss")
    assert len(steps) and steps[-1] <= n and np.isfinite(loss).all()  # kept up to N
    assert h.series("batchnorm", "", "loss")[0][-1] >= 115  # the other went on to the end
    assert h.series("batchnorm", "", "test_accuracy")[0][-1] == 120
    # A diverged variant stops moving (its learning rate is 0), the other keeps its own.
    assert diverged.optimizer.lrs == [0.0, 0.5]


def test_charts_keep_the_diverged_history(diverged):
    n = diverged.status[0].diverged_at
    fig = figures.loss_accuracy(diverged.history)
    lines = {t.name: t for t in fig.data if t.name and t.showlegend}
    assert max(lines["plain"].x) <= n < max(lines["batchnorm"].x)
    for build in (figures.grad_norms, figures.update_ratio):
        plain = [t for t in build(diverged.history).data if t.name == "plain"]
        assert plain and all(max(t.x) <= n for t in plain)


def test_export_of_a_diverged_run_without_chromium(diverged, monkeypatch):
    """Pointing the browser variable at nothing: export says why and still writes HTML/CSV."""
    monkeypatch.setenv("BROWSER_PATH", NOWHERE)
    monkeypatch.setattr(export, "_find_browser", lambda: NOWHERE)
    ok, why = export.static_export_available()
    assert not ok and NOWHERE in why and "BROWSER_PATH" in why
    pack = zipfile.ZipFile(io.BytesIO(export.teaching_pack(diverged.history, diverged.config)))
    names = set(pack.namelist())
    loss = f"figures/{export.figure_specs(diverged.history, diverged.config)[0].filename}.html"
    assert loss in names and "metrics.csv" in names
    assert not any(name.endswith((".png", ".svg", ".pdf")) for name in names)
    assert why in pack.read("README.txt").decode()
    metrics = pack.read("metrics.csv").decode()
    assert "plain,,loss" in metrics and "batchnorm,,loss" in metrics
    config = RunConfig.from_json(pack.read("config.json"))
    assert config == diverged.config


def test_the_app_explains_missing_chromium_and_offers_html_and_csv(app_path, monkeypatch):
    monkeypatch.setenv("BROWSER_PATH", NOWHERE)
    monkeypatch.setattr(export, "_find_browser", lambda: NOWHERE)
    at = AppTest.from_file(str(app_path), default_timeout=60).run()
    assert not at.exception
    infos = [i.value for i in at.info]
    assert any(
        NOWHERE in text and "HTML, CSV and the config still export" in text for text in infos
    )
    [b for b in at.button if b.label == "Prepare files"][0].click().run()
    assert not at.exception
    labels = [b.label for b in at.get("download_button")]
    assert "HTML" in labels and "CSV" in labels
    assert not {"PNG", "SVG", "PDF"} & set(labels)


def test_mnist_offline_explains_what_to_do_and_keeps_the_run(app_path, monkeypatch, tmp_path):
    monkeypatch.setenv("BN_LAB_DATA", str(tmp_path / "cache"))
    # Nothing listens on port 9 of this machine: every download fails at once, as offline.
    monkeypatch.setitem(data.MIRRORS, "mnist", ("http://127.0.0.1:9/mnist/",))
    at = AppTest.from_file(str(app_path), default_timeout=60).run()
    [b for b in at.button if b.label == "Step"][0].click().run()
    trainer = at.session_state.trainer
    [s for s in at.sidebar.selectbox if s.label == "Data set"][0].set_value("mnist").run()
    [b for b in at.button if b.label == "Reset"][0].click().run()
    assert not at.exception
    (error,) = at.error
    assert "the current run is kept" in error.value
    assert "mnist" in error.value and "by hand" in error.value
    assert str(tmp_path / "cache") in error.value
    assert at.session_state.trainer is trainer and trainer.step == 1
    assert math.isfinite(trainer.history.series("plain", "", "loss")[1][-1])
