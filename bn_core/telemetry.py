"""The measures taken at a logged step and at an evaluation, for every variant and layer.

The Trainer hands a logged step's layer records (the activations of the training batch,
with their gradients after backward) to ``Telemetry.logged_step`` and asks for an
evaluation with ``Telemetry.evaluate``. Every measure works on stacked rows (one row per
variant, a block per layer), so a logged step costs a few tensor ops however many
variants a run has, and its numbers reach the host in one copy per kind.

Rows reach the History as (layer, metric, value) per variant; layer "" is the whole net.

Measurements run in inference mode: none of their tensors ever takes part in a backward
pass, so autograd keeps no version counters or view records for them (the default run's
probe took 2.92 ms per logged step under no_grad, 2.67 ms in inference mode).
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from bn_core.config import RunConfig
from bn_core.history import History
from bn_core.models import LayerRecord, batch_statistics_pass, preserved_state
from bn_core.probes import (
    BAND_PERCENTILES,
    FIG1_PERCENTILES,
    postact_range,
    row_histogram,
    row_histogram_and_percentiles,
    row_percentiles,
    row_std,
    saturation_fraction,
)

__all__ = ["PROBE_METRICS", "Telemetry", "bn_layers"]

# The columns the probe measures per layer and variant, in order.
PROBE_METRICS = (
    *(f"preact_p{p:g}" for p in FIG1_PERCENTILES),
    *(f"preact_band_p{p:g}" for p in BAND_PERCENTILES),
    *(f"unit_p{p:g}" for p in FIG1_PERCENTILES),
    "preact_mean",
    "preact_std",
    "preact_clipped",
    "saturation",
)
# Test examples per evaluation pass: a chunk's activations stay in cache (for the Fig. 1
# MLP on 10,000 MNIST-sized examples, 75 ms in chunks of 1,024 against 90 ms in 4,096).
EVAL_CHUNK = 1024
STATS_EXAMPLES = 1024  # train examples used as "the training set" for running-stat errors

Rows = dict[int, list[tuple[str, str, float]]]  # variant index -> (layer, metric, value)


def bn_layers(model: nn.Module) -> list[nn.Module]:
    """Every BatchNorm layer in ``model`` (ours and torch's): those with running statistics."""
    return [
        m
        for m in model.modules()
        if getattr(m, "running_mean", None) is not None and hasattr(m, "momentum")
    ]


class Telemetry:
    """Writes a run's measures into its History."""

    def __init__(
        self,
        config: RunConfig,
        model: nn.Module,
        history: History,
        variant_names: list[str],
        x_probe: torch.Tensor,
        x_stats: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        measure_layers: bool = True,
    ) -> None:
        self.config = config
        self.model = model
        self.history = history
        self.variant_names = variant_names
        self.x_probe, self.x_stats = x_probe, x_stats
        self.x_test, self.y_test = x_test, y_test
        self.measure_layers = measure_layers
        self.bn_layers = bn_layers(model)
        self._weights_before: list[torch.Tensor] | None = None  # a logged step's weights
        h, bins = config.hist_range, config.hist_bins
        lo, hi = postact_range(config.activation, h)
        history.set_bin_edges("preact", torch.linspace(-h, h, bins + 1).numpy())
        history.set_bin_edges("postact", torch.linspace(lo, hi, bins + 1).numpy())

    def write(self, step: int, rows: Rows) -> None:
        for v, variant_rows in rows.items():
            self.history.add_many(step, self.variant_names[v], variant_rows)

    # --- a logged step --------------------------------------------------------------------
    @staticmethod
    def watch(records: list[LayerRecord]) -> None:
        """Keep the gradient of each layer's output through the coming backward pass."""
        for r in records:
            if r.output.requires_grad:
                r.output.retain_grad()

    def logged_step(
        self,
        step: int,
        running: list[int],
        loss: list[float],
        records: list[LayerRecord],
    ) -> None:
        """The training loss over the window, this step's gradient measures, and the probe.

        The weights are kept as they are now, so ``after_update`` can measure the step the
        optimizer actually takes."""
        rows: Rows = {v: [("", "loss", loss[v])] for v in running}
        # A long run's bounded History keeps only every stride-th step: measuring the
        # others would be work it throws away.
        keeps = self.history.keeps(step) or self.history.keeps_histograms(step)
        if self.measure_layers and running and keeps:
            self._gradient_measures(running, records, rows)
            self._probe(step, running, rows)
            self._weights_before = [s.weight.detach().clone() for s in self.model.layer_stacks()]
        self.write(step, rows)

    @torch.inference_mode()
    def after_update(self, step: int, running: list[int]) -> None:
        """The update:data ratio of a logged step, from the change the optimizer applied:

            update_ratio = log10( std(W_{t+1} - W_t) / std(W_t) )   per weight matrix

        Karpathy's std(lr * grad) / std(W) is that step only for plain SGD; under momentum
        or Adam the step is not lr * grad, so the ratio is read off the weights themselves.
        """
        before, self._weights_before = self._weights_before, None
        if before is None or not running:
            return
        names = self.model.layer_names
        after = [s.weight for s in self.model.layer_stacks()]
        ratios = []
        for a, b in zip(after, before, strict=True):
            # std(W_{t+1} - W_t) and std(W_t) of every variant as one block of 2V rows
            std = row_std(torch.stack([a - b, b]).flatten(2).flatten(0, 1)).view(2, -1)
            ratios.append(std[0] / std[1])
        # (layers, variants); a layer that did not move reads -inf: log10(0).
        table = torch.log10(torch.stack(ratios)).tolist()
        rows: Rows = {
            v: [(name, "update_ratio", table[li][v]) for li, name in enumerate(names)]
            for v in running
        }
        self.write(step, rows)

    @torch.inference_mode()
    def _gradient_measures(
        self, running: list[int], records: list[LayerRecord], rows: Rows
    ) -> None:
        """Per layer and variant: the norms of the weight gradient, the bias, the bias
        gradient and the gradient of the layer's output."""
        V = len(self.variant_names)
        kinds = ("grad_norm", "bias_norm", "bias_grad_norm", "out_grad_norm")
        tensors, keys = [], []  # one tensor per norm; (layer name, metric) of each block
        for stack, rec, name in zip(
            self.model.layer_stacks(), records, self.model.layer_names, strict=True
        ):
            out_grad = rec.output.grad  # None when the output was not watched
            blocks = (stack.weight_grad, stack.bias, stack.bias_grad, out_grad)
            for metric, block in zip(kinds, blocks, strict=True):
                if block is not None:
                    tensors += block.unbind(0)  # one tensor per variant
                    keys.append((name, metric))
        # Every norm of the step in one fused call: the cost is the number of ops.
        norms = torch.stack(torch._foreach_norm(tensors)).float().view(-1, V).tolist()
        for (name, metric), per_variant in zip(keys, norms, strict=True):
            # bias_grad_norm is 0 (to rounding) when BN follows: the bias is redundant there.
            for v in running:
                rows[v].append((name, metric, per_variant[v]))

    @torch.inference_mode()
    def _probe(self, step: int, running: list[int], rows: Rows) -> None:
        """Distributions on the fixed probe batch, BN using that batch's statistics.

        Measuring on one fixed batch keeps batch-to-batch noise out of the curves, and the
        running averages are left alone, so the measurement leaves training untouched.
        """
        cfg = self.config
        with batch_statistics_pass(self.model):
            _, records = self.model(self.x_probe, record=True)
        every = len(self.variant_names) == len(running)
        idx = None if every else torch.tensor(running, device=self.x_probe.device)
        h, bins = cfg.hist_range, cfg.hist_bins
        lo, hi = postact_range(cfg.activation, h)
        keep_histograms = self.history.keeps_histograms(step)
        # Layers of one shape are measured as one block of (layers x variants) rows, so a
        # logged step costs the same few tensor ops however deep the net (conv and fc
        # layers differ in shape and form separate blocks).
        by_shape: dict[tuple[int, ...], list[int]] = {}
        for li, rec in enumerate(records):
            by_shape.setdefault(tuple(rec.preact.shape), []).append(li)
        for layer_ids in by_shape.values():

            def block(values: list[torch.Tensor], layer_ids=layer_ids) -> torch.Tensor:
                """(layers * variants, ...): the running variants' rows, layer by layer."""
                picked = [values[li] if every else values[li][idx] for li in layer_ids]
                return torch.stack(picked).flatten(0, 1)

            preact = block([r.preact for r in records])
            post = block([r.postact for r in records])
            pre = preact.flatten(1)
            # One unit (one channel of a conv layer), as Fig. 1 follows one sigmoid.
            unit = preact[:, :, cfg.probe_unit].flatten(1)
            pooled = FIG1_PERCENTILES + BAND_PERCENTILES
            pre_hist, clipped, pre_percentiles = row_histogram_and_percentiles(
                pre, -h, h, bins, pooled
            )
            histograms = None
            if keep_histograms:
                post_hist, _ = row_histogram(post.flatten(1), lo, hi, bins)
                histograms = (pre_hist.cpu().numpy(), post_hist.cpu().numpy())
            saturated = saturation_fraction(post, cfg.activation, cfg.saturation_threshold)
            columns = torch.cat(
                [
                    pre_percentiles,
                    row_percentiles(unit, FIG1_PERCENTILES),
                    pre.mean(1, keepdim=True),
                    row_std(pre).unsqueeze(1),
                    clipped.unsqueeze(1).to(pre.dtype),
                    saturated.unsqueeze(1).to(pre.dtype),
                ],
                dim=1,
            )
            table = columns.double().cpu().numpy()  # (layers * variants, PROBE_METRICS)
            for i, (li, ri) in enumerate(itertools.product(layer_ids, range(len(running)))):
                name, v = self.model.layer_names[li], running[ri]
                rows[v] += [
                    (name, metric, float(value))
                    for metric, value in zip(PROBE_METRICS, table[i], strict=True)
                ]
                if histograms is not None:
                    variant = self.variant_names[v]
                    for kind, counts in zip(("preact", "postact"), histograms, strict=True):
                        self.history.add_histogram(step, variant, name, kind, counts[i])

    # --- an evaluation --------------------------------------------------------------------
    @torch.inference_mode()
    def evaluate(self, step: int, running: list[int]) -> None:
        """Test loss and accuracy in eval mode (BN uses running statistics), and the
        running statistics' errors."""
        if not running:
            return
        model = self.model
        model.eval()
        n, V = self.x_test.shape[0], len(self.variant_names)
        loss_sum = torch.zeros(V, device=self.x_test.device)
        correct = torch.zeros(V, device=self.x_test.device)
        for i in range(0, n, EVAL_CHUNK):
            xb, yb = self.x_test[i : i + EVAL_CHUNK], self.y_test[i : i + EVAL_CHUNK]
            logits, _ = model(xb)
            K = logits.shape[-1]
            loss = F.cross_entropy(logits.reshape(-1, K), yb.repeat(V), reduction="none")
            loss_sum += loss.view(V, -1).sum(1)
            correct += (logits.argmax(-1) == yb).sum(1)
        model.train()
        test_loss, test_acc = (loss_sum / n).tolist(), (correct / n).tolist()
        rows: Rows = {
            v: [("", "test_loss", test_loss[v]), ("", "test_accuracy", test_acc[v])]
            for v in running
        }
        if self.measure_layers:
            for v, errors in self._running_stat_errors(running).items():
                rows[v] += errors
        self.write(step, rows)

    def _running_stat_errors(self, running: list[int]) -> Rows:
        """|running stat - the statistic over training examples|, per BN layer.

        The reference statistic is each BN input's mean and (unbiased) variance over up to
        1,024 training examples in one train-mode pass: what the running averages estimate.
        That pass runs with every BN momentum at 1, so each layer's running buffers become
        exactly those batch statistics, computed by the layer itself. The buffers and
        momenta are restored afterwards.
        """
        stats = {v: self.model.bn_running_stats(v) for v in running}  # views of the buffers
        layers = []  # (layer name, index, the running variants with BN there)
        for li, name in enumerate(self.model.layer_names):
            have = [v for v in running if stats[v][li] is not None]
            if have:
                layers.append((name, li, have))
        if not layers:
            return {}

        def gather() -> list[torch.Tensor]:
            """Per layer, (variants, 2, C): running mean and variance; a copy."""
            return [
                torch.stack([torch.stack(stats[v][li]) for v in have]) for _, li, have in layers
            ]

        before = gather()
        momenta = [m.momentum for m in self.bn_layers]
        try:
            with preserved_state(self.model, []):
                for m in self.bn_layers:
                    m.momentum = 1.0  # running = (1 - 1) * running + 1 * batch
                # Only the variants with running statistics: the others' work would be lost.
                self.model(self.x_stats, variants=self.model.running_stat_variants())
                batch = gather()
        finally:
            for m, momentum in zip(self.bn_layers, momenta, strict=True):
                m.momentum = momentum
        errors = torch.cat([(b - a).abs().mean(-1) for a, b in zip(before, batch, strict=True)])
        values = iter(errors.tolist())  # one (mean, var) pair per layer and variant
        out: Rows = {}
        for name, _, have in layers:
            for v in have:
                mean_err, var_err = next(values)
                out.setdefault(v, []).extend(
                    [(name, "running_mean_error", mean_err), (name, "running_var_error", var_err)]
                )
        return out
