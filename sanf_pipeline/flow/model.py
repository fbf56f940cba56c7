"""The SANF flow stack and the Gaussian log-likelihood.

Owns ``SANFlow`` (``blocks`` coupling layers, their seeded permutations, input layout and validation) and
``log_likelihood``. No training, no files: ``config()`` returns the constructor kwargs so that a run folder
can store them as JSON next to ``state_dict()`` and rebuild the model with ``SANFlow(**cfg)``.

Layouts (``main_input``):

- ``"semantic"`` (the method): the flow transforms the class feature ``x (B, dim)``; the patch tokens
  ``(B, T, patch_dim)`` are the context every FFM attends to. ``z`` is ``(B, dim)``.
- ``"spatial"`` (paper Table 4 ablation): the flow transforms the patch tokens; the class feature enters every
  FFM as a single context token. The couplings act per token (weights shared over tokens, each token
  conditioned on its own image's class feature only), which keeps the Jacobian block-diagonal, the inverse
  exact and the cost linear in ``T``; a dense coupling over all ``T * patch_dim`` channels would need
  ``T * patch_dim``-wide MLPs. ``z`` is returned flattened token-major, ``(B, T * patch_dim)``, and ``logdet``
  summed over tokens, so ``log_likelihood`` is one density per image exactly as in the semantic layout.

The permutations are drawn once from ``seed`` with a local ``torch.Generator`` (the global RNG is neither
used nor disturbed) and stored as buffers, so a saved state_dict carries them. Weight initialisation uses
the global RNG as usual in PyTorch (the caller seeds it); the last layer of every FFM is zero, so at
initialisation each layer only permutes channels: ``z`` is ``x`` with its channels permuted and
``logdet = 0``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from .coupling import SPATIAL_CHANNELS, CouplingLayer
from .fusion import FUSION_MODES

MAIN_INPUTS = ("semantic", "spatial")

_LOG_2PI = math.log(2.0 * math.pi)


def log_likelihood(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """``log p(x) = -||z||^2 / 2 - (d / 2) log(2 pi) + logdet`` per sample, ``d = z.shape[-1]``; ``(B,)``.

    Computed in at least float32, also when ``z`` comes from an autocast region.
    """
    dtype = torch.promote_types(z.dtype, torch.float32)
    z = z.to(dtype)
    d = z.shape[-1]
    return -0.5 * z.pow(2).sum(dim=-1) - 0.5 * d * _LOG_2PI + logdet.to(dtype)


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


class SANFlow(nn.Module):
    """SANF normalizing flow: ``z, logdet = flow(x, patch)``; ``flow.inverse(z, context)``."""

    def __init__(
        self,
        dim: int,
        patch_dim: int,
        num_tokens: int,
        blocks: int = 4,
        fusion: str = "semantic",
        clamp: float = 2.0,
        hidden: int = 1024,
        heads: int = 1,
        spatial_channels: str = "half",
        main_input: str = "semantic",
        attn_dim: int | None = None,
        seed: int = 0,
    ):
        super().__init__()
        for name, value in [
            ("dim", dim),
            ("patch_dim", patch_dim),
            ("num_tokens", num_tokens),
            ("blocks", blocks),
            ("hidden", hidden),
            ("heads", heads),
        ]:
            _positive_int(name, value)
        if attn_dim is not None:
            _positive_int("attn_dim", attn_dim)
        if fusion not in FUSION_MODES:
            raise ValueError(f"unknown fusion mode {fusion!r}; choose one of {sorted(FUSION_MODES)}")
        if spatial_channels not in SPATIAL_CHANNELS:
            raise ValueError(
                f"unknown spatial_channels {spatial_channels!r}; choose one of {SPATIAL_CHANNELS}"
            )
        if main_input not in MAIN_INPUTS:
            raise ValueError(f"unknown main_input {main_input!r}; choose one of {MAIN_INPUTS}")
        if isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not 0 < clamp < math.inf:
            raise ValueError(f"clamp (soft clamp alpha) must be a finite number > 0, got {clamp!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        if spatial_channels == "half" and patch_dim != dim:
            raise ValueError(
                f"spatial_channels='half' gives each FFM the patch-token channels matching its half of the "
                f"class feature, so patch_dim must equal dim (got dim={dim}, patch_dim={patch_dim}); "
                f"use spatial_channels='full' for tokens of another width"
            )
        main_dim, ctx_dim = (dim, patch_dim) if main_input == "semantic" else (patch_dim, dim)
        if main_dim < 2:
            raise ValueError(f"the flow's input needs at least 2 channels to split in halves, got {main_dim}")
        if FUSION_MODES[fusion].uses_attention:
            # Each FFM attends in width attn_dim or, by default, the width of the context tokens it sees.
            half = spatial_channels == "half"
            halves = {main_dim // 2, main_dim - main_dim // 2}
            widths = {attn_dim} if attn_dim else (halves if half else {ctx_dim})
            for width in sorted(widths):
                if width % heads:
                    raise ValueError(
                        f"heads={heads} must divide the attention width {width} (attn_dim, by default the "
                        f"width of the context tokens each FFM sees: {sorted(widths)}); "
                        f"choose another heads or set attn_dim"
                    )

        self._config = dict(
            dim=dim,
            patch_dim=patch_dim,
            num_tokens=num_tokens,
            blocks=blocks,
            fusion=fusion,
            clamp=float(clamp),
            hidden=hidden,
            heads=heads,
            spatial_channels=spatial_channels,
            main_input=main_input,
            attn_dim=attn_dim,
            seed=seed,
        )
        self.dim, self.patch_dim, self.num_tokens = dim, patch_dim, num_tokens
        self.main_input, self.fusion = main_input, fusion
        self.main_dim, self.ctx_dim = main_dim, ctx_dim
        # Size of z per sample, the d of log_likelihood.
        self.z_dim = dim if main_input == "semantic" else num_tokens * patch_dim

        gen = torch.Generator().manual_seed(seed)  # local: reproducible and leaves the global RNG alone
        self.layers = nn.ModuleList(
            CouplingLayer(
                main_dim,
                ctx_dim,
                torch.randperm(main_dim, generator=gen),
                fusion=fusion,
                clamp=clamp,
                hidden=hidden,
                heads=heads,
                spatial_channels=spatial_channels,
                attn_dim=attn_dim,
            )
            for _ in range(blocks)
        )

    def config(self) -> dict[str, Any]:
        """JSON-able constructor kwargs: ``SANFlow(**flow.config())`` rebuilds the same architecture."""
        return dict(self._config)

    @property
    def permutations(self) -> list[torch.Tensor]:
        """The fixed channel permutation of each layer (views of the buffers)."""
        return [layer.perm for layer in self.layers]

    # -- layout --------------------------------------------------------------------------------------------

    def _check(self, name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor | None:
        if t is None:
            if self.fusion != "none":
                raise ValueError(f"{name} is required with fusion={self.fusion!r}")
            return None
        if t.dim() != len(shape) or any(w not in (-1, g) for w, g in zip(shape, t.shape, strict=True)):
            want = "(" + ", ".join("B" if s == -1 else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
        return t

    def _main_and_context(
        self, x: torch.Tensor | None, patch: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Main input (..., main_dim) and context tokens (..., T_c, ctx_dim) for the coupling layers."""
        tokens = (-1, self.num_tokens, self.patch_dim)
        if self.main_input == "semantic":
            if x is None:
                raise ValueError("x (the class feature) is required")
            return self._check("x", x, (-1, self.dim)), self._check("patch", patch, tokens)
        if patch is None:
            raise ValueError("patch (the patch tokens) is required with main_input='spatial'")
        patch = self._check("patch", patch, tokens)
        x = self._check("x", x, (-1, self.dim))
        # One context token per image, broadcast over its T patch tokens: (B, 1, 1, dim).
        return patch, None if x is None else x[:, None, None, :]

    def _context_frames(self, ctx: torch.Tensor | None) -> list[torch.Tensor | None]:
        frames = []
        for layer in self.layers:
            ctx = layer.permute_context(ctx)
            frames.append(ctx)
        return frames

    # -- the flow ------------------------------------------------------------------------------------------

    def forward(
        self, x: torch.Tensor | None, patch: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``x (B, dim)``, ``patch (B, T, patch_dim)`` -> ``z (B, z_dim)``, ``logdet (B,)`` in one pass.

        ``patch`` (semantic layout) or ``x`` (spatial layout) may be None only with ``fusion="none"``.
        """
        h, ctx = self._main_and_context(x, patch)
        logdet = h.new_zeros(h.shape[:-1])
        for layer, frame in zip(self.layers, self._context_frames(ctx), strict=True):
            h, ld = layer(h, frame)
            logdet = logdet + ld
        if self.main_input == "spatial":
            h, logdet = h.reshape(h.shape[0], -1), logdet.sum(dim=-1)
        return h, logdet

    def token_log_likelihood(self, x: torch.Tensor | None, patch: torch.Tensor) -> torch.Tensor:
        """Spatial layout only: ``log p`` of every patch token given its image's class feature, ``(B, T)``.

        The image's ``log_likelihood(*forward(x, patch))`` is the sum of these over its tokens (the couplings
        act per token). Scoring an image by its least likely token instead of the sum keeps a defect that
        covers a few tokens from being averaged away by the many normal ones.
        """
        if self.main_input != "spatial":
            raise ValueError("token_log_likelihood needs main_input='spatial' (the flow over the patch tokens)")
        h, ctx = self._main_and_context(x, patch)
        logdet = h.new_zeros(h.shape[:-1])
        for layer, frame in zip(self.layers, self._context_frames(ctx), strict=True):
            h, ld = layer(h, frame)
            logdet = logdet + ld
        return log_likelihood(h, logdet)

    def inverse(self, z: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Invert ``forward`` given the input that conditioned it.

        Semantic layout: ``inverse(z (B, dim), patch (B, T, patch_dim)) -> x (B, dim)``.
        Spatial layout: ``inverse(z (B, T * patch_dim), x (B, dim)) -> patch (B, T, patch_dim)``.
        """
        if self.main_input == "semantic":
            h, ctx = self._main_and_context(z, context)
        else:
            z = self._check("z", z, (-1, self.z_dim))
            h, ctx = self._main_and_context(context, z.reshape(z.shape[0], self.num_tokens, self.patch_dim))
        for layer, frame in zip(reversed(self.layers), reversed(self._context_frames(ctx)), strict=True):
            h = layer.inverse(h, frame)
        return h

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self._config.items())
