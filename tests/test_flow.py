"""Tests of sanf_pipeline.flow: invertibility, exact log-determinant, density, save/load, validation.

Small models (dim 8, 4 tokens, hidden 16) in float64 so the checks are tight and the file runs in seconds.
Every check that could pass trivially at the identity initialisation first gives the FFMs' zero-initialised
last layers random non-zero values.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from sanf_pipeline.flow import FUSION_MODES, SANFlow, log_likelihood, soft_clamp
from sanf_pipeline.flow.fusion import FFM

DIM, TOKENS, HIDDEN, BLOCKS, BATCH = 8, 4, 16, 3, 3
FULL_PATCH_DIM = 6  # "full" configs use tokens narrower than the class feature


def _configs() -> list[dict]:
    out = []
    for main_input in ("semantic", "spatial"):
        for spatial_channels in ("half", "full"):
            for fusion in ("none", "gap", "learnable", "semantic"):
                # heads only matter where there is attention
                for heads in (1, 2) if FUSION_MODES[fusion].uses_attention else (1,):
                    out.append(
                        dict(
                            dim=DIM,
                            patch_dim=DIM if spatial_channels == "half" else FULL_PATCH_DIM,
                            num_tokens=TOKENS,
                            blocks=BLOCKS,
                            fusion=fusion,
                            hidden=HIDDEN,
                            heads=heads,
                            spatial_channels=spatial_channels,
                            main_input=main_input,
                        )
                    )
    # odd width: unequal halves (3 + 4) and an explicit attention width with 3 heads
    out.append(dict(dim=7, patch_dim=7, num_tokens=3, blocks=2, fusion="semantic", hidden=HIDDEN))
    out.append(
        dict(dim=7, patch_dim=5, num_tokens=3, blocks=2, fusion="learnable", hidden=HIDDEN,
             spatial_channels="full", attn_dim=6, heads=3)
    )  # fmt: skip
    return out


CONFIGS = _configs()


def _id(cfg: dict) -> str:
    parts = [cfg.get("main_input", "semantic"), cfg.get("spatial_channels", "half"), cfg["fusion"]]
    parts.append(f"h{cfg.get('heads', 1)}")
    if cfg["dim"] != DIM:
        parts.append(f"d{cfg['dim']}")
    return "-".join(parts)


def _make(cfg: dict, dtype=torch.float64, seed: int = 0) -> SANFlow:
    torch.manual_seed(seed)  # weight init uses the global RNG; the permutations do not
    return SANFlow(**cfg).to(dtype)


def _ffms(flow: SANFlow) -> list[FFM]:
    return [m for m in flow.modules() if isinstance(m, FFM)]


def _randomize_last_layers(flow: SANFlow, scale: float = 0.4, seed: int = 1) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for ffm in _ffms(flow):
            for p in (ffm.fc.weight, ffm.fc.bias):
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float64) * scale)


def _inputs(flow: SANFlow, dtype=torch.float64, batch: int = BATCH, seed: int = 2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, flow.dim, generator=gen, dtype=torch.float64).to(dtype)
    patch = torch.randn(batch, flow.num_tokens, flow.patch_dim, generator=gen, dtype=torch.float64).to(dtype)
    return x, patch


def _main_and_context(flow: SANFlow, x, patch):
    """What the flow transforms and what conditions it, for either layout."""
    return (x, patch) if flow.main_input == "semantic" else (patch, x)


def _composed_perm(flow: SANFlow) -> torch.Tensor:
    idx = torch.arange(flow.main_dim)
    for perm in flow.permutations:
        idx = idx[perm]
    return idx


# -- soft clamp ----------------------------------------------------------------------------------------------


def test_soft_clamp_bounded_and_linear_near_zero():
    for alpha in (0.5, 2.0, 3.0):
        s = torch.tensor([-1e9, -1e3, -5.0, 5.0, 1e3, 1e9], dtype=torch.float64)
        c = soft_clamp(s, alpha)
        assert torch.all(c.abs() < alpha)
        assert torch.allclose(c.abs()[[0, -1]], torch.full((2,), alpha, dtype=torch.float64), rtol=1e-6)
        small = torch.linspace(-1e-3, 1e-3, 11, dtype=torch.float64)
        # c(s) = (2 alpha / pi) atan(s / alpha) has slope 2/pi at 0 (as in the paper and the official code)
        assert torch.allclose(soft_clamp(small, alpha), small * 2 / math.pi, atol=1e-8)
        grid = torch.linspace(-20, 20, 401, dtype=torch.float64)
        assert torch.all(torch.diff(soft_clamp(grid, alpha)) > 0)  # strictly increasing, so invertible
        assert torch.allclose(soft_clamp(-grid, alpha), -soft_clamp(grid, alpha))
    assert soft_clamp(torch.zeros(3), 2.0).abs().max() == 0
    with pytest.raises(ValueError):
        soft_clamp(torch.zeros(1), 0.0)


# -- invertibility and the log-determinant -------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_inverse_of_forward_is_identity(cfg):
    flow = _make(cfg)
    _randomize_last_layers(flow)
    x, patch = _inputs(flow)
    main, ctx = _main_and_context(flow, x, patch)
    with torch.no_grad():
        z, logdet = flow(x, patch)
        assert z.shape == (BATCH, flow.z_dim) and logdet.shape == (BATCH,)
        assert logdet.abs().min() > 1e-3  # the couplings really scale (not the trivial identity)
        assert not torch.allclose(z, main[..., _composed_perm(flow)].reshape(BATCH, -1), atol=1e-3)
        rec = flow.inverse(z, ctx)
    assert rec.shape == main.shape
    torch.testing.assert_close(rec, main, atol=1e-10, rtol=0)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_logdet_matches_autograd_jacobian(cfg):
    flow = _make(cfg)
    _randomize_last_layers(flow)
    x, patch = _inputs(flow, batch=2)
    with torch.no_grad():
        _, logdet = flow(x, patch)
    for i in range(x.shape[0]):
        if flow.main_input == "semantic":

            def f(v, i=i):
                return flow(v[None], patch[i : i + 1])[0][0]

            point = x[i]
        else:

            def f(v, i=i):
                return flow(x[i : i + 1], v.reshape(1, flow.num_tokens, flow.patch_dim))[0][0]

            point = patch[i].reshape(-1)
        jac = torch.autograd.functional.jacobian(f, point)
        assert jac.shape == (flow.z_dim, flow.z_dim)
        sign, logabsdet = torch.linalg.slogdet(jac)
        assert sign != 0
        torch.testing.assert_close(logdet[i], logabsdet, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("cfg", CONFIGS, ids=_id)
def test_context_enters_only_through_fusion(cfg):
    flow = _make(cfg)
    _randomize_last_layers(flow)
    x, patch = _inputs(flow)
    # move only the conditioning input: the patch tokens (semantic layout) or the class feature (spatial)
    args = (x, patch + 1.0) if flow.main_input == "semantic" else (x + 1.0, patch)
    with torch.no_grad():
        z, _ = flow(x, patch)
        z_other, _ = flow(*args)
    if cfg["fusion"] == "none":
        assert torch.equal(z, z_other)
    else:
        assert (z - z_other).abs().max() > 1e-4


def test_float32_round_trip_and_batch_independence():
    cfg = dict(dim=DIM, patch_dim=DIM, num_tokens=TOKENS, blocks=4, hidden=HIDDEN, heads=2)
    flow = _make(cfg, dtype=torch.float32)
    _randomize_last_layers(flow)
    x, patch = _inputs(flow, dtype=torch.float32, batch=5)
    with torch.no_grad():
        z, logdet = flow(x, patch)
        assert z.dtype == logdet.dtype == torch.float32
        torch.testing.assert_close(flow.inverse(z, patch), x, atol=1e-5, rtol=1e-5)
        z1, logdet1 = flow(x[2:3], patch[2:3])  # a sample's result does not depend on the rest of the batch
    torch.testing.assert_close(z1, z[2:3], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(logdet1, logdet[2:3], atol=1e-6, rtol=1e-6)


def test_autocast_keeps_z_and_logdet_in_float32():
    cfg = dict(dim=DIM, patch_dim=DIM, num_tokens=TOKENS, blocks=2, hidden=HIDDEN, heads=2)
    flow = _make(cfg, dtype=torch.float32)
    _randomize_last_layers(flow, scale=0.1)
    x, patch = _inputs(flow, dtype=torch.float32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        z, logdet = flow(x, patch)
        ll = log_likelihood(z, logdet)
        rec = flow.inverse(z, patch)
    assert z.dtype == logdet.dtype == ll.dtype == torch.float32
    assert torch.isfinite(ll).all()
    torch.testing.assert_close(rec, x, atol=5e-2, rtol=5e-2)
    with torch.no_grad():
        z32, logdet32 = flow(x, patch)
    torch.testing.assert_close(z, z32, atol=0.1, rtol=0.1)


# -- closed-form density when the FFMs output constants ------------------------------------------------------


def _c(v: np.ndarray, alpha: float) -> np.ndarray:
    return (2 * alpha / math.pi) * np.arctan(v / alpha)


def _affine_of_constant_flow(flow: SANFlow) -> tuple[np.ndarray, np.ndarray]:
    """A, b with z_token = A x_token + b, rebuilt from the documented layer structure (METHOD.md sec. 2)."""
    n = flow.main_dim
    d1, d2 = n // 2, n - n // 2
    alpha = flow.config()["clamp"]
    a_mat, b_vec = np.eye(n), np.zeros(n)
    for layer in flow.layers:
        perm = layer.perm.numpy()
        p_mat = np.zeros((n, n))
        p_mat[np.arange(n), perm] = 1.0  # (P x)_i = x_perm[i]
        b1 = layer.ffm1.fc.bias.detach().numpy()  # [s1 (d2), t1 (d2)]
        b2 = layer.ffm2.fc.bias.detach().numpy()  # [s2 (d1), t2 (d1)]
        scale = np.exp(np.concatenate([_c(b2[:d1], alpha), _c(b1[:d2], alpha)]))
        shift = np.concatenate([b2[d1:], b1[d2:]])
        a_mat = np.diag(scale) @ p_mat @ a_mat
        b_vec = scale * (p_mat @ b_vec) + shift
    return a_mat, b_vec


@pytest.mark.parametrize("main_input", ["semantic", "spatial"])
@pytest.mark.parametrize("fusion", sorted(FUSION_MODES))
def test_constant_ffm_gives_closed_form_gaussian_density(fusion, main_input):
    cfg = dict(dim=DIM, patch_dim=DIM, num_tokens=TOKENS, blocks=BLOCKS, fusion=fusion, hidden=HIDDEN,
               main_input=main_input)  # fmt: skip
    flow = _make(cfg)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for ffm in _ffms(flow):
            ffm.fc.weight.zero_()
            ffm.fc.bias.copy_(torch.randn(ffm.fc.bias.shape, generator=gen, dtype=torch.float64))
    x, patch = _inputs(flow, batch=4)
    main, _ = _main_and_context(flow, x, patch)
    with torch.no_grad():
        z, logdet = flow(x, patch)
        ll = log_likelihood(z, logdet)

    a_tok, b_tok = _affine_of_constant_flow(flow)
    reps = 1 if main_input == "semantic" else TOKENS  # the spatial layout applies it to every token
    a_mat = np.kron(np.eye(reps), a_tok)
    b_vec = np.tile(b_tok, reps)
    flat = main.reshape(main.shape[0], -1).numpy()
    np.testing.assert_allclose(z.numpy(), flat @ a_mat.T + b_vec, atol=1e-10)
    # z = A x + b with z ~ N(0, I)  <=>  x ~ N(-A^-1 b, (A^T A)^-1)
    a_t = torch.from_numpy(a_mat)
    mvn = torch.distributions.MultivariateNormal(
        loc=-torch.linalg.solve(a_t, torch.from_numpy(b_vec)), covariance_matrix=torch.linalg.inv(a_t.T @ a_t)
    )
    torch.testing.assert_close(ll, mvn.log_prob(torch.from_numpy(flat)), atol=1e-8, rtol=1e-10)
    torch.testing.assert_close(logdet, torch.full_like(logdet, np.linalg.slogdet(a_mat)[1]))


def test_log_likelihood_formula():
    z = torch.tensor([[0.0, 0.0, 0.0], [1.0, 2.0, -2.0]], dtype=torch.float64)
    logdet = torch.tensor([0.5, -1.0], dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1) + logdet
    torch.testing.assert_close(log_likelihood(z, logdet), ref)
    assert log_likelihood(z.half(), logdet.half()).dtype == torch.float32


# -- initialisation ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cfg", CONFIGS[::3], ids=_id)
def test_zero_init_is_identity_up_to_fixed_permutation(cfg):
    flow = _make(cfg)
    x, patch = _inputs(flow)
    main, ctx = _main_and_context(flow, x, patch)
    with torch.no_grad():
        z, logdet = flow(x, patch)
        rec = flow.inverse(z, ctx)
    # the permutation layers are part of each FLL (METHOD.md sec. 2); the couplings themselves are identity
    expected = main[..., _composed_perm(flow)].reshape(BATCH, -1)
    assert torch.equal(z, expected)
    assert torch.equal(logdet, torch.zeros(BATCH, dtype=torch.float64))
    assert torch.equal(rec, main)


# -- permutations, context channels, save / load -------------------------------------------------------------


def test_half_channels_give_each_ffm_the_matching_patch_channels():
    cfg = dict(dim=DIM, patch_dim=DIM, num_tokens=TOKENS, blocks=BLOCKS, hidden=HIDDEN)
    flow = _make(cfg)
    _randomize_last_layers(flow)
    x, patch = _inputs(flow)
    seen = []
    hooks = [
        ffm.register_forward_hook(lambda m, args, out: seen.append(args[1])) for ffm in _ffms(flow)
    ]  # order of registration = layer order, ffm1 then ffm2 = call order
    with torch.no_grad():
        flow(x, patch)
    for h in hooks:
        h.remove()
    idx, d1 = torch.arange(DIM), DIM // 2
    for k, perm in enumerate(flow.permutations):
        idx = idx[perm]  # channel j of the layer-k input is channel idx[j] of the original x
        torch.testing.assert_close(seen[2 * k], patch[..., idx[:d1]], atol=0, rtol=0)
        torch.testing.assert_close(seen[2 * k + 1], patch[..., idx[d1:]], atol=0, rtol=0)


def test_permutations_come_from_seed_not_global_rng():
    cfg = dict(dim=64, patch_dim=64, num_tokens=2, blocks=4, hidden=8, fusion="none")
    torch.manual_seed(123)
    a = SANFlow(**cfg, seed=5)
    torch.manual_seed(456)
    b = SANFlow(**cfg, seed=5)
    c = SANFlow(**cfg, seed=6)
    for pa, pb in zip(a.permutations, b.permutations, strict=True):
        assert torch.equal(pa, pb)
        assert torch.equal(torch.sort(pa).values, torch.arange(64))
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.permutations, c.permutations, strict=True))
    assert not torch.equal(a.permutations[0], a.permutations[1])  # one permutation per layer


def _pick(**want) -> dict:
    return next(c for c in CONFIGS if all(c.get(k) == v for k, v in want.items()))


@pytest.mark.parametrize(
    "cfg",
    [
        _pick(main_input="semantic", spatial_channels="half", fusion="semantic", heads=2),
        _pick(main_input="spatial", spatial_channels="full", fusion="learnable", heads=2),
    ],
    ids=_id,
)
def test_save_load_safetensors_round_trip(cfg, tmp_path):
    flow = _make(cfg, dtype=torch.float32)
    _randomize_last_layers(flow)
    path = tmp_path / "model.safetensors"
    save_file(flow.state_dict(), str(path))
    state = load_file(str(path))
    assert all(f"layers.{k}.perm" in state for k in range(cfg["blocks"]))

    config = json.loads(json.dumps(flow.config()))
    assert SANFlow(**config).config() == flow.config()
    other = SANFlow(**{**config, "seed": config["seed"] + 1})
    assert any(not torch.equal(p, q) for p, q in zip(flow.permutations, other.permutations, strict=True))
    other.load_state_dict(state)
    for p, q in zip(flow.permutations, other.permutations, strict=True):
        assert torch.equal(p, q)
    x, patch = _inputs(flow, dtype=torch.float32)
    with torch.no_grad():
        z, logdet = flow(x, patch)
        z2, logdet2 = other(x, patch)
    assert torch.equal(z, z2) and torch.equal(logdet, logdet2)


def test_config_is_json_and_rebuilds():
    flow = SANFlow(8, 6, 4, blocks=2, fusion="gap", clamp=3, hidden=16, spatial_channels="full", seed=7)
    cfg = flow.config()
    assert json.loads(json.dumps(cfg)) == cfg
    assert cfg == dict(dim=8, patch_dim=6, num_tokens=4, blocks=2, fusion="gap", clamp=3.0, hidden=16,
                       heads=1, spatial_channels="full", main_input="semantic", attn_dim=None, seed=7)  # fmt: skip
    clone = SANFlow(**cfg)
    clone.load_state_dict(flow.state_dict())  # same architecture, strict key match


def test_fusion_none_needs_no_context():
    cfg = dict(dim=DIM, patch_dim=DIM, num_tokens=TOKENS, blocks=2, fusion="none", hidden=HIDDEN)
    flow = _make(cfg)
    _randomize_last_layers(flow)
    x, patch = _inputs(flow)
    with torch.no_grad():
        z, logdet = flow(x, patch)
        z0, logdet0 = flow(x)
        assert torch.equal(z, z0) and torch.equal(logdet, logdet0)
        torch.testing.assert_close(flow.inverse(z0), x, atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="patch"):
        _make({**cfg, "fusion": "semantic"})(x)


# -- validation ----------------------------------------------------------------------------------------------

BASE = dict(dim=8, patch_dim=8, num_tokens=4, hidden=16)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(fusion="cross"), "unknown fusion"),
        (dict(heads=3), "heads=3 must divide"),
        (dict(heads=3, spatial_channels="full", patch_dim=8), "heads=3 must divide"),
        (dict(heads=2, attn_dim=5, spatial_channels="full"), "heads=2 must divide"),
        (dict(patch_dim=6), "patch_dim must equal dim"),
        (dict(patch_dim=6, main_input="spatial"), "patch_dim must equal dim"),
        (dict(spatial_channels="quarter"), "spatial_channels"),
        (dict(main_input="both"), "main_input"),
        (dict(clamp=0.0), "clamp"),
        (dict(clamp=float("inf")), "clamp"),
        (dict(blocks=0), "blocks"),
        (dict(dim=1, patch_dim=1), "at least 2 channels"),
        (dict(hidden=2.5), "hidden"),
        (dict(seed=-1), "seed"),
    ],
)
def test_bad_configs_raise_value_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SANFlow(**{**BASE, **kwargs})


def test_heads_are_ignored_without_attention():
    """heads=3 does not divide the attention width 4: refused where there is attention; without attention it is
    accepted and changes nothing (the same parameters, initial weights and outputs as heads=1)."""
    x, patch = torch.randn(2, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="heads=3 must divide"):
        SANFlow(**BASE, fusion="semantic", heads=3)
    for fusion in ("gap", "none"):
        torch.manual_seed(0)
        three = SANFlow(**BASE, fusion=fusion, heads=3)
        torch.manual_seed(0)
        one = SANFlow(**BASE, fusion=fusion, heads=1)
        a, b = three.state_dict(), one.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), fusion
        for flow in (three, one):  # away from the identity start, where any two flows agree
            _randomize_last_layers(flow)
        with torch.no_grad():
            (z3, ld3), (z1, ld1) = three(x, patch), one(x, patch)
        assert torch.equal(z3, z1) and torch.equal(ld3, ld1), fusion


def test_bad_input_shapes_raise_value_error():
    flow = SANFlow(**BASE)
    x, patch = torch.randn(2, 8), torch.randn(2, 4, 8)
    with pytest.raises(ValueError, match="patch must have shape"):
        flow(x, patch[:, :3])
    with pytest.raises(ValueError, match="x must have shape"):
        flow(x[:, :6], patch)


def _literal_attention(branch, x, ctx):
    """METHOD.md's single-query attention written out: K, V of every token of m = concat(query, ctx)."""
    lead = x.shape[:-1]
    a, h, dh = branch.attn_dim, branch.heads, branch.head_dim
    query = branch.query_token(x).expand(*lead, a)
    tokens = branch.ctx_proj(ctx).expand(*lead, -1, a)
    m = torch.cat([query.unsqueeze(-2), tokens], dim=-2)  # (..., 1 + T, a)
    q = branch.w_q(query).reshape(*lead, h, 1, dh)
    k = branch.w_k(m).reshape(*lead, -1, h, dh).transpose(-3, -2)
    v = branch.w_v(m).reshape(*lead, -1, h, dh).transpose(-3, -2)
    attn = torch.softmax(q @ k.transpose(-2, -1) / dh ** 0.5, dim=-1)
    return branch.w_o((attn @ v).reshape(*lead, a))


@pytest.mark.parametrize("fusion", ["semantic", "learnable"])
@pytest.mark.parametrize("heads", [1, 3])
@pytest.mark.parametrize("layout", ["semantic", "spatial"])
def test_attention_fusion_equals_the_literal_formula(fusion, heads, layout):
    torch.manual_seed(0)
    branch = FUSION_MODES[fusion](in_dim=6, ctx_dim=12, attn_dim=12, heads=heads).double()
    for p in branch.parameters():  # non-zero biases everywhere, so the bias algebra is exercised
        torch.nn.init.normal_(p)
    if layout == "semantic":  # x (B, d), ctx (B, T, c)
        x, ctx = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 7, 12, dtype=torch.float64)
    else:  # x (B, T, d) per patch token, one broadcast context token per image (B, 1, 1, c)
        x, ctx = torch.randn(5, 7, 6, dtype=torch.float64), torch.randn(5, 1, 1, 12, dtype=torch.float64)
    assert torch.allclose(branch(x, ctx), _literal_attention(branch, x, ctx), atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("fusion", ["none", "semantic"])
def test_token_log_likelihood_sums_to_image_likelihood(fusion):
    cfg = dict(dim=DIM, patch_dim=DIM, num_tokens=TOKENS, blocks=2, hidden=HIDDEN, fusion=fusion,
               main_input="spatial")
    flow = _make(cfg)
    _randomize_last_layers(flow)
    x, patch = _inputs(flow)
    with torch.no_grad():
        per_token = flow.token_log_likelihood(x, patch)
        image = log_likelihood(*flow(x, patch))
        # one token alone: its likelihood does not depend on the image's other tokens
        alone = flow.token_log_likelihood(x, patch[:, 1:2].expand(-1, TOKENS, -1).contiguous())
    assert per_token.shape == (BATCH, TOKENS)
    torch.testing.assert_close(per_token.sum(dim=1), image)
    torch.testing.assert_close(alone[:, 0], per_token[:, 1])
    with pytest.raises(ValueError, match="spatial"):
        _make({**cfg, "main_input": "semantic"}).token_log_likelihood(x, patch)
