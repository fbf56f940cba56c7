"""``mvtec``: MVTec AD layout, ``root/<category>/{train/good, test/<good|defect>}/*.png``.

``class_names = ["good", <defect types sorted>]`` for both splits (label 0 = normal), taken from the
category's test folders; train holds only ``good``. ``category`` is required. Only the path list is kept
in memory.

Ground-truth masks (``root/<category>/ground_truth/<defect>/<stem>_mask.png``, 0 = normal, 255 = defect) are
what ``mask_ref`` points at, per test image: ``""`` for a ``good`` image (no defect pixel), the mask's path
relative to ``root`` for a defect image whose mask file exists, ``None`` (unknown) for a defect image without
one; every train image: ``None``. Masks are only looked up (one ``stat`` per defect image), never decoded here.
"""

from __future__ import annotations

from pathlib import PurePosixPath

import numpy as np

from ..errors import SanfError
from .base import ImageDataset
from .folder import scan_classes, subfolders
from .images import decode_image
from .registry import register_dataset

NORMAL = "good"
GROUND_TRUTH = "ground_truth"
MASK_SUFFIX = "_mask.png"


@register_dataset("mvtec")
class MVTecDataset(ImageDataset):
    takes_category = True
    provides_masks = True

    def _scan(self):
        available = [c for c in subfolders(self.root) if (self.root / c / "train").is_dir()]
        if self.category is None or self.category not in available:
            what = "needs a category" if self.category is None else f"has no category {self.category!r}"
            raise SanfError(f"mvtec root {self.root} {what}; choose one of: "
                            f"{', '.join(available) or '(none found: expected <root>/<category>/train)'}")
        cat_dir = self.root / self.category
        defects = [d for d in subfolders(cat_dir / "test") if d != NORMAL]
        class_names = [NORMAL, *defects]
        split_dir = cat_dir / self.split
        if not (split_dir / NORMAL).is_dir():
            raise SanfError(f"mvtec: {split_dir / NORMAL} is missing")
        if self.split == "train":
            class_names_here = [NORMAL]  # anything else under train/ is not part of MVTec AD
        else:
            class_names_here = class_names
        labels, ids = scan_classes(split_dir, class_names_here, self.root, where=f"mvtec {self.category}")
        return class_names, labels, ids, None

    def _load(self, i: int) -> np.ndarray:
        return decode_image(self.root / self.sample_ids[i])

    def mask_ref(self, i: int) -> str | None:
        if self.split != "test":
            return None
        if int(self.labels[i]) == 0:  # class_names[0] is "good"
            return ""
        # <category>/test/<defect>/<...>/<stem>.<ext> -> <category>/ground_truth/<defect>/<...>/<stem>_mask.png
        parts = PurePosixPath(self.sample_ids[i]).parts
        ref = PurePosixPath(parts[0], GROUND_TRUTH, *parts[2:-1], PurePosixPath(parts[-1]).stem + MASK_SUFFIX)
        return ref.as_posix() if (self.root / ref).is_file() else None
