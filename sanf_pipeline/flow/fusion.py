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
        """``softmax(q K(m)^T / sqrt(dh)) V(m)`` per head, ``m = concat(query, tokens)``, then ``W_o``.

        With a single query the per-token projections fold into the query side, exactly:
        ``q_h . (W_k m_j + b_k) = (W_k,h^T q_h) . m_j + const_h`` (the constant cancels in the softmax) and
        ``sum_j a_hj (W_v m_j + b_v) = W_v,h (sum_j a_hj m_j) + b_v,h`` (the weights sum to one). So the ``T``
        context tokens are never multiplied by ``W_k``/``W_v``: the cost per FFM drops from ``2 T a^2`` to
        ``~2 T a h`` multiply-adds (with many context tokens the projections were most of the flow's compute).
        ``tests/test_flow.py`` checks the result against the literal formula.
        """
        lead = x.shape[:-1]
        a, h, dh = self.attn_dim, self.heads, self.head_dim
        query = self.query_token(x).expand(*lead, a)  # (..., a)
        tokens = self.ctx_proj(ctx)  # (..., T, a); leading axes may be broadcast (size 1)
        q = self.w_q(query).reshape(*lead, h, dh)
        q_eff = torch.einsum("...hd,hda->...ha", q, self.w_k.weight.reshape(h, dh, a)) / math.sqrt(dh)
        s_self = (q_eff * query.unsqueeze(-2)).sum(dim=-1, keepdim=True)  # (..., h, 1)
        s_tok = q_eff @ tokens.transpose(-1, -2)  # (..., h, T)
        attn = torch.softmax(torch.cat([s_self, s_tok], dim=-1), dim=-1)
        mixed = attn[..., :1] * query.unsqueeze(-2) + attn[..., 1:] @ tokens  # (..., h, a): sum_j a_hj m_j
        out = torch.einsum("...ha,hda->...hd", mixed, self.w_v.weight.reshape(h, dh, a)) + self.w_v.bias.reshape(h, dh)
        return self.w_o(out.reshape(*lead, a))


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
