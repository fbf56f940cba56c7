"""SIGKILL a running `sanf fit` at several points; rerunning the same command gives the uninterrupted metrics."""

from __future__ import annotations

import csv
import signal
from pathlib import Path

import pytest
from robust_helpers import (  # noqa: F401 (fixtures)
    EPOCHS,
    fit_args,
    fork_server,
    in_epoch,
    log_lines,
    pause_at,
    read_metrics,
    sanf,
    small_cache_fixture,
    start_sanf,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fork_server")  # tests/conftest.py, robust_helpers.py

METRIC_KEYS = ("auroc", "aupr", "tpr_at_5_fpr", "n_test", "n_normal", "n_anomalous", "n_nonfinite_scores",
               "epochs_run", "best_epoch", "n_train")

# where the fit stands when it is killed, and the epochs its log holds there. In the middle of an epoch the files are
# those of its start (nothing is written until it ends), so "in epoch n" stands for anywhere in it.
KILL_POINTS = {
    **{str(n): (in_epoch(n + 1), n) for n in range(1, EPOCHS)},
    "epoch 3's checkpoint in place, its log not": (
        pause_at("os:replace", at=3, when="after", match="checkpoint.safetensors"), 2),
    "epoch 4's checkpoint written, not in place": (
        pause_at("os:replace", at=4, when="before", match="checkpoint.safetensors"), 3),
}


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


@pytest.mark.parametrize("point, logged", [pytest.param(*case, id=name) for name, case in KILL_POINTS.items()])
def test_sigkill_then_rerun_matches_uninterrupted(small_cache, tmp_path, reference, point, logged):
    out = tmp_path / "run"
    proc = start_sanf(fit_args(small_cache, out), point=point)
    proc.wait_paused()
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL
    assert log_lines(out) == logged, "the fit was not killed where this case means to kill it"
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
    assert not list(out.glob(".*.tmp")), "the killed fit's temporary files were left behind"
