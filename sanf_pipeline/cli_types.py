"""Option types of the `sanf` commands whose valid values come from the registries (flow fusions, input
normalisations, baselines, scores), shared by ``cli.py`` and ``sweep_cli.py``."""

from __future__ import annotations

import click


class _RegistryChoice(click.Choice):
    """A ``click.Choice`` read from a registry when first needed: a registered fusion, normalisation or baseline is
    a valid choice at once, and `sanf --help` imports no torch."""

    def __init__(self, load):
        self._load = load
        super().__init__(())

    @property
    def choices(self):
        return tuple(self._load())

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns it; the registry is the source
        pass


def _fusions():
    from .flow import FUSION_MODES

    return FUSION_MODES


def _spatial_channels():
    from .flow import SPATIAL_CHANNELS

    return SPATIAL_CHANNELS


def _main_inputs():
    from .flow import MAIN_INPUTS

    return MAIN_INPUTS


def _normalizations():
    from .features import NORMALIZATIONS

    return NORMALIZATIONS


def _baselines():
    from .baselines import BASELINES

    return BASELINES


def _scores():
    from .scoring import SCORES

    return SCORES
