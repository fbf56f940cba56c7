"""Option types of the `sanf` commands whose valid values come from the registries (flow fusions, input
normalisations, baselines, scores), shared by ``cli.py`` and ``sweep_cli.py``."""

from __future__ import annotations

import click


class _RegistryChoice(click.Choice):
    """A ``click.Choice`` read from a registry when first needed: a registered fusion, normalisation or baseline is
    a valid choice at once, and `sanf --help` imports no torch. A built-in name (``BUILTIN``, spelled out here;
    tests/test_usability.py checks each is registered) is accepted without loading the registry, so parsing the
    defaults imports no torch and a bad path fails before it (issue 14, item 6)."""

    def __init__(self, load):
        self._load = load
        self.builtin = BUILTIN.get(load.__name__, ())
        super().__init__(())

    def convert(self, value, param, ctx):
        if isinstance(value, str) and value in self.builtin:
            return value
        return super().convert(value, param, ctx)

    @property
    def choices(self):
        return tuple(self._load())

    @choices.setter
    def choices(self, value):  # click.Choice.__init__ assigns it; the registry is the source
        pass


SCORE_HELP = ("auto: the run's default (combined when it has a patch part, else nll); combined: flow NLL + patch-knn "
              "distance, each standardised on held-out normal images; nll: -log p(x) of the flow; z2: mean z^2 (the "
              "official code); patch: the patch part alone.")


# the built-in registry names (what the registries hold without plug-ins), accepted without importing torch
BUILTIN = {
    "_fusions": ("none", "gap", "learnable", "semantic"),
    "_spatial_channels": ("half", "full"),
    "_main_inputs": ("semantic", "spatial"),
    "_normalizations": ("none", "l2", "standardize", "l2+standardize", "l2+whiten"),
    "_scores": ("auto", "combined", "nll", "z2", "patch"),
    "_baselines": ("knn", "knn-l2", "gaussian", "gaussian-whiten", "patch-knn"),
}


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
    from .combined import RUN_SCORES

    return RUN_SCORES
