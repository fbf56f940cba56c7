"""Tests for sanf_pipeline.extract.backbones on tiny random timm models (no network), plus one real-weights test."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import TINY_TIMM_KWARGS, save_weights, tiny_timm

from sanf_pipeline.errors import SanfError
from sanf_pipeline.extract import backbones as B
from sanf_pipeline.extract.aliases import BACKBONE_ALIASES, list_backbones
from sanf_pipeline.extract.backbones import create_backbone
from sanf_pipeline.extract.preprocess import Preprocess
from sanf_pipeline.extract.weights import file_sha256, resolve_weights
from sanf_pipeline.tokens import pool_tokens

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
DINOV2_FILE = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors"
CIFAR_ZIP = SHARED / "data" / "cifar10-jpg.zip"

VIT = "vit_small_patch14_dinov2"
REG = "vit_small_patch14_reg4_dinov2"
TINY = dict(TINY_TIMM_KWARGS)  # patch 14: 56 px -> 4x4 grid


@pytest.fixture(autouse=True)
def _no_hub(no_hub):
    """No test may reach timm's download (tests/conftest.py); tests that need the hub step patch it themselves."""


def _x(size=56, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g)


# ----------------------------------------------------------------------------------------------------------
# names


def test_aliases_are_timm_pretrained_names():
    rows = list_backbones()
    assert [r["alias"] for r in rows] == list(BACKBONE_ALIASES)
    for r in rows:
        assert r["description"]
        arch, tag = r["model"].split(".", 1)
        assert timm.is_model(arch)
        assert r["model"] in timm.list_pretrained(f"{arch}.*"), r["model"]
    assert BACKBONE_ALIASES["vit_large"].model == "vit_large_patch16_224.augreg_in21k"
    assert BACKBONE_ALIASES["vit_base_384"].model == "vit_base_patch16_384.augreg_in21k_ft_in1k"
    assert B.resolve_name("dinov2_vits14") == ("dinov2_vits14", VIT, "lvd142m")
    assert B.resolve_name(VIT) == (None, VIT, None)


@pytest.mark.parametrize("name", ["no_such_model_xyz", "vit_smal_patch14_dinov2"])
def test_unknown_name_lists_aliases(name):
    with pytest.raises(SanfError) as e:
        create_backbone(name, weights="random")
    assert "vit_large" in str(e.value) and "dinov2_vits14" in str(e.value)


def test_unknown_tag():
    with pytest.raises(SanfError, match="unknown pretrained tag"):
        B.resolve_name(f"{VIT}.not_a_tag")


# ----------------------------------------------------------------------------------------------------------
# ViT tokens


@pytest.mark.parametrize("arch,prefix", [(VIT, 1), (REG, 5)])
def test_vit_shapes_and_prefix_tokens_dropped(arch, prefix):
    bb = create_backbone(arch, weights="random", image_size=56, model_kwargs=TINY)
    assert bb.kind == "vit" and bb.dim == 32 and bb.grid == (4, 4) and bb.num_tokens == 16
    assert bb.num_prefix_tokens == prefix == bb.model.num_prefix_tokens
    x = _x()
    with torch.inference_mode():
        cls, patch = bb(x)
        tokens = bb.model.forward_features(x)
    assert cls.shape == (2, 32) and patch.shape == (2, 16, 32)
    assert tokens.shape[1] == 16 + prefix
    torch.testing.assert_close(cls, tokens[:, 0])
    torch.testing.assert_close(patch, tokens[:, prefix:])
    assert not bb.training and all(not p.requires_grad for p in bb.parameters())
    bb.train()
    assert not bb.training and not bb.model.training


def test_vit_without_class_token_uses_mean_of_patches():
    kw = dict(TINY, class_token=False, global_pool="avg", reg_tokens=2)
    bb = create_backbone(VIT, weights="random", image_size=56, model_kwargs=kw)
    assert not bb.has_class_token and bb.num_prefix_tokens == 2
    with torch.inference_mode():
        cls, patch = bb(_x())
        tokens = bb.model.forward_features(_x())
    torch.testing.assert_close(patch, tokens[:, 2:])
    torch.testing.assert_close(cls, patch.mean(1))
    assert bb.provenance()["cls"] == "mean_of_patch_tokens"


def test_random_weights_are_deterministic_and_recorded():
    a = create_backbone(VIT, weights="random", image_size=56, model_kwargs=TINY)
    b = create_backbone(VIT, weights="none", image_size=56, model_kwargs=TINY)
    with torch.inference_mode():
        torch.testing.assert_close(a(_x()), b(_x()))
    prov = a.provenance()
    assert prov["weights"] == {"source": "random", "file": None, "sha256": None}
    json.dumps(prov)


@pytest.mark.parametrize("layer", [0, 1, -1, -2])
def test_layer_equals_timm_forward_intermediates(tmp_path, layer):
    ref = tiny_timm(REG, seed=3)
    f = save_weights(ref, tmp_path / "w.safetensors")
    bb = create_backbone(REG, weights=f, image_size=56, layer=layer, model_kwargs=TINY)
    n = layer % 3
    assert bb.layer == n and len(bb.model.blocks) == n + 1  # later blocks pruned
    x = _x()
    with torch.inference_mode():
        cls, patch = bb(x)
        (spatial, prefix), = ref.forward_intermediates(
            x, indices=[layer], norm=True, return_prefix_tokens=True, output_fmt="NLC", intermediates_only=True
        )
        full = ref.forward_features(x)
    torch.testing.assert_close(patch, spatial)
    torch.testing.assert_close(cls, prefix[:, 0])
    if n == 2:  # the last block, normalised, is forward_features
        torch.testing.assert_close(patch, full[:, 5:])
    else:
        assert not torch.allclose(patch, full[:, 5:])


@pytest.mark.parametrize("layers", [(0, 2), (2, 0), (-1, 1)])
def test_several_vit_layers_are_concatenated_in_one_pass(tmp_path, layers):
    ref = tiny_timm(REG, seed=3)
    f = save_weights(ref, tmp_path / "w.safetensors")
    bb = create_backbone(REG, weights=f, image_size=56, layer=",".join(map(str, layers)), model_kwargs=TINY)
    want = [n % 3 for n in layers]
    assert bb.layer == want and len(bb.model.blocks) == max(want) + 1
    assert bb.dim == 2 * 32 and bb.provenance()["layer_dims"] == [32, 32]
    x = _x()
    with torch.inference_mode():
        cls, patch = bb(x)
        # one layer at a time: timm returns several in block order, the cache concatenates them in the order given
        outs = [ref.forward_intermediates(x, indices=[i], norm=True, return_prefix_tokens=True, output_fmt="NLC",
                                          intermediates_only=True)[0] for i in want]
    torch.testing.assert_close(patch, torch.cat([p for p, _ in outs], dim=2))
    torch.testing.assert_close(cls, torch.cat([c[:, 0] for _, c in outs], dim=1))


def test_several_cnn_stages_on_the_finest_grid():
    bb = create_backbone("tf_efficientnet_lite0", weights="random", image_size=64, layer=[2, 3])
    assert bb.layer == [2, 3] and bb.layer_dims == [40, 112] and bb.dim == 152 and bb.grid == (8, 8)
    pooled = create_backbone("tf_efficientnet_lite0", weights="random", image_size=64, layer="2,3", pool=2)
    x = _x(64)
    with torch.inference_mode():
        cls, patch = bb(x)
        a, b = bb.model.forward_intermediates(x, indices=[2, 3], intermediates_only=True)
        cls_p, patch_p = pooled(x)
    assert a.shape[2:] == (8, 8) and b.shape[2:] == (4, 4)
    up = F.interpolate(b, size=(8, 8), mode="bilinear", align_corners=False)
    torch.testing.assert_close(patch, torch.cat([a, up], 1).flatten(2).transpose(1, 2))
    torch.testing.assert_close(cls, torch.cat([a.mean((2, 3)), b.mean((2, 3))], 1))
    torch.testing.assert_close(cls_p, cls)
    torch.testing.assert_close(patch_p, pool_tokens(patch, (8, 8), 2))


@pytest.mark.parametrize("value,want", [(None, None), ("8", 8), ("8,11", (8, 11)), ([3], 3), ((2, 3), (2, 3))])
def test_parse_layers(value, want):
    assert B.parse_layers(value) == want


def test_bad_layers():
    with pytest.raises(SanfError, match="integers separated by commas"):
        B.parse_layers("8;11")
    with pytest.raises(SanfError, match="twice"):
        create_backbone(VIT, weights="random", image_size=56, layer="2,-1", model_kwargs=TINY)
    with pytest.raises(SanfError, match="out of range"):
        create_backbone(VIT, weights="random", image_size=56, layer="0,3", model_kwargs=TINY)


def test_layer_out_of_range():
    with pytest.raises(SanfError, match="out of range"):
        create_backbone(VIT, weights="random", image_size=56, layer=3, model_kwargs=TINY)


# ----------------------------------------------------------------------------------------------------------
# pooling


def _reference_pool(patch, grid, k):
    b, n, d = patch.shape
    h, w = grid
    out = torch.empty(b, (h // k) * (w // k), d)
    for i in range(h // k):
        for j in range(w // k):
            idx = [(i * k + a) * w + (j * k + c) for a in range(k) for c in range(k)]
            out[:, i * (w // k) + j] = patch[:, idx].mean(1)
    return out


@pytest.mark.parametrize("grid,k", [((4, 4), 2), ((6, 4), 2), ((6, 6), 3), ((4, 4), 1)])
def test_pool_tokens_matches_transpose_reference(grid, k):
    g = torch.Generator().manual_seed(0)
    patch = torch.randn(2, grid[0] * grid[1], 5, generator=g)  # d != N: a non-symmetric layout
    got = pool_tokens(patch, grid, k)
    torch.testing.assert_close(got, _reference_pool(patch, grid, k))
    if k > 1:
        wrong = F.avg_pool2d(patch.reshape(2, 5, *grid), k).flatten(2).transpose(1, 2)  # official code
        assert wrong.shape == got.shape and not torch.allclose(wrong, got)


def test_pool_not_dividing_grid():
    with pytest.raises(SanfError, match="does not divide"):
        pool_tokens(torch.zeros(1, 16, 3), (4, 4), 3)
    with pytest.raises(SanfError, match="does not divide"):
        create_backbone(VIT, weights="random", image_size=56, pool=3, model_kwargs=TINY)


def test_backbone_pool_equals_pooled_unpooled_tokens():
    a = create_backbone(VIT, weights="random", image_size=56, model_kwargs=TINY)
    b = create_backbone(VIT, weights="random", image_size=56, pool=2, model_kwargs=TINY)
    assert b.grid == (2, 2) and b.num_tokens == 4 and b.raw_grid == (4, 4)
    with torch.inference_mode():
        cls_a, patch_a = a(_x())
        cls_b, patch_b = b(_x())
    torch.testing.assert_close(cls_a, cls_b)
    torch.testing.assert_close(patch_b, _reference_pool(patch_a, (4, 4), 2))


# ----------------------------------------------------------------------------------------------------------
# CNNs


@pytest.mark.parametrize(
    "arch,size,layer,dim,grid",
    [
        ("resnet18", 64, None, 512, (2, 2)),
        ("resnet18", 64, 2, 128, (8, 8)),
        ("tf_efficientnet_lite0", 64, None, 1280, (2, 2)),
    ],
)
def test_cnn_path(arch, size, layer, dim, grid):
    bb = create_backbone(arch, weights="random", image_size=size, layer=layer)
    assert bb.kind == "cnn" and bb.dim == dim and bb.grid == grid and bb.num_tokens == grid[0] * grid[1]
    assert bb.preprocess.size == (size, size)
    x = _x(size)
    with torch.inference_mode():
        cls, patch = bb(x)
        if layer is None:
            fmap = bb.model.forward_features(x)
        else:
            fmap = bb.model.forward_intermediates(x, indices=[layer], intermediates_only=True)[0]
    assert cls.shape == (2, dim) and patch.shape == (2, grid[0] * grid[1], dim)
    torch.testing.assert_close(cls, fmap.mean((2, 3)))
    torch.testing.assert_close(patch, fmap.flatten(2).transpose(1, 2))
    assert bb.provenance()["cls"] == "global_average_pool"


# ----------------------------------------------------------------------------------------------------------
# weights


def test_resolution_order_file_then_dir_then_hub(tmp_path, monkeypatch):
    a, b, c = tiny_timm(seed=1), tiny_timm(seed=2), tiny_timm(seed=3)
    explicit = save_weights(a, tmp_path / "explicit.pth")
    wdir = tmp_path / "weights"
    wdir.mkdir()
    in_dir = save_weights(b, wdir / f"{VIT}.mine.safetensors")
    save_weights(c, wdir / f"{REG}.other.safetensors")  # another architecture: ignored
    x = _x()

    def out(model):
        with torch.inference_mode():
            return model.forward_features(x)[:, 1:]

    bb = create_backbone(VIT, weights=explicit, weights_dir=wdir, image_size=56, model_kwargs=TINY)
    assert bb.weights_source == "file" and bb.weights_file == str(explicit.resolve())
    with torch.inference_mode():
        torch.testing.assert_close(bb(x)[1], out(a))

    bb = create_backbone(VIT, weights_dir=wdir, image_size=56, model_kwargs=TINY)
    assert bb.weights_source == "weights_dir" and bb.weights_file == str(in_dir.resolve())
    with torch.inference_mode():
        torch.testing.assert_close(bb(x)[1], out(b))

    monkeypatch.setenv(B.WEIGHTS_ENV, str(wdir))
    assert resolve_weights(VIT).file == str(in_dir.resolve())
    assert resolve_weights(VIT, weights_dir=tmp_path).source == "timm"  # explicit dir beats the env
    monkeypatch.delenv(B.WEIGHTS_ENV)

    calls = []

    def fake_hub(model_name, kwargs):
        calls.append(model_name)
        return tiny_timm(seed=3, **{k: v for k, v in kwargs.items() if k not in ("img_size", "num_classes")})

    monkeypatch.setattr(B, "_create_from_hub", fake_hub)
    bb = create_backbone("dinov2_vits14", weights_dir=tmp_path, image_size=56, model_kwargs=TINY)
    assert calls == [f"{VIT}.lvd142m"] and bb.weights_source == "timm" and bb.alias == "dinov2_vits14"
    with torch.inference_mode():
        torch.testing.assert_close(bb(x)[1], out(c))
    # --weights timm skips the local places even when a file is there
    bb = create_backbone(VIT, weights="timm", weights_dir=wdir, image_size=56, model_kwargs=TINY)
    assert calls[-1] == VIT and bb.weights_source == "timm" and bb.weights_sha256 is None


def test_weights_dir_prefers_tag_and_refuses_ambiguity(tmp_path):
    m = tiny_timm()
    save_weights(m, tmp_path / f"{VIT}.imgfocus.safetensors")
    save_weights(m, tmp_path / f"{VIT}.lvd142m.safetensors")
    assert resolve_weights(VIT, weights_dir=tmp_path, tag="lvd142m").file.endswith(f"{VIT}.lvd142m.safetensors")
    with pytest.raises(SanfError, match="several weights files"):
        resolve_weights(VIT, weights_dir=tmp_path)
    # the same stem in two formats: safetensors wins
    d2 = tmp_path / "two"
    d2.mkdir()
    save_weights(m, d2 / f"{VIT}.x.pth")
    save_weights(m, d2 / f"{VIT}.x.safetensors")
    assert resolve_weights(VIT, weights_dir=d2).file.endswith(".safetensors")


def test_three_places_error(tmp_path, monkeypatch):
    def offline(model_name, kwargs):
        raise OSError("simulated: no network")

    monkeypatch.setattr(B, "_create_from_hub", offline)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SanfError) as e:
        create_backbone(VIT, weights_dir=empty, image_size=56, model_kwargs=TINY)
    msg = str(e.value)
    assert "\n" not in msg
    assert "(1) --weights FILE: not given" in msg
    assert f"(2) weights dir: no file named {VIT}.*" in msg and str(empty) in msg
    assert f"(3) registry package: no registry package ships {VIT}" in msg
    assert "(4) timm pretrained download" in msg and "simulated: no network" in msg
    with pytest.raises(SanfError, match=r"\(2\) \$SANF_WEIGHTS_DIR: not set"):
        create_backbone(VIT, image_size=56, model_kwargs=TINY)


def test_no_pretrained_weights_in_timm(tmp_path):
    # an architecture timm has no pretrained tag for fails without any download attempt
    with pytest.raises(SanfError, match=r"\(4\) timm pretrained download: timm has no pretrained"):
        resolve_weights("vit_small_patch16_18x2_224", weights_dir=tmp_path)


def test_classifier_head_dropped_and_wrapped_state_dict(tmp_path):
    m = tiny_timm(num_classes=7)
    sd = {"state_dict": {"module." + k: v for k, v in m.state_dict().items()}}
    f = tmp_path / "with_head.pth"
    torch.save(sd, f)
    bb = create_backbone(VIT, weights=f, image_size=56, model_kwargs=TINY)
    with torch.inference_mode():
        torch.testing.assert_close(bb(_x())[1], m.forward_features(_x())[:, 1:])
    assert "state_dict" not in bb.model.pretrained_cfg


def test_image_size_resamples_position_embeddings(tmp_path):
    f = save_weights(tiny_timm(img_size=56), tmp_path / "w.safetensors")
    bb = create_backbone(VIT, weights=f, image_size=84, model_kwargs=TINY)
    assert bb.grid == (6, 6) and bb.model.pos_embed.shape[1] == 36 + 1
    with torch.inference_mode():
        cls, patch = bb(_x(84))
    assert patch.shape == (2, 36, 32) and torch.isfinite(patch).all()
    with pytest.raises(SanfError, match="not a multiple of"):
        create_backbone(VIT, weights=f, image_size=60, model_kwargs=TINY)


def test_sha256_streamed_and_recorded(tmp_path):
    f = save_weights(tiny_timm(), tmp_path / "w.safetensors")
    want = hashlib.sha256(f.read_bytes()).hexdigest()
    assert file_sha256(f) == want == file_sha256(f, chunk=4096)
    bb = create_backbone(VIT, weights=f, image_size=56, model_kwargs=TINY)
    assert bb.weights_sha256 == want
    prov = bb.provenance()
    assert prov["weights"] == {"source": "file", "file": str(f.resolve()), "sha256": want}
    assert prov["image_size"] == [56, 56] and prov["arch"] == VIT and prov["pool"] == 1
    assert prov["timm_version"] == timm.__version__ and prov["model_kwargs"] == TINY
    json.dumps(prov)


# ----------------------------------------------------------------------------------------------------------
# preprocessing


def test_preprocess_shape_normalisation_and_pickle():
    bb = create_backbone(VIT, weights="random", image_size=56, model_kwargs=TINY)
    pre = bb.preprocess
    assert pre.size == (56, 56) and pre.interpolation == "bicubic"
    assert bb.data_config["input_size"] == (3, 56, 56)
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    x = pre(img)
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32
    torch.testing.assert_close(x, pre(img), rtol=0, atol=0)  # deterministic
    clone = pickle.loads(pickle.dumps(pre))
    torch.testing.assert_close(clone(img), x, rtol=0, atol=0)

    const = np.full((32, 40, 3), 200, np.uint8)
    y = pre(const)
    for c in range(3):
        want = (200 / 255 - pre.mean[c]) / pre.std[c]
        torch.testing.assert_close(y[c], torch.full((56, 56), want), atol=1e-5, rtol=0)
    assert pre(np.full((20, 20), 7, np.uint8)).shape == (3, 56, 56)  # grayscale -> RGB
    same = Preprocess((4, 4), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))
    torch.testing.assert_close(same(img[:4, :4]), torch.from_numpy(img[:4, :4]).permute(2, 0, 1) / 255.0)
    with pytest.raises(SanfError, match="uint8"):
        pre(img.astype(np.float32))


# ----------------------------------------------------------------------------------------------------------
# the real DINOv2 weights


def _two_cifar_images():
    with zipfile.ZipFile(CIFAR_ZIP) as z:
        names = sorted(n for n in z.namelist() if n.startswith("cifar10/test/") and n.endswith(".jpg"))
        picks = [names[0], names[-1]]  # two different classes
        from PIL import Image

        return [np.asarray(Image.open(io.BytesIO(z.read(n))).convert("RGB")) for n in picks]


@pytest.mark.skipif(
    not (DINOV2_FILE.is_file() and CIFAR_ZIP.is_file()),
    reason=f"real weights/data not found: needs {DINOV2_FILE} and {CIFAR_ZIP}",
)
def test_real_dinov2_weights_on_cifar():
    bb = create_backbone(VIT, weights=DINOV2_FILE, image_size=112)
    assert bb.dim == 384 and bb.grid == (8, 8) and bb.num_tokens == 64
    imgs = _two_cifar_images()
    assert imgs[0].shape == (32, 32, 3)
    x = torch.stack([bb.preprocess(im) for im in imgs])
    assert x.shape == (2, 3, 112, 112)
    with torch.inference_mode():
        cls, patch = bb(x)
    assert cls.shape == (2, 384) and patch.shape == (2, 64, 384)
    assert torch.isfinite(cls).all() and torch.isfinite(patch).all()
    assert not torch.allclose(cls[0], cls[1], atol=1e-3)
    assert len(bb.weights_sha256) == 64
