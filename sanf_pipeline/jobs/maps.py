"""Anomaly maps of a run: its pixel threshold (from the held-out normal images' maps it keeps), the pixel metrics of a
test split whose cache records masks, and the overlay grid of an eval report.

A run's model returns per-token evidence (``models``); ``maps.MapHead`` makes it a map at the model's input size.
Eval keeps only the token grids of a split in memory (a few floats per token) and makes full maps a batch at a time
at ``maps.eval_resolution`` (module docstrings of ``maps.head`` and ``evaluate.pixel``).

**The pixel threshold.** A run keeps the evidence of its held-out normal training images (``held_out_map.*`` in its
model file: the same slice its image threshold comes from, never trained on). Their maps give a threshold on map
values by the split-conformal rule (``evaluate.pixel.pixel_threshold``) on either the per-image map maxima
(``image-max``: about ``fpr`` of normal images get any predicted region) or all pixel values (``pixel``: about
``fpr`` of normal pixels are flagged). ``DEFAULT_PIXEL_RULE`` was chosen on the development sets' selection halves
(benchmarks/localisation.md). The predicted defect region of an image is where its map exceeds the threshold.

**The colour scale** of overlays is fixed per run so pictures compare: from the median of the held-out normal
pixels (blue) to the same distance above the pixel threshold (red), which puts the threshold mid-scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import SanfError
from ..extract.masks import DEFECT_COVERAGE, RULE
from ..maps import DEFAULT_SIGMA, MAX_EVAL_SIDE, MapHead, resize_maps

DEFAULT_PIXEL_RULE = "image-max"
MAP_BATCH = 32  # images per map batch: 32 x 518^2 float32 is 34 MB
GRID_PER_GROUP = 4
GRID_TILE = 192  # px of a tile's longer side in the report's overlay grid


def input_size(identity: dict) -> tuple[int, int] | None:
    """The model's input size ``(h, w)`` recorded in a run's cache identity (None: no backbone, e.g. synthetic)."""
    size = ((identity or {}).get("backbone") or {}).get("image_size")
    if not size:
        return None
    size = [int(s) for s in np.atleast_1d(size)]
    return (size[0], size[-1])


def make_head(identity: dict, sigma: float = DEFAULT_SIGMA) -> MapHead | None:
    size = input_size(identity)
    return None if size is None else MapHead(size, sigma)


def head_maps(head: MapHead, evidence: np.ndarray, size=None) -> np.ndarray:
    """Full maps ``(n, S_h, S_w)`` float32 (or at ``size``) of token-grid evidence, a batch at a time."""
    out = np.empty((len(evidence), *(size or head.size)), np.float32)
    with torch.no_grad():
        for s in range(0, len(evidence), MAP_BATCH):
            m = head(torch.from_numpy(np.ascontiguousarray(evidence[s:s + MAP_BATCH], np.float32)))
            out[s:s + len(m)] = (m if size is None else resize_maps(m, size)).numpy()
    return out


@dataclass
class PixelThreshold:
    """A run's pixel threshold for one map kind: the rule's record (``value`` ...) and the overlay colour scale."""

    record: dict
    colour: tuple[float, float]
    by_rule: dict

    @property
    def value(self) -> float:
        return float(self.record["value"])


def pixel_threshold_of(held_out: np.ndarray | None, head: MapHead, fpr: float,
                       rule: str = DEFAULT_PIXEL_RULE) -> PixelThreshold | None:
    """The pixel threshold (every rule's, ``rule`` the one used) from held-out normal evidence; None without it."""
    from ..evaluate.pixel import PIXEL_RULES, pixel_threshold

    if rule not in PIXEL_RULES:
        raise SanfError(f"unknown pixel rule {rule!r}; choose one of {', '.join(PIXEL_RULES)}")
    if held_out is None or len(held_out) == 0:
        return None
    maps = head_maps(head, held_out)
    by_rule = {r: pixel_threshold(maps, fpr, r) for r in PIXEL_RULES}
    lo = float(np.median(maps))
    thr = float(by_rule[rule]["value"])
    hi = thr + max(thr - lo, 1e-12)
    return PixelThreshold(record={**by_rule[rule], "sigma": head.sigma, "n_images": len(maps)},
                          colour=(lo, hi), by_rule=by_rule)


def localisation_metrics(evidence: np.ndarray, head: MapHead, masks, labels: np.ndarray, normal: int,
                         class_names: list[str], threshold: PixelThreshold | None) -> dict:
    """Pixel AUROC and AUPRO (overall, per defect type) of a split's evidence against its masks at the evaluation
    resolution, and how well each pixel rule's predicted regions match them."""
    from ..evaluate.pixel import pixel_metrics, region_quality

    coverage, known = masks
    rows = np.flatnonzero(known)
    res = tuple(coverage.shape[1:])
    truth = coverage[rows] >= DEFECT_COVERAGE
    maps = head_maps(head, evidence[rows], res)
    types = [None if labels[i] == normal else class_names[labels[i]] for i in rows]
    out = pixel_metrics(maps, truth, types)
    out.update({"sigma": head.sigma, "input_size": list(head.size), "n_without_mask": int(len(labels) - len(rows)),
                "resolution_rule": f"maps and masks compared at the model's input size, at most "
                                   f"{MAX_EVAL_SIDE} px a side; {RULE}"})
    defect = np.asarray([t is not None for t in types], bool)
    out["n_defect_masks_empty"] = int((defect & ~truth.reshape(len(rows), -1).any(1)).sum())
    if threshold is not None:
        out["pixel_threshold"] = threshold.record
        out["predicted_regions"] = {r: {"threshold": float(rec["value"]),
                                        **region_quality(maps, truth, float(rec["value"]), defect)}
                                    for r, rec in threshold.by_rule.items()}
    return out


def grid_rows(scores: np.ndarray, is_anomaly: np.ndarray, image_threshold: float | None) -> dict[str, list[int]]:
    """The rows an eval report shows: the most anomalous scores, those nearest the image threshold (or the median),
    and normal test images spread over their score range."""
    s = np.nan_to_num(np.asarray(scores, np.float64), nan=np.inf)
    top = [int(i) for i in np.argsort(-s, kind="stable")[:GRID_PER_GROUP]]
    pivot = image_threshold if image_threshold is not None else float(np.median(s))
    near = [int(i) for i in np.argsort(np.abs(s - pivot), kind="stable") if int(i) not in top][:GRID_PER_GROUP]
    normal = np.flatnonzero(~np.asarray(is_anomaly, bool))
    normal = normal[np.argsort(s[normal], kind="stable")]
    picks = normal[np.unique(np.linspace(0, len(normal) - 1, GRID_PER_GROUP).round().astype(int))] \
        if len(normal) else []
    return {"most anomalous": top, "borderline": near,
            "normal": [int(i) for i in picks if int(i) not in top and int(i) not in near]}


def overlay_grid(out_path, evidence: np.ndarray, head: MapHead, rows: dict[str, list[int]], *, root, sample_ids,
                 labels, class_names, scores, threshold: PixelThreshold | None, masks=None) -> str | None:
    """Write the report's overlay grid PNG; returns None, or why there is none (the images cannot be read)."""
    from ..data.images import decode_image
    from ..maps.overlay import colour_range, grid, overlay, save_png

    if root is None or not Path(root).is_dir():
        return f"the data root {root} recorded in the cache is not here, so no overlays"
    tiles, captions = [], []
    for group, idx in rows.items():
        for i in idx:
            try:
                image = decode_image(Path(root) / sample_ids[i])
            except Exception as exc:  # noqa: BLE001 - any unreadable image just leaves its tile out
                return f"cannot read {sample_ids[i]} ({type(exc).__name__}), so no overlays"
            image = _fit(image, GRID_TILE)  # drawn at the tile's size, so its contours stay visible in the sheet
            amap = head_maps(head, evidence[i:i + 1], image.shape[:2])[0]
            lo, hi = colour_range(amap, threshold.colour if threshold else None)
            region = amap > threshold.value if threshold else None
            truth = None
            if masks is not None and masks[1][i]:
                cov = torch.from_numpy(masks[0][i:i + 1].astype(np.float32))[:, None]
                truth = torch.nn.functional.interpolate(cov, size=image.shape[:2], mode="nearest")[0, 0].numpy() \
                    >= DEFECT_COVERAGE
            tiles.append(overlay(image, amap, vmin=lo, vmax=hi, region=region, truth=truth))
            captions.append(f"{group}: {class_names[labels[i]]} {scores[i]:.4g}")
    if not tiles:
        return "no test images to show"
    save_png(out_path, grid(tiles, columns=GRID_PER_GROUP, tile=GRID_TILE, captions=captions))
    return None


def _fit(image: np.ndarray, box: int) -> np.ndarray:
    """``image`` resized (PIL, antialiased) so its longer side is ``box`` px."""
    from PIL import Image

    h, w = image.shape[:2]
    scale = box / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC if scale > 1 else
                                                     Image.Resampling.LANCZOS))


@dataclass
class MapOptions:
    """What an eval or a detector makes maps with: the blur, the pixel rule, and the run's held-out normal evidence
    by score kind (``held_out_map.*`` of its model file)."""

    sigma: float = DEFAULT_SIGMA
    rule: str = DEFAULT_PIXEL_RULE
    held_out: dict | None = None

    def threshold(self, kind: str, head: MapHead, fpr: float) -> PixelThreshold | None:
        return pixel_threshold_of((self.held_out or {}).get(kind), head, fpr, self.rule)


def eval_maps(out_dir, metrics: dict, evidence: np.ndarray | None, options: MapOptions, test, scores, is_anomaly,
              normal: int, kind: str, calibration: dict | None, fpr: float | None) -> dict:
    """An eval's maps: ``metrics["localisation"]`` (pixel metrics when the cache records masks, else why not) and the
    overlay grid; returns the extra report images (``{"maps": file name}``)."""
    from ..store.run_folder import MAPS_PNG

    identity = test.identity or {}
    head = make_head(identity, options.sigma)
    if evidence is None or head is None:
        why = ("the score has no spatial support (a class-token method)" if head is not None else
               "the cache records no backbone input size")
        metrics["localisation"] = {"maps": False, "reason": why}
        return {}
    target = fpr if fpr is not None else (calibration or {}).get("target_fpr", 0.01)
    threshold = options.threshold(kind, head, target)
    masks = test.masks()
    loc = {"maps": True, "sigma": head.sigma}
    if masks is not None and masks[1].any():
        loc.update(localisation_metrics(evidence, head, masks, test.labels, normal, identity.get("class_names") or [],
                                        threshold))
    else:
        loc["pixel_metrics"] = "the cache records no ground-truth masks (MVTec layout ground_truth/ folders)"
        if threshold is not None:
            loc["pixel_threshold"] = threshold.record
    if threshold is None:
        loc["pixel_threshold_missing"] = ("the run keeps no held-out normal maps (too few training images to hold any "
                                          "out, or a run of an older sanf: refit it)")
    image_thr = (metrics.get("threshold") or {}).get("value")
    rows = grid_rows(scores, is_anomaly, image_thr)
    root = (identity.get("dataset") or {}).get("root")
    why = overlay_grid(Path(out_dir) / MAPS_PNG, evidence, head, rows, root=root, sample_ids=test.sample_ids,
                       labels=test.labels, class_names=identity.get("class_names") or [], scores=scores,
                       threshold=threshold, masks=masks)
    metrics["localisation"] = loc
    if why:
        loc["overlays"] = why
        return {}
    return {"maps": MAPS_PNG}
