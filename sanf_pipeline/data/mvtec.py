"""``mvtec``: MVTec AD layout, ``root/<category>/{train/good, test/<good|defect>}/*.png``.

``class_names = ["good", <defect types sorted>]`` for both splits (label 0 = normal), taken from the
category's test folders; train holds only ``good``. Ground-truth masks are ignored. ``category``
is required. Only the path list is kept in memory.
"""

from __future__ import annotations

import numpy as np

from ..errors import SanfError
from .base import ImageDataset
from .folder import scan_classes, subfolders
from .images import decode_image
from .registry import register_dataset

NORMAL = "good"


@register_dataset("mvtec")
class MVTecDataset(ImageDataset):
    takes_category = True

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
