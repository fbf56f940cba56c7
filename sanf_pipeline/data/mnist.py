"""``mnist`` and ``fashion-mnist``: IDX files, gzipped or not.

Files ``{train,t10k}-images-idx3-ubyte`` and ``{train,t10k}-labels-idx1-ubyte`` (optionally
``.gz``; the ``-images.idx3-ubyte`` spelling is accepted too), looked for in ``root``,
``root/raw`` and torchvision's ``root/MNIST/raw`` / ``root/FashionMNIST/raw``. IDX stores no
class names; the names below are the ones the datasets' documentation fixes for labels 0..9.
Plain files are read through ``np.memmap``; gzipped image files are decompressed once per process,
on first use. Sample ids are ``"<images file relative to root>#<row>"``.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np

from ..errors import SanfError
from .base import ImageDataset
from .registry import register_dataset

#: IDX type codes (third magic byte) -> numpy dtype (big-endian, as the format specifies).
IDX_DTYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}

MNIST_CLASSES = [str(d) for d in range(10)]
# From the Fashion-MNIST README (zalandoresearch/fashion-mnist), labels 0..9.
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"]


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx_header(f) -> tuple[np.dtype, tuple[int, ...], int]:
    """(dtype, shape, header size in bytes) from an open IDX file positioned at its start."""
    magic = f.read(4)
    if len(magic) != 4 or magic[0] != 0 or magic[1] != 0 or magic[2] not in IDX_DTYPES:
        raise ValueError(f"bad IDX magic number {magic.hex() or '(empty)'}")
    ndim = magic[3]
    dims = f.read(4 * ndim)
    if len(dims) != 4 * ndim:
        raise ValueError("IDX header is truncated")
    shape = struct.unpack(f">{ndim}I", dims)
    return IDX_DTYPES[magic[2]], tuple(int(s) for s in shape), 4 + 4 * ndim


def read_idx(path: Path) -> np.ndarray:
    """The whole IDX array (gzipped or not), native byte order."""
    try:
        with _open(path) as f:
            dtype, shape, _ = read_idx_header(f)
            data = f.read()
    except (OSError, EOFError, ValueError) as e:
        raise SanfError(f"{path} is not a readable IDX file ({e})") from None
    count = int(np.prod(shape)) if shape else 1
    if len(data) < count * dtype.itemsize:
        raise SanfError(f"{path}: IDX data is truncated ({len(data)} bytes for shape {shape})")
    return np.frombuffer(data, dtype=dtype, count=count).reshape(shape).astype(dtype.newbyteorder("="))


def idx_header(path: Path) -> tuple[np.dtype, tuple[int, ...], int]:
    try:
        with _open(path) as f:
            return read_idx_header(f)
    except (OSError, EOFError, ValueError) as e:
        raise SanfError(f"{path} is not a readable IDX file ({e})") from None


class _IdxBase(ImageDataset):
    torchvision_folder: str
    classes: list[str]

    def _search_dirs(self) -> list[Path]:
        return [self.root, self.root / "raw", self.root / self.torchvision_folder / "raw"]

    def _find(self, kind: str, ndim: int) -> Path:
        prefix = "train" if self.split == "train" else "t10k"
        stems = [f"{prefix}-{kind}-idx{ndim}-ubyte", f"{prefix}-{kind}.idx{ndim}-ubyte"]
        for d in self._search_dirs():
            for stem in stems:
                for name in (stem, stem + ".gz"):  # plain first: it can be memory-mapped
                    if (d / name).is_file():
                        return d / name
        raise SanfError(f"no {stems[0]}[.gz] for {self.name} in "
                        f"{', '.join(str(d) for d in self._search_dirs())}")

    def _scan(self):
        img_path, lab_path = self._find("images", 3), self._find("labels", 1)
        labels = read_idx(lab_path).astype(np.int64).reshape(-1)
        dtype, shape, offset = idx_header(img_path)
        if dtype != np.uint8 or len(shape) != 3:
            raise SanfError(f"{img_path}: expected uint8 images (n, rows, cols), found {dtype} {shape}")
        if shape[0] != len(labels):
            raise SanfError(f"{img_path} has {shape[0]} images but {lab_path.name} has {len(labels)} labels")
        self._img_path, self._img_shape, self._img_offset = img_path, shape, offset
        rel = img_path.relative_to(self.root).as_posix()
        ids = [f"{rel}#{r}" for r in range(len(labels))]
        return list(self.classes), labels, ids, np.arange(len(labels), dtype=np.int64)

    def _images(self) -> np.ndarray:
        def build():
            if self._img_path.suffix == ".gz":
                return read_idx(self._img_path)
            expected = self._img_offset + int(np.prod(self._img_shape))
            if self._img_path.stat().st_size < expected:
                raise SanfError(f"{self._img_path}: IDX data is truncated")
            return np.memmap(self._img_path, dtype=np.uint8, mode="r", offset=self._img_offset,
                             shape=self._img_shape)

        return self._lazy_get("images", build)

    def _load(self, i: int) -> np.ndarray:
        gray = np.asarray(self._images()[int(self._refs[i])])
        return np.repeat(gray[:, :, None], 3, axis=2)


@register_dataset("mnist")
class MNISTDataset(_IdxBase):
    torchvision_folder = "MNIST"
    classes = MNIST_CLASSES


@register_dataset("fashion-mnist")
class FashionMNISTDataset(_IdxBase):
    torchvision_folder = "FashionMNIST"
    classes = FASHION_MNIST_CLASSES
