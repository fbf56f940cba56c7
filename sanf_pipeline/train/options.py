"""Option types of the `sanf` commands whose valid values come from the registries (flow fusions, input
normalisations, baselines, scores), shared by ``cli.py`` and ``sweep_cli.py``; and `sanf fit`'s options and value
types, generated from the ``FitConfig`` field declarations (``train.config.Setting``), which ``sweep.plan`` uses to
parse `sanf sweep --set/--grid` values the same way."""

from __future__ import annotations

import dataclasses

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


# the built-in registry names (what the registries hold without plug-ins), accepted without importing torch
BUILTIN = {
    "_fusions": ("none", "gap", "learnable", "semantic"),
    "_spatial_channels": ("half", "full"),
    "_main_inputs": ("semantic", "spatial"),
    "_normalizations": ("none", "l2", "standardize", "l2+standardize", "l2+whiten"),
    "_scores": ("auto", "combined", "nll", "z2", "patch"),
    "_baselines": ("knn", "knn-l2", "gaussian", "gaussian-whiten", "patch-knn", "patch-flow"),
}


def _fusions():
    from ..flow import FUSION_MODES

    return FUSION_MODES


def _spatial_channels():
    from ..flow import SPATIAL_CHANNELS

    return SPATIAL_CHANNELS


def _main_inputs():
    from ..flow import MAIN_INPUTS

    return MAIN_INPUTS


def _normalizations():
    from ..flow.normalizer import NORMALIZATIONS

    return NORMALIZATIONS


# ------------------------------------------------------------------------- `sanf fit` options from FitConfig
_REGISTRY_LOADERS = {load.__name__: load for load in (_fusions, _spatial_channels, _main_inputs, _normalizations)}


class _Optional(click.ParamType):
    """A value of ``inner`` or none (``none``/``null``): an ``int | None`` or ``float | None`` field."""

    def __init__(self, inner: click.ParamType):
        self.inner = inner
        self.name = inner.name

    def convert(self, value, param, ctx):
        if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "null")):
            return None
        return self.inner.convert(value, param, ctx)


class _Numbers(click.ParamType):
    """``n`` floats in one word, ``0.9:0.999`` (``,`` and ``/`` also separate): a ``tuple[float, ...]`` field, in
    the form `sanf sweep --grid` lists values in (``betas=0.8:0.8,0.9:0.999``)."""

    name = "floats"

    def __init__(self, n: int):
        self.n = n

    def convert(self, value, param, ctx):
        if isinstance(value, (tuple, list)):
            parts = list(value)
        else:
            parts = [p for p in str(value).replace(",", ":").replace("/", ":").split(":") if p.strip()]
        try:
            numbers = tuple(float(p) for p in parts)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not {self.n} numbers like 0.9:0.999", param, ctx)
        if len(numbers) != self.n:
            self.fail(f"{value!r} is not {self.n} numbers like 0.9:0.999", param, ctx)
        return numbers


def _fit_field(name: str) -> dataclasses.Field:
    from .config import FitConfig

    return {f.name: f for f in dataclasses.fields(FitConfig)}[name]


def fit_value_type(name: str) -> click.ParamType:
    """The click type of the FitConfig field ``name``: `sanf fit`'s option type, and what converts a `sanf sweep
    --set/--grid` value (a flag's field takes true/false there)."""
    from .config import setting_of

    f = _fit_field(name)
    spec, ann = setting_of(f), str(f.type).replace(" ", "")
    if spec.choices:
        if isinstance(spec.choices, str):
            return _RegistryChoice(_REGISTRY_LOADERS[spec.choices])
        return click.Choice(spec.choices)
    if ann.startswith("tuple"):
        return _Numbers(len(f.default))
    base = ann.split("|")[0]
    ranged = spec.min is not None or spec.max is not None
    if base == "int":
        kind = click.IntRange(spec.min, spec.max, min_open=spec.min_open) if ranged else click.INT
    elif base == "float":
        kind = click.FloatRange(spec.min, spec.max, min_open=spec.min_open) if ranged else click.FLOAT
    elif base == "bool":
        kind = click.BOOL
    else:
        kind = click.STRING
    return _Optional(kind) if "None" in ann.split("|")[1:] else kind


def fit_param_name(f: dataclasses.Field) -> str:
    """The click parameter a field's option fills (``no_amp`` for the inverted ``amp``)."""
    from .config import setting_of

    spec = setting_of(f)
    return spec.flag.lstrip("-").replace("-", "_") if spec.invert else f.name


def _shown(value) -> str:
    if isinstance(value, (tuple, list)):
        return ":".join(str(v) for v in value)
    return str(value).lower() if isinstance(value, bool) or value is None else str(value)


def _fit_option(f: dataclasses.Field):
    from .config import setting_of

    spec = setting_of(f)
    flag = spec.flag or "--" + f.name.replace("_", "-")
    kw: dict = {"help": spec.help}
    if spec.metavar:
        kw["metavar"] = spec.metavar
    if spec.invert or (f.type == "bool" and spec.given_only):
        return click.option(flag, fit_param_name(f), is_flag=True, **kw)  # no default: an unset flag changes nothing
    if f.type == "bool":
        negative = flag[:2] + "no-" + flag[2:]  # as --keep-initial has --no-keep-initial
        return click.option(f"{flag}/{negative}", f.name, default=f.default, show_default=True, **kw)
    kw["type"] = fit_value_type(f.name)
    if spec.given_only:  # unset when not given, for training_length to tell what the user chose
        if spec.show_default:
            kw["help"] = f"{spec.help}  [default: {_shown(f.default)}]"
        return click.option(flag, f.name, default=None, **kw)
    if isinstance(f.default, tuple) or f.default is None:  # shown as the value is typed (0.9:0.999), not "0.9, 0.999"
        if f.default is not None:
            kw["help"] = f"{spec.help}  [default: {_shown(f.default)}]"
        return click.option(flag, f.name, default=f.default, **kw)
    return click.option(flag, f.name, default=f.default, show_default=spec.show_default, **kw)


def fit_options(command):
    """Decorator: an option for every FitConfig field, in field order (``fit_values`` reads them back)."""
    from .config import FitConfig

    for f in reversed(dataclasses.fields(FitConfig)):  # click lists the last applied decorator first
        command = _fit_option(f)(command)
    return command


def fit_values(params: dict) -> dict:
    """The FitConfig settings in the parameters of a command decorated with ``fit_options`` (removed from
    ``params``): every field, except a training-length key that was not given."""
    from .config import FitConfig, setting_of

    out = {}
    for f in dataclasses.fields(FitConfig):
        spec, value = setting_of(f), params.pop(fit_param_name(f))
        if spec.invert:
            value = not value
        elif spec.given_only and (value is None or (f.type == "bool" and not value)):
            continue
        out[f.name] = value
    return out
