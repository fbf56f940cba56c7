"""Stage two training: normalisation, fit_flow / fit_run, seeds, early stopping, NaN, resume, run folders."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_FLOW, three_class_synthetic_cache

from sanf_pipeline.cache import SplitView, open_cache
from sanf_pipeline.errors import SanfError
from sanf_pipeline.evaluate.metrics import compute_metrics
from sanf_pipeline.flow.normalizer import NORMALIZATIONS, Normalizer, pool_square_grid
from sanf_pipeline.flow.score import score_flow
from sanf_pipeline.jobs.api import eval_run, fit_run
from sanf_pipeline.jobs.flow import load_run
from sanf_pipeline.store.atomic import load_tensors, read_jsonl
from sanf_pipeline.store.run_folder import CHECKPOINT_FILE, CONFIG_FILE, LOG_FILE, MODEL_FILE
from sanf_pipeline.train.config import FitConfig
from sanf_pipeline.train.fit import fit_flow

TINY = {**TINY_FLOW, "max_epochs": 3, "patience": 2}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return three_class_synthetic_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def arrays(cache):
    c = open_cache(cache)
    cls, patch = c.split("train").read_class(0)
    tc, tp, labels, _ = c.split("test").read_all()
    return cls, patch, tc, tp, labels


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _test_auroc(res, tc, tp, labels, normal=0, score="nll"):
    x, p = res.normalizer.transform(tc, tp)
    s = score_flow(res.model, torch.from_numpy(x), torch.from_numpy(p), score)
    return compute_metrics(labels != normal, s)["auroc"]


# ------------------------------------------------------------------------------------------ normalisation
@pytest.mark.parametrize("method", NORMALIZATIONS)
def test_normalizer_roundtrip_and_stats(method):
    rng = np.random.default_rng(0)
    cls = rng.normal(3.0, 5.0, size=(50, 8)).astype(np.float32)
    cls[:, 2] = 7.0  # a constant feature must not produce NaN
    patch = rng.normal(-1.0, 2.0, size=(50, 3, 8)).astype(np.float32)
    norm = Normalizer.fit(method, cls, patch)
    x, p = norm.transform(cls, patch)
    assert x.dtype == np.float32 and p.shape == patch.shape and np.isfinite(x).all() and np.isfinite(p).all()
    if norm.whiten:
        # |x|^2 is the Mahalanobis distance under the Ledoit-Wolf covariance of the L2-normalised features:
        # the identity-initialised flow starts exactly at the Gaussian baseline
        from sklearn.covariance import LedoitWolf

        a = cls / np.linalg.norm(cls, axis=1, keepdims=True)
        lw = LedoitWolf().fit(a)
        assert np.allclose((x.astype(np.float64) ** 2).sum(1), lw.mahalanobis(a), rtol=1e-4)
        assert np.allclose(p.reshape(-1, 8).mean(0), 0, atol=1e-5)
    elif norm.standardize:
        assert np.allclose(x.mean(0), 0, atol=1e-5)
        assert np.allclose(p.reshape(-1, 8).mean(0), 0, atol=1e-5)  # pooled over tokens
        keep = np.arange(8) != 2
        assert np.allclose(x.std(0)[keep], 1, atol=1e-4)
    elif norm.l2:
        assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    again = Normalizer.from_state(norm.config(), norm.state_dict())
    x2, p2 = again.transform(cls, patch)
    assert np.array_equal(x, x2) and np.array_equal(p, p2)


# ---------------------------------------------------------------------------------------------- fit_flow
def test_fit_flow_separates_and_is_seeded(arrays):
    cls, patch, tc, tp, labels = arrays
    cfg = FitConfig(**TINY, seed=3)
    a = fit_flow(cls, patch, cfg)
    b = fit_flow(cls, patch, cfg)
    assert _state_equal(a.model, b.model)  # bit-identical on CPU
    assert [r["train_loss"] for r in a.log] == [r["train_loss"] for r in b.log]
    assert _test_auroc(a, tc, tp, labels) > 0.8
    x, p = a.normalizer.transform(tc, tp)
    sa = score_flow(a.model, torch.from_numpy(x), torch.from_numpy(p))
    sb = score_flow(b.model, torch.from_numpy(x), torch.from_numpy(p))
    assert np.array_equal(sa, sb)
    c = fit_flow(cls, patch, FitConfig(**{**TINY, "seed": 4}))
    assert not _state_equal(a.model, c.model)


def test_fusion_none_needs_no_patch_and_z2_score(arrays):
    cls, _, tc, tp, labels = arrays
    res = fit_flow(cls, None, FitConfig(**TINY, fusion="none"))
    x = res.normalizer.transform_cls(tc)
    s = score_flow(res.model, torch.from_numpy(x), None, "z2")
    assert compute_metrics(labels != 0, s)["auroc"] > 0.8


def test_early_stopping_keeps_best_epoch(arrays):
    cls, patch, *_ = arrays
    cfg = FitConfig(hidden=64, blocks=2, batch_size=8, lr=2e-2, device="cpu", max_epochs=12, patience=2,
                    val_fraction=0.25, seed=0)
    res = fit_flow(cls, patch, cfg)
    vals = [r["val_nll"] for r in res.log]
    assert all(v is not None for v in vals) and res.n_val == 10 and res.n_train == 30
    # epoch 0 is the untrained flow (keep_initial), kept only when no trained epoch beats it
    assert res.best_epoch == int(np.argmin([res.initial_val_nll, *vals]))
    assert res.stopped_early and res.epochs_run < cfg.max_epochs  # lr 2e-2 overfits 30 rows within a few epochs
    assert res.epochs_run - res.best_epoch == cfg.patience
    # the returned model is the best epoch's: its held-out NLL is the logged minimum
    order = np.random.default_rng(cfg.seed).permutation(len(cls))
    va = np.sort(order[:res.n_val])
    x, p = res.normalizer.transform(cls[va], patch[va])
    nll = score_flow(res.model, torch.from_numpy(x), torch.from_numpy(p)).mean() / cls.shape[1]
    assert nll == pytest.approx(min(res.initial_val_nll, *vals), rel=1e-5)


def test_stopping_rule():
    """The rule alone: keep the lowest held-out NLL (improving by more than min_delta), stop after patience."""
    import torch

    from sanf_pipeline.train.loop import EarlyStopping

    flow = torch.nn.Linear(2, 2)
    rule = EarlyStopping(enabled=True, patience=2, min_delta=0.1)
    for epoch, val in enumerate([5.0, 4.0, 3.95, 3.0, 3.5, 3.05], start=1):
        assert not rule.stopped
        rule.update(epoch, val, flow)
    assert rule.best_epoch == 4 and rule.best_val == 3.0 and rule.bad_epochs == 2 and rule.stopped
    fixed = EarlyStopping(enabled=False, patience=1, min_delta=0.0)
    for epoch in (1, 2, 3):
        fixed.update(epoch, None, flow)
    assert fixed.best_epoch == 3 and not fixed.stopped and fixed.best_state is None


def test_fixed_epochs_hold_out_the_calibration_slice(arrays):
    """A fixed length trains on 90% and keeps the same 10% as early stopping would, for calibration only."""
    cls, patch, *_ = arrays
    res = fit_flow(cls, patch, FitConfig(**{**TINY, "early_stopping": False, "epochs": 2}))
    assert res.n_train == len(cls) - 4 and res.n_val == 4 and res.epochs_run == 2 and res.best_epoch == 2
    assert all(r["val_nll"] is None for r in res.log) and res.calibration["n"] == 4


def test_bad_settings_refused(arrays):
    cls, patch, *_ = arrays
    with pytest.raises(SanfError, match="fusion"):
        fit_flow(cls, patch, FitConfig(**TINY, fusion="bogus"))
    with pytest.raises(SanfError, match="device"):
        fit_flow(cls, patch, FitConfig(**{**TINY, "device": "tpu"}))


# ----------------------------------------------------------------------------------------------- fit_run
def test_fit_run_writes_run_folder_and_never_reads_test(cache, tmp_path, monkeypatch):
    real_read = SplitView.read

    def guarded(self, *a, **k):
        assert self.name != "test", "fit must not read the test split"
        return real_read(self, *a, **k)

    monkeypatch.setattr(SplitView, "read", guarded)
    monkeypatch.setattr(SplitView, "read_all", lambda self, *a, **k: pytest.fail("fit must not read whole splits"))
    run = fit_run(cache, "class1", FitConfig(**TINY), tmp_path / "run", quiet=True)
    monkeypatch.undo()
    d = run.run_dir
    assert (d / MODEL_FILE).exists() and not (d / CHECKPOINT_FILE).exists()
    config = json.loads((d / CONFIG_FILE).read_text())
    assert config["normal_class"] == 1 and config["normal_class_name"] == "class1"
    assert config["cache"]["fingerprint"] == open_cache(cache).fingerprint
    assert config["fit"]["lr"] == TINY["lr"] and config["fit"]["betas"] == [0.9, 0.999]
    assert config["flow"]["hidden"] == 16 and config["normalizer"]["method"] == "l2+whiten"
    assert "never test AUROC" in config["epoch_selection"]
    log = read_jsonl(d / LOG_FILE)
    assert [r["epoch"] for r in log] == list(range(1, len(log) + 1))
    assert {"train_loss", "val_nll", "samples_per_s", "seconds"} <= set(log[0])
    tensors, meta = load_tensors(d / MODEL_FILE)
    assert meta["run_id"] == config["run_id"] and meta["flow"] == config["flow"]
    assert any(k.startswith("normalizer.") for k in tensors)
    loaded = load_run(d)
    assert _state_equal(loaded.flow, run.result.model)


def test_finished_run_refused_unless_overwrite(cache, tmp_path):
    cfg = FitConfig(**{**TINY, "early_stopping": False, "epochs": 1})
    fit_run(cache, 0, cfg, tmp_path / "r", quiet=True)
    assert fit_run(cache, 0, cfg, tmp_path / "r", quiet=True).already_finished  # the same fit: nothing to do
    with pytest.raises(SanfError, match="already holds a finished run with other settings.*seed.*--overwrite"):
        fit_run(cache, 0, FitConfig(**{**TINY, "early_stopping": False, "epochs": 1, "seed": 5}), tmp_path / "r",
                quiet=True)
    run = fit_run(cache, 0, cfg, tmp_path / "r", quiet=True, overwrite=True)
    assert run.result.epochs_run == 1


def test_foreign_folder_refused(cache, tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "thesis.tex").write_text("precious")
    with pytest.raises(SanfError, match="not a sanf run"):
        fit_run(cache, 0, FitConfig(**TINY), tmp_path / "x", quiet=True)
    assert (tmp_path / "x" / "thesis.tex").read_text() == "precious"


class _Stop(KeyboardInterrupt):
    pass


def _interrupted_after_epoch_2(cache, normal_class: int, cfg: FitConfig, run_dir) -> None:
    """A fit into ``run_dir`` interrupted (as by Ctrl-C) right after its second epoch."""
    def interrupt(epoch, row, model):
        if epoch == 2:
            raise _Stop()

    with pytest.raises(KeyboardInterrupt):
        fit_run(cache, normal_class, cfg, run_dir, quiet=True, callback=interrupt)


@pytest.mark.parametrize("early", [False, True])
def test_resume_after_interrupt_matches_uninterrupted(cache, tmp_path, early):
    cfg = FitConfig(**{**TINY, "early_stopping": early, "epochs": 4, "max_epochs": 4, "patience": 4,
                       "checkpoint_every": 0})
    full = fit_run(cache, 2, cfg, tmp_path / "full", quiet=True)
    _interrupted_after_epoch_2(cache, 2, cfg, tmp_path / "cut")
    assert not (tmp_path / "cut" / MODEL_FILE).exists() and (tmp_path / "cut" / CHECKPOINT_FILE).exists()
    # other settings into the unfinished run are refused, naming what differs
    with pytest.raises(SanfError, match="other settings.*lr"):
        fit_run(cache, 2, FitConfig(**{**TINY, "lr": 1e-4}), tmp_path / "cut", quiet=True)
    resumed = fit_run(cache, 2, cfg, tmp_path / "cut", quiet=True)
    assert resumed.resumed and resumed.result.resumed_from == 2
    assert _state_equal(full.result.model, resumed.result.model)
    strip = [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")} for r in full.result.log]
    assert strip == [{k: v for k, v in r.items() if k not in ("seconds", "samples_per_s")}
                     for r in resumed.result.log]
    a = eval_run(full.run_dir, plots=False).metrics
    b = eval_run(resumed.run_dir, plots=False).metrics
    assert (a["auroc"], a["aupr"], a["tpr_at_5_fpr"]) == (b["auroc"], b["aupr"], b["tpr_at_5_fpr"])


def test_checkpoint_interval_is_measured_in_seconds_since_the_last_checkpoint(cache, tmp_path, monkeypatch):
    import sanf_pipeline.train.fit as train_mod

    cfg = FitConfig(**{**TINY, "early_stopping": False, "epochs": 8, "checkpoint_every": 60})
    full = fit_run(cache, 2, cfg, tmp_path / "full", quiet=True)
    clock = [0.0]
    monkeypatch.setattr(train_mod, "_clock", lambda: clock[0])
    saved: list[int] = []
    real_save = train_mod._Checkpoint.save

    def save(self, epoch, *args):
        saved.append(epoch)
        return real_save(self, epoch, *args)

    monkeypatch.setattr(train_mod._Checkpoint, "save", save)

    def tick(epoch, row, model):  # every epoch takes 25 s; the checkpoint decision comes before this
        assert len(read_jsonl(tmp_path / "cut" / LOG_FILE)) == epoch  # the log is written after every epoch
        clock[0] = 25.0 * epoch
        if epoch == 5 and not stopped:
            stopped.append(epoch)
            raise _Stop()

    stopped: list[int] = []

    with pytest.raises(KeyboardInterrupt) as stop:
        fit_run(cache, 2, cfg, tmp_path / "cut", quiet=True, callback=tick)
    # the decision after epoch e sees 25 (e - 1) s: 75 s >= 60 at epoch 4; the log is one epoch ahead of it
    assert saved == [4]
    assert "checkpoint of epoch 4 is kept" in str(stop.value) and "epochs 5-5 are trained again" in str(stop.value)
    resumed = fit_run(cache, 2, cfg, tmp_path / "cut", quiet=True, callback=tick)
    assert resumed.result.resumed_from == 4 and len(resumed.result.log) == 8
    assert _state_equal(full.result.model, resumed.result.model)
    with pytest.raises(SanfError, match="checkpoint_every"):
        FitConfig(checkpoint_every=-1).validate()
    # not part of a run's identity: another interval resumes the same run
    assert FitConfig(checkpoint_every=0).settings() == FitConfig().settings()


def test_interrupt_before_the_first_checkpoint_keeps_the_log_and_refits_identically(cache, tmp_path):
    cfg = FitConfig(**{**TINY, "early_stopping": False, "epochs": 3, "checkpoint_every": 1e9})
    full = fit_run(cache, 1, cfg, tmp_path / "full", quiet=True)
    _interrupted_after_epoch_2(cache, 1, cfg, tmp_path / "cut")
    assert not (tmp_path / "cut" / CHECKPOINT_FILE).exists() and not (tmp_path / "cut" / MODEL_FILE).exists()
    assert len(read_jsonl(tmp_path / "cut" / LOG_FILE)) == 2  # progress stays visible between checkpoints
    again = fit_run(cache, 1, cfg, tmp_path / "cut", quiet=True)
    assert again.result.resumed_from == 0 and len(again.result.log) == 3
    assert _state_equal(full.result.model, again.result.model)


def test_token_pool_averages_square_windows_and_travels_with_the_run():
    patch = np.arange(2 * 16 * 3, dtype=np.float32).reshape(2, 16, 3)  # a 4x4 grid, row-major tokens
    pooled = pool_square_grid(patch, 2)
    grid = patch.reshape(2, 4, 4, 3)
    want = grid.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4)).reshape(2, 4, 3)  # (n, 2, k, 2, k, d) windows
    assert np.allclose(pooled, want)
    norm = Normalizer.fit("l2+standardize", patch[:, 0], patch, token_pool=2)
    assert norm.transform_patch(patch).shape == (2, 4, 3)
    again = Normalizer.from_state(norm.config(), norm.state_dict())
    assert again.token_pool == 2 and np.array_equal(again.transform_patch(patch), norm.transform_patch(patch))
    with pytest.raises(SanfError, match="does not divide"):
        pool_square_grid(patch, 3)
    with pytest.raises(SanfError, match="square"):
        pool_square_grid(patch[:, :12], 2)
    with pytest.raises(SanfError, match="token_pool"):
        FitConfig(token_pool=0).validate()


@pytest.mark.parametrize("over", [
    {"fusion": "gap"},
    {"fusion": "learnable", "heads": 2},
    {"spatial_channels": "full"},
    {"main_input": "spatial"},
    {"normalize": "none", "fusion": "none"},
    {"token_pool": 2},
])
def test_variants_fit_save_load_and_eval(cache, tmp_path, over):
    cfg = FitConfig(**{**TINY, "early_stopping": False, "epochs": 1, **over})
    run = fit_run(cache, 0, cfg, tmp_path / "r", quiet=True)
    flow_keys = {k: v for k, v in over.items() if k not in ("normalize", "token_pool")}
    assert run.config["flow"] == {**run.config["flow"], **flow_keys}
    assert run.config["flow"]["num_tokens"] == (4 // cfg.token_pool ** 2 if cfg.flow_needs_patch else 1)
    res = eval_run(run.run_dir, score="nll", plots=False)
    assert np.isfinite(res.scores).all()
    tc, tp, labels, _ = open_cache(cache).split("test").read_all()
    x, p = run.result.normalizer.transform(tc, tp)
    direct = score_flow(run.result.model, torch.from_numpy(x), torch.from_numpy(p) if cfg.flow_needs_patch else None)
    assert np.allclose(direct, res.scores)  # save -> load reproduces the model and the normaliser
    from sklearn.metrics import roc_auc_score

    assert res.metrics["auroc"] == pytest.approx(roc_auc_score(labels != 0, direct), abs=1e-12)


def test_min_epoch_steps_and_input_noise_are_seeded_and_change_training(arrays):
    cls, patch, *_ = arrays
    base = fit_flow(cls, patch, FitConfig(**TINY))
    longer = FitConfig(**{**TINY, "min_epoch_steps": 7, "noise": 0.2})
    a = fit_flow(cls, patch, longer)
    b = fit_flow(cls, patch, longer)
    assert _state_equal(a.model, b.model)  # the row cycling and the noise come from seeded generators
    assert not _state_equal(a.model, base.model)
    # the old values drop out of the settings, so runs fitted before these fields existed keep their identity
    assert "min_epoch_steps" not in FitConfig().settings() and "noise" not in FitConfig().settings()
    assert longer.settings()["min_epoch_steps"] == 7 and longer.settings()["noise"] == 0.2
    with pytest.raises(SanfError, match="noise"):
        fit_flow(cls, patch, FitConfig(**TINY, noise=-1.0))


def test_min_epoch_steps_counts_optimizer_steps(arrays, monkeypatch):
    cls, patch, *_ = arrays
    steps = []
    real = torch.optim.Adam.step

    def counting(self, *a, **k):
        steps.append(1)
        return real(self, *a, **k)
    monkeypatch.setattr(torch.optim.Adam, "step", counting)
    cfg = FitConfig(**{**TINY, "early_stopping": False, "epochs": 2, "min_epoch_steps": 9})
    fit_flow(cls, patch, cfg)
    assert len(steps) == 2 * max(-(-len(cls) // cfg.batch_size), 9)


@pytest.mark.parametrize("keep_initial", [True, False])
def test_early_stopping_can_keep_the_untrained_flow(keep_initial):
    # Gaussian data: the whitened start is already the true density, so training 30 rows can only over-fit
    rng = np.random.default_rng(0)
    cls, patch = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(40, 4, 8)).astype(np.float32)
    cfg = FitConfig(hidden=64, blocks=2, batch_size=8, lr=2e-2, device="cpu", max_epochs=4, patience=2,
                    val_fraction=0.25, seed=0, keep_initial=keep_initial)
    res = fit_flow(cls, patch, cfg)
    vals = [r["val_nll"] for r in res.log]
    va = np.sort(np.random.default_rng(cfg.seed).permutation(len(cls))[:res.n_val])
    x, p = res.normalizer.transform(cls[va], patch[va])
    nll = score_flow(res.model, torch.from_numpy(x), torch.from_numpy(p)).mean() / cls.shape[1]
    if keep_initial:
        assert res.initial_val_nll < min(vals) and res.best_epoch == 0  # the premise of this test case
        assert nll == pytest.approx(res.initial_val_nll, rel=1e-6)
        assert res.summary()["best_val_nll"] == res.initial_val_nll
        assert "keep_initial" in cfg.settings()
    else:
        assert res.initial_val_nll is None and res.best_epoch == 1 + int(np.argmin(vals))
        assert nll == pytest.approx(min(vals), rel=1e-5)
        assert "keep_initial" not in cfg.settings()  # same identity as runs fitted before the field existed
