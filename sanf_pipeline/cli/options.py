"""Option types of the `sanf` commands whose valid values come from the model registries (baselines, run scores),
beside `sanf fit`'s option types, which ``train.options`` generates from the ``FitConfig`` declarations."""

from __future__ import annotations

SCORE_HELP = ("auto: the run's default (combined when it has a patch part, else nll); combined: flow NLL + patch-knn "
              "distance, each standardised on held-out normal images; nll: -log p(x) of the flow; z2: mean z^2 (the "
              "official code); patch: the patch part alone.")


THRESHOLD_HELP = ("Decide with this score threshold (anomalous if score > it) instead of the one calibrated on the "
                  "held-out normal images; excludes --fpr.")


def check_decision(fpr: float | None, threshold: float | None) -> None:
    """--fpr and --threshold, checked before torch is imported (numpy only): a bad value fails at once."""
    from ..evaluate.calibration import check_decision as check

    check(fpr, threshold)


def _baselines():
    from ..models import BASELINES

    return BASELINES


def _scores():
    from ..models import RUN_SCORES

    return RUN_SCORES


def _pixel_rules():
    from ..evaluate.pixel import PIXEL_RULES

    return PIXEL_RULES


def help_without_registries(command) -> None:
    """Give every registry-backed option of ``command`` and its sub-commands (``train.options._RegistryChoice``: a
    fusion, normalisation, score, baseline) a metavar from the built-in names, so that `--help` and a usage error
    import no torch: reading the registry itself (``choices``) imports the models and with them torch, 5-15 s of
    start-up for a help text (issue 22). A value is still checked against the full registry, plug-ins included."""
    from ..train.options import _RegistryChoice

    class _HelpSafeChoice(_RegistryChoice):
        def get_metavar(self, param, ctx) -> str:
            if not self.builtin:  # no built-in list (a registry without torch behind it): the registry itself
                return super().get_metavar(param, ctx)
            names = "|".join(self.builtin)
            return f"{{{names}}}" if param.required and param.param_type_name == "argument" else f"[{names}]"

        def get_missing_message(self, param, ctx) -> str:
            return "Choose from: " + ", ".join(self.builtin) if self.builtin else \
                super().get_missing_message(param, ctx)

    for param in getattr(command, "params", ()):
        if isinstance(param.type, _RegistryChoice) and not isinstance(param.type, _HelpSafeChoice):
            param.type = _HelpSafeChoice(param.type._load)
    for sub in (getattr(command, "commands", None) or {}).values():
        help_without_registries(sub)


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
