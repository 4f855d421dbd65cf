"""The command line: `python -m bn_core ...`.

A few commands run in real subprocesses (each start imports torch: seconds on a shared
machine, so they start at once and the tests read their results); the many variations
of flags and presets call the same `main(argv)` in this process.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from bn_core.__main__ import main
from bn_core.config import RunConfig, list_presets, load_preset

ROOT = Path(__file__).resolve().parent.parent
PRESETS = sorted(list_presets())
PER_LAYER = ["preact_p15", "preact_p50", "preact_p85", "saturation", "grad_norm", "update_ratio"]


class Commands:
    """Start commands concurrently; `result(key)` waits for one and returns it."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        self.procs: dict[str, subprocess.Popen] = {}
        self.done: dict[str, subprocess.CompletedProcess] = {}

    def start(self, key: str, *args: str) -> None:
        self.procs[key] = subprocess.Popen(
            [sys.executable, "-m", "bn_core", *args],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def result(self, key: str) -> subprocess.CompletedProcess:
        if key not in self.done:
            proc = self.procs[key]
            try:
                out, err = proc.communicate(timeout=240)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            self.done[key] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        return self.done[key]

    def close(self) -> None:
        for key in self.procs:
            self.result(key)


@pytest.fixture(scope="module", autouse=True)
def cli(tmp_path_factory):
    """The real interpreter, three times at once (each start imports torch: seconds).

    Autouse: they start before the first test and work while the in-process tests run;
    the tests that read their results come last in this file.
    """
    tmp = tmp_path_factory.mktemp("cli")
    cmds = Commands(tmp)
    cmds.start("presets", "presets")
    cmds.start("run", "run", "--preset", "ioffe-fig1", "--steps", "30", "--out", str(tmp / "run"))
    cmds.start("bad", "run", "--preset", "ioffe-fig1", "--steps", "abc", "--out", str(tmp / "bad"))
    yield cmds
    cmds.close()


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def run_main(argv: list[str], capsys) -> tuple[int, str, str]:
    """`python -m bn_core ARGV` in this process: (exit status, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as stop:  # argparse errors exit
        code = stop.code
    out, err = capsys.readouterr()
    return code, out, err


BAD_CASES = {
    # key: (args, field, value, config file content or None)
    "steps-0": (["--preset", "ioffe-fig1", "--steps", "0"], "steps", "0", None),
    "steps-abc": (["--preset", "ioffe-fig1", "--steps", "abc"], "steps", "abc", None),
    "steps-float": (["--preset", "ioffe-fig1", "--steps", "2.5"], "steps", "2.5", None),
    "device-tpu": (["--preset", "ioffe-fig1", "--device", "tpu"], "device", "tpu", None),
    "seed-neg": (["--preset", "ioffe-fig1", "--seed", "-1"], "seed", "-1", None),
    "preset-nope": (["--preset", "nope"], "preset", "nope", None),
    "unknown-key": (["--config", "{dir}/unknown.json"], "widht", "32", '{"widht": 32}'),
    "bad-value": (["--config", "{dir}/bad.json"], "depth", "99", '{"depth": 99}'),
    "not-object": (["--config", "{dir}/list.json"], "config", "[1, 2]", "[1, 2]"),
    "not-json": (["--config", "{dir}/broken.json"], "config", None, '{"depth": 3,'),
    "missing-file": (["--config", "{dir}/missing.json"], "config", "missing.json", None),
    "not-utf8": (["--config", "{dir}/binary.json"], "config", None, b"\xff\xfe\x00{"),
}


def read_metrics(path: Path) -> pd.DataFrame:
    return pd.read_csv(path, keep_default_na=False, dtype={"layer": str})


@pytest.mark.parametrize("key", list(BAD_CASES))
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, key):
    args, field, value, content = BAD_CASES[key]
    path = tmp_path / args[1].split("/")[-1]
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    args = [a.replace("{dir}", str(tmp_path)) for a in args]
    code, out, err = run_main(["run", *args, "--out", str(tmp_path / "out")], capsys)
    assert code == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    line = lines[0]
    assert field in line, line
    if value is not None:
        assert value in line, line
    assert "allowed" in line, line
    assert not (tmp_path / "out").exists()


def test_bad_preset_lists_the_presets(capsys, tmp_path):
    _, _, err = run_main(["run", "--preset", "nope", "--out", str(tmp_path)], capsys)
    for name in PRESETS:
        assert name in err


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["train"],
        ["run", "--preset", "ioffe-fig1"],  # no --out
        ["run", "--out", "x"],  # neither --preset nor --config
        ["run", "--preset", "ioffe-fig1", "--config", "c.json", "--out", "x"],
        ["run", "--preset", "ioffe-fig1", "--out", "x", "--width", "3"],
    ],
)
def test_usage_errors_exit_2_without_traceback(capsys, argv):
    code, _, err = run_main(argv, capsys)
    assert code == 2
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_runs(tmp_path, capsys, name):
    out = tmp_path / name
    code, stdout, err = run_main(
        ["run", "--preset", name, "--steps", "12", "--out", str(out)], capsys
    )
    assert code == 0, err[-2000:]
    assert "wrote" in stdout
    cfg = RunConfig.from_json((out / "config.json").read_text())
    assert cfg == load_preset(name).replace(steps=12)
    frame = read_metrics(out / "metrics.csv")
    variants = [v.name for v in cfg.variants]
    assert sorted(set(frame.variant)) == sorted(variants)
    tests = frame[(frame.metric == "test_accuracy")]
    for variant in variants:
        assert 12 in set(tests[tests.variant == variant].step), variant
        assert 10 in set(frame[(frame.variant == variant) & (frame.metric == "loss")].step)
    with np.load(out / "histograms.npz") as npz:
        assert "preact/edges" in npz.files


def test_overrides_are_validated_and_applied(tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = run_main(
        [
            "run",
            "--preset",
            "placement",
            "--steps",
            "5",
            "--seed",
            "3",
            "--dataset",
            "moons",
            "--device",
            "cpu",
            "--out",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    cfg = RunConfig.from_json((out / "config.json").read_text())
    assert cfg == load_preset("placement").replace(steps=5, seed=3, dataset="moons", device="cpu")


def test_presets_lists_every_preset(cli):
    res = cli.result("presets")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == len(PRESETS)
    for line, (name, meta) in zip(lines, list_presets().items(), strict=True):
        assert line.split()[0] == name
        assert meta["title"] in line


def test_run_writes_its_config(cli):
    res = cli.result("run")
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    out = cli.tmp / "run"
    assert {"config.json", "metrics.csv", "histograms.npz", "events.json"} <= {
        p.name for p in out.iterdir()
    }
    cfg = RunConfig.from_json((out / "config.json").read_text())
    assert cfg == load_preset("ioffe-fig1").replace(steps=30)
    assert json.loads((out / "events.json").read_text()) == []
    assert "plain: finished" in res.stderr and "batchnorm: finished" in res.stderr


def test_run_metrics_csv(cli):
    assert cli.result("run").returncode == 0
    frame = read_metrics(cli.tmp / "run" / "metrics.csv")
    assert list(frame.columns) == ["step", "variant", "layer", "metric", "value"]
    assert set(frame.variant) == {"plain", "batchnorm"}
    for variant in ("plain", "batchnorm"):
        rows = frame[frame.variant == variant]
        run_level = rows[rows.layer == ""]
        loss_steps = sorted(run_level[run_level.metric == "loss"].step)
        assert loss_steps == [0, 10, 20]
        for metric in ("test_loss", "test_accuracy"):
            assert sorted(run_level[run_level.metric == metric].step) == [0, 30]
        acc = run_level[run_level.metric == "test_accuracy"].value
        assert ((acc >= 0) & (acc <= 1)).all()
        for layer in ("layer1", "layer2", "layer3"):
            per = rows[rows.layer == layer]
            for metric in PER_LAYER:
                assert sorted(per[per.metric == metric].step) == [0, 10, 20], (layer, metric)
            p15, p50, p85 = (
                per[per.metric == m].sort_values("step").value.to_numpy()
                for m in ("preact_p15", "preact_p50", "preact_p85")
            )
            assert (p15 <= p50).all() and (p50 <= p85).all()
    assert np.isfinite(frame.value.to_numpy(dtype=float)).all()


def test_run_histograms_npz(cli):
    assert cli.result("run").returncode == 0
    with np.load(cli.tmp / "run" / "histograms.npz") as npz:
        keys = set(npz.files)
        edges = npz["preact/edges"]
        assert len(edges) == 61  # hist_bins 60
        for variant in ("plain", "batchnorm"):
            for layer in ("layer1", "layer2", "layer3"):
                steps = npz[f"preact/{variant}/{layer}/steps"]
                counts = npz[f"preact/{variant}/{layer}/counts"]
                assert steps.tolist() == [0, 10, 20]
                assert counts.shape == (3, 60)
                assert (counts.sum(1) == 300 * 100).all()  # probe batch x units
                assert f"postact/{variant}/{layer}/counts" in keys


def test_run_from_its_config_reproduces_the_metrics(cli, tmp_path, capsys):
    assert cli.result("run").returncode == 0
    config = cli.tmp / "run" / "config.json"
    code, _, err = run_main(["run", "--config", str(config), "--out", str(tmp_path)], capsys)
    assert code == 0, err
    first = (cli.tmp / "run" / "metrics.csv").read_bytes()
    again = (tmp_path / "metrics.csv").read_bytes()
    assert first == again
    assert config.read_text() == (tmp_path / "config.json").read_text()
    with (
        np.load(cli.tmp / "run" / "histograms.npz") as a,
        np.load(tmp_path / "histograms.npz") as b,
    ):
        assert set(a.files) == set(b.files)
        for key in a.files:
            assert np.array_equal(a[key], b[key]), key


def test_bad_flag_in_a_real_interpreter(cli):
    res = cli.result("bad")
    assert res.returncode == 2
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines() == [
        "python -m bn_core: error: steps = 'abc': allowed: an integer in [1, 10000000]"
    ]
    assert not (cli.tmp / "bad").exists()


def test_metrics_csv_reads_back_into_history_shape(cli):
    """The CSV is the tidy long table: one value per (step, variant, layer, metric)."""
    assert cli.result("run").returncode == 0
    text = (cli.tmp / "run" / "metrics.csv").read_text()
    frame = pd.read_csv(io.StringIO(text), keep_default_na=False)
    assert not frame.duplicated(["step", "variant", "layer", "metric"]).any()
