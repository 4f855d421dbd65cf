"""Start the real app (`streamlit run app.py`) on a free loopback port, for tests and benches."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Debian's Chromium: Playwright's own browser download is not available everywhere.
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str, timeout: float = 5) -> bool:
    """Whether Streamlit's health endpoint answers "ok"."""
    try:
        with urllib.request.urlopen(url + "/_stcore/health", timeout=timeout) as response:
            return response.read().decode().strip() == "ok"
    except OSError:
        return False


def inotify_watches(pid: int) -> int:
    """How many file-system watches the process holds (Linux; 0 where /proc has none)."""
    count = 0
    for info in Path(f"/proc/{pid}/fdinfo").glob("*"):
        try:
            count += sum(line.startswith("inotify wd:") for line in info.read_text().splitlines())
        except OSError:
            continue  # the descriptor closed while we looked
    return count


@dataclass(frozen=True)
class Server:
    url: str
    pid: int


@contextlib.contextmanager
def streamlit_server(
    log_path: Path, *, address: str | None = "127.0.0.1", start_timeout: float = 60
) -> Iterator[Server]:
    """Yields the server (URL and process id) once healthy; its output goes to ``log_path``.

    ``address=None`` leaves the listening address to .streamlit/config.toml.
    """
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "app.py")]
    cmd += ["--server.headless", "true", "--server.port", str(port)]
    cmd += ["--browser.gatherUsageStats", "false"]
    if address is not None:
        cmd += ["--server.address", address]
    env = {**os.environ, "BN_LAB_THREADS": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + start_timeout
            while not healthy(url):
                if proc.poll() is not None:
                    raise RuntimeError(f"streamlit exited; see {log_path}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"streamlit not healthy within {start_timeout:.0f} s")
                time.sleep(0.25)
            yield Server(url, proc.pid)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
