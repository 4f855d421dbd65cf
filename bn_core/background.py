"""A lockstep MLP's logged-step measures, taken on a worker thread.

At a logged step the trainer measures every layer of every variant: the gradient measures
of the step just taken and a pass of the fixed probe batch (percentiles, histograms,
saturation). On the CPU that costs about three training steps, and most of it is
arithmetic that does not need the training loop at all. So for a lockstep MLP on the CPU,
the trainer copies the weights and gradients the measures read (a few hundred kilobytes)
and hands the copies to ``bn_core::lockstep_mlp_telemetry``, the compiled version of the
same measures, on a worker thread. That call holds no interpreter lock, so on a machine
with a second core it runs beside training instead of inside it; the training thread only
writes the finished numbers into the history.

The numbers come from the copies, so they are the same whenever the worker gets to them:
a run stays deterministic by seed. ``Trainer.history`` waits for the measures still out,
so whoever reads the history sees every logged step trained so far.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

from bn_core import native
from bn_core.batchnorm import BatchNorm
from bn_core.models import LockstepMLP, _NormGroups

__all__ = ["BackgroundTelemetry", "unavailable_reason"]

_ACTIVATION_CODE = {"sigmoid": 0, "tanh": 1, "relu": 2}
# Logged steps whose measures may be out at once. A worker that falls behind (one core,
# or several sessions sharing it) then slows training down to its pace instead of
# holding ever more copies of the weights.
MAX_PENDING = 4

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _worker() -> ThreadPoolExecutor:
    """The one worker thread every trainer of the process shares (started on first use)."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bn_core-telemetry")
        return _executor


def _cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def unavailable_reason(model: nn.Module, x_probe: torch.Tensor, activation: str) -> str | None:
    """None when ``model``'s measures can be taken on the worker, else why not."""
    if not isinstance(model, LockstepMLP):
        return "only a lockstep MLP's measures are compiled"
    if x_probe.device.type != "cpu" or x_probe.dtype != torch.float32:
        return "the compiled measures run on float32 CPU tensors"
    if activation not in _ACTIVATION_CODE:
        return f"activation {activation!r} is not compiled"
    for norm in model.norms:
        for bn in norm.groups:
            if type(bn) not in (BatchNorm, nn.BatchNorm1d):
                return f"{type(bn).__name__} is not compiled"
            if bn.weight is None or bn.running_mean is None:
                return "the compiled measures need BatchNorm with gamma, beta and running stats"
    if native.load_telemetry() is None:
        return "the compiled kernel is not built"
    if _cores() < 2:
        return "one core: a worker thread would only take turns with training"
    return None


class BackgroundTelemetry:
    """Snapshots a lockstep MLP and measures the snapshots on the worker thread.

    Each job's result goes to the callback it was queued with, on the caller's thread,
    in the order the jobs were queued, so the history receives logged steps in order.
    """

    def __init__(
        self,
        model: LockstepMLP,
        x_probe: torch.Tensor,
        cuts: torch.Tensor,
        *,
        activation: str,
        unit: int,
        layer_percentiles: tuple[float, ...],
        unit_percentiles: tuple[float, ...],
    ) -> None:
        self.model = model
        self.x_probe = x_probe
        self.cuts = cuts.flatten().contiguous()
        self.activation = _ACTIVATION_CODE[activation]
        self.before = model.placement == "before"
        self.unit = unit
        self.layer_percentiles = list(layer_percentiles)
        self.unit_percentiles = list(unit_percentiles)
        # Each BatchNorm run (variants [start, stop) sharing one module) and its layer.
        runs = []
        for layer, norm in enumerate(model.norms):
            assert isinstance(norm, _NormGroups)
            for index, bn in zip(norm.group_index, norm.groups, strict=True):
                runs.append((layer, index[0], index[-1] + 1, bn))
        self.bn_layer = [r[0] for r in runs]
        self.bn_start = [r[1] for r in runs]
        self.bn_stop = [r[2] for r in runs]
        self.bn_modules = [r[3] for r in runs]
        self.pending: deque[tuple[Future, Callable]] = deque()
        # A page may read the history on one thread while another trains: the queue is
        # handed out under this lock, so each result is recorded once and in order.
        self._lock = threading.Lock()

    @property
    def bn_runs(self) -> list[tuple[int, int, int]]:
        """(layer, first variant, last variant + 1) of each BatchNorm run."""
        return list(zip(self.bn_layer, self.bn_start, self.bn_stop, strict=True))

    def _submit(self, on_done: Callable, op, *args) -> None:
        self.record_finished()  # frees the copies of jobs that are done
        with self._lock:
            self.pending.append((_worker().submit(op, *args), on_done))

    def measure(self, lrs: list[float], records, on_done: Callable) -> None:
        """Queue a logged step's measures: ``on_done(table, counts, dead, grads)``.

        ``records`` are the training pass's LayerRecords (for the gradient w.r.t. each
        layer's output); see ``bn_core::lockstep_mlp_telemetry`` for the four tensors.
        """
        m = self.model
        L = len(m.weights)
        grads = [torch.zeros_like(w) if w.grad is None else w.grad for w in m.weights]
        bias_grads = [torch.zeros_like(b) if b.grad is None else b.grad for b in m.biases]
        empty = torch.empty(0)
        out_grads = [empty if r.output.grad is None else r.output.grad for r in records]
        gammas = [bn.weight for bn in self.bn_modules]
        betas = [bn.bias for bn in self.bn_modules]
        # One foreach copy of everything read: training changes it in place from the next op.
        with torch.no_grad():
            c = torch._foreach_mul(
                [*m.weights, *m.biases, *grads, *bias_grads, *out_grads, *gammas, *betas], 1.0
            )
        G = len(gammas)
        self._submit(
            lambda result: on_done(*(t.numpy() for t in result)),
            native.load_telemetry(),
            self.x_probe,
            c[:L],
            c[L : 2 * L],
            m.bias_mask,
            self.bn_layer,
            self.bn_start,
            self.bn_stop,
            c[5 * L : 5 * L + G],
            c[5 * L + G :],
            [float(bn.eps) for bn in self.bn_modules],
            self.activation,
            self.before,
            self.unit,
            self.cuts,
            self.layer_percentiles,
            self.unit_percentiles,
            c[2 * L : 3 * L],
            c[3 * L : 4 * L],
            c[4 * L : 5 * L],
            torch.tensor(lrs, dtype=torch.float32),
        )

    def evaluate(
        self, x_test, y_test, chunk: int, x_stats, on_done: Callable[[object, object, object], None]
    ) -> None:
        """Queue test loss, accuracy and running-stat errors: ``on_done(loss_sum, correct,
        errors)``, errors one (mean, var) row per variant of each BN run, run by run."""
        m = self.model
        L, G = len(m.weights), len(self.bn_modules)
        mods = self.bn_modules
        with torch.no_grad():
            c = torch._foreach_mul(
                [
                    *m.weights,
                    *m.biases,
                    m.out_weight,
                    m.out_bias,
                    *(bn.weight for bn in mods),
                    *(bn.bias for bn in mods),
                    *(bn.running_mean for bn in mods),
                    *(bn.running_var for bn in mods),
                ],
                1.0,
            )
        k = 2 * L + 2
        self._submit(
            lambda result: on_done(*(t.numpy() for t in result)),
            native.load_evaluation(),
            x_test,
            y_test,
            chunk,
            x_stats,
            c[:L],
            c[L : 2 * L],
            m.bias_mask,
            c[2 * L],
            c[2 * L + 1],
            self.bn_layer,
            self.bn_start,
            self.bn_stop,
            c[k : k + G],
            c[k + G : k + 2 * G],
            [float(bn.eps) for bn in mods],
            c[k + 2 * G : k + 3 * G],
            c[k + 3 * G :],
            self.activation,
            self.before,
        )

    def record_finished(self, wait: bool = False) -> None:
        """Hand the finished jobs' results to their callbacks, oldest first; with ``wait``,
        every job's. More than MAX_PENDING out waits for the oldest.

        Only a finished prefix of the queue is handed out, so results arrive in order.
        """
        with self._lock:
            while self.pending and (
                wait or len(self.pending) > MAX_PENDING or self.pending[0][0].done()
            ):
                future, on_done = self.pending.popleft()
                on_done(future.result())
