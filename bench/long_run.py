"""A long headless run: the history stays within its bound and the process stays flat.

    python bench/long_run.py --steps 1000000 --json artifacts/long_run.json

Trains a small two-variant run (plain and batchnorm) through the bn_core API with the
default telemetry cadence (probes every 10 steps, test evaluation every 100), samples the
process's resident memory (RSS) and the history's size along the way, and exits 1 if the
history outgrows its bound or RSS grows by more than ``--max-growth-mb`` after warm-up.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bn_core.config import RunConfig  # noqa: E402
from bn_core.experiments import make_trainer  # noqa: E402


def rss_bytes() -> int:
    """Resident set size of this process now (Linux /proc; ru_maxrss elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def long_run(steps: int, warmup: int, samples: int) -> dict:
    torch.set_num_threads(1)
    # A small net keeps a million steps to minutes; the history and telemetry are the
    # same as for any run (every hidden layer and variant, default cadences and bounds).
    config = RunConfig(
        dataset="blobs",
        depth=2,
        width=8,
        batch_size=16,
        probe_size=32,
        steps=steps,
        variants=["plain", "batchnorm"],
    )
    trainer = make_trainer(config)
    start = time.perf_counter()
    trainer.advance(steps=min(warmup, steps))
    rss_warm = rss_bytes()
    every = max(1, (steps - trainer.step) // samples)
    trace = []
    while not trainer.finished:
        trainer.advance(steps=every)
        trace.append(
            {
                "step": trainer.step,
                "rss_mb": rss_bytes() / 2**20,
                "history_mb": trainer.history.nbytes() / 2**20,
            }
        )
    elapsed = time.perf_counter() - start
    history = trainer.history
    return {
        "steps": trainer.step,
        "seconds": elapsed,
        "steps_per_s": trainer.step / elapsed,
        "rss_warm_mb": rss_warm / 2**20,
        "rss_growth_mb": max(t["rss_mb"] for t in trace) - rss_warm / 2**20,
        "history_mb": history.nbytes() / 2**20,
        "history_bound_mb": history.bound_nbytes() / 2**20,
        "series_points_max": max(
            len(history.series(v, layer, m)[0])
            for v in history.variants()
            for layer in ["", *history.layers()]
            for m in history.metrics()
        ),
        "max_points": history.max_points,
        "stride": history.stride,
        "trace": trace,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1_000_000)
    parser.add_argument("--warmup", type=int, default=50_000, help="steps before the RSS baseline")
    parser.add_argument("--samples", type=int, default=20, help="RSS samples after warm-up")
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.samples < 1:
        parser.error("--steps and --samples must be >= 1, --warmup >= 0")
    result = long_run(args.steps, args.warmup, args.samples)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"{result['steps']:,} steps in {result['seconds']:.0f} s "
        f"({result['steps_per_s']:,.0f} steps/s); history {result['history_mb']:.2f} MB "
        f"(bound {result['history_bound_mb']:.2f} MB, at most {result['series_points_max']} "
        f"points per series); RSS {result['rss_warm_mb']:.0f} MB after warm-up, "
        f"growth {result['rss_growth_mb']:+.1f} MB"
    )
    ok = (
        result["history_mb"] <= result["history_bound_mb"]
        and result["rss_growth_mb"] <= args.max_growth_mb
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
