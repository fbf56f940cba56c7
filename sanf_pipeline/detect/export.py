"""Exporting a trained run as one self-contained model: ONNX (or TorchScript) plus a sidecar JSON.

The exported graph is ``detect.detector.DetectorModel`` in fp32: ``images`` ``(batch, 3, S, S)`` float32, resized and
normalised as the sidecar's ``preprocessing`` says, in; ``scores`` ``(batch,)`` float32 (higher = more
anomalous) out and, for a score with spatial support (patch-knn, the combined score), ``maps`` ``(batch, S, S)``
float32: the anomaly map at the input size (``maps.MapHead``: upsampled token evidence, Gaussian blur), which a
deployment resizes bilinearly to each image's own size (the inverse of the whole-image resize). It holds the
backbone, the rounding to the cache dtype, the normaliser (float64 inside), the flow and the score. The batch axis
is dynamic. ONNX uses opset ``OPSET`` through PyTorch's TorchScript-based
exporter (``torch.onnx.export(dynamo=False)``: the dynamo exporter gives the same graph ~30x slower to export);
``pip install 'sanf[export]'`` brings onnx and onnxruntime.

The sidecar ``<out>.json`` holds what a deployment needs besides the graph: the preprocessing (input size, mean,
std, interpolation, resize rule), the threshold (value, target FPR, number of held-out normal images behind it,
rule), the held-out normal scores (for percentiles), the score's meaning, the run's identity and the backbone
provenance. ``check_onnx`` runs the file with onnxruntime against PyTorch on a batch.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import SanfError

if TYPE_CHECKING:  # torch is imported where it is used: check_export_path runs before it loads (cli/detect.py)
    import torch

OPSET = 17
FORMATS = ("onnx", "torchscript")
SIDECAR_FORMAT = "sanf-detector"


def sidecar(detector, fmt: str, out: Path) -> dict:
    from ..flow.score import SCORE_DESCRIPTIONS

    cfg = detector.config
    ident = cfg.get("cache") or {}
    outputs = {"scores": {"shape": ["batch"], "dtype": "float32",
                          "meaning": SCORE_DESCRIPTIONS.get(detector.score_kind, detector.score_kind)}}
    maps = None
    if detector.has_maps:
        size = detector.preprocessing["input_size"][1:]
        outputs["maps"] = {"shape": ["batch", *size], "dtype": "float32",
                           "meaning": "anomaly map at the input size (higher = more anomalous); resize it bilinearly "
                                      "to the image's own size"}
        pt = detector.pixel_threshold
        maps = {"sigma": detector.head.sigma, "pixel_threshold": pt.record if pt else None,
                "colour_scale": list(pt.colour) if pt else None,
                "region": "predicted defect region: map > pixel_threshold.value"}
    return {
        "format": SIDECAR_FORMAT, "format_version": 1, "model_file": out.name, "model_format": fmt,
        "opset": OPSET if fmt == "onnx" else None,
        "inputs": {"images": {"shape": ["batch", *detector.preprocessing["input_size"]], "dtype": "float32"}},
        "outputs": outputs,
        "maps": maps,
        "preprocessing": detector.preprocessing,
        "threshold": detector.threshold,
        "decision": "anomalous if score > threshold.value",
        "calibration_scores": detector.calibration_scores.tolist(),
        "score": detector.score_kind,
        "run": {"run_id": cfg.get("run_id"), "normal_class": cfg.get("normal_class_name"), "flow": cfg.get("flow"),
                "normalizer": cfg.get("normalizer"), "feature_dtype": ident.get("dtype")},
        "backbone": ident.get("backbone"),
    }


def check_export_path(out, fmt: str, overwrite: bool) -> tuple[Path, Path]:
    """The model file and its sidecar, refused before anything loads when they cannot be written."""
    if fmt not in FORMATS:
        raise SanfError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = Path(out)
    side = out.with_name(out.name + ".json")
    for p in (out, side):
        if p.exists() and p.is_dir():
            raise SanfError(f"{p} is a folder; choose a file name for --out")
        if p.exists() and not overwrite:
            raise SanfError(f"{p} exists; pass --overwrite to replace it or choose another --out")
    # a missing folder is sanf's output and is made at write time (export_detector), but a file in the way of it
    # is refused here, before the backbone loads (issue 22)
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SanfError(f"{ancestor} is a file, so the folder {out.parent} cannot be made; choose another --out")
    return out, side


def export_detector(detector, out, fmt: str = "onnx", *, batch: int = 2, overwrite: bool = False) -> dict:
    """Write the detector's model to ``out`` and its sidecar to ``out`` + ``.json``; returns the sidecar."""
    import torch

    from ..store.atomic import write_json_atomic

    out, side = check_export_path(out, fmt, overwrite)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SanfError(f"cannot make the folder {out.parent}: {exc.strerror or exc}") from None
    model = detector.export_model().to("cpu").eval()
    names = ["scores", "maps"] if detector.has_maps else ["scores"]
    size = detector.preprocessing["input_size"]
    x = torch.zeros(batch, *size)
    tmp = out.with_name(f".{out.name}.tmp")
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's chatter on Python-side shape checks
            if fmt == "onnx":
                try:
                    import onnx  # noqa: F401 - the exporter needs it
                except ImportError:
                    raise SanfError("ONNX export needs the onnx package: pip install 'sanf[export]'") from None
                torch.onnx.export(model, (x,), str(tmp), dynamo=False, opset_version=OPSET,
                                  input_names=["images"], output_names=names,
                                  dynamic_axes={n: {0: "batch"} for n in ["images", *names]})
            else:
                traced = torch.jit.trace(model, (x,), check_trace=False)
                traced.save(str(tmp))
        tmp.replace(out)
    except SanfError:
        raise
    except OSError as exc:
        raise SanfError(f"cannot write {out}: {exc.strerror or exc}") from None
    finally:
        tmp.unlink(missing_ok=True)
    meta = sidecar(detector, fmt, out)
    write_json_atomic(side, meta)
    detector.model.to(detector.device)
    return meta


def run_onnx(path, images: np.ndarray, *, maps: bool = False):
    """Scores of an exported ONNX detector with onnxruntime on CPU; with ``maps`` (scores, maps)."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise SanfError("running ONNX needs onnxruntime: pip install 'sanf[export]'") from None
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {"images": np.ascontiguousarray(images, dtype=np.float32)})
    if maps and len(out) < 2:
        raise SanfError(f"{path} outputs no maps (its score has no spatial support)")
    return (out[0], out[1]) if maps else out[0]


def check_onnx(detector, path, images: torch.Tensor) -> float:
    """Largest relative difference between onnxruntime and PyTorch scores on ``images`` (and, for a detector with
    maps, the largest difference of the maps relative to their range or, for a flat map, their size)."""
    import torch

    ref = detector.export_model().to("cpu").eval()
    with torch.no_grad():
        want = ref(images)
    if detector.has_maps:
        got_s, got_m = run_onnx(path, images.numpy(), maps=True)
        want_s, want_m = want[0].double().numpy(), want[1].double().numpy()
        span = max(float(want_m.max() - want_m.min()), float(np.abs(want_m).max()), 1e-12)
        map_err = float(np.max(np.abs(got_m - want_m)) / span)
    else:
        got_s, want_s, map_err = run_onnx(path, images.numpy()), want.double().numpy(), 0.0
    score_err = float(np.max(np.abs(got_s.astype(np.float64) - want_s) / np.maximum(np.abs(want_s), 1e-12)))
    return max(score_err, map_err)
