"""The stacked trainer: K flows trained together equal K separate ``fit_flow`` runs (weights, held-out NLL,
test NLLs, AUROCs, stopping epochs), in fp32 on CPU, input noise and ``min_epoch_steps`` included; its AMP path;
which runs the sweep stacks together and how many."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_FLOW

from sanf_pipeline.errors import SanfError
from sanf_pipeline.evaluate.metrics import compute_metrics
from sanf_pipeline.flow.score import score_flow
from sanf_pipeline.sweep.stacked import auto_stack_size, parse_stack, plan_stacks, resolve_stack_size, stackable
from sanf_pipeline.train.config import FitConfig
from sanf_pipeline.train.fit import fit_flow
from sanf_pipeline.train.stack import StackMember, fit_stack, score_stack, stack_key

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
    # input noise on the class feature / on the tokens, each flow from its own (seed, epoch) generator
    # (l2+whiten: with l2+standardize one of these flows amplifies float rounding to 1e-4 in its single fit alone,
    # a 1e-7 change of its inputs moving its weights as far)
    "noise-early-stop": dict(fusion="semantic", normalize="l2+whiten", noise=0.1, max_epochs=4, patience=2,
                             keep_initial=False),
    "noise-spatial": dict(fusion="gap", main_input="spatial", normalize="l2+standardize", noise=0.2,
                          early_stopping=False, epochs=2),
    # more steps than one pass (54 training rows / 16 = 4): the rows cycle through fresh permutations
    "min-epoch-steps-early-stop": dict(fusion="semantic", normalize="l2+whiten", min_epoch_steps=9, max_epochs=3,
                                       patience=1),
    "min-epoch-steps-noise-fixed": dict(fusion="none", normalize="standardize", min_epoch_steps=6, noise=0.05,
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
    assert any(r.best_epoch > 0 for r in stacked), "at least one kept flow should be a trained one"
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


def test_stack_filter_groups_seeds_only():
    """``stack_key`` + ``plan_stacks``: flows stack when they differ only in seed (and class) and have training sets
    of one size; every other setting, the device and the set size keep them apart."""
    def key(**kw):
        return stack_key(FitConfig(**{**TINY_FLOW, **kw}))

    assert len({key(seed=s) for s in (0, 1, 7, 123)}) == 1
    apart = [key(), key(clamp=3.0), key(lr=1e-3), key(fusion="gap"), key(hidden=32), key(normalize="l2"),
             key(noise=0.1), key(noise=0.2), key(min_epoch_steps=5), key(early_stopping=False, epochs=2),
             key(patience=5), key(keep_initial=False), key(grad_clip=None), key(batch_size=8), key(device="cuda")]
    assert len(set(apart)) == len(apart)
    a, c = key(seed=0), key(seed=1, clamp=3.0)
    # same key, same size: one stack (split at the stack size, in the order given); a size or a key apart: not
    keys, sizes = [a, a, c, a, a, a, c], [60, 60, 60, 54, 60, 60, 60]
    assert plan_stacks(keys, sizes, 3) == [[0, 1, 4], [5], [2, 6], [3]]
    assert plan_stacks(keys, sizes, 1) == [[i] for i in (0, 1, 4, 5, 2, 6, 3)]
    assert plan_stacks(keys, sizes, 100) == [[0, 1, 4, 5], [2, 6], [3]]


def test_stackable_runs(tmp_path):
    """Fresh flow runs stack, input noise and ``min_epoch_steps`` included (the stacked loop honours them);
    baselines and runs with something to resume in their folder do not."""
    from sanf_pipeline.store.run_folder import CHECKPOINT_FILE, MODEL_FILE
    from sanf_pipeline.sweep.plan import FLOW, RunSpec

    def spec(run_id, method=FLOW, **fit):
        return RunSpec(run_id, method, 0, "c0", "s", seed=0,
                       fit=FitConfig(**{**TINY_FLOW, **fit}).to_dict() if method == FLOW else None)

    assert stackable(spec("plain"), tmp_path)
    assert stackable(spec("noisy", noise=0.1, min_epoch_steps=7), tmp_path)
    assert not stackable(spec("knn", method="knn"), tmp_path)
    for i, name in enumerate((CHECKPOINT_FILE, MODEL_FILE)):
        (tmp_path / f"resume{i}").mkdir()
        (tmp_path / f"resume{i}" / name).touch()
        assert not stackable(spec(f"resume{i}"), tmp_path)


def test_stack_size(monkeypatch):
    """``--stack N`` is clipped to the flows there are; ``auto`` is 1 on CPU and on a GPU as many flows as fit in
    ``MEMORY_FRACTION`` of the free memory left after the data."""
    from sanf_pipeline.sweep import stacked

    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert resolve_stack_size("auto", 12, cpu, per_flow_bytes=1) == 1
    assert resolve_stack_size(4, 12, cpu, per_flow_bytes=10**12) == 4  # explicit: no memory check
    assert resolve_stack_size("8", 3, cpu, per_flow_bytes=1) == 3
    assert resolve_stack_size(8, 0, cpu, per_flow_bytes=1) == 1
    asked = []

    def free_memory(device=None):
        asked.append(device)
        return 10_000, 80_000

    monkeypatch.setattr(torch.cuda, "mem_get_info", free_memory)
    assert stacked.MEMORY_FRACTION == 0.8
    assert resolve_stack_size("auto", 50, gpu, per_flow_bytes=1_000) == 8  # 10 000 * 0.8 // 1 000
    assert resolve_stack_size("auto", 50, gpu, per_flow_bytes=1_000, data_bytes=5_000) == 4  # 5 000 * 0.8 // 1 000
    assert resolve_stack_size("auto", 3, gpu, per_flow_bytes=1_000) == 3  # no more than the flows
    assert resolve_stack_size("auto", 50, gpu, per_flow_bytes=1_000, data_bytes=20_000) == 1  # data fill it
    assert resolve_stack_size("auto", 50, gpu, per_flow_bytes=20_000) == 1
    assert asked == [gpu] * 5
    assert resolve_stack_size(6, 50, gpu, per_flow_bytes=10**12) == 6 and len(asked) == 5


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


@pytest.fixture
def amp_on_cpu(monkeypatch):
    """``use(dtype)``: CPU gets the autocast policy of a GPU (``cfg.amp`` -> ``dtype``; on CPU it is full
    precision), so the AMP path of both trainers runs here: CPU autocast supports bfloat16 and float16, and a
    float16 fit gets a CPU GradScaler."""
    import sanf_pipeline.device as device

    real = device.precision_dtype

    def use(dtype):
        monkeypatch.setattr(device, "precision_dtype",
                            lambda p, d: dtype if p == "auto" and d.type == "cpu" else real(p, d))

    return use


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16-scaler"])
def test_stack_amp_path_follows_the_single_fit(dtype, amp_on_cpu, monkeypatch, one_torch_thread):
    """Under autocast the stack takes the single fit's path (the same autocast, and for float16 one GradScaler
    unscaling before the clip each step). The half-precision kernels of a batched and a single flow round
    differently, so the weights agree to half precision, not to float32 rounding."""
    from sanf_pipeline.train.loop import epoch_steps, make_scaler

    blocks, *_ = _blocks(seed=3)
    settings = {**TINY_FLOW, "fusion": "semantic", "normalize": "l2+standardize", "early_stopping": False,
                "epochs": 2}
    members = [StackMember(FitConfig(**settings, seed=s), *blocks[0], data_key=0) for s in (0, 3)]
    full = [fit_flow(m.cls, m.patch, m.cfg) for m in members]  # cfg.amp on CPU: full precision
    amp_on_cpu(dtype)
    scaler = make_scaler(torch.device("cpu"), dtype)
    assert (scaler is not None) == (dtype == torch.float16)  # bf16 has float32's range: no loss scaling
    unscaled = []
    real_unscale = torch.amp.GradScaler.unscale_

    def counting(self, opt):
        unscaled.append(self.get_scale())
        return real_unscale(self, opt)

    monkeypatch.setattr(torch.amp.GradScaler, "unscale_", counting)
    stacked = fit_stack(members)
    refs = [fit_flow(m.cls, m.patch, m.cfg) for m in members]
    steps = epoch_steps(stacked[0].n_train, members[0].cfg) * 2
    assert len(unscaled) == (3 * steps if dtype == torch.float16 else 0)  # the stack's one scaler + 2 single fits
    for r, ref, f32 in zip(stacked, refs, full, strict=True):
        assert not isinstance(r, SanfError), r
        sd, rsd, fsd = r.model.state_dict(), ref.model.state_dict(), f32.model.state_dict()
        assert max((rsd[k].float() - fsd[k].float()).abs().max().item() for k in rsd) > 1e-4  # autocast was on
        for k in sd:
            assert (sd[k].float() - rsd[k].float()).abs().max().item() <= 5e-2, k
        for row, ref_row in zip(r.log, ref.log, strict=True):
            assert abs(row["train_loss"] - ref_row["train_loss"]) <= 1e-4
        np.testing.assert_allclose(r.calibration["scores"]["nll"], ref.calibration["scores"]["nll"], rtol=1e-3)


def test_scaler_step_unscales_before_the_clip_and_skips_overflows(one_torch_thread):
    """The shared step with a GradScaler (the float16 path; a CPU scaler runs its logic here): a finite step equals
    the unscaled one exactly (a power-of-two scale is exact, and the clip sees the true gradient); an overflowing
    gradient skips the step and halves the scale without counting as a divergence, which it is without a scaler."""
    from sanf_pipeline.train.fit import new_flow
    from sanf_pipeline.train.loop import make_optimizer, train_step

    cfg = FitConfig(**TINY_FLOW, grad_clip=1e-3).validate()  # a clip that binds
    gen = torch.Generator().manual_seed(0)
    xb, pb = torch.randn(1, 16, 8, generator=gen), torch.randn(1, 16, 4, 8, generator=gen)

    def setup():
        flow = new_flow(cfg, 8, 8, 4)

        def forward(x, p):
            z, logdet = flow(x[0], p[0])
            return z[None], logdet[None]

        return flow, forward, list(flow.parameters()), make_optimizer(flow.parameters(), cfg)

    def weights(flow):
        return {k: v.clone() for k, v in flow.state_dict().items()}

    plain, fwd_a, params_a, opt_a = setup()
    scaled, fwd_b, params_b, opt_b = setup()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    start = weights(plain)
    for _ in range(3):
        loss_a, bad_a = train_step(fwd_a, params_a, opt_a, None, xb, pb, cfg, None, stacked=False)
        loss_b, bad_b = train_step(fwd_b, params_b, opt_b, scaler, xb, pb, cfg, None, stacked=False)
        assert torch.equal(loss_a, loss_b) and not bad_a.any() and not bad_b.any()
    assert all(torch.equal(v, scaled.state_dict()[k]) for k, v in plain.state_dict().items())
    assert any(not torch.equal(v, start[k]) for k, v in plain.state_dict().items())
    assert scaler.get_scale() == 2.0 ** 12

    hook = params_b[0].register_hook(lambda g: g * float("inf"))  # the scaled gradient overflows
    before = weights(scaled)
    _, bad = train_step(fwd_b, params_b, opt_b, scaler, xb, pb, cfg, None, stacked=False)
    assert not bad.any() and scaler.get_scale() == 2.0 ** 11
    assert all(torch.equal(v, before[k]) for k, v in scaled.state_dict().items())
    hook.remove()

    params_a[0].register_hook(lambda g: g * float("inf"))
    with pytest.raises(SanfError, match="gradient became non-finite"):  # host checks: before the step
        train_step(fwd_a, params_a, opt_a, None, xb, pb, cfg, None, stacked=False,
                   diverged=lambda what: SanfError(what))
    _, bad = train_step(fwd_a, params_a, opt_a, None, xb, pb, cfg, None, stacked=False)
    assert bad.tolist() == [True]  # device checks: kept for the end of the epoch


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
