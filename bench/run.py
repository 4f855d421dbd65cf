"""Benchmarks of bn_core against torch's own layers, as ratios ours / reference.

    python bench/run.py --json FILE [--quick] [--only NAME,...] [--threads N]

Absolute times on a shared machine are noise, so every timing benchmark runs both sides
in one process, alternating them round by round, and reports the ratio of the medians.
A benchmark is a function decorated with ``@benchmark(name, target)`` that takes a
``Config`` and returns a dict with ``ours_s``, ``reference_s`` and ``note`` (optionally
``ratio`` and any extra JSON-able keys); the ratio must be <= target. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from bn_core import BatchNorm  # noqa: E402

# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class Config:
    quick: bool = False
    threads: int = 1
    seed: int = 0

    def pick(self, quick, full):
        """The quick or the full setting (rounds, repetitions, sizes)."""
        return quick if self.quick else full


@dataclass(frozen=True)
class Benchmark:
    name: str
    target: float
    fn: Callable[[Config], dict]


REGISTRY: dict[str, Benchmark] = {}


def benchmark(name: str, target: float):
    """Register ``fn(config) -> dict`` under ``name``; its ratio must come out <= target."""

    def register(fn: Callable[[Config], dict]) -> Callable[[Config], dict]:
        if name in REGISTRY:
            raise ValueError(f"benchmark {name!r} is registered twice")
        REGISTRY[name] = Benchmark(name, target, fn)
        return fn

    return register


@dataclass(frozen=True)
class Timing:
    ours_s: float  # median seconds per call
    reference_s: float
    round_ratio: float  # median over rounds of ours / reference within the round


def interleaved(
    ours: Callable[[], object],
    reference: Callable[[], object],
    rounds: int,
    repeat: int,
    warmup: int = 3,
) -> Timing:
    """Median seconds per call of each side, timed in alternating rounds.

    Each round times ``repeat`` back-to-back calls of one side, then of the other; the
    side that goes first alternates so neither always runs on a warmer cache. The
    garbage collector is off while timing so a collection lands on neither side.
    """
    for _ in range(warmup):
        ours()
        reference()
    samples: dict[str, list[float]] = {"ours": [], "reference": []}
    sides = [("ours", ours), ("reference", reference)]
    gc_was_enabled = gc.isenabled()
    try:
        for r in range(rounds):
            gc.collect()
            gc.disable()
            for label, fn in sides if r % 2 == 0 else sides[::-1]:
                t0 = time.perf_counter()
                for _ in range(repeat):
                    fn()
                samples[label].append((time.perf_counter() - t0) / repeat)
            if gc_was_enabled:
                gc.enable()
    finally:
        if gc_was_enabled:
            gc.enable()
    pairs = zip(samples["ours"], samples["reference"], strict=True)
    return Timing(
        ours_s=statistics.median(samples["ours"]),
        reference_s=statistics.median(samples["reference"]),
        round_ratio=statistics.median(o / r for o, r in pairs),
    )


def run(names: list[str], config: Config) -> dict[str, dict]:
    results = {}
    for name in names:
        bench = REGISTRY[name]
        torch.manual_seed(config.seed)
        out = dict(bench.fn(config))
        ratio = out.pop("ratio", None)
        if ratio is None:
            ratio = out["ours_s"] / out["reference_s"]
        results[name] = {
            "ratio": ratio,
            "target": bench.target,
            "ours_s": out.pop("ours_s", None),
            "reference_s": out.pop("reference_s", None),
            "note": out.pop("note", ""),
            "threads": config.threads,
            **out,
        }
    return results


def _fmt(r: dict, side: str) -> str:
    """A side's time per call, or its bytes for memory benchmarks."""
    if r.get(f"{side}_s") is not None:
        return f"{r[f'{side}_s'] * 1e6:.1f} us"
    if r.get(f"{side}_bytes") is not None:
        return f"{r[f'{side}_bytes'] / 2**20:.2f} MiB"
    return "-"


def print_table(results: dict[str, dict], config: Config) -> None:
    mode = "quick" if config.quick else "full"
    print(f"torch {torch.__version__}, {config.threads} thread(s), {mode} run")
    head = f"{'benchmark':<16} {'ours':>13} {'reference':>13} {'ratio':>7} {'target':>7}  ok"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        ok = "yes" if r["ratio"] <= r["target"] else "NO"
        print(
            f"{name:<16} {_fmt(r, 'ours'):>13} {_fmt(r, 'reference'):>13} "
            f"{r['ratio']:7.3f} {r['target']:7.2f}  {ok}"
        )
        if r["note"]:
            print(f"    {r['note']}")


# --------------------------------------------------------------------------- models


def _bn_pair(ours: bool) -> tuple[Callable[[int], nn.Module], Callable[[int], nn.Module]]:
    """(1-d factory, 2-d factory) for our layer or torch's."""
    if ours:
        return BatchNorm, BatchNorm
    return nn.BatchNorm1d, nn.BatchNorm2d


def mnist_mlp(ours: bool) -> nn.Module:
    """Ioffe & Szegedy's MNIST net: 784-100-100-100-10, sigmoid, BN before each sigmoid.

    BN's beta replaces the linear bias, so the hidden linears have none.
    """
    bn1d, _ = _bn_pair(ours)
    layers: list[nn.Module] = [nn.Flatten()]
    width = 784
    for _ in range(3):
        layers += [nn.Linear(width, 100, bias=False), bn1d(100), nn.Sigmoid()]
        width = 100
    layers.append(nn.Linear(width, 10))
    return nn.Sequential(*layers)


def lenet(ours: bool) -> nn.Module:
    """LeNet-style net on 28x28 with BN before each sigmoid."""
    bn1d, bn2d = _bn_pair(ours)
    return nn.Sequential(
        nn.Conv2d(1, 6, 5, padding=2),
        bn2d(6),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Conv2d(6, 16, 5),
        bn2d(16),
        nn.Sigmoid(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(400, 120),
        bn1d(120),
        nn.Sigmoid(),
        nn.Linear(120, 84),
        bn1d(84),
        nn.Sigmoid(),
        nn.Linear(84, 10),
    )


def twin_models(build: Callable[[bool], nn.Module]) -> tuple[nn.Module, nn.Module]:
    """(ours, reference) with identical initial weights; also checks state_dict parity."""
    reference = build(False)
    ours = build(True)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours, reference


# --------------------------------------------------------------------------- benchmarks


@benchmark("bn_step", target=1.35)
def bn_step(config: Config) -> dict:
    """One SGD training step of the BN MNIST MLP at batch 60, ours vs nn.BatchNorm1d."""
    batch, n_batches = 60, 8
    g = torch.Generator().manual_seed(config.seed)
    xs = [torch.rand(batch, 1, 28, 28, generator=g) for _ in range(n_batches)]
    ys = [torch.randint(0, 10, (batch,), generator=g) for _ in range(n_batches)]

    def stepper(model: nn.Module) -> Callable[[], None]:
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        model.train()
        it = [0]

        def step() -> None:
            i = it[0] = (it[0] + 1) % n_batches
            opt.zero_grad()
            loss = F.cross_entropy(model(xs[i]), ys[i])
            loss.backward()
            opt.step()

        return step

    ours, reference = twin_models(mnist_mlp)
    rounds, repeat = config.pick((21, 20), (61, 50))
    t = interleaved(stepper(ours), stepper(reference), rounds, repeat, warmup=20)
    return {
        "ours_s": t.ours_s,
        "reference_s": t.reference_s,
        "round_ratio": t.round_ratio,
        "rounds": rounds,
        "repeat": repeat,
        "note": (
            f"median s/step over {rounds} alternating rounds of {repeat} steps; "
            f"median per-round ratio {t.round_ratio:.3f}"
        ),
    }


@contextlib.contextmanager
def _quiet_stderr():
    """Silence file descriptor 2: the profiler's C++ side logs its start and stop there."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_bytes(prof: torch.profiler.profile) -> int:
    """Peak of the running sum of allocation sizes (frees are negative), in time order.

    Reads the raw event list: prof.events() folds allocations made inside an op into
    that op's totals, which loses the order of allocations and frees.
    """
    events = [
        (e.start_ns(), e.nbytes())
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    events.sort(key=lambda t: t[0])
    peak = total = 0
    for _, nbytes in events:
        total += nbytes
        peak = max(peak, total)
    return peak


def _saved_bytes(step: Callable[[], None]) -> int:
    """Bytes of the distinct storages autograd saves for backward during ``step``."""
    seen: dict[tuple[int, str], int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        seen[(s.data_ptr(), str(t.device))] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


@benchmark("bn_memory", target=1.05)
def bn_memory(config: Config) -> dict:
    """Peak memory of one forward+backward of the BN LeNet at batch 256."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    g = torch.Generator().manual_seed(config.seed)
    x = torch.rand(256, 1, 28, 28, generator=g).to(device)
    y = torch.randint(0, 10, (256,), generator=g).to(device)
    ours, reference = (m.to(device).train() for m in twin_models(lenet))

    def fwd_bwd(model: nn.Module) -> Callable[[], None]:
        def step() -> None:
            F.cross_entropy(model(x), y).backward()

        return step

    def peak(model: nn.Module) -> int:
        step = fwd_bwd(model)
        model.zero_grad(set_to_none=True)  # grads are allocated inside the measurement
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        with (
            _quiet_stderr(),
            torch.profiler.profile(
                activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True
            ) as prof,
        ):
            step()
        return _cpu_peak_bytes(prof)

    for model in (ours, reference):  # warm-up: lazy initialisation stays out of the peak
        fwd_bwd(model)()
    repeats = config.pick(1, 3)
    peaks: dict[str, list[int]] = {"ours": [], "reference": []}
    for _ in range(repeats):
        peaks["ours"].append(peak(ours))
        peaks["reference"].append(peak(reference))
    ours_peak = statistics.median(peaks["ours"])
    ref_peak = statistics.median(peaks["reference"])
    saved_ours = _saved_bytes(fwd_bwd(ours))
    saved_ref = _saved_bytes(fwd_bwd(reference))
    how = "cuda.max_memory_allocated" if cuda else "profiler memory events"
    return {
        "ratio": ours_peak / ref_peak,
        "ours_bytes": ours_peak,
        "reference_bytes": ref_peak,
        "peak_method": how,
        "saved_ours_bytes": saved_ours,
        "saved_reference_bytes": saved_ref,
        "note": (
            f"peak of one forward+backward ({how}); saved for backward "
            f"{saved_ours / 2**20:.2f} MiB vs {saved_ref / 2**20:.2f} MiB"
        ),
    }


# --------------------------------------------------------------------------- CLI


# --------------------------------------------------------------------------- training core


def _fig1_config(**changes):
    from bn_core.config import load_preset

    # Endless unless a benchmark names its own length.
    return load_preset("ioffe-fig1").replace(**{"steps": 10_000_000, **changes})


def _random_dataset(n_train: int, n_test: int, dim: int, seed: int):
    """MNIST-sized random data: timing needs the shapes, not the digits."""
    from bn_core.data import Dataset

    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n_train + n_test, dim, generator=gen)
    y = torch.randint(0, 10, (n_train + n_test,), generator=gen)
    return Dataset(
        name="random-784",
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_test=x[n_train:],
        y_test=y[n_train:],
        x_probe=x[:300].clone(),
        num_classes=10,
        image_shape=(28, 28),
        description="random MNIST-sized data for timing",
    )


def _advance(trainer, steps: int):
    """One timed round: ``steps`` steps of ``trainer``."""
    return lambda: trainer.advance(steps=steps)


@benchmark("telemetry_overhead", target=1.25)
def telemetry_overhead(config: Config) -> dict:
    """ioffe-fig1 (plain + batchnorm) with telemetry every 10 steps vs no probes at all."""
    from bn_core.train import Trainer

    measured = Trainer(_fig1_config())
    bare = Trainer(_fig1_config(telemetry_every=100_000, eval_every=1_000_000))
    chunk = 100  # a multiple of both cadences, so every round does the same work
    # Rounds run from step 50 to 150 and so on: the evaluation due every 100 steps falls
    # mid-round, as it does in a long run, not on the last step, where the round would wait
    # for all of it.
    measured.advance(steps=chunk // 2)
    rounds = config.pick(9, 31)
    timing = interleaved(_advance(measured, chunk), _advance(bare, chunk), rounds, 1, 2)
    ours, ref = timing.ours_s, timing.reference_s
    return {
        "ours_s": ours / chunk,
        "reference_s": ref / chunk,
        "note": f"s/step, digits; probes every 10, test eval every 100; {rounds} rounds "
        f"of {chunk} steps",
    }


def _lockstep_against_bn_alone(config: Config, variants: list[str]) -> dict:
    """``variants`` in lockstep vs batchnorm alone, the same telemetry on both sides."""
    from bn_core.train import Trainer

    lockstep = Trainer(_fig1_config(variants=variants))
    alone = Trainer(_fig1_config(variants=["batchnorm"]))
    chunk = 100
    for trainer in (lockstep, alone):  # evaluations mid-round, as in telemetry_overhead
        trainer.advance(steps=chunk // 2)
    rounds = config.pick(9, 31)
    timing = interleaved(_advance(lockstep, chunk), _advance(alone, chunk), rounds, 1, 2)
    return {
        "ours_s": timing.ours_s / chunk,
        "reference_s": timing.reference_s / chunk,
        "note": f"s/step, digits, telemetry every 10; {rounds} rounds of {chunk} steps",
    }


@benchmark("lockstep_pair", target=1.3)
def lockstep_pair(config: Config) -> dict:
    """plain + batchnorm in lockstep vs batchnorm alone (same telemetry on both sides)."""
    return _lockstep_against_bn_alone(config, ["plain", "batchnorm"])


@benchmark("normalizers_5", target=2.5)
def normalizers_5(config: Config) -> dict:
    """plain, batchnorm, layernorm, groupnorm and rmsnorm in lockstep vs batchnorm alone
    (same telemetry on both sides)."""
    return _lockstep_against_bn_alone(
        config, ["plain", "batchnorm", "layernorm", "groupnorm", "rmsnorm"]
    )


def _bare_fig1_nets(seed: int, input_dim: int = 784):
    """The two Fig. 1 nets as a hand-written PyTorch loop would build them."""

    def net(bn: bool) -> nn.Sequential:
        torch.manual_seed(seed)
        layers: list[nn.Module] = []
        width_in = input_dim
        for _ in range(3):
            layers += [nn.Linear(width_in, 100, bias=not bn)]
            layers += [nn.BatchNorm1d(100)] if bn else []
            layers += [nn.Sigmoid()]
            width_in = 100
        layers.append(nn.Linear(100, 10))
        for m in layers:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.1)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        return nn.Sequential(*layers)

    nets = [net(False), net(True)]
    opts = [torch.optim.SGD(n.parameters(), lr=0.5) for n in nets]
    return nets, opts


@benchmark("live_digits", target=1.5)
def live_digits(config: Config) -> dict:
    """The live page's default run: the Trainer on ioffe-fig1 (digits, plain + batchnorm,
    telemetry every 10, test every 100) vs a hand-written torch.nn loop training the same
    two nets with nn.BatchNorm1d and no telemetry."""
    from bn_core.data import load_dataset
    from bn_core.train import Trainer

    cfg = _fig1_config()
    data = load_dataset("digits", seed=cfg.seed, probe_size=cfg.probe_size)
    trainer = Trainer(cfg, data)
    nets, opts = _bare_fig1_nets(config.seed, data.input_dim)
    gen = torch.Generator().manual_seed(config.seed)
    n = data.x_train.shape[0]

    def bare(steps: int) -> None:
        for _ in range(steps):
            index = torch.randint(0, n, (60,), generator=gen)
            x, y = data.x_train[index], data.y_train[index]
            for model, opt in zip(nets, opts, strict=True):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()

    chunk = 100
    trainer.advance(steps=chunk // 2)  # evaluations mid-round, as in telemetry_overhead
    rounds = config.pick(9, 31)
    timing = interleaved(_advance(trainer, chunk), lambda: bare(chunk), rounds, 1, 2)
    return {
        "ours_s": timing.ours_s / chunk,
        "reference_s": timing.reference_s / chunk,
        "note": f"s/step, digits, telemetry every 10, test every 100, against a bare "
        f"torch.nn loop; {rounds} rounds of {chunk} steps",
    }


@benchmark("fig1_full", target=1.2)
def fig1_full(config: Config) -> dict:
    """ioffe-fig1 at MNIST size, both variants, telemetry on, vs a bare torch.nn loop.

    The ratio comes from interleaved chunks; the wall time of a whole 50,000-step run is
    measured on our side (the full mode runs it; --quick extrapolates from the chunks).
    """
    from bn_core.train import Trainer

    data = _random_dataset(10_000, 10_000, 784, config.seed)
    # Test accuracy every 500 steps: 100 points over the run, as in Fig. 1(a).
    trainer = Trainer(_fig1_config(eval_every=500), data)
    nets, opts = _bare_fig1_nets(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    def bare(steps: int) -> None:
        for _ in range(steps):
            index = torch.randint(0, 10_000, (60,), generator=gen)
            x, y = data.x_train[index], data.y_train[index]
            for model, opt in zip(nets, opts, strict=True):
                opt.zero_grad()
                F.cross_entropy(model(x), y).backward()
                opt.step()

    chunk = 500
    trainer.advance(steps=chunk // 2)  # evaluations mid-round, as in telemetry_overhead
    rounds = config.pick(5, 15)
    timing = interleaved(_advance(trainer, chunk), lambda: bare(chunk), rounds, 1, 1)
    ours, ref = timing.ours_s, timing.reference_s
    out = {
        "ours_s": ours / chunk,
        "reference_s": ref / chunk,
        "note": f"s/step at 784-d input, batch 60, telemetry every 10, eval every 500; "
        f"{rounds} rounds of {chunk} steps",
    }
    if config.quick:
        out["wall_50k_s_estimate"] = ours / chunk * 50_000
    else:
        run = Trainer(_fig1_config(eval_every=500, steps=50_000), data)
        t0 = time.perf_counter()
        while not run.finished:
            run.advance(steps=1000)
        out["wall_50k_s"] = time.perf_counter() - t0
    return out


# --------------------------------------------------------------------------- Santurkar et al.


@benchmark("ics_overhead", target=1.5)
def ics_overhead(config: Config) -> dict:
    """ioffe-fig1 with the ICS measurement every 10 steps vs the same run without it."""
    from bn_core.experiments import make_trainer
    from bn_core.train import Trainer

    measured = make_trainer(_fig1_config(ics_every=10))
    bare = Trainer(_fig1_config())
    chunk = 100
    rounds = config.pick(9, 31)
    timing = interleaved(_advance(measured, chunk), _advance(bare, chunk), rounds, 1, 2)
    return {
        "ours_s": timing.ours_s / chunk,
        "reference_s": timing.reference_s / chunk,
        "note": f"s/step, digits, telemetry every 10 on both; {rounds} rounds of {chunk} steps",
    }


@benchmark("sweep_8", target=3.0)
def sweep_8(config: Config) -> dict:
    """The sweep's lockstep run of 4 learning rates x {plain, batchnorm} vs one variant alone."""
    from bn_core.experiments.sweep import LrSweep, lr_grid
    from bn_core.train import Trainer

    sweep = LrSweep(_fig1_config(), lr_grid(0.01, 10, 4), steps=1000)
    (trainer,) = sweep.trainers
    # The sweep page's cadences and measurements, but a run that never finishes here.
    eight = trainer.config.replace(steps=10_000_000)
    one = eight.replace(variants=[eight.to_dict()["variants"][-2]])  # batchnorm at lr 1
    measure = trainer.measure_layers
    ours = Trainer(eight, trainer.dataset, measure_layers=measure)
    ref = Trainer(one, trainer.dataset, measure_layers=measure)
    chunk = 100
    rounds = config.pick(9, 31)
    timing = interleaved(_advance(ours, chunk), _advance(ref, chunk), rounds, 1, 2)
    # A reference that diverged would stop training and time nothing.
    assert not ref.finished and not ours.finished, "a sweep_8 side stopped early"
    return {
        "ours_s": timing.ours_s / chunk,
        "reference_s": timing.reference_s / chunk,
        "note": f"s/step, digits, 8 variants vs 1, as the sweep page trains them (losses "
        f"and test metrics every 100 steps); {rounds} rounds of {chunk} steps",
    }


from bench.export_pack import export_pack as _export_pack  # noqa: E402

benchmark("export_pack", target=1.0)(_export_pack)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", metavar="FILE", help="write the results as JSON here")
    parser.add_argument("--quick", action="store_true", help="fewer rounds (under a minute)")
    parser.add_argument("--only", metavar="NAME,...", help="comma-separated benchmark names")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument(
        "--strict", action="store_true", help="exit with status 1 when a ratio misses its target"
    )
    args = parser.parse_args(argv)

    names = list(REGISTRY)
    if args.only:
        names = [n.strip() for n in args.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in REGISTRY]
        if unknown:
            parser.error(f"unknown benchmark(s) {unknown}; known: {sorted(REGISTRY)}")
    if args.threads < 1:
        parser.error("--threads must be >= 1")
    torch.set_num_threads(args.threads)
    config = Config(quick=args.quick, threads=args.threads)

    results = run(names, config)
    print_table(results, config)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    missed = [n for n, r in results.items() if r["ratio"] > r["target"]]
    return 1 if args.strict and missed else 0


if __name__ == "__main__":
    sys.exit(main())
