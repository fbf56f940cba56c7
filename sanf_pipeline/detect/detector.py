"""A trained run as a detector: images in, anomaly scores and decisions out.

``Detector.load(run_dir)`` rebuilds everything from the run folder alone: the backbone named in the run's cache
provenance (architecture, timm overrides, image size, layer, pooling), its weights found by the usual order
(``weights``, ``weights_dir`` / ``$SANF_WEIGHTS_DIR``, the file recorded at extraction if it is still there, timm's
hub) and checked against the recorded sha256, the preprocessing of ``sanf extract``, the fitted normaliser, the
flow and the calibrated threshold (``evaluate/calibration.py``). Nothing in the folder is an absolute path it
depends on,
so a run folder copied to another machine works.

``DetectorModel`` is the plain ``nn.Module`` behind it: ``images (B, 3, S, S) -> scores (B,)``, with the
backbone's tokens rounded to the cache's storage dtype (so a run trained on a float16 cache sees the features
it was trained on), then the run's own ``models`` module (the one eval and the sweep score with: flow, combined or
a baseline). The same module is exported by ``detect/export.py``.

``Detector.score(paths)`` decodes images exactly as ``sanf extract`` does (``data.images.decode_image`` in
DataLoader workers, unreadable files skipped with a reason or, with ``on_error="fail"``, an error), runs the
model in batches (bf16 autocast for the backbone on GPU, fp32 on CPU) and returns a :class:`ScoreResult`.
"""

from __future__ import annotations

import glob
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..errors import SanfError


# ------------------------------------------------------------------------------------------------- the model
def load_model(run_dir, score: str = "auto"):
    """The ``models`` module of a finished flow or baseline run, the run's config, the score kind it computes and
    the run's held-out normal evidence maps by kind (``jobs.maps``; empty for runs written before maps)."""
    from ..cache.schema import read_json_file
    from ..jobs.flow import load_run
    from ..models import load_baseline, resolve_score
    from ..store.atomic import load_tensors
    from ..store.run_folder import CONFIG_FILE, MODEL_FILE, held_out_maps_of

    run_dir = Path(run_dir)
    cfg_path = run_dir / CONFIG_FILE
    cfg = read_json_file(cfg_path) if cfg_path.is_file() else None
    if isinstance(cfg, dict) and cfg.get("format") == "sanf-baseline":
        if not (run_dir / MODEL_FILE).is_file():
            raise SanfError(f"baseline run {run_dir} has no {MODEL_FILE} (written by sanf versions before every "
                            f"baseline was a detector); rerun the same `sanf baseline` command with --overwrite")
        tensors, _ = load_tensors(run_dir / MODEL_FILE)
        # one score, named by its method
        return load_baseline(cfg.get("model"), tensors), cfg, cfg.get("method"), held_out_maps_of(tensors)
    run = load_run(run_dir, device="cpu")
    kind = resolve_score(score, run.config, run_dir)
    return run.model(kind), run.config, kind, run.held_out_maps


class DetectorModel(nn.Module):
    """``images (B, 3, S, S)`` normalised as ``preprocessing`` says -> anomaly scores ``(B,)`` float32: the backbone,
    the rounding to the cache dtype, then the run's ``models`` module; with a ``head`` (``maps.MapHead``) also the
    anomaly maps ``(B, S, S)`` float32 at the input size."""

    def __init__(self, backbone, model: nn.Module, feature_dtype: torch.dtype = torch.float32, head=None):
        super().__init__()
        self.backbone, self.model, self.feature_dtype, self.head = backbone, model, feature_dtype, head

    def features(self, images: torch.Tensor, amp: torch.dtype | None = None):
        with torch.autocast(images.device.type, dtype=amp, enabled=amp is not None):
            cls, patch = self.backbone(images)
        # as stored in the cache the run was trained on (float16 by default), then float32 as the reader returns
        return cls.to(self.feature_dtype).float(), patch.to(self.feature_dtype).float()

    def forward(self, images: torch.Tensor):
        cls, patch = self.features(images)
        return self.outputs(*self.model(cls, patch))

    def outputs(self, score: torch.Tensor, evidence: torch.Tensor | None):
        if self.head is None:
            return score.to(torch.float32)
        return score.to(torch.float32), self.head(evidence)


# ------------------------------------------------------------------------------------------- weights, inputs
def _image_size(prov: dict):
    size = prov.get("image_size")
    if isinstance(size, (list, tuple)):
        return int(size[0]) if len(size) == 2 and size[0] == size[1] else tuple(int(s) for s in size)
    return size


def build_backbone(prov: dict, *, weights=None, weights_dir=None, device="cpu"):
    """The backbone of a cache's provenance, its weights checked against the recorded sha256."""
    from ..extract.backbones import create_backbone
    from ..extract.weights import file_sha256, resolve_weights

    arch, tag = prov.get("arch"), prov.get("tag")
    if not arch or arch == "synthetic":
        raise SanfError(f"the run's cache records no backbone (arch {arch!r}); only runs on caches from "
                        f"`sanf extract` can score images")
    recorded = prov.get("weights") or {}
    want = recorded.get("sha256")
    if weights is None and recorded.get("source") == "random":
        weights = "random"
    elif weights is None:
        choice = resolve_weights(arch, None, weights_dir, tag=tag)
        old = recorded.get("file")
        if old and Path(old).is_file() and choice.source in ("timm", "package") and \
                (choice.source == "timm" or (want and file_sha256(Path(old)) == want)):
            # the file used at extraction is still there (same machine): before a download, and before weights
            # shipped in a package, which hold the same tensors in another file (another sha256)
            weights = old
    if weights is not None and str(weights).lower() not in ("random", "none", "timm", "hub"):
        p = Path(weights).expanduser()
        if p.is_file() and want:
            have = file_sha256(p)
            if have != want:
                raise SanfError(f"weights file {p} has sha256 {have} but the run was trained with sha256 {want}; "
                                f"pass the run's weights with --weights or --weights-dir")
    name = f"{arch}.{tag}" if tag else arch
    bb = create_backbone(name, weights=weights, weights_dir=weights_dir, image_size=_image_size(prov),
                         layer=prov.get("layer"), pool=int(prov.get("pool") or 1), device=device,
                         patch_layer=prov.get("patch_layer"),
                         model_kwargs=prov.get("model_kwargs") or None)
    if want and bb.weights_sha256 and bb.weights_sha256 != want:
        raise SanfError(f"the backbone weights found ({bb.weights_file or bb.weights_source}) have sha256 "
                        f"{bb.weights_sha256} but the run was trained with sha256 {want}; pass the run's weights "
                        f"with --weights or --weights-dir")
    if want and not bb.weights_sha256:
        warnings.warn(f"could not hash the downloaded weights of {name}; not checked against sha256 {want}",
                      stacklevel=2)
    now = bb.provenance()
    for key in ("mean", "std", "interpolation", "image_size", "grid", "dim"):
        if key in prov and prov[key] is not None and list(np.atleast_1d(prov[key])) != list(np.atleast_1d(now[key])):
            raise SanfError(f"the rebuilt backbone's {key} is {now[key]!r}, the run's cache recorded {prov[key]!r}; "
                            f"this sanf/timm version preprocesses differently from the one that extracted it")
    return bb


def expand_inputs(items) -> list[str]:
    """Files, folders (recursive, image files only) and glob patterns -> sorted, de-duplicated file paths."""
    from ..data.folder import list_image_files

    if isinstance(items, (str, os.PathLike)):
        items = [items]
    out: list[str] = []
    for item in items:
        text = os.fspath(item)
        p = Path(text).expanduser()
        if p.is_dir():
            found = [str(f) for f in list_image_files(p)]
            if not found:
                raise SanfError(f"folder {p} holds no images (looked recursively for .jpg, .png, ... files)")
            out += found
        elif p.exists():
            out.append(str(p))
        elif glob.has_magic(text):
            matches = sorted(glob.glob(os.path.expanduser(text), recursive=True))
            found = []
            for m in matches:
                found += [str(f) for f in list_image_files(Path(m))] if Path(m).is_dir() else [m]
            if not found:
                raise SanfError(f"pattern {text!r} matches no files")
            out += found
        else:
            raise SanfError(f"{text} does not exist (give image files, folders or glob patterns)")
    seen, unique = set(), []
    for f in out:
        if f not in seen:
            seen.add(f)
            unique.append(f)
    if not unique:
        raise SanfError("no images given")
    return unique


class _Items(torch.utils.data.Dataset):
    """Decoded, preprocessed images for DataLoader workers, as on `sanf extract`'s CPU path (``decode_image``, PIL
    resize, normalise); an unreadable file becomes ``(None, reason, None)``. ``keep_images``: the decoded image
    travels too (maps are drawn over it at its own resolution)."""

    def __init__(self, paths, preprocess, keep_images: bool = False):
        self.paths, self.preprocess, self.keep_images = list(paths), preprocess, keep_images

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from ..data.images import decode_image, load_or_reason

        image, reason = load_or_reason(lambda: decode_image(self.paths[i]))
        if image is None:
            return None, reason, None
        x, reason = load_or_reason(lambda: self.preprocess(image))
        return x, reason, (image if self.keep_images and x is not None else None)


class _Collate:
    def __init__(self, size):
        self.size = tuple(size)

    def __call__(self, items):
        zeros = torch.zeros(3, *self.size)
        return (torch.stack([x if x is not None else zeros for x, _, _ in items]), [r for _, r, _ in items],
                [im for _, _, im in items])


# --------------------------------------------------------------------------------------------------- results
@dataclass
class ScoreResult:
    """What ``Detector.score`` returns. With ``maps=True``: ``maps``, one float32 ``(H, W)`` map per scored image at
    its own resolution, and ``pixel_threshold`` (the run's threshold on map values; None for runs without held-out
    maps): an image's predicted defect region is ``map > pixel_threshold["value"]``."""

    paths: list[str]
    scores: np.ndarray
    anomalous: np.ndarray
    percentiles: np.ndarray
    threshold: dict | None
    skipped: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    maps: list[np.ndarray] | None = None
    pixel_threshold: dict | None = None

    def rows(self) -> list[dict]:
        return [{"path": p, "score": float(s), "anomalous": bool(a), "percentile": float(q)}
                for p, s, a, q in zip(self.paths, self.scores, self.anomalous, self.percentiles, strict=True)]

    def regions(self) -> list[np.ndarray] | None:
        """The predicted defect region of each image (bool ``(H, W)``); None without maps or a pixel threshold."""
        if self.maps is None or self.pixel_threshold is None:
            return None
        return [m > self.pixel_threshold["value"] for m in self.maps]

    def summary(self) -> str:
        thr = (f"threshold {self.threshold['value']:.6g} at target FPR {self.threshold['target_fpr']:g}"
               if self.threshold else "no calibrated threshold")
        return (f"{len(self.paths)} scored, {int(self.anomalous.sum())} flagged anomalous, {len(self.skipped)} "
                f"skipped ({thr})")


@dataclass
class ScoredBatch:
    """One batch of ``Detector.score``: the kept files, their scores and decisions, and with maps the decoded images
    and their maps at their own resolution (what ``on_batch`` receives)."""

    paths: list[str]
    scores: np.ndarray
    anomalous: np.ndarray
    percentiles: np.ndarray
    images: list[np.ndarray] | None = None
    maps: list[np.ndarray] | None = None


# -------------------------------------------------------------------------------------------------- detector
class Detector:
    """A finished run as a detector; see the module docstring. ``Detector.load(run_dir)``, then ``score(paths)``."""

    def __init__(self, model: DetectorModel, preprocess, *, config: dict, run_dir, device, calibration: dict | None,
                 threshold: dict | None, score: str, amp: torch.dtype | None, head=None, pixel_threshold=None):
        self.model, self.preprocess, self.config, self.run_dir = model, preprocess, config, Path(run_dir)
        self.device, self.calibration, self.threshold, self.score_kind, self.amp = device, calibration, threshold, \
            score, amp
        self.head, self.pixel_threshold = head, pixel_threshold  # maps.MapHead, jobs.maps.PixelThreshold
        cal = ((calibration or {}).get("scores") or {}).get(score)
        self.calibration_scores = np.asarray(cal if cal else [], np.float64)

    @classmethod
    def load(cls, run_dir, *, weights=None, weights_dir=None, device: str = "auto", score: str = "auto",
             fpr: float | None = None, amp: bool = True, map_sigma: float | None = None,
             pixel_rule: str | None = None) -> Detector:
        """``map_sigma`` (the map blur in input pixels) and ``pixel_rule`` (``jobs.maps``): defaults when None."""
        from ..device import amp_dtype, resolve_device
        from ..evaluate.calibration import run_threshold
        from ..jobs.maps import DEFAULT_PIXEL_RULE, DEFAULT_SIGMA, pixel_threshold_of
        from ..maps import MapHead

        dev = resolve_device(device)
        model, cfg, score, held_out = load_model(run_dir, score)
        ident = cfg.get("cache") or {}
        bb = build_backbone(ident.get("backbone") or {}, weights=weights, weights_dir=weights_dir, device=str(dev))
        dtype = {"float16": torch.float16, "float32": torch.float32}.get(str(ident.get("dtype")), torch.float32)
        head = MapHead(bb.preprocess.size, DEFAULT_SIGMA if map_sigma is None else map_sigma) \
            if model.has_map else None
        calibration = cfg.get("calibration")
        threshold = run_threshold(calibration, score, fpr)
        pixel = None
        if head is not None:
            target = threshold["target_fpr"] if threshold else (fpr or 0.01)
            pixel = pixel_threshold_of(held_out.get(score), head, target, pixel_rule or DEFAULT_PIXEL_RULE)
        detector_model = DetectorModel(bb, model, dtype).to(dev).eval()
        return cls(detector_model, bb.preprocess, config=cfg, run_dir=run_dir, device=dev, calibration=calibration,
                   threshold=threshold, score=score, amp=amp_dtype(dev, amp), head=head, pixel_threshold=pixel)

    @property
    def has_maps(self) -> bool:
        """Whether the run's score has spatial support (class-token methods give no map)."""
        return self.head is not None

    def export_model(self) -> DetectorModel:
        """The module an export traces: scores, and the maps at the input size when the score has them."""
        return DetectorModel(self.model.backbone, self.model.model, self.model.feature_dtype, self.head)

    @property
    def preprocessing(self) -> dict:
        p = self.preprocess
        return {"input_size": [3, *p.size], "mean": list(p.mean), "std": list(p.std), "interpolation": p.interpolation,
                "resize": "whole image to input size (no crop), PIL, then /255, minus mean, divided by std",
                "layout": "NCHW float32 RGB"}

    def score_tensor(self, images: torch.Tensor, *, maps: bool = False):
        """Scores (float64) of a preprocessed batch ``(B, 3, S, S)``; with ``maps`` also its maps at the input size
        (float32 ``(B, S, S)``)."""
        if maps:
            self._require_maps()
        with torch.inference_mode():
            cls, patch = self.model.features(images.to(self.device), self.amp)
            score, evidence = self.model.model(cls, patch)
            score = score.double().cpu().numpy()
            if not maps:
                return score
            return score, self.head.to(evidence.device)(evidence).cpu().numpy()

    def _require_maps(self) -> None:
        if self.head is None:
            raise SanfError(f"the {self.score_kind} score has no spatial support, so no maps (class-token methods "
                            f"give none; patch-knn and the combined score do)")

    def decide(self, scores) -> tuple[np.ndarray, np.ndarray]:
        """(anomalous, percentile) of scores (``evaluate.calibration.decide``)."""
        from ..evaluate.calibration import decide

        return decide(scores, self.threshold, self.calibration_scores)

    def score(self, paths, *, batch_size: int = 32, num_workers: int | None = None, on_error: str = "skip",
              quiet: bool = True, maps: bool = False, on_batch=None) -> ScoreResult:
        """Score images: files, folders, globs (see :func:`expand_inputs`), or in-memory images (PIL images or
        uint8 arrays ``(H, W)``/``(H, W, 3|4)``, named ``<image N>``). ``maps``: also each image's anomaly map at its
        own resolution (``ScoreResult.maps``); ``on_batch(ScoredBatch)`` after every batch (then the maps are not
        kept in the result: a caller writing them out holds one batch at a time)."""
        from ..extract.job import _default_workers
        from ..maps import resize_maps
        from ..progress import progress_bar

        if on_error not in ("skip", "fail"):
            raise SanfError(f"on_error must be skip or fail, not {on_error!r}")
        if batch_size < 1:
            raise SanfError("--batch-size must be at least 1")
        if maps:
            self._require_maps()
        files, items = _inputs(paths, self.preprocess, keep_images=maps or on_batch is not None)
        workers = 0 if not isinstance(items, _Items) else \
            min(_default_workers() if num_workers is None else num_workers, max(1, len(files) // batch_size))
        loader = torch.utils.data.DataLoader(items, batch_size=batch_size, num_workers=workers,
                                             collate_fn=_Collate(self.preprocess.size),
                                             pin_memory=self.device.type == "cuda",
                                             prefetch_factor=4 if workers else None)
        kept, parts, skipped, kept_maps = [], [], [], []
        t0 = time.perf_counter()
        with progress_bar(quiet) as bar:
            task = bar.add_task("score", total=len(files), rate="")
            start = 0
            for x, reasons, images in loader:
                ok = [i for i, r in enumerate(reasons) if not r]
                for i, r in enumerate(reasons):
                    if r:
                        if on_error == "fail":
                            raise SanfError(f"cannot read image {files[start + i]}: {r} (--on-error skip would "
                                            f"list it and go on)")
                        skipped.append({"path": files[start + i], "reason": r})
                if ok:
                    batch = x[ok] if len(ok) < len(reasons) else x
                    out = self.score_tensor(batch, maps=maps)
                    s, m = out if maps else (out, None)
                    names = [files[start + i] for i in ok]
                    full = None
                    if maps:  # each map back to its image's own resolution (the inverse of extraction's resize)
                        full = [resize_maps(torch.from_numpy(m[j:j + 1]), images[i].shape[:2])[0].numpy()
                                for j, i in enumerate(ok)]
                    parts.append(s)
                    kept += names
                    if on_batch is not None:
                        a, q = self.decide(s)
                        on_batch(ScoredBatch(names, s, a, q, [images[i] for i in ok], full))
                    elif maps:
                        kept_maps += full
                start += len(reasons)
                bar.update(task, advance=len(reasons),
                           rate=f"{start / max(time.perf_counter() - t0, 1e-9):.1f} img/s")
        scores = np.concatenate(parts) if parts else np.zeros(0)
        anomalous, pct = self.decide(scores)
        return ScoreResult(paths=kept, scores=scores, anomalous=anomalous, percentiles=pct, threshold=self.threshold,
                           skipped=skipped, seconds=time.perf_counter() - t0,
                           maps=kept_maps if maps and on_batch is None else None,
                           pixel_threshold=self.pixel_threshold.record if maps and self.pixel_threshold else None)


class _Arrays(torch.utils.data.Dataset):
    """In-memory images (PIL or uint8 arrays) for ``Detector.score``, preprocessed as files are."""

    def __init__(self, images, preprocess, keep_images: bool):
        self.images, self.preprocess, self.keep_images = images, preprocess, keep_images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        from PIL import Image

        img = self.images[i]
        arr = np.asarray(img.convert("RGB")) if isinstance(img, Image.Image) else np.asarray(img)
        if arr.dtype != np.uint8 or arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 3, 4)):
            return None, f"not a uint8 (H, W) or (H, W, 3|4) image array (got {arr.dtype} {arr.shape})", None
        if arr.ndim == 2 or arr.shape[2] == 1:
            arr = np.repeat(arr.reshape(*arr.shape[:2], 1), 3, axis=2)
        arr = np.ascontiguousarray(arr[:, :, :3])
        return self.preprocess(arr), "", (arr if self.keep_images else None)


def _inputs(paths, preprocess, keep_images: bool):
    """(names, dataset) of what ``Detector.score`` was given: paths (expanded) or in-memory images."""
    from PIL import Image

    given = paths if isinstance(paths, (list, tuple)) else [paths]
    if given and all(isinstance(p, (Image.Image, np.ndarray)) for p in given):
        return [f"<image {i}>" for i in range(len(given))], _Arrays(list(given), preprocess, keep_images)
    if any(isinstance(p, (Image.Image, np.ndarray)) for p in given):
        raise SanfError("give either image files/folders/patterns or in-memory images (PIL or numpy), not both")
    files = expand_inputs(paths)
    return files, _Items(files, preprocess, keep_images)


__all__ = ["Detector", "DetectorModel", "ScoreResult", "ScoredBatch", "build_backbone", "expand_inputs",
           "load_model"]
