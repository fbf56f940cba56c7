"""One cache, two depths: `sanf extract` without layer flags takes the backbone's recipe (a semantic class token and
local patch tokens in one pass), ``--patch-layer`` asks for it explicitly, and such caches (patch tokens narrower than
the class token) are written, read, described and fitted like any other."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import FORMATS, SUFFIX, TINY_TIMM_KWARGS, save_weights, tiny_timm

from sanf_pipeline.cli.main import cli
from sanf_pipeline.extract.backbones import create_backbone
from sanf_pipeline.extract.recipes import default_image_size, default_layers

EFF = "tf_efficientnet_lite0"
EFF_REDUCTIONS = [2, 4, 8, 16, 32]


def test_default_layers_by_kind():
    r = default_layers("cnn", EFF, 5, EFF_REDUCTIONS)
    assert (r.layer, r.patch_layer, r.pool) == (None, [2, 3], 2)
    resnet = default_layers("cnn", "resnet18", 5, [2, 4, 8, 16, 32])  # stem + layer1..4: layer2 and layer3
    assert resnet.patch_layer == [2, 3]
    odd = default_layers("cnn", "odd", 3, [4, 8, 32])  # no stride-16 stage: the final map for both
    assert (odd.layer, odd.patch_layer, odd.pool) == (None, None, 1)
    assert default_layers("vit", "vit_small_patch14_dinov2", 12, []).layer == 8
    assert default_layers("vit", "vit_small_patch14_dinov2", 2, []).layer is None  # block 1 of 2 is the last
    vit = default_layers("vit", "vit_large_patch16_224", 24, [])
    assert (vit.layer, vit.patch_layer) == (None, 16)
    assert default_image_size("vit_small_patch14_dinov2") == 224 and default_image_size(EFF) is None


def _images(n=2, size=64, seed=0):
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_cnn_recipe_is_the_final_pool_and_the_mid_stages_in_one_pass():
    rec = create_backbone(EFF, weights="random", image_size=64, pool=None, recipe=True, device="cpu")
    legacy = create_backbone(EFF, weights="random", image_size=64, device="cpu")
    mid = create_backbone(EFF, weights="random", image_size=64, layer=[2, 3], pool=2, device="cpu")
    assert (rec.layer, rec.patch_layer, rec.pool, rec.grid) == (None, [2, 3], 2, (4, 4))
    assert (rec.dim, rec.patch_dim) == (1280, 40 + 112)
    x = _images()
    with torch.inference_mode():
        cls, patch = rec(x)
        torch.testing.assert_close(cls, legacy(x)[0])
        torch.testing.assert_close(patch, mid(x)[1])
    prov = rec.provenance()
    assert prov["patch_layer"] == [2, 3] and prov["patch_dim"] == 152 and prov["recipe"].startswith("cnn")
    assert "patch_layer" not in legacy.provenance() and "recipe" not in legacy.provenance()
    # an odd fine grid (56 px: 7x7 at stride 8) keeps the stages unpooled rather than refusing
    small = create_backbone(EFF, weights="random", image_size=56, pool=None, recipe=True, device="cpu")
    assert (small.pool, small.grid) == (1, (7, 7))
    # any layer flag switches the recipe off; --pool overrides its pooling
    assert create_backbone(EFF, weights="random", image_size=64, layer=3, recipe=True).patch_layer is None
    assert create_backbone(EFF, weights="random", image_size=64, pool=1, recipe=True).grid == (8, 8)


def test_vit_class_token_and_patches_from_two_blocks(tmp_path):
    ref = tiny_timm(seed=4)
    f = save_weights(ref, tmp_path / "w.safetensors")
    bb = create_backbone("vit_small_patch14_dinov2", weights=f, image_size=56, layer=-1, patch_layer=1,
                         model_kwargs=TINY_TIMM_KWARGS)
    assert (bb.layer, bb.patch_layer, bb.dim, bb.patch_dim) == (2, 1, 32, 32)
    x = _images(size=56)
    with torch.inference_mode():
        cls, patch = bb(x)
        full = ref.forward_features(x)
        (mid, _), = ref.forward_intermediates(x, indices=[1], norm=True, return_prefix_tokens=True,
                                              output_fmt="NLC", intermediates_only=True)
    torch.testing.assert_close(cls, full[:, 0])
    torch.testing.assert_close(patch, mid)
    with pytest.raises(Exception, match="--patch-layer 7 is out of range"):
        create_backbone("vit_small_patch14_dinov2", weights=f, image_size=56, patch_layer=7,
                        model_kwargs=TINY_TIMM_KWARGS)


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_two_depth_cache_end_to_end(make_folder_dataset, tmp_path, fmt):
    """The plain `sanf extract` of a CNN writes the recipe's cache; info shows both widths; the default `sanf fit`
    (whose fusion then sees the narrower patch tokens whole) and `sanf eval` run on it; `sanf baseline` too."""
    data = make_folder_dataset(n_train=8, n_test=4, size=64)
    cache = tmp_path / f"c{SUFFIX[fmt]}"
    r = CliRunner().invoke(cli, ["extract", "--backbone", EFF, "--weights", "random", "--image-size", "64",
                                 "--dataset", "folder", "--data-root", str(data), "--cache", str(cache),
                                 "--batch-size", "4", "--num-workers", "0", "--quiet",
                                 *(["--format", "hdf5"] if fmt == "hdf5" else [])])
    assert r.exit_code == 0, r.output
    from sanf_pipeline.cache import open_cache

    with open_cache(cache) as c:
        assert (c.dim, c.patch_dim, c.num_tokens) == (1280, 152, 16)
        cls, patch = c.split("train").read(0, 3, patch=True)
        assert cls.shape == (3, 1280) and patch.shape == (3, 16, 152)
        assert c.meta["settings"]["backbone"]["patch_layer"] == [2, 3]
    info = CliRunner().invoke(cli, ["cache", "info", str(cache)])
    assert "patch_layer=[2, 3] (d=152)" in info.output, info.output
    as_json = json.loads(CliRunner().invoke(cli, ["cache", "info", str(cache), "--json"]).output)
    assert as_json["patch_dim"] == 152 and as_json["dim"] == 1280
    fit = CliRunner().invoke(cli, ["fit", "--cache", str(cache), "--normal-class", "a", "--out", str(tmp_path / "r"),
                                   "--hidden", "16", "--blocks", "2", "--epochs", "1", "--device", "cpu", "--quiet"])
    assert fit.exit_code == 0, fit.output
    run = json.loads((tmp_path / "r" / "config.json").read_text())
    assert run["flow"]["spatial_channels"] == "full" and run["flow"]["patch_dim"] == 152
    ev = CliRunner().invoke(cli, ["eval", "--run", str(tmp_path / "r"), "--no-maps"])
    assert ev.exit_code == 0, ev.output
    metrics = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert np.isfinite(metrics["auroc"])
    base = CliRunner().invoke(cli, ["baseline", "--cache", str(cache), "--normal-class", "a", "--method", "patch-knn",
                                    "--out", str(tmp_path / "b"), "--device", "cpu", "--quiet"])
    assert base.exit_code == 0, base.output
