"""The dataset base class every reader derives from, and the small pure helpers they share.

A reader implements two methods:

* ``_scan()`` -> ``(class_names, labels, sample_ids, refs)``: the whole split in its natural order,
  without decoding any image. ``refs`` is an int64 array (a row in a packed file, one per sample)
  or ``None`` when ``sample_ids`` alone locate the samples (image folders);
* ``_load(i)`` -> uint8 (H, W, 3) for position ``i`` *after* ``limit_per_class`` was applied
  (use ``self.sample_ids[i]`` / ``self._refs[i]``).

A reader with ground-truth defect masks also sets ``provides_masks = True`` and overrides ``mask_ref(i)``
(same positions as ``_load``): ``""`` for a normal image, known to have no defect pixel; the mask file's path
relative to ``root`` for an image with one; ``None`` where the mask is unknown (no mask file; every image of a
reader without masks).

The base class validates arguments, applies ``limit_per_class``, and keeps the object cheap to
pickle: anything a reader stores in ``self._lazy`` (open memmaps, decoded pickle batches) is
per-process state, dropped when the dataset is pickled and rebuilt on first use in each worker.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from ..errors import SanfError

SPLITS = ("train", "test")


class ImageDataset:
    """One split of one dataset: class names, labels and sample ids up front; images on demand."""

    #: Registry name (set by :func:`~sanf_pipeline.data.register_dataset`).
    name: ClassVar[str] = "?"
    #: False for datasets that ship with a library (``digits``): ``root`` is then ignored.
    needs_root: ClassVar[bool] = True
    #: False when the dataset has no ``category`` choice; passing one is then a user error.
    takes_category: ClassVar[bool] = False
    #: True for readers that override :meth:`mask_ref` (ground-truth defect masks); False: every ref is None.
    provides_masks: ClassVar[bool] = False

    class_names: list[str]
    labels: np.ndarray
    sample_ids: list[str]

    def __init__(
        self,
        root: str | os.PathLike | None,
        split: str,
        *,
        category: str | None = None,
        limit_per_class: int | None = None,
    ):
        self.split = check_split(split)
        self.limit_per_class = check_limit(limit_per_class)
        if category is not None and not self.takes_category:
            raise SanfError(f"dataset '{self.name}' has no categories (got category={category!r}); "
                            "leave it unset")
        self.category = category
        self.root = self._check_root(root)
        self._lazy: dict[str, Any] = {}

        class_names, labels, sample_ids, refs = self._scan()
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(sample_ids) != len(labels) or (refs is not None and len(refs) != len(labels)):
            raise AssertionError(f"{type(self).__name__}._scan returned mismatched lengths")
        check_labels(labels, class_names, where=f"{self.name} {self.split}")
        if self.limit_per_class is not None:
            keep = first_per_class(labels, self.limit_per_class)
            labels = labels[keep]
            sample_ids = [sample_ids[k] for k in keep]
            refs = None if refs is None else np.asarray(refs)[keep]
        self.class_names = [str(c) for c in class_names]
        self.labels = labels
        self.sample_ids = list(sample_ids)
        self._refs = None if refs is None else np.asarray(refs, dtype=np.int64)

    # -- what readers implement ---------------------------------------------------------------
    def _scan(self) -> tuple[list[str], np.ndarray, list[str], np.ndarray | None]:
        raise NotImplementedError

    def _load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    # -- public API ------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def load(self, i: int) -> np.ndarray:
        """Image ``i`` as a writable C-contiguous uint8 (H, W, 3) RGB array; raises ``BadImageError``."""
        n = len(self)
        i = int(i)
        if not -n <= i < n:
            raise IndexError(f"sample index {i} out of range for {n} samples")
        img = self._load(i % n)
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise AssertionError(f"{type(self).__name__}._load returned {img.dtype} {img.shape}")
        if not (img.flags.c_contiguous and img.flags.writeable):
            img = np.array(img, order="C")  # torch.as_tensor warns on read-only arrays
        return img

    def mask_ref(self, i: int) -> str | None:
        """The ground-truth mask of sample ``i``: ``""`` = a normal image, known to have no defect pixel; a path
        relative to ``root`` = its mask file; ``None`` = unknown (no mask). This default: always ``None``."""
        return None

    def mask_refs(self) -> list[str | None]:
        """``mask_ref(i)`` for every position ``i``."""
        return [self.mask_ref(i) for i in range(len(self))]

    def has_masks(self) -> bool:
        """Whether this split has ground-truth masks: at least one sample with a mask file (a split of only normal
        images, or of defects without mask files, has nothing to evaluate pixels against)."""
        return self.provides_masks and any(self.mask_refs())

    def order_by_label(self) -> np.ndarray:
        """Positions sorted by label, stable (natural order kept within a class); int64 (n,)."""
        return np.argsort(self.labels, kind="stable").astype(np.int64)

    def class_counts(self) -> np.ndarray:
        """Number of samples per class, int64 (num_classes,)."""
        return np.bincount(self.labels, minlength=self.num_classes).astype(np.int64)

    def describe(self) -> dict:
        """JSON-able summary (goes into cache metadata)."""
        return {
            "name": self.name,
            "root": None if self.root is None else str(self.root),
            "split": self.split,
            "category": self.category,
            "limit_per_class": self.limit_per_class,
            "n": len(self),
            "num_classes": self.num_classes,
        }

    def __repr__(self) -> str:
        d = self.describe()
        return f"{type(self).__name__}(" + ", ".join(f"{k}={v!r}" for k, v in d.items()) + ")"

    # -- pickling: per-process state stays behind --------------------------------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_lazy"] = {}
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lazy = {}

    # -- helpers ---------------------------------------------------------------------------------
    def _check_root(self, root: str | os.PathLike | None) -> Path | None:
        if not self.needs_root:
            return None if root is None else Path(root).expanduser().absolute()
        if root is None or str(root) == "":
            raise SanfError(f"dataset '{self.name}' needs a root folder; pass --data-root")
        path = Path(root).expanduser().absolute()
        if not path.exists():
            raise SanfError(f"dataset root {path} does not exist; check --data-root")
        if not path.is_dir():
            raise SanfError(f"dataset root {path} is not a folder; check --data-root")
        return path

    def _lazy_get(self, key: str, build):
        """Per-process cache: ``build()`` once per process, dropped on pickling."""
        value = self._lazy.get(key)
        if value is None:
            value = build()
            self._lazy[key] = value
        return value


def check_split(split: str) -> str:
    if split not in SPLITS:
        raise SanfError(f"unknown split {split!r}; choose one of: {', '.join(SPLITS)}")
    return split


def check_limit(limit: int | None) -> int | None:
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1:
        raise SanfError(f"limit_per_class must be a positive whole number (got {limit!r})")
    return int(limit)


def check_labels(labels: np.ndarray, class_names: list[str], *, where: str) -> None:
    if len(set(class_names)) != len(class_names):
        raise SanfError(f"{where}: duplicate class names {list(class_names)}")
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise SanfError(f"{where}: labels range {labels.min()}..{labels.max()} does not fit "
                        f"{len(class_names)} class names; the files look corrupt")


def first_per_class(labels: np.ndarray, n: int) -> np.ndarray:
    """Indices (ascending) that keep the first ``n`` samples of each class, in the given order."""
    labels = np.asarray(labels, dtype=np.int64)
    if labels.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(labels, kind="stable")
    sorted_labels = labels[order]
    starts = np.searchsorted(sorted_labels, sorted_labels, side="left")
    rank = np.arange(len(order)) - starts  # position of each sample within its class
    return np.sort(order[rank < n]).astype(np.int64)
