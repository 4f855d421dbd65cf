"""Trainer: all variants of a run step in lockstep on the same batches, and are measured.

A UI interleaves ``advance(seconds=0.15)`` with drawing; the CLI calls ``advance(steps=n)``.
Learning rate, SGD momentum and BN momentum change between steps through ``set_live``,
and each change is recorded as an event in the history (changes in quick succession as
one).

The Trainer owns the loop. What is recorded at a logged step lives in
``bn_core/telemetry.py``; experiments plug further measurements in as ``Measure`` objects
(``bn_core.experiments.measures_for`` builds the ones a config asks for).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from bn_core.config import FIELDS, LIVE_FIELDS, MEASURE_CADENCES, ConfigError, RunConfig
from bn_core.data import Dataset, load_dataset
from bn_core.history import Event, History
from bn_core.memory import keep_freed_memory
from bn_core.models import build_model, variant_losses
from bn_core.telemetry import STATS_EXAMPLES, Telemetry

__all__ = [
    "DeviceUnavailable",
    "Measure",
    "RunQueue",
    "Trainer",
    "VariantStatus",
    "resolve_device",
]


class DeviceUnavailable(ConfigError):
    """The requested device does not exist on this machine."""


def resolve_device(name: str) -> torch.device:
    """'auto' picks cuda, then mps, then cpu; an explicit device must exist."""
    has_mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if has_mps else torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            "device", name, "no CUDA GPU is visible to PyTorch here; allowed: auto, cpu"
        )
    if name == "mps" and not has_mps:
        raise DeviceUnavailable(
            "device", name, "Apple's MPS backend is not available here; allowed: auto, cpu"
        )
    return torch.device(name)


@dataclass
class VariantStatus:
    name: str
    state: str = "running"  # running | diverged | finished
    diverged_at: int | None = None

    @property
    def label(self) -> str:
        if self.state == "diverged":
            return f"diverged at step {self.diverged_at}"
        return self.state


class _LockstepOptimizer:
    """SGD with momentum (or Adam) where every variant has its own learning rate.

    Parameters are stacked over variants, so the learning rate is a tensor shaped like
    each parameter, looked up from the variant each element belongs to, and 0 where the
    model holds a parameter still (``update_mask``).
    """

    def __init__(self, model, kind: str, lrs: list[float], momentum: float) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.owner = [model.variant_index_of(p).to(p.device) for p in self.params]
        self.held = [model.update_mask(p) for p in self.params]
        self.kind = kind
        self.momentum = momentum
        self.state = [torch.zeros_like(p) for p in self.params]
        self.state2 = [torch.zeros_like(p) for p in self.params] if kind == "adam" else None
        self.t = 0
        self._momentum_fresh = momentum == 0
        self.set_lrs(lrs)

    def set_lrs(self, lrs: list[float]) -> None:
        self.lrs = list(lrs)
        dev = self.params[0].device
        table = torch.tensor(lrs, dtype=self.params[0].dtype, device=dev)
        self.lr_of = [
            table[o] if held is None else table[o] * held
            for o, held in zip(self.owner, self.held, strict=True)
        ]

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        self.t += 1
        live = [i for i, p in enumerate(self.params) if p.grad is not None]
        params = [self.params[i] for i in live]
        grads = [self.params[i].grad for i in live]
        lrs = [self.lr_of[i] for i in live]
        # One fused call per update rule over all parameters: at these sizes the cost of a
        # step is the number of ops, not their arithmetic.
        if self.kind == "sgd":
            if self.momentum == 0:
                torch._foreach_addcmul_(params, lrs, grads, value=-1.0)
                self._momentum_fresh = True
                return
            bufs = [self.state[i] for i in live]
            if self._momentum_fresh:
                # As torch's SGD: momentum switched on starts from the current gradient.
                torch._foreach_zero_(bufs)
                self._momentum_fresh = False
            # PyTorch's SGD: buf = momentum * buf + g ; p -= lr * buf
            torch._foreach_mul_(bufs, self.momentum)
            torch._foreach_add_(bufs, grads)
            torch._foreach_addcmul_(params, lrs, bufs, value=-1.0)
            return
        # Adam (Kingma & Ba) with its default betas 0.9 and 0.999.
        ms = [self.state[i] for i in live]
        vs = [self.state2[i] for i in live]
        torch._foreach_lerp_(ms, grads, 0.1)
        torch._foreach_mul_(vs, 0.999)
        torch._foreach_addcmul_(vs, grads, grads, value=0.001)
        denom = torch._foreach_sqrt(torch._foreach_div(vs, 1 - 0.999**self.t))
        torch._foreach_add_(denom, 1e-8)
        steps = torch._foreach_div(ms, denom)
        torch._foreach_mul_(steps, lrs)
        torch._foreach_add_(params, steps, alpha=-1.0 / (1 - 0.9**self.t))


class Measure:
    """A measurement plugged into the training step from outside, as a callback.

    The Trainer calls the hooks of every measure it was given around each step; a measure
    decides itself whether it is due (``trainer.step``) and writes its rows with
    ``trainer.record``. It must leave the run exactly as it found it.
    ``cadences`` names the config fields (``ics_every``, ...) the measure serves.
    """

    cadences: tuple[str, ...] = ()

    def before_forward(self, trainer: Trainer) -> None:
        """Before the step's forward pass (noise generators not yet drawn from)."""

    def before_update(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
        """After backward (every ``.grad`` is the step's gradient), before the update."""

    def after_update(self, trainer: Trainer, x: torch.Tensor, y: torch.Tensor) -> None:
        """After the optimizer step, before the step counter moves on."""


class Trainer:
    """Trains a run's variants in lockstep and records their telemetry in a History."""

    loss_fn = staticmethod(variant_losses)  # (V, N, classes) logits, y -> (V,) losses

    def __init__(
        self,
        config: RunConfig,
        dataset: Dataset | None = None,
        measure_layers: bool = True,
        measures: Sequence[Measure] = (),
    ) -> None:
        """``measure_layers=False`` logs only the losses and test metrics: no probe pass,
        gradient measures or running-stat errors, for a caller that shows none of them
        (the learning-rate sweep). Training is the same either way.

        ``measures`` are further measurements, such as ICS; every cadence field the
        config switches on (``ics_every`` > 0, ...) must be served by one of them."""
        for name in MEASURE_CADENCES:
            every = getattr(config, name)
            if every and not any(name in m.cadences for m in measures):
                raise ValueError(
                    f"{name} = {every}: no measure for it was given; build the trainer with "
                    "measures=bn_core.experiments.measures_for(config)"
                )
        self.config = config
        self.measures = list(measures)
        keep_freed_memory()  # a logged step's large temporaries, reused: see bn_core/memory.py
        self.device = resolve_device(config.device)
        if dataset is None:
            dataset = load_dataset(
                config.dataset, seed=config.seed, noise=config.noise, probe_size=config.probe_size
            )
        self.dataset = dataset
        dev = self.device
        self.x_train = dataset.x_train.to(dev)
        self.y_train = dataset.y_train.to(dev)
        self.x_probe = dataset.x_probe.to(dev)
        if config.batch_size > self.x_train.shape[0]:
            raise ConfigError(
                "batch_size",
                config.batch_size,
                f"allowed: at most {self.x_train.shape[0]}, the training examples of "
                f"{config.dataset}",
            )
        torch.manual_seed(config.seed)
        self.model = build_model(
            config, dataset.input_dim, dataset.num_classes, dataset.image_shape
        ).to(dev)
        self.variant_names = [v.name for v in config.variants]
        self.live = {name: getattr(config, name) for name in LIVE_FIELDS}
        self.status = [VariantStatus(n) for n in self.variant_names]
        self.optimizer = _LockstepOptimizer(
            self.model, config.optimizer, self._lrs(), config.momentum
        )
        self.history = History(config.max_points, config.max_histograms)
        self.telemetry = Telemetry(
            config,
            self.model,
            self.history,
            self.variant_names,
            self.x_probe,
            dataset.x_train[:STATS_EXAMPLES].to(dev),
            dataset.x_test.to(dev),
            dataset.y_test.to(dev),
            measure_layers,
        )
        self.step = 0
        self.steps_per_second = 0.0
        self._batch_gen = torch.Generator().manual_seed(config.seed + 1)
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        self._loss_sum = [0.0] * len(self.variant_names)
        self._loss_count = 0
        self.telemetry.evaluate(self.step, self.running())

    # --- public API ----------------------------------------------------------------------
    @property
    def measure_layers(self) -> bool:
        return self.telemetry.measure_layers

    @property
    def finished(self) -> bool:
        return self.step >= self.config.steps or not any(s.state == "running" for s in self.status)

    def running(self) -> list[int]:
        """The indices of the variants still training (not diverged or finished)."""
        return [v for v, s in enumerate(self.status) if s.state == "running"]

    def record(self, rows: dict[int, list[tuple[str, str, float]]]) -> None:
        """Rows (layer, metric, value) by variant index into the history at this step."""
        self.telemetry.write(self.step, rows)

    def advance(self, steps: int | None = None, seconds: float | None = None) -> int:
        """Train until `steps` more steps are done or `seconds` are spent; returns steps done."""
        if steps is None and seconds is None:
            raise ValueError("advance needs steps or seconds")
        start = time.perf_counter()
        done = 0
        while not self.finished:
            if steps is not None and done >= steps:
                break
            if seconds is not None and done > 0 and time.perf_counter() - start >= seconds:
                break
            self._train_step()
            done += 1
        elapsed = time.perf_counter() - start
        if done and elapsed > 0:
            rate = done / elapsed
            self.steps_per_second = (
                rate if not self.steps_per_second else 0.7 * self.steps_per_second + 0.3 * rate
            )
        if self.finished:
            for s in self.status:
                if s.state == "running":
                    s.state = "finished"
        return done

    def set_live(self, *, merge: bool = False, **changes: float | None) -> list[Event]:
        """Change lr, momentum or bn_momentum from the next step; returns the events.

        A change at the step of the setting's last change (no step trained in between)
        is part of that change. ``merge=True`` also folds it into the setting's last
        event from an earlier step: a UI passes it for changes made in quick succession,
        so a slider stepped key by key from 0 to 0.9 is one event, "momentum 0 → 0.9",
        not ninety. A change that brings a setting back to where its event started
        removes the event.
        """
        for name, value in changes.items():
            if name not in LIVE_FIELDS:
                allowed = "allowed live settings: " + ", ".join(LIVE_FIELDS)
                raise ConfigError(name, value, allowed)
            changes[name] = FIELDS[name].check(name, value)
        events = []  # all values are valid: apply them together
        for name, value in changes.items():
            old = self.live[name]
            if value == old:
                continue
            self.live[name] = value
            if name == "lr":
                self.optimizer.set_lrs(self._lrs())
            elif name == "momentum":
                self.optimizer.momentum = value
            else:
                for module in self.telemetry.bn_layers:
                    module.momentum = value
            last = self.history.last_event(name)
            same_step = last is not None and self.step == (last.until or last.step)
            event = self.history.add_event(
                self.step,
                name,
                math.nan if old is None else old,
                math.nan if value is None else value,
                merge=merge or same_step,
            )
            if event is not None:
                events.append(event)
        return events

    def status_line(self, activity: str | None = None) -> str:
        """e.g. 'step 1,200 · 310 steps/s · cpu · plain: running, batchnorm: running'.

        A UI passes its activity ('paused', ...) to show instead of the training rate.
        """
        states = ", ".join(f"{s.name}: {s.label}" for s in self.status)
        doing = activity or f"{self.steps_per_second:,.0f} steps/s"
        return f"step {self.step:,} · {doing} · {self.device.type} · {states}"

    # --- one step ------------------------------------------------------------------------
    def _train_step(self) -> None:
        cfg = self.config
        x, y = self._next_batch()
        logging = self.step % cfg.telemetry_every == 0
        if not self.model.training:  # switching walks every module: only when needed
            self.model.train()
        for m in self.measures:
            m.before_forward(self)
        logits, records = self.model(x, record=logging and self.measure_layers)
        self.telemetry.watch(records)
        losses = self.loss_fn(logits, y)
        self.optimizer.zero_grad()
        losses.sum().backward()
        loss_values = losses.detach().tolist()
        for v, value in enumerate(loss_values):
            if self.status[v].state == "running" and not math.isfinite(value):
                self._mark_diverged(v)
        self._accumulate_loss(loss_values)
        if logging:
            window = [total / self._loss_count for total in self._loss_sum]
            self._loss_sum, self._loss_count = [0.0] * len(window), 0
            self.telemetry.logged_step(self.step, self.running(), window, records)
        for m in self.measures:
            m.before_update(self, x, y)
        self.optimizer.step()
        if logging:
            self.telemetry.after_update(self.step, self.running())
        for m in self.measures:
            m.after_update(self, x, y)
        self.step += 1
        self.history.note_step(self.step)
        if self.step % cfg.eval_every == 0 or self.step >= cfg.steps:
            self.telemetry.evaluate(self.step, self.running())

    def _lrs(self) -> list[float]:
        out = []
        for spec, status in zip(self.config.variants, self.status, strict=True):
            lr = self.live["lr"] if spec.lr is None else spec.lr
            out.append(0.0 if status.state == "diverged" else lr)
        return out

    def _next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        n, b = self.x_train.shape[0], self.config.batch_size
        if self._cursor + b > self._order.numel():
            # A fresh seeded permutation per epoch; the last partial batch is dropped.
            self._order = torch.randperm(n, generator=self._batch_gen)
            self._cursor = 0
        index = self._order[self._cursor : self._cursor + b].to(self.device)
        self._cursor += b
        return self.x_train[index], self.y_train[index]

    def _mark_diverged(self, v: int) -> None:
        self.status[v].state = "diverged"
        self.status[v].diverged_at = self.step
        # In the history too, so what is said about the run afterwards (claims) knows.
        self.history.add(self.step, self.status[v].name, "", "diverged", float(self.step))
        self.optimizer.set_lrs(self._lrs())  # a diverged variant stops moving

    def _accumulate_loss(self, loss_values: list[float]) -> None:
        for v, value in enumerate(loss_values):
            self._loss_sum[v] += value
        self._loss_count += 1


class RunQueue:
    """Runs trained one after another, a time slice at a time (one UI tick each), as the
    learning-rate sweep and the small-batch study train theirs. ``queue`` lists the runs
    in the order they train; each is ``steps`` long."""

    steps: int

    def queue(self) -> list[Trainer]:
        raise NotImplementedError

    @property
    def finished(self) -> bool:
        return all(t.finished for t in self.queue())

    @property
    def steps_done(self) -> int:
        # A run whose variants all diverged is done before its last step.
        return sum(t.config.steps if t.finished else t.step for t in self.queue())

    @property
    def steps_total(self) -> int:
        return self.steps * len(self.queue())

    @property
    def progress(self) -> float:
        return self.steps_done / self.steps_total

    def advance(self, seconds: float) -> int:
        """Train the first unfinished run for about ``seconds``; returns the steps done."""
        start, done = time.perf_counter(), 0
        for trainer in self.queue():
            if trainer.finished:
                continue
            left = seconds - (time.perf_counter() - start)
            if left <= 0:
                break
            done += trainer.advance(seconds=left)
        return done
