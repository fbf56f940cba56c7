"""Flow runs, one code path shared by `sanf fit`/`eval`, `sanf sweep` (every executor) and `sanf demo`.

A job works on arrays that its caller has read (``jobs.data``: ``TrainData``, ``TestData`` in memory or streamed
from a cache in blocks), so the sweep can read the cache once and pass shared memory in, while the single-run
commands (``jobs.api``) read just what one run needs. Jobs write every result file.

- ``fit_flow_job``: fit a flow into a run folder (``config.json``, checkpoints, ``train_log.jsonl``,
  ``model.safetensors``), resuming an unfinished fit of the same settings and data, and give it its patch part
  (from the sweep's shared parts when there are some, ``jobs.parts``).
- ``eval_flow_job``: score the test split with the run's ``models`` module (flow or combined) and write
  ``metrics.json``, ``scores.csv``, ``report.md`` and the plots.
- ``flow_job``: both (reusing a model already fitted into the folder): a sweep's flow run.
- ``load_run``: a finished run read back (``LoadedRun.model(kind)``: the module of a score kind).

So for one class, settings and seed a sweep run's ``scores.csv`` is byte-identical to `sanf fit` + `sanf eval`
(same torch thread count; tests/test_sweep.py), and its ``metrics.json`` differs only in where and when it was
written (``run``, ``evaluated``) and the sweep's own keys (``sweep``, ``sweep_run_id``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache.schema import read_json_file
from ..device import resolve_device
from ..errors import SanfError
from ..evaluate.metrics import compute_metrics, write_results
from ..flow.score import SCORE_DESCRIPTIONS
from ..models import (
    PATCH_KINDS,
    AnomalyModel,
    Combined,
    FlowModel,
    flow_uses_patch,
    resolve_score,
    score_blocks,
)
from ..store.atomic import load_tensors, now, read_jsonl, write_json_atomic
from ..store.run_folder import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOG_FILE,
    MODEL_FILE,
    RUN_FILES,
    finish_run,
    held_out_maps_of,
    read_run_config,
    start_run_config,
)
from ..train.config import FitConfig, current_run_settings
from ..train.fit import FitResult, fit_flow
from .data import EvalResult, TestData, TrainData, make_out_dir
from .maps import MapOptions, eval_maps
from .parts import PatchParts, attach_patch_part


@dataclass
class LoadedRun:
    """A finished flow run read back from its folder: ``flow_model`` (normaliser + flow), ``patch_score`` (the
    ``Combined`` model of its patch part, None for the flow alone); ``model(kind)`` the module of a score kind."""

    run_dir: Path
    config: dict
    flow_model: FlowModel
    extra: dict = field(default_factory=dict)
    patch_score: Combined | None = None
    held_out_maps: dict = field(default_factory=dict)  # the held-out normal evidence by map kind (jobs.maps)

    @property
    def flow(self) -> torch.nn.Module:
        return self.flow_model.flow

    @property
    def normalizer(self):
        return self.flow_model.normalizer

    @property
    def needs_patch(self) -> bool:
        """The flow takes patch tokens."""
        return flow_needs_patch(self.config)

    def model(self, score: str = "auto") -> AnomalyModel:
        """The run's model scoring ``score`` (a kind of ``RUN_SCORES``; ``auto``: the run's default)."""
        return run_model(self.flow_model, self.patch_score, resolve_score(score, self.config, self.run_dir))


def run_model(flow_model: FlowModel, patch_score: Combined | None, kind: str) -> AnomalyModel:
    """The module of score ``kind`` for a flow run (its flow, or its combined model)."""
    if kind in PATCH_KINDS:
        if patch_score is None:
            raise SanfError(f"the {kind} score needs the run's patch part; the run has none")
        return patch_score.with_score(kind)
    return flow_model.with_score(kind)


def load_run(run_dir, device: str = "cpu") -> LoadedRun:
    """Rebuild the flow, the normaliser and the patch part of a finished run (safetensors + JSON only)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    config["settings"] = current_run_settings(config.get("settings"))  # an older identity version, in today's terms
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
    flow_model = FlowModel.from_state(meta.get("flow"), meta.get("normalizer") or {}, tensors, where=str(model_path))
    part = config.get("patch_score")
    patch_score = Combined.from_state(flow_model, part, tensors) if part else None
    flow_model.to(device)
    if patch_score is not None:
        patch_score.to(device)
    return LoadedRun(run_dir=run_dir, config=config, flow_model=flow_model, patch_score=patch_score,
                     held_out_maps=held_out_maps_of(tensors))


def flow_needs_patch(config: dict) -> bool:
    """Whether the flow of a run ``config`` takes patch tokens (a fusion, or the spatial main input)."""
    return flow_uses_patch(config.get("flow") or {})


def fit_settings(cfg: FitConfig, fingerprint: str, class_index: int) -> dict:
    """What identifies a flow run (``config.json: settings``; its hash is the run id)."""
    return {"fit": cfg.settings(), "cache_fingerprint": fingerprint, "normal_class": class_index}


# ------------------------------------------------------------------------------------------------ the jobs
def fit_flow_job(run_dir, cfg: FitConfig, train: TrainData, *, fingerprint: str, cache_info: dict,
                 created: str | None = None, resumed: bool = False, extra: dict | None = None, quiet: bool = True,
                 callback=None, parts: PatchParts | None = None) -> tuple[dict, FitResult]:
    """Fit a flow on ``train`` into ``run_dir``: config first, epoch checkpoints (``cfg.checkpoint_every``), model
    last. ``parts``: patch parts already fitted by other runs of a sweep (reused when their key matches)."""
    run_dir = Path(run_dir)
    settings = fit_settings(cfg, fingerprint, train.class_index)
    before = {name for name in RUN_FILES if (run_dir / name).exists()}
    try:
        config = start_run_config(run_dir, cfg, settings, class_index=train.class_index,
                                  class_name=train.class_name, n_train=len(train.cls), cache_identity=cache_info,
                                  created=created or now(), extra=extra)
        if resumed:
            config["resumed"] = now()
            write_json_atomic(run_dir / CONFIG_FILE, config)
        result = fit_flow(train.cls, train.patch if cfg.flow_needs_patch else None, cfg, run_dir=run_dir,
                          quiet=quiet, callback=callback, description=f"fit {train.class_name}")
        result.patch_part_key = attach_patch_part(result, cfg, train, fingerprint, parts, quiet=quiet)
        finish_run(run_dir, config, result)
    except Exception:  # not KeyboardInterrupt: an interrupted fit keeps its config to be resumed
        _forget_failed_start(run_dir, before)
        raise
    return config, result


def _forget_failed_start(run_dir: Path, before: set[str]) -> None:
    """Remove the run files a fit that failed before its first checkpoint created (a setting the data rejects,
    such as a --token-pool that does not divide the grid): a config.json left behind would make the corrected
    command look like "an unfinished run with other settings". Files that were there before are kept, and so is
    everything once a checkpoint exists (that rerun resumes); only sanf's run files are touched (issue 22)."""
    if CHECKPOINT_FILE not in before and (run_dir / CHECKPOINT_FILE).exists():
        return
    for name in RUN_FILES:
        if name not in before:
            try:
                (run_dir / name).unlink(missing_ok=True)
            except OSError:
                pass  # the error being raised matters more than a file we could not tidy away


def eval_flow_job(out_dir, flow_model: FlowModel, patch_score: Combined | None, config: dict, test: TestData, *,
                  score: str = "auto", device: str = "auto", batch_size: int = 256, plots: bool = True, run_dir=None,
                  train_log: list | None = None, extra_metrics: dict | None = None,
                  flow_scores: np.ndarray | None = None, patch_scores: np.ndarray | None = None,
                  fpr: float | None = None, normal_class: int | None = None,
                  maps: MapOptions | None = None, threshold: float | None = None) -> EvalResult:
    """Score ``test`` with a fitted flow run (``flow_model``; ``patch_score``: its combined model, None for the flow
    alone) and write the result files into ``out_dir``. ``score``: a kind of ``models.RUN_SCORES`` (``auto``: the
    run's default). ``flow_scores`` / ``patch_scores``: the parts' scores of ``test`` already computed by the caller
    (a stack of flows scored in one pass; a sweep's patch part shared by runs); ``normal_class``: the normal class's
    index in ``test`` when it is another cache than the run's (by name); ``fpr``: target false-positive rate of the
    calibrated threshold (default: the run's); ``threshold``: an explicit threshold instead (exclusive with
    ``fpr``); ``maps``: make the score's anomaly maps (pixel metrics when the cache
    records masks, the report's overlays; ``jobs.maps``). ``EvalResult.parts`` holds the parts' test scores."""
    from ..evaluate.calibration import eval_threshold_metrics

    requested, score = score, resolve_score(score, config, run_dir or out_dir)
    if score in PATCH_KINDS and patch_score is None:
        raise SanfError(f"the {score} score needs the run's patch part; load the run with jobs.load_run")
    normal = int(config["normal_class"]) if normal_class is None else int(normal_class)
    scores, parts = _score_test(flow_model, patch_score, test, score, flow_scores, patch_scores, device, batch_size,
                                maps is not None)
    is_anomaly = test.labels != normal
    metrics = compute_metrics(is_anomaly, scores)
    if score == "combined":  # what each part of the combined score alone would have scored (the same runs, no refit)
        metrics["auroc_parts"] = {k: compute_metrics(is_anomaly, parts[k])["auroc"] for k in ("nll", "patch")}
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
    metrics.update(eval_threshold_metrics(config.get("calibration"), score, is_anomaly, scores, fpr, threshold))
    out_dir = Path(out_dir)
    make_out_dir(out_dir)
    extra_plots = eval_maps(out_dir, metrics, parts.pop("map", None), maps, test, scores, is_anomaly, normal, score,
                            config.get("calibration"), fpr) if maps is not None else {}
    paths = write_results(out_dir, metrics, test.sample_ids, test.labels, is_anomaly, scores, train_log=train_log,
                          plots=plots, extra_plots=extra_plots)
    return EvalResult(out_dir=out_dir, metrics=metrics, paths=paths, scores=scores, is_anomaly=is_anomaly,
                      parts=parts)


def _score_test(flow_model: FlowModel, patch_score: Combined | None, test: TestData, kind: str, flow_scores,
                patch_scores, device, batch_size: int, maps: bool = False) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The run's ``kind`` scores of ``test`` streamed block by block through the run's model, and the parts'
    scores (``nll``, ``patch``) that were computed or given. Parts given by the caller are not recomputed; when
    both parts are needed, each block is read once for both. ``maps``: also the evidence (``map``, token grids) of a
    kind that has it, from the same pass (none when the caller gave the patch part's scores)."""
    dev = resolve_device(device)

    def run(model) -> dict[str, np.ndarray]:
        model.to(dev)
        try:
            return score_blocks(model, test.blocks(model.needs_patch), batch_size=batch_size, maps=maps)
        finally:
            model.to("cpu")

    if kind not in PATCH_KINDS:  # the flow alone; given flow scores are of this kind (flow_score_kind)
        scores = run(flow_model.with_score(kind))["score"] if flow_scores is None else flow_scores
        return np.asarray(scores, np.float64), {}
    parts = {k: np.asarray(v, np.float64) for k, v in (("nll", flow_scores), ("patch", patch_scores))
             if v is not None}
    need_nll, need_patch = kind == "combined" and "nll" not in parts, "patch" not in parts
    evidence = None
    if need_nll and need_patch:  # one pass, each block read once for both parts
        out = run(patch_score.with_score("combined"))
        parts.update(nll=out["nll"], patch=out["patch"])
        evidence = out.get("map")
    elif need_nll:
        parts["nll"] = run(flow_model.with_score("nll"))["score"]
    elif need_patch:
        out = run(patch_score.with_score("patch"))
        parts["patch"] = out["score"]
        evidence = out.get("map")
        if evidence is not None and kind == "combined":
            evidence = patch_score.standardise_map(torch.from_numpy(evidence)).float().numpy()
    if kind == "patch":
        return parts["patch"], {"patch": parts["patch"], **({"map": evidence} if evidence is not None else {})}
    combined = patch_score.combine(torch.from_numpy(parts["nll"]), torch.from_numpy(parts["patch"])).numpy()
    return combined, {**parts, **({"map": evidence} if evidence is not None else {})}


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
             plots: bool = True, extra_config: dict | None = None, extra_metrics: dict | None = None,
             parts: PatchParts | None = None) -> dict:
    """A whole flow run into ``run_dir``: fit (or reuse a model fitted there, or resume its checkpoint), score,
    write every file. Returns timings and the AUROC (the caller's log record). ``parts``: the sweep's patch parts
    (a bank and its test scores fitted once per ``models.combined.patch_part_key``)."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    settings = fit_settings(cfg, test.fingerprint, train.class_index)
    loaded = _reusable_model(run_dir, settings)
    key = None
    if loaded is not None:
        flow_model, config, part = loaded.flow_model, loaded.config, loaded.patch_score
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
                                      created=created, extra=extra_config, parts=parts)
        flow_model, log, part = FlowModel(result.normalizer, result.model), result.log, result.patch_score
        key = result.patch_part_key
    t_fit = time.perf_counter() - t0
    res = eval_flow_job(run_dir, flow_model, part, config, test, score=score, device=cfg.device,
                        batch_size=cfg.eval_batch_size, plots=plots, train_log=log, extra_metrics=extra_metrics,
                        patch_scores=parts.test_scores(key) if key else None)
    if key and "patch" in res.parts:
        parts.add_test(key, res.parts["patch"])
    summary = config.get("result") or {}
    seen = 0 if loaded is not None else int(summary.get("n_train") or 0) * int(summary.get("epochs_run") or 0)
    return {"auroc": res.metrics["auroc"], "fit_s": t_fit, "score_write_s": time.perf_counter() - t0 - t_fit,
            "reused_model": loaded is not None, "train_samples_seen": seen, "n_test": len(res.scores)}
