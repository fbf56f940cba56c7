"""``knn`` and ``knn-l2``: the mean Euclidean distance of a class token to its k = 2 nearest normal training class
tokens (PANDA/MSAD's default), on the tokens as cached or L2-normalised. Float64 throughout; the test rows come in
batches, so the distance matrix is batch x training rows."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SanfError
from .base import AnomalyModel


def l2_rows(x: torch.Tensor) -> torch.Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp_min(1e-12)


class KNN(AnomalyModel):
    name = "knn"
    batch_size = 1024

    def __init__(self, k: int = 2, l2: bool = False):
        super().__init__()
        self.k, self.l2 = int(k), bool(l2)
        if self.k < 1:
            raise SanfError(f"kNN needs k >= 1, got {k}")
        if self.l2:
            self.name = "knn-l2"
        self.register_buffer("train_tokens", torch.zeros(0, 0, dtype=torch.float64))

    @property
    def description(self) -> str:
        return (f"mean Euclidean distance to the {self.k} nearest normal training class tokens"
                + (" (L2-normalised)" if self.l2 else ""))

    def settings(self) -> dict:
        return {"k": self.k, "l2": self.l2}

    def config(self) -> dict:
        return {"method": self.name, "k": self.k, "l2": self.l2}

    @classmethod
    def from_config(cls, config: dict) -> KNN:
        return cls(config.get("k", 2), config.get("l2", config.get("method") == "knn-l2"))

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(torch.float64)
        return l2_rows(x) if self.l2 else x

    def fit(self, cls, patch=None, *, device="cpu", quiet: bool = True) -> KNN:
        if len(cls) < self.k:
            raise SanfError(f"kNN with k={self.k} needs at least {self.k} training samples, got {len(cls)}")
        self.train_tokens = self._prepare(torch.from_numpy(np.asarray(cls, np.float64)).to(device))
        return self

    def parts(self, cls: torch.Tensor, patch=None) -> dict[str, torch.Tensor]:
        x, t = self._prepare(cls), self.train_tokens
        d2 = (x * x).sum(-1, keepdim=True) + (t * t).sum(-1)[None, :] - 2.0 * x @ t.T
        near = torch.topk(d2.clamp_min(0.0), self.k, dim=1, largest=False).values
        return {"score": near.sqrt().mean(dim=1)}
