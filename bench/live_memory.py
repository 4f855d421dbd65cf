"""Memory of a long live run: server RSS and the browser tab's JS heap, sampled over time.

    python bench/live_memory.py --minutes 10 --json artifacts/live_memory.json

Starts the real server, opens the Live training page in headless Chromium with a run
long enough to train through the whole window (``--steps``, set through the page's link
parameters; the preset's 50,000 steps end within 10 minutes), presses Play
and samples every ``--every`` seconds: the server process's resident memory (from /proc)
and the page's used JS heap (Chromium's performance.memory, after a garbage collection
through the DevTools protocol). Reports the growth after a warm-up minute. Exits 1 if
either grows by more than ``--max-growth-mb``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.serve import CHROMIUM, CHROMIUM_ARGS, ROOT, streamlit_server  # noqa: E402
from bn_core.config import FIELDS  # noqa: E402


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def measure(minutes: float, every: float, warmup: float, steps: int, log_path: Path) -> dict:
    from playwright.sync_api import sync_playwright

    samples = []
    with streamlit_server(log_path) as server, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1400, "height": 1000}).new_page()
        page.set_default_timeout(120_000)
        cdp = page.context.new_cdp_session(page)
        page.goto(f"{server.url}?steps={steps}")
        page.get_by_role("button", name=re.compile(r"\bPlay$")).click()
        start = time.monotonic()
        while time.monotonic() - start < minutes * 60:
            time.sleep(every)
            cdp.send("HeapProfiler.collectGarbage")
            heap = page.evaluate("performance.memory.usedJSHeapSize") / 2**20
            status = page.get_by_text(re.compile(r"^step [\d,]+ ·")).first.inner_text()
            step = int(status.split()[1].replace(",", ""))
            samples.append(
                {
                    "t_s": round(time.monotonic() - start),
                    "step": step,
                    "server_rss_mb": round(rss_mb(server.pid), 1),
                    "page_heap_mb": round(heap, 1),
                }
            )
            print(samples[-1], flush=True)
        browser.close()
    after = [s for s in samples if s["t_s"] >= warmup] or samples
    base = after[0]
    return {
        "minutes": minutes,
        "steps": samples[-1]["step"],
        "server_rss_start_mb": base["server_rss_mb"],
        "server_rss_growth_mb": round(
            max(s["server_rss_mb"] for s in after) - base["server_rss_mb"], 1
        ),
        "server_rss_band_mb": round(
            max(s["server_rss_mb"] for s in after) - min(s["server_rss_mb"] for s in after), 1
        ),
        "page_heap_start_mb": base["page_heap_mb"],
        "page_heap_growth_mb": round(
            max(s["page_heap_mb"] for s in after) - base["page_heap_mb"], 1
        ),
        "samples": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--every", type=float, default=20.0, help="seconds between samples")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds before the baseline")
    parser.add_argument("--steps", type=int, default=1_000_000, help="length of the run")
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args(argv)
    # The page ignores an out-of-range link parameter (with a warning) and would then run
    # the preset's 50,000 steps, finishing inside the window.
    allowed = FIELDS["steps"]
    if not allowed.low <= args.steps <= allowed.high:
        parser.error(f"--steps {args.steps}: allowed {allowed.low} to {allowed.high:,}")
    log = ROOT / "artifacts" / "streamlit_live_memory.log"
    log.parent.mkdir(exist_ok=True)
    result = measure(args.minutes, args.every, args.warmup, args.steps, log)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=2))
    grew = max(result["server_rss_growth_mb"], result["page_heap_growth_mb"])
    return 1 if grew > args.max_growth_mb else 0


if __name__ == "__main__":
    sys.exit(main())
