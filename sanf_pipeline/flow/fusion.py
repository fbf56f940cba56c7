"""The feature fusion module (FFM) and its registry of fusion modes.

Owns the subnetwork of one half-coupling (METHOD.md section 3): given the half vector ``x`` that the
coupling leaves unchanged and the context tokens ``ctx``, it returns ``[s, t]`` for the other half.

    FFM(x, ctx) = split(FC(concat(MLP(x), Out(x, ctx))))      MLP = 3 x (Linear -> ReLU), width ``hidden``

``Out`` is the fusion branch, chosen by name from ``FUSION_MODES``:

- ``none``: no branch; ``FC`` sees ``MLP(x)`` only.
- ``gap``: ``Out = W_o mean_tokens(ctx) + b_o`` (global average pooling, then a projection).
- ``learnable``: attention with a learnable query ``q``: ``m = concat(q, ctx)``, ``Q = W_q q + b_q``,
  ``K = W_k m + b_k``, ``V = W_v m + b_v``, ``Out = W_o softmax(Q K^T / sqrt(d_h)) V + b_o``.
- ``semantic``: the same attention with ``x`` itself as the query: ``m = concat(x, ctx)``,
  ``Q = W_q x + b_q``.

Attention width. ``x`` (or ``q``) and the context tokens are concatenated as tokens, so they must share a
width. Both are mapped into one attention width ``a`` (``attn_dim``; default: the width of the context
tokens this FFM sees): the context tokens by a learned ``Linear(ctx_dim, a)`` and ``x`` by a learned
``Linear(in_dim, a)``, each replaced by the identity when the widths already agree (the official setting:
``spatial_channels="half"`` gives tokens of width ``d/2``, the width of ``x``, so nothing is added there).
The learnable query ``q`` is a parameter of width ``a`` directly. ``W_q, W_k, W_v, W_o`` are ``a x a``, with
``heads`` heads of width ``d_h = a / heads`` (the scale is ``1/sqrt(d_h)``, the usual multi-head choice).

Shapes: ``x`` is ``(..., in_dim)`` and ``ctx`` ``(..., T, ctx_dim)`` whose leading dimensions broadcast to
those of ``x``. This lets the same module serve both flow layouts: ``(B, d/2)`` with ``(B, T, c)``, and, for
``main_input="spatial"``, ``(B, T, p/2)`` with the class token as ``(B, 1, 1, c)``. The FFM reads no files and
owns no permutation; the coupling layer decides which channels it sees.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

# name -> fusion-branch class; the single source of truth for valid ``fusion=`` values (CLI choices too).
FUSION_MODES: dict[str, type[FusionBranch]] = {}


def register_fusion(name: str) -> Callable[[type[FusionBranch]], type[FusionBranch]]:
    """Class decorator adding a fusion branch to ``FUSION_MODES`` under ``name``."""

    def add(cls: type[FusionBranch]) -> type[FusionBranch]:
        if name in FUSION_MODES:
            raise ValueError(f"fusion mode {name!r} is already registered")
        cls.mode = name
        FUSION_MODES[name] = cls
        return cls

    return add


class FusionBranch(nn.Module):
    """Base of the fusion branches: ``forward(x, ctx) -> Out`` of shape ``(..., out_dim)``."""

    mode = "?"
    uses_attention = False
    out_dim = 0

    def __init__(self, in_dim: int, ctx_dim: int, attn_dim: int, heads: int):
        super().__init__()
        self.in_dim, self.ctx_dim, self.attn_dim, self.heads = in_dim, ctx_dim, attn_dim, heads


def _to_width(src: int, dst: int) -> nn.Module:
    # Identity when the widths agree: that is the official configuration and adds no parameters.
    return nn.Identity() if src == dst else nn.Linear(src, dst)


@register_fusion("none")
class NoFusion(FusionBranch):
    """No fusion branch (the ablation "semantic feature only"); ``FC`` sees ``MLP(x)`` alone."""

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None) -> torch.Tensor:
        return x.new_zeros((*x.shape[:-1], 0))


@register_fusion("gap")
class GapFusion(FusionBranch):
    """Method 1: global average pooling of the context tokens, projected to the attention width."""

    def __init__(self, in_dim: int, ctx_dim: int, attn_dim: int, heads: int):
        super().__init__(in_dim, ctx_dim, attn_dim, heads)
        self.out_dim = attn_dim
        self.proj = nn.Linear(ctx_dim, attn_dim)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        out = self.proj(ctx.mean(dim=-2))
        return out.expand(*x.shape[:-1], self.out_dim)


class _AttentionFusion(FusionBranch):
    """Single-query attention over ``m = concat(query, ctx)``; subclasses say what the query token is."""

    uses_attention = True

    def __init__(self, in_dim: int, ctx_dim: int, attn_dim: int, heads: int):
        super().__init__(in_dim, ctx_dim, attn_dim, heads)
        if heads < 1 or attn_dim % heads:
            raise ValueError(
                f"heads={heads} must divide the attention width {attn_dim} (attn_dim; by default the width "
                f"of the patch tokens each FFM sees); choose another heads or set attn_dim"
            )
        self.out_dim = attn_dim
        self.head_dim = attn_dim // heads
        self.ctx_proj = _to_width(ctx_dim, attn_dim)
        self.w_q = nn.Linear(attn_dim, attn_dim)
        self.w_k = nn.Linear(attn_dim, attn_dim)
        self.w_v = nn.Linear(attn_dim, attn_dim)
        self.w_o = nn.Linear(attn_dim, attn_dim)

    def query_token(self, x: torch.Tensor) -> torch.Tensor:
        """The query token in the attention width, shape ``(..., a)`` broadcastable to ``x[..., 0]``."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        a, h, dh = self.attn_dim, self.heads, self.head_dim
        query = self.query_token(x)
        tokens = self.ctx_proj(ctx)
        # K = W_k m with m = concat(query, tokens) is row-wise, so K(m) = concat(K(query), K(tokens)). The
        # tokens' keys/values are computed once on the un-broadcast context and only then expanded: in the
        # spatial layout one class token serves every patch token and is not projected T times.
        k = torch.cat(
            [self.w_k(query).expand(*lead, a).unsqueeze(-2), self.w_k(tokens).expand(*lead, -1, a)], dim=-2
        )
        v = torch.cat(
            [self.w_v(query).expand(*lead, a).unsqueeze(-2), self.w_v(tokens).expand(*lead, -1, a)], dim=-2
        )
        q = self.w_q(query).expand(*lead, a).reshape(*lead, h, 1, dh)
        k = k.reshape(*lead, -1, h, dh).transpose(-3, -2)  # (..., h, M, dh)
        v = v.reshape(*lead, -1, h, dh).transpose(-3, -2)
        attn = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(dh), dim=-1)  # (..., h, 1, M)
        out = (attn @ v).reshape(*lead, a)
        return self.w_o(out)


@register_fusion("learnable")
class LearnableQueryFusion(_AttentionFusion):
    """Method 2: a learnable query vector ``q`` (shared by all samples) attends over ``concat(q, ctx)``."""

    def __init__(self, in_dim: int, ctx_dim: int, attn_dim: int, heads: int):
        super().__init__(in_dim, ctx_dim, attn_dim, heads)
        # Small random start (like a ViT class token): a zero q would make Q = b_q identical for all heads.
        self.q = nn.Parameter(torch.randn(attn_dim) * 0.02)

    def query_token(self, x: torch.Tensor) -> torch.Tensor:
        return self.q.to(x.dtype)


@register_fusion("semantic")
class SemanticQueryFusion(_AttentionFusion):
    """Method 3 (default): the half vector ``x`` itself is the query over ``concat(x, ctx)``."""

    def __init__(self, in_dim: int, ctx_dim: int, attn_dim: int, heads: int):
        super().__init__(in_dim, ctx_dim, attn_dim, heads)
        self.x_proj = _to_width(in_dim, attn_dim)

    def query_token(self, x: torch.Tensor) -> torch.Tensor:
        return self.x_proj(x)


class FFM(nn.Module):
    """``[s, t] = split(FC(concat(MLP(x), Out(x, ctx))))`` with ``FC`` zero-initialised (layer = identity)."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        ctx_dim: int,
        *,
        fusion: str = "semantic",
        hidden: int = 1024,
        heads: int = 1,
        attn_dim: int | None = None,
    ):
        super().__init__()
        if fusion not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {fusion!r}; choose one of {sorted(FUSION_MODES)}")
        self.out_dim = out_dim
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.fusion = FUSION_MODES[fusion](in_dim, ctx_dim, attn_dim or ctx_dim, heads)
        self.fc = nn.Linear(hidden + self.fusion.out_dim, 2 * out_dim)
        # Zero last layer: s = t = 0, so the coupling is exactly the identity at initialisation.
        nn.init.zeros_(self.fc.weight)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.mlp(x)
        if self.fusion.out_dim:
            h = torch.cat([h, self.fusion(x, ctx).to(h.dtype)], dim=-1)
        s, t = self.fc(h).chunk(2, dim=-1)
        return s, t
