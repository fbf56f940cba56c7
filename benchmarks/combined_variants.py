"""Variants of the combined score, measured offline from a cache without fitting flows (issue 12).

Every default flow run measured kept its untrained epoch 0 (``--keep-initial``), whose NLL is the ``gaussian-whiten``
baseline's score / 2 + a constant, so ``z(gaussian-whiten) + w * z(patch-knn)`` on the flow's held-out split (seed 0)
reproduces the default run's combined score exactly (w = 1; juice_bottle DINOv2: 0.9746 here and in
``benchmarks/quality_combined.md``). Variants: patch tokens raw (the default) or L2-normalised, weight w of the
patch part 1 (the default) or 0.5. Prints one JSON line per cache and class; ``--ntest N`` scores a fixed random
subset of N test images (for CIFAR-10's 10,000).

    python benchmarks/combined_variants.py CACHE CLASS[,CLASS] [--pool K] [--ntest N]
"""

from __future__ import annotations

import argparse
import json

import numpy as np
from sklearn.metrics import roc_auc_score

from sanf_pipeline.cache import open_cache
from sanf_pipeline.flow.normalizer import pool_square_grid
from sanf_pipeline.models import PatchKNN, create_baseline, score_arrays
from sanf_pipeline.train.config import FitConfig

WEIGHTS = (0.5, 1.0)


def _z(held_out: np.ndarray, scores: np.ndarray) -> np.ndarray:
    return (scores - held_out.mean()) / held_out.std(ddof=1)


def _l2(p: np.ndarray) -> np.ndarray:
    return p / np.maximum(np.linalg.norm(p, axis=-1, keepdims=True), 1e-12)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cache")
    ap.add_argument("classes")
    ap.add_argument("--pool", type=int, default=1, help="token_pool of the runs compared (CIFAR-10 DINOv2: 2)")
    ap.add_argument("--ntest", type=int, default=0)
    args = ap.parse_args(argv)
    c = open_cache(args.cache)
    tc, tp, labels, _ = c.split("test").read_all(patch=True)
    if args.ntest and args.ntest < len(tc):
        idx = np.sort(np.random.default_rng(0).choice(len(tc), args.ntest, replace=False))
        tc, tp, labels = tc[idx], tp[idx], labels[idx]
    if args.pool > 1:
        tp = pool_square_grid(tp, args.pool)
    for name in args.classes.split(","):
        ci = c.class_index(name)
        cls, patch = c.split("train").read_class(ci, patch=True)
        if args.pool > 1:
            patch = pool_square_grid(patch, args.pool)
        tr, va = FitConfig().held_out_split(len(cls))
        flow0 = create_baseline("gaussian-whiten").fit(cls[tr])
        fh, ft = score_arrays(flow0, cls[va])["score"], score_arrays(flow0, tc)["score"]
        y = labels != ci
        out = {"cache": args.cache, "class": name, "flow0": roc_auc_score(y, ft)}
        for tag, f in (("raw", lambda a: a), ("l2", _l2)):
            s = PatchKNN().fit(None, f(patch[tr]))
            ph = score_arrays(s, cls[va], f(patch[va]))["score"]
            pt = score_arrays(s, tc, f(tp))["score"]
            out[f"patch_{tag}"] = roc_auc_score(y, pt)
            for w in WEIGHTS:
                out[f"combined_{tag}_w{w:g}"] = roc_auc_score(y, _z(fh, ft) + w * _z(ph, pt))
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in out.items()}), flush=True)


if __name__ == "__main__":
    main()
