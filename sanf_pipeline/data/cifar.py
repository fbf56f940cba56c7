"""``cifar10`` and ``cifar100``: the standard "python version" pickle batches.

* CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``;
* CIFAR-100: ``cifar-100-python/{train, test, meta}``; labels are the 20 coarse super-classes by
  default (``category="coarse"``) or the 100 classes with ``category="fine"``.

``root`` may be the folder holding the batch folder or the batch folder itself. Class names come
from the meta file. Each row is 3072 bytes: the 32x32 red plane, then green, then blue, row-major.

The pickles are read with an unpickler that only allows the numpy pieces a CIFAR batch consists
of, so a tampered file cannot run code. Labels are read at construction; pixel batches are
unpickled lazily, once per process (DataLoader worker), on the first ``load`` that needs them.
Sample ids are ``"<batch file relative to root>#<row>"``.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from ..errors import SanfError
from .base import ImageDataset
from .registry import register_dataset


def _allowed_globals() -> dict[tuple[str, str], object]:
    import codecs

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric  # type: ignore[no-redef]
    allowed: dict[tuple[str, str], object] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(mod, "_reconstruct")] = multiarray._reconstruct
        allowed[(mod, "scalar")] = multiarray.scalar
    if hasattr(numeric, "_frombuffer"):
        for mod in ("numpy.core.numeric", "numpy._core.numeric"):
            allowed[(mod, "_frombuffer")] = numeric._frombuffer
    return allowed


class _ArrayOnlyUnpickler(pickle.Unpickler):
    _allowed = _allowed_globals()

    def find_class(self, module: str, name: str):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR file") from None


def load_cifar_pickle(path: Path) -> dict[str, object]:
    """Unpickle one CIFAR batch/meta file (Python 2 or 3 pickle) into a dict with ``str`` keys."""
    try:
        with open(path, "rb") as f:
            obj = _ArrayOnlyUnpickler(f, encoding="latin1").load()
    except FileNotFoundError:
        raise SanfError(f"missing CIFAR file {path}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, OSError) as e:
        raise SanfError(f"{path} is not a readable CIFAR pickle ({e})") from None
    if not isinstance(obj, dict):
        raise SanfError(f"{path} is not a CIFAR pickle (holds {type(obj).__name__}, not a dict)")
    return {_text(k): v for k, v in obj.items()}


def _text(x) -> str:
    return x.decode("latin1") if isinstance(x, (bytes, bytearray)) else str(x)


def _field(batch: dict, key: str, path: Path):
    if key not in batch:
        raise SanfError(f"{path} has no '{key}' entry; is it a CIFAR file of the right kind?")
    return batch[key]


def rows_to_images(rows: np.ndarray) -> np.ndarray:
    """CIFAR rows (n, 3072) -> uint8 (n, 32, 32, 3)."""
    return np.asarray(rows, dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


class _CifarBase(ImageDataset):
    folder: str
    meta_file: str
    split_files: dict[str, list[str]]

    def _batch_dir(self) -> Path:
        for d in (self.root / self.folder, self.root):
            if (d / self.meta_file).is_file():
                return d
        raise SanfError(f"no {self.folder}/{self.meta_file} under {self.root}; point --data-root at the folder "
                        f"holding the unpacked '{self.folder}' folder")

    def _label_key(self) -> str:
        return "labels"

    def _names_key(self) -> str:
        return "label_names"

    def _scan(self):
        bdir = self._batch_dir()
        meta_path = bdir / self.meta_file
        class_names = [_text(c) for c in _field(load_cifar_pickle(meta_path), self._names_key(), meta_path)]
        self._files = [bdir / f for f in self.split_files[self.split]]
        labels, ids, refs = [], [], []
        for file_idx, path in enumerate(self._files):
            batch = load_cifar_pickle(path)
            lab = np.asarray(_field(batch, self._label_key(), path), dtype=np.int64).reshape(-1)
            n_rows = len(_field(batch, "data", path))
            if n_rows != len(lab):
                raise SanfError(f"{path}: {n_rows} images but {len(lab)} labels")
            rel = path.relative_to(self.root).as_posix()
            labels.append(lab)
            ids.extend(f"{rel}#{r}" for r in range(len(lab)))
            refs.append(file_idx * _FILE_STRIDE + np.arange(len(lab), dtype=np.int64))
        labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        refs = np.concatenate(refs) if refs else np.zeros(0, np.int64)
        return class_names, labels, ids, refs

    def _rows(self, file_idx: int) -> np.ndarray:
        def build():
            path = self._files[file_idx]
            data = np.asarray(_field(load_cifar_pickle(path), "data", path))
            if data.ndim != 2 or data.shape[1] != 3072:
                raise SanfError(f"{path}: 'data' has shape {data.shape}, expected (n, 3072)")
            return rows_to_images(data)

        return self._lazy_get(f"rows{file_idx}", build)

    def _load(self, i: int) -> np.ndarray:
        file_idx, row = divmod(int(self._refs[i]), _FILE_STRIDE)
        return self._rows(file_idx)[row].copy()


_FILE_STRIDE = 1 << 32  # ref = file index * stride + row in that file


@register_dataset("cifar10")
class Cifar10Dataset(_CifarBase):
    folder = "cifar-10-batches-py"
    meta_file = "batches.meta"
    split_files = {"train": [f"data_batch_{k}" for k in range(1, 6)], "test": ["test_batch"]}


@register_dataset("cifar100")
class Cifar100Dataset(_CifarBase):
    """CIFAR-100; ``category`` is ``"coarse"`` (20 super-classes, the default) or ``"fine"`` (100)."""

    takes_category = True
    folder = "cifar-100-python"
    meta_file = "meta"
    split_files = {"train": ["train"], "test": ["test"]}
    GRANULARITIES = ("coarse", "fine")

    def _scan(self):
        if self.category is None:
            self.category = "coarse"
        if self.category not in self.GRANULARITIES:
            raise SanfError(f"cifar100 category must be one of: {', '.join(self.GRANULARITIES)} "
                            f"(got {self.category!r})")
        return super()._scan()

    def _label_key(self) -> str:
        return f"{self.category}_labels"

    def _names_key(self) -> str:
        return f"{self.category}_label_names"
