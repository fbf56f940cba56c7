"""A full disk (ENOSPC injected into the writers) while fitting and while writing a cache: one-line error, exit 2,
no traceback, and nothing written before is deleted; the same command finishes once there is space again."""

from __future__ import annotations

import errno

import pytest
from conftest import assert_user_error, extract_args
from robust_helpers import EPOCHS, fit_args, log_lines, read_metrics, sanf, small_cache_fixture  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _space_message(line: str) -> None:
    assert "disk full" in line or "space" in line, line


def _fail_safetensors_after(monkeypatch, n_ok: int) -> list:
    """``safetensors.torch.save_file`` works ``n_ok`` times, then writes a partial file and raises ENOSPC."""
    import safetensors.torch

    real = safetensors.torch.save_file
    calls = []

    def save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) > n_ok:
            with open(filename, "wb") as fh:
                fh.write(b"\0" * 10)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    return calls


@pytest.fixture(scope="module")
def finished_run(small_cache, tmp_path_factory):
    old = tmp_path_factory.mktemp("runs") / "old"
    assert sanf(*fit_args(small_cache, old)).exit_code == 0
    assert sanf("eval", "--run", old, "--device", "cpu").exit_code == 0
    return old, {p.name: p.read_bytes() for p in old.iterdir()}


@pytest.mark.parametrize("n_ok", [0, 2, EPOCHS], ids=["first-checkpoint", "third-checkpoint", "final-model"])
def test_fit_disk_full(small_cache, finished_run, tmp_path, monkeypatch, n_ok):
    # an earlier, finished and evaluated run next to the new one must survive untouched
    old, before = finished_run
    out = old.parent / f"run-{n_ok}"
    with monkeypatch.context() as m:
        _fail_safetensors_after(m, n_ok)
        line = assert_user_error(sanf(*fit_args(small_cache, out)))
    _space_message(line)
    assert {p.name: p.read_bytes() for p in old.iterdir()} == before
    assert not list(out.glob(".*.tmp")), "a failed write must not leave its temporary file"
    assert not (out / "model.safetensors").exists()
    assert log_lines(out) == min(n_ok, EPOCHS)  # the epochs checkpointed before the fault are kept
    if n_ok:
        assert (out / "checkpoint.safetensors").is_file()

    res = sanf(*fit_args(small_cache, out))  # space again: the same command resumes and finishes
    assert res.exit_code == 0, (res.output, res.exception)
    assert log_lines(out) == EPOCHS and (out / "model.safetensors").is_file()


def test_eval_disk_full_keeps_earlier_results(small_cache, tmp_path, monkeypatch):
    import sanf_pipeline.store.run_folder as runs

    out = tmp_path / "run"
    assert sanf(*fit_args(small_cache, out)).exit_code == 0
    assert sanf("eval", "--run", out, "--device", "cpu").exit_code == 0
    metrics = read_metrics(out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    real_replace = runs.os.replace

    def replace(src, dst, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(runs.os, "replace", replace)
    line = assert_user_error(sanf("eval", "--run", out, "--device", "cpu", "--score", "z2", "--overwrite",
                                  "--out", tmp_path / "other"))
    monkeypatch.setattr(runs.os, "replace", real_replace)
    _space_message(line)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert read_metrics(out) == metrics


def _fail_shards_after(monkeypatch, n_ok: int) -> None:
    from sanf_pipeline.cache import stores

    calls = []
    for cls in (stores.ZarrStore, stores.H5Store):
        real = cls.write_shard

        def write_shard(self, split, shard, start, rows, _real=real):
            calls.append((split, shard))
            if len(calls) > n_ok:
                raise OSError(errno.ENOSPC, "No space left on device")
            return _real(self, split, shard, start, rows)

        monkeypatch.setattr(cls, "write_shard", write_shard)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_cache_write_disk_full_api(tmp_path, monkeypatch, fmt):
    from sanf_pipeline.cache.synthetic import write_synthetic_cache
    from sanf_pipeline.errors import SanfError

    path = tmp_path / ("c.h5" if fmt == "hdf5" else "c")
    with monkeypatch.context() as m:
        _fail_shards_after(m, 1)
        with pytest.raises(SanfError) as info:
            write_synthetic_cache(path, n_train=8, n_test=4, dim=16, num_tokens=4, fmt=fmt, shard_size=4)
    msg = str(info.value)
    assert "\n" not in msg
    _space_message(msg)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_extract_disk_full_keeps_shards_and_resumes(folder_dataset, tmp_path, monkeypatch, same_cache, fmt):
    from sanf_pipeline.cache.stores import open_store

    suffix = ".h5" if fmt == "hdf5" else ""
    cache, clean = tmp_path / f"cache{suffix}", tmp_path / f"clean{suffix}"
    assert sanf(*extract_args(folder_dataset, clean)).exit_code == 0

    with monkeypatch.context() as m:
        _fail_shards_after(m, 2)
        line = assert_user_error(sanf(*extract_args(folder_dataset, cache)))
    _space_message(line)
    store = open_store(cache, fmt)
    done = sum(len(store.done_markers(split)) for split in ("train", "test"))
    assert done == 2, "the shards written before the disk filled up must be kept"

    res = sanf(*extract_args(folder_dataset, cache))  # space again: the same command resumes
    assert res.exit_code == 0, (res.output, res.exception)
    same_cache(cache, clean)
