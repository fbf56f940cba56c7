"""The two storage backends behind one interface: a Zarr v3 directory of sharded arrays, or one HDF5 file.

Both keep the same tree (``<split>/<array>``) and the same JSON metadata. Writing differs, because HDF5
has no safe concurrent or crash-tolerant partial writes: the HDF5 backend stages each finished shard as
``.npy`` files in ``<file>.parts/`` and assembles the ``.h5`` file once, atomically, when the cache is
sealed. The Zarr backend writes each shard straight into its place (one shard = one file per array).
Either way a shard only counts as written once its marker file exists, and markers are written last.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SanfError
from .schema import (
    META_FILE,
    ROW_ARRAYS,
    canonical_json,
    loads_limited,
    read_json_file,
    write_json_atomic,
)

PROGRESS_DIR = "_progress"


def detect_format(path: Path) -> str | None:
    """'zarr', 'hdf5', or None when nothing at ``path`` looks like a cache (yet)."""
    path = Path(path)
    if path.is_dir() and (path / "zarr.json").exists():
        return "zarr"
    if path.is_file():
        with open(path, "rb") as fh:
            if fh.read(8) == b"\x89HDF\r\n\x1a\n":
                return "hdf5"
    if Path(f"{path}.parts").is_dir():
        return "hdf5"
    return None


def format_for_path(path: Path, requested: str | None) -> str:
    found = detect_format(path)
    if requested and found and requested != found:
        raise SanfError(f"{path} holds a {found} cache but --format {requested} was asked for")
    if requested:
        return requested
    if found:
        return found
    return "hdf5" if Path(path).suffix.lower() in (".h5", ".hdf5") else "zarr"


class _Store:
    """What the writer needs from a backend."""

    def __init__(self, path: Path):
        self.path = Path(path)

    # -- progress markers (both backends keep them as small JSON files in a work directory)
    @property
    def work_dir(self) -> Path:
        raise NotImplementedError

    def marker_path(self, split: str, shard: int) -> Path:
        return self.work_dir / PROGRESS_DIR / split / f"{shard:06d}.json"

    def done_markers(self, split: str) -> dict[int, dict]:
        folder = self.work_dir / PROGRESS_DIR / split
        if not folder.is_dir():
            return {}
        out = {}
        for f in folder.glob("*.json"):
            if f.name.startswith("."):
                continue
            out[int(f.stem)] = read_json_file(f)
        return out

    def mark_done(self, split: str, shard: int, info: dict) -> None:
        marker = self.marker_path(split, shard)
        marker.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(marker, info)

    def work_dir_foreign(self) -> bool:
        """Whether a separate work directory exists holding something sanf did not make."""
        return False

    def clean_up(self) -> None:
        """Remove what killed writers left behind, once the cache is sealed (callers hold the creation lock, so no
        writer is active): their temporary files beside the cache (e.g. a half-assembled HDF5 file)."""
        for stale in self.path.parent.iterdir():  # .<name>.<pid>.tmp, not another cache's .<name>.v2.<pid>.tmp
            if _is_tmp_of(stale.name, self.path.name) and stale.is_file():
                stale.unlink(missing_ok=True)


class ZarrStore(_Store):
    @property
    def work_dir(self) -> Path:
        return self.path

    def exists(self) -> bool:
        return (self.path / META_FILE).exists()

    def read_meta(self) -> dict:
        return read_json_file(self.path / META_FILE, f"{self.path}/{META_FILE}")

    def write_meta(self, meta: dict) -> None:
        write_json_atomic(self.path / META_FILE, meta)

    def create(self, meta: dict, layout: dict[str, dict[str, Any]], index: dict[str, dict[str, np.ndarray]]):
        import zarr

        # build the store beside its place and move it there once whole (callers hold the creation lock): a run
        # killed while creating must not leave a half-made zarr that a rerun would take for a foreign folder
        tmp = self.path.with_name(f".{self.path.name}.creating")
        shutil.rmtree(tmp, ignore_errors=True)
        root = zarr.open_group(store=str(tmp), mode="w")
        for split, arrays in layout.items():
            for name, spec in arrays.items():
                root.create_array(
                    f"{split}/{name}",
                    shape=spec["shape"],
                    chunks=spec["chunks"],
                    shards=spec.get("shards"),
                    dtype=spec["dtype"],
                    compressors=_zarr_compressors(spec),
                    fill_value=0,
                )
            for name, value in index[split].items():
                root[f"{split}/{name}"][...] = value
        write_json_atomic(tmp / META_FILE, meta)
        if self.path.is_dir():
            self.path.rmdir()  # an empty folder; anything else was refused or removed before
        os.replace(tmp, self.path)

    def _shard_files(self, split: str, name: str, shard: int, ndim: int) -> Path:
        return self.path / split / name / "c" / str(shard) / Path(*(["0"] * (ndim - 1)))

    def write_shard(self, split: str, shard: int, start: int, rows: dict[str, np.ndarray]) -> None:
        import zarr

        root = zarr.open_group(store=str(self.path), mode="r+")
        for name, value in rows.items():
            # a killed run can leave a half-written shard file: remove it rather than let zarr merge into it
            self._shard_files(split, name, shard, value.ndim).unlink(missing_ok=True)
            root[f"{split}/{name}"][start : start + len(value)] = value

    def seal(self, meta: dict) -> None:
        self.write_meta(meta)

    def clean_up(self) -> None:
        super().clean_up()
        # inside the store: chunk files zarr had not yet renamed into place, and our own JSON temporaries
        for stale in [p for p in self.path.rglob("*") if p.name.endswith(".partial") or
                      (p.name.startswith(".") and p.name.endswith(".tmp"))]:
            stale.unlink(missing_ok=True)

    def remove(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


class H5Store(_Store):
    @property
    def work_dir(self) -> Path:
        return Path(f"{self.path}.parts")

    def exists(self) -> bool:
        return self.path.exists() or (self.work_dir / META_FILE).exists()

    def read_meta(self) -> dict:
        if self.path.exists():
            import h5py

            with h5py.File(self.path, "r") as f:
                return loads_limited(f.attrs["sanf"], f"{self.path} metadata")
        return read_json_file(self.work_dir / META_FILE)

    def write_meta(self, meta: dict) -> None:
        write_json_atomic(self.work_dir / META_FILE, meta)

    def work_dir_foreign(self) -> bool:
        w = self.work_dir
        if not w.is_dir():
            return w.exists() or w.is_symlink()
        # create() writes layout.json first: a folder without it (nor metadata) that is not empty is not ours
        return any(w.iterdir()) and not ((w / "layout.json").is_file() or (w / META_FILE).is_file())

    def create(self, meta: dict, layout: dict[str, dict[str, Any]], index: dict[str, dict[str, np.ndarray]]):
        if self.work_dir.exists():
            if self.work_dir_foreign():  # the writer refuses this before; never delete what sanf did not make
                raise SanfError(f"{self.work_dir} exists and is not sanf's; move it away or choose another --cache")
            shutil.rmtree(self.work_dir)
        self.work_dir.mkdir(parents=True)
        write_json_atomic(self.work_dir / "layout.json", layout)
        for split, arrays in index.items():
            (self.work_dir / split).mkdir()
            for name, value in arrays.items():
                _save_npy_atomic(self.work_dir / split / f"{name}.npy", value)
        self.write_meta(meta)

    def write_shard(self, split: str, shard: int, start: int, rows: dict[str, np.ndarray]) -> None:
        folder = self.work_dir / split / "shards"
        folder.mkdir(parents=True, exist_ok=True)
        for name, value in rows.items():
            _save_npy_atomic(folder / f"{shard:06d}.{name}.npy", value)

    def seal(self, meta: dict) -> None:
        import h5py

        layout = read_json_file(self.work_dir / "layout.json")
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with h5py.File(tmp, "w") as f:
            f.attrs["sanf"] = canonical_json(meta)
            for split, arrays in layout.items():
                group = f.create_group(split)
                shard_size = meta["shard_size"]
                for name, spec in arrays.items():
                    # HDF5 refuses chunks larger than the array: a split smaller than one chunk gets smaller chunks
                    chunks = tuple(min(c, n) for c, n in zip(spec["chunks"], spec["shape"], strict=True)) \
                        if spec["shape"][0] else None
                    compress = {"compression": "gzip", "compression_opts": 4} if spec.get("compress") and chunks \
                        else {}
                    ds = group.create_dataset(name, shape=tuple(spec["shape"]), dtype=spec["dtype"], chunks=chunks,
                                              **compress)
                    if name not in ROW_ARRAYS:  # INDEX_ARRAYS and the optional ones (masks): written at creation
                        ds[...] = np.load(self.work_dir / split / f"{name}.npy", allow_pickle=False)
                    else:
                        n = spec["shape"][0]
                        for shard, start in enumerate(range(0, n, shard_size)):
                            part = self.work_dir / split / "shards" / f"{shard:06d}.{name}.npy"
                            value = np.load(part, allow_pickle=False)
                            ds[start : start + len(value)] = value
            f.flush()
        os.replace(tmp, self.path)
        shutil.rmtree(self.work_dir, ignore_errors=True)

    def clean_up(self) -> None:
        super().clean_up()
        if self.path.is_file():  # assembled: the staged parts are no longer needed (a run killed before removing them)
            shutil.rmtree(self.work_dir, ignore_errors=True)

    def remove(self) -> None:
        shutil.rmtree(self.work_dir, ignore_errors=True)
        self.path.unlink(missing_ok=True)


def _zarr_compressors(spec: dict):
    """None (stored raw: feature tokens do not compress) unless the layout asks for compression (masks: mostly
    zeros), then zstd."""
    if not spec.get("compress"):
        return None
    from zarr.codecs import ZstdCodec

    return ZstdCodec(level=3)


def _is_tmp_of(name: str, target: str) -> bool:
    """Whether ``name`` is ``.<target>.<pid>.tmp``, the temporary an atomic write of ``target`` uses."""
    prefix = f".{target}."
    return name.startswith(prefix) and name.endswith(".tmp") and name[len(prefix):-4].isdigit()


def _save_npy_atomic(path: Path, value: np.ndarray) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(value), allow_pickle=False)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def open_store(path: Path, fmt: str) -> _Store:
    return ZarrStore(path) if fmt == "zarr" else H5Store(path)
