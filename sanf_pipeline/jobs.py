"""The run jobs: one code path per kind of run, shared by `sanf fit`/`eval`/`baseline`, `sanf sweep` and `sanf demo`.

A job works on arrays that its caller has read (``TrainData``: the normal class's training rows; ``TestData``: the
test split, in memory or streamed from a cache in blocks), so the sweep can read the cache once and pass shared
memory in, while the single-run commands read just what one run needs. Jobs write every result file.

- ``fit_flow_job``: fit a flow into a run folder (``config.json``, checkpoints, ``train_log.jsonl``,
  ``model.safetensors``), resuming an unfinished fit of the same settings and data.
- ``eval_flow_job``: score the test split with a fitted flow and write ``metrics.json``, ``scores.csv``,
  ``report.md`` and the plots.
- ``flow_job``: both (reusing a model already fitted into the folder): a sweep's flow run.
- ``baseline_job``: fit a registered baseline on the class tokens, score, write the same result files.

The cache-reading wrappers behind the CLI are here too: ``fit_run`` (`sanf fit`), ``eval_run`` (`sanf eval`),
``baseline_run`` (`sanf baseline`), and ``load_run`` rebuilds a finished run's flow and normaliser.
So for one class, settings and seed a sweep run's ``scores.csv`` is byte-identical to `sanf fit` + `sanf eval`
(same torch thread count; tests/test_sweep.py), and its ``metrics.json`` differs only in where and when it was
written (``run``, ``evaluated``) and the sweep's own keys (``sweep``, ``sweep_run_id``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .baselines import create_baseline, fit_score, scorer_arrays, scorer_settings
from .combined import PATCH_KINDS, PatchScore, add_patch_score, resolve_score
from .device import resolve_device
from .errors import SanfError
from .evaluate import compute_metrics, guard_results, write_results
from .runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOG_FILE,
    MODEL_FILE,
    RESULT_FILES,
    cache_identity,
    check_finite,
    default_run_name,
    diff_settings,
    finish_run,
    load_tensors,
    now,
    package_versions,
    prepare_out_dir,
    read_json_file,
    read_jsonl,
    read_run_config,
    refuse_foreign_files,
    run_state,
    save_tensors_atomic,
    start_run_config,
    write_json_atomic,
)
from .scoring import SCORE_DESCRIPTIONS, block_rows, score_blocks
from .train import FitConfig, FitResult, fit_flow

BASELINE_EPOCH_SELECTION = "not applicable (no training epochs; fitted on normal training data only)"


# ---------------------------------------------------------------------------------------------- job inputs
@dataclass
class TrainData:
    """The normal class's training rows (valid rows only, finite): ``cls (n, d)``, ``patch (n, T, d)`` or None."""

    cls: np.ndarray
    patch: np.ndarray | None
    class_index: int
    class_name: str

    @classmethod
    def from_cache(cls_, cache, class_index: int, patch: bool) -> TrainData:
        cls, tokens = cache.split("train").read_class(class_index, patch=patch)
        name = cache.class_names[class_index]
        if len(cls) == 0:
            raise SanfError(f"class {name!r} has no valid training samples in {cache.path}")
        check_finite(f"the training features of class {name!r} in {cache.path}", cls, tokens)
        return cls_(cls, tokens, class_index, name)


@dataclass
class TestData:
    """The test split of a cache: labels, sample ids and raw rows in blocks (``blocks``), with the cache's identity.

    ``from_arrays``: rows already in memory (a sweep); ``from_cache``: streamed from an open cache block by block
    (bounded memory), checked for NaN/Inf block by block."""

    labels: np.ndarray
    sample_ids: list[str]
    dim: int
    num_tokens: int
    n: int
    read: Callable[[int, int, bool], tuple[np.ndarray, np.ndarray | None]]
    fingerprint: str
    cache_path: str
    identity: dict = field(default_factory=dict)

    @classmethod
    def from_arrays(cls_, cls, patch, labels, sample_ids, *, num_tokens: int, fingerprint: str, cache_path: str,
                    identity: dict | None = None) -> TestData:
        def read(start, stop, with_patch):
            if with_patch and patch is None:
                raise SanfError("this run needs the test patch tokens, which were not read")
            return cls[start:stop], (patch[start:stop] if with_patch else None)

        return cls_(labels, sample_ids, int(cls.shape[1]), int(num_tokens), len(cls), read, fingerprint,
                    str(cache_path), identity or {})

    @classmethod
    def from_cache(cls_, cache, cache_path=None) -> TestData:
        split = cache.split("test")

        def read(start, stop, with_patch):
            cls, patch = split.read(start, stop, patch=with_patch)
            if len(cls):
                check_finite(f"the test features in {cache.path}", cls, patch)
            return cls, patch

        return cls_(split.labels, split.sample_ids, cache.dim, cache.num_tokens, split.n, read, cache.fingerprint,
                    str(cache_path if cache_path is not None else cache.path), cache_identity(cache))

    def blocks(self, with_patch: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        rows = block_rows(self.dim, self.num_tokens, with_patch)
        for start in range(0, self.n, rows):
            yield self.read(start, min(start + rows, self.n), with_patch)

    def class_tokens(self) -> np.ndarray:
        parts = [c for c, _ in self.blocks(False)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict
    paths: dict
    scores: np.ndarray
    is_anomaly: np.ndarray


BaselineRun = EvalResult


@dataclass
class FitRun:
    run_dir: Path
    config: dict
    result: FitResult
    resumed: bool = False
    extra: dict = field(default_factory=dict)
    already_finished: bool = False  # the folder held this finished run already (``result`` is then None)


@dataclass
class LoadedRun:
    """A finished flow run read back from its folder."""

    run_dir: Path
    config: dict
    flow: torch.nn.Module
    normalizer: object
    extra: dict = field(default_factory=dict)
    patch_score: PatchScore | None = None  # the run's patch part (combined.py), None for the flow alone

    @property
    def needs_patch(self) -> bool:
        """The flow takes patch tokens."""
        return flow_needs_patch(self.config)


def load_run(run_dir, device: str = "cpu") -> LoadedRun:
    """Rebuild the flow and the normaliser of a finished run (safetensors + JSON only)."""
    from .features import Normalizer
    from .flow import SANFlow

    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    model_path = run_dir / MODEL_FILE
    if not model_path.exists() and config.get("model_kept") is False:
        raise SanfError(f"run {run_dir} finished but its model was not kept (a sweep keeps models only with "
                        f"--keep-models); its results are in the folder, to score again refit it with `sanf fit`")
    if not model_path.exists():
        raise SanfError(f"run {run_dir} is incomplete (no {MODEL_FILE}): its fit did not finish; rerun the same "
                        f"`sanf fit` command to resume it")
    tensors, meta = load_tensors(model_path)
    if meta.get("run_id") != config.get("run_id"):
        raise SanfError(f"{model_path} does not belong to {run_dir / CONFIG_FILE} (run ids differ); the folder mixes "
                        f"files of two runs, refit it")
    flow_cfg = meta.get("flow")
    if not isinstance(flow_cfg, dict):
        raise SanfError(f"{model_path} lacks the flow configuration; it is damaged, refit the run")
    try:
        flow = SANFlow(**flow_cfg)
        state = {k[len("flow."):]: v for k, v in tensors.items() if k.startswith("flow.")}
        flow.load_state_dict(state, strict=True)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise SanfError(f"{model_path} does not match its flow configuration ({str(exc).splitlines()[0]}); "
                        f"it is damaged, refit the run") from None
    normalizer = Normalizer.from_state(meta.get("normalizer") or {}, tensors)
    part = config.get("patch_score")
    patch_score = PatchScore.from_state(part, tensors, device=str(device)) if part else None
    flow.eval().to(device)
    return LoadedRun(run_dir=run_dir, config=config, flow=flow, normalizer=normalizer, patch_score=patch_score)


def flow_needs_patch(config: dict) -> bool:
    """Whether the flow of a run ``config`` takes patch tokens (a fusion, or the spatial main input)."""
    fc = config.get("flow") or {}
    return fc.get("fusion") != "none" or fc.get("main_input") == "spatial"


def fit_settings(cfg: FitConfig, fingerprint: str, class_index: int) -> dict:
    """What identifies a flow run (``config.json: settings``; its hash is the run id)."""
    return {"fit": cfg.settings(), "cache_fingerprint": fingerprint, "normal_class": class_index}


# ------------------------------------------------------------------------------------------------ the jobs
def fit_flow_job(run_dir, cfg: FitConfig, train: TrainData, *, fingerprint: str, cache_info: dict,
                 created: str | None = None, resumed: bool = False, extra: dict | None = None, quiet: bool = True,
                 callback=None) -> tuple[dict, FitResult]:
    """Fit a flow on ``train`` into ``run_dir``: config first, epoch checkpoints (``cfg.checkpoint_every``), model
    last."""
    run_dir = Path(run_dir)
    settings = fit_settings(cfg, fingerprint, train.class_index)
    config = start_run_config(run_dir, cfg, settings, class_index=train.class_index, class_name=train.class_name,
                              n_train=len(train.cls), cache_identity=cache_info, created=created or now(),
                              extra=extra)
    if resumed:
        config["resumed"] = now()
        write_json_atomic(run_dir / CONFIG_FILE, config)
    result = fit_flow(train.cls, train.patch if cfg.flow_needs_patch else None, cfg, run_dir=run_dir, quiet=quiet,
                      callback=callback, description=f"fit {train.class_name}")
    add_patch_score(result, cfg, train.cls, train.patch, quiet=quiet)
    finish_run(run_dir, config, result)
    return config, result


def eval_flow_job(out_dir, flow, normalizer, config: dict, test: TestData, *, score: str = "auto",
                  device: str = "auto", batch_size: int = 256, plots: bool = True, run_dir=None,
                  train_log: list | None = None, extra_metrics: dict | None = None,
                  scores: np.ndarray | None = None, fpr: float | None = None,
                  normal_class: int | None = None, patch_score: PatchScore | None = None) -> EvalResult:
    """Score ``test`` with a fitted flow (its run ``config``; ``patch_score``: the run's patch part) and write the
    result files into ``out_dir``. ``score``: a kind of ``combined.RUN_SCORES`` (``auto``: the run's default).
    ``scores``: the flow's own scores of ``test`` (``flow_score_kind``) computed by the caller (a stack of flows
    scored in one pass); ``normal_class``: the normal class's index in ``test`` when it is another cache than the
    run's (by name); ``fpr``: target false-positive rate of the calibrated threshold (default: the run's)."""
    from .calibration import eval_threshold_metrics

    requested, score = score, resolve_score(score, config, run_dir or out_dir)
    if score in PATCH_KINDS and patch_score is None:
        raise SanfError(f"the {score} score needs the run's patch part; load the run with jobs.load_run")
    normal = int(config["normal_class"]) if normal_class is None else int(normal_class)
    if scores is None or score in PATCH_KINDS:
        scores, parts = _score_test(flow, normalizer, patch_score, config, test, score, scores, device, batch_size)
    else:
        parts = {}
    is_anomaly = test.labels != normal
    metrics = compute_metrics(is_anomaly, scores)
    if parts:  # what each part of the combined score alone would have scored (the same runs, no refit)
        metrics["auroc_parts"] = {k: compute_metrics(is_anomaly, v)["auroc"] for k, v in parts.items()}
    result = config.get("result") or {}
    metrics.update(eval_identity(config, test.fingerprint, score, normal))
    metrics.update({
        "normal_class_name": config.get("normal_class_name"), "score_description": SCORE_DESCRIPTIONS[score],
        "epoch_selection": config.get("epoch_selection"), "best_epoch": result.get("best_epoch"),
        "epochs_run": result.get("epochs_run"), "n_train": config.get("n_train_total"), "n_val": result.get("n_val"),
        "n_nonfinite_scores": int((~np.isfinite(scores)).sum()), "run": str(run_dir or out_dir),
        "cache": test.cache_path, "flow": config.get("flow"), "fit": config.get("fit", {}), "evaluated": now(),
        "patch_score": config.get("patch_score"), "score_requested": requested,
        **(extra_metrics or {}),
    })
    metrics.update(eval_threshold_metrics(config.get("calibration"), score, is_anomaly, scores, fpr))
    out_dir = Path(out_dir)
    _mkdir(out_dir)
    paths = write_results(out_dir, metrics, test.sample_ids, test.labels, is_anomaly, scores, train_log=train_log,
                          plots=plots)
    return EvalResult(out_dir=out_dir, metrics=metrics, paths=paths, scores=scores, is_anomaly=is_anomaly)


def _score_test(flow, normalizer, patch_score, config: dict, test: TestData, kind: str, flow_scores, device,
                batch_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The run's ``kind`` scores of ``test``, block by block (one read of each block for both parts), and for
    ``combined`` its two parts (``nll``, ``patch``)."""
    flow_patch = flow_needs_patch(config)
    with_patch = flow_patch or kind in PATCH_KINDS
    out: list[np.ndarray] = []
    parts: dict[str, list[np.ndarray]] = {"nll": [], "patch": []}
    start = 0
    flow.to(resolve_device(device))
    try:
        for cls, patch in test.blocks(with_patch):
            if kind == "patch":  # the patch part alone: no flow pass
                fs = None
            elif flow_scores is None:
                fs = score_blocks(flow, normalizer, [(cls, patch if flow_patch else None)], flow_score_kind(kind),
                                  batch_size=batch_size)
            else:
                fs = np.asarray(flow_scores[start:start + len(cls)], np.float64)
            start += len(cls)
            if kind not in PATCH_KINDS:
                out.append(fs)
                continue
            ps = patch_score.patch_scores(patch)
            if kind == "patch":
                out.append(ps)
                continue
            parts["nll"].append(fs)
            parts["patch"].append(ps)
            out.append(patch_score.combine(fs, ps))
    finally:
        flow.to("cpu")
    joined = {k: np.concatenate(v) for k, v in parts.items() if v}
    return (np.concatenate(out) if out else np.zeros(0)), joined


def flow_score_kind(kind: str) -> str:
    """The flow's own score behind a run score kind (``nll`` for the patch kinds)."""
    return "nll" if kind in PATCH_KINDS else kind


def eval_identity(config: dict, fingerprint: str, score: str, normal_class: int | None = None) -> dict:
    """What must match for earlier results of a flow run to be kept (``metrics.json``)."""
    normal = int(config["normal_class"]) if normal_class is None else int(normal_class)
    return {"method": config.get("method", "sanf-flow"), "score": score, "normal_class": normal,
            "cache_fingerprint": fingerprint, "run_id": config.get("run_id")}


def _reusable_model(run_dir: Path, settings: dict):
    """A model fitted into ``run_dir`` with ``settings`` whose results were never written (killed in between)."""
    if not (run_dir / MODEL_FILE).exists():
        return None
    try:
        loaded = load_run(run_dir)
    except SanfError:
        return None
    if loaded.config.get("settings") != settings or loaded.config.get("status") != "finished":
        return None
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # killed between saving the model and removing this
    return loaded


def flow_job(run_dir, cfg: FitConfig, train: TrainData, test: TestData, *, cache_info: dict, score: str = "auto",
             plots: bool = True, extra_config: dict | None = None, extra_metrics: dict | None = None) -> dict:
    """A whole flow run into ``run_dir``: fit (or reuse a model fitted there, or resume its checkpoint), score,
    write every file. Returns timings and the AUROC (the caller's log record)."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    settings = fit_settings(cfg, test.fingerprint, train.class_index)
    loaded = _reusable_model(run_dir, settings)
    if loaded is not None:
        flow, normalizer, config, part = loaded.flow, loaded.normalizer, loaded.config, loaded.patch_score
        log = read_jsonl(run_dir / LOG_FILE) if (run_dir / LOG_FILE).exists() else []
    else:
        (run_dir / MODEL_FILE).unlink(missing_ok=True)
        created = None
        if (run_dir / CONFIG_FILE).exists():  # an unfinished fit (killed before or after its first checkpoint)
            try:
                old = read_json_file(run_dir / CONFIG_FILE)
                created = old.get("created") if old.get("status") == "running" else None
            except (SanfError, AttributeError):
                created = None
        config, result = fit_flow_job(run_dir, cfg, train, fingerprint=test.fingerprint, cache_info=cache_info,
                                      created=created, extra=extra_config)
        flow, normalizer, log, part = result.model, result.normalizer, result.log, result.patch_score
    t_fit = time.perf_counter() - t0
    res = eval_flow_job(run_dir, flow, normalizer, config, test, score=score, device=cfg.device,
                        batch_size=cfg.eval_batch_size, plots=plots, train_log=log, extra_metrics=extra_metrics,
                        patch_score=part)
    summary = config.get("result") or {}
    seen = 0 if loaded is not None else int(summary.get("n_train") or 0) * int(summary.get("epochs_run") or 0)
    return {"auroc": res.metrics["auroc"], "fit_s": t_fit, "score_write_s": time.perf_counter() - t0 - t_fit,
            "reused_model": loaded is not None, "train_samples_seen": seen, "n_test": len(res.scores)}


def baseline_job(out_dir, method: str, train: TrainData, test: TestData, *, plots: bool = True,
                 extra: dict | None = None, extra_metrics: dict | None = None, options: dict | None = None,
                 quiet: bool = True, fpr: float = 0.01) -> EvalResult:
    """Fit baseline ``method`` on the class tokens of ``train`` (patch tokens for patch-knn), score ``test``, write
    config, the fitted state (``model.safetensors``, so the run is a detector, when the scorer exposes it) and result
    files. ``options`` go to the scorer's factory. The threshold is calibrated on the held-out 10% of ``train``
    scored by the baseline fitted on the other rows (``calibrate_baseline``)."""
    from .calibration import eval_threshold_metrics

    scorer = create_baseline(method, **(options or {}))
    if hasattr(scorer, "quiet"):
        scorer.quiet = quiet
    if getattr(scorer, "needs_patch", False):
        test_cls, test_patch = test.read(0, test.n, True)
        scores = fit_score(scorer, train.cls, test_cls, train.patch, test_patch)
    else:
        scores = scorer.fit(train.cls).score(test.class_tokens())
    ci = train.class_index
    is_anomaly = test.labels != ci
    metrics = compute_metrics(is_anomaly, scores)
    metrics.update(baseline_identity(method, ci, test.fingerprint, options))
    metrics.update({"normal_class_name": train.class_name, "score_description": scorer.description,
                    "epoch_selection": BASELINE_EPOCH_SELECTION, "n_train": int(len(train.cls)),
                    "cache": test.cache_path, "evaluated": now(), "settings": {"method": method,
                                                                                **scorer_settings(scorer)},
                    **(extra or {}), **(extra_metrics or {})})
    calibration = calibrate_baseline(method, train.cls, fpr=fpr, train_patch=train.patch, options=options)
    metrics.update(eval_threshold_metrics(calibration, method, is_anomaly, scores))
    out_dir = Path(out_dir)
    config = {"format": "sanf-baseline", "format_version": 1, "method": method, "normal_class": ci,
              "normal_class_name": train.class_name, "cache": test.identity, "created": now(),
              "versions": package_versions(), "calibration": calibration, **(extra or {})}
    write_json_atomic(out_dir / CONFIG_FILE, config)
    arrays = scorer_arrays(scorer)
    if arrays:
        save_tensors_atomic(out_dir / MODEL_FILE, {f"baseline.{k}": torch.from_numpy(np.ascontiguousarray(v))
                                                   for k, v in arrays.items()}, config)
    paths = write_results(out_dir, metrics, test.sample_ids, test.labels, is_anomaly, scores, plots=plots)
    return EvalResult(out_dir=out_dir, metrics=metrics, paths=paths, scores=scores, is_anomaly=is_anomaly)


def calibrate_baseline(method: str, train_cls: np.ndarray, *, fpr: float = 0.01, seed: int = 0,
                       fraction: float = 0.1, train_patch: np.ndarray | None = None,
                       options: dict | None = None) -> dict | None:
    """Held-out scores of a baseline: the slice a flow with ``seed`` would hold out, scored by the baseline fitted
    on the remaining rows. None when the class is too small to hold any row out."""
    from .calibration import SLICE_BASELINE, calibration_record

    train_cls = np.asarray(train_cls)
    n = len(train_cls)
    n_val = max(1, int(round(fraction * n)))
    if n - n_val < 2:
        return None
    order = np.random.default_rng(seed).permutation(n)
    tr, va = np.sort(order[n_val:]), np.sort(order[:n_val])
    try:
        scorer = create_baseline(method, **(options or {}))
        if hasattr(scorer, "quiet"):
            scorer.quiet = True
        patch = np.asarray(train_patch) if getattr(scorer, "needs_patch", False) else None
        held_out = fit_score(scorer, train_cls[tr], train_cls[va], None if patch is None else patch[tr],
                             None if patch is None else patch[va])
    except SanfError:
        return None  # e.g. kNN with fewer rows than k
    return calibration_record({method: held_out}, fpr=fpr, slice_desc=SLICE_BASELINE, seed=seed, fraction=fraction)


def baseline_identity(method: str, class_index: int, fingerprint: str, options: dict | None = None) -> dict:
    out = {"method": method, "score": method, "normal_class": class_index, "cache_fingerprint": fingerprint}
    if options:
        out["options"] = dict(options)
    return out


# ------------------------------------------------------------------------- single runs from a cache (the CLI)
def _mkdir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SanfError(f"{out_dir} exists and is not a folder; choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SanfError(f"cannot create {out_dir}: {exc.strerror or exc}; choose another --out") from None


def fit_run(cache_path, normal_class, cfg: FitConfig | None = None, out_dir=None, *, overwrite: bool = False,
            quiet: bool = False, callback=None) -> FitRun:
    """`sanf fit`: fit a flow on one normal class of a cache and write the run folder (resuming an unfinished one).
    Reads only the normal class's block of the train split."""
    from .cache import open_cache

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
            except SanfError:
                old = {}
            if old.get("settings") == settings and old.get("status") == "finished":
                return FitRun(run_dir=run_dir, config=old, result=None, already_finished=True)
            diff = diff_settings(old.get("settings") or {}, settings)
            if diff:
                hint = f" with other settings ({', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''})"
        train = TrainData.from_cache(cache, ci, cfg.needs_patch)
    mode = prepare_out_dir(run_dir, settings, overwrite=overwrite, what="run", finished_hint=hint)
    created = read_json_file(run_dir / CONFIG_FILE).get("created") if mode == "resume" else None
    config, result = fit_flow_job(run_dir, cfg, train, fingerprint=fingerprint, cache_info=info, created=created,
                                  resumed=mode == "resume", quiet=quiet, callback=callback)
    return FitRun(run_dir=run_dir, config=config, result=result, resumed=mode == "resume")


def eval_run(run_dir, cache=None, score: str = "auto", *, out_dir=None, overwrite: bool = False,
             device: str = "auto", batch_size: int = 256, plots: bool = True, fpr: float | None = None) -> EvalResult:
    """`sanf eval`: score the whole test split with a finished run (default: of its own cache) and write the result
    files (default: into the run folder). ``cache`` may be any cache in the run's feature space (``compat.py``);
    the normal class is found there by name. ``fpr``: target FPR of the calibrated threshold (default: the run's)."""
    from .cache import open_cache
    from .compat import check_cache_compatible, normal_class_in

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
        return eval_flow_job(out_dir, run.flow, run.normalizer, cfg, TestData.from_cache(c, cache_path),
                             score=score, device=str(dev), batch_size=batch_size, plots=plots, run_dir=run_dir,
                             train_log=log, fpr=fpr, normal_class=normal, patch_score=run.patch_score)


def baseline_run(cache, normal_class, method: str = "gaussian", out_dir=None, *, overwrite: bool = False,
                 plots: bool = True, options: dict | None = None, quiet: bool = False,
                 fpr: float = 0.01) -> EvalResult:
    """`sanf baseline`: fit a baseline on the normal class's training class tokens, score the test split, write
    the results. ``options``: the scorer's own settings (``{"k": 5}`` for the kNN baselines)."""
    from .cache import open_cache

    options = dict(options or {})
    patch = bool(getattr(create_baseline(method, **options), "needs_patch", False))  # unknown names fail here
    with open_cache(cache) as c:
        ci = c.class_index(normal_class)
        train = TrainData.from_cache(c, ci, patch=patch)
        cls, tokens, labels, sample_ids = c.split("test").read_all(patch=patch)
        check_finite(f"the test features in {c.path}", cls, tokens)
        test = TestData.from_arrays(cls, tokens, labels, sample_ids, num_tokens=c.num_tokens,
                                    fingerprint=c.fingerprint, cache_path=str(cache), identity=cache_identity(c))
    out_dir = Path(out_dir) if out_dir else default_run_name(cache, train.class_name, f"-{method}")
    if out_dir.exists() and not out_dir.is_dir():
        raise SanfError(f"{out_dir} exists and is not a folder; choose another --out")
    refuse_foreign_files(out_dir, (CONFIG_FILE, MODEL_FILE, *RESULT_FILES))  # never replace a user's file
    # (docs/file-safety.md)
    guard_results(out_dir, baseline_identity(method, ci, test.fingerprint, options), overwrite)
    _mkdir(out_dir)
    return baseline_job(out_dir, method, train, test, plots=plots, options=options, quiet=quiet, fpr=fpr)
