"""The combined score (models/combined.py): the patch part is fitted on the flow's own rows, the standardisation comes
from the held-out slice, eval / the detector head / the stacked sweep all compute the same numbers, and
``--patch-score none`` is the paper's flow alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_FLOW
from sklearn.metrics import roc_auc_score

from sanf_pipeline.cache import open_cache
from sanf_pipeline.errors import SanfError
from sanf_pipeline.flow.normalizer import pool_square_grid
from sanf_pipeline.jobs.api import eval_run, fit_run
from sanf_pipeline.jobs.flow import load_run
from sanf_pipeline.models import RUN_SCORES, Combined, PatchKNN, resolve_score, score_arrays
from sanf_pipeline.train.config import FitConfig


def _patch_scores(model, patch):
    return score_arrays(model, np.zeros((len(patch), 0)), patch)["score"]

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py
TINY = {**TINY_FLOW, "max_epochs": 2, "patience": 1}


@pytest.fixture(scope="module")
def cache(three_class_cache):  # tests/conftest.py
    return three_class_cache


@pytest.fixture(scope="module")
def combined_run(cache, tmp_path_factory):
    return fit_run(cache, 1, FitConfig(**TINY), tmp_path_factory.mktemp("r") / "run", quiet=True)


def test_default_run_keeps_a_patch_part_fitted_on_the_flows_own_rows(cache, combined_run):
    cfg = FitConfig(**TINY)
    config = combined_run.config
    part = config["patch_score"]
    assert part["method"] == "patch-knn" and part["settings"]["coreset"] == cfg.patch_coreset
    cal = config["calibration"]
    assert cal["threshold_score"] == "combined" and set(cal["scores"]) >= {"nll", "z2", "patch", "combined"}
    # reference: patch-knn fitted directly on the rows the flow trained on, scoring the rows it held out
    cls, patch = open_cache(cache).split("train").read_class(1)
    tr, va = cfg.held_out_split(len(cls))
    ref = PatchKNN(cfg.patch_coreset, cfg.patch_neighbourhood, seed=cfg.seed).fit(None, patch[tr])
    held_out = _patch_scores(ref, patch[va])
    assert np.allclose(cal["scores"]["patch"], held_out, rtol=1e-6)
    nll = np.asarray(cal["scores"]["nll"])
    assert part["standardise"]["nll"] == pytest.approx([nll.mean(), nll.std(ddof=1)])
    assert part["standardise"]["patch"] == pytest.approx([held_out.mean(), held_out.std(ddof=1)])
    z = (nll - nll.mean()) / nll.std(ddof=1) + (held_out - held_out.mean()) / held_out.std(ddof=1)
    assert np.allclose(cal["scores"]["combined"], z)
    assert np.mean(cal["scores"]["combined"]) == pytest.approx(0.0, abs=1e-9)  # both parts centred on the slice


@pytest.mark.parametrize("kind", ["combined", "patch", "nll"])
def test_eval_scores_equal_the_parts_computed_by_hand(cache, combined_run, kind, tmp_path):
    run = load_run(combined_run.run_dir)
    auto = eval_run(combined_run.run_dir, plots=False, out_dir=tmp_path / "auto")
    assert auto.metrics["score"] == "combined" and auto.metrics["score_requested"] == "auto"
    res = eval_run(combined_run.run_dir, score=kind, plots=False, out_dir=tmp_path / kind)
    nll = eval_run(combined_run.run_dir, score="nll", plots=False, out_dir=tmp_path / "n").scores
    _, tp, labels, _ = open_cache(cache).split("test").read_all()
    patch = _patch_scores(run.patch_score.patch, tp)
    mn, sn, mp, sp = run.patch_score.stats.tolist()
    want = {"combined": (nll - mn) / sn + (patch - mp) / sp, "patch": patch, "nll": nll}[kind]
    assert np.allclose(res.scores, want, rtol=1e-6, atol=1e-6)
    assert res.metrics["score"] == kind
    if kind == "combined":
        assert np.array_equal(res.scores, auto.scores)
        y = labels != 1
        assert res.metrics["auroc_parts"] == pytest.approx({"nll": roc_auc_score(y, nll),
                                                            "patch": roc_auc_score(y, patch)})
        thr = res.metrics["threshold"]
        assert thr["n_calibration"] == len(run.config["calibration"]["scores"]["combined"])


def test_patch_score_none_is_the_flow_alone(cache, tmp_path):
    run = fit_run(cache, 1, FitConfig(**TINY, patch_score="none"), tmp_path / "paper", quiet=True)
    assert run.config["patch_score"] is None
    assert set(run.config["calibration"]["scores"]) == {"nll", "z2"}
    assert "patch_score" not in run.config["settings"]["fit"]  # the paper flow keeps its run id
    res = eval_run(run.run_dir, plots=False)
    assert res.metrics["score"] == "nll"
    with pytest.raises(SanfError, match="no patch score"):
        eval_run(run.run_dir, score="combined", plots=False, out_dir=tmp_path / "x")


def test_resolve_score_names_every_kind():
    assert set(RUN_SCORES) == {"auto", "combined", "nll", "z2", "patch"}
    with_part, without = {"patch_score": {"method": "patch-knn"}}, {"patch_score": None}
    assert resolve_score("auto", with_part) == "combined" and resolve_score("auto", without) == "nll"
    assert resolve_score("z2", with_part) == "z2"
    with pytest.raises(SanfError, match="unknown score"):
        resolve_score("mahalanobis", with_part)


@pytest.mark.parametrize("pool,neigh", [(1, 1), (1, 3), (2, 1), (2, 3)])
def test_patch_knn_pools_as_the_flow_and_traces_like_eager(pool, neigh):
    """A run's patch part pools inside the module (token_pool): equal to patch-knn on pre-pooled tokens; its traced
    graph (the export path: the bank blocked, not the batch) gives the eager numbers for any batch size."""
    rng = np.random.default_rng(0)
    train = rng.normal(size=(12, 16, 8)).astype(np.float32)
    test = rng.normal(size=(11, 16, 8)).astype(np.float32) * 1.5
    p_train = pool_square_grid(train, pool) if pool > 1 else train
    p_test = pool_square_grid(test, pool) if pool > 1 else test
    pooled = PatchKNN(0.5, neigh, token_pool=pool).fit(None, train)
    plain = PatchKNN(0.5, neigh).fit(None, p_train)
    assert torch.equal(pooled.bank, plain.bank)
    want = _patch_scores(plain, p_test)
    assert np.allclose(_patch_scores(pooled, test), want, rtol=1e-6)
    score, evidence = pooled(None, torch.from_numpy(test))
    assert evidence.shape == (11, 4 // pool, 4 // pool)
    assert np.allclose(evidence.amax(dim=(1, 2)).double().numpy(), want, rtol=1e-6)

    class Scores(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, p):
            return self.m(p[:, 0, :], p)[0]

    import sanf_pipeline.models.patchknn as pk

    old, pk.EXPORT_BANK_BLOCK = pk.EXPORT_BANK_BLOCK, 5  # several bank blocks in the graph
    try:
        traced = torch.jit.trace(Scores(pooled), (torch.from_numpy(test[:2]),), check_trace=False)
    finally:
        pk.EXPORT_BANK_BLOCK = old
    assert np.allclose(traced(torch.from_numpy(test)).numpy(), want, rtol=1e-5, atol=1e-6)


def test_patch_part_round_trips_through_the_run_folder(combined_run):
    run = load_run(combined_run.run_dir)
    part = combined_run.result.patch_score
    assert torch.equal(run.patch_score.patch.bank, part.patch.bank)
    assert torch.equal(run.patch_score.stats, part.stats)
    cfg = json.loads((combined_run.run_dir / "config.json").read_text())
    with pytest.raises(SanfError, match="patch score is incomplete"):
        Combined.from_state(run.flow_model, {**cfg["patch_score"], "standardise": {}}, {})


def test_fit_config_checks_the_patch_settings():
    for bad in ({"patch_score": "patchcore"}, {"patch_coreset": 0.0}, {"patch_neighbourhood": 2}):
        with pytest.raises(SanfError):
            FitConfig(**bad).validate()
