"""Fitting flows: every fit setting (``config``) and its CLI option types (``options``), one flow (``fit``: data,
checkpoints, resume), the step loop both trainers share (``loop``), K flows at once (``stack``)."""

from .. import lazy_api

# the Python API a user imports from the package itself, loaded on first use
_API = {
    "FitConfig": "config",
    "fit_flow": "fit",
    "FitResult": "fit",
}

__getattr__ = lazy_api(__name__, _API)
__all__ = sorted(_API)
