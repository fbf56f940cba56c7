"""Baseline runs: ``baseline_job`` fits a registered method (``models.BASELINES``) on the normal training rows, scores
the test split streamed in blocks, and writes the run folder with its model (every baseline run is a detector);
``calibrate_baseline`` gives it a threshold from held-out normal rows."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from ..device import resolve_device
from ..errors import SanfError
from ..evaluate.metrics import compute_metrics, write_results
from ..models import (
    baseline_tensors,
    create_baseline,
    score_arrays,
    score_blocks,
)
from ..store.atomic import now, package_versions, save_tensors_atomic, write_json_atomic
from ..store.run_folder import (
    CONFIG_FILE,
    MODEL_FILE,
    held_out_map_tensors,
)
from .data import EvalResult, TestData, TrainData
from .maps import MapOptions, eval_maps

BASELINE_EPOCH_SELECTION = "not applicable (no training epochs; fitted on normal training data only)"


def baseline_job(out_dir, method: str, train: TrainData, test: TestData, *, plots: bool = True,
                 extra: dict | None = None, extra_metrics: dict | None = None, options: dict | None = None,
                 quiet: bool = True, fpr: float = 0.01, device: str = "auto",
                 batch_size: int | None = None, maps: MapOptions | None = None) -> EvalResult:
    """Fit baseline ``method`` on ``train`` (class tokens; patch tokens for patch-knn), score ``test`` streamed in
    blocks, write config, the fitted model (``model.safetensors``: every baseline run is a detector) and the
    result files. ``options`` go to the method's factory. The threshold is calibrated on the held-out 10% of
    ``train`` scored by the baseline fitted on the other rows (``calibrate_baseline``); so are the pixel threshold's
    held-out maps. ``maps``: make the anomaly maps of a method that has them (``jobs.maps``)."""
    from ..evaluate.calibration import eval_threshold_metrics

    dev = resolve_device(device)
    model = create_baseline(method, **(options or {}))
    model.fit(train.cls, train.patch if model.needs_patch else None, device=dev, quiet=quiet)
    scored = score_blocks(model, test.blocks(model.needs_patch), batch_size=batch_size, maps=maps is not None)
    scores = scored["score"]
    ci = train.class_index
    is_anomaly = test.labels != ci
    metrics = compute_metrics(is_anomaly, scores)
    metrics.update(baseline_identity(method, ci, test.fingerprint, options))
    metrics.update({"normal_class_name": train.class_name, "score_description": model.description,
                    "epoch_selection": BASELINE_EPOCH_SELECTION, "n_train": int(len(train.cls)),
                    "cache": test.cache_path, "evaluated": now(), "settings": {"method": method,
                                                                                **model.settings()},
                    **(extra or {}), **(extra_metrics or {})})
    calibration, held_out_maps = calibrate_baseline(method, train.cls, fpr=fpr, train_patch=train.patch,
                                                    options=options, device=dev)
    metrics.update(eval_threshold_metrics(calibration, method, is_anomaly, scores))
    out_dir = Path(out_dir)
    config = {"format": "sanf-baseline", "format_version": 1, "method": method, "normal_class": ci,
              "normal_class_name": train.class_name, "cache": test.identity, "created": now(),
              "versions": package_versions(), "calibration": calibration, "model": model.config(), **(extra or {})}
    write_json_atomic(out_dir / CONFIG_FILE, config)
    tensors = baseline_tensors(model)
    tensors.update(held_out_map_tensors({method: held_out_maps} if held_out_maps is not None else None))
    save_tensors_atomic(out_dir / MODEL_FILE, tensors, config)
    extra_plots = {}
    if maps is not None:
        options = dataclasses.replace(maps, held_out={method: held_out_maps})
        extra_plots = eval_maps(out_dir, metrics, scored.get("map"), options, test, scores, is_anomaly, ci, method,
                                calibration, fpr)
    paths = write_results(out_dir, metrics, test.sample_ids, test.labels, is_anomaly, scores, plots=plots,
                          extra_plots=extra_plots)
    return EvalResult(out_dir=out_dir, metrics=metrics, paths=paths, scores=scores, is_anomaly=is_anomaly)


def calibrate_baseline(method: str, train_cls: np.ndarray, *, fpr: float = 0.01, seed: int = 0,
                       fraction: float = 0.1, train_patch: np.ndarray | None = None,
                       options: dict | None = None, device="cpu") -> tuple[dict | None, np.ndarray | None]:
    """Held-out scores of a baseline: the slice a flow with ``seed`` would hold out, scored by the baseline fitted
    on the remaining rows, and that slice's evidence maps (``(n, H, W)``; None for a method without maps). ``(None,
    None)`` when the class is too small to hold any row out."""
    from ..evaluate.calibration import SLICE_BASELINE, calibration_record

    train_cls = np.asarray(train_cls)
    n = len(train_cls)
    n_val = max(1, int(round(fraction * n)))
    if n - n_val < 2:
        return None, None
    order = np.random.default_rng(seed).permutation(n)
    tr, va = np.sort(order[n_val:]), np.sort(order[:n_val])
    try:
        model = create_baseline(method, **(options or {}))
        patch = np.asarray(train_patch) if model.needs_patch else None
        model.fit(train_cls[tr], None if patch is None else patch[tr], device=device, quiet=True)
        held_out = score_arrays(model, train_cls[va], None if patch is None else patch[va], maps=model.has_map)
    except SanfError:
        return None, None  # e.g. kNN with fewer rows than k
    record = calibration_record({method: held_out["score"]}, fpr=fpr, slice_desc=SLICE_BASELINE, seed=seed,
                                fraction=fraction)
    return record, held_out.get("map")


def baseline_identity(method: str, class_index: int, fingerprint: str, options: dict | None = None) -> dict:
    out = {"method": method, "score": method, "normal_class": class_index, "cache_fingerprint": fingerprint}
    if options:
        out["options"] = dict(options)
    return out
