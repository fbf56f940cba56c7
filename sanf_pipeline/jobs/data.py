"""What a run job reads and returns: ``TrainData`` (the normal class's training rows), ``TestData`` (the test split, in
memory or streamed from a cache in blocks of bounded size) and ``EvalResult``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SanfError
from ..flow.score import block_rows
from ..store.run_folder import (
    cache_identity,
    check_finite,
)


# ---------------------------------------------------------------------------------------------- job inputs
@dataclass
class TrainData:
    """The normal class's training rows (valid rows only, finite): ``cls (n, d)``, ``patch (n, T, d)`` or None."""

    cls: np.ndarray
    patch: np.ndarray | None
    class_index: int
    class_name: str

    @classmethod
    def from_cache(cls_, cache, class_index: int, patch: bool) -> TrainData:
        cls, tokens = cache.split("train").read_class(class_index, patch=patch)
        name = cache.class_names[class_index]
        if len(cls) == 0:
            raise SanfError(f"class {name!r} has no valid training samples in {cache.path}")
        check_finite(f"the training features of class {name!r} in {cache.path}", cls, tokens)
        return cls_(cls, tokens, class_index, name)


@dataclass
class TestData:
    """The test split of a cache: labels, sample ids and raw rows in blocks (``blocks``), with the cache's identity.

    ``from_arrays``: rows already in memory (a sweep); ``from_cache``: streamed from an open cache block by block
    (bounded memory), checked for NaN/Inf block by block."""

    labels: np.ndarray
    sample_ids: list[str]
    dim: int
    num_tokens: int
    n: int
    read: Callable[[int, int, bool], tuple[np.ndarray, np.ndarray | None]]
    fingerprint: str
    cache_path: str
    identity: dict = field(default_factory=dict)
    mask_reader: Callable[[], tuple[np.ndarray, np.ndarray]] | None = None

    def masks(self) -> tuple[np.ndarray, np.ndarray] | None:
        """The split's ground-truth masks as the cache records them (coverage 0-255 at the evaluation resolution,
        and whether each image's mask is known), aligned with ``labels``; None when the cache has none."""
        return None if self.mask_reader is None else self.mask_reader()

    @classmethod
    def from_arrays(cls_, cls, patch, labels, sample_ids, *, num_tokens: int, fingerprint: str, cache_path: str,
                    identity: dict | None = None) -> TestData:
        def read(start, stop, with_patch):
            if with_patch and patch is None:
                raise SanfError("this run needs the test patch tokens, which were not read")
            return cls[start:stop], (patch[start:stop] if with_patch else None)

        return cls_(labels, sample_ids, int(cls.shape[1]), int(num_tokens), len(cls), read, fingerprint,
                    str(cache_path), identity or {})

    @classmethod
    def from_cache(cls_, cache, cache_path=None) -> TestData:
        split = cache.split("test")

        def read(start, stop, with_patch):
            cls, patch = split.read(start, stop, patch=with_patch)
            if len(cls):
                check_finite(f"the test features in {cache.path}", cls, patch)
            return cls, patch

        masks = (lambda: split.masks(0, split.n)) if split.has_masks else None
        return cls_(split.labels, split.sample_ids, cache.dim, cache.num_tokens, split.n, read, cache.fingerprint,
                    str(cache_path if cache_path is not None else cache.path), cache_identity(cache), masks)

    def blocks(self, with_patch: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        rows = block_rows(self.dim, self.num_tokens, with_patch)
        for start in range(0, self.n, rows):
            yield self.read(start, min(start + rows, self.n), with_patch)

    def class_tokens(self) -> np.ndarray:
        parts = [c for c, _ in self.blocks(False)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict
    paths: dict
    scores: np.ndarray
    is_anomaly: np.ndarray
    parts: dict = field(default_factory=dict)


BaselineRun = EvalResult


# ------------------------------------------------------------------------- single runs from a cache (the CLI)
def make_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SanfError(f"{out_dir} exists and is not a folder; choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SanfError(f"cannot create {out_dir}: {exc.strerror or exc}; choose another --out") from None
