"""The run jobs every command and the sweep share: the arrays a job reads (``data``), flow runs (``flow``), baseline
runs (``baseline``), a sweep's shared patch parts (``parts``) and the single-run API behind the CLI (``api``:
fit_run, eval_run, baseline_run)."""

# the Python API a user imports from the package itself, loaded on first use (importing the package stays cheap:
# `sanf --help` and argument errors must not import torch)
_API = {
    "fit_run": "api",
    "eval_run": "api",
    "baseline_run": "api",
    "load_run": "flow",
    "TrainData": "data",
    "TestData": "data",
}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_API)
