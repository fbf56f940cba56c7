"""Option types of the `sanf` commands whose valid values come from the model registries (baselines, run scores),
beside `sanf fit`'s option types, which ``train.options`` generates from the ``FitConfig`` declarations."""

from __future__ import annotations

SCORE_HELP = ("auto: the run's default (combined when it has a patch part, else nll); combined: flow NLL + patch-knn "
              "distance, each standardised on held-out normal images; nll: -log p(x) of the flow; z2: mean z^2 (the "
              "official code); patch: the patch part alone.")


def _baselines():
    from ..models import BASELINES

    return BASELINES


def _scores():
    from ..models import RUN_SCORES

    return RUN_SCORES
