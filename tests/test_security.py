"""What the app promises in the README's Security section, checked.

Listens on loopback only by default; XSRF protection on; uploads are size-limited JSON that
is never unpickled or evaluated; exported file names are sanitized; no torch.load.
"""

from __future__ import annotations

import ast
import pickle
import socket
import tomllib
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from bench.serve import ROOT, healthy, streamlit_server
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


def test_an_uploaded_pickle_is_refused_and_never_run(tmp_path):
    """A pickle whose loading would write a file: the upload path reads JSON only."""
    from bn_core.config import ConfigError, RunConfig

    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    payload = pickle.dumps(Exploit())
    with pytest.raises(ConfigError, match=r"config = '<file>': allowed: a JSON object"):
        RunConfig.from_json(payload)
    assert not marker.exists()


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


# --- the real server ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def local_server(artifacts_dir):
    """The server as `scripts/run.sh` starts it: the address comes from config.toml."""
    with streamlit_server(artifacts_dir / "streamlit_server_security.log", address=None) as server:
        yield server.url


def _this_machines_other_addresses() -> list[str]:
    """IPv4 addresses of this machine that are not loopback (from the routing table)."""
    found = set()
    for family, _, _, _, sockaddr in socket.getaddrinfo(socket.gethostname(), None):
        if family == socket.AF_INET and not sockaddr[0].startswith("127."):
            found.add(sockaddr[0])
    try:  # the address of the default route, found without sending anything
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))
            if not s.getsockname()[0].startswith("127."):
                found.add(s.getsockname()[0])
    except OSError:
        pass
    return sorted(found)


def test_the_server_answers_on_loopback_only(local_server):
    assert healthy(local_server)
    port = int(local_server.rsplit(":", 1)[1])
    others = _this_machines_other_addresses()
    if not others:
        pytest.skip("this machine has no address besides loopback")
    for address in others:
        with socket.socket() as s:
            s.settimeout(3)
            assert s.connect_ex((address, port)) != 0, f"reachable on {address}:{port}"


def _put(url: str, headers: dict[str, str]) -> int:
    request = urllib.request.Request(url, data=b"{}", method="PUT", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def test_uploads_need_the_pages_xsrf_token(local_server):
    target = f"{local_server}/_stcore/upload_file/some-session/some-file"
    assert _put(target, {}) == 403
    assert _put(target, {"X-Xsrftoken": "forged"}) == 403
    # With the token the page gets, the request passes the XSRF check and is refused
    # only for its made-up session (400): the 403 above was the XSRF protection.
    with urllib.request.urlopen(local_server + "/_stcore/health", timeout=10) as response:
        cookies = response.headers.get_all("Set-Cookie") or []
    (cookie,) = [c.split(";")[0] for c in cookies if c.startswith("_streamlit_xsrf=")]
    token = cookie.split("=", 1)[1].strip('"')
    assert _put(target, {"X-Xsrftoken": token, "Cookie": cookie}) == 400
