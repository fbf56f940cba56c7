"""Ctrl-C during `sanf extract` says exactly what was kept ("16 of 45 images kept" / "nothing finished yet"), keeps
every whole shard already computed, and the rerun finishes the same cache. Batch size, workers and shard size do not
block a resume or a rerun: they are recorded, not fingerprinted (a resumed cache keeps its shard geometry)."""

from __future__ import annotations

import json

import pytest
from conftest import cache_path, extract_args
from robust_helpers import sanf

from sanf_pipeline.cache import open_cache
from sanf_pipeline.extract import job as E

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def interrupt_at(monkeypatch, n: int) -> None:
    """Ctrl-C arrives during the n-th backbone batch (batches of 4, shards of 8 in extract_args)."""
    real, calls = E._Forward.launch, [0]

    def launch(self, x):
        calls[0] += 1
        if calls[0] == n:
            raise KeyboardInterrupt
        return real(self, x)

    monkeypatch.setattr(E._Forward, "launch", launch)


def done_rows(cache) -> int:
    total = 0
    for marker in (cache / "_progress").rglob("*.json"):
        m = json.loads(marker.read_text())
        total += m["stop"] - m["start"]
    return total


@pytest.mark.parametrize("at, kept", [(1, None), (6, 16)])
def test_ctrl_c_says_what_was_kept_and_rerun_finishes(folder_dataset, extract_reference, same_cache, monkeypatch,
                                                       tmp_path, at, kept):
    cache = cache_path(tmp_path, "zarr")
    interrupt_at(monkeypatch, at)
    r = sanf(*extract_args(folder_dataset, cache))
    assert r.exit_code == 130, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.output, r.stderr
    if kept is None:
        assert "nothing finished yet" in lines[0]
        assert done_rows(cache) == 0
    else:
        # batches 1-5 are done: shards 0 and 1 (rows 0:16) were whole and are kept, batch 5 is lost
        assert f"interrupted; {kept} of 45 images kept in {cache}" in lines[0], lines[0]
        assert done_rows(cache) == kept
    monkeypatch.undo()
    r = sanf(*extract_args(folder_dataset, cache))
    assert r.exit_code == 0, r.output
    same_cache(extract_reference["zarr"], cache)


def test_batch_and_shard_size_do_not_block_resume_or_rerun(folder_dataset, extract_reference, monkeypatch, tmp_path):
    cache = cache_path(tmp_path, "zarr")
    interrupt_at(monkeypatch, 6)
    assert sanf(*extract_args(folder_dataset, cache)).exit_code == 130
    monkeypatch.undo()
    # the usual fix after running out of memory: a smaller batch; and a shard size the cache was not made with
    r = sanf(*extract_args(folder_dataset, cache), "--batch-size", "2", "--shard-size", "16", "--num-workers", "1")
    assert r.exit_code == 0, r.output
    c, ref = open_cache(cache), open_cache(extract_reference["zarr"])
    assert c.meta["shard_size"] == 8  # the resumed cache keeps its geometry
    assert c.fingerprint == ref.fingerprint and c.meta["settings"] == ref.meta["settings"]
    assert "batch_size" not in c.meta["settings"] and "shard_size" not in c.meta["settings"]
    assert c.meta["run"]["batch_size"] == 2 and c.meta["run"]["num_workers"] == 1  # recorded: the sealing run's
    # a rerun of the finished cache with yet another batch size is a no-op, not a refusal
    r = sanf(*extract_args(folder_dataset, cache), "--batch-size", "8")
    assert r.exit_code == 0 and "complete" in r.stdout, r.output
