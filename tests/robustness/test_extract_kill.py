"""SIGKILL a running `sanf extract` (Zarr and HDF5) at exact points of its code: creating the cache, after shard
markers, inside the background writer's write of a shard, between a shard's data and its marker, between the splits,
before and while sealing (and assembling the HDF5 file), after sealing. Rerunning the same command must finish with
a cache bitwise identical to an uninterrupted run's, which verifies, and leave no lock or temporary file behind.
Also: crashes injected in this process (a half-written shard, a crash while creating the cache)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    FORMATS,
    cache_path,
    extract_args,
    extract_config,
    hand_spec,
    write_hand_cache,
)
from robust_helpers import fork_server, run_killed_at, sanf  # noqa: F401 (fixtures)

from sanf_pipeline.cache import CacheWriter, open_cache
from sanf_pipeline.cache.inspect import verify_cache
from sanf_pipeline.cache.lock import lock_dir
from sanf_pipeline.errors import SanfError
from sanf_pipeline.extract.job import extract

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fork_server")  # tests/conftest.py, robust_helpers.py

N_SHARDS = 6  # folder_dataset with extract_args: 4 train shards, then 2 test shards


def work_dir(cache: Path, fmt: str) -> Path:
    """Where a cache's shard markers live while it is being written."""
    return cache if fmt == "zarr" else Path(f"{cache}.parts")


def markers(cache: Path, fmt: str, split: str | None = None) -> list[Path]:
    folder = work_dir(cache, fmt) / "_progress"
    return sorted(folder.glob(f"{split or '*'}/[0-9]*.json"))


def leftovers(cache: Path, fmt: str) -> list[Path]:
    """Temporary files and folders of interrupted writers, in the cache or beside it."""
    found = [p for p in cache.parent.iterdir() if p.name.startswith(f".{cache.name}.") and not p.name.endswith(".lock")]
    if fmt == "zarr" and cache.is_dir():
        found += [p for p in cache.rglob("*") if p.name.endswith((".partial", ".tmp"))]
    if fmt == "hdf5" and work_dir(cache, fmt).exists():
        found.append(work_dir(cache, fmt))
    return found


def looks_sealed(cache: Path, fmt: str) -> bool:
    if fmt == "hdf5":
        return cache.is_file()
    meta = cache / "sanf.json"
    return meta.is_file() and json.loads(meta.read_text())["sealed"]


# (target, at, when, match, shard markers on disk after the kill, sealed after the kill) per format; see
# robust_helpers.run_killed_at. os.replace is the last step of every atomic write of the cache (Zarr's own chunk
# writes included), so "before os.replace" leaves that file's temporary written in full but not in place.
KILL_POINTS = {
    "creating the cache, before its metadata is in place": {
        "zarr": ("os:replace", 1, "before", "sanf.json", 0, False),
        "hdf5": ("os:replace", 1, "before", "sanf.json", 0, False),
    },
    "after the first shard's marker": {
        fmt: ("sanf_pipeline.cache.stores:_Store.mark_done", 1, "after", None, 1, False) for fmt in FORMATS
    },
    "inside the background writer, the second shard's patch tokens written but not in place": {
        "zarr": ("os:replace", 2, "before", "/patch/c/", 1, False),
        "hdf5": ("os:replace", 2, "before", ".patch.npy", 1, False),
    },
    "between the third shard's data and its marker": {
        fmt: ("sanf_pipeline.cache.stores:_Store.mark_done", 3, "before", None, 2, False) for fmt in FORMATS
    },
    "between the splits (every train shard done, no test shard)": {
        fmt: ("sanf_pipeline.cache.stores:_Store.mark_done", 4, "after", None, 4, False) for fmt in FORMATS
    },
    "every shard done, before sealing": {
        fmt: ("sanf_pipeline.cache.writer:CacheWriter.seal", 1, "before", None, N_SHARDS, False) for fmt in FORMATS
    },
    "while sealing (Zarr: the sealed metadata not in place; HDF5: assembling the file, half the shards copied)": {
        "zarr": ("os:replace", 2, "before", "sanf.json", N_SHARDS, False),
        "hdf5": ("numpy:load", N_SHARDS * 3 // 2, "after", "shards", N_SHARDS, False),
    },
    "sealed, before the clean-up (HDF5: the assembled file in place, its parts not removed)": {
        "zarr": ("os:replace", 2, "after", "sanf.json", N_SHARDS, True),
        "hdf5": ("os:replace", 1, "after", ".h5')", N_SHARDS, True),
    },
}
CASES = [pytest.param(fmt, *points[fmt], id=f"{fmt}: {name}") for name, points in KILL_POINTS.items()
         for fmt in FORMATS]


@pytest.mark.parametrize("fmt, target, at, when, match, done, sealed", CASES)
def test_sigkill_then_rerun_is_bitwise_identical(extract_reference, folder_dataset, tmp_path, same_cache, fmt,
                                                  target, at, when, match, done, sealed):
    cache = cache_path(tmp_path, fmt)
    args = extract_args(folder_dataset, cache)
    run_killed_at(args, target=target, at=at, when=when, match=match)
    assert len(markers(cache, fmt)) == done, "the process was not killed where this case means to kill it"
    assert looks_sealed(cache, fmt) == sealed  # a killed run never leaves a cache that looks complete before sealing
    if not sealed:
        with pytest.raises(SanfError, match="incomplete cache|not a sanf feature cache|does not exist"):
            open_cache(cache)

    r = sanf(*args)  # the same command again, to completion
    assert r.exit_code == 0 and ": complete;" in r.stdout, r.output
    assert "Traceback" not in r.output
    same_cache(extract_reference[fmt], cache)  # arrays, labels, sample ids, shard digests, settings
    assert verify_cache(cache).ok
    assert not list(lock_dir(cache).glob("*.json")), "the killed run's stale owner lock was not removed"
    assert not leftovers(cache, fmt), "an interrupted writer's temporary files were left behind"


# ------------------------------------------------------------------------------------- crashes in-process
class _Crash(RuntimeError):
    pass


def shard_data_file(cache: Path, fmt: str, split: str, shard: int) -> Path:
    if fmt == "zarr":
        return cache / split / "cls" / "c" / str(shard) / "0"
    return work_dir(cache, fmt) / split / "shards" / f"{shard:06d}.cls.npy"


@pytest.mark.parametrize("fmt", FORMATS)
def test_half_written_shard_is_never_counted_complete(extract_reference, folder_dataset, fmt, tmp_path, monkeypatch,
                                                       same_cache):
    cache = cache_path(tmp_path, fmt)
    write_shard = CacheWriter.write_shard

    def crash_after_two(self, job, *args):
        if len(markers(cache, fmt)) >= 2:
            raise _Crash("injected crash")
        write_shard(self, job, *args)

    monkeypatch.setattr(CacheWriter, "write_shard", crash_after_two)
    with pytest.raises(_Crash):
        extract(extract_config(folder_dataset, cache))
    monkeypatch.undo()
    # garbage where shard 2 of train would go (as a run killed while writing it would leave), no marker
    rng = np.random.default_rng(0)
    garbage = shard_data_file(cache, fmt, "train", 2)
    garbage.parent.mkdir(parents=True, exist_ok=True)
    garbage.write_bytes(rng.bytes(333))
    if fmt == "zarr":
        patch_file = cache / "train" / "patch" / "c" / "2" / "0" / "0"
        patch_file.parent.mkdir(parents=True, exist_ok=True)
        patch_file.write_bytes(rng.bytes(5000))
    assert [p.stem for p in markers(cache, fmt)] == ["000000", "000001"]
    with pytest.raises(SanfError, match="incomplete cache"):
        open_cache(cache)
    result = extract(extract_config(folder_dataset, cache))
    assert result.sealed and result.shards_written == 4
    assert verify_cache(cache).ok
    same_cache(extract_reference[fmt], cache)


@pytest.mark.parametrize("fmt", FORMATS)
def test_crash_while_creating_leaves_nothing_a_rerun_refuses(tmp_path, fmt, monkeypatch):
    """A run killed while creating the cache (before its metadata exists) must not block the rerun."""
    from sanf_pipeline.cache import stores

    path = cache_path(tmp_path, fmt)
    write_json_atomic = stores.write_json_atomic

    def crash_on_meta(target, obj):
        if target.name == "sanf.json":
            raise KeyboardInterrupt  # as if killed right before the metadata was written
        write_json_atomic(target, obj)

    monkeypatch.setattr(stores, "write_json_atomic", crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        CacheWriter(path, hand_spec(), fmt=fmt).open()
    monkeypatch.undo()
    with pytest.raises(SanfError, match="not a sanf feature cache|incomplete"):
        open_cache(path)
    write_hand_cache(path, fmt)  # the same settings again: created afresh, written, sealed
    assert verify_cache(path).ok
    assert not list(tmp_path.glob(".*.creating"))
