"""kNN and Gaussian baselines: against brute-force references, and the shared result-file layout."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.neighbors import NearestNeighbors

from sanf_pipeline.cache.synthetic import write_synthetic_cache
from sanf_pipeline.errors import SanfError
from sanf_pipeline.evaluate.metrics import read_scores_csv
from sanf_pipeline.jobs.api import baseline_run
from sanf_pipeline.models import BASELINES, create_baseline
from sanf_pipeline.models import fit_score as score_baseline


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("c") / "syn", n_classes=3, n_train=40, n_test=20, dim=16,
                                 num_tokens=4, separation=1.0, seed=1)


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(300, 12)) * 3 + 1, rng.normal(size=(2100, 12)) * 3  # > one block of test rows


@pytest.mark.parametrize("l2", [False, True])
def test_knn_matches_sklearn_nearest_neighbors(data, l2):
    train, test = data
    scores = score_baseline("knn-l2" if l2 else "knn", train, test)
    if l2:
        train = train / np.linalg.norm(train, axis=1, keepdims=True)
        test = test / np.linalg.norm(test, axis=1, keepdims=True)
    dist, _ = NearestNeighbors(n_neighbors=2).fit(train).kneighbors(test)
    assert np.allclose(scores, dist.mean(axis=1), atol=1e-9)


def _ledoit_wolf(x: np.ndarray) -> np.ndarray:
    """The Ledoit-Wolf (2004) shrinkage covariance from its definition: S shrunk towards mu*I by
    min(b2, d2) / d2, with d2 = ||S - mu I||^2 and b2 = mean_k ||x_k x_k^T - S||^2 / n (norms / p)."""
    n, p = x.shape
    xc = x - x.mean(axis=0)
    s = xc.T @ xc / n
    mu = np.trace(s) / p
    d2 = ((s - mu * np.eye(p)) ** 2).sum() / p
    b2 = sum(((np.outer(r, r) - s) ** 2).sum() / p for r in xc) / n ** 2
    shrink = min(b2, d2) / d2
    return shrink * mu * np.eye(p) + (1 - shrink) * s


@pytest.mark.parametrize("method", ["gaussian", "gaussian-whiten"])
def test_gaussian_is_the_mahalanobis_distance_to_the_ledoit_wolf_gaussian(data, method):
    train, test = data
    if method == "gaussian-whiten":  # the same on L2-normalised class tokens
        train = train / np.linalg.norm(train, axis=1, keepdims=True)
        test_in = test
        test = test / np.linalg.norm(test, axis=1, keepdims=True)
    else:
        test_in = test
    centred = test - train.mean(axis=0)
    want = np.einsum("ij,jk,ik->i", centred, np.linalg.inv(_ledoit_wolf(train)), centred)
    np.testing.assert_allclose(score_baseline(method, data[0], test_in), want, rtol=1e-8)


def test_registry_and_errors():
    assert set(BASELINES) >= {"knn", "knn-l2", "gaussian"}
    with pytest.raises(SanfError, match="unknown baseline 'svm'.*knn"):
        create_baseline("svm")
    with pytest.raises(SanfError, match="at least 2"):
        score_baseline("knn", np.zeros((1, 3)), np.zeros((2, 3)))


@pytest.mark.parametrize("method", ["knn", "knn-l2", "gaussian"])
def test_baseline_run_separates_and_writes_same_layout(cache, tmp_path, method):
    res = baseline_run(cache, "class2", method, tmp_path / method, plots=method == "knn")
    m = json.loads((tmp_path / method / "metrics.json").read_text())
    for key in ("auroc", "aupr", "tpr_at_5_fpr", "normal_class", "normal_class_name", "n_test", "n_anomalous",
                "score", "method", "epoch_selection"):
        assert key in m, key
    assert m["method"] == method and m["normal_class"] == 2 and m["n_test"] == 60 and m["n_anomalous"] == 40
    assert m["auroc"] > 0.8 and m["auroc"] == res.metrics["auroc"]
    rows = read_scores_csv(tmp_path / method / "scores.csv")
    assert np.allclose(rows["score"], res.scores) and len(rows["sample_id"]) == 60
    assert (tmp_path / method / "report.md").exists()


def test_baseline_refuses_to_replace_other_results(cache, tmp_path):
    baseline_run(cache, 0, "knn", tmp_path / "b", plots=False)
    baseline_run(cache, 0, "knn", tmp_path / "b", plots=False)  # same settings: same numbers, allowed
    with pytest.raises(SanfError, match="earlier results"):
        baseline_run(cache, 0, "gaussian", tmp_path / "b", plots=False)
    assert baseline_run(cache, 0, "gaussian", tmp_path / "b", plots=False, overwrite=True).metrics["method"] == \
        "gaussian"
    with pytest.raises(SanfError, match="unknown class 'zebra'; valid classes are 0=class0"):
        baseline_run(cache, "zebra", "knn", tmp_path / "c")
