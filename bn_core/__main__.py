"""Command line: ``python -m bn_core presets | run | export | blowup``.

Every bad flag or config value exits with status 2 and one line that names the field,
the value and what is allowed; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, NoReturn

from bn_core.claims import ClaimBook, claims_json, load_claims
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

    export = sub.add_parser(
        "export", help="write every figure of a run (trained now, or a finished run directory)"
    )
    source = export.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a preset name (see `presets`)")
    source.add_argument("--config", type=Path, help="a config JSON file")
    source.add_argument("--run", type=Path, help="a directory written by `run`")
    export.add_argument("--steps", type=_scalar, help="override the config's steps")
    export.add_argument("--out", type=Path, required=True, help="output directory")
    export.add_argument(
        "--formats", default="png,svg,pdf,html,csv", help="comma-separated: png,svg,pdf,html,csv"
    )

    blowup = sub.add_parser(
        "blowup", help="the bias blow-up of Ioffe & Szegedy section 2, naive vs aware gradient"
    )
    blowup.add_argument("--steps", type=_scalar, default=200, help="gradient steps (1-1000000)")
    blowup.add_argument("--lr", type=_scalar, default=0.1, help="learning rate (1e-5 to 10)")
    blowup.add_argument("--scale", action="store_true", help="also divide by the std")
    blowup.add_argument("--out", type=Path, required=True, help="output directory")
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
        if getattr(args, k, None) is not None
    }
    return config.replace(**overrides) if overrides else config


def _train(config: RunConfig, claims: ClaimBook):
    """A finished Trainer, with a progress bar on stderr; ``claims`` are settled as the
    run passes their steps."""
    from tqdm import tqdm

    from bn_core.experiments import make_trainer

    trainer = make_trainer(config)
    with tqdm(total=config.steps, unit="step", file=sys.stderr, desc="training") as bar:
        while not trainer.finished:
            bar.update(trainer.advance(seconds=0.5))
            claims.results(trainer.history)
    for status in trainer.status:
        print(f"{status.name}: {status.label}", file=sys.stderr)
    return trainer


def _claims(args: argparse.Namespace) -> ClaimBook:
    """The preset's sentences about the outcome; a config file carries none."""
    return ClaimBook(load_claims(args.preset) if args.preset is not None else [])


def _run(args: argparse.Namespace) -> int:
    config = _load_config(args)
    claims = _claims(args)
    trainer = _train(config, claims)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(config.to_json() + "\n")
    trainer.history.to_csv(args.out / "metrics.csv")
    trainer.history.save_histograms_npz(args.out / "histograms.npz")
    events = [e.__dict__ for e in trainer.history.events]
    (args.out / "events.json").write_text(json.dumps(events, indent=2) + "\n")
    results = claims.results(trainer.history, final=True)
    (args.out / "claims.json").write_text(claims_json(results))
    print(f"wrote {args.out}/config.json, metrics.csv, histograms.npz, events.json, claims.json")
    for result in results:
        print(f"{result.mark} {result.sentence} [{result.measured_text()}]")
    return 0


def _export(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from bn_core import export

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    bad = [f for f in formats if f not in export.ALL_FORMATS]
    if bad or not formats:
        raise ConfigError("--formats", args.formats, "allowed: " + ",".join(export.ALL_FORMATS))
    if args.run is not None:
        if args.steps is not None:
            raise ConfigError("--steps", args.steps, "allowed only with --preset or --config")
        try:
            config, history = export.load_run_dir(args.run)
        except (OSError, ValueError, KeyError) as err:
            raise ConfigError(
                "--run", str(args.run), f"allowed: a directory written by `run` ({err})"
            ) from None
    else:
        config = _load_config(args)
        claims = _claims(args)
        history = _train(config, claims).history
    static = [f for f in formats if f in export.STATIC_FORMATS]
    available, why = export.static_export_available()
    if static and not available:
        print(f"python -m bn_core: note: {why} Writing the other formats.", file=sys.stderr)
    with tqdm(unit="file", file=sys.stderr, desc="exporting") as bar:

        def progress(done: int, total: int, label: str) -> None:
            bar.total = total
            bar.n = done
            bar.set_postfix_str(label[-40:])
            bar.refresh()

        results = claims.results(history, final=True) if args.run is None else []
        paths = export.write_export(
            history, config, args.out, formats, progress=progress, claims=results
        )
    print(f"wrote {len(paths)} files to {args.out}")
    return 0


def _blowup(args: argparse.Namespace) -> int:
    from bn_core.config import FieldSpec
    from bn_core.experiments.blowup import run_blowup_frame

    steps = FieldSpec(int, "steps", 1, 1_000_000).check("--steps", args.steps)
    lr = FieldSpec(float, "lr", 1e-5, 10.0).check("--lr", args.lr)
    frame = run_blowup_frame(steps=steps, lr=lr, scale=args.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(args.out / "metrics.csv", index=False)
    print(f"wrote {args.out}/metrics.csv")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "presets":
            for name, meta in list_presets().items():
                print(f"{name:18s} {meta['title']}")
            return 0
        command = {"run": _run, "export": _export, "blowup": _blowup}[args.command]
        return command(args)
    except (ConfigError, DatasetUnavailable) as err:
        print(f"python -m bn_core: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
