"""Concurrent sessions on one real server: isolation, throughput, health.

    python bench/sessions.py --sessions 8 --seconds 60 --json artifacts/sessions_8.json

Starts `streamlit run app.py` on loopback, opens N sessions in headless Chromium (one
browser context each, like N students' tabs), gives each its own link (its own seed,
learning rate and a variant named after the session), presses Play in all of them, and
lets them train for a while. It checks that every page shows only its own run, that the
server's health endpoint answered throughout, and reports total and per-session steps/s.
Exits 1 if a check fails.

In a classroom each browser runs on its own student's machine; here all N run on the
server's machine, and drawing N pages takes most of a small machine's CPU. --browser-nice
lowers the browsers' CPU priority (0, the default, leaves it alone). It does not simply
hand their share to the server: the pages ask for each tick, so a starved page also
trains less.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    ROOT,
    healthy,
    inotify_watches,
    streamlit_server,
)

STATUS_RE = re.compile(r"^step ([\d,]+) · .* · (cpu|cuda|mps) · (.*)$")
LR_CHOICES = (0.1, 0.2, 0.5, 1.0, 2.0)


def session_link(url: str, index: int) -> tuple[str, dict]:
    """A link with a set-up only this session has: seed, lr and a variant named s<index>."""
    mine = {"seed": 100 + index, "lr": LR_CHOICES[index % len(LR_CHOICES)], "name": f"s{index}"}
    query = f"?preset=ioffe-fig1&seed={mine['seed']}&lr={mine['lr']:g}"
    query += f"&variants=plain,{mine['name']}:batchnorm"
    return url + "/" + query, mine


def read_status(page) -> tuple[int, str]:
    text = page.get_by_text(re.compile(r"^step [\d,]+ ·")).first.inner_text()
    match = STATUS_RE.match(text)
    if match is None:
        raise AssertionError(f"unexpected status line {text!r}")
    return int(match.group(1).replace(",", "")), match.group(3)


def descendants(pid: int) -> list[int]:
    """Process ids of every process below ``pid`` (Linux: read from /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # it ended while we looked
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        below = children.get(todo.pop(), [])
        found += below
        todo += below
    return found


def lower_browser_priority(nice: int) -> None:
    """Give this process's Chromium processes the priority ``nice`` (and nothing else: a
    test run may have other children, such as tests/conftest.py's long run)."""
    for pid in descendants(os.getpid()):
        with contextlib.suppress(OSError):  # it ended, or is not ours to change
            # /usr/bin/chromium is a script that starts /usr/lib/chromium/chromium.
            if "chrom" in Path(os.readlink(f"/proc/{pid}/exe")).name:
                os.setpriority(os.PRIO_PROCESS, pid, nice)


def run_sessions(sessions: int, seconds: float, log_path: Path, browser_nice: int = 0) -> dict:
    from playwright.sync_api import sync_playwright

    result: dict = {
        "sessions": sessions,
        "seconds": seconds,
        "browser_nice": browser_nice,
        "failures": [],
    }
    with streamlit_server(log_path) as server:
        url = server.url
        health = {"checks": 0, "failed": 0}
        stop = threading.Event()

        def poll_health() -> None:
            while not stop.is_set():
                health["checks"] += 1
                if not healthy(url, timeout=10):
                    health["failed"] += 1
                stop.wait(0.5)

        poller = threading.Thread(target=poll_health, daemon=True)
        poller.start()
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            pages, mine = [], []
            for i in range(sessions):
                page = browser.new_context(viewport={"width": 1200, "height": 900}).new_page()
                page.set_default_timeout(120_000)
                link, own = session_link(url, i)
                page.goto(link)
                page.get_by_role("button", name=re.compile(r"\bPlay$")).wait_for()
                pages.append(page)
                mine.append(own)
            if browser_nice:  # once every page has its renderer (Chromium sets its priority)
                lower_browser_priority(browser_nice)
            start_steps = [read_status(page)[0] for page in pages]
            for page in pages:
                page.get_by_role("button", name=re.compile(r"\bPlay$")).click()
            started = time.monotonic()
            time.sleep(seconds)
            for page in pages:
                page.get_by_role("button", name=re.compile(r"\bPause$")).click()
            elapsed = time.monotonic() - started
            time.sleep(2)  # let the last tick land
            per_session = []
            for i, (page, own) in enumerate(zip(pages, mine, strict=True)):
                step, states = read_status(page)
                names = re.findall(r"(\w[\w.\-]*): ", states)
                seed = page.get_by_label("Seed").input_value()
                rate = (step - start_steps[i]) / elapsed
                per_session.append(
                    {"session": i, "steps": step, "steps_per_s": round(rate, 1), "variants": names}
                )
                if names != ["plain", own["name"]]:
                    result["failures"].append(f"session {i} shows variants {names}")
                if int(seed) != own["seed"]:
                    result["failures"].append(f"session {i} shows seed {seed}")
                if f"seed={own['seed']}" not in page.url:
                    result["failures"].append(f"session {i} has the link {page.url}")
                if step <= start_steps[i]:
                    result["failures"].append(f"session {i} did not train")
            browser.close()
        stop.set()
        poller.join()
        result["health_checks"] = health["checks"]
        result["health_failures"] = health["failed"]
        if health["failed"]:
            result["failures"].append(f"health endpoint failed {health['failed']} times")
        if not healthy(url):
            result["failures"].append("server not healthy after the sessions")
        # Watching source files for changes means watching .venv too, which is inside the
        # app's folder: tens of thousands of watches that swamped the server under load.
        result["server_inotify_watches"] = inotify_watches(server.pid)
    result["per_session"] = per_session
    rates = [s["steps_per_s"] for s in per_session]
    result["total_steps_per_s"] = round(sum(rates), 1)
    result["min_session_steps_per_s"] = min(rates)
    result["max_session_steps_per_s"] = max(rates)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--browser-nice", type=int, default=0, help="0 (as is) to 19 (lowest)")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 32 or args.seconds <= 0:
        parser.error("--sessions must be in [1, 32] and --seconds > 0")
    if not 0 <= args.browser_nice <= 19:
        parser.error(f"--browser-nice must be in [0, 19], got {args.browser_nice}")
    log = ROOT / "artifacts" / f"streamlit_sessions_{args.sessions}.log"
    log.parent.mkdir(exist_ok=True)
    result = run_sessions(args.sessions, args.seconds, log, args.browser_nice)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_session"}, indent=2))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
