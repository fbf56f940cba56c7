"""The scorers behind `sanf serve`: decoded images in, what ``POST /v1/score`` answers per image out.

``DetectorScorer`` wraps a trained run (``detect.detector.Detector``), ``OnnxScorer`` an exported ONNX detector and
its sidecar (``detect.export``: preprocessing, threshold, held-out normal scores, map settings). Both preprocess
exactly as `sanf score` does (``extract.preprocess.Preprocess``: the whole image resized to the input size, no crop,
normalised), decide and rank a score as it does (``score > threshold.value``; percentile among the held-out normal
scores) and bring a map back to its image's own size with ``maps.resize_maps``, so a served score equals the one
`sanf score` writes for the same file.

The work is split by where it runs: ``prepare`` (per image, in the request's thread: preprocessing),
``score_prepared`` (per batch, in the batcher's single worker thread: the model, and nothing else that could be done
elsewhere), ``finish`` and ``render`` (per image, in the request's thread again: the map at the image's resolution,
its predicted region, the RGBA PNG). ``score_images`` chains them for callers without a batcher.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import numpy as np

from ..errors import SanfError


def json_safe(obj):
    """``obj`` with numpy scalars as Python numbers and NaN/inf as None (JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    return obj


def png_base64(rgba: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    # level 3: maps are smooth, so this is within a few % of level 9's size at a fraction of its time
    Image.fromarray(np.ascontiguousarray(rgba), mode="RGBA").save(buf, format="PNG", compress_level=3)
    return base64.b64encode(buf.getvalue()).decode("ascii")


class Scorer:
    """What the two scorers share; a subclass sets the attributes in ``__init__`` and implements ``_run``."""

    preprocess = None  # extract.preprocess.Preprocess
    score_kind: str = ""
    threshold: dict | None = None
    pixel_threshold: dict | None = None  # the record (value, rule, target_fpr, ...)
    colour: tuple[float, float] | None = None  # the run's colour scale of maps (lo, hi)
    has_maps: bool = False
    calibration_scores: np.ndarray = np.zeros(0)

    # ------------------------------------------------------------------------------------- the stages
    def prepare(self, image: np.ndarray):
        """A decoded uint8 ``(H, W, 3)`` image -> ``(input tensor (3, S, S), (H, W))``."""
        return self.preprocess(image), tuple(int(s) for s in np.shape(image)[:2])

    def score_prepared(self, items: list) -> list[dict]:
        """One batch of prepared images -> one dict each: score, decision, percentile, threshold, size and the map at
        the input size (``input_map``; None without maps)."""
        import torch

        x = torch.stack([t for t, _ in items])
        scores, maps = self._run(x)
        anomalous, pct = self.decide(scores)
        thr = self.threshold or {}
        return [{"score": float(s), "anomalous": bool(a), "percentile": float(q), "threshold": thr.get("value"),
                 "target_fpr": thr.get("target_fpr"), "width": size[1], "height": size[0],
                 "input_map": None if maps is None else maps[i]}
                for i, (s, a, q, (_, size)) in enumerate(zip(scores, anomalous, pct, items, strict=True))]

    def finish(self, result: dict) -> dict:
        """``result`` with ``map`` (float32 at the image's own resolution, as `sanf score --maps` writes it; None
        without maps) and ``region_pixels`` (pixels over the pixel threshold; None without one)."""
        import torch

        from ..maps import resize_maps

        out = {k: v for k, v in result.items() if k != "input_map"}
        m = result.get("input_map")
        out["map"] = out["region_pixels"] = None
        if m is not None:
            full = resize_maps(torch.from_numpy(np.asarray(m, np.float32)[None]), (result["height"],
                                                                                     result["width"]))[0].numpy()
            out["map"] = full
            if self.pixel_threshold is not None:
                out["region_pixels"] = int(np.count_nonzero(full > float(self.pixel_threshold["value"])))
        return out

    def render(self, result: dict, filename: str) -> dict:
        """A finished result as the JSON of one image: the map as a base64 RGBA PNG at the image's resolution (RGB:
        jet of the map on the run's colour scale, else the map's own min/max; alpha: the same scaled value)."""
        from ..maps.overlay import colour_range, rgba_map

        m = result.get("map")
        png = None if m is None else png_base64(rgba_map(m, *colour_range(m, self.colour)))
        return json_safe({"filename": filename, "score": result["score"], "anomalous": result["anomalous"],
                          "percentile": result["percentile"], "threshold": result["threshold"],
                          "target_fpr": result["target_fpr"], "width": result["width"], "height": result["height"],
                          "map_png": png, "region_pixels": result["region_pixels"]})

    def score_images(self, images) -> list[dict]:
        """Decoded uint8 ``(H, W, 3)`` images -> finished results (see :meth:`finish`), in one batch."""
        return [self.finish(r) for r in self.score_prepared([self.prepare(im) for im in images])]

    # ------------------------------------------------------------------------------------- decisions
    def decide(self, scores) -> tuple[np.ndarray, np.ndarray]:
        """(anomalous, percentile) of scores: the rule `sanf score` decides by (``evaluate.calibration.decide``)."""
        from ..evaluate.calibration import decide

        return decide(scores, self.threshold, self.calibration_scores)

    def _run(self, x):
        raise NotImplementedError

    def info(self) -> dict:
        raise NotImplementedError


class DetectorScorer(Scorer):
    """A run folder's ``Detector``; ``Detector.load``'s options (device, score, fpr, map_sigma, pixel_rule,
    weights) apply."""

    def __init__(self, detector, *, label: str | None = None):
        self.detector = detector
        self.label = label or str(detector.run_dir)
        self.preprocess, self.score_kind, self.threshold = detector.preprocess, detector.score_kind, detector.threshold
        self.has_maps, self.calibration_scores = detector.has_maps, detector.calibration_scores
        pt = detector.pixel_threshold
        self.pixel_threshold = pt.record if pt is not None else None
        self.colour = tuple(float(c) for c in pt.colour) if pt is not None else None

    @classmethod
    def load(cls, run_dir, **options) -> DetectorScorer:
        from ..detect.detector import Detector

        return cls(Detector.load(run_dir, **options), label=str(run_dir))

    def _run(self, x):
        out = self.detector.score_tensor(x, maps=self.has_maps)
        return out if self.has_maps else (out, None)

    def info(self) -> dict:
        det, cfg = self.detector, self.detector.config
        metrics = _metrics(det.run_dir / "metrics.json")
        bb = (cfg.get("cache") or {}).get("backbone") or {}
        method = cfg.get("method") or (metrics or {}).get("method") or "flow"
        return {"run": self.label, "backbone": _backbone_name(bb), "normal_class": cfg.get("normal_class_name"),
                "method": method, "score": self.score_kind,
                "score_description": getattr(det.model.model, "description", self.score_kind),
                "input_size": det.preprocessing["input_size"], "threshold": self.threshold,
                "pixel_threshold": self.pixel_threshold, "colour_scale": _list(self.colour), "maps": self.has_maps,
                "metrics": metrics, "engine": f"pytorch ({det.device})"}


class OnnxScorer(Scorer):
    """An exported ONNX detector (``sanf export``), run with onnxruntime on CPU; everything but the graph comes from
    its sidecar ``<file>.json``. ``fpr``: recalibrate the threshold on the sidecar's held-out normal scores (the pixel
    threshold stays the exported one: the held-out maps are not in the sidecar)."""

    def __init__(self, path, *, fpr: float | None = None):
        from ..detect.export import SIDECAR_FORMAT
        from ..extract.preprocess import Preprocess

        self.path = Path(path)
        side = self.path.with_name(self.path.name + ".json")
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SanfError(f"{self.path} has no sidecar {side.name}; export it again with `sanf export`") from None
        except (OSError, ValueError) as exc:
            raise SanfError(f"cannot read the sidecar {side}: {exc}") from None
        if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT or meta.get("model_format") != "onnx":
            raise SanfError(f"{side} is not the sidecar of an ONNX export of `sanf export`")
        try:
            import onnxruntime as ort
        except ImportError:
            raise SanfError("serving an ONNX export needs onnxruntime: pip install 'sanf[export]'") from None
        self.meta = meta
        pre = meta["preprocessing"]
        self.preprocess = Preprocess(tuple(pre["input_size"][1:]), pre["mean"], pre["std"], pre["interpolation"])
        self.score_kind = meta.get("score") or "score"
        self.calibration_scores = np.asarray(meta.get("calibration_scores") or [], np.float64)
        self.threshold = meta.get("threshold")
        if fpr is not None:
            from ..evaluate.calibration import conformal_threshold

            if not len(self.calibration_scores):
                raise SanfError(f"{side} holds no held-out normal scores to calibrate --fpr {fpr} on")
            self.threshold = conformal_threshold(self.calibration_scores, fpr)
        self.has_maps = "maps" in (meta.get("outputs") or {})
        maps = meta.get("maps") or {}
        self.pixel_threshold = maps.get("pixel_threshold")
        scale = maps.get("colour_scale")
        self.colour = (float(scale[0]), float(scale[1])) if scale else None
        try:
            self.session = ort.InferenceSession(str(self.path), providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for a damaged or foreign file
            raise SanfError(f"cannot load {self.path} with onnxruntime: {' '.join(str(exc).split())}") from None

    def _run(self, x):
        out = self.session.run(None, {"images": np.ascontiguousarray(x.numpy(), dtype=np.float32)})
        scores = np.asarray(out[0], np.float64)
        return scores, (np.asarray(out[1], np.float32) if self.has_maps else None)

    def info(self) -> dict:
        meta, run = self.meta, self.meta.get("run") or {}
        scores = (meta.get("outputs") or {}).get("scores") or {}
        return {"run": str(self.path), "backbone": _backbone_name(meta.get("backbone") or {}),
                "normal_class": run.get("normal_class"), "method": "flow" if run.get("flow") else self.score_kind,
                "score": self.score_kind, "score_description": scores.get("meaning", self.score_kind),
                "input_size": meta["preprocessing"]["input_size"], "threshold": self.threshold,
                "pixel_threshold": self.pixel_threshold, "colour_scale": _list(self.colour), "maps": self.has_maps,
                "metrics": None, "engine": "onnxruntime (cpu)"}


def _list(pair):
    return None if pair is None else list(pair)


def _backbone_name(prov: dict) -> str | None:
    arch, tag = prov.get("arch"), prov.get("tag")
    return f"{arch}.{tag}" if arch and tag else arch


def _metrics(path: Path) -> dict | None:
    """The headline numbers of the run's `sanf eval`/`sanf baseline` (metrics.json), if it has been evaluated."""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(m, dict):
        return None
    loc = m.get("localisation") or {}
    return {"score": m.get("score"), "auroc": m.get("auroc"), "aupr": m.get("aupr"),
            "pixel_auroc": loc.get("pixel_auroc"), "aupro": loc.get("aupro")}


__all__ = ["DetectorScorer", "OnnxScorer", "Scorer", "json_safe", "png_base64"]
