"""Anomaly maps (maps/head.py, jobs/maps.py, the detector's maps, `sanf score --maps`, the exported maps): the
geometry of ``MapHead`` (each token's value at its cell's centre, the blur equal to scipy's Gaussian filter, maps back
at the image's own resolution), the held-out evidence every run keeps, eval's localisation section, and maps equal
between the eager detector, `sanf score --maps`, TorchScript and ONNX."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import TINY_FLOW, extract_config

from sanf_pipeline.cli.main import cli
from sanf_pipeline.maps import MapHead, eval_resolution, resize_maps
from sanf_pipeline.maps.head import gaussian_kernel

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sanf(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------ geometry
@pytest.mark.parametrize("grid,size", [((4, 4), (56, 56)), ((7, 7), (224, 224)), ((16, 16), (224, 224)),
                                        ((2, 3), (28, 42))])
def test_each_token_lands_on_its_own_cell(grid, size):
    """A single hot token's unblurred map peaks inside that token's cell of the input, and its value is there."""
    h, w = grid
    head = MapHead(size, sigma=0)
    ch, cw = size[0] // h, size[1] // w
    for i, j in [(0, 0), (h - 1, w - 1), (h // 2, w // 3)]:
        ev = torch.zeros(1, h, w)
        ev[0, i, j] = 1.0
        m = head(ev)[0]
        assert tuple(m.shape) == size
        r, c = divmod(int(torch.argmax(m)), size[1])
        assert i * ch <= r < (i + 1) * ch and j * cw <= c < (j + 1) * cw
    ev = torch.arange(h * w, dtype=torch.float32).reshape(1, h, w)
    m = head(ev)[0]
    for i in range(h):  # at a cell's centre pixels the map is that token's value (between them it interpolates)
        for j in range(w):
            centre = m[i * ch + ch // 2 - 1:i * ch + ch // 2 + 1, j * cw + cw // 2 - 1:j * cw + cw // 2 + 1]
            assert abs(float(centre.mean()) - float(ev[0, i, j])) < 0.5 + 1e-6


def test_blur_is_scipys_gaussian_filter():
    ndimage = pytest.importorskip("scipy.ndimage")
    x = torch.rand(2, 4, 4, generator=torch.Generator().manual_seed(0))
    head = MapHead(56, sigma=4)
    got = head(x).numpy()
    up = MapHead(56, sigma=0)(x).numpy()
    # torch's "reflect" border is scipy's "mirror"; truncate 4 sigma as both PatchCore and anomalib use
    want = np.stack([ndimage.gaussian_filter(u.astype(np.float64), 4, mode="mirror", truncate=4.0) for u in up])
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert len(gaussian_kernel(4)) == 33 and abs(float(gaussian_kernel(4).sum()) - 1) < 1e-6


def test_tiny_inputs_and_sigma_checks():
    from sanf_pipeline.errors import SanfError

    assert tuple(MapHead(8, sigma=4)(torch.rand(3, 2, 2)).shape) == (3, 8, 8)  # kernel wider than the input
    with pytest.raises(SanfError, match="map blur"):
        MapHead(56, sigma=-1)


def test_maps_go_back_to_the_images_own_size_and_eval_resolution_is_capped():
    m = MapHead((56, 56), sigma=0)(torch.rand(1, 4, 4))
    assert tuple(resize_maps(m, (24, 40)).shape) == (1, 24, 40)  # a non-square image
    assert tuple(resize_maps(m, (56, 56)).shape) == (1, 56, 56)
    assert eval_resolution(224) == (224, 224) and eval_resolution((518, 518)) == (256, 256)
    assert eval_resolution((300, 600)) == (128, 256)


# ------------------------------------------------------------------------------------ runs keep evidence
@pytest.fixture(scope="module")
def tiny_runs(folder_dataset, tmp_path_factory):
    """A tiny cache, a patch-knn baseline run and a flow run with its patch part (the combined score)."""
    from sanf_pipeline.extract.job import extract
    from sanf_pipeline.jobs.api import baseline_run, eval_run, fit_run
    from sanf_pipeline.train.config import FitConfig

    root = tmp_path_factory.mktemp("maps")
    cache = root / "cache"
    extract(extract_config(folder_dataset, cache, dtype="float32"))
    baseline_run(cache, "a", "patch-knn", root / "pk", plots=False, quiet=True, device="cpu")
    fit_run(cache, "a", FitConfig(**{**TINY_FLOW, "max_epochs": 1, "val_fraction": 0.5}), root / "flow", quiet=True)
    eval_run(root / "flow", plots=False, device="cpu")
    return {"data": folder_dataset, "cache": cache, "patch-knn": root / "pk", "combined": root / "flow"}


@pytest.mark.parametrize("method", ["patch-knn", "combined"])
def test_runs_keep_held_out_evidence_and_eval_says_why_no_pixel_metrics(tiny_runs, method):
    from sanf_pipeline.detect.detector import load_model

    model, cfg, kind, held_out = load_model(tiny_runs[method])
    assert kind == method and model.has_map
    n_val = len(cfg["calibration"]["scores"][kind])
    assert held_out[kind].shape == (n_val, 4, 4)  # the 56 px tiny ViT's 4x4 grid
    if method == "combined":
        raw = held_out["patch"]
        st = model.stats.numpy()
        np.testing.assert_allclose(held_out["combined"], (raw - st[2]) / st[3], rtol=1e-5, atol=1e-5)
    loc = json.loads((tiny_runs[method] / "metrics.json").read_text())["localisation"]
    assert loc["maps"] and "no ground-truth masks" in loc["pixel_metrics"]
    assert loc["pixel_threshold"]["rule"] == "image-max"


def test_class_token_methods_say_they_give_no_map(tiny_runs, tmp_path):
    from sanf_pipeline.jobs.api import baseline_run

    res = baseline_run(tiny_runs["cache"], "a", "gaussian", tmp_path / "g", plots=False, quiet=True, device="cpu")
    assert res.metrics["localisation"] == {"maps": False,
                                           "reason": "the score has no spatial support (a class-token method)"}
    r = sanf("score", "--run", tmp_path / "g", tiny_runs["data"] / "test", "--maps", tmp_path / "m", "--quiet",
             "--num-workers", "0")
    assert r.exit_code == 2 and "no spatial support" in r.output and not (tmp_path / "m").exists()


# --------------------------------------------------------------------- detector, sanf score --maps, export
@pytest.mark.parametrize("method", ["patch-knn", "combined"])
def test_maps_agree_from_api_to_cli_to_exports(tiny_runs, tmp_path, method):
    pytest.importorskip("onnxruntime")
    from sanf_pipeline import Detector
    from sanf_pipeline.detect.export import export_detector, run_onnx
    from sanf_pipeline.maps.overlay import load_raw_map

    run, data = tiny_runs[method], tiny_runs["data"]
    det = Detector.load(run, device="cpu")
    res = det.score([data / "test"], num_workers=0, maps=True)
    assert res.maps is not None and len(res.maps) == len(res.paths) > 0
    from PIL import Image

    for p, m in zip(res.paths, res.maps, strict=True):
        with Image.open(p) as im:
            assert m.shape == (im.height, im.width) and m.dtype == np.float32
    assert res.pixel_threshold["rule"] == "image-max" and len(res.regions()) == len(res.maps)

    out = tmp_path / "maps"
    r = sanf("score", "--run", run, data / "test", "--maps", out, "--quiet", "--num-workers", "0", "--out",
             tmp_path / "s.csv")
    assert r.exit_code == 0, r.output
    index = json.loads((out / "sanf-maps.json").read_text())
    assert index["complete"] and len(index["images"]) == len(res.paths)
    for row, m in zip(index["images"], res.maps, strict=True):
        np.testing.assert_allclose(load_raw_map(out / row["map"]), m, rtol=1e-5, atol=1e-5)
        with Image.open(out / row["overlay"]) as im:
            assert im.width == m.shape[1] and im.height > m.shape[0]  # the title band above the image
    r = sanf("score", "--run", run, data / "test", "--maps", out, "--quiet", "--num-workers", "0")
    assert r.exit_code == 2 and "--overwrite" in r.output  # an earlier score's maps are kept unless asked
    r = sanf("score", "--run", run, data / "test", "--maps", out, "--quiet", "--num-workers", "0", "--overwrite")
    assert r.exit_code == 0, r.output

    images = torch.stack([det.preprocess(np.asarray(Image.open(p).convert("RGB"))) for p in res.paths[:3]])
    eager_s, eager_m = det.score_tensor(images, maps=True)
    for fmt in ("torchscript", "onnx"):
        path = tmp_path / f"m.{fmt}"
        meta = export_detector(det, path, fmt)
        assert meta["outputs"]["maps"]["shape"] == ["batch", 56, 56] and meta["maps"]["pixel_threshold"]
        if fmt == "onnx":
            got_s, got_m = run_onnx(path, images.numpy(), maps=True)
            one_s, one_m = run_onnx(path, images[:1].numpy(), maps=True)  # the batch axis is dynamic
            np.testing.assert_allclose(one_m, eager_m[:1], atol=1e-3 * np.ptp(eager_m))
        else:
            with torch.no_grad():
                got_s, got_m = (t.numpy() for t in torch.jit.load(str(path))(images))
        if fmt == "torchscript" or method == "patch-knn":
            # ONNX's NLL of this 1-epoch tiny flow differs by ~0.3%, which the combined score's small held-out std
            # magnifies; tests/test_detector.py checks ONNX scores of real runs, the maps here have no flow part
            np.testing.assert_allclose(got_s, eager_s, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(got_m, eager_m, atol=1e-3 * np.ptp(eager_m))
        full = resize_maps(torch.from_numpy(got_m), res.maps[0].shape)[0].numpy()  # what `sanf score --maps` wrote
        np.testing.assert_allclose(full, res.maps[0], atol=1e-3 * np.ptp(res.maps[0]))


def test_in_memory_images_score_like_their_files(tiny_runs):
    from PIL import Image

    from sanf_pipeline import Detector
    from sanf_pipeline.errors import SanfError

    det = Detector.load(tiny_runs["patch-knn"], device="cpu")
    files = det.score([tiny_runs["data"] / "test"], num_workers=0)
    arrays = [np.asarray(Image.open(p).convert("RGB")) for p in files.paths[:3]]
    pil = [Image.open(p) for p in files.paths[:3]]
    for given in (arrays, pil):
        got = det.score(given, maps=True)
        np.testing.assert_allclose(got.scores, files.scores[:3], rtol=1e-6)
        assert got.paths == ["<image 0>", "<image 1>", "<image 2>"] and got.maps[0].shape == arrays[0].shape[:2]
    bad = det.score([np.zeros((4, 4, 3), np.float32)])
    assert not bad.paths and "uint8" in bad.skipped[0]["reason"]
    with pytest.raises(SanfError, match="not both"):
        det.score([arrays[0], files.paths[0]])


def test_maps_folder_of_the_user_is_refused(tiny_runs, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    r = sanf("score", "--run", tiny_runs["patch-knn"], tiny_runs["data"] / "test", "--maps", folder, "--quiet",
             "--overwrite", "--num-workers", "0")
    assert r.exit_code == 2 and "did not write" in r.output
    assert sorted(p.name for p in folder.iterdir()) == ["notes.txt"]
