"""Thresholds without anomalies (calibration.py): the conformal order statistic in closed form, rates against
scikit-learn, the F1 optimum against brute force; fit stores the held-out scores; eval reports the threshold; eval
accepts any cache of the run's feature space and names the first differing setting otherwise (compat.py)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_FLOW

from sanf_pipeline.cache.synthetic import write_synthetic_cache
from sanf_pipeline.errors import SanfError
from sanf_pipeline.evaluate.calibration import conformal_threshold, f1_optimal_threshold, percentiles, threshold_metrics
from sanf_pipeline.evaluate.compat import first_difference

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(("n", "fpr", "k"), [(199, 0.01, 198), (99, 0.01, 99), (1000, 0.05, 951), (19, 0.1, 18)])
def test_conformal_rank_closed_form(n, fpr, k):
    rng = np.random.default_rng(n)
    s = rng.permutation(np.arange(1, n + 1, dtype=float))  # sorted value of rank r is r
    t = conformal_threshold(s, fpr)
    assert t["rank"] == k == math.ceil((n + 1) * (1 - fpr)) and t["value"] == k and t["guaranteed"]
    assert t["fpr_bound"] == pytest.approx(1 - k / (n + 1)) and t["fpr_bound"] <= fpr + 1e-12
    assert t["n_calibration"] == n


def test_conformal_too_few_images_says_so():
    t = conformal_threshold([3.0, 1.0, 2.0], 0.01)
    assert not t["guaranteed"] and t["value"] == 3.0 and t["fpr_bound"] == pytest.approx(0.25)
    assert t["min_n_for_target"] == 99
    with pytest.raises(SanfError, match="between 0 and 1"):
        conformal_threshold([1.0], 1.5)
    with pytest.raises(SanfError, match="no finite"):
        conformal_threshold([math.nan], 0.1)


def test_conformal_coverage_by_simulation():
    """Exchangeable normal scores: the realised FPR of the rule averages at most the target."""
    rng = np.random.default_rng(0)
    fprs = []
    for _ in range(400):
        cal, new = rng.normal(size=99), rng.normal(size=2000)
        fprs.append((new > conformal_threshold(cal, 0.05)["value"]).mean())
    assert np.mean(fprs) <= 0.05 + 0.003  # the bound is 1 - 95/100 = 0.05; standard error ~0.0015


def test_threshold_metrics_match_sklearn():
    from sklearn.metrics import confusion_matrix, f1_score, precision_score

    rng = np.random.default_rng(1)
    y = rng.random(300) < 0.3
    s = rng.normal(size=300) + 1.5 * y
    for t in (-1.0, 0.3, 1.2, 9.0):
        m = threshold_metrics(y, s, t)
        pred = s > t
        tn, fp, fn, tp = confusion_matrix(y, pred, labels=[False, True]).ravel()
        assert m["fpr"] == pytest.approx(fp / (fp + tn)) and m["tpr"] == pytest.approx(tp / (tp + fn))
        assert m["f1"] == pytest.approx(f1_score(y, pred, zero_division=0))
        if pred.any():
            assert m["precision"] == pytest.approx(precision_score(y, pred))
        else:
            assert m["precision"] is None and m["n_flagged"] == 0


def test_f1_optimal_is_the_brute_force_optimum():
    from sklearn.metrics import f1_score

    rng = np.random.default_rng(2)
    y = rng.random(200) < 0.4
    s = np.round(rng.normal(size=200) + y, 1)  # ties on purpose
    best = f1_optimal_threshold(y, s)
    brute = max(f1_score(y, s > t) for t in np.concatenate([[-np.inf], np.unique(s)]))
    assert best["f1"] == pytest.approx(brute) and "test set" in best["selected_on"]
    assert f1_score(y, s > best["threshold"]) == pytest.approx(brute)


def test_percentiles_closed_form():
    cal = np.arange(1, 11, dtype=float)
    assert percentiles(cal, [0.5, 1, 5.5, 10, 11, math.nan]).tolist() == [0, 10, 50, 100, 100, 100]


# ----------------------------------------------------------------------------------------------- fit and eval
@pytest.mark.parametrize("early", [True, False])
def test_fit_stores_held_out_scores(early, tmp_path_factory):
    from sanf_pipeline.flow.score import score_flow
    from sanf_pipeline.train.config import FitConfig
    from sanf_pipeline.train.fit import fit_flow

    cache = write_synthetic_cache(tmp_path_factory.mktemp("c") / "s", n_classes=2, n_train=60, n_test=10, dim=8,
                                  num_tokens=4, seed=3)
    from sanf_pipeline.cache import open_cache

    with open_cache(cache) as c:
        cls, patch = c.split("train").read_class(0)
    length = {"max_epochs": 3} if early else {"early_stopping": False, "epochs": 2}
    cfg = FitConfig(**TINY_FLOW, **length, fpr=0.1)
    res = fit_flow(cls, patch, cfg)
    assert res.n_val == 6 and res.n_train == 54  # the same 10% held out with a fixed length
    cal = res.calibration
    va = np.sort(np.random.default_rng(cfg.seed).permutation(60)[:6])
    x, p = res.normalizer.transform(cls[va], patch[va])
    want = score_flow(res.model, torch.from_numpy(x), torch.from_numpy(p), "nll")
    np.testing.assert_allclose(cal["scores"]["nll"], want, rtol=1e-6)
    assert cal["n"] == 6 and cal["threshold"]["value"] == pytest.approx(want.max())  # k = ceil(7 * 0.9) = 7 > 6
    assert not cal["threshold"]["guaranteed"] and cal["target_fpr"] == 0.1


def test_eval_reports_threshold_rates(pets_cache, tmp_path):
    from sanf_pipeline.jobs.api import eval_run, fit_run
    from sanf_pipeline.train.config import FitConfig

    run = fit_run(pets_cache, "dog", FitConfig(**TINY_FLOW, max_epochs=2, fpr=0.2), tmp_path / "r", quiet=True)
    res = eval_run(run.run_dir, plots=False)
    m = json.loads((tmp_path / "r" / "metrics.json").read_text())
    thr = m["threshold"]
    assert thr["n_calibration"] == 4 and thr["target_fpr"] == 0.2
    assert m["score"] == "combined" == run.config["calibration"]["threshold_score"]
    assert thr["value"] == pytest.approx(sorted(run.config["calibration"]["scores"]["combined"])[3])  # ceil(5*.8)=4
    assert thr["realised"] == threshold_metrics(res.is_anomaly, res.scores, thr["value"])
    assert m["f1_optimal_threshold"]["f1"] >= thr["realised"]["f1"]
    report = (tmp_path / "r" / "report.md").read_text()
    assert "calibrated, target FPR 0.2" in report and "**the test set**" in report
    # another target FPR at eval time, from the same stored scores
    m2 = eval_run(run.run_dir, plots=False, fpr=0.5, out_dir=tmp_path / "e2").metrics
    assert m2["threshold"]["rank"] == 3 and m2["threshold"]["target_fpr"] == 0.5


# ------------------------------------------------------------------------------------------ compatible caches
def _ident(**bb):
    base = {"arch": "vit_small_patch14_dinov2", "model_kwargs": {}, "weights": {"sha256": "aa", "source": "file"},
            "image_size": [224, 224], "layer": 8, "pool": 1, "grid": [16, 16]}
    base.update(bb)
    return {"backbone": base, "grid": base["grid"], "dim": 384, "num_tokens": 256, "dtype": "float16"}


@pytest.mark.parametrize(("change", "name"), [
    (dict(arch="tf_efficientnet_lite0"), "backbone architecture"),
    (dict(weights={"sha256": "bb", "source": "file"}), "weights sha256"),
    (dict(image_size=[112, 112]), "image size"),
    (dict(layer=None), "layer"),
    (dict(pool=2), "pooling"),
    (dict(grid=[8, 8]), "token grid"),
])
def test_first_differing_setting_named(change, name):
    assert first_difference(_ident(), _ident(**change))[0] == name
    other = _ident()
    other["dtype"] = "float32"
    assert first_difference(_ident(), other) is None  # the storage dtype may differ


def test_eval_accepts_a_compatible_cache(pets_cache, tmp_path):
    from sanf_pipeline.jobs.api import eval_run, fit_run
    from sanf_pipeline.train.config import FitConfig

    run = fit_run(pets_cache, "dog", FitConfig(**TINY_FLOW, max_epochs=1), tmp_path / "r", quiet=True)
    # other images (another seed), float16 storage, classes in another order: the same feature space
    other = write_synthetic_cache(tmp_path / "line2", n_classes=2, n_train=5, n_test=6, dim=16, num_tokens=4,
                                  seed=7, dtype="float16", class_names=["dog", "cat"])
    res = eval_run(run.run_dir, cache=other, out_dir=tmp_path / "e", plots=False)
    assert res.metrics["normal_class"] == 0 and res.metrics["n_test"] == 12 and res.metrics["n_normal"] == 6
    no_dog = write_synthetic_cache(tmp_path / "nodog", n_classes=2, n_train=5, n_test=6, dim=16, num_tokens=4)
    with pytest.raises(SanfError, match="has no class 'dog'"):
        eval_run(run.run_dir, cache=no_dog, out_dir=tmp_path / "e3", plots=False)


def test_sweep_runs_get_thresholds(pets_cache, tmp_path):
    """Flows and baselines of a sweep go through the same run jobs: both store held-out scores and a threshold."""
    from sanf_pipeline.sweep import run_sweep

    fixed = ["hidden=16", "blocks=2", "batch_size=16", "lr=2e-3", "max_epochs=1"]
    res = run_sweep(pets_cache, tmp_path / "sw", "dog", None, "flow,gaussian", "0", fixed, workers=1, device="cpu",
                    plots=False)
    metrics = sorted((res.out_dir / "runs").glob("*/metrics.json"))
    assert len(metrics) == 2
    for path in metrics:
        m = json.loads(path.read_text())
        assert m["threshold"]["n_calibration"] == 4 and m["f1_optimal_threshold"]["f1"] is not None
        assert json.loads((path.parent / "config.json").read_text())["calibration"]["n"] == 4
