"""Thresholds without anomalies: calibration on held-out normal training images, and threshold metrics.

Pure functions on score arrays (no files, no models); the run pipeline stores what ``calibration_record``
returns in a run's ``config.json`` and the detector, ``sanf score`` and ``sanf eval`` read it back.

**The held-out slice.** At fit time a run scores the normal training rows it never trained on: the
early-stopping slice (``val_fraction``, default 10%, drawn with the run's seed), and with ``--epochs N`` the
same 10%, held out for calibration only. Those scores are exchangeable with the scores of new normal images
from the same source, which is all the rule below needs.

**The rule (split-conformal order statistic).** With ``n`` held-out normal scores sorted ``s_(1) <= ... <=
s_(n)`` and a target false-positive rate ``alpha``, the threshold is ``t = s_(k)`` with
``k = ceil((n + 1) (1 - alpha))``; an image is anomalous when its score is ``> t``. For a new normal image
exchangeable with the held-out ones, ``P(score > t) <= 1 - k / (n + 1) <= alpha`` (Vovk et al. 2005; Angelopoulos
& Bates 2021, "A gentle introduction to conformal prediction", section 1). That bound is recorded as
``fpr_bound``. When ``n + 1 < 1 / alpha`` the rank exceeds ``n``: no finite threshold guarantees ``alpha`` with so
few images, so the threshold is the largest held-out score and the record says ``guaranteed: false`` with the
best bound that ``n`` allows, ``1 / (n + 1)``. Every target below ``2 / (n + 1)`` gives rank ``n`` (or more, clipped
to ``n``): the same threshold, the largest held-out score, so ``--fpr 0.01`` and ``0.05`` coincide with 34 held-out
images; the record's ``note`` says so in words (``describe_threshold``), with the FPR the slice can bound.

**An explicit threshold** (``--threshold``, ``explicit_threshold``) replaces the rule: no target and no bound, only
the share of the held-out normal scores above it (``held_out_fpr``), which a user can compare with the target they
had in mind.

``threshold_metrics`` gives the realised FPR, TPR, precision and F1 of a threshold on labelled test scores;
``f1_optimal_threshold`` the test-set threshold with the best F1, which is *selected on the test set* and only
reported for comparison.
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import SanfError

DEFAULT_FPR = 0.01
RULE = "split-conformal: t = s_(k), k = ceil((n + 1)(1 - fpr)) of the n held-out normal scores; anomalous if score > t"
SLICE_EARLY = "the early-stopping slice: held-out normal training rows, never trained on"
SLICE_FIXED = "a held-out share of the normal training rows (calibration only), never trained on"


def check_fpr(fpr) -> float:
    if isinstance(fpr, bool) or not isinstance(fpr, (int, float)) or not 0 < fpr < 1 or not math.isfinite(fpr):
        raise SanfError(f"--fpr must be a number between 0 and 1 (exclusive), got {fpr!r}")
    return float(fpr)


def conformal_threshold(calibration_scores, fpr: float = DEFAULT_FPR) -> dict:
    """The threshold of the split-conformal rule (module docstring) for target false-positive rate ``fpr``."""
    fpr = check_fpr(fpr)
    s = np.sort(np.asarray(calibration_scores, dtype=np.float64).ravel())
    s = s[np.isfinite(s)]
    n = len(s)
    if n == 0:
        raise SanfError("no finite held-out normal scores to calibrate a threshold on; refit the run")
    k = math.ceil((n + 1) * (1.0 - fpr) - 1e-9)  # the 1e-9 keeps an exact integer from rounding up
    guaranteed = k <= n
    k = min(max(k, 1), n)
    out = {"value": float(s[k - 1]), "target_fpr": fpr, "n_calibration": n, "rank": k,
           "fpr_bound": 1.0 - k / (n + 1), "guaranteed": bool(guaranteed), "rule": RULE,
           "min_n_for_target": math.ceil(1.0 / fpr) - 1, "min_fpr_bound": 1.0 / (n + 1)}
    out["note"] = _few_images_note(out)
    return out


def _few_images_note(thr: dict) -> str | None:
    """Why a threshold is the largest held-out score, when it is (module docstring): too few images to bound the
    target, or to tell it apart from every other target below ``2 / (n + 1)``."""
    n, fpr = thr["n_calibration"], thr["target_fpr"]
    if thr["rank"] < n:
        return None
    if thr["guaranteed"]:
        return (f"with {n} held-out normal images every target FPR below {2 / (n + 1):.3g} gives this same threshold, "
                f"their largest score (FPR bound {thr['fpr_bound']:.3g})")
    return (f"{n} held-out normal images cannot bound FPR {fpr:g} (that needs at least {thr['min_n_for_target']}): "
            f"the smallest FPR they can bound is 1/(n+1) = {1 / (n + 1):.3g}, and every target below "
            f"{2 / (n + 1):.3g} gives this same threshold, their largest score; hold out more normal images or set "
            f"one with --threshold")


def check_decision(fpr: float | None, threshold: float | None) -> None:
    """A target FPR or an explicit threshold (never both), each valid; raises SanfError."""
    if fpr is not None and threshold is not None:
        raise SanfError("--threshold and --fpr exclude each other: give a threshold or a target FPR")
    if fpr is not None:
        check_fpr(fpr)
    if threshold is not None:
        explicit_threshold(threshold)


def explicit_threshold(value, calibration_scores=None) -> dict:
    """A threshold given by the user (``--threshold``) in the record form of ``conformal_threshold``: no target and
    no bound; ``held_out_fpr`` is the share of the held-out normal scores above it (None without them)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SanfError(f"--threshold must be a finite number, got {value!r}")
    cal = np.asarray(calibration_scores if calibration_scores is not None else [], np.float64).ravel()
    cal = cal[np.isfinite(cal)]
    return {"value": float(value), "target_fpr": None, "explicit": True, "n_calibration": int(len(cal)),
            "held_out_fpr": float((cal > value).mean()) if len(cal) else None, "fpr_bound": None,
            "guaranteed": False, "rule": "set explicitly (--threshold); anomalous if score > t", "note": None}


def describe_threshold(thr: dict) -> str:
    """A threshold record in words (the CLI's lines and the report): value, where it comes from, and its note."""
    if thr.get("explicit"):
        above = (f"; {100 * thr['held_out_fpr']:.3g}% of the {thr['n_calibration']} held-out normal images score "
                 f"above it" if thr.get("held_out_fpr") is not None else "")
        return f"threshold {thr['value']:.4g} set with --threshold{above}"
    text = (f"threshold {thr['value']:.4g} (target FPR {thr['target_fpr']:g}, {thr['n_calibration']} held-out "
            f"normal images)")
    return f"{text}; note: {thr['note']}" if thr.get("note") else text


def percentiles(calibration_scores, scores) -> np.ndarray:
    """Percent of the held-out normal scores that are <= each score (0..100); NaN scores give 100."""
    cal = np.sort(np.asarray(calibration_scores, dtype=np.float64).ravel())
    cal = cal[np.isfinite(cal)]
    s = np.asarray(scores, dtype=np.float64).ravel()
    if not len(cal):
        return np.full(len(s), np.nan)
    out = 100.0 * np.searchsorted(cal, np.nan_to_num(s, nan=np.inf), side="right") / len(cal)
    return out


def decide(scores, threshold: dict | None, calibration_scores) -> tuple[np.ndarray, np.ndarray]:
    """(anomalous, percentile) of new scores: ``score > threshold["value"]`` (NaN counts as anomalous; nothing is
    without a threshold) and :func:`percentiles` among the held-out normal scores. The one rule of `sanf score`, the
    ``Detector`` and `sanf serve`."""
    s = np.asarray(scores, np.float64)
    anomalous = (np.nan_to_num(s, nan=np.inf) > threshold["value"]) if threshold else np.zeros(len(s), bool)
    return anomalous, percentiles(calibration_scores, s)


def _rates(tp: np.ndarray, fp: np.ndarray, n_pos: int, n_neg: int) -> dict[str, np.ndarray]:
    tp, fp = np.asarray(tp, np.float64), np.asarray(fp, np.float64)
    flagged = tp + fp
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(flagged > 0, tp / np.maximum(flagged, 1), np.nan)
        tpr = tp / max(n_pos, 1)
        fpr = fp / max(n_neg, 1)
        f1 = np.where(tp > 0, 2 * tp / np.maximum(2 * tp + fp + (n_pos - tp), 1), 0.0)
    return {"fpr": fpr, "tpr": tpr, "precision": precision, "f1": f1}


def _counts_above(sorted_scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    return len(sorted_scores) - np.searchsorted(sorted_scores, thresholds, side="right")


def _clean(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


def threshold_metrics(is_anomaly, scores, threshold: float) -> dict:
    """Realised FPR, TPR, precision and F1 of ``score > threshold`` (anomalies positive; NaN scores count as
    anomalous, like ``evaluate.metrics.sanitize_scores``). Precision is None when nothing is flagged."""
    y = np.asarray(is_anomaly, bool).ravel()
    s = np.nan_to_num(np.asarray(scores, np.float64).ravel(), nan=np.inf)
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    t = np.asarray([float(threshold)])
    tp, fp = _counts_above(pos, t), _counts_above(neg, t)
    r = _rates(tp, fp, len(pos), len(neg))
    return {"threshold": float(threshold), "fpr": _clean(r["fpr"][0]), "tpr": _clean(r["tpr"][0]),
            "precision": _clean(r["precision"][0]), "f1": _clean(r["f1"][0]), "n_flagged": int(tp[0] + fp[0]),
            "n_test": int(len(s))}


def f1_optimal_threshold(is_anomaly, scores) -> dict:
    """The threshold (one of the test scores, rule ``score > t``) with the highest F1 on these labelled scores:
    selected on the test set, for comparison with the calibrated threshold only."""
    y = np.asarray(is_anomaly, bool).ravel()
    s = np.nan_to_num(np.asarray(scores, np.float64).ravel(), nan=np.inf)
    if not y.any():
        raise SanfError("an F1-optimal threshold needs anomalous test samples")
    pos, neg = np.sort(s[y]), np.sort(s[~y])
    finite = np.unique(s[np.isfinite(s)])
    cand = np.concatenate([[-np.inf], finite])  # -inf: flag everything
    r = _rates(_counts_above(pos, cand), _counts_above(neg, cand), len(pos), len(neg))
    best = int(np.argmax(r["f1"]))  # first maximum: the lowest such threshold
    out = threshold_metrics(y, s, cand[best])
    out["threshold"] = _clean(cand[best])
    out["selected_on"] = "test set (labels used; for comparison only, not a deployable threshold)"
    return out


def calibration_record(scores_by_kind: dict[str, np.ndarray], *, fpr: float = DEFAULT_FPR, slice_desc: str,
                       seed: int | None = None, fraction: float | None = None, main: str | None = None) -> dict:
    """What a run stores: the held-out normal scores per score kind and the default threshold (for ``main``,
    default ``nll``, or the first kind given)."""
    fpr = check_fpr(fpr)
    stored = {k: [float(x) for x in np.asarray(v, np.float64).ravel()] for k, v in scores_by_kind.items()}
    if main is None:
        main = "nll" if "nll" in stored else next(iter(stored))
    return {"scores": stored, "n": len(stored[main]), "slice": slice_desc, "seed": seed, "fraction": fraction,
            "target_fpr": fpr, "threshold": conformal_threshold(stored[main], fpr), "threshold_score": main}


def run_threshold(calibration: dict | None, score: str, fpr: float | None = None,
                  threshold: float | None = None) -> dict | None:
    """The threshold of a run's stored calibration for ``score`` at ``fpr`` (default: the run's target), or the
    explicit ``threshold`` (``--threshold``, exclusive with ``fpr``) with the held-out scores' share above it."""
    check_decision(fpr, threshold)
    scores = ((calibration or {}).get("scores") or {}).get(score)
    if threshold is not None:
        return explicit_threshold(threshold, scores)
    if not scores:
        return None
    return conformal_threshold(scores, calibration.get("target_fpr", DEFAULT_FPR) if fpr is None else fpr)


def eval_threshold_metrics(calibration: dict | None, score: str, is_anomaly, scores, fpr: float | None = None,
                           threshold: float | None = None) -> dict:
    """The ``metrics.json`` block: calibrated (or explicit) threshold + realised rates, and the test-selected F1
    optimum."""
    out: dict = {}
    thr = run_threshold(calibration, score, fpr, threshold)
    if thr is not None:
        where = ("given by the user (--threshold)" if thr.get("explicit") else
                 "held-out normal training images (no test data, no anomalies)")
        out["threshold"] = {**thr, "selected_on": where,
                            "realised": threshold_metrics(is_anomaly, scores, thr["value"])}
    else:
        out["threshold"] = None
    out["f1_optimal_threshold"] = f1_optimal_threshold(is_anomaly, scores)
    return out


SLICE_BASELINE = ("a held-out share of the normal training rows, scored by the baseline fitted on the other rows; "
                  "the run's test scores come from the baseline fitted on all rows (approximate: see README)")
