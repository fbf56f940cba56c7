"""patch-knn: neighbourhood averaging, greedy coreset and blocked nearest distances against brute-force numpy
references; scorer exactness, chunking invariance; registry, `sanf baseline` and sweep integration."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from sanf_pipeline.cache.synthetic import write_synthetic_cache
from sanf_pipeline.cli.main import cli
from sanf_pipeline.errors import SanfError
from sanf_pipeline.jobs.api import baseline_run
from sanf_pipeline.models import BASELINES, fit_score, needs_patch, score_arrays
from sanf_pipeline.models.patchknn import (
    PatchKNN,
    greedy_coreset,
    nearest_distances,
    neighbourhood_average,
)


def _score(model: PatchKNN, patch: np.ndarray) -> np.ndarray:
    return score_arrays(model, np.zeros((len(patch), 0)), patch)["score"]


def _np_neighbourhood(patch: np.ndarray, k: int) -> np.ndarray:
    n, t, d = patch.shape
    h = int(round(t ** 0.5))
    grid = patch.reshape(n, h, h, d)
    out = np.empty_like(grid)
    r = k // 2
    for i in range(h):
        for j in range(h):
            win = grid[:, max(0, i - r):i + r + 1, max(0, j - r):j + r + 1]
            out[:, i, j] = win.reshape(n, -1, d).mean(1)
    return out.reshape(n, t, d)


def _np_nearest(query: np.ndarray, bank: np.ndarray) -> np.ndarray:
    q, b = query.astype(np.float64), bank.astype(np.float64)
    return np.sqrt(((q[:, None, :] - b[None, :, :]) ** 2).sum(-1).min(1))


def _np_kcenter(x: np.ndarray, m: int, first: int) -> list[int]:
    x = x.astype(np.float64)
    chosen = [first]
    mind = ((x - x[first]) ** 2).sum(1)
    for _ in range(1, m):
        mind[chosen] = -1
        j = int(np.argmax(mind))
        chosen.append(j)
        mind = np.minimum(mind, ((x - x[j]) ** 2).sum(1))
    return chosen


def _np_patch_knn(train: np.ndarray, test: np.ndarray, k: int, bank_idx=None) -> np.ndarray:
    tr = _np_neighbourhood(train, k).reshape(-1, train.shape[2]) if k > 1 else train.reshape(-1, train.shape[2])
    te = _np_neighbourhood(test, k) if k > 1 else test
    bank = tr if bank_idx is None else tr[bank_idx]
    return np.array([_np_nearest(img, bank).max() for img in te])


@pytest.fixture(scope="module")
def patches():
    rng = np.random.default_rng(0)
    train = rng.normal(size=(12, 16, 6)).astype(np.float32)  # 12 images, 4x4 grid, 6 channels
    test = rng.normal(size=(7, 16, 6)).astype(np.float32) * 1.3
    return train, test


@pytest.mark.parametrize("k", [1, 3, 5])
def test_neighbourhood_average_matches_loop(patches, k):
    train, _ = patches
    got = neighbourhood_average(torch.from_numpy(train), k).numpy()
    np.testing.assert_allclose(got, _np_neighbourhood(train, k) if k > 1 else train, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("block_elems", [1, 7, 50, 1 << 24])
def test_nearest_distances_exact_and_chunking_invariant(block_elems):
    rng = np.random.default_rng(1)
    q, b = rng.normal(size=(37, 5)).astype(np.float32), rng.normal(size=(23, 5)).astype(np.float32)
    got = nearest_distances(torch.from_numpy(q), torch.from_numpy(b), block_elems=block_elems).numpy()
    np.testing.assert_allclose(got, _np_nearest(q, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pool", [3, 16, 2048])  # lazy candidate pools smaller than n, and all rows
@pytest.mark.parametrize("fraction", [0.05, 0.3, 0.77])
def test_greedy_coreset_is_k_center_greedy(fraction, pool):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(200, 4)).astype(np.float32)
    idx = greedy_coreset(torch.from_numpy(x), fraction, proj_dim=128, seed=5, pool=pool).numpy()
    m = math.ceil(fraction * 200)
    assert len(idx) == m and len(set(idx.tolist())) == m
    assert idx.tolist() == _np_kcenter(x, m, int(idx[0]))
    again = greedy_coreset(torch.from_numpy(x), fraction, proj_dim=128, seed=5).numpy()
    assert idx.tolist() == again.tolist()


def test_coreset_properties():
    rng = np.random.default_rng(3)
    # 300 tokens near a 4-d subspace of 40-d (the projection to 8 d keeps their geometry), 3 of them far out
    x = rng.normal(size=(300, 4)) @ rng.normal(size=(4, 40)) + 0.05 * rng.normal(size=(300, 40))
    x[[10, 150, 290]] += 30 * rng.normal(size=(3, 40))
    x = torch.from_numpy(x.astype(np.float32))
    assert greedy_coreset(x, 1.0).tolist() == list(range(300))
    # the covering radius (largest distance of any row to the coreset) falls as the coreset grows
    radii = [float(nearest_distances(x, x[greedy_coreset(x, f, proj_dim=8)]).max()) for f in (0.02, 0.1, 0.4)]
    assert radii[0] > radii[1] > radii[2] > 0
    # a greedy coreset keeps the rare far tokens, and covers far better than a random subset of the same size
    assert {10, 150, 290} <= set(greedy_coreset(x, 0.02, proj_dim=8).tolist())
    rand = x[torch.randperm(300, generator=torch.Generator().manual_seed(0))[:30]]
    assert radii[1] < 0.5 * float(nearest_distances(x, rand).max())
    # duplicates: never a row twice, even when all remaining rows are at distance 0
    dup = torch.cat([x[:5]] * 4)
    idx = greedy_coreset(dup, 0.5, proj_dim=None)
    assert len(set(idx.tolist())) == 10 and sorted(set(idx.tolist()) & set(range(5))) != []


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("coreset", [1.0, 0.25])
def test_scorer_equals_bruteforce(patches, k, coreset):
    train, test = patches
    scorer = PatchKNN(coreset=coreset, neighbourhood=k, proj_dim=128).fit(None, train)
    bank_idx = None
    if coreset < 1:
        flat = (_np_neighbourhood(train, k) if k > 1 else train).reshape(-1, 6)
        bank_idx = _np_kcenter(flat, math.ceil(coreset * len(flat)), int(
            greedy_coreset(torch.from_numpy(flat), coreset, seed=0)[0]))
        assert len(scorer.bank) == len(bank_idx)
    np.testing.assert_allclose(_score(scorer, test), _np_patch_knn(train, test, k, bank_idx), rtol=1e-4,
                               atol=1e-5)
    own = _score(scorer, train)
    if coreset == 1.0:  # every training token is in the bank: distance 0
        assert own.max() < 1e-2
    else:  # the largest training score is the coreset's covering radius: no token is farther from the bank
        flat = (_np_neighbourhood(train, k) if k > 1 else train).reshape(-1, 6)
        bank = flat[bank_idx]
        radius = np.sqrt(((flat[:, None, :] - bank[None]) ** 2).sum(-1).min(1)).max()
        np.testing.assert_allclose(own.max(), radius, rtol=1e-4)
        np.testing.assert_allclose(own, _np_patch_knn(train, train, k, bank_idx), rtol=1e-4, atol=1e-5)


def test_scorer_chunking_invariant(patches):
    train, test = patches
    ref = _score(PatchKNN(coreset=0.5).fit(None, train), test)
    small = PatchKNN(coreset=0.5, block_elems=13).fit(None, train)
    got = score_arrays(small, np.zeros((len(test), 0)), test, batch_size=2)["score"]
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


def test_scorer_errors(patches):
    train, test = patches
    with pytest.raises(SanfError, match="odd positive"):
        PatchKNN(neighbourhood=2)
    with pytest.raises(SanfError, match="coreset fraction"):
        PatchKNN(coreset=0.0)
    with pytest.raises(SanfError, match="patch tokens"):
        PatchKNN().fit(train[:, 0], None)
    with pytest.raises(SanfError, match="square patch grid"):
        PatchKNN(neighbourhood=3).fit(None, train[:, :6])
    with pytest.raises(SanfError, match="channels"):
        _score(PatchKNN().fit(None, train), test[:, :, :4])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    # the good class has training images, the defect classes none (an MVTec cache)
    return write_synthetic_cache(tmp_path_factory.mktemp("c") / "syn", n_classes=3, n_train=[40, 0, 0], n_test=20,
                                 dim=16, num_tokens=4, separation=1.0, seed=1,
                                 class_names=["good", "crack", "stain"])


def test_registry_baseline_run_and_cli(cache, tmp_path):
    assert "patch-knn" in BASELINES and needs_patch("patch-knn") and not needs_patch("knn")
    res = baseline_run(cache, "good", "patch-knn", tmp_path / "b", plots=False)
    m = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert m["method"] == "patch-knn" and m["settings"]["bank_size"] == math.ceil(0.1 * 160)
    assert m["auroc"] > 0.8
    from sanf_pipeline.cache import open_cache

    with open_cache(cache) as c:
        tr, trp = c.split("train").read_class(0)
        te, tep, _, _ = c.split("test").read_all()
    np.testing.assert_allclose(res.scores, fit_score("patch-knn", tr, te, trp, tep))
    out = CliRunner().invoke(cli, ["baseline", "--cache", str(cache), "--normal-class", "good", "--method",
                                   "patch-knn", "--out", str(tmp_path / "c")])
    assert out.exit_code == 0, out.output
    np.testing.assert_allclose(json.loads((tmp_path / "c" / "metrics.json").read_text())["auroc"], m["auroc"])


def test_sweep_all_skips_classes_without_training_images(cache, tmp_path, capsys):
    from sanf_pipeline.sweep import plan_sweep, run_sweep

    specs = plan_sweep(cache, "all", None, "knn,patch-knn", "0", None)
    assert {s.class_name for s in specs} == {"good"}
    assert "skipping 2 class(es) without training images: crack, stain" in capsys.readouterr().err
    res = run_sweep(cache, tmp_path / "s", "all", None, "knn,patch-knn", "0", None, plots=False, workers=1)
    summary = json.loads((res.out_dir / "summary.json").read_text())
    assert summary["classes"] == [{"index": 0, "name": "good"}]
    m = json.loads((res.out_dir / "runs" / "good-patch-knn" / "metrics.json").read_text())
    ref = baseline_run(cache, "good", "patch-knn", tmp_path / "b", plots=False)
    assert m["auroc"] == ref.metrics["auroc"]


def test_multi_layer_cache_feeds_fit_and_baselines(folder_dataset, tmp_path):
    """`--layer 0,1` on a tiny ViT: one cache with both blocks concatenated; fit and every baseline read it."""
    from conftest import TINY_FLOW, TINY_VIT, TINY_VIT_KWARGS, extract_args

    from sanf_pipeline.cache import open_cache
    from sanf_pipeline.extract.backbones import create_backbone
    from sanf_pipeline.jobs.api import fit_run
    from sanf_pipeline.train.config import FitConfig

    cache = tmp_path / "multi"
    out = CliRunner().invoke(cli, extract_args(folder_dataset, cache, "--layer", "0,1"))
    assert out.exit_code == 0, out.output
    with open_cache(cache) as c:
        assert c.dim == 2 * TINY_VIT_KWARGS["embed_dim"] and c.backbone["layer"] == [0, 1]
        assert c.backbone["layer_dims"] == [32, 32]
        cls, patch = c.split("train").read_class(0)
    bb = create_backbone(TINY_VIT, weights="random", image_size=56, layer=1, model_kwargs=TINY_VIT_KWARGS)
    assert patch.shape[1:] == (bb.num_tokens, 64)
    run = fit_run(cache, 0, FitConfig(epochs=1, early_stopping=False, seed=0, **TINY_FLOW), tmp_path / "run",
                  quiet=True)
    assert (run.run_dir / "model.safetensors").exists()
    for method in ("gaussian", "patch-knn"):
        res = baseline_run(cache, 0, method, tmp_path / method, plots=False)
        assert np.isfinite(res.scores).all() and len(res.scores) == 15
