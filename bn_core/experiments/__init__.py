"""The lab's experiments: bias blow-up, inside BN, ICS, landscape probes, the sweep."""

from __future__ import annotations

from bn_core.config import RunConfig
from bn_core.data import Dataset
from bn_core.experiments.ics import IcsMeasure
from bn_core.experiments.landscape import LandscapeMeasure
from bn_core.train import Measure, Trainer

__all__ = ["make_trainer", "measures_for"]


def measures_for(config: RunConfig) -> list[Measure]:
    """The measures a config switches on (ICS, landscape), for a Trainer to be given."""
    measures: list[Measure] = []
    if config.ics_every:
        measures.append(IcsMeasure(config.ics_every))
    if config.landscape_every:
        measures.append(
            LandscapeMeasure(
                config.landscape_every,
                config.landscape_low,
                config.landscape_high,
                config.landscape_points,
            )
        )
    return measures


def make_trainer(
    config: RunConfig, dataset: Dataset | None = None, measure_layers: bool = True
) -> Trainer:
    """A Trainer of ``config`` with every measure the config asks for."""
    return Trainer(config, dataset, measure_layers, measures=measures_for(config))
