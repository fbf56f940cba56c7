"""Token-grid operations shared by the backbones (at extraction) and the features (at fit time); torch only, so
``flow/normalizer.py`` uses them without importing timm."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import SanfError


def pool_tokens(patch: torch.Tensor, grid: tuple[int, int], k: int) -> torch.Tensor:
    """Average-pool tokens ``(B, H*W, d)`` on their ``(H, W)`` grid with a KxK window and stride K.

    Tokens are transposed to channels-first ``(B, d, H, W)`` before pooling (the official SANF code
    reshapes without the transpose, which mixes channels and positions). Returns ``(B, H/K * W/K, d)``.
    """
    if k == 1:
        return patch
    b, n, d = patch.shape
    h, w = grid
    if n != h * w:
        raise SanfError(f"cannot pool {n} tokens as a {h}x{w} grid")
    if h % k or w % k:
        raise SanfError(f"--pool {k} does not divide the {h}x{w} token grid")
    fmap = patch.transpose(1, 2).reshape(b, d, h, w)
    return F.avg_pool2d(fmap, k).flatten(2).transpose(1, 2).contiguous()
