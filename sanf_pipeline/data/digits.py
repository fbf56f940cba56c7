"""``digits``: scikit-learn's bundled ``load_digits`` (1,797 real 8x8 handwritten digits).

No download and no root (``root`` is ignored). The train/test split is a fixed stratified half
split (``train_test_split(test_size=0.5, random_state=0, stratify=target)``), each split kept in
the original order. Pixels 0..16 are scaled to 0..255 (``round(v * 255 / 16)``) and repeated to RGB.
Sample ids are ``"load_digits#<index in load_digits>"``.
"""

from __future__ import annotations

import numpy as np

from .base import ImageDataset
from .registry import register_dataset

SEED = 0
TEST_SIZE = 0.5


def digits_split(target: np.ndarray, split: str) -> np.ndarray:
    """Sorted indices of ``split`` in the fixed stratified half split."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(target))
    train, test = train_test_split(idx, test_size=TEST_SIZE, random_state=SEED, stratify=target)
    return np.sort(train if split == "train" else test).astype(np.int64)


def scale_digits(images: np.ndarray) -> np.ndarray:
    """load_digits' float 0..16 images -> uint8 0..255."""
    return np.clip(np.rint(np.asarray(images, dtype=np.float64) * (255.0 / 16.0)), 0, 255).astype(np.uint8)


@register_dataset("digits")
class DigitsDataset(ImageDataset):
    needs_root = False

    def _scan(self):
        from sklearn.datasets import load_digits

        bunch = load_digits()
        idx = digits_split(bunch.target, self.split)
        class_names = [str(c) for c in bunch.target_names]
        self._images = scale_digits(bunch.images)  # 1,797 x 8 x 8 bytes: kept, it is tiny
        ids = [f"load_digits#{k}" for k in idx]
        return class_names, bunch.target[idx].astype(np.int64), ids, idx

    def _load(self, i: int) -> np.ndarray:
        gray = self._images[int(self._refs[i])]
        return np.repeat(gray[:, :, None], 3, axis=2)
