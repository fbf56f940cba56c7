"""Baselines on the same cache as the flow, writing the same result files (METHOD.md section 5).

Registry (``BASELINES``, extend with ``register_baseline``):

- ``knn``: mean Euclidean distance to the k = 2 nearest normal training class tokens (PANDA/MSAD default).
- ``knn-l2``: the same on L2-normalised class tokens.
- ``gaussian``: squared Mahalanobis distance to a Gaussian fitted on the normal class tokens with the
  Ledoit-Wolf shrinkage covariance (``sklearn.covariance.LedoitWolf``).

Each scorer has ``fit(train_cls)`` and ``score(test_cls) -> (n,)`` (higher = more anomalous). The kNN distances
are computed in float64 blocks of test rows with a matrix product, so memory stays bounded for large splits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SanfError

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
    description = "squared Mahalanobis distance to a Gaussian with Ledoit-Wolf shrinkage covariance"

    def fit(self, train: np.ndarray) -> GaussianScorer:
        from sklearn.covariance import LedoitWolf

        train = np.asarray(train, np.float64)
        if len(train) < 2:
            raise SanfError(f"the Gaussian baseline needs at least 2 training samples, got {len(train)}")
        self.model = LedoitWolf().fit(train)
        self.shrinkage = float(self.model.shrinkage_)
        return self

    def score(self, test: np.ndarray) -> np.ndarray:
        return self.model.mahalanobis(np.asarray(test, np.float64))


BASELINES: dict[str, Callable[[], object]] = {
    "knn": lambda: KNNScorer(k=2, l2=False),
    "knn-l2": lambda: KNNScorer(k=2, l2=True),
    "gaussian": GaussianScorer,
}


def register_baseline(name: str, factory: Callable[[], object]) -> None:
    BASELINES[name] = factory


def create_baseline(name: str):
    if name not in BASELINES:
        raise SanfError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    return BASELINES[name]()


def score_baseline(method: str, train_cls: np.ndarray, test_cls: np.ndarray) -> np.ndarray:
    """Fit baseline ``method`` on the normal training class tokens and score the test class tokens (pure)."""
    return create_baseline(method).fit(train_cls).score(test_cls)


@dataclass
class BaselineRun:
    out_dir: Path
    metrics: dict
    paths: dict
    scores: np.ndarray


def baseline_run(cache, normal_class, method: str, out_dir=None, *, overwrite: bool = False,
                 plots: bool = True, fpr: float = 0.01) -> BaselineRun:
    """Fit a baseline on the normal class's training class tokens, score the test split, write the results."""
    from .cache import open_cache
    from .evaluate import compute_metrics, guard_results, write_results
    from .runs import cache_identity, check_finite, default_run_name, now, package_versions, write_json_atomic

    scorer = create_baseline(method)
    c = open_cache(cache)
    try:
        ci = c.class_index(normal_class)
        name = c.class_names[ci]
        out_dir = Path(out_dir) if out_dir else default_run_name(cache, name, f"-{method}")
        train, _ = c.split("train").read_class(ci, patch=False)
        if len(train) == 0:
            raise SanfError(f"class {name!r} has no valid training samples in {c.path}")
        check_finite(f"the training features of class {name!r} in {c.path}", train)
        test, _, labels, sample_ids = c.split("test").read_all(patch=False)
        check_finite(f"the test features in {c.path}", test)
        identity = cache_identity(c)
    finally:
        c.close()
    if out_dir.exists() and not out_dir.is_dir():
        raise SanfError(f"{out_dir} exists and is not a folder; choose another --out")
    guard = {"method": method, "score": method, "normal_class": ci, "cache_fingerprint": identity["fingerprint"]}
    guard_results(out_dir, guard, overwrite)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SanfError(f"cannot create {out_dir}: {exc.strerror or exc}; choose another --out") from None
    scores = scorer.fit(train).score(test)
    is_anomaly = labels != ci
    metrics = compute_metrics(is_anomaly, scores)
    metrics.update(guard)
    metrics.update({"normal_class_name": name, "score_description": scorer.description,
                    "epoch_selection": "not applicable (no training epochs; fitted on normal training data only)",
                    "n_train": int(len(train)), "cache": str(cache), "evaluated": now(),
                    "settings": {"method": method, **({"k": scorer.k, "l2": scorer.l2}
                                                       if isinstance(scorer, KNNScorer) else {})}})
    if isinstance(scorer, GaussianScorer):
        metrics["settings"]["shrinkage"] = scorer.shrinkage
    from .calibration import calibrate_baseline, eval_threshold_metrics
    from .detector import save_baseline_model

    calibration = calibrate_baseline(method, train, fpr=fpr)
    metrics.update(eval_threshold_metrics(calibration, method, is_anomaly, scores))
    config = {"format": "sanf-baseline", "format_version": 1, "method": method, "normal_class": ci,
              "normal_class_name": name, "cache": identity, "created": now(), "versions": package_versions(),
              "calibration": calibration}
    write_json_atomic(out_dir / "config.json", config)
    save_baseline_model(out_dir, scorer, config)  # so that `sanf score` / `sanf export` can use it
    paths = write_results(out_dir, metrics, sample_ids, labels, is_anomaly, scores, plots=plots)
    return BaselineRun(out_dir=out_dir, metrics=metrics, paths=paths, scores=scores)
