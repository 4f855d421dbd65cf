"""Trainer: all variants of a run step in lockstep on the same batches, and are measured.

A UI interleaves ``advance(seconds=0.15)`` with drawing; the CLI calls ``advance(steps=n)``.
Learning rate, SGD momentum and BN momentum change between steps through ``set_live``,
and each change is recorded as an event in the history.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from bn_core.background import BackgroundTelemetry, unavailable_reason
from bn_core.batchnorm import noise_states
from bn_core.config import FIELDS, LIVE_FIELDS, ConfigError, RunConfig
from bn_core.data import Dataset, load_dataset
from bn_core.experiments.ics import measure_ics, preserved_state
from bn_core.experiments.landscape import LANDSCAPE_METRICS, eta_grid, probe_landscape
from bn_core.history import Event, History
from bn_core.models import LayerRecord, build_model, variant_losses
from bn_core.probes import (
    BAND_PERCENTILES,
    FIG1_PERCENTILES,
    postact_range,
    preact_edges,
    quantiles_of_sorted,
    row_std,
    saturation_cut,
    saturation_fraction,
    sort_rows,
)

__all__ = ["DeviceUnavailable", "Trainer", "VariantStatus", "resolve_device"]

# Test examples per evaluation pass. Measured for the Fig. 1 MLP on the CPU (one thread,
# 2 variants, 10,000 MNIST-sized examples): 75 ms in chunks of 1,024, where a chunk's
# activations stay in cache, against 90 ms in chunks of 4,096 or of 256.
_EVAL_CHUNK = 1024
# The columns _probe measures per layer and variant, in order.
_PROBE_METRICS = (
    *(f"preact_p{p:g}" for p in FIG1_PERCENTILES),
    *(f"preact_band_p{p:g}" for p in BAND_PERCENTILES),
    *(f"unit_p{p:g}" for p in FIG1_PERCENTILES),
    "preact_mean",
    "preact_std",
    "preact_clipped",
    "saturation",
)
_STATS_EXAMPLES = 1024  # train examples used as "the training set" for running-stat error


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
    each parameter, looked up from the variant each element belongs to.
    """

    def __init__(self, model, kind: str, lrs: list[float], momentum: float) -> None:
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.owner = [model.variant_index_of(p).to(p.device) for p in self.params]
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
        self.lr_of = [table[o] for o in self.owner]

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


class Trainer:
    """Trains a run's variants in lockstep and records their telemetry in a History."""

    def __init__(
        self,
        config: RunConfig,
        dataset: Dataset | None = None,
        measure_layers: bool = True,
        background: bool | None = None,
    ) -> None:
        """``measure_layers=False`` logs only the losses and test metrics: no probe pass,
        gradient measures or running-stat errors, for a caller that shows none of them
        (the learning-rate sweep). Training is the same either way.

        ``background``: take the layer measures and evaluations on a worker thread (see
        bn_core/background.py); None does so wherever that is supported, False never,
        True insists (ValueError where it is not supported). Without layer measures
        everything stays on the training thread."""
        self.config = config
        self.measure_layers = measure_layers
        self.device = resolve_device(config.device)
        if dataset is None:
            dataset = load_dataset(
                config.dataset, seed=config.seed, noise=config.noise, probe_size=config.probe_size
            )
        self.dataset = dataset
        dev = self.device
        self.x_train = dataset.x_train.to(dev)
        self.y_train = dataset.y_train.to(dev)
        self.x_test = dataset.x_test.to(dev)
        self.y_test = dataset.y_test.to(dev)
        self.x_probe = dataset.x_probe.to(dev)
        self.x_stats = dataset.x_train[:_STATS_EXAMPLES].to(dev)
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
        # Every BatchNorm layer (ours and torch's): the modules with running statistics.
        self._bn_layers = [
            m
            for m in self.model.modules()
            if getattr(m, "running_mean", None) is not None and hasattr(m, "momentum")
        ]
        self.live = {name: getattr(config, name) for name in LIVE_FIELDS}
        self.status = [VariantStatus(n) for n in self.variant_names]
        self.optimizer = _LockstepOptimizer(
            self.model, config.optimizer, self._lrs(), config.momentum
        )
        self._history = History(config.max_points, config.max_histograms)
        h, bins = config.hist_range, config.hist_bins
        lo, hi = postact_range(config.activation, h)
        self._history.set_bin_edges("preact", torch.linspace(-h, h, bins + 1).numpy())
        self._history.set_bin_edges("postact", torch.linspace(lo, hi, bins + 1).numpy())
        # The probe's search boundaries on the nonlinearity's input: the inner edges of
        # the input histogram, the inner edges of the output histogram mapped back through
        # the (monotone) nonlinearity, the histogram range, and the saturation cut-offs.
        cut = saturation_cut(config.activation, config.saturation_threshold)
        post_edges = preact_edges(config.activation, torch.linspace(lo, hi, bins + 1))
        parts = [torch.linspace(-h, h, bins + 1)[1:-1], post_edges[1:-1], torch.tensor([-h, h])]
        if cut is not None:
            parts.append(torch.tensor([-cut, cut]))
        self._probe_cuts = torch.cat(parts).float().to(dev).unsqueeze(0)
        self._background: BackgroundTelemetry | None = None
        if measure_layers and background is not False:
            why_not = unavailable_reason(self.model, self.x_probe, config.activation)
            if why_not is not None and background:
                raise ValueError(f"measures on a worker thread are not available: {why_not}")
            if why_not is None:
                self._background = BackgroundTelemetry(
                    self.model,
                    self.x_probe,
                    self._probe_cuts,
                    activation=config.activation,
                    unit=config.probe_unit,
                    layer_percentiles=FIG1_PERCENTILES + BAND_PERCENTILES,
                    unit_percentiles=FIG1_PERCENTILES,
                )
        self.step = 0
        self.steps_per_second = 0.0
        self._batch_gen = torch.Generator().manual_seed(config.seed + 1)
        self._order = torch.empty(0, dtype=torch.long)
        self._cursor = 0
        self._loss_sum = [0.0] * len(self.variant_names)
        self._loss_count = 0
        self._evaluate()

    # --- public API ----------------------------------------------------------------------
    @property
    def history(self) -> History:
        """Everything recorded so far, including the measures still out on the worker."""
        self.wait_for_measures()
        return self._history

    def wait_for_measures(self) -> None:
        """Record every measure still out on the worker thread (waits for them)."""
        if self._background is not None:
            self._background.record_finished(wait=True)

    @property
    def measures_in_background(self) -> bool:
        """Whether logged-step measures are taken on a worker thread."""
        return self._background is not None

    @property
    def finished(self) -> bool:
        return self.step >= self.config.steps or not any(s.state == "running" for s in self.status)

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

    def set_live(self, **changes: float | None) -> list[Event]:
        """Change lr, momentum or bn_momentum from the next step; returns the events."""
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
                for module in self._bn_layers:
                    module.momentum = value
            events.append(
                self._history.add_event(
                    self.step,
                    name,
                    math.nan if old is None else old,
                    math.nan if value is None else value,
                )
            )
        return events

    def status_line(self, activity: str | None = None) -> str:
        """e.g. 'step 1,200 · 310 steps/s · cpu · plain: running, batchnorm: running'.

        A UI passes its activity ('paused', ...) to show instead of the training rate.
        """
        states = ", ".join(f"{s.name}: {s.label}" for s in self.status)
        doing = activity or f"{self.steps_per_second:,.0f} steps/s"
        return f"step {self.step:,} · {doing} · {self.device.type} · {states}"

    # --- one step ------------------------------------------------------------------------
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

    def _train_step(self) -> None:
        cfg = self.config
        x, y = self._next_batch()
        logging = self.step % cfg.telemetry_every == 0
        if not self.model.training:  # switching walks every module: only when needed
            self.model.train()
        ics_due = cfg.ics_every > 0 and self.step % cfg.ics_every == 0
        landscape_due = cfg.landscape_every > 0 and self.step % cfg.landscape_every == 0
        # The noise this step's forward pass will draw, so a measurement can replay it.
        noise = noise_states(self.model) if ics_due or landscape_due else None
        logits, records = self.model(x, record=logging and self.measure_layers)
        if records:
            for r in records:
                if r.output.requires_grad:
                    r.output.retain_grad()
        losses = variant_losses(logits, y)
        self.optimizer.zero_grad()
        losses.sum().backward()
        loss_values = losses.detach().tolist()
        for v, value in enumerate(loss_values):
            if self.status[v].state == "running" and not math.isfinite(value):
                self._mark_diverged(v)
        if logging:
            self._record_training_telemetry(loss_values, records)
        else:
            self._accumulate_loss(loss_values)
        if landscape_due:
            self._probe_landscape(x, y, noise)
        before = [p.detach().clone() for p in self.optimizer.params] if ics_due else None
        self.optimizer.step()
        if before is not None:
            self._measure_ics(x, y, before, noise)
        self.step += 1
        self._history.note_step(self.step)
        if self.step % cfg.eval_every == 0 or self.step >= cfg.steps:
            self._evaluate()

    def _mark_diverged(self, v: int) -> None:
        self.status[v].state = "diverged"
        self.status[v].diverged_at = self.step
        self.optimizer.set_lrs(self._lrs())  # a diverged variant stops moving

    def _running(self) -> list[int]:
        return [v for v, s in enumerate(self.status) if s.state == "running"]

    def _accumulate_loss(self, loss_values: list[float]) -> None:
        for v, value in enumerate(loss_values):
            self._loss_sum[v] += value
        self._loss_count += 1

    # --- telemetry -----------------------------------------------------------------------
    def _record_training_telemetry(self, loss_values: list[float], records: list[LayerRecord]):
        """Loss over the window, gradient measures of this step, and a probe-batch pass."""
        self._accumulate_loss(loss_values)
        window = [s / self._loss_count for s in self._loss_sum]
        self._loss_sum = [0.0] * len(window)
        self._loss_count = 0
        running = self._running()
        if self._background is not None:
            step = self.step
            self._background.measure(
                self.optimizer.lrs,
                records,
                lambda *m: self._record_measured(step, running, window, *m),
            )
            return
        rows: dict[int, list[tuple[str, str, float]]] = {v: [] for v in running}
        for v in running:
            rows[v].append(("", "loss", window[v]))
        if not self.measure_layers:
            self._write_rows(self.step, rows)
            return
        # Every gradient measure of every layer and variant in a few stacked ops and one
        # copy to the host: per-variant loops would cost more than the step itself.
        lrs = torch.tensor(self.optimizer.lrs, device=self.device)
        per_layer = []
        for stack, rec in zip(self.model.layer_stacks(), records, strict=True):
            W, G = stack.weight.flatten(1), stack.weight_grad.flatten(1)
            out_grad = rec.output.grad
            columns = [
                G.norm(dim=1),
                # log10(std(lr * grad) / std(W)), the update:data ratio
                torch.log10(lrs * row_std(G) / row_std(W)),
                stack.bias.norm(dim=1),
                stack.bias_grad.norm(dim=1),
                torch.full_like(lrs, math.nan)
                if out_grad is None
                else out_grad.reshape(out_grad.shape[0], -1).norm(dim=1),
            ]
            per_layer.append(torch.stack([c.float() for c in columns], dim=1))
        table = torch.stack(per_layer).detach().cpu().numpy()  # (layers, variants, measures)
        self._add_gradient_rows(table, running, rows)
        self._probe(running, rows)
        self._write_rows(self.step, rows)

    def _add_gradient_rows(self, table, running: list[int], rows: dict[int, list]) -> None:
        """table (layers, variants, 5): the gradient measures as history rows."""
        for li, name in enumerate(self.model.layer_names):
            for v in running:
                grad_norm, ratio, bias_norm, bias_grad_norm, out_grad_norm = table[li, v]
                rows[v] += [
                    (name, "grad_norm", float(grad_norm)),
                    (name, "update_ratio", float(ratio)),
                    (name, "bias_norm", float(bias_norm)),
                    # Zero (to rounding) when BN follows: the bias is redundant before BN.
                    (name, "bias_grad_norm", float(bias_grad_norm)),
                ]
                if math.isfinite(out_grad_norm):
                    rows[v].append((name, "out_grad_norm", float(out_grad_norm)))

    def _record_measured(
        self, step: int, running: list[int], loss: list[float], table, counts, dead, grads
    ) -> None:
        """Write a logged step's measures from the worker thread into the history: the
        same rows, in the same order, as the measures taken in line."""
        rows = {v: [("", "loss", loss[v])] for v in running}
        self._add_gradient_rows(grads, running, rows)
        n = self.x_probe.shape[0] * self.config.width
        self._add_probe_rows(
            step,
            running,
            table[:, running],
            counts[:, running],
            [n] * len(self.model.layer_names),
            dead[:, running] if self.config.activation == "relu" else None,
            rows,
        )
        self._write_rows(step, rows)

    def _write_rows(self, step: int, rows: dict[int, list]) -> None:
        """``rows`` by variant index into the history at ``step``, now."""
        for v, variant_rows in rows.items():
            self._history.add_many(step, self.variant_names[v], variant_rows)

    def _add_rows(self, step: int, rows: dict[int, list]) -> None:
        """Rows measured in line, written behind any measures of earlier steps still out
        on the worker: the history keeps the order the steps came in (and so the order
        of its layers). The worker's own results are written with _write_rows: they
        arrive in order already."""
        if self._background is None:
            self._write_rows(step, rows)
        else:
            self._background.in_order(lambda: self._write_rows(step, rows))

    @torch.no_grad()
    def _probe(self, running: list[int], rows: dict[int, list]) -> None:
        """Distributions on the fixed probe batch, BN using that batch's statistics.

        Measuring on one fixed batch keeps batch-to-batch noise out of the curves, and the
        BN buffers are restored so the measurement leaves training untouched.
        """
        cfg = self.config
        with preserved_state(self.model, []):
            _, records = self.model(self.x_probe, record=True)
        if not running:
            return
        R = len(running)
        every = len(self.variant_names) == R
        idx = None if every else torch.tensor(running, device=self.device)
        cuts = self._probe_cuts.expand(R, -1).contiguous()
        columns, below = [], []
        # Layers differ in size (conv vs fc), so each is one (variants, values) block.
        # Sorting once gives the percentiles, and one binary search of all bin edges and
        # cut-offs gives both histograms, the clipped share and the saturation.
        for rec in records:
            preact = rec.preact if every else rec.preact[idx]
            pre = preact.reshape(R, -1)
            # One unit (one channel of a conv layer), as Fig. 1 follows one sigmoid.
            unit = preact[:, :, cfg.probe_unit].reshape(R, -1)
            pre_sorted = sort_rows(pre)
            mean = pre.mean(1, keepdim=True)
            centered = pre - mean
            var = torch.linalg.vecdot(centered, centered, dim=1) / (pre.shape[1] - 1)
            columns.append(
                torch.cat(
                    [
                        quantiles_of_sorted(pre_sorted, FIG1_PERCENTILES + BAND_PERCENTILES),
                        quantiles_of_sorted(sort_rows(unit), FIG1_PERCENTILES),
                        mean,
                        var.sqrt().unsqueeze(1),
                    ],
                    dim=1,
                )
            )
            below.append(torch.searchsorted(pre_sorted, cuts))
        # One copy to the host for all numbers of this logged step.
        table = torch.stack(columns).double().cpu().numpy()
        counts = [b.cpu().numpy() for b in below]
        saturation = None
        if counts[0].shape[1] <= 2 * cfg.hist_bins:  # no cut-offs: ReLU's dead units
            saturation = [
                saturation_fraction(
                    rec.postact if every else rec.postact[idx],
                    cfg.activation,
                    cfg.saturation_threshold,
                )
                .cpu()
                .numpy()
                for rec in records
            ]
        sizes = [rec.preact[0].numel() for rec in records]
        self._add_probe_rows(self.step, running, table, counts, sizes, saturation, rows)

    def _add_probe_rows(
        self, step: int, running: list[int], table, counts, sizes, saturation, rows
    ) -> None:
        """The probe's numbers as history rows and histograms.

        table (layers, R, columns) holds _PROBE_METRICS' first columns, counts (layers, R,
        cuts) the probe values below each cut, sizes each layer's values per variant, and
        saturation (layers, R) the dead-unit shares where no cut-offs define saturation.
        """
        bins = self.config.hist_bins
        for li, name in enumerate(self.model.layer_names):
            n, below = sizes[li], counts[li]  # below: (R, cuts), the values below each cut
            pre_hist = np.diff(below[:, : bins - 1], prepend=0, append=n)
            post_hist = np.diff(below[:, bins - 1 : 2 * bins - 2], prepend=0, append=n)
            clip_lo, clip_hi = below[:, 2 * bins - 2], below[:, 2 * bins - 1]
            clipped = (clip_lo + n - clip_hi) / n
            if saturation is None:
                sat_lo, sat_hi = below[:, 2 * bins], below[:, 2 * bins + 1]
                saturated = (sat_lo + n - sat_hi) / n
            else:
                saturated = saturation[li]
            for ri, v in enumerate(running):
                values = [*table[li, ri], clipped[ri], saturated[ri]]
                for metric, value in zip(_PROBE_METRICS, values, strict=True):
                    rows[v].append((name, metric, float(value)))
                variant = self.variant_names[v]
                self._history.add_histogram(step, variant, name, "preact", pre_hist[ri])
                self._history.add_histogram(step, variant, name, "postact", post_hist[ri])

    # --- Santurkar et al.'s measurements -----------------------------------------------
    def _measure_ics(self, x, y, before: list[torch.Tensor], noise: list) -> None:
        """ics_l2 and ics_cos per layer (2 and up), right after the optimizer step."""
        running = self._running()
        if not running:
            return
        params = self.optimizer.params
        measured = measure_ics(self.model, variant_losses, x, y, params, before, noise)
        table = {name: (l2.tolist(), cos.tolist()) for name, (l2, cos) in measured.items()}
        rows = {v: [] for v in running}
        for v in running:
            for layer, (l2, cos) in table.items():
                rows[v] += [(layer, "ics_l2", l2[v]), (layer, "ics_cos", cos[v])]
        self._add_rows(self.step, rows)

    def _probe_landscape(self, x, y, noise: list) -> None:
        """Loss and gradient along -g before the optimizer step (nothing is changed)."""
        running = self._running()
        if not running:
            return
        cfg, opt = self.config, self.optimizer
        etas = eta_grid(cfg.landscape_low, cfg.landscape_high, cfg.landscape_points)
        probe = probe_landscape(
            self.model,
            variant_losses,
            x,
            y,
            opt.params,
            opt.owner,
            opt.lr_of,
            etas,
            noise,
            variants=len(self.variant_names),
        )
        summary = probe.summary()
        rows = {
            v: [("", m, float(val)) for m, val in zip(LANDSCAPE_METRICS, summary[v], strict=True)]
            for v in running
        }
        self._add_rows(self.step, rows)

    @torch.no_grad()
    def _evaluate(self) -> None:
        """Test loss and accuracy in eval mode (BN uses running statistics)."""
        running = self._running()
        if not running:
            return
        n = self.x_test.shape[0]
        if self._background is not None:
            step = self.step
            self._background.evaluate(
                self.x_test,
                self.y_test,
                _EVAL_CHUNK,
                self.x_stats,
                lambda loss_sum, correct, errors: self._record_evaluation(
                    step, running, (loss_sum / n).tolist(), (correct / n).tolist(), errors
                ),
            )
            return
        self.model.eval()
        V = len(self.variant_names)
        loss_sum = torch.zeros(V, device=self.device)
        correct = torch.zeros(V, device=self.device)
        for i in range(0, n, _EVAL_CHUNK):
            xb, yb = self.x_test[i : i + _EVAL_CHUNK], self.y_test[i : i + _EVAL_CHUNK]
            logits, _ = self.model(xb)
            K = logits.shape[-1]
            loss_sum += (
                F.cross_entropy(logits.reshape(-1, K), yb.repeat(V), reduction="none")
                .view(V, -1)
                .sum(1)
            )
            correct += (logits.argmax(-1) == yb).sum(1)
        errors = self._running_stat_errors(running) if self.measure_layers else {}
        self.model.train()
        test_loss, test_acc = (loss_sum / n).tolist(), (correct / n).tolist()
        self._add_evaluation_rows(self.step, running, test_loss, test_acc, errors)

    def _add_evaluation_rows(
        self, step: int, running: list[int], test_loss, test_acc, errors: dict[int, list]
    ) -> None:
        rows = {
            v: [("", "test_loss", test_loss[v]), ("", "test_accuracy", test_acc[v])]
            + errors.get(v, [])
            for v in running
        }
        self._write_rows(step, rows)

    def _record_evaluation(
        self, step: int, running: list[int], test_loss, test_acc, error_table
    ) -> None:
        """Write an evaluation from the worker thread into the history, as _evaluate does."""
        errors: dict[int, list] = {}
        values = iter(error_table.tolist())  # one (mean, var) row per variant of each run
        for layer, start, stop in self._background.bn_runs:
            name = self.model.layer_names[layer]
            for v in range(start, stop):
                mean_err, var_err = next(values)
                if v in running:
                    errors.setdefault(v, []).extend(
                        [
                            (name, "running_mean_error", mean_err),
                            (name, "running_var_error", var_err),
                        ]
                    )
        self._add_evaluation_rows(step, running, test_loss, test_acc, errors)

    def _running_stat_errors(self, running: list[int]) -> dict[int, list]:
        """|running stat - the statistic over training examples|, per BN layer.

        The reference statistic is each BN input's mean and (unbiased) variance over up to
        1,024 training examples in one train-mode pass: what the running averages estimate.
        That pass runs with every BN momentum at 1, so each layer's running buffers become
        exactly those batch statistics, computed by the layer itself. Reading them back
        costs nothing, where computing them again from recorded inputs took longer than
        the pass. The buffers and momenta are restored afterwards.
        """
        self.model.train()
        stats = {v: self.model.bn_running_stats(v) for v in running}  # views of the buffers
        layers = []  # (layer index, layer name, the running variants with BN there)
        for li, name in enumerate(self.model.layer_names):
            have = [v for v in running if stats[v][li] is not None]
            if have:
                layers.append((li, name, have))
        if not layers:
            return {}

        def gather() -> list[torch.Tensor]:
            """Per layer, (variants, 2, C): running mean and variance; a copy."""
            return [
                torch.stack([torch.stack(stats[v][li]) for v in have]) for li, _, have in layers
            ]

        before = gather()
        momenta = [m.momentum for m in self._bn_layers]
        try:
            with preserved_state(self.model, []):
                for m in self._bn_layers:
                    m.momentum = 1.0  # running = (1 - 1) * running + 1 * batch
                self.model(self.x_stats)
                batch = gather()
        finally:
            for m, momentum in zip(self._bn_layers, momenta, strict=True):
                m.momentum = momentum
        # Per layer, every variant with BN there in a few stacked ops, and one copy to the
        # host at the end: a loop over variants with .item() cost more than the pass.
        errors = torch.cat([(b - a).abs().mean(-1) for a, b in zip(before, batch, strict=True)])
        values = iter(errors.tolist())
        out: dict[int, list] = {}
        for _, name, have in layers:
            for v in have:
                mean_err, var_err = next(values)
                out.setdefault(v, []).extend(
                    [(name, "running_mean_error", mean_err), (name, "running_var_error", var_err)]
                )
        return out
