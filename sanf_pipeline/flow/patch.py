"""The conditional patch flow's network (``PatchFlowNet``): a density of one patch token given its image's class
token and its grid position, built from the SANF coupling layers (``coupling.CouplingLayer`` with its FFMs).

    z, logdet = couplings(patch token | context),  context = [W_c cls + b_c, PE(position)]   (two context tokens)
    -log p(token) = ||z||^2 / 2 + (d / 2) log(2 pi) - logdet                                  (nats per token)

The main input of every coupling is one patch token (width ``d``); its FFMs attend (``fusion``) over two context
tokens of width ``cond_dim``: the image's class token mapped by a learned linear layer (computed once per image),
and a fixed 2-D sinusoidal encoding of the token's row and column (``position_encoding``), as CFlow-AD conditions
its flows on position. ``condition="position"`` drops the class token (the fusion ablation: the same flow without
the semantic context). The couplings act on the last axis only, so the same module takes one token per sample
(training in token mini-batches: ``patch (N, d)``, ``cls (N, c)``, ``token_index (N,)``) and whole images
(scoring: ``patch (B, T, d)``, ``cls (B, c)``), and traces for export with a dynamic batch.

The permutations are drawn from ``seed`` with a local generator; the last layer of every FFM starts at zero, so an
untrained net is the identity (``z`` = the permuted token, ``logdet = 0``): a standard normal per channel of the
(standardised) tokens. No training and no files here (``models/patchflow.py`` owns those).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .coupling import CouplingLayer
from .fusion import FUSION_MODES
from .model import log_likelihood

CONDITIONS = ("class+position", "position")


def position_encoding(grid: tuple[int, int], width: int) -> torch.Tensor:
    """``(H * W, width)`` fixed 2-D sinusoidal encodings, row-major: the first half of the channels encodes the row,
    the second the column, each as sin/cos pairs at geometrically spaced frequencies (the Transformer's, base 10^4).
    """
    h, w = int(grid[0]), int(grid[1])
    half = max(2, width // 2 // 2 * 2)  # an even number of channels per axis
    freqs = torch.exp(-math.log(1e4) * torch.arange(0, half, 2, dtype=torch.float64) / half)

    def axis(n: int) -> torch.Tensor:
        pos = torch.arange(n, dtype=torch.float64)[:, None] * freqs[None, :]
        return torch.cat([torch.sin(pos), torch.cos(pos)], dim=1)  # (n, half)

    rows = axis(h)[:, None, :].expand(h, w, half)
    cols = axis(w)[None, :, :].expand(h, w, half)
    pe = torch.cat([rows, cols], dim=-1).reshape(h * w, 2 * half)
    if pe.shape[1] < width:
        pe = torch.cat([pe, pe.new_zeros(h * w, width - pe.shape[1])], dim=1)
    return pe[:, :width].to(torch.float32).contiguous()


class PatchFlowNet(nn.Module):
    """``z, logdet = net(patch, cls, token_index=None)``; ``net.token_nll(patch, cls)``; ``net.inverse(z, ...)``."""

    def __init__(self, patch_dim: int, cls_dim: int, grid: tuple[int, int], *, blocks: int = 8, hidden: int = 128,
                 cond_dim: int = 64, clamp: float = 2.0, fusion: str = "semantic", heads: int = 1,
                 condition: str = "class+position", seed: int = 0):
        super().__init__()
        if condition not in CONDITIONS:
            raise ValueError(f"unknown condition {condition!r}; choose one of {CONDITIONS}")
        if fusion not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {fusion!r}; choose one of {sorted(FUSION_MODES)}")
        for name, value in (("patch_dim", patch_dim), ("cls_dim", cls_dim), ("blocks", blocks), ("hidden", hidden),
                            ("cond_dim", cond_dim), ("heads", heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if patch_dim < 2:
            raise ValueError(f"the patch tokens need at least 2 channels to split in halves, got {patch_dim}")
        grid = (int(grid[0]), int(grid[1]))
        self._config = dict(patch_dim=patch_dim, cls_dim=cls_dim, grid=list(grid), blocks=blocks, hidden=hidden,
                            cond_dim=cond_dim, clamp=float(clamp), fusion=fusion, heads=heads, condition=condition,
                            seed=seed)
        self.patch_dim, self.grid, self.condition = patch_dim, grid, condition
        self.num_tokens = grid[0] * grid[1]
        self.cls_proj = nn.Linear(cls_dim, cond_dim) if condition == "class+position" else None
        self.register_buffer("positions", position_encoding(grid, cond_dim))
        gen = torch.Generator().manual_seed(int(seed))
        self.layers = nn.ModuleList(
            CouplingLayer(patch_dim, cond_dim, torch.randperm(patch_dim, generator=gen), fusion=fusion, clamp=clamp,
                          hidden=hidden, heads=heads, spatial_channels="full", attn_dim=cond_dim)
            for _ in range(blocks))

    def config(self) -> dict:
        """JSON-able constructor kwargs: ``PatchFlowNet(**net.config())`` rebuilds the architecture."""
        return {**self._config, "grid": list(self._config["grid"])}

    def _context(self, patch: torch.Tensor, cls: torch.Tensor | None, token_index: torch.Tensor | None):
        """Context tokens ``(..., k, cond_dim)`` matching ``patch (..., d)``: images ``(B, T, d)`` with ``cls (B, c)``,
        or single tokens ``(N, d)`` with ``cls (N, c)`` and ``token_index (N,)``."""
        if token_index is None:
            if patch.dim() != 3 or patch.shape[1] != self.num_tokens:
                raise ValueError(f"patch must be (B, {self.num_tokens}, {self.patch_dim}), got {tuple(patch.shape)}")
            pos = self.positions[None, :, None, :].expand(patch.shape[0], -1, -1, -1)
            c = None if self.cls_proj is None else self.cls_proj(cls)[:, None, None, :].expand(-1, patch.shape[1],
                                                                                              -1, -1)
        else:
            pos = self.positions[token_index][:, None, :]
            c = None if self.cls_proj is None else self.cls_proj(cls)[:, None, :]
        if c is None:
            return pos
        if cls is None:
            raise ValueError("cls (the class token) is required with condition='class+position'")
        return torch.cat([c, pos], dim=-2)

    def forward(self, patch: torch.Tensor, cls: torch.Tensor | None = None,
                token_index: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``z`` (same shape as ``patch``) and ``logdet`` (its shape without the channels)."""
        if self.cls_proj is not None and cls is None:
            raise ValueError("cls (the class token) is required with condition='class+position'")
        ctx = self._context(patch, cls, token_index)
        h, logdet = patch, patch.new_zeros(patch.shape[:-1])
        for layer in self.layers:
            h, ld = layer(h, ctx)
            logdet = logdet + ld
        return h, logdet

    def token_nll(self, patch: torch.Tensor, cls: torch.Tensor | None = None,
                  token_index: torch.Tensor | None = None) -> torch.Tensor:
        """``-log p`` of every token in nats (``(B, T)`` for images, ``(N,)`` for single tokens)."""
        return -log_likelihood(*self(patch, cls, token_index))

    def inverse(self, z: torch.Tensor, cls: torch.Tensor | None = None,
                token_index: torch.Tensor | None = None) -> torch.Tensor:
        ctx = self._context(z, cls, token_index)
        h = z
        for layer in reversed(self.layers):
            h = layer.inverse(h, ctx)
        return h
