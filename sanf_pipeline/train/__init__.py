"""Fitting flows: every fit setting (``config``) and its CLI option types (``options``), one flow (``fit``: data,
checkpoints, resume), the step loop both trainers share (``loop``), K flows at once (``stack``)."""

# the Python API a user imports from the package itself, loaded on first use (importing the package stays cheap:
# `sanf --help` and argument errors must not import torch)
_API = {
    "FitConfig": "config",
    "fit_flow": "fit",
    "FitResult": "fit",
}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_API)
