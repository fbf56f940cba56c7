"""A cache damaged after it was sealed never trains or scores silently: every read that feeds fit, eval, baseline and
sweep checks the shards it reads against their sha256, and a mismatch is one line naming the shard and
`sanf cache verify`. Corruption as a user meets it: bytes flipped inside the valid rows of a shard file (Zarr), values
changed in place (HDF5)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import FAST_FIT, FORMATS, assert_user_error
from robust_helpers import sanf

from sanf_pipeline.cache import open_cache
from sanf_pipeline.cache.synthetic import write_synthetic_cache
from sanf_pipeline.errors import SanfError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def make(tmp_path, fmt, name="c") -> Path:
    path = tmp_path / (name + (".h5" if fmt == "hdf5" else ""))
    return write_synthetic_cache(path, n_classes=3, n_train=40, n_test=20, dim=16, num_tokens=4, fmt=fmt,
                                 shard_size=32, class_names=["cat", "dog", "frog"])


def corrupt(path: Path, fmt: str, split="train", array="patch", row=3) -> None:
    """Change stored values of one valid row of shard 0 without touching any checksum."""
    if fmt == "zarr":
        f = path / split / array / "c" / "0" / ("0/0" if array == "patch" else "0")
        raw = bytearray(f.read_bytes())
        row_bytes = {"patch": 4 * 16 * 4, "cls": 16 * 4}[array]
        at = row * row_bytes + 8  # inside the first chunk (no compression): row `row`'s values
        raw[at : at + 64] = bytes(b ^ 0x5A for b in raw[at : at + 64])
        f.write_bytes(bytes(raw))
    else:
        with h5py.File(path, "r+") as h:
            h[split][array][row] = h[split][array][row] + 1.0


@pytest.mark.parametrize("fmt", FORMATS)
def test_fit_refuses_a_corrupted_train_shard(tmp_path, fmt):
    cache = make(tmp_path, fmt)
    corrupt(cache, fmt)
    r = sanf("fit", "--cache", cache, "--normal-class", "cat", "--out", tmp_path / "run", "--epochs", "1", *FAST_FIT)
    line = assert_user_error(r, "shard 0 of split train", "sanf cache verify", "does not match its checksum")
    assert "patch" in line
    assert not (tmp_path / "run" / "model.safetensors").exists()
    assert not sanf("cache", "verify", cache).exit_code == 0  # verify agrees


@pytest.mark.parametrize("command", ["baseline", "sweep", "eval"])
def test_every_stage_two_reader_checks(tmp_path, command):
    cache = make(tmp_path, "zarr")
    if command == "eval":
        r = sanf("fit", "--cache", cache, "--normal-class", "cat", "--out", tmp_path / "run", "--epochs", "1",
                 *FAST_FIT)
        assert r.exit_code == 0, r.output
        corrupt(cache, "zarr", split="test", array="cls", row=5)
        r = sanf("eval", "--run", tmp_path / "run", "--device", "cpu")
        assert_user_error(r, "split test", "sanf cache verify")
        return
    corrupt(cache, "zarr", split="train", array="cls", row=2)  # the class tokens every baseline reads
    if command == "baseline":
        r = sanf("baseline", "--cache", cache, "--normal-class", "cat", "--method", "gaussian", "--out", tmp_path / "b")
    else:
        r = sanf("sweep", "--cache", cache, "--classes", "cat", "--methods", "gaussian", "--out", tmp_path / "s",
                 "--workers", "1", "--no-plots", "--quiet")
    assert_user_error(r, "shard 0 of split train", "sanf cache verify")


def test_reads_outside_the_damaged_shard_work_and_verification_is_memoised(tmp_path):
    cache = make(tmp_path, "zarr")
    corrupt(cache, "zarr", split="train", array="patch", row=3)  # shard 0 = rows 0:32, class cat only
    c = open_cache(cache)
    cls, patch = c.split("train").read_class(2)  # frog: rows 80:120, shards 2 and 3
    assert patch.shape == (40, 4, 16)
    cls, _ = c.split("train").read_class(0, patch=False)  # cat's class tokens are intact: per-array digests
    assert cls.shape == (40, 16)
    with pytest.raises(SanfError, match=r"shard 0 of split train \(rows 0:32\) does not match its checksum"):
        c.split("train").read_class(0)
    assert ("train", 2, "patch") in c._verified
    assert open_cache(cache, verify=False).split("train").read_class(0)[1].shape == (40, 4, 16)


def test_a_cache_sealed_before_per_array_digests_is_checked_too(tmp_path):
    cache = make(tmp_path, "zarr")
    meta_file = cache / "sanf.json"
    meta = json.loads(meta_file.read_text())
    del meta["shard_sha256_arrays"]
    meta_file.write_text(json.dumps(meta))
    good = tmp_path / "copy"
    shutil.copytree(cache, good)
    a = open_cache(good).split("train").read_class(1)
    assert a[0].shape == (40, 16)
    corrupt(cache, "zarr", split="train", array="patch", row=3)
    with pytest.raises(SanfError, match=r"shard 0 of split train \(rows 0:32\) does not match its checksum;"):
        open_cache(cache).split("train").read_class(0, patch=False)  # the combined digest covers all three arrays
    np.testing.assert_array_equal(a[0], open_cache(cache).split("train").read_class(1)[0])  # shard 1+: intact
