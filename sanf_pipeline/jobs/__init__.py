"""The run jobs every command and the sweep share: the arrays a job reads (``data``), flow runs (``flow``), baseline
runs (``baseline``), a sweep's shared patch parts (``parts``) and the single-run API behind the CLI (``api``:
fit_run, eval_run, baseline_run)."""

from .. import lazy_api

# the Python API a user imports from the package itself, loaded on first use
_API = {
    "fit_run": "api",
    "eval_run": "api",
    "baseline_run": "api",
    "load_run": "flow",
    "TrainData": "data",
    "TestData": "data",
}

__getattr__ = lazy_api(__name__, _API)
__all__ = sorted(_API)
