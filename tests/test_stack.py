"""The stacked trainer: K flows trained together equal K separate ``fit_flow`` runs (weights, held-out NLL,
test NLLs, AUROCs, stopping epochs), in fp32 on CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_FLOW

from sanf_pipeline.errors import SanfError
from sanf_pipeline.evaluate import compute_metrics
from sanf_pipeline.fit_config import FitConfig
from sanf_pipeline.scoring import score_flow
from sanf_pipeline.stack import StackMember, fit_stack, score_stack, stack_key
from sanf_pipeline.sweep.stacked import auto_stack_size, parse_stack, plan_stacks
from sanf_pipeline.train import fit_flow

TOL = 1e-5


def _blocks(seed=0, n=60, d=16, t=4):
    """Two classes of synthetic tokens (n rows each) and a test split mixing both."""
    rng = np.random.default_rng(seed)
    out = []
    for c in range(2):
        cls = (rng.normal(size=(n, d)) + c).astype(np.float32)
        patch = (rng.normal(size=(n, t, d)) + 0.5 * c).astype(np.float32)
        out.append((cls, patch))
    test_cls = np.concatenate([rng.normal(size=(20, d)) + c for c in range(2)]).astype(np.float32)
    test_patch = np.concatenate([rng.normal(size=(20, t, d)) + 0.5 * c for c in range(2)]).astype(np.float32)
    labels = np.repeat([0, 1], 20)
    return out, test_cls, test_patch, labels


CONFIGS = {
    "early-stop-semantic": dict(fusion="semantic", normalize="l2+whiten", max_epochs=6, patience=1),
    "fixed-gap": dict(fusion="gap", normalize="l2+standardize", early_stopping=False, epochs=2),
    "fixed-none": dict(fusion="none", normalize="standardize", early_stopping=False, epochs=2),
    "spatial-learnable-pooled": dict(fusion="learnable", main_input="spatial", token_pool=2, normalize="l2",
                                     early_stopping=False, epochs=2),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_stack_equals_separate_runs(name, one_torch_thread):
    blocks, test_cls, test_patch, labels = _blocks()
    settings = {**TINY_FLOW, **CONFIGS[name]}
    # 4 flows: two seeds on each of two classes (different data, held-out slices, batch orders)
    members = [StackMember(FitConfig(**settings, seed=s), *blocks[c], data_key=c) for c in (0, 1) for s in (0, 3)]
    stacked = fit_stack(members)
    assert len(stacked) == 4
    models, norms, ref_scores = [], [], []
    for m, r in zip(members, stacked, strict=True):
        assert not isinstance(r, SanfError), r
        ref = fit_flow(m.cls, m.patch, m.cfg)
        assert r.best_epoch == ref.best_epoch and r.epochs_run == ref.epochs_run
        assert r.stopped_early == ref.stopped_early and (r.n_train, r.n_val) == (ref.n_train, ref.n_val)
        # the held-out normal scores behind the threshold (issue 11), as fit_flow computes them
        assert r.calibration["n"] == ref.calibration["n"] > 0
        np.testing.assert_allclose(r.calibration["scores"]["nll"], ref.calibration["scores"]["nll"], rtol=1e-4)
        assert (r.initial_val_nll is None) == (ref.initial_val_nll is None)  # keep_initial: epoch 0 scored in both
        if ref.initial_val_nll is not None:
            assert abs(r.initial_val_nll - ref.initial_val_nll) <= TOL
        sd, rsd = r.model.state_dict(), ref.model.state_dict()
        assert sd.keys() == rsd.keys()
        for k in sd:
            assert torch.equal(sd[k], rsd[k]) if sd[k].dtype == torch.long else \
                (sd[k] - rsd[k]).abs().max().item() <= TOL, k
        for row, ref_row in zip(r.log, ref.log, strict=True):
            assert abs(row["train_loss"] - ref_row["train_loss"]) <= TOL
            if ref_row["val_nll"] is not None:
                assert abs(row["val_nll"] - ref_row["val_nll"]) <= TOL
        models.append(r.model)
        norms.append(r.normalizer)
        # test NLLs and AUROC against the separate run scored as the sweep scores it
        x, p = ref.normalizer.transform(test_cls, test_patch if m.cfg.flow_needs_patch else None)
        ref_scores.append(score_flow(ref.model, torch.from_numpy(x), None if p is None else torch.from_numpy(p)))
    scores = score_stack(models, norms, test_cls, test_patch, device="cpu")
    assert scores.shape == (4, len(test_cls))
    for k in range(4):
        assert np.abs(scores[k] - ref_scores[k]).max() <= TOL
        normal = 0 if k < 2 else 1
        a = compute_metrics(labels != normal, scores[k])["auroc"]
        b = compute_metrics(labels != normal, ref_scores[k])["auroc"]
        assert abs(a - b) <= TOL


def test_stacked_flows_stop_at_their_own_epochs(one_torch_thread):
    blocks, *_ = _blocks(seed=1)
    settings = {**TINY_FLOW, "max_epochs": 8, "patience": 1, "normalize": "l2+standardize"}
    members = [StackMember(FitConfig(**settings, seed=s), *blocks[0], data_key=0) for s in range(4)]
    stacked = fit_stack(members)
    refs = [fit_flow(m.cls, m.patch, m.cfg) for m in members]
    assert [r.epochs_run for r in stacked] == [r.epochs_run for r in refs]
    assert len({r.epochs_run for r in refs}) > 1, "the seeds should stop at different epochs for this test"


def test_stack_refuses_mixed_settings():
    blocks, *_ = _blocks()
    members = [StackMember(FitConfig(**TINY_FLOW), *blocks[0]),
               StackMember(FitConfig(**{**TINY_FLOW, "clamp": 3.0}), *blocks[0])]
    with pytest.raises(SanfError, match="differ only in seed"):
        fit_stack(members)


def test_stack_planning():
    a, b = stack_key(FitConfig(seed=0)), stack_key(FitConfig(seed=5))
    assert a == b != stack_key(FitConfig(clamp=3.0))
    assert plan_stacks([a, a, b, "x", a], [10, 10, 10, 10, 12], 2) == [[0, 1], [2], [3], [4]]
    assert parse_stack("auto") == "auto" and parse_stack("3") == 3
    with pytest.raises(SanfError):
        parse_stack("0")
    assert auto_stack_size(30, 10, 1000) == 30
    assert auto_stack_size(30, 100, 1000) == 8
    assert auto_stack_size(30, 10_000, 1000) == 1


def test_a_diverging_flow_leaves_the_stack_and_the_others_finish(monkeypatch, one_torch_thread):
    import sanf_pipeline.flow as flow_pkg

    real, calls = flow_pkg.log_likelihood, {"n": 0}

    def nan_in_flow_0(z, logdet):  # the stacked call sees (K, b): poison flow 0 from its 5th step on
        out = real(z, logdet)
        calls["n"] += 1
        if out.dim() == 2 and calls["n"] >= 5 and out.shape[0] == 3:
            out = torch.cat([out[:1] * float("nan"), out[1:]])
        return out

    blocks, *_ = _blocks(seed=2)
    settings = {**TINY_FLOW, "early_stopping": False, "epochs": 3}  # 60 rows / 16 = 4 steps per epoch
    members = [StackMember(FitConfig(**settings, seed=s), *blocks[0], data_key=0) for s in range(3)]
    monkeypatch.setattr(flow_pkg, "log_likelihood", nan_in_flow_0)
    stacked = fit_stack(members)
    monkeypatch.setattr(flow_pkg, "log_likelihood", real)
    assert isinstance(stacked[0], SanfError) and "epoch 2, step 1/4" in str(stacked[0])
    for m, r in zip(members[1:], stacked[1:], strict=True):
        ref = fit_flow(m.cls, m.patch, m.cfg)
        assert r.epochs_run == 3
        for k, v in r.model.state_dict().items():
            assert (v.float() - ref.model.state_dict()[k].float()).abs().max().item() <= TOL, k


@pytest.mark.slow
def test_stacked_sweep_equals_the_serial_sweep(tmp_path_factory, one_torch_thread):
    """`sanf sweep --stack 4`: the same run folders, AUROCs and scores (to 1e-5) as one run after the other, early
    stopping included; baselines and the summary unchanged."""
    import csv
    import json

    from conftest import three_class_synthetic_cache

    from sanf_pipeline.sweep import run_sweep

    cache = three_class_synthetic_cache(tmp_path_factory)
    out = tmp_path_factory.mktemp("sw")
    fixed = ["hidden=16", "blocks=2", "batch_size=16", "lr=2e-3", "max_epochs=4", "patience=1"]
    kw = dict(classes="all", grid=["fusion=none,semantic"], methods="flow,gaussian", seeds="0,1", fixed=fixed,
              device="cpu", plots=False)
    serial = run_sweep(cache, out / "serial", workers=1, stack=1, **kw)
    stacked = run_sweep(cache, out / "stacked", stack=4, **kw)
    assert serial.timings["stack_size"] == 1 and stacked.timings["stack_size"] == 4
    assert len(stacked.computed) == len(serial.computed) == 3 * (2 * 2 + 1) and not stacked.failed
    log = [json.loads(line) for line in (out / "stacked" / "sweep_log.jsonl").read_text().splitlines()]
    assert {r.get("stack") for r in log if "-flow-" in r["run_id"]} == {4, 2}  # 6 flows per setting: 4 + 2
    for spec in serial.specs:
        a, b = (out / d / "runs" / spec.run_id for d in ("serial", "stacked"))
        ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
        assert abs(ma["auroc"] - mb["auroc"]) <= TOL and ma.get("best_epoch") == mb.get("best_epoch")
        if spec.is_flow:  # the default flow run has its patch part in both executors (combined.py)
            assert ma["score"] == mb["score"] == "combined" and abs(ma["auroc_parts"]["patch"] -
                                                                     mb["auroc_parts"]["patch"]) <= TOL
        sa, sb = ([float(r["score"]) for r in csv.DictReader(open(d / "scores.csv"))] for d in (a, b))
        assert np.abs(np.subtract(sa, sb)).max() <= TOL
        assert {p.name for p in a.iterdir()} == {p.name for p in b.iterdir()}
    assert serial.m_auroc.keys() == stacked.m_auroc.keys()
    for k, v in serial.m_auroc.items():
        assert abs(v - stacked.m_auroc[k]) <= TOL
