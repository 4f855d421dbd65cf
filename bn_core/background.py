"""A lockstep MLP's logged-step measures, taken on worker threads.

At a logged step the trainer measures every layer of every variant: the gradient measures
of the step just taken and a pass of the fixed probe batch (percentiles, histograms,
saturation); every so often it also evaluates the test set. On the CPU that costs about
three training steps, and most of it is arithmetic that does not need the training loop.
So for a lockstep MLP on the CPU the trainer copies the parameters and gradients the
measures read (about 1.6 MB for the Fig. 1 nets at MNIST size) and hands the copies to
``bn_core::lockstep_mlp_telemetry`` or ``lockstep_mlp_evaluation``, compiled versions of
the same measures, on a worker thread. Those calls hold no interpreter lock, so on a
machine with a spare core they run beside training instead of inside it; the training
thread only writes the finished numbers into the history.

The numbers come from the copies, so they are the same whenever a worker gets to them:
a run stays deterministic by seed. ``Trainer.history`` waits for the measures still out,
so whoever reads the history sees every logged step trained so far.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from torch import nn

from bn_core import native
from bn_core.batchnorm import BatchNorm
from bn_core.models import LockstepMLP

__all__ = ["MAX_PENDING", "BackgroundTelemetry", "unavailable_reason"]

_ACTIVATION_CODE = {"sigmoid": 0, "tanh": 1, "relu": 2}
# Jobs one trainer may have out once a new one is queued. A worker that falls behind
# (several sessions on few cores) then slows that training down to its pace instead of
# piling up copies of the weights.
MAX_PENDING = 4

_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _worker() -> ThreadPoolExecutor:
    """The worker threads every trainer of the process shares: one per core but the
    first, which the training threads use (started on first use). Each trainer records
    its results in the order it queued them, whichever worker finishes first."""
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=max(1, _cores() - 1), thread_name_prefix="bn_core-measures"
            )
        return _executor


def _cpu_quota(path: Path = Path("/sys/fs/cgroup/cpu.max")) -> float | None:
    """The container's CPU limit in cores (cgroup v2), None when there is none."""
    try:
        quota, period = path.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    return None if quota == "max" else int(quota) / int(period)


def _cores() -> int:
    """The cores this process may use: its CPU affinity, capped by a container limit."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    quota = _cpu_quota()
    return cores if quota is None else max(1, min(cores, int(quota)))


def unavailable_reason(model: nn.Module, x_probe: torch.Tensor, activation: str) -> str | None:
    """None when ``model``'s measures can be taken on a worker, else why not."""
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
            for index, bn in zip(norm.group_index, norm.groups, strict=True):
                runs.append((layer, index[0], index[-1] + 1, bn))
        self.bn_layer = [r[0] for r in runs]
        self.bn_start = [r[1] for r in runs]
        self.bn_stop = [r[2] for r in runs]
        self.bn_modules = [r[3] for r in runs]
        self.bn_eps = [float(bn.eps) for bn in self.bn_modules]
        self.pending: deque[tuple[Future, Callable]] = deque()
        # A page may read the history on one thread while another trains: the queue is
        # handed out under this lock, so each result is recorded once and in order.
        self._lock = threading.Lock()

    @property
    def bn_runs(self) -> list[tuple[int, int, int]]:
        """(layer, first variant, last variant + 1) of each BatchNorm run."""
        return list(zip(self.bn_layer, self.bn_start, self.bn_stop, strict=True))

    def _queue(self, future: Future, on_done: Callable) -> None:
        with self._lock:
            self.pending.append((future, on_done))
        self.record_finished()  # frees the copies of finished jobs; back-pressure

    def _submit(self, on_done: Callable, op, *args) -> None:
        """Run ``op(*args)`` on a worker; ``on_done`` gets its tensors as numpy arrays."""
        future = _worker().submit(op, *args)
        self._queue(future, lambda result: on_done(*(t.numpy() for t in result)))

    def in_order(self, record: Callable[[], None]) -> None:
        """Run ``record`` after the results queued before it are recorded: rows the
        trainer writes in line stay behind the measures of earlier steps."""
        if not self.pending:
            record()
            return
        done: Future = Future()
        done.set_result(None)
        self._queue(done, lambda _: record())

    def measure(self, lrs: list[float], records, on_done: Callable) -> None:
        """Queue a logged step's measures: ``on_done(table, counts, dead, grads)``.

        ``records`` are the training pass's LayerRecords (for the gradient w.r.t. each
        layer's output); see ``bn_core::lockstep_mlp_telemetry`` for the four tensors.
        """
        m = self.model
        L = len(m.weights)
        stacks = m.layer_stacks()  # gradients, zeros where there is none
        empty = torch.empty(0)
        with torch.no_grad():
            # The output gradients are as large as the batch's activations: their norms,
            # one small op per layer, are taken here instead of copying them.
            out_norms = [
                empty if r.output.grad is None else r.output.grad.flatten(1).norm(dim=1)
                for r in records
            ]
            # One foreach copy of what the worker reads: training changes it in place
            # from the next op on.
            c = torch._foreach_mul(
                [
                    *m.weights,
                    *m.biases,
                    *(s.weight_grad for s in stacks),
                    *(s.bias_grad for s in stacks),
                    *(bn.weight for bn in self.bn_modules),
                    *(bn.bias for bn in self.bn_modules),
                ],
                1.0,
            )
        G = len(self.bn_modules)
        self._submit(
            on_done,
            native.load_telemetry(),
            self.x_probe,
            c[:L],
            c[L : 2 * L],
            m.bias_mask,
            self.bn_layer,
            self.bn_start,
            self.bn_stop,
            c[4 * L : 4 * L + G],
            c[4 * L + G :],
            self.bn_eps,
            self.activation,
            self.before,
            self.unit,
            self.cuts,
            self.layer_percentiles,
            self.unit_percentiles,
            c[2 * L : 3 * L],
            c[3 * L : 4 * L],
            out_norms,
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
            on_done,
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
            self.bn_eps,
            c[k + 2 * G : k + 3 * G],
            c[k + 3 * G :],
            self.activation,
            self.before,
        )

    def record_finished(self, wait: bool = False) -> None:
        """Hand the finished jobs' results to their callbacks, oldest first; with ``wait``,
        every job's. More than MAX_PENDING out waits for the oldest. A job that failed
        raises here, once, and the jobs after it stay queued.

        Only a finished prefix of the queue is handed out, so results arrive in order.
        """
        with self._lock:
            while self.pending and (
                wait or len(self.pending) > MAX_PENDING or self.pending[0][0].done()
            ):
                future, on_done = self.pending.popleft()
                on_done(future.result())
