"""Command line: ``python -m bn_core presets | run``.

Every bad flag or config value exits with status 2 and one line that names the field,
the value and what is allowed; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from bn_core.config import ConfigError, RunConfig, list_presets, load_preset
from bn_core.data import DatasetUnavailable


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _scalar(text: str) -> Any:
    """A flag's text as int, float or str, so RunConfig reports a wrong type itself."""
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return text


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m bn_core", description="BatchNorm Lab's training core.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("presets", help="list the presets in assets/presets/")
    run = sub.add_parser("run", help="train a run and write its config, metrics and histograms")
    source = run.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a preset name (see `presets`)")
    source.add_argument("--config", type=Path, help="a config JSON file")
    for flag in ("steps", "device", "seed", "dataset"):
        run.add_argument(f"--{flag}", type=_scalar, help=f"override the config's {flag}")
    run.add_argument("--out", type=Path, required=True, help="output directory")
    return parser


def _load_config(args: argparse.Namespace) -> RunConfig:
    if args.preset is not None:
        config = load_preset(args.preset)
    else:
        try:
            text = args.config.read_bytes()
        except OSError as err:
            raise ConfigError(
                "--config", str(args.config), f"allowed: a readable file ({err.strerror})"
            ) from None
        config = RunConfig.from_json(text)
    overrides = {
        k: getattr(args, k)
        for k in ("steps", "device", "seed", "dataset")
        if getattr(args, k) is not None
    }
    return config.replace(**overrides) if overrides else config


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bn_core.train import Trainer

    config = _load_config(args)
    trainer = Trainer(config)
    args.out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=config.steps, unit="step", file=sys.stderr, desc="training") as bar:
        while not trainer.finished:
            bar.update(trainer.advance(seconds=0.5))
    for status in trainer.status:
        print(f"{status.name}: {status.label}", file=sys.stderr)
    (args.out / "config.json").write_text(config.to_json() + "\n")
    trainer.history.to_csv(args.out / "metrics.csv")
    trainer.history.save_histograms_npz(args.out / "histograms.npz")
    events = [e.__dict__ for e in trainer.history.events]
    (args.out / "events.json").write_text(json.dumps(events, indent=2) + "\n")
    print(f"wrote {args.out}/config.json, metrics.csv, histograms.npz, events.json")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "presets":
            for name, meta in list_presets().items():
                print(f"{name:18s} {meta['title']}")
            return 0
        return _run(args)
    except (ConfigError, DatasetUnavailable) as err:
        print(f"python -m bn_core: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
