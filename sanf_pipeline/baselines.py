"""Baselines on the same cache as the flow, writing the same result files (METHOD.md section 5).

Registry (``BASELINES``, extend with ``register_baseline``):

- ``knn``: mean Euclidean distance to the k = 2 nearest normal training class tokens (PANDA/MSAD default).
- ``knn-l2``: the same on L2-normalised class tokens.
- ``gaussian``: squared Mahalanobis distance to a Gaussian fitted on the normal class tokens with the
  Ledoit-Wolf shrinkage covariance (``sklearn.covariance.LedoitWolf``).
- ``gaussian-whiten``: the same on L2-normalised class tokens, i.e. the squared norm of the class tokens after
  ``features.Normalizer("l2+whiten")``: the density an identity-initialised flow with ``normalize=l2+whiten``
  starts from (its NLL is half this plus a constant; tests/test_usability.py).
- ``patch-knn``: PatchCore-style kNN on the *patch* tokens (``patchknn.PatchKNNScorer``).

Each scorer has ``fit(train_cls)``, ``score(test_cls) -> (n,)`` (higher = more anomalous), ``description`` and
optionally ``settings() -> dict`` (reported in ``metrics.json``); a scorer with ``needs_patch = True`` takes the
patch tokens as second argument of ``fit``/``score`` (``fit_score`` passes what each needs). A registered name is
usable from `sanf baseline` and `sanf sweep --methods`; ``jobs.baseline_job`` runs it. The kNN distances are
computed in float64 blocks of test rows with a matrix product, so memory stays bounded for large splits.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import SanfError
from .patchknn import PatchKNNScorer

_BLOCK = 1024


def _l2(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class KNNScorer:
    def __init__(self, k: int = 2, l2: bool = False):
        self.k, self.l2 = int(k), bool(l2)
        self.description = (f"mean Euclidean distance to the {self.k} nearest normal training class tokens"
                            + (" (L2-normalised)" if self.l2 else ""))

    def fit(self, train: np.ndarray) -> KNNScorer:
        train = np.asarray(train, np.float64)
        if len(train) < self.k:
            raise SanfError(f"kNN with k={self.k} needs at least {self.k} training samples, got {len(train)}")
        self.train = _l2(train) if self.l2 else train
        self.train_sq = (self.train ** 2).sum(axis=1)
        return self

    def settings(self) -> dict:
        return {"k": self.k, "l2": self.l2}

    def arrays(self) -> dict[str, np.ndarray]:
        """The fitted state a detector needs (saved as ``baseline.*`` tensors by the run job)."""
        return {"train": self.train, "k": np.asarray(self.k), "l2": np.asarray(int(self.l2))}

    def score(self, test: np.ndarray) -> np.ndarray:
        test = np.asarray(test, np.float64)
        test = _l2(test) if self.l2 else test
        out = np.empty(len(test))
        for start in range(0, len(test), _BLOCK):
            t = test[start:start + _BLOCK]
            d2 = (t ** 2).sum(axis=1)[:, None] + self.train_sq[None, :] - 2.0 * t @ self.train.T
            part = np.partition(np.maximum(d2, 0.0), self.k - 1, axis=1)[:, : self.k]
            out[start:start + len(t)] = np.sqrt(part).mean(axis=1)
        return out


class GaussianScorer:
    def __init__(self, l2: bool = False):
        self.l2 = bool(l2)
        self.description = ("squared Mahalanobis distance to a Gaussian with Ledoit-Wolf shrinkage covariance"
                            + (" on L2-normalised class tokens (the flow's l2+whiten starting density)"
                               if self.l2 else ""))

    def fit(self, train: np.ndarray) -> GaussianScorer:
        from sklearn.covariance import LedoitWolf

        train = np.asarray(train, np.float64)
        train = _l2(train) if self.l2 else train
        if len(train) < 2:
            raise SanfError(f"the Gaussian baseline needs at least 2 training samples, got {len(train)}")
        self.model = LedoitWolf().fit(train)
        self.shrinkage = float(self.model.shrinkage_)
        return self

    def settings(self) -> dict:
        return {"shrinkage": self.shrinkage}

    def arrays(self) -> dict[str, np.ndarray]:
        if self.l2:  # detector.GaussianHead does not L2-normalise: no detector for gaussian-whiten (yet)
            return {}
        return {"location": self.model.location_, "precision": self.model.precision_}

    def score(self, test: np.ndarray) -> np.ndarray:
        test = np.asarray(test, np.float64)
        return self.model.mahalanobis(_l2(test) if self.l2 else test)


BASELINES: dict[str, Callable[..., object]] = {
    "knn": lambda k=2: KNNScorer(k=k, l2=False),
    "knn-l2": lambda k=2: KNNScorer(k=k, l2=True),
    "gaussian": GaussianScorer,
    "gaussian-whiten": lambda: GaussianScorer(l2=True),
    "patch-knn": PatchKNNScorer,
}


def scorer_settings(scorer) -> dict:
    """The settings a scorer reports in ``metrics.json`` (``settings()`` when it has one)."""
    settings = getattr(scorer, "settings", None)
    return dict(settings()) if callable(settings) else {}


def scorer_arrays(scorer) -> dict[str, np.ndarray]:
    """The fitted state of a scorer (``arrays()`` when it has one; empty: the run cannot be used as a detector)."""
    arrays = getattr(scorer, "arrays", None)
    return dict(arrays()) if callable(arrays) else {}


def register_baseline(name: str, factory: Callable[[], object]) -> None:
    BASELINES[name] = factory


def create_baseline(name: str, **options):
    """A fresh scorer; ``options`` go to its factory (e.g. ``coreset``/``neighbourhood`` for patch-knn)."""
    if name not in BASELINES:
        raise SanfError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    try:
        return BASELINES[name](**options)
    except TypeError:
        raise SanfError(f"baseline {name!r} takes no options {', '.join(options)}") from None


def needs_patch(method: str) -> bool:
    """Whether baseline ``method`` scores patch tokens (so its caller must read them from the cache)."""
    return bool(getattr(create_baseline(method), "needs_patch", False))


def fit_score(scorer, train_cls: np.ndarray, test_cls: np.ndarray, train_patch=None, test_patch=None) -> np.ndarray:
    """Fit ``scorer`` on the normal training features and score the test features (patch tokens if it needs them)."""
    if getattr(scorer, "needs_patch", False):
        return scorer.fit(train_cls, train_patch).score(test_cls, test_patch)
    return scorer.fit(train_cls).score(test_cls)


def score_baseline(method: str, train_cls: np.ndarray, test_cls: np.ndarray, train_patch=None,
                   test_patch=None) -> np.ndarray:
    """Fit baseline ``method`` on the normal training features and score the test features (pure)."""
    return fit_score(create_baseline(method), train_cls, test_cls, train_patch, test_patch)
