"""Many runs from one cache: plan (classes x grid x methods x seeds), execute (in process, a local process pool,
or Ray tasks), resume, summarise.

Modules: ``plan.py`` (options, planned runs, ``plan.json``), ``executors.py`` (how arrays reach the run jobs:
in process, process pool with shared memory, Ray), ``run.py`` (``run_sweep``: folder, lock, resume),
``summary.py`` (``summarize``/``write_summary``; tables and heatmap rendered by ``evaluate/report.py``). Every run is a
call of the run jobs in ``jobs/``, the same code `sanf fit` + `sanf eval` and `sanf baseline` run, so a sweep
run's ``scores.csv`` is byte-identical to theirs (same torch thread count; tests/test_sweep.py).

Why it is fast: the test split is read from the cache once and scored by every model; each class's training
block is read once and used by every run of that class; no process starts per run; no backbone runs at all.

Files (``sweeps/<name>/``)::

    plan.json                  every planned run with its settings; a restart must plan the same runs
    runs/<run-id>/             the files of `sanf fit` + `sanf eval` (config.json, train_log.jsonl, metrics.json,
                               scores.csv, report.md, PNGs; model.safetensors only with ``keep_models``) or of
                               `sanf baseline`
    summary.csv|json|md        AUROC per class x setting (mean +- std over seeds), M-AUROC = mean over classes
    heatmap.png                class x setting AUROC
    sweep_log.jsonl            one line per computed run with its timings (not part of the summary)

Resume: ``metrics.json`` is the last file a run writes, so a run counts as finished when it exists (and
belongs to the planned run). A restarted sweep skips finished runs, continues an unfinished flow fit from its
last epoch checkpoint, and produces the same summary. A folder holding another plan is refused unless
``overwrite``: then the new plan replaces it, finished runs the new plan contains with identical settings are
kept, and the sanf files of every other run folder are removed (other files are never touched).

Executors: see ``executors.py``. Defaults: ``workers`` on CPU = the cores (fewer when there are fewer runs),
measured faster than one process with all threads (``benchmarks/sweep.md``); on a GPU one worker whose flow runs go
in stacks (``stacked.py``: flows whose settings differ only in seed and class trained K at a time, ``stack="auto"``
sizes K from the free GPU memory; ``stack=N`` forces it, also on CPU), ``workers=N`` runs N processes sharing the
GPU (``forkserver``).
"""

from .executors import cpu_count, execute_run
from .plan import (
    FLOW,
    HEATMAP_PNG,
    PLAN_FILE,
    RUNS_DIR,
    SUMMARY_CSV,
    SUMMARY_JSON,
    SUMMARY_MD,
    SWEEP_LOG,
    RunSpec,
    format_value,
    is_finished,
    method_names,
    parse_fixed,
    parse_grid,
    parse_methods,
    parse_seeds,
    parse_value,
    plan_sweep,
    read_plan,
    resolve_classes,
    safe_id,
)
from .run import SweepResult, run_sweep
from .summary import summarize, write_summary

__all__ = ["FLOW", "HEATMAP_PNG", "PLAN_FILE", "RUNS_DIR", "SUMMARY_CSV", "SUMMARY_JSON", "SUMMARY_MD", "SWEEP_LOG",
           "RunSpec", "SweepResult", "cpu_count", "execute_run", "format_value", "is_finished", "method_names",
           "parse_fixed", "parse_grid", "parse_methods", "parse_seeds", "parse_value", "plan_sweep", "read_plan",
           "resolve_classes", "run_sweep", "safe_id", "summarize", "write_summary"]
