"""The conditional patch flow: its network is invertible with exact log-determinants (against autograd Jacobians),
one token at a time equals whole images, it learns a density from few images, saves and loads bit for bit, and serves
as a flow run's local part (``--patch-score patch-flow``) with the combination rules."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sanf_pipeline.errors import SanfError
from sanf_pipeline.flow.patch import PatchFlowNet, position_encoding
from sanf_pipeline.models import baseline_tensors, create_baseline, load_baseline, score_arrays
from sanf_pipeline.models.patchflow import PatchFlow

FAST = dict(blocks=2, hidden=16, cond_dim=8, max_epochs=6, patience=2, batch_tokens=64, lr=5e-3)


def _perturbed(net: PatchFlowNet, seed: int = 0) -> PatchFlowNet:
    """The net with every weight random (the zero-initialised last FFM layers make an untrained net the identity,
    which would test nothing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.3)
    return net.double()


@pytest.mark.parametrize("condition", ["class+position", "position"])
def test_inverse_and_log_determinant_against_autograd(condition):
    net = _perturbed(PatchFlowNet(6, 5, (2, 3), blocks=3, hidden=8, cond_dim=4, condition=condition))
    x = torch.randn(4, 6, 6, dtype=torch.float64)
    cls = torch.randn(4, 5, dtype=torch.float64)
    z, logdet = net(x, cls)
    assert torch.allclose(net.inverse(z, cls), x, atol=1e-10)
    for b in range(2):
        for t in range(6):
            def one(v, b=b, t=t):
                xb = x[b:b + 1].clone()
                xb[0, t] = v
                return net(xb, cls[b:b + 1])[0][0, t]

            jac = torch.autograd.functional.jacobian(one, x[b, t])
            assert torch.allclose(torch.linalg.slogdet(jac)[1], logdet[b, t], atol=1e-9)


def test_single_tokens_equal_whole_images_and_positions_matter():
    net = _perturbed(PatchFlowNet(4, 3, (2, 2), blocks=2, hidden=8, cond_dim=4))
    x = torch.randn(3, 4, 4, dtype=torch.float64)
    cls = torch.randn(3, 3, dtype=torch.float64)
    whole = net.token_nll(x, cls)
    img = torch.arange(3).repeat_interleave(4)
    pos = torch.arange(4).repeat(3)
    single = net.token_nll(x.reshape(12, 4), cls[img], pos)
    assert torch.allclose(single.reshape(3, 4), whole, atol=1e-12)
    moved = net.token_nll(x.reshape(12, 4), cls[img], (pos + 1) % 4)
    assert not torch.allclose(moved, single)


def test_untrained_net_is_the_standard_normal():
    net = PatchFlowNet(5, 3, (1, 2), blocks=2, hidden=8, cond_dim=4)
    x = torch.randn(2, 2, 5)
    expected = 0.5 * (x ** 2).sum(-1) + 2.5 * np.log(2 * np.pi)
    assert torch.allclose(net.token_nll(x, torch.randn(2, 3)), expected, atol=1e-5)


def test_position_encoding():
    pe = position_encoding((3, 4), 16)
    assert pe.shape == (12, 16) and pe.dtype == torch.float32
    assert len(torch.unique(pe, dim=0)) == 12  # every position its own code
    assert torch.equal(pe, position_encoding((3, 4), 16))
    assert position_encoding((2, 2), 7).shape == (4, 7)


def _tokens(n, t=16, d=6, seed=0):
    """Patch tokens whose mean depends on the position, and class tokens; float32."""
    rng = np.random.default_rng(seed)
    pos_mean = rng.normal(size=(t, d)) * 2
    patch = pos_mean[None] + rng.normal(size=(n, t, d)) * 0.3
    cls = rng.normal(size=(n, 5))
    return cls.astype(np.float32), patch.astype(np.float32)


def test_it_learns_a_density_and_finds_the_odd_token():
    cls, patch = _tokens(40)
    model = PatchFlow(**FAST).fit(cls, patch)
    assert model.best_epoch >= 1 and min(model.history) < model.history[0] - 1.0  # held-out NLL fell
    tc, tp = _tokens(6, seed=1)
    tp[3, 5] += 4.0  # one anomalous token in image 3
    out = score_arrays(model, tc, tp, maps=True)
    assert out["map"].shape == (6, 4, 4)
    assert int(np.argmax(out["score"])) == 3
    assert int(np.argmax(out["map"][3])) == 5
    assert model.settings()["parameters"] > 0 and model.settings()["epochs_run"] == len(model.history)


def test_top_k_and_the_position_only_condition():
    cls, patch = _tokens(30)
    k3 = PatchFlow(**FAST, top_k=3).fit(cls, patch)
    nll = k3.token_nll(torch.from_numpy(cls[:4]), torch.from_numpy(patch[:4])).double()
    assert torch.allclose(k3.parts(torch.from_numpy(cls[:4]), torch.from_numpy(patch[:4]))["score"],
                          nll.topk(3, dim=1).values.mean(1))
    pos_only = PatchFlow(**FAST, condition="position").fit(cls, patch)
    a = score_arrays(pos_only, cls[:5], patch[:5])["score"]
    b = score_arrays(pos_only, cls[:5] * 0 + 7, patch[:5])["score"]
    assert np.array_equal(a, b)  # the class token is not read


def test_save_and_load_through_the_registry():
    cls, patch = _tokens(30)
    model = create_baseline("patch-flow", **FAST).fit(cls, patch)
    again = load_baseline(model.config(), baseline_tensors(model))
    a = score_arrays(model, cls, patch, maps=True)
    b = score_arrays(again, cls, patch, maps=True)
    assert np.array_equal(a["score"], b["score"]) and np.array_equal(a["map"], b["map"])


def test_errors():
    with pytest.raises(SanfError, match="condition"):
        PatchFlow(condition="nothing")
    with pytest.raises(SanfError, match="takes no options coreset"):
        create_baseline("patch-flow", coreset=0.1)  # options of another method
    with pytest.raises(SanfError, match="at least 3"):
        PatchFlow().fit(*_tokens(2))
    model = PatchFlow(**FAST).fit(*_tokens(20))
    with pytest.raises(SanfError, match="fitted on"):
        model.parts(torch.zeros(1, 5), torch.zeros(1, 16, 7))


def test_a_flow_run_with_the_patch_flow_part(tmp_path):
    """`sanf fit --patch-score patch-flow --combine max`: the run keeps the patch flow beside the class-token flow;
    eval, the reloaded run and the combination rule agree."""
    from sanf_pipeline.cache.synthetic import write_synthetic_cache
    from sanf_pipeline.jobs.api import eval_run, fit_run
    from sanf_pipeline.jobs.flow import load_run
    from sanf_pipeline.train.config import FitConfig

    cache = write_synthetic_cache(tmp_path / "syn", n_classes=2, n_train=40, n_test=12, dim=8, num_tokens=4,
                                  separation=1.0, seed=2)
    cfg = FitConfig(patch_score="patch-flow", combine="max", hidden=16, blocks=2, epochs=1, early_stopping=False,
                    device="cpu")
    fit_run(cache, "class0", cfg, tmp_path / "run", quiet=True)
    res = eval_run(tmp_path / "run", plots=False)
    run = load_run(tmp_path / "run")
    assert run.config["patch_score"]["method"] == "patch-flow" and run.config["patch_score"]["combine"] == "max"
    assert isinstance(run.patch_score.patch, PatchFlow)
    st = run.patch_score.stats.numpy()
    nll, local = res.parts["nll"], res.parts["patch"]
    assert np.allclose(res.scores, np.maximum((nll - st[0]) / st[1], (local - st[2]) / st[3]))
    assert res.metrics["localisation"]["maps"] in (True, False)
