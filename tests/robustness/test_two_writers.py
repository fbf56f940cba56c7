"""Two writers at once: a second `sanf extract` into a cache a live process is writing is refused with one line
(a dead owner's stale lock is removed instead); a second `sanf sweep` into the same folder is refused; writers that
own disjoint shards of one cache (job arrays, torchrun ranks) may both find it complete and race to seal it."""

from __future__ import annotations

import json
import socket
import subprocess

import pytest
from conftest import (
    FORMATS,
    assert_user_error,
    cache_path,
    extract_args,
    hand_spec,
    write_hand_cache,
    write_hand_shards,
)
from robust_helpers import sanf

from sanf_pipeline.cache import CacheWriter, open_cache
from sanf_pipeline.cache.inspect import verify_cache
from sanf_pipeline.cache.lock import lock_dir
from sanf_pipeline.errors import SanfError
from sanf_pipeline.sweep import run_sweep

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def test_second_writer_is_refused_and_stale_lock_removed(make_folder_dataset, tmp_path):
    data = make_folder_dataset(n_train=2, n_test=1)
    cache = tmp_path / "cache"
    folder = lock_dir(cache)
    folder.mkdir()
    host = socket.gethostname()
    owner = {"host": host, "num_shards": 1, "shard_index": 0, "started": "2024-01-01T00:00:00"}
    live = subprocess.Popen(["sleep", "60"])
    try:
        (folder / f"{host}-{live.pid}.json").write_text(json.dumps({**owner, "pid": live.pid}))
        line = assert_user_error(sanf(*extract_args(data, cache)))
        assert "being written by another process" in line and f"pid {live.pid}" in line, line
        assert not cache.exists()
    finally:
        live.kill()
        live.wait()
    # now the owner is gone: its lock is stale, is removed, and extraction proceeds
    r = sanf(*extract_args(data, cache))
    assert r.exit_code == 0 and "complete" in r.stdout, r.output
    assert not (folder / f"{host}-{live.pid}.json").exists()
    assert verify_cache(cache).ok


def test_one_sweep_per_folder(pets_cache, tmp_path, monkeypatch):
    import fcntl

    from sanf_pipeline.sweep import run as sweep_mod

    monkeypatch.setattr(sweep_mod, "LOCK_WAIT_S", 0.3)
    out = tmp_path / "busy"
    out.mkdir()
    with open(out / sweep_mod.LOCK_FILE, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # another process's sweep, as far as flock can tell (another open file)
        with pytest.raises(SanfError, match="another `sanf sweep` is writing to"):
            run_sweep(pets_cache, out, "cat", None, "knn", "0", None, plots=False)
    assert run_sweep(pets_cache, out, "cat", None, "knn", "0", None, plots=False).summary["n_finished"] == 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_shards_split_between_writers_and_sealed_once(tmp_path, fmt, same_cache):
    """Two processes' writers own disjoint shards; both may find the cache complete, sealing twice is safe."""
    path = cache_path(tmp_path, fmt)
    w0 = CacheWriter(path, hand_spec(), fmt=fmt, num_shards_total=2, shard_index=0)
    w1 = CacheWriter(path, hand_spec(), fmt=fmt, num_shards_total=2, shard_index=1)
    j0, j1 = w0.open(), w1.open()
    assert j0 and j1 and not {(j.split, j.shard) for j in j0} & {(j.split, j.shard) for j in j1}
    assert len(j0) + len(j1) == len(w0.all_jobs())
    write_hand_shards(w0, j0)
    assert not w0.complete()
    write_hand_shards(w1, j1)
    assert w0.complete() and w1.complete()
    w0.seal()
    w1.seal()  # the other process raced to seal too
    assert w0.is_sealed() and w1.is_sealed()
    w0.close()
    w1.close()
    with open_cache(path) as c:
        assert c.meta["sealed"]
    assert verify_cache(path).ok
    hand = cache_path(tmp_path, fmt, "single")
    write_hand_cache(hand, fmt)
    same_cache(path, hand)
