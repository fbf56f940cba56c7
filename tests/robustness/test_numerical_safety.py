"""Numerical safety: awkward features train without NaN; NaN/Inf inputs are refused; a diverging fit stops
clearly (epoch, step, what to change) and keeps its last good checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_FLOW, three_class_synthetic_cache

from sanf_pipeline.cache import SplitView, open_cache
from sanf_pipeline.errors import SanfError
from sanf_pipeline.flow.score import score_flow
from sanf_pipeline.jobs.api import fit_run
from sanf_pipeline.store.atomic import load_tensors, read_jsonl
from sanf_pipeline.store.run_folder import CHECKPOINT_FILE, LOG_FILE, MODEL_FILE
from sanf_pipeline.train.config import FitConfig
from sanf_pipeline.train.fit import fit_flow

TINY = {**TINY_FLOW, "max_epochs": 3, "patience": 2}

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return three_class_synthetic_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def arrays(cache):
    cls, patch = open_cache(cache).split("train").read_class(0)
    return cls, patch, None, None, None


@pytest.mark.parametrize("kind", ["large", "constant", "duplicated"])
def test_numerically_awkward_features_train(kind):
    rng = np.random.default_rng(0)
    cls = rng.normal(size=(24, 8)).astype(np.float32)
    if kind == "large":
        cls *= 1e6
    elif kind == "constant":
        cls[:] = 3.0
    else:
        cls[12:] = cls[:12]
    res = fit_flow(cls, None, FitConfig(**{**TINY, "fusion": "none", "early_stopping": False, "epochs": 2}))
    assert all(np.isfinite(r["train_loss"]) for r in res.log)
    # the fitted flow scores these rows (and shifted ones) with finite NLLs
    x = res.normalizer.transform_cls(np.concatenate([cls, cls + 1.0]))
    scores = score_flow(res.model, torch.from_numpy(x), None)
    assert scores.shape == (48,) and np.isfinite(scores).all()


def test_nonfinite_input_refused(arrays):
    cls, patch, *_ = arrays
    bad = cls.copy()
    bad[3, 1] = np.nan
    with pytest.raises(SanfError, match="NaN/Inf"):
        fit_flow(bad, patch, FitConfig(**TINY))


def test_nonfinite_cache_features_refused(cache, tmp_path, monkeypatch):
    real = SplitView.read_class

    def poisoned(self, c, patch=True):
        cls, p = real(self, c, patch=patch)
        cls[0, 0] = np.inf
        return cls, p

    monkeypatch.setattr(SplitView, "read_class", poisoned)
    with pytest.raises(SanfError, match="NaN/Inf.*cache verify"):
        fit_run(cache, 0, FitConfig(**TINY), tmp_path / "r", quiet=True)


def _nan_after(monkeypatch, calls: int):
    import sanf_pipeline.flow as flow_pkg

    real = flow_pkg.log_likelihood
    count = {"n": 0}

    def fake(z, logdet):
        count["n"] += 1
        out = real(z, logdet)
        return out * float("nan") if count["n"] > calls else out

    monkeypatch.setattr(flow_pkg, "log_likelihood", fake)


@pytest.mark.parametrize("host_checks", [True, False], ids=["checked-each-step", "checked-per-epoch-as-on-gpu"])
def test_nan_loss_stops_with_epoch_step_and_keeps_checkpoint(cache, tmp_path, monkeypatch, host_checks):
    import sanf_pipeline.train.loop as train

    if not host_checks:  # the GPU's step loop: no host sync per step, the first bad step is reported after the epoch
        monkeypatch.setattr(train, "HOST_CHECK_DEVICES", ())
    cfg = FitConfig(**{**TINY, "early_stopping": False, "epochs": 3,  # 40 rows / 16 = 3 steps per epoch
                       "checkpoint_every": 0})
    _nan_after(monkeypatch, 4)  # epoch 1: 3 steps; epoch 2, step 2 diverges
    with pytest.raises(SanfError) as err:
        fit_run(cache, 0, cfg, tmp_path / "r", quiet=True)
    msg = str(err.value)
    assert "epoch 2, step 2/3" in msg and "epoch 1 is kept" in msg and "--lr" in msg and "\n" not in msg
    assert not (tmp_path / "r" / MODEL_FILE).exists()
    _, meta = load_tensors(tmp_path / "r" / CHECKPOINT_FILE)
    assert meta["epoch"] == 1 and len(read_jsonl(tmp_path / "r" / LOG_FILE)) == 1
