"""Pixel-level localisation metrics (evaluate/pixel.py): pixel AUROC against scikit-learn, AUPRO against a
brute-force curve (every threshold evaluated directly), 8-connected regions, the per-defect bookkeeping, the two
pixel threshold rules against the conformal order statistic, and region IoU/Dice on hand-made maps."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from sanf_pipeline.errors import SanfError
from sanf_pipeline.evaluate.calibration import conformal_threshold
from sanf_pipeline.evaluate.pixel import (
    PIXEL_RULES,
    aupro,
    pixel_auroc,
    pixel_metrics,
    pixel_threshold,
    region_quality,
    regions,
)


def blob_masks(rng, n, size, n_blobs):
    """Random rectangles (some touching or overlapping) per image; image i gets n_blobs[i] of them."""
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        for _ in range(n_blobs[i]):
            r, c = rng.integers(0, size - 2, 2)
            h, w = rng.integers(1, 4, 2)
            masks[i, r:r + h, c:c + w] = True
    return masks


def brute_aupro(maps, masks, max_fpr):
    """The definition, directly: each distinct score (and +inf) as threshold, flagged = score >= t."""
    labels = [ndimage.label(m, structure=np.ones((3, 3)))[0] for m in masks]
    region_pixels = [maps[i][labels[i] == r] for i in range(len(maps)) for r in range(1, labels[i].max() + 1)]
    normal = maps[~masks]
    points = []
    for t in [np.inf, *np.unique(maps)[::-1]]:
        fpr = np.mean(normal >= t)
        pro = np.mean([np.mean(px >= t) for px in region_pixels])
        points.append((fpr, pro))
    points.sort()
    area = 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 >= max_fpr:
            break
        if x1 > max_fpr:
            y1 = y0 + (y1 - y0) * (max_fpr - x0) / (x1 - x0)
            x1 = max_fpr
        area += (x1 - x0) * (y0 + y1) / 2
    return area / max_fpr


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_pixel_auroc_equals_sklearn_with_ties(seed, dtype):
    rng = np.random.default_rng(seed)
    masks = blob_masks(rng, 3, 16, [2, 0, 3])
    maps = np.round(rng.random(masks.shape) + 0.4 * masks, 1).astype(dtype)  # rounding makes many ties
    expected = roc_auc_score(masks.ravel(), maps.ravel())
    assert pixel_auroc(maps, masks) == pytest.approx(expected, abs=1e-12)


def test_pixel_auroc_nan_without_a_class():
    maps = np.random.default_rng(0).random((2, 5, 5))
    assert math.isnan(pixel_auroc(maps, np.zeros(maps.shape, bool)))
    assert math.isnan(pixel_auroc(maps, np.ones(maps.shape, bool)))


@pytest.mark.parametrize("seed", range(8))
@pytest.mark.parametrize("max_fpr", [0.3, 1.0, 0.05])
def test_aupro_equals_brute_force(seed, max_fpr):
    rng = np.random.default_rng(100 + seed)
    masks = blob_masks(rng, 3, 12, rng.integers(0, 3, 3) + [1, 0, 0])  # 1-6 blobs, some merging into one region
    decimals = 1 if seed % 2 else 2  # ties within and across normal and region pixels
    maps = np.round(rng.random(masks.shape) + 0.3 * masks * rng.random(masks.shape), decimals)
    assert aupro(maps, masks, max_fpr) == pytest.approx(brute_aupro(maps, masks, max_fpr), abs=1e-9)


def test_aupro_perfect_constant_and_inverted_maps():
    rng = np.random.default_rng(7)
    masks = blob_masks(rng, 3, 12, [2, 1, 0])
    assert aupro(masks.astype(float), masks) == pytest.approx(1.0, abs=1e-12)
    assert aupro(masks.astype(np.float32), masks, 1.0) == pytest.approx(1.0, abs=1e-12)
    const = np.full(masks.shape, 0.5)
    # one threshold flags everything: the curve is the diagonal (0,0)-(1,1), its mean height up to m is m / 2
    for m in (0.3, 1.0):
        assert aupro(const, masks, m) == pytest.approx(m / 2, abs=1e-12)
        assert aupro(const, masks, m) == pytest.approx(brute_aupro(const, masks, m), abs=1e-12)
    inverted = 1.0 - masks
    assert aupro(inverted, masks) == pytest.approx(brute_aupro(inverted, masks, 0.3), abs=1e-12)
    assert aupro(inverted, masks) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", range(5))
def test_aupro_of_one_region_at_fpr_one_is_the_roc_auc(seed):
    rng = np.random.default_rng(200 + seed)
    mask = np.zeros((1, 14, 14), bool)
    r, c = rng.integers(0, 9, 2)
    mask[0, r:r + 5, c:c + 4] = True  # one rectangle: one region, so PRO is the TPR
    maps = np.round(rng.random(mask.shape) + 0.5 * mask, 1)
    assert aupro(maps, mask, 1.0) == pytest.approx(roc_auc_score(mask.ravel(), maps.ravel()), abs=1e-12)


def test_aupro_nan_cases_and_bad_max_fpr():
    maps = np.random.default_rng(1).random((2, 6, 6))
    assert math.isnan(aupro(maps, np.zeros(maps.shape, bool)))
    assert math.isnan(aupro(maps, np.ones(maps.shape, bool)))
    masks = np.zeros(maps.shape, bool)
    masks[0, 1, 1] = True
    for bad in (0, -0.1, 1.5, float("nan"), True, "0.3"):
        with pytest.raises(SanfError, match="max_fpr"):
            aupro(maps, masks, bad)
    with pytest.raises(SanfError, match="NaN"):
        aupro(np.where(masks, np.nan, maps), masks)
    with pytest.raises(SanfError, match="one shape"):
        aupro(maps, masks[:1])


def test_regions_are_8_connected_and_numbered_across_images():
    masks = np.zeros((3, 5, 5), bool)
    masks[0, 0, 0] = masks[0, 1, 1] = True  # diagonal neighbours: one region
    masks[0, 3, 3] = True  # not touching: a second one
    masks[2, 0, 4] = masks[2, 1, 3] = masks[2, 2, 2] = True  # an anti-diagonal line: one region
    labels, sizes = regions(masks)
    assert sizes.tolist() == [2, 1, 3]
    assert labels[0, 0, 0] == labels[0, 1, 1] == 1 and labels[0, 3, 3] == 2
    assert set(labels[2][masks[2]].tolist()) == {3} and not labels[1].any()
    assert (labels > 0).tolist() == masks.tolist()
    empty_labels, empty_sizes = regions(np.zeros((2, 3, 3), bool))
    assert not empty_labels.any() and empty_sizes.size == 0


def test_pixel_metrics_per_defect_bookkeeping():
    rng = np.random.default_rng(3)
    masks = np.zeros((5, 8, 8), bool)
    masks[1, 0:2, 0:2] = masks[1, 5:7, 5:7] = True  # scratch: two regions
    masks[2, 3:5, 3:6] = True  # scratch: one region
    masks[4, 0:3, 6:8] = True  # hole: one region
    types = [None, "scratch", "scratch", None, "hole"]
    maps = np.round(rng.random(masks.shape) + 0.5 * masks, 1)
    out = pixel_metrics(maps, masks, types)
    json.dumps(out)
    assert out["n_images"] == 5 and out["n_defect_images"] == 3 and out["n_regions"] == 4
    assert out["resolution"] == [8, 8] and out["max_fpr"] == 0.3
    assert out["defect_pixel_fraction"] == pytest.approx((8 + 6 + 6) / (5 * 64))
    assert out["pixel_auroc"] == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert out["aupro"] == pytest.approx(brute_aupro(maps, masks, 0.3), abs=1e-9)
    assert sorted(out["per_defect"]) == ["hole", "scratch"]
    scratch, hole = out["per_defect"]["scratch"], out["per_defect"]["hole"]
    assert (scratch["n_images"], scratch["n_regions"], hole["n_images"], hole["n_regions"]) == (2, 3, 1, 1)
    keep = [0, 1, 2, 3]  # scratch images plus both normal images
    assert scratch["aupro"] == pytest.approx(brute_aupro(maps[keep], masks[keep], 0.3), abs=1e-9)
    assert scratch["pixel_auroc"] == pytest.approx(roc_auc_score(masks[keep].ravel(), maps[keep].ravel()))
    keep = [0, 3, 4]
    assert hole["aupro"] == pytest.approx(brute_aupro(maps[keep], masks[keep], 0.3), abs=1e-9)
    assert all(isinstance(v, float) for v in (out["pixel_auroc"], out["aupro"], hole["aupro"]))
    with pytest.raises(SanfError, match="defect_types"):
        pixel_metrics(maps, masks, types[:4])
    with pytest.raises(SanfError, match="normal image"):
        pixel_metrics(maps, masks, [None, None, "scratch", None, "hole"])


def test_pixel_threshold_rules():
    rng = np.random.default_rng(4)
    held_out = rng.random((19, 6, 7))
    maxima = held_out.reshape(19, -1).max(axis=1)
    t = pixel_threshold(held_out, 0.1, "image-max")
    # k = ceil(20 * 0.9) = 18: the 18th smallest of 19 maxima, i.e. the second largest
    assert t["rank"] == 18 and t["value"] == np.sort(maxima)[-2] and t["n_calibration"] == 19
    assert t["rule"] == "image-max" and isinstance(t["rule_text"], str) and t["guaranteed"]
    assert (maxima > t["value"]).sum() == 1
    p = pixel_threshold(held_out, 0.1, "pixel")
    n = held_out.size
    k = math.ceil((n + 1) * 0.9)
    assert p["rank"] == k and p["value"] == np.sort(held_out.ravel())[k - 1] and p["n_calibration"] == n
    assert p["value"] == conformal_threshold(held_out, 0.1)["value"] and p["rule"] == "pixel"
    assert np.mean(held_out > p["value"]) <= 0.1
    assert set(PIXEL_RULES) == {"image-max", "pixel"}
    for bad in ("max", None, ["pixel"]):
        with pytest.raises(SanfError, match="rule"):
            pixel_threshold(held_out, 0.1, bad)


def test_region_quality_hand_made():
    maps = np.zeros((4, 6, 6), np.float32)
    masks = np.zeros(maps.shape, bool)
    masks[0, 1:3, 1:3] = True  # 4 true pixels
    maps[0, 1:3, 1] = 1.0  # 2 of them predicted ...
    maps[0, 4, 4:6] = 1.0  # ... and 2 outside: IoU 2/6, Dice 4/8
    masks[1, 0:2, 0:2] = True  # 4 true pixels, nothing predicted: IoU 0, Dice 0
    maps[2, 3, 3] = 1.0  # normal image with a predicted region
    out = region_quality(maps, masks, 0.5, [True, True, False, False])
    assert out["mean_iou"] == pytest.approx((2 / 6 + 0) / 2)
    assert out["mean_dice"] == pytest.approx((4 / 8 + 0) / 2)
    assert out["pixel_precision"] == pytest.approx(2 / 4) and out["pixel_recall"] == pytest.approx(2 / 8)
    assert out["normal_images_with_region"] == 0.5
    assert out["n_defect_images"] == 2 and out["n_normal_images"] == 2
    json.dumps(out)
    perfect = region_quality(masks.astype(float), masks, 0.5, [True, True, False, False])
    assert perfect["mean_iou"] == perfect["mean_dice"] == perfect["pixel_precision"] == 1.0
    assert perfect["normal_images_with_region"] == 0.0
    assert region_quality(maps, masks, 2.0, [True, True, False, False])["mean_iou"] == 0.0
    with pytest.raises(SanfError, match="defect_images"):
        region_quality(maps, masks, 0.5, [True, False])
