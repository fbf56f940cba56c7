"""The single-run API behind the CLI, reading what one run needs from a cache: ``fit_run`` (`sanf fit`, resuming an
unfinished run), ``eval_run`` (`sanf eval`, any cache in the run's feature space) and ``baseline_run`` (`sanf
baseline`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..cache.schema import diff_settings, read_json_file
from ..device import resolve_device
from ..errors import SanfError
from ..evaluate.metrics import guard_results
from ..models import (
    create_baseline,
    resolve_score,
)
from ..store.atomic import read_jsonl
from ..store.run_folder import (
    CONFIG_FILE,
    LOG_FILE,
    MODEL_FILE,
    RESULT_FILES,
    cache_identity,
    default_run_name,
    prepare_out_dir,
    read_run_config,
    refuse_foreign_files,
    run_state,
)
from ..train.config import FitConfig, current_run_settings
from ..train.fit import FitResult
from .baseline import baseline_identity, baseline_job
from .data import EvalResult, TestData, TrainData, make_out_dir
from .flow import eval_flow_job, eval_identity, fit_flow_job, fit_settings, load_run
from .maps import DEFAULT_PIXEL_RULE, DEFAULT_SIGMA, MapOptions


@dataclass
class FitRun:
    run_dir: Path
    config: dict
    result: FitResult
    resumed: bool = False
    extra: dict = field(default_factory=dict)
    already_finished: bool = False  # the folder held this finished run already (``result`` is then None)


def fit_run(cache_path, normal_class, cfg: FitConfig | None = None, out_dir=None, *, overwrite: bool = False,
            quiet: bool = False, callback=None) -> FitRun:
    """`sanf fit`: fit a flow on one normal class of a cache and write the run folder (resuming an unfinished one).
    Reads only the normal class's block of the train split."""
    from ..cache import open_cache

    cfg = (cfg or FitConfig()).validate()
    with open_cache(cache_path) as cache:
        ci = cache.class_index(normal_class)
        fingerprint, info = cache.fingerprint, cache_identity(cache)
        run_dir = Path(out_dir) if out_dir else default_run_name(cache_path, cache.class_names[ci])
        settings = fit_settings(cfg, fingerprint, ci)
        hint = f" (evaluate it with `sanf eval --run {run_dir}`)"
        if not overwrite and run_state(run_dir) == "finished":  # the same fit again: nothing to do, as extract/sweep
            try:
                old = read_run_config(run_dir)
                old["settings"] = current_run_settings(old.get("settings"))
            except SanfError:
                old = {}
            if old.get("settings") == settings and old.get("status") == "finished":
                return FitRun(run_dir=run_dir, config=old, result=None, already_finished=True)
            diff = diff_settings(old.get("settings") or {}, settings)
            if diff:
                hint = f" with other settings ({', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''})"
        train = TrainData.from_cache(cache, ci, cfg.needs_patch)
    existed = run_dir.exists()
    mode = prepare_out_dir(run_dir, settings, overwrite=overwrite, what="run", finished_hint=hint,
                           convert=current_run_settings)
    created = read_json_file(run_dir / CONFIG_FILE).get("created") if mode == "resume" else None
    try:
        config, result = fit_flow_job(run_dir, cfg, train, fingerprint=fingerprint, cache_info=info,
                                      created=created, resumed=mode == "resume", quiet=quiet, callback=callback)
    except Exception:
        if not existed:  # a folder this failed attempt made, left empty by fit_flow_job: as if never run
            try:
                run_dir.rmdir()
            except OSError:
                pass  # not empty (a checkpoint to resume) or gone: leave it
        raise
    return FitRun(run_dir=run_dir, config=config, result=result, resumed=mode == "resume")


def eval_run(run_dir, cache=None, score: str = "auto", *, out_dir=None, overwrite: bool = False,
             device: str = "auto", batch_size: int = 256, plots: bool = True, fpr: float | None = None,
             maps: bool = True, map_sigma: float = DEFAULT_SIGMA, pixel_rule: str = DEFAULT_PIXEL_RULE,
             threshold: float | None = None) -> EvalResult:
    """`sanf eval`: score the whole test split with a finished run (default: of its own cache) and write the result
    files (default: into the run folder). ``cache`` may be any cache in the run's feature space
    (``evaluate/compat.py``);
    the normal class is found there by name. ``fpr``: target FPR of the calibrated threshold (default: the run's);
    ``threshold``: an explicit decision threshold instead (exclusive with ``fpr``).
    ``maps``: the score's anomaly maps (``jobs.maps``: pixel metrics where the cache records masks, overlays),
    blurred with ``map_sigma`` px, the pixel threshold by ``pixel_rule``."""
    from ..cache import open_cache
    from ..evaluate.calibration import check_decision
    from ..evaluate.compat import check_cache_compatible, normal_class_in

    check_decision(fpr, threshold)  # before the run loads
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    run = load_run(run_dir, device=str(dev))
    cfg = run.config
    kind = resolve_score(score, cfg, run_dir)
    cache_path = Path(cache) if cache is not None else Path(cfg["cache"]["path"])
    if cache is None and not cache_path.exists():
        raise SanfError(f"the cache this run was trained on ({cache_path}) is not there; pass --cache PATH")
    out_dir = Path(out_dir) if out_dir else run_dir
    log = read_jsonl(run_dir / LOG_FILE) if (run_dir / LOG_FILE).exists() else None
    with open_cache(cache_path) as c:
        check_cache_compatible(cfg["cache"], c, run_dir)
        normal = normal_class_in(c, cfg, run_dir)
        refuse_foreign_files(out_dir, RESULT_FILES)  # never replace a user's file (docs/file-safety.md)
        guard_results(out_dir, eval_identity(cfg, c.fingerprint, kind, normal), overwrite)
        return eval_flow_job(out_dir, run.flow_model, run.patch_score, cfg, TestData.from_cache(c, cache_path),
                             score=score, device=str(dev), batch_size=batch_size, plots=plots, run_dir=run_dir,
                             train_log=log, fpr=fpr, normal_class=normal, threshold=threshold,
                             maps=MapOptions(map_sigma, pixel_rule, run.held_out_maps) if maps else None)


def baseline_run(cache, normal_class, method: str = "gaussian", out_dir=None, *, overwrite: bool = False,
                 plots: bool = True, options: dict | None = None, quiet: bool = False,
                 fpr: float = 0.01, device: str = "auto", maps: bool = True, map_sigma: float = DEFAULT_SIGMA,
                 pixel_rule: str = DEFAULT_PIXEL_RULE) -> EvalResult:
    """`sanf baseline`: fit a baseline on the normal class's training rows, score the test split (streamed from the
    cache in blocks), write the results and the model. ``options``: the method's own settings (``{"k": 5}`` for the
    kNN baselines)."""
    from ..cache import open_cache

    options = dict(options or {})
    patch = create_baseline(method, **options).needs_patch  # unknown names and options fail here
    with open_cache(cache) as c:
        ci = c.class_index(normal_class)
        train = TrainData.from_cache(c, ci, patch=patch)
        test = TestData.from_cache(c, cache)
        out_dir = Path(out_dir) if out_dir else default_run_name(cache, train.class_name, f"-{method}")
        if out_dir.exists() and not out_dir.is_dir():
            raise SanfError(f"{out_dir} exists and is not a folder; choose another --out")
        refuse_foreign_files(out_dir, (CONFIG_FILE, MODEL_FILE, *RESULT_FILES))  # never replace a user's file
        # (docs/file-safety.md)
        guard_results(out_dir, baseline_identity(method, ci, test.fingerprint, options), overwrite)
        make_out_dir(out_dir)
        return baseline_job(out_dir, method, train, test, plots=plots, options=options, quiet=quiet, fpr=fpr,
                            device=device, maps=MapOptions(map_sigma, pixel_rule) if maps else None)
