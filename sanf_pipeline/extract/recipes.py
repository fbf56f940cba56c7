"""What `sanf extract --backbone X` writes when no layer flag is given: each kind of backbone's recommended
image size, class-token layer, patch-token layers and pooling (``default_image_size``, ``default_layers``).

The default detector reads a **semantic class token** (for anomalies of what the image shows) and **local patch
tokens** (for defects of a region), and the two live at different depths of a backbone: the class token is best at
the end of the network, local detail in its middle (benchmarks/quality_industrial.md; PatchCore and CFlow-AD take
a CNN's stages at strides 8 and 16). One recipe per kind, applied in the same single forward pass:

- **CNNs**: class token = the global average pool of the final features (``forward_features``, a conv head
  included); patch tokens = the feature stages at strides 8 and 16 concatenated on one grid and pooled 2x2, i.e.
  on the stride-16 grid (EfficientNet-Lite0 at 224 px: stages 2+3, 40+112 = 152 channels on 14x14). A CNN whose
  stages do not include both strides keeps its final feature map for both.
- **DINOv2 ViTs** (``vit_*_dinov2*``): 224 px (not the 518 px they are built for: about 5x cheaper and 5x smaller
  per image; every measurement in benchmarks/ uses 224 px or less) and block ``round(2/3 depth)`` (block 8 of
  ViT-S/14's 12) for both the class token and the patch tokens. The only DINOv2 weights this project can measure on
  have saliency-tuned last blocks, whose class token is much weaker than block 8's (README); with the original
  LVD-142M weights, ``--layer -1 --patch-layer 8`` takes the last block's class token instead.
- **Other ViTs**: the native input size, the last block's class token (the paper's setting) and the patch tokens
  of block ``round(2/3 depth)``.

A recipe chooses only what the user did not: any ``--layer``/``--patch-layer`` switches it off (and then the patch
tokens come from ``--layer`` unless ``--patch-layer`` says otherwise, as before), ``--pool`` and ``--image-size``
override its pooling and size. The cache records the resolved layers and ``recipe`` in its provenance.
"""

from __future__ import annotations

from dataclasses import dataclass

MID_DEPTH = 2 / 3  # where a ViT's local patch tokens are taken, as a fraction of its depth
DINOV2_IMAGE_SIZE = 224
CNN_PATCH_STRIDES = (8, 16)
RECIPE_SUMMARY = (
    "CNNs: class token = global pool of the final features; patch tokens = the stages at strides 8 and 16 on the "
    "stride-16 grid (--patch-layer 2,3 --pool 2 for EfficientNet-Lite0)",
    f"DINOv2 ViTs: {DINOV2_IMAGE_SIZE} px; class and patch tokens of the block 2/3 deep (--layer 8 for ViT-S/14)",
    "other ViTs: their native size; class token of the last block, patch tokens of the block 2/3 deep",
)


@dataclass(frozen=True)
class Recipe:
    name: str
    layer: int | list[int] | None  # class-token layer(s); None = the model's final output
    patch_layer: int | list[int] | None  # patch-token layer(s); None = the class token's
    pool: int


def is_dinov2(arch: str) -> bool:
    return "dinov2" in arch.lower()


def default_image_size(arch: str) -> int | None:
    """The recommended input size of ``arch`` (None: the size the model is built for)."""
    return DINOV2_IMAGE_SIZE if is_dinov2(arch) else None


def mid_block(depth: int) -> int:
    return max(0, min(depth - 1, int(round(MID_DEPTH * depth))))


def default_layers(kind: str, arch: str, num_layers: int, reductions: list[int]) -> Recipe:
    """The recommended layers of a backbone of ``kind`` (``vit``/``cnn``) with ``num_layers`` blocks or stages
    (``reductions``: each CNN stage's stride). A layer that is the model's last block is given as None, so a
    recipe that changes nothing records what a plain extraction always recorded."""
    if kind == "cnn":
        stages = [reductions.index(s) for s in CNN_PATCH_STRIDES if s in reductions]
        if len(stages) == len(CNN_PATCH_STRIDES):
            pool = CNN_PATCH_STRIDES[1] // CNN_PATCH_STRIDES[0]
            return Recipe("cnn: final pool + stride-8/16 stages", None, stages, pool)
        return Recipe("cnn: final feature map", None, None, 1)
    mid = mid_block(num_layers)
    mid_or_none = None if mid == num_layers - 1 else mid
    if is_dinov2(arch):
        return Recipe("dinov2: block 2/3 depth", mid_or_none, None, 1)
    return Recipe("vit: last-block class token + block 2/3 depth patches", None, mid_or_none, 1)
