"""The feature cache without a backbone: writer/reader round trips, `sanf cache info` / `verify`, sealing. Refused,
incomplete, corrupted caches and several writers: tests/robustness/."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import (
    FORMATS,
    HAND_CLASSES,
    HAND_COUNTS,
    HAND_DIM,
    HAND_INVALID,
    HAND_TOKENS,
    cache_path,
    hand_rows,
    write_hand_cache,
)

from sanf_pipeline.cache import open_cache
from sanf_pipeline.cache.inspect import verify_cache
from sanf_pipeline.cache.synthetic import write_synthetic_cache
from sanf_pipeline.cli.main import cli
from sanf_pipeline.errors import SanfError


def _sanf(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ------------------------------------------------------------------------- hand-made caches (tests/conftest.py)
@pytest.mark.parametrize("fmt", FORMATS)
def test_hand_written_round_trip(tmp_path, fmt):
    path = cache_path(tmp_path, fmt)
    write_hand_cache(path, fmt)
    with open_cache(path) as c:
        assert c.format == fmt
        assert c.class_names == HAND_CLASSES and c.dim == HAND_DIM and c.num_tokens == HAND_TOKENS
        assert sorted(c.splits) == ["test", "train"]
        assert len(c.meta["skipped"]) == 3
        assert {(s["split"], s["row"]) for s in c.meta["skipped"]} == {("train", 1), ("train", 9), ("test", 4)}
        assert all(s["reason"] == "truncated" for s in c.meta["skipped"])
        for split in ("train", "test"):
            labels, ids, cls, patch = hand_rows(split)
            keep = np.ones(len(labels), bool)
            keep[list(HAND_INVALID[split])] = False
            s = c.split(split)
            assert s.n == len(labels) and s.n_valid == keep.sum()
            assert c.meta["splits"][split]["n_valid"] == keep.sum()
            np.testing.assert_array_equal(s.class_offsets, np.concatenate([[0], np.cumsum(HAND_COUNTS[split])]))
            np.testing.assert_array_equal(s.valid, keep)
            np.testing.assert_array_equal(s.labels, labels[keep])
            assert s.sample_ids_all == ids
            assert s.sample_ids == [i for i, k in zip(ids, keep, strict=True) if k]
            for k in range(len(HAND_CLASSES)):
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
    path = write_synthetic_cache(cache_path(tmp_path, fmt), n_classes=3, n_train=7, n_test=5, dim=8, num_tokens=4,
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


# --------------------------------------------------------------------------------------- info and verify


@pytest.mark.parametrize("fmt", FORMATS)
def test_info_and_verify_cli(tmp_path, fmt):
    path = cache_path(tmp_path, fmt)
    write_hand_cache(path, fmt)
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
def test_split_smaller_than_one_shard(tmp_path, fmt):
    """Tiny splits (fewer rows than a chunk, as default shard geometry gives for small datasets) seal and read."""
    path = cache_path(tmp_path, fmt)
    write_hand_cache(path, fmt, shard_size=64)
    with open_cache(path) as c:
        assert c.meta["splits"]["test"] == {"n": 5, "shards": 1, "n_valid": 4}
        _, _, cls, _ = hand_rows("test")
        np.testing.assert_array_equal(c.split("test").read_class(2)[0], cls[3:4])  # row 4 was skipped
    assert verify_cache(path).ok
    small = write_synthetic_cache(cache_path(tmp_path, fmt, "synthetic"), n_train=2, n_test=1, fmt=fmt, shard_size=8)
    assert verify_cache(small).ok and open_cache(small).split("test").read_all()[0].shape == (3, 16)
