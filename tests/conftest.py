"""Shared fixtures and helpers (``from conftest import ...``): tiny model settings, a slice of the shared CIFAR-10
JPEGs, tiny synthetic image folders, `sanf extract` of a tiny ViT and its uninterrupted reference caches, hand-made
caches, tiny timm models without the hub, a synthetic pets cache, one-line user errors, subprocess environments."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
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


# ------------------------------------------------------------------------------- `sanf extract` on a tiny ViT
FORMATS = ["zarr", "hdf5"]
SUFFIX = {"zarr": "", "hdf5": ".h5"}

# folder_dataset: 3 classes x 10 train / 5 test images; 4 per batch, 8 per shard: 4 train and 2 test shards
TINY_EXTRACT_ARGS = ["--backbone", TINY_VIT, "--weights", "random", "--model-kwargs", json.dumps(TINY_VIT_KWARGS),
                     "--image-size", str(TINY_IMAGE_SIZE), "--dataset", "folder", "--batch-size", "4",
                     "--shard-size", "8", "--num-workers", "0", "--quiet"]


def extract_args(data, cache, *extra) -> list[str]:
    """The arguments of `sanf extract` of a tiny random ViT over the folder dataset ``data`` into ``cache``."""
    return ["extract", *TINY_EXTRACT_ARGS, "--data-root", str(data), "--cache", str(cache), *map(str, extra)]


def cache_path(folder, fmt: str, name: str = "cache") -> Path:
    """``folder/name`` for Zarr, ``folder/name.h5`` for HDF5."""
    return Path(folder) / f"{name}{SUFFIX[fmt]}"


def extract_config(data, cache, **kw):
    """The ExtractConfig of :func:`extract_args` (for ``extract()`` in this process); ``kw`` overrides fields."""
    from sanf_pipeline.extract.job import ExtractConfig

    base = dict(backbone=TINY_VIT, dataset="folder", data_root=str(data), cache=str(cache), weights="random",
                model_kwargs=dict(TINY_VIT_KWARGS), image_size=TINY_IMAGE_SIZE, batch_size=4, shard_size=8,
                num_workers=0, quiet=True)
    base.update(kw)
    return ExtractConfig(**base)


@pytest.fixture(scope="session")
def extract_reference(folder_dataset, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted single-process `sanf extract` runs over ``folder_dataset`` into both formats."""
    from click.testing import CliRunner

    from sanf_pipeline.cli.main import cli

    out = {}
    folder = tmp_path_factory.mktemp("extract-reference")
    for fmt in FORMATS:
        out[fmt] = cache_path(folder, fmt)
        r = CliRunner().invoke(cli, extract_args(folder_dataset, out[fmt]))
        assert r.exit_code == 0, r.output
        assert "complete; 45 images extracted" in r.stdout
    return out


# ------------------------------------------------------------------------- hand-made caches (no backbone)
HAND_CLASSES = ["cat", "dög", "猫"]
HAND_COUNTS = {"train": [5, 4, 6], "test": [3, 0, 2]}  # a class may be absent from a split
HAND_DIM, HAND_TOKENS = 4, 3
HAND_INVALID = {"train": {1, 9}, "test": {4}}  # rows whose image was "unreadable"


def hand_rows(split: str):
    """Deterministic rows for one split, sorted by label, and their ids (unicode ones included)."""
    labels = np.repeat(np.arange(len(HAND_CLASSES)), HAND_COUNTS[split])
    n = len(labels)
    base = (np.arange(n) + (1000 if split == "test" else 0)).astype(np.float32)
    cls = base[:, None] + np.arange(HAND_DIM, dtype=np.float32) / 8
    patch = cls[:, None, :] + np.arange(HAND_TOKENS, dtype=np.float32)[None, :, None] * 100
    ids = [f"{split}/{HAND_CLASSES[c]}/img ✓ {i:03d}.png" for i, c in enumerate(labels)]
    return labels, ids, cls, patch


def hand_spec(shard_size=4, dtype="float32", settings=None):
    from sanf_pipeline.cache import CacheSpec, SplitListing

    listings = {s: SplitListing(*hand_rows(s)[:2]) for s in ("train", "test")}
    return CacheSpec(settings=settings or {"hand": 1}, meta={"dataset": {"name": "hand"}}, class_names=HAND_CLASSES,
                     listings=listings, dim=HAND_DIM, num_tokens=HAND_TOKENS, dtype=dtype, shard_size=shard_size,
                     chunk_size=shard_size)


def write_hand_shards(writer, jobs, invalid=HAND_INVALID) -> None:
    """Write ``jobs`` of the hand-made rows with ``writer`` (a CacheWriter); ``invalid`` rows are skipped ones."""
    for job in jobs:
        labels, ids, cls, patch = hand_rows(job.split)
        sl = slice(job.start, job.stop)
        valid = np.ones(job.stop - job.start, bool)
        skipped = []
        for row in sorted(invalid.get(job.split, ())):
            if job.start <= row < job.stop:
                valid[row - job.start] = False
                skipped.append({"row": row, "sample_id": ids[row], "label": int(labels[row]), "reason": "truncated"})
        c, p = cls[sl].copy(), patch[sl].copy()
        c[~valid] = 0
        p[~valid] = 0
        writer.write_shard(job, c, p, valid, skipped)


def write_hand_cache(path, fmt, **kw) -> None:
    """A sealed cache of the hand-made rows (``kw``: hand_spec's shard_size, dtype, settings)."""
    from sanf_pipeline.cache import CacheWriter

    writer = CacheWriter(path, hand_spec(**kw), fmt=fmt)
    try:
        write_hand_shards(writer, writer.open())
        assert writer.complete()
        writer.seal()
    finally:
        writer.close()


# ------------------------------------------------------------------------------ tiny timm models, no hub
TINY_TIMM_KWARGS = {"depth": 3, "embed_dim": 32, "num_heads": 2}  # patch 14: 56 px -> 4x4 grid


def tiny_timm(arch=TINY_VIT, seed=0, img_size=56, **kw):
    """A small random timm model (``TINY_TIMM_KWARGS``, overridable) in eval mode, built from ``seed``."""
    import timm
    import torch

    torch.manual_seed(seed)
    kwargs = dict(TINY_TIMM_KWARGS, img_size=img_size, num_classes=0)
    kwargs.update(kw)
    return timm.create_model(arch, pretrained=False, **kwargs).eval()


def save_weights(model, path: Path) -> Path:
    """The model's state dict as safetensors (``.safetensors``) or a torch pickle (any other suffix)."""
    import torch
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(sd, str(path))
    else:
        torch.save(sd, str(path))
    return path


@pytest.fixture
def no_hub(monkeypatch):
    """No test may reach timm's download; tests that need the hub step patch it themselves."""
    from sanf_pipeline.extract import backbones

    monkeypatch.delenv(backbones.WEIGHTS_ENV, raising=False)

    def refuse(model_name, kwargs):
        raise AssertionError(f"hub download attempted for {model_name}")

    monkeypatch.setattr(backbones, "_create_from_hub", refuse)


# ----------------------------------------------------------------------------------- CLI and subprocesses
TINY_FLOW = dict(hidden=16, blocks=2, batch_size=16, lr=2e-3, device="cpu")  # a flow that fits in well under 1 s
FAST_FIT = ["--hidden", "16", "--blocks", "2", "--batch-size", "16", "--lr", "2e-3", "--device", "cpu", "--quiet"]


def assert_user_error(result, *fragments) -> str:
    """``result`` (click's Result) is a user error: exit code 2, exactly one line ``error: ...`` on stderr holding
    every fragment, no traceback; returns that line."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])
    return lines[0]


def sub_env() -> dict:
    """The environment of a `python -m sanf_pipeline` subprocess: this checkout first, one BLAS thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


@pytest.fixture(scope="session")
def pets_cache(tmp_path_factory) -> Path:
    """A sealed synthetic cache ``.../syn``: classes cat, dog, frog; 40 train / 20 test rows each; d=16, T=4."""
    from sanf_pipeline.cache.synthetic import write_synthetic_cache

    return write_synthetic_cache(tmp_path_factory.mktemp("pets") / "syn", n_classes=3, n_train=40, n_test=20, dim=16,
                                 num_tokens=4, separation=1.0, seed=1, class_names=["cat", "dog", "frog"])


def three_class_synthetic_cache(tmp_path_factory) -> Path:
    """The small synthetic cache (3 classes x 40 train / 20 test, d 16, 4 tokens) of the stage-two tests."""
    from sanf_pipeline.cache.synthetic import write_synthetic_cache

    return write_synthetic_cache(tmp_path_factory.mktemp("c") / "syn", n_classes=3, n_train=40, n_test=20, dim=16,
                                 num_tokens=4, separation=1.0, seed=1)


@pytest.fixture(scope="module")
def three_class_cache(tmp_path_factory) -> Path:
    """``three_class_synthetic_cache`` as a module-scoped fixture."""
    return three_class_synthetic_cache(tmp_path_factory)
