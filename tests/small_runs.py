"""The small digits run the trainer tests start from: two layers of 16, probes every 5
steps, evaluations every 20, a 50-example probe batch; and one whose plain net diverges."""

from __future__ import annotations

from bn_core.config import RunConfig


def small(**kw) -> RunConfig:
    base = dict(
        dataset="digits",
        depth=2,
        width=16,
        batch_size=32,
        steps=60,
        lr=0.5,
        telemetry_every=5,
        eval_every=20,
        probe_size=50,
        probe_unit=3,
        device="cpu",
        variants=["plain", "batchnorm"],
    )
    return RunConfig(**{**base, **kw})


def diverging_config(**kw) -> RunConfig:
    """ReLU from a wide init at lr 10 with momentum: plain diverges, batchnorm trains on."""
    return small(activation="relu", init_std=1.0, lr=10.0, momentum=0.9, steps=60, **kw)
