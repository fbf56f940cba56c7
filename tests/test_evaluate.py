"""Metrics and eval_run's result files. Run/cache mismatches and untrusted run folders: tests/robustness/."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import three_class_synthetic_cache
from sklearn.metrics import average_precision_score, roc_auc_score

from sanf_pipeline.errors import SanfError
from sanf_pipeline.evaluate.metrics import compute_metrics, read_scores_csv
from sanf_pipeline.evaluate.report import markdown_table
from sanf_pipeline.jobs.api import eval_run, fit_run
from sanf_pipeline.train.config import FitConfig

TINY = FitConfig(hidden=16, blocks=2, batch_size=16, lr=2e-3, device="cpu", early_stopping=False, epochs=2)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return three_class_synthetic_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def run_dir(cache, tmp_path_factory):
    return fit_run(cache, "class0", TINY, tmp_path_factory.mktemp("r") / "run", quiet=True).run_dir


# --------------------------------------------------------------------------------------------------- metrics
def test_metrics_match_sklearn_on_hand_made_scores():
    y = np.array([0, 0, 0, 1, 1, 0, 1, 0, 1, 0], bool)
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.3, 0.9, 0.05, 0.5, 0.6])
    m = compute_metrics(y, s)
    assert m["auroc"] == pytest.approx(roc_auc_score(y, s))
    assert m["aupr"] == pytest.approx(average_precision_score(y, s))
    assert (m["n_test"], m["n_anomalous"], m["n_normal"]) == (10, 4, 6)
    # at FPR 0 (threshold above the highest normal score 0.6) the anomalies 0.8 and 0.9 are caught: TPR 2/4
    assert m["tpr_at_5_fpr"] == pytest.approx(0.5)


def test_metrics_perfect_inverted_and_ties():
    y = np.r_[np.zeros(50, bool), np.ones(30, bool)]
    s = np.r_[np.linspace(0, 1, 50), np.linspace(2, 3, 30)]
    perfect = compute_metrics(y, s)
    assert perfect["auroc"] == 1.0 and perfect["aupr"] == pytest.approx(1.0) and perfect["tpr_at_5_fpr"] == 1.0
    inverted = compute_metrics(y, -s)
    assert inverted["auroc"] == 0.0 and inverted["tpr_at_5_fpr"] == 0.0
    assert compute_metrics(y, np.zeros(80))["auroc"] == 0.5


def test_metrics_edge_cases():
    with pytest.raises(SanfError, match="no anomalous"):
        compute_metrics(np.zeros(5, bool), np.arange(5.0))
    with pytest.raises(SanfError, match="no normal"):
        compute_metrics(np.ones(5, bool), np.arange(5.0))
    # non-finite scores count as the most anomalous instead of crashing sklearn
    m = compute_metrics(np.array([0, 0, 1, 1], bool), np.array([0.0, 1.0, np.inf, np.nan]))
    assert m["auroc"] == 1.0


def test_markdown_table():
    table = markdown_table([{"a": 1, "b": 0.123456}, {"a": "x|y", "b": None}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "|---|---|", "| 1 | 0.1235 |", "| x\\|y |  |"]


# -------------------------------------------------------------------------------------------------- eval_run
def test_eval_run_writes_all_result_files(run_dir, cache):
    res = eval_run(run_dir)  # the run's own cache by default
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in ("auroc", "aupr", "tpr_at_5_fpr", "normal_class", "normal_class_name", "n_test", "n_anomalous",
                "score", "method", "epoch_selection"):
        assert key in m, key
    assert m["n_test"] == 60 and m["n_anomalous"] == 40 and m["normal_class"] == 0 and m["score"] == "combined"
    assert "never test AUROC" in m["epoch_selection"] and m["auroc"] > 0.8
    rows = read_scores_csv(run_dir / "scores.csv")
    assert len(rows["sample_id"]) == 60 and rows["is_anomaly"].sum() == 40
    assert np.array_equal(rows["is_anomaly"], rows["label"] != 0)
    assert np.allclose(rows["score"], res.scores)
    for png in ("score_hist.png", "roc.png"):
        assert (run_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (run_dir / "report.md").read_text()
    assert "AUROC" in report and "score_hist.png" in report and "Training log" in report
    # rerunning the same evaluation is allowed and reproduces it exactly
    again = eval_run(run_dir, cache=cache)
    assert np.array_equal(again.scores, res.scores)


def test_eval_z2_needs_other_out_or_overwrite(run_dir, tmp_path):
    eval_run(run_dir, plots=False)
    with pytest.raises(SanfError, match="earlier results.*score 'combined' -> 'z2'"):
        eval_run(run_dir, score="z2")
    res = eval_run(run_dir, score="z2", out_dir=tmp_path / "z2", plots=False)
    assert res.metrics["score"] == "z2" and res.metrics["auroc"] > 0.8
    assert json.loads((run_dir / "metrics.json").read_text())["score"] == "combined"


