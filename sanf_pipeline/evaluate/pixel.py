"""Pixel-level anomaly localisation: metrics of anomaly maps against defect masks, and map thresholds.

Pure numpy/scipy functions (no files, no models). ``maps`` is (n, H, W) of any float dtype, higher = more anomalous;
``masks`` is (n, H, W) bool, True at a defective pixel. The pixels of all images are pooled.

- ``pixel_auroc``: ROC AUC with the mask pixels positive and ties counted one half (the Mann-Whitney statistic,
  equal to ``sklearn.metrics.roc_auc_score`` on the flattened arrays); NaN when either class is empty.
- ``regions``: the ground-truth regions, connected components of each image's mask with 8-connectivity (a 3x3
  structure, as MVTec AD's evaluation code), numbered 1..R across all images.
- ``aupro``: the per-region-overlap curve of MVTec AD (Bergmann et al., IJCV 2021). A pixel is flagged at threshold
  t when its score is ``>= t``. FPR(t) = flagged share of all normal pixels; PRO(t) = mean over the R regions of the
  flagged share of the region's pixels. The curve runs through (FPR(t), PRO(t)) for t = +inf (the point (0, 0)) and
  every distinct score, linear in between (a score shared by normal and region pixels moves both: a diagonal).
  AUPRO is the trapezoid area under it from FPR 0 to ``max_fpr`` (cut by interpolation at ``max_fpr``) divided by
  ``max_fpr``, so a perfect map scores 1; NaN without regions or without normal pixels.
- ``pixel_metrics``: both over all images and per defect type (that type's images plus all normal images).
- ``pixel_threshold``: a map threshold from held-out normal maps by the split-conformal rule of
  ``evaluate/calibration.py``, on per-image maxima or on all pixels; a pixel is anomalous when its value is ``> t``.
- ``region_quality``: IoU, Dice, precision and recall of the predicted region ``map > t``, and the share of normal
  images that get one; used to choose between the two threshold rules on development data.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import ndimage

from ..errors import SanfError
from .calibration import conformal_threshold

DEFAULT_MAX_FPR = 0.3
PIXEL_RULES = ("image-max", "pixel")
RULE_TEXT = {
    "image-max": "t = s_(k), k = ceil((n + 1)(1 - fpr)) of the n held-out normal images' map maxima; a pixel is "
                 "anomalous if its value > t, so about fpr of normal images get any anomalous pixel",
    "pixel": "t = s_(k), k = ceil((n + 1)(1 - fpr)) of the n pixel values of the held-out normal maps; a pixel is "
             "anomalous if its value > t, so about fpr of normal pixels are anomalous",
}
_EIGHT = np.ones((3, 3), dtype=bool)


def _check(maps, masks) -> tuple[np.ndarray, np.ndarray]:
    maps, masks = np.asarray(maps), np.asarray(masks)
    if maps.ndim != 3 or maps.shape != masks.shape:
        raise SanfError(f"maps and masks must be (n, H, W) arrays of one shape, got {maps.shape} and {masks.shape}")
    if maps.dtype.kind not in "fiu":
        raise SanfError(f"anomaly maps must be numeric, got dtype {maps.dtype}")
    if maps.dtype.kind != "f":
        maps = maps.astype(np.float64)  # float dtypes stay: sorting and comparing are exact in any of them
    return maps, masks.astype(bool, copy=False)


def _check_max_fpr(max_fpr) -> float:
    if isinstance(max_fpr, bool) or not isinstance(max_fpr, (int, float, np.floating)) or not 0 < max_fpr <= 1:
        raise SanfError(f"max_fpr must be a number in (0, 1], got {max_fpr!r}")
    return float(max_fpr)


def _split(maps: np.ndarray, masks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The normal pixels' scores sorted ascending and the defective pixels' scores (C order)."""
    neg = maps[~masks]
    neg.sort()  # in place: the one copy of (nearly) all scores that the metrics make
    pos = maps[masks]
    # NaN sorts last and -inf first, so the two ends of neg tell whether all of it is finite
    if (neg.size and not (np.isfinite(neg[0]) and np.isfinite(neg[-1]))) or not np.isfinite(pos).all():
        raise SanfError("anomaly maps contain NaN or infinite values; fix what produced the maps")
    return neg, pos


def _auroc(neg: np.ndarray, pos: np.ndarray) -> float:
    if not neg.size or not pos.size:
        return math.nan
    # per positive 2 * (#normal below) + (#normal equal), summed in exact integers before the one division
    twice = int(np.searchsorted(neg, pos, "left").sum()) + int(np.searchsorted(neg, pos, "right").sum())
    return twice / (2 * pos.size * neg.size)


def _area(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under the polyline (x, y), x non-decreasing from 0, from 0 to x_max (cut by interpolation)."""
    i = int(np.searchsorted(x, x_max, "right"))
    if i < x.size:  # x[i - 1] <= x_max < x[i]
        y_cut = y[i - 1] + (y[i] - y[i - 1]) * (x_max - x[i - 1]) / (x[i] - x[i - 1])
        x, y = np.append(x[:i], x_max), np.append(y[:i], y_cut)
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1])) / 2)


def _aupro(neg: np.ndarray, pos: np.ndarray, region_of_pos: np.ndarray, sizes: np.ndarray, max_fpr: float) -> float:
    if not neg.size or not sizes.size:
        return math.nan
    order = np.argsort(pos, kind="stable")
    pos = pos[order]
    # flagging a pixel of region r adds 1 / (R |r|) to PRO; suffix sums give PRO(t) (scores >= t) without cancellation
    weight = 1.0 / (sizes.size * sizes[region_of_pos[order] - 1].astype(np.float64))
    pro_from = np.append(np.cumsum(weight[::-1])[::-1], 0.0)
    # FPR(neg[lo]) > max_fpr already, so lower thresholds add only points past the cut: leave them out
    lo = min(max(math.floor(neg.size * (1.0 - max_fpr)) - 1, 0), neg.size - 1)
    thresholds = np.union1d(neg[lo:], pos[np.searchsorted(pos, neg[lo], "left"):])[::-1]
    fpr = np.append(0.0, (neg.size - np.searchsorted(neg, thresholds, "left")) / neg.size)
    pro = np.append(0.0, pro_from[np.searchsorted(pos, thresholds, "left")])
    return _area(fpr, pro, max_fpr) / max_fpr


def regions(masks) -> tuple[np.ndarray, np.ndarray]:
    """Connected components (8-connectivity) of each image's mask, numbered 1..R across the images (0: normal).

    Returns ``(labels, sizes)``: int32 labels of the masks' shape, and ``sizes[r - 1]`` = pixels of region r."""
    masks = np.asarray(masks)
    if masks.ndim != 3:
        raise SanfError(f"masks must be an (n, H, W) array, got shape {masks.shape}")
    labels = np.zeros(masks.shape, np.int32)
    sizes, n = [], 0
    for i, mask in enumerate(masks.astype(bool, copy=False)):
        lab, k = ndimage.label(mask, structure=_EIGHT)
        if k:
            labels[i] = np.where(lab > 0, lab + n, 0)
            sizes.append(np.bincount(lab.ravel(), minlength=k + 1)[1:])
            n += k
    return labels, np.concatenate(sizes).astype(np.int64) if sizes else np.zeros(0, np.int64)


def _localisation(maps: np.ndarray, masks: np.ndarray, max_fpr: float) -> dict:
    labels, sizes = regions(masks)
    region_of_pos = labels[masks]
    del labels  # an int32 copy of the whole set: free it before the sort
    neg, pos = _split(maps, masks)
    return {"pixel_auroc": _auroc(neg, pos), "aupro": _aupro(neg, pos, region_of_pos, sizes, max_fpr),
            "n_regions": int(sizes.size)}


def pixel_auroc(maps, masks) -> float:
    """ROC AUC over all pixels, mask pixels positive (equal to sklearn's ``roc_auc_score``); NaN if a class is empty."""
    return _auroc(*_split(*_check(maps, masks)))


def aupro(maps, masks, max_fpr: float = DEFAULT_MAX_FPR) -> float:
    """Normalised area under the per-region-overlap curve up to ``max_fpr`` (module docstring)."""
    maps, masks = _check(maps, masks)
    return _localisation(maps, masks, _check_max_fpr(max_fpr))["aupro"]


def pixel_metrics(maps, masks, defect_types, *, max_fpr: float = DEFAULT_MAX_FPR) -> dict:
    """Pixel AUROC and AUPRO over all images and per defect type; ``defect_types[i]`` is a str, or None for a normal
    image. A type's entry pools its images with all normal images; its ``n_images`` counts the type's own."""
    maps, masks = _check(maps, masks)
    max_fpr = _check_max_fpr(max_fpr)
    types = list(defect_types)
    if len(types) != len(maps) or any(t is not None and not isinstance(t, str) for t in types):
        raise SanfError(f"defect_types must hold one str (or None for a normal image) per map: {len(maps)} maps")
    normal = np.array([t is None for t in types], bool)
    if any(masks[i].any() for i in np.flatnonzero(normal)):
        raise SanfError("a normal image (defect type None) has defective pixels in its mask; check the masks")
    overall = _localisation(maps, masks, max_fpr)
    per_defect = {}
    names = sorted({t for t in types if t is not None})
    for name in names:
        mine = np.array([t == name for t in types], bool)
        # one defect type pools exactly the images of the whole: the same numbers, not computed twice
        m = overall if len(names) == 1 else _localisation(maps[mine | normal], masks[mine | normal], max_fpr)
        per_defect[name] = {"pixel_auroc": m["pixel_auroc"], "aupro": m["aupro"], "n_images": int(mine.sum()),
                            "n_regions": m["n_regions"]}
    return {"pixel_auroc": overall["pixel_auroc"], "aupro": overall["aupro"], "max_fpr": max_fpr,
            "n_images": len(types), "n_defect_images": int((~normal).sum()), "n_regions": overall["n_regions"],
            "defect_pixel_fraction": np.count_nonzero(masks) / masks.size if masks.size else math.nan,
            "resolution": [int(maps.shape[1]), int(maps.shape[2])], "per_defect": per_defect}


def pixel_threshold(held_out_maps, fpr: float, rule: str) -> dict:
    """A map threshold from held-out NORMAL maps (n, H, W) by ``rule`` (one of ``PIXEL_RULES``): the split-conformal
    record of ``calibration.conformal_threshold`` with ``rule`` (the name) and ``rule_text`` (one sentence)."""
    if not isinstance(rule, str) or rule not in PIXEL_RULES:
        raise SanfError(f"unknown pixel threshold rule {rule!r}; choose one of {', '.join(PIXEL_RULES)}")
    maps = np.asarray(held_out_maps)
    if maps.ndim != 3 or not maps.size:
        raise SanfError(f"held-out maps must be a non-empty (n, H, W) array, got shape {maps.shape}")
    values = maps.reshape(len(maps), -1).max(axis=1) if rule == "image-max" else maps
    return {**conformal_threshold(values, fpr), "rule": rule, "rule_text": RULE_TEXT[rule]}


def region_quality(maps, masks, threshold: float, defect_images) -> dict:
    """How well the predicted region ``map > threshold`` matches the mask. IoU and Dice are means over the images
    flagged in ``defect_images`` that have a non-empty mask (an empty prediction scores 0), precision and recall
    are pooled over their pixels; ``normal_images_with_region`` is the share of unflagged images with any pixel
    predicted. A flagged image with an empty mask counts nowhere."""
    maps, masks = _check(maps, masks)
    flagged = np.asarray(defect_images)
    if flagged.shape != (len(maps),):
        raise SanfError(f"defect_images must be one bool per map ({len(maps)}), got shape {flagged.shape}")
    flagged = flagged.astype(bool)
    pred = maps > np.float64(threshold)  # a float64 scalar: float32 maps are compared without rounding the threshold
    area = np.count_nonzero(pred, axis=(1, 2))
    truth = np.count_nonzero(masks, axis=(1, 2))
    hit = np.count_nonzero(pred & masks, axis=(1, 2))
    use = flagged & (truth > 0)
    a, t, h = area[use], truth[use], hit[use]
    return {"mean_iou": float(np.mean(h / (a + t - h))) if use.any() else math.nan,
            "mean_dice": float(np.mean(2 * h / (a + t))) if use.any() else math.nan,
            "pixel_precision": float(h.sum() / a.sum()) if a.sum() else math.nan,
            "pixel_recall": float(h.sum() / t.sum()) if use.any() else math.nan,
            "normal_images_with_region": float(np.mean(area[~flagged] > 0)) if (~flagged).any() else math.nan,
            "n_defect_images": int(use.sum()), "n_normal_images": int((~flagged).sum())}
