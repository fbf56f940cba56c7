"""One flow-based learning layer (FLL): fixed permutation, split, two affine half-couplings.

Owns the invertible map of METHOD.md section 2 and its exact log-determinant:

    x <- x[..., perm]                      fixed channel permutation (a buffer, so it is saved with the model)
    y1, y2 = x[..., :d1], x[..., d1:]      d1 = d // 2, d2 = d - d1
    [s1, t1] = FFM_1(y1, ctx_1);  y2' = y2 * exp(c(s1)) + t1
    [s2, t2] = FFM_2(y2', ctx_2); y1' = y1 * exp(c(s2)) + t2
    out = concat(y1', y2'),  log|det J| = sum c(s1) + sum c(s2)      (the permutation has |det| = 1)

``c`` is the soft clamp. Each half-coupling has its own FFM. The layer acts on the last axis only, so ``x``
may be ``(B, d)`` or ``(B, T, d)`` (one coupling per token, weights shared); the log-determinant keeps the
leading axes and the caller sums what belongs to one sample.

Context channels (``spatial_channels``): with ``"full"`` both FFMs see the full-width context tokens.
With ``"half"`` (the official code) the context tokens live in the same channel frame as ``x``: the caller
permutes their channels with this layer's permutation (``permute_context``) before calling, and FFM_1 gets
the channels of ``y1``, FFM_2 those of ``y2``. The layer never reads or stores data; the permutation comes
from the caller (``SANFlow`` draws it from its seed).
"""

from __future__ import annotations

import torch
from torch import nn

from .clamp import soft_clamp
from .fusion import FFM

SPATIAL_CHANNELS = ("half", "full")


class CouplingLayer(nn.Module):
    """One FLL over the last axis of width ``dim``, conditioned on context tokens of width ``ctx_dim``."""

    def __init__(
        self,
        dim: int,
        ctx_dim: int,
        perm: torch.Tensor,
        *,
        fusion: str = "semantic",
        clamp: float = 2.0,
        hidden: int = 1024,
        heads: int = 1,
        spatial_channels: str = "half",
        attn_dim: int | None = None,
    ):
        super().__init__()
        if spatial_channels not in SPATIAL_CHANNELS:
            raise ValueError(
                f"unknown spatial_channels {spatial_channels!r}; choose one of {SPATIAL_CHANNELS}"
            )
        if spatial_channels == "half" and ctx_dim != dim:
            raise ValueError(
                f"spatial_channels='half' splits the context tokens' channels like the main input, so their "
                f"widths must match (got main {dim}, context {ctx_dim}); use spatial_channels='full'"
            )
        if perm.shape != (dim,):
            raise ValueError(f"permutation must have shape ({dim},), got {tuple(perm.shape)}")
        self.dim, self.clamp, self.spatial_channels = dim, float(clamp), spatial_channels
        self.d1, self.d2 = dim // 2, dim - dim // 2
        # A buffer (not a parameter): never trained, but part of state_dict / safetensors.
        self.register_buffer("perm", perm.to(torch.long).clone())
        c1, c2 = (self.d1, self.d2) if spatial_channels == "half" else (ctx_dim, ctx_dim)
        kw = dict(fusion=fusion, hidden=hidden, heads=heads, attn_dim=attn_dim)
        self.ffm1 = FFM(self.d1, self.d2, c1, **kw)  # reads y1, scales/shifts y2
        self.ffm2 = FFM(self.d2, self.d1, c2, **kw)  # reads y2', scales/shifts y1

    def permute_context(self, ctx: torch.Tensor | None) -> torch.Tensor | None:
        """Move the context tokens into this layer's channel frame (only with ``spatial_channels="half"``).

        ``ctx`` must be in the previous layer's frame, so applied layer after layer it composes the
        permutations exactly as ``x`` is permuted: context channel ``i`` stays aligned with channel ``i``
        of ``x``.
        """
        if ctx is None or self.spatial_channels != "half":
            return ctx
        return ctx[..., self.perm]

    def _context_halves(self, ctx: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if ctx is None or self.spatial_channels != "half":
            return ctx, ctx
        return ctx[..., : self.d1], ctx[..., self.d1 :]

    def _scale_shift(
        self, ffm: FFM, h: torch.Tensor, ctx: torch.Tensor | None, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        s, t = ffm(h, ctx)
        # Under autocast the FFM answers in half precision; the affine update and the log-determinant are
        # done in the main input's dtype so that inverse(forward(x)) and the NLL keep full precision.
        return soft_clamp(s.to(dtype), self.clamp), t.to(dtype)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (..., dim)``, ``ctx`` already in this layer's frame -> ``(y (..., dim), logdet (...))``."""
        c1, c2 = self._context_halves(ctx)
        x = x[..., self.perm]
        y1, y2 = x[..., : self.d1], x[..., self.d1 :]
        s1, t1 = self._scale_shift(self.ffm1, y1, c1, x.dtype)
        y2 = y2 * torch.exp(s1) + t1
        s2, t2 = self._scale_shift(self.ffm2, y2, c2, x.dtype)
        y1 = y1 * torch.exp(s2) + t2
        return torch.cat([y1, y2], dim=-1), s1.sum(dim=-1) + s2.sum(dim=-1)

    def inverse(self, y: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        """Exact inverse of ``forward`` (same ``ctx``): undo the second half-coupling, then the first."""
        c1, c2 = self._context_halves(ctx)
        y1, y2 = y[..., : self.d1], y[..., self.d1 :]
        s2, t2 = self._scale_shift(self.ffm2, y2, c2, y.dtype)
        y1 = (y1 - t2) * torch.exp(-s2)
        s1, t1 = self._scale_shift(self.ffm1, y1, c1, y.dtype)
        y2 = (y2 - t1) * torch.exp(-s1)
        x = torch.cat([y1, y2], dim=-1)
        return x[..., torch.argsort(self.perm)]
