"""From per-token evidence to an anomaly map (``MapHead``), the one implementation eval, ``sanf score``, the
``Detector`` and the exported ONNX/TorchScript graphs share.

**The geometry.** Extraction resizes the whole image to the model's input size ``S_h x S_w`` (no crop,
``extract/preprocess.py``), and a backbone's token grid ``h x w`` tiles that input evenly (a ViT's patches; a CNN
stage's cells; a multi-layer cache's finest grid; ``--pool``/``token_pool`` merge whole cells). So token ``(i, j)``
covers input pixels ``[i S_h/h, (i+1) S_h/h) x [j S_w/w, (j+1) S_w/w)`` and its value belongs at that cell's
centre. ``MapHead``:

1. upsamples the evidence bilinearly to the input size with ``align_corners=False`` (which puts each token's value
   exactly at its cell's centre);
2. blurs it with a Gaussian of ``sigma`` input pixels (default ``DEFAULT_SIGMA = 4``, as PatchCore and anomalib do;
   kernel truncated at 4 sigma, reflected at the borders; ``sigma = 0``: no blur).

``resize_maps`` then undoes the extraction's resize: the input-size map resized bilinearly to the image's own
``H x W`` (the inverse of the whole-image resize, so a pixel of the map lies over the pixel of the image it
describes, whatever the aspect ratio).

**The evaluation resolution** (``eval_resolution``): pixel metrics compare maps and ground-truth masks at the
model's input size, as anomalib does, capped at ``MAX_EVAL_SIDE`` px on the longer side (a 518 px DINOv2 input is
compared at 256 px). At the input size every evaluated pixel is one the model saw at its own resolution; the cap
keeps the maps of a whole test split in memory (300 images at 256 px: 79 MB of float32) without changing a metric
much (a map blurred with sigma 4 px has no detail finer than a few pixels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import SanfError

DEFAULT_SIGMA = 4.0
MAX_EVAL_SIDE = 256
TRUNCATE = 4.0  # kernel radius in sigmas (scipy's gaussian_filter default; anomalib's kernel size rule)


def eval_resolution(input_size) -> tuple[int, int]:
    """The ``(height, width)`` at which maps and masks are compared for an input size (module docstring)."""
    h, w = (int(input_size), int(input_size)) if isinstance(input_size, int) else (int(input_size[0]),
                                                                                   int(input_size[1]))
    if h < 1 or w < 1:
        raise SanfError(f"an input size must be positive, got {h}x{w}")
    side = max(h, w)
    if side <= MAX_EVAL_SIDE:
        return h, w
    scale = MAX_EVAL_SIDE / side
    return max(1, round(h * scale)), max(1, round(w * scale))


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """The normalised 1-D Gaussian (float32) of ``sigma`` pixels, radius ``int(TRUNCATE * sigma + 0.5)``."""
    radius = int(TRUNCATE * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return (k / k.sum()).to(torch.float32)


def check_sigma(sigma) -> float:
    if isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not math.isfinite(sigma) or sigma < 0:
        raise SanfError(f"the map blur (--map-sigma) must be a number >= 0 pixels, got {sigma!r}")
    return float(sigma)


class MapHead(nn.Module):
    """``evidence (B, h, w)`` on the token grid -> ``map (B, S_h, S_w)`` float32 at the model's input size: bilinear
    upsampling, then a Gaussian blur of ``sigma`` input pixels (module docstring)."""

    def __init__(self, input_size, sigma: float = DEFAULT_SIGMA):
        super().__init__()
        h, w = (int(input_size), int(input_size)) if isinstance(input_size, int) else (int(input_size[0]),
                                                                                       int(input_size[1]))
        self.size = (h, w)
        self.sigma = check_sigma(sigma)
        self.register_buffer("kernel", gaussian_kernel(self.sigma) if self.sigma > 0 else torch.ones(1),
                             persistent=False)

    def extra_repr(self) -> str:
        return f"size={self.size}, sigma={self.sigma:g}"

    def forward(self, evidence: torch.Tensor) -> torch.Tensor:
        x = evidence.to(torch.float32).unsqueeze(1)
        x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False)
        k = len(self.kernel)
        if k > 1:
            r = k // 2
            # reflect padding needs a pad smaller than the side; a tiny input gets a shorter kernel's worth of it
            # (replicated beyond), which only matters for toy sizes
            ph, pw = min(r, self.size[0] - 1), min(r, self.size[1] - 1)
            x = F.pad(x, (pw, pw, ph, ph), mode="reflect")
            if ph < r or pw < r:
                x = F.pad(x, (r - pw, r - pw, r - ph, r - ph), mode="replicate")
            x = F.conv2d(x, self.kernel.view(1, 1, 1, k))
            x = F.conv2d(x, self.kernel.view(1, 1, k, 1))
        return x[:, 0]


def resize_maps(maps: torch.Tensor, size) -> torch.Tensor:
    """Input-size maps ``(B, S_h, S_w)`` -> ``(B, H, W)`` float32, bilinear (antialiased when shrinking): the
    inverse of extraction's whole-image resize, or the step down to ``eval_resolution``."""
    size = (int(size[0]), int(size[1]))
    if tuple(maps.shape[-2:]) == size:
        return maps.to(torch.float32)
    shrink = size[0] < maps.shape[-2] or size[1] < maps.shape[-1]
    return F.interpolate(maps.to(torch.float32).unsqueeze(1), size=size, mode="bilinear", align_corners=False,
                         antialias=shrink)[:, 0]
