"""``folder``: an image-folder dataset, ``root/{train,test}/<class>/**/<image>``.

Class names are the sorted names of the class folders found in train *and* test, so a label means
the same class in both splits (a class may be missing from one split, e.g. an anomaly class that
only appears in test). Images are found recursively inside each class folder (hidden files and
folders skipped, any of :data:`IMAGE_EXTENSIONS`) and sorted by path. ``root`` may also be a
folder holding exactly one such dataset folder, e.g. the unpacked CIFAR-10 JPEG export whose
layout is ``cifar10/{train,test}/<class>/NNNN.jpg``. Only the path list is kept in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import SanfError
from .base import SPLITS, ImageDataset
from .images import IMAGE_EXTENSIONS, decode_image, is_image_file
from .registry import register_dataset


def list_image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` (recursive; hidden entries skipped), sorted by relative path."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for f in filenames:
            if not f.startswith(".") and is_image_file(f):
                p = Path(dirpath, f)
                found.append((p.relative_to(folder).as_posix(), p))
    found.sort(key=lambda t: t[0])
    return [p for _, p in found]


def subfolders(folder: Path) -> list[str]:
    """Names of the visible sub-folders of ``folder``, sorted."""
    if not folder.is_dir():
        return []
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def find_split_root(root: Path) -> Path:
    """``root`` itself when it holds train/ or test/, else its only child that does."""
    if any((root / s).is_dir() for s in SPLITS):
        return root
    inner = [root / d for d in subfolders(root) if any((root / d / s).is_dir() for s in SPLITS)]
    if len(inner) == 1:
        return inner[0]
    if len(inner) > 1:
        raise SanfError(f"{root} holds several datasets ({', '.join(p.name for p in inner)}); "
                        "point --data-root at one of them")
    raise SanfError(f"no train/ or test/ folder in {root}; the folder dataset expects "
                    "root/{train,test}/<class>/<images>")


def scan_classes(split_dir: Path, class_names: list[str], root: Path, where: str):
    """(labels, sample ids relative to ``root``) for class folders present in ``split_dir``."""
    labels: list[int] = []
    ids: list[str] = []
    for label, cls in enumerate(class_names):
        cdir = split_dir / cls
        if not cdir.is_dir():
            continue
        files = list_image_files(cdir)
        if not files:
            raise SanfError(f"{where}: class folder {cdir} has no images (looked for "
                            f"{', '.join(sorted(IMAGE_EXTENSIONS))})")
        labels.extend([label] * len(files))
        ids.extend(p.relative_to(root).as_posix() for p in files)
    return np.asarray(labels, dtype=np.int64), ids


@register_dataset("folder")
class FolderDataset(ImageDataset):
    def _scan(self):
        base = find_split_root(self.root)
        split_dir = base / self.split
        if not split_dir.is_dir():
            raise SanfError(f"no {self.split}/ folder in {base}; found: "
                            f"{', '.join(subfolders(base)) or 'nothing'}")
        class_names = sorted(set(subfolders(base / "train")) | set(subfolders(base / "test")))
        if not subfolders(split_dir):
            raise SanfError(f"{split_dir} has no class folders; expected {split_dir}/<class>/<images>")
        labels, ids = scan_classes(split_dir, class_names, self.root, where="folder")
        return class_names, labels, ids, None

    def _load(self, i: int) -> np.ndarray:
        return decode_image(self.root / self.sample_ids[i])
