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


def _pixel_rules():
    from ..evaluate.pixel import PIXEL_RULES

    return PIXEL_RULES


def map_options(*, switch: bool = False) -> list:
    """The anomaly-map options (``jobs.maps``) of `sanf score`, `export`, `eval` and `baseline`; ``switch``: also
    ``--maps/--no-maps``."""
    import click

    from ..train.options import _RegistryChoice

    out = [
        click.option("--map-sigma", type=click.FloatRange(min=0), default=4.0, show_default=True,
                     help="Gaussian blur of the anomaly maps, in pixels at the model's input size (0: none)."),
        click.option("--pixel-rule", type=_RegistryChoice(_pixel_rules), default="image-max", show_default=True,
                     help="Pixel threshold from the held-out normal images' maps: image-max (about --fpr of normal "
                          "images get any predicted region) or pixel (about --fpr of normal pixels are flagged)."),
    ]
    if switch:
        out.append(click.option("--maps/--no-maps", "maps", default=True, show_default=True,
                                help="Anomaly maps: pixel AUROC/AUPRO where the cache records masks, and the "
                                     "report's overlay grid (scores with spatial support only)."))
    return out


def with_options(options: list):
    """A decorator adding click ``options`` in their listed order."""
    def apply(f):
        for opt in reversed(options):
            f = opt(f)
        return f

    return apply
