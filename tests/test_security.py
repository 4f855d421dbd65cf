"""What the app promises in the README's Security section, checked.

Listens on loopback only by default; XSRF protection on; uploads are size-limited JSON that
is never unpickled or evaluated; exported file names are sanitized; no torch.load.
"""

from __future__ import annotations

import ast
import tomllib

import pytest

from bench.serve import ROOT
from bn_core import export
from ui.charts import chart_filename

SOURCES = [
    p
    for folder in ("bn_core", "ui", "pages", "bench", "scripts")
    for p in (ROOT / folder).rglob("*.py")
] + [ROOT / "app.py"]


def test_the_project_config_keeps_the_server_local_and_protected():
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    server = config["server"]
    assert server["address"] == "localhost"
    assert server["enableXsrfProtection"] is True
    assert server["enableCORS"] is True
    assert server["maxUploadSize"] <= 1
    # The run script passes the user's flags through but sets no address of its own.
    assert "server.address" not in (ROOT / "scripts" / "run.sh").read_text()


def test_no_torch_load_pickle_eval_or_exec_in_the_product():
    for path in SOURCES:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                func = node.func
                name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
                owner = getattr(getattr(func, "value", None), "id", "")
                # The builtins (model.eval() is a module's evaluation mode, not eval).
                bare = isinstance(func, ast.Name)
                assert not (bare and name in ("eval", "exec")), f"{path}:{node.lineno}"
                if name == "load" and owner == "torch":
                    keywords = {k.arg: k.value for k in node.keywords}
                    ok = isinstance(keywords.get("weights_only"), ast.Constant)
                    assert ok and keywords["weights_only"].value is True, f"{path}:{node.lineno}"
            if isinstance(node, ast.Import | ast.ImportFrom):
                names = [a.name for a in node.names] + [getattr(node, "module", "") or ""]
                assert not {"pickle", "marshal", "shelve", "dill"} & set(names), path


@pytest.mark.parametrize(
    "hostile",
    ["../../etc/passwd", "a/b\\c", "name with spaces", "x\x00y", "ñ数据", "..", "CON:"],
)
def test_export_file_names_keep_only_safe_characters(hostile):
    for name in (
        export.figure_filename("live", hostile, [hostile, "plain"], 12),
        chart_filename(hostile, hostile, None),
    ):
        assert "/" not in name and "\\" not in name and "\x00" not in name and ":" not in name
        assert all(c.isascii() and (c.isalnum() or c in "_.-") for c in name), name
        assert not name.startswith(".")
