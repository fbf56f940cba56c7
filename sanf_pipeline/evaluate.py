"""Scoring the test split and the metrics every method reports (flow runs and baselines alike).

- ``compute_metrics(is_anomaly, scores)``: AUROC with anomalies as the positive class
  (``sklearn.metrics.roc_auc_score``), AUPR (``average_precision_score``, anomalies positive) and the TPR at
  5% FPR (the highest TPR of any threshold whose FPR is at most 5%, so a threshold that can be set).
- ``write_results(out_dir, ...)``: ``metrics.json``, ``scores.csv``, ``report.md`` and the PNG plots (the
  plotting and markdown live in ``report.py``).
- ``eval_run(run_dir, cache=None, score="nll")``: score a finished flow run on the whole test split of its
  cache (or of ``cache``, which must match it). Higher score = more anomalous: ``nll`` is -log p(x) of the
  flow (the default), ``z2`` the mean of z^2 (the official code's score, no log-determinant).

One-vs-rest protocol: the anomalies are every test sample whose label is not the normal class.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SanfError
from .runs import (
    METRICS_FILE,
    RESULT_FILES,
    SCORES_FILE,
    check_finite,
    load_run,
    now,
    read_json_file,
    write_json_atomic,
    write_text_atomic,
)

SCORES = ("nll", "z2")
SCORE_DESCRIPTIONS = {
    "nll": "negative log-likelihood of the flow (nats), higher = more anomalous",
    "z2": "mean of z^2 over the latent dimensions (official code), higher = more anomalous",
}
MAX_FPR = 0.05
EVAL_BLOCK_BYTES = 256 * 2**20


def compute_metrics(labels_is_anomaly, scores) -> dict:
    """AUROC, AUPR and TPR at 5% FPR with anomalies as the positive class; higher score = more anomalous."""
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    y = np.asarray(labels_is_anomaly).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(y) != len(s):
        raise SanfError(f"{len(y)} labels but {len(s)} scores")
    n_anom = int(y.sum())
    if n_anom == 0 or n_anom == len(y):
        which = "anomalous" if n_anom == 0 else "normal"
        raise SanfError(f"the test split has no {which} samples ({len(y)} in all); AUROC needs both")
    s = sanitize_scores(s)
    fpr, tpr, _ = roc_curve(y, s)
    ok = fpr <= MAX_FPR + 1e-12
    return {
        "auroc": float(roc_auc_score(y, s)),
        "aupr": float(average_precision_score(y, s)),
        "tpr_at_5_fpr": float(tpr[ok].max()) if ok.any() else 0.0,
        "n_test": len(y),
        "n_anomalous": n_anom,
        "n_normal": len(y) - n_anom,
    }


def sanitize_scores(scores: np.ndarray) -> np.ndarray:
    """Non-finite scores (a sample the model cannot score) count as the most anomalous."""
    s = np.asarray(scores, dtype=np.float64)
    bad = ~np.isfinite(s)
    if bad.any():
        s = s.copy()
        finite = s[~bad]
        top = float(finite.max()) if finite.size else 0.0
        s[bad] = top + 1.0 + abs(top)
        s[np.isneginf(scores)] = (float(finite.min()) if finite.size else 0.0) - 1.0
    return s


def scores_csv(sample_ids, labels, is_anomaly, scores) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["sample_id", "label", "is_anomaly", "score"])
    for sid, lab, a, s in zip(sample_ids, labels, is_anomaly, scores, strict=True):
        w.writerow([sid, int(lab), int(bool(a)), repr(float(s))])
    return buf.getvalue()


def read_scores_csv(path) -> dict:
    """``scores.csv`` back as arrays (for reports and sweeps)."""
    path = Path(path)
    from .runs import MAX_JSON_BYTES

    if path.stat().st_size > 16 * MAX_JSON_BYTES:
        raise SanfError(f"{path} is too large to be a sanf scores file")
    ids, labels, anom, scores = [], [], [], []
    with open(path, newline="", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            ids.append(row["sample_id"])
            labels.append(int(row["label"]))
            anom.append(bool(int(row["is_anomaly"])))
            scores.append(float(row["score"]))
    return {"sample_id": ids, "label": np.asarray(labels, np.int64), "is_anomaly": np.asarray(anom, bool),
            "score": np.asarray(scores, np.float64)}


def write_results(out_dir, metrics: dict, sample_ids, labels, is_anomaly, scores, *, train_log=None,
                  plots: bool = True) -> dict[str, Path]:
    """Write ``metrics.json``, ``scores.csv``, ``report.md`` and the PNGs into ``out_dir``; returns the paths."""
    from . import report

    out_dir = Path(out_dir)
    paths = {"scores": out_dir / SCORES_FILE, "metrics": out_dir / METRICS_FILE}
    write_text_atomic(paths["scores"], scores_csv(sample_ids, labels, is_anomaly, scores))
    if plots:
        paths.update(report.write_plots(out_dir, np.asarray(is_anomaly, bool), sanitize_scores(np.asarray(scores)),
                                        metrics))
    paths["report"] = report.write_run_report(out_dir, metrics, train_log=train_log,
                                              plots={k: v.name for k, v in paths.items() if k in ("hist", "roc")})
    write_json_atomic(paths["metrics"], metrics)  # last: its presence means the results are complete
    return paths


def guard_results(out_dir, identity: dict, overwrite: bool) -> None:
    """Refuse to replace earlier results that differ from what is about to be written, unless ``overwrite``."""
    path = Path(out_dir) / METRICS_FILE
    if not path.exists() or overwrite:
        return
    old = read_json_file(path)
    old_identity = {k: old.get(k) for k in identity} if isinstance(old, dict) else {}
    if old_identity != identity:
        diff = ", ".join(f"{k} {old_identity.get(k)!r} -> {v!r}" for k, v in identity.items()
                         if old_identity.get(k) != v)
        raise SanfError(f"{path} holds earlier results with other settings ({diff}); pass --overwrite to replace "
                        f"them or write to another --out")


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict
    paths: dict
    scores: np.ndarray
    is_anomaly: np.ndarray


def eval_run(run_dir, cache=None, score: str = "nll", *, out_dir=None, overwrite: bool = False,
             device: str = "auto", batch_size: int = 256, plots: bool = True, fpr: float | None = None) -> EvalResult:
    """Score the whole test split with a finished run; write the result files (default: into the run folder).

    ``cache`` may be any cache in the run's feature space (``compat.py``); the normal class is found by name.
    ``fpr``: target false-positive rate of the calibrated threshold (default: the run's)."""
    import torch

    from .cache import open_cache
    from .runs import LOG_FILE, read_jsonl
    from .train import resolve_device, score_flow

    if score not in SCORES:
        raise SanfError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    run = load_run(run_dir, device=str(dev))
    cfg = run.config
    cache_path = Path(cache) if cache is not None else Path(cfg["cache"]["path"])
    if cache is None and not cache_path.exists():
        raise SanfError(f"the cache this run was trained on ({cache_path}) is not there; pass --cache PATH")
    out_dir = Path(out_dir) if out_dir else run_dir
    from .compat import check_cache_compatible, normal_class_in

    c = open_cache(cache_path)
    try:
        check_cache_compatible(cfg["cache"], c, run_dir)
        normal = normal_class_in(c, cfg, run_dir)
        identity = {"method": cfg.get("method", "sanf-flow"), "score": score, "normal_class": normal,
                    "cache_fingerprint": c.fingerprint, "run_id": cfg.get("run_id")}
        guard_results(out_dir, identity, overwrite)
        split = c.split("test")
        labels, sample_ids = split.labels, split.sample_ids
        # stream the split in blocks of rows so memory stays bounded for large token caches
        row_bytes = (c.num_tokens + 1 if run.needs_patch else 1) * c.dim * 4
        rows = max(256, EVAL_BLOCK_BYTES // max(row_bytes, 1))
        parts = []
        for start in range(0, split.n, rows):
            cls, patch = split.read(start, min(start + rows, split.n), patch=run.needs_patch)
            if not len(cls):
                continue
            check_finite(f"the test features in {c.path}", cls, patch)
            x, p = run.normalizer.transform(cls, patch)
            parts.append(score_flow(run.flow, torch.from_numpy(x), None if p is None else torch.from_numpy(p),
                                    score, batch_size=batch_size))
    finally:
        c.close()
    scores = np.concatenate(parts) if parts else np.zeros(0)
    fit = cfg.get("fit", {})
    is_anomaly = labels != normal
    metrics = compute_metrics(is_anomaly, scores)
    result = cfg.get("result") or {}
    metrics.update(identity)
    metrics.update({
        "normal_class_name": cfg.get("normal_class_name"),
        "score_description": SCORE_DESCRIPTIONS[score],
        "epoch_selection": cfg.get("epoch_selection"),
        "best_epoch": result.get("best_epoch"), "epochs_run": result.get("epochs_run"),
        "n_train": cfg.get("n_train_total"), "n_nonfinite_scores": int((~np.isfinite(scores)).sum()),
        "run": str(run_dir), "cache": str(cache_path), "flow": cfg.get("flow"), "fit": fit,
        "evaluated": now(),
    })
    from .calibration import eval_threshold_metrics

    metrics.update(eval_threshold_metrics(cfg.get("calibration"), score, is_anomaly, scores, fpr))
    log = read_jsonl(run_dir / LOG_FILE) if (run_dir / LOG_FILE).exists() else None
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SanfError(f"cannot create {out_dir}: {exc.strerror or exc}; choose another --out") from None
    paths = write_results(out_dir, metrics, sample_ids, labels, is_anomaly, scores, train_log=log, plots=plots)
    return EvalResult(out_dir=out_dir, metrics=metrics, paths=paths, scores=scores, is_anomaly=is_anomaly)


__all__ = ["RESULT_FILES", "SCORES", "EvalResult", "compute_metrics", "eval_run", "read_scores_csv",
           "write_results"]
