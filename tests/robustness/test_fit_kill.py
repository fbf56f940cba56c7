"""SIGKILL a running `sanf fit` at several points; rerunning the same command gives the uninterrupted metrics."""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
from robust_helpers import (  # noqa: F401 (fixtures)
    EPOCHS,
    fit_args,
    log_lines,
    read_metrics,
    sanf,
    small_cache_fixture,
    start_fit,
    wait_for_epochs,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py

METRIC_KEYS = ("auroc", "aupr", "tpr_at_5_fpr", "n_test", "n_normal", "n_anomalous", "n_nonfinite_scores",
               "epochs_run", "best_epoch", "n_train")


def _fit_and_eval(cache, out) -> dict:
    res = sanf(*fit_args(cache, out))
    assert res.exit_code == 0, (res.output, res.exception)
    res = sanf("eval", "--run", out, "--device", "cpu")
    assert res.exit_code == 0, (res.output, res.exception)
    return read_metrics(out)


def _scores(run_dir) -> dict[str, float]:
    with open(Path(run_dir) / "scores.csv", newline="") as fh:
        return {row["sample_id"]: float(row["score"]) for row in csv.DictReader(fh)}


@pytest.fixture(scope="module")
def reference(small_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "run"
    metrics = _fit_and_eval(small_cache, out)
    assert 0.5 < metrics["auroc"] < 1.0, "the reference AUROC should be informative, not saturated"
    return metrics, _scores(out)


@pytest.mark.parametrize("kill_after", [1, 2, 3, 4, 5])
def test_sigkill_then_rerun_matches_uninterrupted(small_cache, tmp_path, reference, kill_after):
    out = tmp_path / "run"
    proc = start_fit(small_cache, out)
    wait_for_epochs(proc, out, kill_after)
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    done = log_lines(out)
    assert kill_after <= done < EPOCHS, f"killed after {done} epochs; the kill point was not mid-training"
    assert not (out / "model.safetensors").exists()
    assert (out / "checkpoint.safetensors").is_file()

    metrics = _fit_and_eval(small_cache, out)  # the same command again, to completion
    ref_metrics, ref_scores = reference
    assert metrics["auroc"] == ref_metrics["auroc"]
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(ref_metrics[key], abs=1e-9, rel=0), key
    scores = _scores(out)
    assert scores.keys() == ref_scores.keys()
    assert max(abs(scores[k] - ref_scores[k]) for k in scores) <= 1e-9
    assert log_lines(out) == EPOCHS
