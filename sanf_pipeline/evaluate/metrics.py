"""The metrics every method reports and the result files every run writes (flow runs and baselines alike).

- ``compute_metrics(is_anomaly, scores)``: AUROC with anomalies as the positive class
  (``sklearn.metrics.roc_auc_score``), AUPR (``average_precision_score``, anomalies positive) and the TPR at
  5% FPR (the highest TPR of any threshold whose FPR is at most 5%, so a threshold that can be set).
- ``write_results(out_dir, ...)``: ``metrics.json``, ``scores.csv``, ``report.md`` and the PNG plots (the
  plotting and markdown live in ``evaluate/report.py``).
- ``guard_results(out_dir, identity, overwrite)``: refuse to replace earlier results of other settings.

Scoring lives in ``flow/score.py``; the jobs that score and call these (`sanf eval`, `sanf baseline`, the sweep) in
``jobs/``.

One-vs-rest protocol: the anomalies are every test sample whose label is not the normal class.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from ..cache.schema import read_json_file
from ..errors import SanfError
from ..flow.score import SCORES
from ..store.atomic import write_json_atomic, write_text_atomic
from ..store.run_folder import METRICS_FILE, RESULT_FILES, SCORES_FILE

MAX_FPR = 0.05


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
    from ..cache.schema import MAX_JSON_BYTES

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
                  plots: bool = True, extra_plots: dict | None = None) -> dict[str, Path]:
    """Write ``metrics.json``, ``scores.csv``, ``report.md`` and the PNGs into ``out_dir``; returns the paths.
    ``extra_plots``: images already written there that the report shows (``{"maps": file name}``)."""
    from . import report

    out_dir = Path(out_dir)
    paths = {"scores": out_dir / SCORES_FILE, "metrics": out_dir / METRICS_FILE}
    write_text_atomic(paths["scores"], scores_csv(sample_ids, labels, is_anomaly, scores))
    if plots:
        paths.update(report.write_plots(out_dir, np.asarray(is_anomaly, bool), sanitize_scores(np.asarray(scores)),
                                        metrics))
    shown = {k: v.name for k, v in paths.items() if k in ("hist", "roc")}
    shown.update(extra_plots or {})
    paths.update({k: out_dir / v for k, v in (extra_plots or {}).items()})
    paths["report"] = report.write_run_report(out_dir, metrics, train_log=train_log, plots=shown)
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


__all__ = ["RESULT_FILES", "SCORES", "compute_metrics", "guard_results", "read_scores_csv", "scores_csv",
           "write_results"]
