"""The feature cache without a backbone: writer/reader round trips, `sanf cache info` / `verify`, sealing."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from sanf_pipeline.cache import CacheSpec, CacheWriter, SplitListing, open_cache
from sanf_pipeline.cache.inspect import cache_info, verify_cache
from sanf_pipeline.cache.synthetic import write_synthetic_cache
from sanf_pipeline.cli import cli
from sanf_pipeline.errors import SanfError

FORMATS = ["zarr", "hdf5"]
SUFFIX = {"zarr": "", "hdf5": ".h5"}


def _path(tmp_path, fmt, name="cache"):
    return tmp_path / f"{name}{SUFFIX[fmt]}"


def _sanf(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ---------------------------------------------------------------------------------------- hand-made caches
CLASSES = ["cat", "dög", "猫"]
COUNTS = {"train": [5, 4, 6], "test": [3, 0, 2]}  # a class may be absent from a split
DIM, TOKENS = 4, 3


def _rows(split: str):
    """Deterministic rows for one split, sorted by label, and their ids (unicode ones included)."""
    labels = np.repeat(np.arange(len(CLASSES)), COUNTS[split])
    n = len(labels)
    base = (np.arange(n) + (1000 if split == "test" else 0)).astype(np.float32)
    cls = base[:, None] + np.arange(DIM, dtype=np.float32) / 8
    patch = cls[:, None, :] + np.arange(TOKENS, dtype=np.float32)[None, :, None] * 100
    ids = [f"{split}/{CLASSES[c]}/img ✓ {i:03d}.png" for i, c in enumerate(labels)]
    return labels, ids, cls, patch


def _spec(shard_size=4, dtype="float32", settings=None):
    listings = {s: SplitListing(*_rows(s)[:2]) for s in ("train", "test")}
    return CacheSpec(settings=settings or {"hand": 1}, meta={"dataset": {"name": "hand"}}, class_names=CLASSES,
                     listings=listings, dim=DIM, num_tokens=TOKENS, dtype=dtype, shard_size=shard_size,
                     chunk_size=shard_size)


INVALID = {"train": {1, 9}, "test": {4}}  # rows whose image was "unreadable"


def _write(writer: CacheWriter, jobs, invalid=INVALID):
    for job in jobs:
        labels, ids, cls, patch = _rows(job.split)
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


def _write_hand_cache(path, fmt, **kw) -> None:
    writer = CacheWriter(path, _spec(**kw), fmt=fmt)
    try:
        _write(writer, writer.open())
        assert writer.complete()
        writer.seal()
    finally:
        writer.close()


@pytest.mark.parametrize("fmt", FORMATS)
def test_hand_written_round_trip(tmp_path, fmt):
    path = _path(tmp_path, fmt)
    _write_hand_cache(path, fmt)
    with open_cache(path) as c:
        assert c.format == fmt
        assert c.class_names == CLASSES and c.dim == DIM and c.num_tokens == TOKENS
        assert sorted(c.splits) == ["test", "train"]
        assert len(c.meta["skipped"]) == 3
        assert {(s["split"], s["row"]) for s in c.meta["skipped"]} == {("train", 1), ("train", 9), ("test", 4)}
        assert all(s["reason"] == "truncated" for s in c.meta["skipped"])
        for split in ("train", "test"):
            labels, ids, cls, patch = _rows(split)
            keep = np.ones(len(labels), bool)
            keep[list(INVALID[split])] = False
            s = c.split(split)
            assert s.n == len(labels) and s.n_valid == keep.sum()
            assert c.meta["splits"][split]["n_valid"] == keep.sum()
            np.testing.assert_array_equal(s.class_offsets, np.concatenate([[0], np.cumsum(COUNTS[split])]))
            np.testing.assert_array_equal(s.valid, keep)
            np.testing.assert_array_equal(s.labels, labels[keep])
            assert s.sample_ids_all == ids
            assert s.sample_ids == [i for i, k in zip(ids, keep, strict=True) if k]
            for k in range(len(CLASSES)):
                lo, hi = s.class_range(k)
                block_cls, block_patch = s.read_class(k)
                assert block_cls.dtype == np.float32 and block_patch.dtype == np.float32
                np.testing.assert_array_equal(block_cls, cls[lo:hi][keep[lo:hi]])
                np.testing.assert_array_equal(block_patch, patch[lo:hi][keep[lo:hi]])
                assert s.read_class(k, patch=False)[1] is None
            all_cls, all_patch, all_labels, all_ids = s.read_all()
            np.testing.assert_array_equal(all_cls, cls[keep])
            np.testing.assert_array_equal(all_patch, patch[keep])
            np.testing.assert_array_equal(all_labels, labels[keep])
            assert np.all(np.diff(all_labels) >= 0)
            assert all_ids == s.sample_ids
        with pytest.raises(SanfError, match="out of range"):
            c.split("train").read_class(3)
        with pytest.raises(SanfError, match="valid classes are 0=cat, 1=dög, 2=猫"):
            c.class_index("dog")
        assert c.class_index("猫") == 2
    report = verify_cache(path)
    assert report.ok and report.rows_checked == 15 + 5


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_synthetic_cache(tmp_path, fmt, dtype):
    path = write_synthetic_cache(_path(tmp_path, fmt), n_classes=3, n_train=7, n_test=5, dim=8, num_tokens=4,
                                 fmt=fmt, dtype=dtype, shard_size=4, class_names=["x", "ÿ", "z z"])
    with open_cache(path) as c:
        assert c.meta["sealed"] and c.meta["dtype"] == dtype and c.class_names == ["x", "ÿ", "z z"]
        for split, per in (("train", 7), ("test", 5)):
            s = c.split(split)
            np.testing.assert_array_equal(s.class_offsets, [0, per, 2 * per, 3 * per])
            np.testing.assert_array_equal(s.labels, np.repeat([0, 1, 2], per))
            assert s.sample_ids[per] == f"{split}/ÿ/{per:05d}"
            cls, patch = s.read_class(1)
            assert cls.shape == (per, 8) and patch.shape == (per, 4, 8) and cls.dtype == np.float32
            whole_cls, whole_patch, _, _ = s.read_all()
            np.testing.assert_array_equal(whole_cls[per : 2 * per], cls)
            np.testing.assert_array_equal(whole_patch[per : 2 * per], patch)
            # the classes are separated: each block is nearest its own mean
            means = np.stack([s.read_class(k, patch=False)[0].mean(0) for k in range(3)])
            assert np.all(np.argmin(((whole_cls[:, None] - means[None]) ** 2).sum(-1), 1) == s.labels)
    assert verify_cache(path).ok


def test_synthetic_zarr_and_hdf5_hold_identical_arrays(tmp_path, same_cache):
    a = write_synthetic_cache(tmp_path / "a", fmt="zarr", dtype="float16", shard_size=8)
    b = write_synthetic_cache(tmp_path / "b.h5", fmt="hdf5", dtype="float16", shard_size=8)
    same_cache(a, b)


def test_writer_refuses_other_settings_and_overwrites(tmp_path):
    path = tmp_path / "c"
    _write_hand_cache(path, "zarr")
    with pytest.raises(SanfError, match=r"different settings \(hand \(1 -> 2\)\)"):
        CacheWriter(path, _spec(settings={"hand": 2}), fmt="zarr").open()
    assert open_cache(path).meta["settings"] == {"hand": 1}  # untouched
    w = CacheWriter(path, _spec(settings={"hand": 2}), fmt="zarr", overwrite=True)
    jobs = w.open()
    assert len(jobs) == len(w.all_jobs())  # a fresh cache: everything pending
    w.close()
    assert open_cache(path, allow_unsealed=True).meta["settings"] == {"hand": 2}


def test_writer_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(SanfError, match="not a sanf cache"):
        CacheWriter(tmp_path / "c", _spec(), fmt="zarr").open()
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("fmt", FORMATS)
def test_shards_split_between_writers_and_sealed_once(tmp_path, fmt, same_cache):
    """Two processes' writers own disjoint shards; both may find the cache complete, sealing twice is safe."""
    path = _path(tmp_path, fmt)
    w0 = CacheWriter(path, _spec(), fmt=fmt, num_shards_total=2, shard_index=0)
    w1 = CacheWriter(path, _spec(), fmt=fmt, num_shards_total=2, shard_index=1)
    j0, j1 = w0.open(), w1.open()
    assert j0 and j1 and not {(j.split, j.shard) for j in j0} & {(j.split, j.shard) for j in j1}
    assert len(j0) + len(j1) == len(w0.all_jobs())
    _write(w0, j0)
    assert not w0.complete()
    _write(w1, j1)
    assert w0.complete() and w1.complete()
    w0.seal()
    w1.seal()  # the other process raced to seal too
    assert w0.is_sealed() and w1.is_sealed()
    w0.close()
    w1.close()
    with open_cache(path) as c:
        assert c.meta["sealed"]
    assert verify_cache(path).ok
    hand = _path(tmp_path, fmt, "single")
    _write_hand_cache(hand, fmt)
    same_cache(path, hand)


# --------------------------------------------------------------------------------------- info and verify
def _incomplete(path, fmt):
    writer = CacheWriter(path, _spec(), fmt=fmt)
    jobs = writer.open()
    _write(writer, jobs[:2])
    writer.close()
    return len(jobs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_info_and_verify_cli(tmp_path, fmt):
    path = _path(tmp_path, fmt)
    _write_hand_cache(path, fmt)
    r = _sanf("cache", "info", path)
    assert r.exit_code == 0, r.output
    assert f"({fmt}, sealed)" in r.stdout and "d=4, 3 patch tokens, float32" in r.stdout
    assert "train: 15 samples (13 valid)" in r.stdout and "skipped    3 files" in r.stdout
    r = _sanf("cache", "info", path, "--json")
    info = json.loads(r.stdout)
    assert info["sealed"] and info["splits"]["train"]["per_class"] == {"cat": 4, "dög": 4, "猫": 5}
    assert info["size_bytes"] > 0
    r = _sanf("cache", "verify", path)
    assert r.exit_code == 0 and r.stdout.startswith("ok:"), r.output


@pytest.mark.parametrize("fmt", FORMATS)
def test_incomplete_cache_is_reported(tmp_path, fmt):
    path = _path(tmp_path, fmt)
    total = _incomplete(path, fmt)
    r = _sanf("cache", "info", path)
    assert r.exit_code == 0 and "INCOMPLETE" in r.stdout, r.output
    info = cache_info(path)
    assert not info["sealed"]
    assert sum(s["shards_done"] for s in info["splits"].values()) == 2
    assert sum(s["shards"] for s in info["splits"].values()) == total
    r = _sanf("cache", "verify", path)
    assert r.exit_code == 2 and "incomplete cache" in r.stderr and "Traceback" not in r.output
    with pytest.raises(SanfError, match="incomplete cache"):
        open_cache(path)
    # the same writer settings resume it: only the missing shards are pending
    writer = CacheWriter(path, _spec(), fmt=fmt)
    pending = writer.open()
    assert len(pending) == total - 2
    _write(writer, pending)
    writer.seal()
    writer.close()
    assert verify_cache(path).ok


def test_verify_detects_corrupted_zarr_shard_bytes(tmp_path):
    path = _path(tmp_path, "zarr")
    _write_hand_cache(path, "zarr")
    shard_file = path / "train" / "patch" / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[20] ^= 0xFF  # inside the chunk's data
    shard_file.write_bytes(bytes(data))
    r = _sanf("cache", "verify", path)
    assert r.exit_code == 2, r.output
    assert "train: shard 1 (rows 4:8) does not match its checksum" in r.stderr
    assert "Traceback" not in r.output


def test_verify_reports_an_unreadable_zarr_shard(tmp_path):
    path = _path(tmp_path, "zarr")
    _write_hand_cache(path, "zarr")
    shard_file = path / "test" / "cls" / "c" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[-2] ^= 0xFF  # inside the shard index's checksum: zarr refuses to decode the shard
    shard_file.write_bytes(bytes(data))
    r = _sanf("cache", "verify", path)
    assert r.exit_code == 2, r.output
    assert "test: shard 0" in r.stderr and "cannot be read" in r.stderr
    assert "Traceback" not in r.output


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_detects_nan(tmp_path, fmt):
    path = _path(tmp_path, fmt)
    _write_hand_cache(path, fmt)
    if fmt == "zarr":
        zarr.open_group(str(path), mode="r+")["train/cls"][6, 1] = np.nan
    else:
        with h5py.File(path, "r+") as f:
            f["train/cls"][6, 1] = np.inf
    r = _sanf("cache", "verify", path)
    assert r.exit_code == 2, r.output
    assert "train: 1 NaN/Inf values in cls rows 4:8" in r.stderr
    assert "shard 1 (rows 4:8) does not match its checksum" in r.stderr


@pytest.mark.parametrize("bad", ["missing", "empty-dir", "not-json"])
def test_info_and_verify_refuse_non_caches(tmp_path, bad):
    path = tmp_path / "thing"
    if bad == "empty-dir":
        path.mkdir()
    elif bad == "not-json":
        path.mkdir()
        (path / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
        (path / "sanf.json").write_text("{not json")
    for cmd in ("info", "verify"):
        r = _sanf("cache", cmd, path)
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output and r.stderr.count("\n") <= 2


@pytest.mark.parametrize("fmt", FORMATS)
def test_crash_while_creating_leaves_nothing_a_rerun_refuses(tmp_path, fmt, monkeypatch):
    """A run killed while creating the cache (before its metadata exists) must not block the rerun."""
    from sanf_pipeline.cache import stores

    path = _path(tmp_path, fmt)
    write_json_atomic = stores.write_json_atomic

    def crash_on_meta(target, obj):
        if target.name == "sanf.json":
            raise KeyboardInterrupt  # as if killed right before the metadata was written
        write_json_atomic(target, obj)

    monkeypatch.setattr(stores, "write_json_atomic", crash_on_meta)
    with pytest.raises(KeyboardInterrupt):
        CacheWriter(path, _spec(), fmt=fmt).open()
    monkeypatch.undo()
    with pytest.raises(SanfError, match="not a sanf feature cache|incomplete"):
        open_cache(path)
    _write_hand_cache(path, fmt)  # the same settings again: created afresh, written, sealed
    assert verify_cache(path).ok
    assert not list(tmp_path.glob(".*.creating"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_split_smaller_than_one_shard(tmp_path, fmt):
    """Tiny splits (fewer rows than a chunk, as default shard geometry gives for small datasets) seal and read."""
    path = _path(tmp_path, fmt)
    _write_hand_cache(path, fmt, shard_size=64)
    with open_cache(path) as c:
        assert c.meta["splits"]["test"] == {"n": 5, "shards": 1, "n_valid": 4}
        _, _, cls, _ = _rows("test")
        np.testing.assert_array_equal(c.split("test").read_class(2)[0], cls[3:4])  # row 4 was skipped
    assert verify_cache(path).ok
    small = write_synthetic_cache(_path(tmp_path, fmt, "synthetic"), n_train=2, n_test=1, fmt=fmt, shard_size=8)
    assert verify_cache(small).ok and open_cache(small).split("test").read_all()[0].shape == (3, 16)
