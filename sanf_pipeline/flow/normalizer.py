"""Input preparation of cached features, fitted on the normal class's training data only: optional average
pooling of the patch-token grid (``token_pool``), then normalisation.

Pooling (``token_pool=K``): the cached ``(n, H*W, d)`` patch tokens of a square ``H x W`` grid are averaged in
KxK windows (``tokens.pool_tokens``, the same operation as ``sanf extract --pool``), so one fine-grid cache
serves runs at several grid sizes; the official SANF code pooled ViT-B/16's 24x24 grid 3x3 to 8x8. It is part of
the fitted transform, stored with the run, so evaluation pools exactly as training did.

Methods (``NORMALIZATIONS``):

- ``none``: features as cached.
- ``l2``: every vector divided by its L2 norm (as kNN baselines do).
- ``standardize``: every channel centred and divided by its standard deviation.
- ``l2+whiten`` (the default): L2 first, then ZCA whitening of the class tokens with a Ledoit-Wolf shrinkage
  covariance (patch tokens: L2 + per-channel standardisation). Chosen over l2+standardize by measurement
  (benchmarks/normalization.md; CIFAR-10 in benchmarks/quality_cifar10.md).
  The flow then starts (identity init) exactly at the ``gaussian-whiten`` baseline's density and training
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

import numpy as np
import torch
from torch import nn

from ..errors import SanfError
from ..tokens import pool_tokens

NORMALIZATIONS = ("none", "l2", "standardize", "l2+standardize", "l2+whiten")
_L2_EPS = 1e-12
_STD_REL_FLOOR = 1e-6
_DEGENERATE_VAR = 1e-24  # largest covariance eigenvalue below which the class tokens are taken as all equal
_BLOCK_ROWS = 65536
PREFIX = "normalizer."


def _torch_l2(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(_L2_EPS)


def channel_stats(x, l2: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (float64, two passes over row blocks) of the vectors of ``x`` (``(..., d)``, a
    numpy array or a tensor on any device), L2-normalised first if ``l2``. The one implementation: the normaliser's
    fit on host arrays and the stacked trainer on its device copy of the tokens. A (near) constant channel gets
    std 1 (only centred)."""
    flat = x.reshape(-1, x.shape[-1]) if torch.is_tensor(x) else np.asarray(x).reshape(-1, x.shape[-1])
    n = max(int(flat.shape[0]), 1)
    device = flat.device if torch.is_tensor(flat) else "cpu"

    def rows():
        for start in range(0, flat.shape[0], _BLOCK_ROWS):
            b = flat[start:start + _BLOCK_ROWS]
            b = b.to(torch.float64) if torch.is_tensor(b) else torch.from_numpy(np.array(b, dtype=np.float64))
            yield _torch_l2(b) if l2 else b

    total = torch.zeros(flat.shape[1], dtype=torch.float64, device=device)
    for b in rows():
        total += b.sum(0)
    mean = total / n
    sq = torch.zeros_like(total)
    for b in rows():
        sq += (b - mean).pow(2).sum(0)
    std = (sq / n).sqrt().cpu().numpy()
    floor = max(np.finfo(np.float64).tiny, _STD_REL_FLOOR * float(std.max(initial=0.0)))
    return mean.cpu().numpy(), np.where(std < floor, 1.0, std)


def _zca(centered: np.ndarray) -> np.ndarray:
    """C^{-1/2} of the Ledoit-Wolf shrinkage covariance: well conditioned even with fewer samples than dims."""
    from sklearn.covariance import LedoitWolf

    cov = LedoitWolf(assume_centered=True).fit(centered).covariance_
    evals, evecs = np.linalg.eigh(cov)
    if float(evals.max(initial=0.0)) < _DEGENERATE_VAR:
        # identical training vectors: nothing to whiten, and C^{-1/2} of a zero matrix would blow the float rounding
        # of (x - mean) up to inf (constant channels are likewise only centred, see channel_stats)
        return np.eye(len(cov))
    evals = np.maximum(evals, float(evals.max()) * 1e-12)
    return (evecs * evals ** -0.5) @ evecs.T


def check_method(method: str) -> str:
    if method not in NORMALIZATIONS:
        raise SanfError(f"unknown normalisation {method!r}; choose one of {', '.join(NORMALIZATIONS)}")
    return method


def check_token_pool(k) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise SanfError(f"token_pool must be a positive integer, got {k!r}")
    return k


def _check_pool_grid(t: int, h: int, k: int) -> None:
    if h * h != t:
        raise SanfError(f"token_pool={k} needs a square patch grid; the cache has {t} tokens per image")
    if h % k:
        raise SanfError(f"token_pool={k} does not divide the {h}x{h} patch grid of the cache; choose a divisor "
                        f"of {h}")


def pool_square_grid(patch: np.ndarray, k: int) -> np.ndarray:
    """``(n, H*H, d)`` tokens of a square grid -> ``(n, (H/k)^2, d)`` float32, averaged in KxK windows."""
    n, t, d = patch.shape
    h = int(round(t ** 0.5))
    _check_pool_grid(t, h, k)
    out = np.empty((n, t // (k * k), d), dtype=np.float32)
    for start in range(0, n, 1024):  # bounded float32 copies of a float16 cache block
        block = torch.from_numpy(np.array(patch[start:start + 1024], dtype=np.float32))  # a writable copy
        out[start:start + len(block)] = pool_tokens(block, (h, h), k).numpy()
    return out


_STATS = ("cls_mean", "cls_std", "patch_mean", "patch_std", "cls_whiten")


def pool_grid(patch: torch.Tensor, k: int) -> torch.Tensor:
    """KxK average pooling of ``(B, H*H, d)`` tokens of a square grid (``token_pool``); float32."""
    if k == 1:
        return patch
    t = patch.shape[1]
    h = int(round(float(t) ** 0.5))  # float(): a traced shape (detector export) is a 0-d tensor
    if not torch.jit.is_tracing():
        _check_pool_grid(int(t), h, k)
    return pool_tokens(patch.to(torch.float32), (h, h), k)


class Normalizer(nn.Module):
    """A fitted input normalisation, the one implementation for fitting, scoring and export: ``forward(cls, patch)``
    on tensors (float64 inside, float32 out), ``transform(cls, patch)`` on numpy arrays (the same ops in row
    blocks). The fitted statistics are float64 buffers, saved as ``normalizer.*`` tensors with a run."""

    def __init__(self, method: str = "l2+standardize", token_pool: int = 1):
        super().__init__()
        self.method, self.token_pool = check_method(method), check_token_pool(token_pool)
        for name in _STATS:
            self.register_buffer(name, None)

    def __setattr__(self, name, value):
        if name in _STATS and isinstance(value, np.ndarray):  # fitted statistics arrive as float64 arrays
            value = torch.from_numpy(np.ascontiguousarray(value, dtype=np.float64))
        super().__setattr__(name, value)

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
        norm = cls(method, token_pool)
        patch = norm.pool(patch)
        if norm.standardize:
            norm.cls_mean, norm.cls_std = channel_stats(np.asarray(cls_tokens), norm.l2)
            if patch is not None:
                norm.patch_mean, norm.patch_std = channel_stats(np.asarray(patch), norm.l2)
        if norm.whiten:
            mean = norm.cls_mean.numpy()
            norm.cls_std = np.ones_like(mean)
            x = torch.from_numpy(np.asarray(cls_tokens, dtype=np.float64))
            norm.cls_whiten = _zca(_torch_l2(x).numpy() - mean)
        return norm

    # -- the transform (tensors) --------------------------------------------------------------------------------
    def _normalize(self, x: torch.Tensor, mean, std, whiten: torch.Tensor | None = None) -> torch.Tensor:
        if self.standardize and mean is None:
            raise SanfError("the normaliser was fitted without patch tokens; refit the run with patch tokens")
        x = x.to(torch.float64)
        if self.l2:
            x = _torch_l2(x)
        if self.standardize:
            x = (x - mean) / std
        if whiten is not None:
            x = x @ whiten
        return x.to(torch.float32)

    def normalize_cls(self, cls_tokens: torch.Tensor) -> torch.Tensor:
        return self._normalize(cls_tokens, self.cls_mean, self.cls_std, self.cls_whiten if self.whiten else None)

    def normalize_patch(self, patch: torch.Tensor) -> torch.Tensor:
        """Pooled, then normalised patch tokens ``(B, T', d)``."""
        return self._normalize(pool_grid(patch, self.token_pool), self.patch_mean, self.patch_std)

    # the patch transform in two stages, for K flows of one method that share one copy of the tokens (stack.py):
    # pooling + L2 are the same for all of them, only the standardisation is per flow (done in float32 there, so
    # a stacked flow sees its inputs rounded once more than a single fit: equal to 1e-5, tests/test_stack.py)
    def shared_patch(self, patch: torch.Tensor) -> torch.Tensor:
        """Stage one: pooled and, for the l2 methods, L2-normalised tokens (float64 inside, float32 out)."""
        x = pool_grid(patch, self.token_pool).to(torch.float64)
        return (_torch_l2(x) if self.l2 else x).to(torch.float32)

    def standardize_shared(self, p: torch.Tensor) -> torch.Tensor:
        """Stage two on stage one's tokens: this normaliser's per-channel standardisation (float32)."""
        if not self.standardize:
            return p
        return (p - self.patch_mean.to(p)) / self.patch_std.to(p)

    def forward(self, cls_tokens: torch.Tensor, patch: torch.Tensor | None = None):
        return self.normalize_cls(cls_tokens), None if patch is None else self.normalize_patch(patch)

    # -- the same transform on numpy arrays, in row blocks (a split never gets a float64 copy) -------------------
    def _blocked(self, fn, x: np.ndarray, rows: int) -> np.ndarray:
        dtype = np.float64 if x.dtype == np.float64 else np.float32  # float16 caches: exact in float32
        parts = [fn(torch.from_numpy(np.array(x[s:s + rows], dtype=dtype))).numpy()
                 for s in range(0, len(x), rows)]
        return np.concatenate(parts) if parts else fn(torch.zeros((0, *x.shape[1:]))).numpy()

    def transform_cls(self, cls_tokens: np.ndarray) -> np.ndarray:
        return self._blocked(self.normalize_cls, np.asarray(cls_tokens), _BLOCK_ROWS)

    def pool(self, patch: np.ndarray | None) -> np.ndarray | None:
        """Average-pool the square patch-token grid ``token_pool`` x ``token_pool`` (no-op for 1 or None)."""
        if patch is None or self.token_pool == 1:
            return patch
        return pool_square_grid(patch, self.token_pool)

    def transform_patch(self, patch: np.ndarray | None) -> np.ndarray | None:
        if patch is None:
            return None
        patch = np.asarray(patch)
        return self._blocked(self.normalize_patch, patch, max(1, _BLOCK_ROWS // max(1, patch.shape[1])))

    def transform(self, cls_tokens: np.ndarray, patch: np.ndarray | None = None):
        return self.transform_cls(cls_tokens), self.transform_patch(patch)

    # -- persistence: tensors + a JSON-able config, never pickles ---------------------------------------------
    def config(self) -> dict:
        return {"method": self.method, "has_patch_stats": self.patch_mean is not None, "token_pool": self.token_pool}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fitted statistics as ``normalizer.*`` float64 tensors (the run's model file)."""
        return {PREFIX + k: v.to(torch.float64).contiguous() for k, v in self.state_dict().items()}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor]) -> Normalizer:
        """Rebuild from ``config()`` and tensors keyed ``normalizer.<name>`` (a model file) or ``<name>``."""
        norm = cls(str(config.get("method")), config.get("token_pool", 1))
        for name in _STATS:
            t = tensors.get(PREFIX + name, tensors.get(name))
            if t is not None:
                setattr(norm, name, t.to(torch.float64))
        if (norm.standardize and norm.cls_mean is None) or (norm.whiten and norm.cls_whiten is None):
            raise SanfError(f"the run's model file lacks the {norm.method} statistics; it is damaged, refit the run")
        return norm
