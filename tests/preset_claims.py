"""Train every preset on seeds 0, 1 and 2 up to the last step its claims are about, and
write each claim's result as JSON. tests/conftest.py starts it in a separate process when
tests/test_claims.py is collected, so these 24 real runs share the machine's second core
with the rest of the suite instead of adding to its length.

    python tests/preset_claims.py --json FILE [--presets a,b] [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bn_core.claims import ClaimBook, load_claims  # noqa: E402
from bn_core.config import list_presets, load_preset  # noqa: E402
from bn_core.experiments import make_trainer  # noqa: E402

SEEDS = (0, 1, 2)


def preset_results(preset: str, seed: int) -> list[dict]:
    """The preset's claims checked on its own run with ``seed``."""
    book = ClaimBook(load_claims(preset))
    steps = max(claim.at for claim in book.claims)
    trainer = make_trainer(load_preset(preset).replace(seed=seed, steps=steps, device="cpu"))
    trainer.advance(steps=steps)
    assert trainer.finished
    return [
        {**r.to_dict(), "otherwise": r.claim.otherwise, "mark": r.mark}
        for r in book.results(trainer.history, final=True)
    ]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", required=True, type=Path)
    parser.add_argument("--presets", default=",".join(list_presets()))
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    args = parser.parse_args()
    torch.set_num_threads(1)  # as the suite and the app: the machine's cores are shared
    out = {
        preset: {seed: preset_results(preset, int(seed)) for seed in args.seeds.split(",")}
        for preset in args.presets.split(",")
    }
    args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
