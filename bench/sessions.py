"""Concurrent sessions on one real server: isolation, throughput, health.

    python bench/sessions.py --sessions 8 --seconds 60 --json artifacts/sessions_8.json

Starts `streamlit run app.py` on loopback, opens N sessions in headless Chromium (one
browser context each, like N students' tabs), gives each its own link (its own seed,
learning rate and a variant named after the session), presses Play in all of them, and
lets them train for a while. It checks that every page shows only its own run, that the
server's health endpoint answered throughout, and reports total and per-session steps/s.
Exits 1 if a check fails.

In a classroom each browser runs on its own student's machine; here all N run on the
server's machine, and drawing N pages takes most of a small machine's CPU. (Lowering the
browsers' priority does not isolate the server: the pages ask for each tick, so a
starved page trains less too.)
"""

from __future__ import annotations

import argparse
import json
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


def run_sessions(sessions: int, seconds: float, log_path: Path) -> dict:
    from playwright.sync_api import sync_playwright

    result: dict = {"sessions": sessions, "seconds": seconds, "failures": []}
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
                seed = page.get_by_label("Seed", exact=True).input_value()
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
        # app's folder: thousands of watches (4,310), which swamped the server under load.
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
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    if not 1 <= args.sessions <= 32 or args.seconds <= 0:
        parser.error("--sessions must be in [1, 32] and --seconds > 0")
    log = ROOT / "artifacts" / f"streamlit_sessions_{args.sessions}.log"
    log.parent.mkdir(exist_ok=True)
    result = run_sessions(args.sessions, args.seconds, log)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "per_session"}, indent=2))
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
