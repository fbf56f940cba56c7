"""``gaussian`` and ``gaussian-whiten``: the squared Mahalanobis distance of a class token to a Gaussian fitted on the
normal training class tokens with the Ledoit-Wolf shrinkage covariance (``sklearn.covariance.LedoitWolf``: the
fit), on the tokens as cached or L2-normalised. ``gaussian-whiten`` is the density an identity-initialised flow with
``normalize=l2+whiten`` starts from (its NLL is half this plus a constant; tests/test_usability.py)."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SanfError
from .base import AnomalyModel
from .knn import l2_rows


class Gaussian(AnomalyModel):
    name = "gaussian"
    batch_size = 4096

    def __init__(self, l2: bool = False):
        super().__init__()
        self.l2 = bool(l2)
        if self.l2:
            self.name = "gaussian-whiten"
        self.shrinkage: float | None = None
        self.register_buffer("location", torch.zeros(0, dtype=torch.float64))
        self.register_buffer("precision", torch.zeros(0, 0, dtype=torch.float64))

    @property
    def description(self) -> str:
        return ("squared Mahalanobis distance to a Gaussian with Ledoit-Wolf shrinkage covariance"
                + (" on L2-normalised class tokens (the flow's l2+whiten starting density)" if self.l2 else ""))

    def settings(self) -> dict:
        return {"shrinkage": self.shrinkage}

    def config(self) -> dict:
        return {"method": self.name, "l2": self.l2, "shrinkage": self.shrinkage}

    @classmethod
    def from_config(cls, config: dict) -> Gaussian:
        model = cls(config.get("l2", config.get("method") == "gaussian-whiten"))
        model.shrinkage = config.get("shrinkage")
        return model

    def fit(self, cls, patch=None, *, device="cpu", quiet: bool = True) -> Gaussian:
        from sklearn.covariance import LedoitWolf

        x = torch.from_numpy(np.asarray(cls, np.float64))
        x = (l2_rows(x) if self.l2 else x).numpy()
        if len(x) < 2:
            raise SanfError(f"the Gaussian baseline needs at least 2 training samples, got {len(x)}")
        lw = LedoitWolf().fit(x)
        self.shrinkage = float(lw.shrinkage_)
        self.location = torch.from_numpy(lw.location_).to(device)
        self.precision = torch.from_numpy(lw.precision_).to(device)
        return self

    def parts(self, cls: torch.Tensor, patch=None) -> dict[str, torch.Tensor]:
        x = cls.to(torch.float64)
        d = (l2_rows(x) if self.l2 else x) - self.location
        return {"score": ((d @ self.precision) * d).sum(-1)}
