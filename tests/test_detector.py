"""A trained run as a detector (detector.py, detector_cli.py, export.py): `sanf score` gives `sanf eval`'s scores
for the same images (real DINOv2 weights from ../shared, fp32, CPU), a copied run folder finds its weights by the
usual order and checks their sha256, ONNX agrees with PyTorch on real images for ViT and CNN backbones and every
fusion mode, and bad input is one line with exit code 2 and nothing overwritten."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import DINOV2_WEIGHTS, SHARED, TINY_FLOW, assert_user_error, extract_config, unpack_cifar_slice

from sanf_pipeline.cli.main import cli
from sanf_pipeline.models import BASELINES

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EFFNET_WEIGHTS = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"


def sanf(*args, env=None):
    return CliRunner().invoke(cli, [str(a) for a in args], env=env)


def read_csv(path) -> dict[str, dict]:
    with open(path, newline="", encoding="utf-8") as fh:
        return {r["path"]: r for r in csv.DictReader(fh)}


def _fit_eval(cache, out, normal, **fit):
    from sanf_pipeline.jobs.api import eval_run, fit_run
    from sanf_pipeline.train.config import FitConfig

    fit_run(cache, normal, FitConfig(**{**TINY_FLOW, "max_epochs": 2, **fit}), out, quiet=True)
    eval_run(out, plots=False, device="cpu")
    return Path(out)


def _eval_scores(run_dir, data_root) -> dict[str, float]:
    from sanf_pipeline.evaluate.metrics import read_scores_csv

    ev = read_scores_csv(Path(run_dir) / "scores.csv")
    return {str(Path(data_root) / sid): s for sid, s in zip(ev["sample_id"], ev["score"], strict=True)}


# ---------------------------------------------------------------------------------- tiny random ViT (fast)
@pytest.fixture(scope="module")
def tiny(folder_dataset, tmp_path_factory):
    from sanf_pipeline.extract.job import extract

    root = tmp_path_factory.mktemp("tiny")
    extract(extract_config(folder_dataset, root / "cache", dtype="float32"))
    return {"data": folder_dataset, "cache": root / "cache", "run": _fit_eval(root / "cache", root / "run", "a")}


def test_detector_api_equals_eval(tiny):
    from sanf_pipeline import Detector

    det = Detector.load(tiny["run"], device="cpu")
    res = det.score([tiny["data"] / "test"], batch_size=3, num_workers=0)
    want = _eval_scores(tiny["run"], tiny["data"])
    assert len(res.paths) == 15 and not res.skipped
    np.testing.assert_allclose(res.scores, [want[p] for p in res.paths], rtol=1e-5)
    thr = det.threshold["value"]
    assert (res.anomalous == (res.scores > thr)).all()
    cal = np.asarray(det.config["calibration"]["scores"]["nll"])
    assert res.percentiles.tolist() == [100.0 * (cal <= s).mean() for s in res.scores]


@pytest.mark.parametrize("kind", ["combined", "patch", "z2"])
def test_combined_run_detector_equals_eval(tiny, tmp_path, kind):
    """A run with its patch part (4 of 10 rows held out, the least it standardises on): the detector and
    TorchScript give eval's scores for every score kind, and the default is the combined score."""
    from sanf_pipeline import Detector
    from sanf_pipeline.jobs.api import eval_run

    run = _fit_eval(tiny["cache"], tmp_path / "run", "a", val_fraction=0.4)
    config = json.loads((run / "config.json").read_text())
    assert config["patch_score"]["method"] == "patch-knn" and config["calibration"]["threshold_score"] == "combined"
    assert Detector.load(run, device="cpu").score_kind == "combined"
    eval_run(run, score=kind, out_dir=tmp_path / kind, plots=False, device="cpu")
    want = _eval_scores(tmp_path / kind, tiny["data"])
    det = Detector.load(run, device="cpu", score=kind)
    res = det.score([tiny["data"] / "test"], batch_size=4, num_workers=0)
    np.testing.assert_allclose(res.scores, [want[p] for p in res.paths], rtol=1e-5, atol=1e-6)
    cal = np.asarray(config["calibration"]["scores"][kind])
    np.testing.assert_allclose(res.percentiles, [100.0 * (cal <= s).mean() for s in res.scores])
    out = tmp_path / "m.pt"
    assert sanf("export", "--run", run, "--score", kind, "--format", "torchscript", "--out", out).exit_code == 0
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        got = torch.jit.load(str(out))(x)  # (scores, maps) for a score with maps
        np.testing.assert_allclose((got[0] if isinstance(got, tuple) else got).numpy(), det.model(x).numpy(),
                                   rtol=1e-5, atol=1e-6)


def test_flow_alone_run_refuses_patch_scores(tiny, tmp_path):
    from sanf_pipeline import Detector

    run = _fit_eval(tiny["cache"], tmp_path / "run", "a", val_fraction=0.4, patch_score="none")
    assert Detector.load(run, device="cpu").score_kind == "nll"
    assert_user_error(sanf("score", "--run", run, "--score", "combined", tiny["data"] / "test"), "no patch score")


def test_a_class_too_small_to_standardise_keeps_the_flow_alone(tiny, tmp_path):
    """3 held-out images: fewer than the combined score's minimum, so the run is the flow alone and says why."""
    from sanf_pipeline import Detector
    from sanf_pipeline.models.combined import MIN_HELD_OUT

    run = _fit_eval(tiny["cache"], tmp_path / "run", "a", val_fraction=0.3)
    config = json.loads((run / "config.json").read_text())
    assert MIN_HELD_OUT == 4 and config["patch_score"] is None
    assert "3 held-out normal images, fewer than the 4" in config["patch_score_skipped"]
    assert Detector.load(run, device="cpu").score_kind == "nll"


@pytest.mark.parametrize("method", ["knn", "knn-l2", "gaussian", "gaussian-whiten", "patch-knn"])
def test_baseline_runs_are_detectors(tiny, tmp_path, method):
    from sanf_pipeline import Detector
    from sanf_pipeline.jobs.api import baseline_run

    res = baseline_run(tiny["cache"], "a", method, tmp_path / method, plots=False, fpr=0.5)
    cal = json.loads((tmp_path / method / "config.json").read_text())["calibration"]
    assert cal["n"] == 1 and res.metrics["threshold"]["n_calibration"] == 1 and "f1_optimal_threshold" in res.metrics
    det = Detector.load(tmp_path / method, device="cpu")
    out = det.score([tiny["data"] / "test"], num_workers=0)
    want = _eval_scores(tmp_path / method, tiny["data"])
    # atol: the tiny random ViT's L2-normalised class tokens are ~1e-6 apart, where float64 cancellation shows
    np.testing.assert_allclose(out.scores, [want[p] for p in out.paths], rtol=1e-5, atol=1e-9)
    assert det.threshold["value"] == pytest.approx(cal["scores"][method][0])


def test_score_cli_files_folders_globs(tiny, tmp_path):
    data = tiny["data"]
    out, js = tmp_path / "s.csv", tmp_path / "s.json"
    r = sanf("score", "--run", tiny["run"], data / "test" / "a", str(data / "test" / "b" / "00[01].png"),
             data / "test" / "c" / "004.png", "--out", out, "--json", js, "--num-workers", "0", "--quiet")
    assert r.exit_code == 0, r.output
    rows = read_csv(out)
    assert len(rows) == 5 + 2 + 1 and "8 scored" in r.stdout and "0 skipped" in r.stdout
    doc = json.loads(js.read_text())
    assert doc["n_scored"] == 8 and doc["threshold"]["n_calibration"] == 1
    want = _eval_scores(tiny["run"], data)
    for p, row in rows.items():
        assert float(row["score"]) == pytest.approx(want[p], rel=1e-5)
        assert int(row["anomalous"]) == int(float(row["score"]) > doc["threshold"]["value"])
    # CSV on stdout, summary on stderr
    r = sanf("score", "--run", tiny["run"], data / "test" / "a", "--num-workers", "0", "--quiet")
    assert r.exit_code == 0 and r.stdout.startswith("path,score,anomalous,percentile") and "5 scored" in r.stderr


def test_score_bad_input(tiny, tmp_path):
    run, data = tiny["run"], tiny["data"]
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    shutil.copy(data / "test" / "a" / "000.png", imgs / "good.png")
    (imgs / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    out = tmp_path / "s.csv"
    out.write_text("path,score,anomalous,percentile\nold\n")
    r = sanf("score", "--run", run, imgs, "--out", out, "--on-error", "fail", "--num-workers", "0", "--quiet")
    assert_user_error(r, "broken.png")
    assert out.read_text() == "path,score,anomalous,percentile\nold\n"  # nothing overwritten
    r = sanf("score", "--run", run, imgs, "--out", out, "--num-workers", "0", "--quiet")
    assert r.exit_code == 0 and "1 scored" in r.stdout and "1 skipped" in r.stdout
    assert "skipped" in r.stderr and "broken.png" in r.stderr and list(read_csv(out)) == [str(imgs / "good.png")]
    (tmp_path / "empty").mkdir()
    assert_user_error(sanf("score", "--run", run, tmp_path / "empty"), "holds no images")
    assert_user_error(sanf("score", "--run", run, tmp_path / "nope.png"), "does not exist")
    assert_user_error(sanf("score", "--run", run, str(tmp_path / "*.jpg")), "matches no files")
    mine = tmp_path / "notes.txt"
    mine.write_text("my notes")
    assert_user_error(sanf("score", "--run", run, imgs, "--out", mine), "not a sanf scores file")
    assert mine.read_text() == "my notes"
    half = tmp_path / "half"
    half.mkdir()
    shutil.copy(run / "config.json", half / "config.json")
    assert_user_error(sanf("score", "--run", half, imgs), "incomplete")
    assert_user_error(sanf("export", "--run", half, "--out", tmp_path / "m.onnx"), "incomplete")


def test_eval_refuses_a_cache_of_another_backbone(tiny, tmp_path, folder_dataset):
    from sanf_pipeline.extract.job import extract

    other = tmp_path / "c28"
    extract(extract_config(folder_dataset, other, image_size=28, limit_per_class=2))
    r = sanf("eval", "--run", tiny["run"], "--cache", other, "--out", tmp_path / "e")
    assert_user_error(r, "not compatible", "image size differs")
    assert not (tmp_path / "e").exists()


def test_torchscript_export(tiny, tmp_path):
    from sanf_pipeline import Detector

    out = tmp_path / "m.pt"
    r = sanf("export", "--run", tiny["run"], "--format", "torchscript", "--out", out)
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "m.pt.json").read_text())
    assert side["threshold"]["value"] is not None and side["preprocessing"]["input_size"] == [3, 56, 56]
    det = Detector.load(tiny["run"], device="cpu")
    x = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        np.testing.assert_allclose(torch.jit.load(str(out))(x).numpy(), det.model(x).numpy(), rtol=1e-5)
    assert_user_error(sanf("export", "--run", tiny["run"], "--format", "torchscript", "--out", out), "exists")


# ------------------------------------------------------------------------ real weights from ../shared (slow)
def _real_cache(root: Path, data: Path, backbone: str, weights: Path, **kw) -> Path:
    from sanf_pipeline.extract.job import ExtractConfig, extract

    cache = root / f"cache-{backbone}"
    extract(ExtractConfig(backbone=backbone, dataset="folder", data_root=str(data), cache=str(cache),
                          weights=str(weights), image_size=56, dtype="float32", batch_size=8, num_workers=0,
                          quiet=True, **kw))
    return cache


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if not DINOV2_WEIGHTS.is_file():
        pytest.skip(f"real DINOv2 weights not found at {DINOV2_WEIGHTS}")
    root = tmp_path_factory.mktemp("real")
    data = unpack_cifar_slice(root / "data", per_class=12)
    # extract with a copy of the weights that is gone afterwards: the run must find them by the usual order
    wcopy = root / "w" / DINOV2_WEIGHTS.name
    wcopy.parent.mkdir()
    shutil.copy(DINOV2_WEIGHTS, wcopy)
    cache = _real_cache(root, data, "vit_small_patch14_dinov2", wcopy, layer=8)
    shutil.rmtree(wcopy.parent)
    return {"root": root, "data": data, "cache": cache}


@pytest.mark.slow
def test_score_equals_eval_on_real_weights(real, tmp_path, monkeypatch):
    run = _fit_eval(real["cache"], tmp_path / "run", "airplane", max_epochs=3)
    moved = tmp_path / "elsewhere" / "run"  # the run folder copied to another machine
    shutil.copytree(run, moved)
    out = tmp_path / "s.csv"
    test = real["data"] / "test"
    args = ["score", "--run", moved, test, "--out", out, "--device", "cpu", "--num-workers", "0", "--quiet"]
    from sanf_pipeline.extract import backbones

    def offline(model_name, kwargs):
        raise OSError("offline")

    monkeypatch.setattr(backbones, "_create_from_hub", offline)
    assert_user_error(sanf(*args, env={"SANF_WEIGHTS_DIR": str(tmp_path)}), "no weights", "offline")
    r = sanf(*args, env={"SANF_WEIGHTS_DIR": str(DINOV2_WEIGHTS.parent)})
    assert r.exit_code == 0, r.output
    rows = read_csv(out)
    want = _eval_scores(run, real["data"])
    assert len(rows) == 24 == len(want)
    got = np.array([float(rows[p]["score"]) for p in want])
    np.testing.assert_allclose(got, list(want.values()), rtol=1e-4)
    # a weights file with another hash: one line naming both hashes, before anything is written
    from conftest import save_weights, tiny_timm

    other = save_weights(tiny_timm(), tmp_path / "vit_small_patch14_dinov2.other.safetensors")
    out.write_text("path,score,anomalous,percentile\n")
    r = sanf(*args, "--weights", other)
    line = assert_user_error(r, "sha256", json.loads((run / "config.json").read_text())["cache"]["backbone"]
                             ["weights"]["sha256"])
    from sanf_pipeline.extract.weights import file_sha256

    assert file_sha256(other) in line and out.read_text() == "path,score,anomalous,percentile\n"


def _real_images(data: Path, n: int = 6) -> torch.Tensor:
    from sanf_pipeline import Detector  # noqa: F401
    from sanf_pipeline.data.folder import list_image_files
    from sanf_pipeline.data.images import decode_image

    return [decode_image(p) for p in list_image_files(data / "test")[:: max(1, 24 // n)][:n]]


@pytest.mark.slow
@pytest.mark.parametrize(("backbone", "fusion"), [("vit", "none"), ("vit", "gap"), ("vit", "learnable"),
                                                  ("vit", "semantic"), ("cnn", "semantic"), ("vit", "combined"),
                                                  ("cnn", "combined"), ("cnn", "patch-flow")])
def test_onnx_matches_pytorch_on_real_images(real, tmp_path, backbone, fusion):
    """fusion "combined": the default fusion with 4 of 12 rows held out, so the run has its patch part and the
    exported model computes the combined score (flow + patch-knn part; "patch-flow": + the patch flow, by max). The
    CNN cache is the default extraction's: the final pool as class token, stages 2+3 as patch tokens."""
    pytest.importorskip("onnxruntime")
    from sanf_pipeline import Detector
    from sanf_pipeline.detect.export import check_onnx

    if backbone == "cnn":
        if not EFFNET_WEIGHTS.is_file():
            pytest.skip(f"EfficientNet-Lite0 weights not found at {EFFNET_WEIGHTS}")
        cache = _real_cache(tmp_path, real["data"], "tf_efficientnet_lite0", EFFNET_WEIGHTS)
    else:
        cache = real["cache"]
    combined = fusion in ("combined", "patch-flow")
    fit = {"val_fraction": 1 / 3} if combined else {"fusion": fusion}
    if fusion == "patch-flow":  # the conditional patch flow as the local part, combined by max
        fit.update(patch_score="patch-flow", combine="max")
    run = _fit_eval(cache, tmp_path / "run", "airplane", **fit)
    out = tmp_path / "m.onnx"
    r = sanf("export", "--run", run, "--out", out, env={"SANF_WEIGHTS_DIR": str(DINOV2_WEIGHTS.parent)})
    assert r.exit_code == 0, r.output
    side = json.loads((tmp_path / "m.onnx.json").read_text())
    assert side["opset"] == 17 and side["threshold"]["n_calibration"] == (4 if combined else 1)
    assert side["score"] == ("combined" if combined else "nll")
    det = Detector.load(run, device="cpu", weights_dir=DINOV2_WEIGHTS.parent)
    images = torch.stack([det.preprocess(im) for im in _real_images(real["data"])])
    assert check_onnx(det, out, images) < 1e-3
    assert check_onnx(det, out, images[:1]) < 1e-3  # the batch axis is dynamic


@pytest.mark.slow
@pytest.mark.parametrize("method", ["flow", "combined", *BASELINES])  # the whole registry
def test_every_method_is_an_exportable_detector_on_real_weights(real, tmp_path, method):
    """For every registered method on real DINOv2 features: `sanf eval` / `sanf baseline` scores == `sanf score`
    of the same image files == the TorchScript export == the ONNX export (one module behind all four)."""
    from sanf_pipeline import Detector
    from sanf_pipeline.detect.export import run_onnx
    from sanf_pipeline.jobs.api import baseline_run

    if method in ("flow", "combined"):
        fit = {"val_fraction": 1 / 3, "patch_score": "patch-knn" if method == "combined" else "none"}
        run = _fit_eval(real["cache"], tmp_path / "run", "airplane", **fit)
        kind = "combined" if method == "combined" else "nll"
    else:
        run = tmp_path / "run"
        baseline_run(real["cache"], "airplane", method, run, plots=False, quiet=True, device="cpu")
        kind = method
    env = {"SANF_WEIGHTS_DIR": str(DINOV2_WEIGHTS.parent)}
    out = tmp_path / "s.csv"
    r = sanf("score", "--run", run, real["data"] / "test", "--out", out, "--device", "cpu", "--num-workers", "0",
             "--quiet", env=env)
    assert r.exit_code == 0, r.output
    rows = read_csv(out)
    want = _eval_scores(run, real["data"])
    assert len(rows) == len(want) == 24
    scored = np.array([float(rows[p]["score"]) for p in want])
    np.testing.assert_allclose(scored, list(want.values()), rtol=1e-4, atol=1e-5)
    det = Detector.load(run, device="cpu", weights_dir=DINOV2_WEIGHTS.parent)
    assert det.score_kind == kind
    images = torch.stack([det.preprocess(im) for im in _real_images(real["data"])])
    with torch.no_grad():
        eager = det.model(images).double().numpy()
    ts, onnx = tmp_path / "m.pt", tmp_path / "m.onnx"
    for fmt, path in (("torchscript", ts), ("onnx", onnx)):
        r = sanf("export", "--run", run, "--format", fmt, "--out", path, env=env)
        assert r.exit_code == 0, r.output
    with torch.no_grad():
        got = torch.jit.load(str(ts))(images)  # (scores, maps) for a method with maps
        np.testing.assert_allclose((got[0] if isinstance(got, tuple) else got).numpy(), eager, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(run_onnx(onnx, images.numpy()), eager, rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(run_onnx(onnx, images[:1].numpy()), eager[:1], rtol=1e-3, atol=1e-4)  # dynamic batch
