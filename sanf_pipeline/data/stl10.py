"""``stl10``: the standard binaries ``stl10_binary/{train,test}_{X,y}.bin`` and ``class_names.txt``.

Each image is 3 x 96 x 96 bytes: the red, green and blue planes, each stored column-major, so
one image read as (3, 96, 96) is indexed [channel, x, y] and is transposed to (y, x, channel).
Labels in ``*_y.bin`` are 1-based. ``root`` may hold ``stl10_binary/`` or be that folder. Pixels
are read through ``np.memmap``, opened lazily once per process. The unlabelled split is not read.
Sample ids are ``"<X file relative to root>#<row>"``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..errors import SanfError
from .base import ImageDataset
from .registry import register_dataset

SIZE = 96
IMAGE_BYTES = 3 * SIZE * SIZE


def stl_to_hwc(raw: np.ndarray) -> np.ndarray:
    """One image's bytes viewed as (3, 96, 96) [channel, x, y] -> uint8 (96, 96, 3) [y, x, channel]."""
    return np.ascontiguousarray(np.asarray(raw, dtype=np.uint8).reshape(3, SIZE, SIZE).transpose(2, 1, 0))


@register_dataset("stl10")
class STL10Dataset(ImageDataset):
    folder = "stl10_binary"

    def _bin_dir(self) -> Path:
        for d in (self.root / self.folder, self.root):
            if (d / "class_names.txt").is_file():
                return d
        raise SanfError(f"no {self.folder}/class_names.txt under {self.root}; point --data-root at the folder "
                        f"holding the unpacked '{self.folder}' folder")

    def _scan(self):
        bdir = self._bin_dir()
        lines = (bdir / "class_names.txt").read_text(encoding="utf-8").splitlines()
        class_names = [line.strip() for line in lines if line.strip()]
        x_path, y_path = bdir / f"{self.split}_X.bin", bdir / f"{self.split}_y.bin"
        for p in (x_path, y_path):
            if not p.is_file():
                raise SanfError(f"missing STL-10 file {p}")
        labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
        if labels.size and labels.min() < 1:
            raise SanfError(f"{y_path}: STL-10 labels are 1-based, found {labels.min()}")
        labels -= 1
        size = x_path.stat().st_size
        if size % IMAGE_BYTES or size // IMAGE_BYTES != len(labels):
            raise SanfError(f"{x_path}: {size} bytes is not {len(labels)} images of {IMAGE_BYTES} bytes "
                            f"(as {y_path.name} says); the file looks truncated")
        self._x_path = x_path
        rel = x_path.relative_to(self.root).as_posix()
        ids = [f"{rel}#{r}" for r in range(len(labels))]
        return class_names, labels, ids, np.arange(len(labels), dtype=np.int64)

    def _pixels(self) -> np.memmap:
        return self._lazy_get(
            "x", lambda: np.memmap(self._x_path, dtype=np.uint8, mode="r").reshape(-1, IMAGE_BYTES)
        )

    def _load(self, i: int) -> np.ndarray:
        return stl_to_hwc(self._pixels()[int(self._refs[i])])
