"""Input preparation of cached features, fitted on the normal class's training data only: optional average
pooling of the patch-token grid (``token_pool``), then normalisation.

Pooling (``token_pool=K``): the cached ``(n, H*W, d)`` patch tokens of a square ``H x W`` grid are averaged in
KxK windows (``backbones.pool_tokens``, the same operation as ``sanf extract --pool``), so one fine-grid cache
serves runs at several grid sizes; the official SANF code pooled ViT-B/16's 24x24 grid 3x3 to 8x8. It is part of
the fitted transform, stored with the run, so evaluation pools exactly as training did.

Methods (``NORMALIZATIONS``):

- ``none``: features as cached.
- ``l2``: every vector divided by its L2 norm (as kNN baselines do).
- ``standardize``: every channel centred and divided by its standard deviation.
- ``l2+whiten`` (the default): L2 first, then ZCA whitening of the class tokens with a Ledoit-Wolf shrinkage
  covariance (patch tokens: L2 + per-channel standardisation). Chosen over l2+standardize by measurement
  (benchmarks/normalization.md; CIFAR-10 in benchmarks/quality_cifar10.md).
  The flow then starts (identity init) exactly at the shrinkage-Gaussian baseline's density and training
  can only move it by what held-out NLL rewards; ZCA keeps channels aligned with the original ones, so
  ``spatial_channels="half"`` pairing still holds.
- ``l2+standardize``: L2 first, then standardise with the statistics of the
  L2-normalised training features; METHOD.md section 6 found it the best of the simple inputs for the flow on
  class features.

Class tokens and patch tokens are normalised the same way but separately:

- class tokens ``(n, d)``: L2 per vector, statistics per channel over the ``n`` training vectors;
- patch tokens ``(n, T, d_p)``: L2 per token vector, statistics per channel pooled over all ``n * T``
  training tokens (every position shares one mean/std: positions of a pooled grid are exchangeable enough,
  and ``T`` times more samples make the statistics stable with few training images). Channels keep their
  order, so ``spatial_channels="half"`` still pairs each class-token channel with the same patch channel.

Channels whose training standard deviation is (near) zero, e.g. constant features, are only centred
(std set to 1) so nothing is divided by zero. Statistics are computed in float64; outputs are float32.
The fitted parameters travel with a run as tensors (``state_dict``) plus a JSON config (``config``), so
``Normalizer.from_state`` reproduces the transform exactly at evaluation time.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import SanfError
from .tokens import pool_tokens

NORMALIZATIONS = ("none", "l2", "standardize", "l2+standardize", "l2+whiten")
_L2_EPS = 1e-12
_STD_REL_FLOOR = 1e-6
_BLOCK_ROWS = 65536
PREFIX = "normalizer."


def _l2(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.maximum(norm, _L2_EPS)


def _blocks(x: np.ndarray, rows: int = _BLOCK_ROWS):
    """Row blocks of a (..., d) array viewed as (m, d), so large patch arrays never get a float64 copy."""
    flat = x.reshape(-1, x.shape[-1])
    for start in range(0, len(flat), rows):
        yield flat[start:start + rows]


def _stats(x: np.ndarray, l2: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float64, two passes over row blocks) of x, L2-normalised first if ``l2``."""
    n = int(np.prod(x.shape[:-1]))
    total = np.zeros(x.shape[-1])
    for b in _blocks(x):
        b = b.astype(np.float64)
        total += (_l2(b) if l2 else b).sum(axis=0)
    mean = total / max(n, 1)
    sq = np.zeros(x.shape[-1])
    for b in _blocks(x):
        b = b.astype(np.float64)
        sq += (((_l2(b) if l2 else b) - mean) ** 2).sum(axis=0)
    std = np.sqrt(sq / max(n, 1))
    floor = max(np.finfo(np.float64).tiny, _STD_REL_FLOOR * float(std.max(initial=0.0)))
    std = np.where(std < floor, 1.0, std)
    return mean, std


def _zca(centered: np.ndarray) -> np.ndarray:
    """C^{-1/2} of the Ledoit-Wolf shrinkage covariance: well conditioned even with fewer samples than dims."""
    from sklearn.covariance import LedoitWolf

    cov = LedoitWolf(assume_centered=True).fit(centered).covariance_
    evals, evecs = np.linalg.eigh(cov)
    evals = np.maximum(evals, max(float(evals.max(initial=0.0)), 1e-300) * 1e-12)
    return (evecs * evals ** -0.5) @ evecs.T


def check_method(method: str) -> str:
    if method not in NORMALIZATIONS:
        raise SanfError(f"unknown normalisation {method!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return method


def check_token_pool(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SanfError(f"token_pool must be a positive integer, got {k!r}")
    return k


def pool_square_grid(patch: np.ndarray, k: int) -> np.ndarray:
    """``(n, H*H, d)`` tokens of a square grid -> ``(n, (H/k)^2, d)`` float32, averaged in KxK windows."""
    n, t, d = patch.shape
    h = int(round(t ** 0.5))
    if h * h != t:
        raise SanfError(f"token_pool={k} needs a square patch grid; the cache has {t} tokens per image")
    if h % k:
        raise SanfError(f"token_pool={k} does not divide the {h}x{h} patch grid of the cache; choose a divisor "
                        f"of {h}")
    out = np.empty((n, t // (k * k), d), dtype=np.float32)
    for start in range(0, n, 1024):  # bounded float32 copies of a float16 cache block
        block = torch.from_numpy(np.array(patch[start:start + 1024], dtype=np.float32))  # a writable copy
        out[start:start + len(block)] = pool_tokens(block, (h, h), k).numpy()
    return out


@dataclass
class Normalizer:
    """A fitted input normalisation; ``transform(cls, patch)`` applies it to any split."""

    method: str = "l2+standardize"
    cls_mean: np.ndarray | None = None
    cls_std: np.ndarray | None = None
    patch_mean: np.ndarray | None = None
    patch_std: np.ndarray | None = None
    cls_whiten: np.ndarray | None = None
    token_pool: int = 1

    @property
    def l2(self) -> bool:
        return self.method in ("l2", "l2+standardize", "l2+whiten")

    @property
    def standardize(self) -> bool:
        return self.method in ("standardize", "l2+standardize", "l2+whiten")

    @property
    def whiten(self) -> bool:
        return self.method == "l2+whiten"

    @classmethod
    def fit(cls, method: str, cls_tokens: np.ndarray, patch: np.ndarray | None = None, *,
            token_pool: int = 1) -> Normalizer:
        """Fit on training features (the normal class's training rows only)."""
        norm = cls(check_method(method), token_pool=check_token_pool(token_pool))
        patch = norm.pool(patch)
        if norm.standardize:
            norm.cls_mean, norm.cls_std = _stats(np.asarray(cls_tokens), norm.l2)
            if patch is not None:
                norm.patch_mean, norm.patch_std = _stats(np.asarray(patch), norm.l2)
        if norm.whiten:
            norm.cls_std = np.ones_like(norm.cls_mean)
            norm.cls_whiten = _zca(_l2(np.asarray(cls_tokens, dtype=np.float64)) - norm.cls_mean)
        return norm

    def _apply(self, x: np.ndarray, mean, std, whiten: np.ndarray | None = None) -> np.ndarray:
        x = np.asarray(x)
        if self.standardize and mean is None:
            raise SanfError("the normaliser was fitted without patch tokens; refit the run with patch tokens")
        out = np.empty(x.shape, dtype=np.float32)
        flat = out.reshape(-1, x.shape[-1])
        start = 0
        for b in _blocks(x):  # float64 per block, float32 out
            b = b.astype(np.float64)
            if self.l2:
                b = _l2(b)
            if self.standardize:
                b = (b - mean) / std
            if whiten is not None:
                b = b @ whiten
            flat[start:start + len(b)] = b
            start += len(b)
        return out

    def transform_cls(self, cls_tokens: np.ndarray) -> np.ndarray:
        return self._apply(cls_tokens, self.cls_mean, self.cls_std, self.cls_whiten)

    def pool(self, patch: np.ndarray | None) -> np.ndarray | None:
        """Average-pool the square patch-token grid ``token_pool`` x ``token_pool`` (no-op for 1 or None)."""
        if patch is None or self.token_pool == 1:
            return patch
        return pool_square_grid(patch, self.token_pool)

    def transform_patch(self, patch: np.ndarray | None) -> np.ndarray | None:
        if patch is None:
            return None
        return self._apply(self.pool(patch), self.patch_mean, self.patch_std)

    def transform(self, cls_tokens: np.ndarray, patch: np.ndarray | None = None):
        return self.transform_cls(cls_tokens), self.transform_patch(patch)

    # -- persistence: tensors + a JSON-able config, never pickles ---------------------------------------------
    def config(self) -> dict:
        return {"method": self.method, "has_patch_stats": self.patch_mean is not None, "token_pool": self.token_pool}

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name in ("cls_mean", "cls_std", "patch_mean", "patch_std", "cls_whiten"):
            value = getattr(self, name)
            if value is not None:
                out[PREFIX + name] = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))
        return out

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> Normalizer:
        norm = cls(check_method(str(config.get("method"))), token_pool=check_token_pool(config.get("token_pool", 1)))
        for name in ("cls_mean", "cls_std", "patch_mean", "patch_std", "cls_whiten"):
            t = tensors.get(PREFIX + name)
            if t is not None:
                setattr(norm, name, t.to(torch.float64).numpy())
        if (norm.standardize and norm.cls_mean is None) or (norm.whiten and norm.cls_whiten is None):
            raise SanfError(f"the run's model file lacks the {norm.method} statistics; it is damaged, refit the run")
        return norm
