"""Synthetic caches with a known structure, for tests and benchmarks of stage two without a backbone.

Each class c draws class tokens around its own mean ``mu_c`` and patch tokens around ``mu_c`` plus noise,
so one-vs-rest separation is real but not trivial (``separation`` sets how far apart the means are).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .schema import shard_geometry
from .writer import CacheSpec, CacheWriter, SplitListing


def write_synthetic_cache(path, *, n_classes: int = 3, n_train: int = 40, n_test: int = 20, dim: int = 16,
                          num_tokens: int = 4, separation: float = 1.5, seed: int = 0, fmt: str | None = None,
                          dtype: str = "float32", shard_size: int | None = None,
                          class_names: list[str] | None = None) -> Path:
    """Write a sealed cache with ``n_train``/``n_test`` samples per class; returns its path."""
    rng = np.random.default_rng(seed)
    names = class_names or [f"class{c}" for c in range(n_classes)]
    means = rng.normal(size=(n_classes, dim)) * separation
    listings, rows = {}, {}
    for split, per in (("train", n_train), ("test", n_test)):
        labels = np.repeat(np.arange(n_classes), per)
        cls = means[labels] + rng.normal(size=(len(labels), dim))
        patch = cls[:, None, :] + rng.normal(size=(len(labels), num_tokens, dim))
        listings[split] = SplitListing(labels, [f"{split}/{names[c]}/{i:05d}" for i, c in enumerate(labels)])
        rows[split] = (cls.astype(dtype), patch.astype(dtype))
    shard, chunk = shard_geometry(num_tokens, dim, np.dtype(dtype).itemsize, 8)
    if shard_size:
        shard = chunk = shard_size
    spec = CacheSpec(
        settings={"synthetic": {"seed": seed, "separation": separation, "n_train": n_train, "n_test": n_test}},
        meta={"dataset": {"name": "synthetic"}, "backbone": {"arch": "synthetic", "dim": dim}},
        class_names=names, listings=listings, dim=dim, num_tokens=num_tokens, dtype=dtype,
        shard_size=shard, chunk_size=chunk)
    writer = CacheWriter(path, spec, fmt=fmt, overwrite=True)
    for job in writer.open():
        cls, patch = rows[job.split]
        n = job.stop - job.start
        writer.write_shard(job, cls[job.start:job.stop], patch[job.start:job.stop], np.ones(n, bool), [])
    writer.seal()
    writer.close()
    return Path(path)
