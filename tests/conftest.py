"""Shared fixtures: tiny model settings, a slice of the shared CIFAR-10 JPEGs, tiny synthetic image folders."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
CIFAR_ZIP = SHARED / "data" / "cifar10-jpg.zip"
DINOV2_WEIGHTS = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors"

TINY_VIT = "vit_small_patch14_dinov2"
TINY_VIT_KWARGS = {"depth": 2, "embed_dim": 32, "num_heads": 2}  # patch 14 at 56 px: a 4x4 grid
TINY_IMAGE_SIZE = 56


@pytest.fixture
def tiny_vit_kwargs() -> dict:
    """timm ``create_model`` overrides for a tiny random ViT (use with image_size=56)."""
    return dict(TINY_VIT_KWARGS)


def write_folder_dataset(root: Path, classes=("a", "b", "c"), n_train: int = 10, n_test: int = 5,
                         size: int = 32, seed: int = 0, ext: str = ".png") -> Path:
    """``root/{train,test}/<class>/NNN<ext>`` random RGB images; class c's images are brighter by c."""
    rng = np.random.default_rng(seed)
    from PIL import Image

    for split, n in (("train", n_train), ("test", n_test)):
        for c, name in enumerate(classes):
            folder = Path(root) / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                img = rng.integers(0, 200, (size, size, 3)) + 20 * c
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:03d}{ext}")
    return Path(root)


@pytest.fixture
def make_folder_dataset(tmp_path):
    """Factory: ``make_folder_dataset(name="data", **kwargs)`` writes a tiny ``folder`` dataset of PNGs."""

    def make(name: str = "data", **kwargs) -> Path:
        return write_folder_dataset(tmp_path / name, **kwargs)

    return make


@pytest.fixture(scope="session")
def folder_dataset(tmp_path_factory) -> Path:
    """A session-wide tiny ``folder`` dataset: 3 classes x 10 train / 5 test PNGs of 32x32, one unicode name."""
    root = write_folder_dataset(tmp_path_factory.mktemp("folder") / "data", n_train=10, n_test=5)
    (root / "train" / "b" / "003.png").rename(root / "train" / "b" / "003 çà 猫.png")
    return root


def unpack_cifar_slice(dest: Path, classes=("airplane", "automobile"), per_class: int = 3) -> Path:
    """Unpack the first ``per_class`` JPEGs of ``classes`` per split from the shared CIFAR-10 zip."""
    if not CIFAR_ZIP.is_file():
        pytest.skip(f"shared CIFAR-10 JPEG archive not found at {CIFAR_ZIP}")
    wanted = {f"cifar10/{split}/{c}/{i:04d}.jpg" for split in ("train", "test") for c in classes
              for i in range(per_class)}
    with zipfile.ZipFile(CIFAR_ZIP) as zf:
        names = [n for n in zf.namelist() if n in wanted]
        if len(names) != len(wanted):
            pytest.skip(f"{CIFAR_ZIP} does not hold the expected cifar10/<split>/<class>/NNNN.jpg layout")
        for name in names:
            zf.extract(name, dest)
    return Path(dest) / "cifar10"


@pytest.fixture(scope="session")
def cifar_slice(tmp_path_factory) -> Path:
    """2 classes x 3 CIFAR-10 JPEGs per split, as a ``folder`` dataset root (skipped without ../shared)."""
    return unpack_cifar_slice(tmp_path_factory.mktemp("cifar"))


def assert_same_cache(a, b) -> None:
    """Every stored array of the sealed caches ``a`` and ``b`` (either format) is bitwise the same, and so are
    their per-shard sha256 digests."""
    from sanf_pipeline.cache import open_cache

    with open_cache(a) as ca, open_cache(b) as cb:
        assert sorted(ca.splits) == sorted(cb.splits)
        for split in ca.splits:
            ga, gb = ca._group(split), cb._group(split)
            for name in ("cls", "patch", "valid", "label", "class_offsets", "sample_id_bytes", "sample_id_offsets"):
                x, y = np.asarray(ga[name][...]), np.asarray(gb[name][...])
                assert x.dtype == y.dtype and x.shape == y.shape, f"{split}/{name}: {x.shape} vs {y.shape}"
                assert x.tobytes() == y.tobytes(), f"{split}/{name} differs between {a} and {b}"
        assert ca.meta["shard_sha256"] == cb.meta["shard_sha256"]
        assert ca.meta["settings"] == cb.meta["settings"]


@pytest.fixture(scope="session")
def same_cache():
    """``same_cache(a, b)`` asserts two caches hold bitwise identical arrays (see :func:`assert_same_cache`)."""
    return assert_same_cache


@pytest.fixture(scope="module")
def one_torch_thread():
    """Small flows train several times faster on 1 thread than on 2 shared cores; results are per thread count."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
