"""Backbone aliases (`sanf backbones`): the short names sanf knows (``vit_large``, ``dinov2_vits14``, ...), the timm
model each stands for with its defaults, and resolving a user's name to a timm model."""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from ..errors import SanfError


@dataclass(frozen=True)
class _Alias:
    model: str
    description: str


BACKBONE_ALIASES: dict[str, _Alias] = {
    "vit_large": _Alias(
        "vit_large_patch16_224.augreg_in21k",
        "ViT-L/16, ImageNet-21k, 224 px (the paper's main setting)",
    ),
    "vit_base": _Alias("vit_base_patch16_224.augreg_in21k", "ViT-B/16, ImageNet-21k, 224 px"),
    "vit_base_384": _Alias(
        "vit_base_patch16_384.augreg_in21k_ft_in1k",
        "ViT-B/16, ImageNet-21k fine-tuned on 1k, 384 px (the official code's backbone)",
    ),
    "dino_vitb16": _Alias("vit_base_patch16_224.dino", "DINO ViT-B/16 (self-supervised, ImageNet-1k), 224 px"),
    "dinov2_vits14": _Alias(
        "vit_small_patch14_dinov2.lvd142m", "DINOv2 ViT-S/14 (LVD-142M), 518 px native, any multiple of 14"
    ),
    "dinov2_vitl14": _Alias(
        "vit_large_patch14_dinov2.lvd142m", "DINOv2 ViT-L/14 (LVD-142M), 518 px native, any multiple of 14"
    ),
    "clip_vitb16": _Alias("vit_base_patch16_clip_224.openai", "OpenAI CLIP ViT-B/16 image tower, 224 px"),
}


def list_backbones() -> list[dict[str, str]]:
    """The aliases for ``sanf backbones``: ``[{alias, model, description}]`` (any timm name works too)."""
    return [{"alias": k, "model": a.model, "description": a.description} for k, a in BACKBONE_ALIASES.items()]


def describe_alias(alias: str) -> str:
    return BACKBONE_ALIASES[alias].description


def resolve_name(name: str) -> tuple[str | None, str, str | None]:
    """``name`` (alias or timm name, optionally ``arch.tag``) -> ``(alias or None, arch, tag or None)``."""
    import timm
    from timm.models import split_model_name_tag

    key = str(name).strip()
    alias = None
    if key.lower() in BACKBONE_ALIASES:
        alias = key.lower()
        key = BACKBONE_ALIASES[alias].model
    arch, tag = split_model_name_tag(key)
    if arch and timm.is_model(arch) and tag and f"{arch}.{tag}" not in timm.list_pretrained(f"{arch}.*"):
        tags = [n.split(".", 1)[1] for n in timm.list_pretrained(f"{arch}.*")]
        raise SanfError(f"unknown pretrained tag {tag!r} for {arch}; timm knows: {', '.join(tags) or 'none'}")
    if not arch or not timm.is_model(arch):
        known = list(BACKBONE_ALIASES) + timm.list_models()
        close = difflib.get_close_matches(str(name), known, n=3, cutoff=0.6)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise SanfError(
            f"unknown backbone {name!r}: not an alias ({', '.join(BACKBONE_ALIASES)}) nor a timm model "
            f"name (see `sanf backbones` or timm.list_models()).{hint}"
        )
    return alias, arch, (tag or None)
