"""Small batches and inference: BN against the per-example norms at batch sizes 2 to 60.

BatchNorm trains with the statistics of each mini-batch and predicts with running
averages of them. With a batch of B examples, mu_B has a standard deviation of
sigma / sqrt(B), and a unit's normalized value depends on which other examples share its
batch; at B = 2 each channel's x_hat is about -1 for one example and +1 for the other. The
net learns to cope with that noise, and eval mode then hands it steady population
estimates instead (Ioffe 2017, "Batch Renormalization"). LayerNorm and GroupNorm
normalize each example over its own features, so they compute the same thing at any batch
size, in training and at test (Wu & He 2018 report GN's ImageNet error flat from batch 32
down to 2, where BN's rises).

``SmallBatchStudy`` trains plain, batchnorm, layernorm and groupnorm from the same weights
at each batch size for the same number of steps, advanced in time slices as ``LrSweep``
is, and then reads each batch size's numbers: BN's test accuracy in eval mode and in train
mode, the per-example norms' accuracy and the running statistics' error. It also tries BN
at batch 1 and keeps its refusal, while the per-example norms train there. ``study_checks``
are the sentences the page says across batch sizes, each with its numbers and a verdict.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from bn_core.config import ConfigError, RunConfig, load_preset
from bn_core.data import Dataset, load_dataset
from bn_core.models import batch_statistics_pass
from bn_core.train import RunQueue, Trainer

__all__ = [
    "BATCH_SIZES",
    "DEFAULT_STEPS",
    "MAX_STEPS",
    "MIN_STEPS",
    "PRESET",
    "BatchOne",
    "BatchSizeRow",
    "SmallBatchStudy",
    "StudyCheck",
    "StudyResult",
    "batch_one_config_refusal",
    "batch_one_layer_refusal",
    "batch_statistics_accuracy",
    "check_steps",
    "study_checks",
]

PRESET = "small-batch"  # the study's net, data, optimizer and seed; its batch size is varied
BATCH_SIZES = (2, 4, 8, 16, 60)
STUDY_VARIANTS = ("plain", "batchnorm", "layernorm", "groupnorm")
BATCH_ONE_VARIANTS = ("plain", "layernorm", "groupnorm")  # BN refuses batch 1
PER_EXAMPLE = ("layernorm", "groupnorm")
MIN_STEPS, MAX_STEPS, DEFAULT_STEPS = 100, 5000, 1000


def check_steps(steps: object) -> int:
    """``steps`` as an int, or a ConfigError naming the field, the value and the range."""
    allowed = f"allowed: an integer in [{MIN_STEPS}, {MAX_STEPS:,}]"
    if isinstance(steps, bool) or not isinstance(steps, int | float):
        raise ConfigError("steps", steps, allowed)
    if isinstance(steps, float) and not (math.isfinite(steps) and steps.is_integer()):
        raise ConfigError("steps", steps, allowed)
    if not MIN_STEPS <= steps <= MAX_STEPS:
        raise ConfigError("steps", steps, allowed)
    return int(steps)


@dataclass(frozen=True)
class BatchSizeRow:
    """One batch size's numbers, all read at its run's last step."""

    batch_size: int
    steps: int
    accuracy: dict[str, float]  # eval-mode test accuracy per variant (BN: running statistics)
    bn_train_mode_accuracy: float  # BN normalizing each test batch of batch_size by itself
    running_mean_error: float  # mean over BN's layers of |running mean - mean|, per channel
    running_var_error: float  # the same for the variance
    # running_var_error over the running variance's own size, mean over layers: the
    # absolute error grows with the scale of the weights in front of BN, which differs
    # from one batch size to the next.
    relative_var_error: float
    diverged: dict[str, int]  # variant -> step, for the variants that diverged

    @property
    def examples(self) -> int:
        return self.steps * self.batch_size

    @property
    def bn_mode_gap(self) -> float:
        """BN's train-mode accuracy minus its eval-mode accuracy."""
        return self.bn_train_mode_accuracy - self.accuracy["batchnorm"]


@dataclass(frozen=True)
class BatchOne:
    """What happens at batch 1: BN's refusals, and the per-example norms trained there."""

    config_refusal: str  # RunConfig's message for a BN variant at batch_size 1
    layer_refusal: str  # our BatchNorm layer's message, in the BN net, given one example
    steps: int  # steps the per-example norms and the plain net trained at batch 1
    accuracy: dict[str, float] | None  # None until that run is done


@dataclass(frozen=True)
class StudyResult:
    rows: list[BatchSizeRow]  # the batch sizes done so far, smallest first
    batch_one: BatchOne
    steps: int  # per batch size
    batch_sizes: tuple[int, ...]  # every batch size of the study, done or not
    test_examples: int
    steps_done: int
    steps_total: int
    training: int | None  # the batch size training now or next (None: all done)

    @property
    def finished(self) -> bool:
        return self.steps_done >= self.steps_total

    def row(self, batch_size: int) -> BatchSizeRow | None:
        return next((r for r in self.rows if r.batch_size == batch_size), None)


@dataclass(frozen=True)
class StudyCheck:
    """A sentence about the study's outcome, checked on it; ``holds`` None: not yet."""

    says: str
    otherwise: str
    measured: dict[str, float] = field(default_factory=dict)
    threshold: str = ""
    holds: bool | None = None
    reason: str = ""

    @property
    def sentence(self) -> str:
        return self.otherwise if self.holds is False else self.says

    def measured_text(self) -> str:
        return ", ".join(f"{name} {value:.3g}" for name, value in self.measured.items())


# --- batch 1 -----------------------------------------------------------------------------
def batch_one_config_refusal(base: RunConfig) -> str:
    """RunConfig's message for the study's BN net at batch size 1."""
    try:
        base.replace(batch_size=1, variants=list(STUDY_VARIANTS))
    except ConfigError as err:
        return str(err)
    raise AssertionError("RunConfig accepted BatchNorm at batch_size 1")


def batch_one_layer_refusal(trainer: Trainer) -> str:
    """The message our BatchNorm layer gives when the BN net of ``trainer`` is trained on
    one example: its first BN layer, in training mode, sees one value per channel."""
    net = trainer.model.to_sequential(trainer.variant_names.index("batchnorm")).train()
    with torch.no_grad():
        try:
            net(trainer.x_train[:1])
        except ValueError as err:
            return str(err)
    raise AssertionError("BatchNorm trained on a batch of one example")


# --- train-mode accuracy ----------------------------------------------------------------
@torch.no_grad()
def batch_statistics_accuracy(trainer: Trainer, batch_size: int, seed: int = 0) -> np.ndarray:
    """Each variant's test accuracy in train mode: BN normalizes every test batch with that
    batch's own statistics, as in training; running statistics are neither read nor moved.

    The batches have the size the net trained with, because that size is what BN's
    training taught it: with B examples mu_B wanders by sigma / sqrt(B) and x_hat takes
    the shape B examples give it (two values of -1 and +1 at B = 2). One batch of the whole
    test set would instead normalize with near-population statistics, as eval mode does.
    The test set is shuffled (seeded) and cut into batches of ``batch_size``; the last one
    is topped up with examples already scored, whose second predictions are not counted,
    so every test example is predicted once, in a batch of exactly ``batch_size``.
    """
    model = trainer.model
    x, y = trainer.telemetry.x_test, trainer.telemetry.y_test
    n = x.shape[0]
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(x.device)
    order = torch.cat([order, order[: (-n) % batch_size]])
    correct = torch.zeros(len(trainer.variant_names), device=x.device)
    was_training = model.training
    model.train()
    try:
        with batch_statistics_pass(model):
            for start in range(0, n, batch_size):
                index = order[start : start + batch_size]
                logits, _ = model(x[index])
                scored = min(batch_size, n - start)  # the top-up examples are not scored
                hits = logits.argmax(-1)[:, :scored] == y[index[:scored]]
                correct += hits.sum(1)
    finally:
        model.train(was_training)
    return (correct / n).cpu().numpy()


# --- the study ---------------------------------------------------------------------------
class SmallBatchStudy(RunQueue):
    """plain, batchnorm, layernorm and groupnorm at each batch size, from the same weights;
    then plain, layernorm and groupnorm at batch 1. Advance it in time slices."""

    def __init__(
        self,
        base: RunConfig | None = None,
        steps: int = DEFAULT_STEPS,
        batch_sizes: tuple[int, ...] = BATCH_SIZES,
        dataset: Dataset | None = None,
    ) -> None:
        base = load_preset(PRESET) if base is None else base
        self.steps = check_steps(steps)
        if not batch_sizes or any(b < 2 for b in batch_sizes):
            raise ConfigError(
                "batch_sizes", list(batch_sizes), "allowed: batch sizes of at least 2"
            )
        if dataset is None:
            dataset = load_dataset(
                base.dataset, seed=base.seed, noise=base.noise, probe_size=base.probe_size
            )
        self.base = base
        self.batch_sizes = tuple(sorted(set(batch_sizes)))
        self.dataset = dataset
        common = {
            "steps": self.steps,
            # Running-stat errors need the per-layer measures; a probe every tenth of the
            # run keeps their cost small.
            "telemetry_every": max(1, self.steps // 10),
            # Evaluations at the base config's own cadence: the study's run at the
            # small-batch preset's batch size is then that preset's run, and the preset's
            # claims read the same numbers from it (the rows read the last evaluation).
            "eval_every": base.eval_every,
            "ics_every": 0,
            "landscape_every": 0,
        }
        # Same seed, net and data in every run: every variant at every batch size starts
        # from the same weights; only the batches differ.
        self.trainers = [
            Trainer(
                base.replace(batch_size=b, variants=list(STUDY_VARIANTS), **common),
                dataset,
            )
            for b in self.batch_sizes
        ]
        self.batch_one_trainer = Trainer(
            base.replace(batch_size=1, variants=list(BATCH_ONE_VARIANTS), **common), dataset
        )
        self.config_refusal = batch_one_config_refusal(base)
        self.layer_refusal = batch_one_layer_refusal(self.trainers[0])
        self._rows: dict[int, BatchSizeRow] = {}

    def queue(self) -> list[Trainer]:
        """The batch-size runs, largest last, then the batch-1 run."""
        return [*self.trainers, self.batch_one_trainer]

    def trainer(self, batch_size: int) -> Trainer:
        """The run at ``batch_size`` (1: the per-example norms and the plain net)."""
        for trainer in self.queue():
            if trainer.config.batch_size == batch_size:
                return trainer
        sizes = ", ".join(str(b) for b in (*self.batch_sizes, 1))
        raise ConfigError("batch_size", batch_size, f"allowed: one of this study's: {sizes}")

    @property
    def training(self) -> int | None:
        """The batch size of the run that trains next (None when all are done)."""
        return next((t.config.batch_size for t in self.queue() if not t.finished), None)

    def result(self) -> StudyResult:
        """The numbers of every batch size whose run is done (rows of runs still training
        would mix steps); BN's batch-1 refusals from the start."""
        for trainer in self.trainers:
            b = trainer.config.batch_size
            if trainer.finished and b not in self._rows:
                self._rows[b] = _row(trainer, self.base.seed)
        one = self.batch_one_trainer
        accuracy = None
        if one.finished:
            accuracy = {v: _last(one, v, "", "test_accuracy") for v in one.variant_names}
        return StudyResult(
            rows=[self._rows[b] for b in self.batch_sizes if b in self._rows],
            batch_one=BatchOne(self.config_refusal, self.layer_refusal, self.steps, accuracy),
            steps=self.steps,
            batch_sizes=self.batch_sizes,
            test_examples=int(self.dataset.x_test.shape[0]),
            steps_done=self.steps_done,
            steps_total=self.steps_total,
            training=self.training,
        )


def _last(trainer: Trainer, variant: str, layer: str, metric: str) -> float:
    _, values = trainer.history.series(variant, layer, metric)
    return float(values[-1]) if len(values) else math.nan


def _row(trainer: Trainer, seed: int) -> BatchSizeRow:
    b = trainer.config.batch_size
    names = trainer.variant_names
    bn = names.index("batchnorm")
    history = trainer.history
    layers = history.layers("batchnorm")
    mean_errors = [_last(trainer, "batchnorm", layer, "running_mean_error") for layer in layers]
    var_errors = [_last(trainer, "batchnorm", layer, "running_var_error") for layer in layers]
    # The running variances now, at the step the last errors were measured (the last one).
    running_vars = [stats[1] for stats in trainer.model.bn_running_stats(bn) if stats is not None]
    relative = [err / float(var.mean()) for err, var in zip(var_errors, running_vars, strict=True)]
    diverged = {s.name: s.diverged_at for s in trainer.status if s.diverged_at is not None}
    return BatchSizeRow(
        batch_size=b,
        steps=trainer.step,
        accuracy={v: _last(trainer, v, "", "test_accuracy") for v in names},
        bn_train_mode_accuracy=float(batch_statistics_accuracy(trainer, b, seed)[bn]),
        running_mean_error=float(np.mean(mean_errors)),
        running_var_error=float(np.mean(var_errors)),
        relative_var_error=float(np.mean(relative)),
        diverged=diverged,
    )


# --- what the study shows across batch sizes --------------------------------------------
def study_checks(result: StudyResult) -> list[StudyCheck]:
    """The page's sentences about the outcome across batch sizes, each checked on
    ``result``. A check waits (``holds`` None) until its batch sizes are done, and says so
    when the study has not trained them at all."""
    return [
        _bn_behind_per_example_norms(result, 2),
        _train_mode_costs_accuracy(result, 4),
        _running_variance_worse(result, 2, 60),
        _modes_agree(result, 60),
        _per_example_norms_learn_at_batch_one(result),
    ]


def _pending(says: str, otherwise: str, threshold: str, result: StudyResult, *sizes: int):
    """The check unmeasured, with why: a batch size not in the study, or not done yet."""
    absent = [b for b in sizes if b not in result.batch_sizes]
    if absent:
        reason = f"this study has no batch {absent[0]}"
    else:
        reason = "waits for batch " + " and ".join(str(b) for b in sizes)
    return StudyCheck(says, otherwise, threshold=threshold, reason=reason)


def _bn_behind_per_example_norms(result: StudyResult, b: int) -> StudyCheck:
    says = (
        f"At batch {b}, BN in eval mode ends at least 5 points of test accuracy below both "
        "LayerNorm and GroupNorm, trained from the same weights on the same batches."
    )
    otherwise = (
        f"On this study, BN's eval-mode accuracy at batch {b} is not 5 points below both "
        "LayerNorm's and GroupNorm's."
    )
    threshold = f"min(layernorm, groupnorm) − batchnorm ≥ 0.05 at batch {b}"
    row = result.row(b)
    if row is None:
        return _pending(says, otherwise, threshold, result, b)
    gap = min(row.accuracy[v] for v in PER_EXAMPLE) - row.accuracy["batchnorm"]
    measured = {
        "batchnorm (eval mode)": row.accuracy["batchnorm"],
        **{v: row.accuracy[v] for v in PER_EXAMPLE},
        "gap": gap,
    }
    return StudyCheck(says, otherwise, measured, threshold, holds=gap >= 0.05)


def _train_mode_costs_accuracy(result: StudyResult, b: int) -> StudyCheck:
    says = (
        f"At batch {b}, normalizing each test batch of {b} by its own statistics (train mode) "
        "costs BN at least 8 points of test accuracy against its running statistics (eval "
        f"mode): a prediction then depends on which {b - 1} other examples share its batch."
    )
    otherwise = (
        f"On this study, BN's train mode at batch {b} is not 8 points less accurate than "
        "its eval mode."
    )
    threshold = f"eval mode − train mode ≥ 0.08 at batch {b}"
    row = result.row(b)
    if row is None:
        return _pending(says, otherwise, threshold, result, b)
    gap = -row.bn_mode_gap
    measured = {
        "eval mode": row.accuracy["batchnorm"],
        "train mode": row.bn_train_mode_accuracy,
        "gap": gap,
    }
    return StudyCheck(says, otherwise, measured, threshold, holds=gap >= 0.08)


def _running_variance_worse(result: StudyResult, small: int, large: int) -> StudyCheck:
    says = (
        f"BN's running variances are further off at batch {small} than at batch {large}: "
        "relative to their own size, their error is at least 5× larger."
    )
    otherwise = (
        f"On this study, BN's relative running-variance error at batch {small} is less than "
        f"5× that at batch {large}."
    )
    threshold = f"relative var error at batch {small} / at batch {large} ≥ 5"
    rows = result.row(small), result.row(large)
    if rows[0] is None or rows[1] is None:
        return _pending(says, otherwise, threshold, result, small, large)
    a, b = rows[0].relative_var_error, rows[1].relative_var_error
    ratio = a / b if b > 0 else math.inf
    measured = {f"batch {small}": a, f"batch {large}": b, "ratio": ratio}
    return StudyCheck(says, otherwise, measured, threshold, holds=ratio >= 5)


def _modes_agree(result: StudyResult, b: int) -> StudyCheck:
    says = f"At batch {b}, BN's eval mode and train mode agree within 3 points of test accuracy."
    otherwise = f"On this study, BN's eval and train modes at batch {b} differ by 3 points or more."
    threshold = f"|eval mode − train mode| ≤ 0.03 at batch {b}"
    row = result.row(b)
    if row is None:
        return _pending(says, otherwise, threshold, result, b)
    measured = {
        "eval mode": row.accuracy["batchnorm"],
        "train mode": row.bn_train_mode_accuracy,
        "gap": -row.bn_mode_gap,
    }
    return StudyCheck(says, otherwise, measured, threshold, holds=abs(row.bn_mode_gap) <= 0.03)


def _per_example_norms_learn_at_batch_one(result: StudyResult) -> StudyCheck:
    says = (
        "At batch 1, where BN refuses to train, LayerNorm and GroupNorm still learn: both "
        "end at least 15 points of test accuracy above the plain net trained on the same "
        "single examples."
    )
    otherwise = (
        "On this study, LayerNorm or GroupNorm at batch 1 ends less than 15 points above "
        "the plain net."
    )
    threshold = "min(layernorm, groupnorm) − plain ≥ 0.15 at batch 1"
    accuracy = result.batch_one.accuracy
    if accuracy is None:
        return StudyCheck(says, otherwise, threshold=threshold, reason="waits for batch 1")
    gap = min(accuracy[v] for v in PER_EXAMPLE) - accuracy["plain"]
    measured = {**{v: accuracy[v] for v in (*PER_EXAMPLE, "plain")}, "gap": gap}
    return StudyCheck(says, otherwise, measured, threshold, holds=gap >= 0.15)
