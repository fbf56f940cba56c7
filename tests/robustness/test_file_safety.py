"""Every delete and replace in sanf touches only sanf's own files (docs/file-safety.md lists each site and its guard;
the test names below follow that list). A user's folder, file or dataset next to or at the place sanf writes to is
refused with one line and left byte for byte as it was, whatever the flags; sanf's own files are replaced or removed
as before."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from conftest import (
    FAST_FIT,
    FORMATS,
    assert_user_error,
    cache_path,
    extract_args,
    hand_spec,
    write_hand_cache,
)
from robust_helpers import sanf, tiny_run_fixture  # noqa: F401 (fixtures)

from sanf_pipeline.cache import CacheWriter, open_cache
from sanf_pipeline.cache.lock import OwnerLock, creation_lock, lock_dir
from sanf_pipeline.cache.stores import H5Store, ZarrStore
from sanf_pipeline.errors import SanfError

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def user_folder(path: Path) -> dict[str, bytes]:
    path.mkdir(parents=True, exist_ok=True)
    (path / "notes.txt").write_text("my notes")
    (path / "sub").mkdir(exist_ok=True)
    (path / "sub" / "data.bin").write_bytes(b"\x00\x01")
    return snapshot(path)


# ------------------------------------------------------------------ 1. CacheWriter: --overwrite of --cache
@pytest.mark.parametrize("fmt", FORMATS)
def test_overwrite_never_deletes_a_foreign_cache_path(folder_dataset, fmt, tmp_path):
    target = cache_path(tmp_path, fmt, "mine")
    if fmt == "zarr":
        before = user_folder(target)
    else:
        target.write_bytes(b"not an hdf5 file, my own data")
        before = {"f": target.read_bytes()}
    line = assert_user_error(sanf(*extract_args(folder_dataset, target, "--overwrite")),
                             "is not a sanf cache", "new or empty")
    assert "pass --overwrite" not in line  # the old message recommended the flag that destroyed the folder
    after = snapshot(target) if fmt == "zarr" else {"f": target.read_bytes()}
    assert after == before


def test_overwrite_refuses_sanf_json_of_another_format(tmp_path):
    path = tmp_path / "c"
    path.mkdir()
    (path / "sanf.json").write_text('{"format": "something-else"}')
    with pytest.raises(SanfError, match="not a sanf cache"):
        CacheWriter(path, hand_spec(), fmt="zarr", overwrite=True).open()
    assert (path / "sanf.json").read_text() == '{"format": "something-else"}'


@pytest.mark.parametrize("fmt", FORMATS)
def test_overwrite_replaces_a_sanf_cache_and_an_empty_folder_is_used(tmp_path, fmt):
    path = cache_path(tmp_path, fmt)
    write_hand_cache(path, fmt)
    w = CacheWriter(path, hand_spec(settings={"hand": 2}), fmt=fmt, overwrite=True)
    w.open()
    w.close()
    assert open_cache(path, allow_unsealed=True).meta["settings"] == {"hand": 2}
    empty = tmp_path / "empty"
    empty.mkdir()
    w = CacheWriter(empty, hand_spec(), fmt="zarr")
    w.open()
    w.close()
    assert (empty / "sanf.json").is_file()


# ------------------------------------------------------------------ 2. check_cache_location: cache vs data root
@pytest.mark.parametrize("where", ["equal", "inside", "containing"])
def test_cache_and_data_root_must_not_overlap(make_folder_dataset, tmp_path, where):
    data = make_folder_dataset("ds")
    cache = {"equal": data, "inside": data / "cache", "containing": data.parent}[where]
    before = snapshot(data)
    line = assert_user_error(sanf(*extract_args(data, cache, "--overwrite")), "--data-root")
    assert {"equal": "is the data root", "inside": "inside the data root", "containing": "contains"}[where] in line
    assert snapshot(data) == before
    assert not (data / "cache").exists()


# ------------------------------------------------------------------ 3. H5Store.create: the <file>.parts folder
def test_h5_parts_folder_of_the_user_is_refused(tmp_path):
    path = tmp_path / "c.h5"
    parts = Path(f"{path}.parts")
    before = user_folder(parts)
    with pytest.raises(SanfError, match="not a sanf cache"):
        CacheWriter(path, hand_spec(), fmt="hdf5", overwrite=True).open()
    assert snapshot(parts) == before
    with pytest.raises(SanfError, match="not sanf's"):
        H5Store(path).create({}, {}, {})
    assert snapshot(parts) == before


# ------------------------------------------------------------------ 4. ZarrStore.create: .<name>.creating, rmdir
def test_zarr_create_replaces_only_its_own_staging_folder(tmp_path):
    path = tmp_path / "c"
    staging = tmp_path / ".c.creating"
    staging.mkdir()
    (staging / "half").write_text("left by a killed create")
    neighbour = user_folder(tmp_path / "c.creating")  # a similar name that is not sanf's staging folder
    write_hand_cache(path, "zarr")
    assert not staging.exists() and open_cache(path).meta["sealed"]
    assert snapshot(tmp_path / "c.creating") == neighbour
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "x").write_text("x")
    with pytest.raises(OSError):  # the store never replaces a non-empty folder, even when called directly
        ZarrStore(tmp_path / "d").create({}, {}, {})
    assert (tmp_path / "d" / "x").read_text() == "x"


# ------------------------------------------------------------------ 5. clean_up: temporaries beside and inside
@pytest.mark.parametrize("fmt", FORMATS)
def test_clean_up_removes_only_sanf_temporaries(tmp_path, fmt):
    path = cache_path(tmp_path, fmt)
    ours = tmp_path / f".{path.name}.12345.tmp"
    theirs = [tmp_path / f".{path.name}.notes.tmp", tmp_path / f"{path.name}.12345.tmp", tmp_path / ".other.1.tmp"]
    for p in (ours, *theirs):
        p.write_text("x")
    write_hand_cache(path, fmt)
    assert not ours.exists()
    assert all(p.read_text() == "x" for p in theirs)


# ------------------------------------------------------------------ 6. lock folder: owner files, rmdir
def test_lock_folder_cleanup_keeps_foreign_files(tmp_path):
    path = tmp_path / "c"
    with creation_lock(path):
        lock = OwnerLock(path, 1, 0)
        lock.acquire()
    (lock_dir(path) / "mine.txt").write_text("x")
    lock.release()
    assert (lock_dir(path) / "mine.txt").read_text() == "x"  # folder not removed while it holds another file


# ------------------------------------------------------------------ 7. runs: fit --overwrite into a user's folder
def test_fit_overwrite_never_replaces_a_users_files(pets_cache, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.json").write_text('{"my": "settings"}')
    (out / "model.safetensors").write_bytes(b"my model")
    (out / ".notes.tmp").write_text("x")
    before = snapshot(out)
    line = assert_user_error(sanf("fit", "--cache", pets_cache, "--normal-class", "cat", "--out", out, "--epochs",
                                  "1", *FAST_FIT, "--overwrite"), "not a sanf folder", "config.json")
    assert "model.safetensors" in line
    assert snapshot(out) == before


def test_fit_overwrite_beside_unrelated_files_keeps_them(pets_cache, tmp_path):
    out = tmp_path / "out"
    before = user_folder(out)
    (out / ".notes.tmp").write_text("x")  # prepare_out_dir's stale-temporary sweep must leave it
    r = sanf("fit", "--cache", pets_cache, "--normal-class", "cat", "--out", out, "--epochs", "1", *FAST_FIT,
             "--overwrite")
    assert r.exit_code == 0, r.output
    assert {k: v for k, v in snapshot(out).items() if k in before} == before
    assert (out / ".notes.tmp").read_text() == "x"


def test_remove_run_files_needs_sanf_metadata(tmp_path):
    from sanf_pipeline.store.run_folder import remove_run_files

    before = user_folder(tmp_path / "u")
    (tmp_path / "u" / "config.json").write_text("{}")
    (tmp_path / "u" / "report.md").write_text("mine")
    before = snapshot(tmp_path / "u")
    remove_run_files(tmp_path / "u")
    assert snapshot(tmp_path / "u") == before


# ------------------------------------------------------------------ 8. baseline and eval --out
def test_baseline_never_replaces_a_users_files(pets_cache, tmp_path):
    out = tmp_path / "b"
    out.mkdir()
    (out / "report.md").write_text("my report")
    r = sanf("baseline", "--cache", pets_cache, "--normal-class", "cat", "--method", "gaussian", "--out", out,
             "--overwrite")
    assert_user_error(r, "not a sanf folder", "report.md")
    assert (out / "report.md").read_text() == "my report" and len(list(out.iterdir())) == 1


def test_eval_out_never_replaces_a_users_files(tiny_run, pets_cache, tmp_path):
    out = tmp_path / "e"
    out.mkdir()
    (out / "scores.csv").write_text("my scores")
    r = sanf("eval", "--run", tiny_run, "--cache", pets_cache, "--out", out, "--device", "cpu", "--overwrite")
    assert_user_error(r, "not a sanf folder", "scores.csv")
    assert (out / "scores.csv").read_text() == "my scores"
    r = sanf("eval", "--run", tiny_run, "--cache", pets_cache, "--out", tmp_path / "e2", "--device", "cpu")
    assert r.exit_code == 0, r.output
    r = sanf("eval", "--run", tiny_run, "--cache", pets_cache, "--out", tmp_path / "e2", "--device", "cpu",
             "--score", "z2", "--overwrite")  # an eval --out folder is sanf's (its metrics.json): replaced
    assert r.exit_code == 0, r.output


# ------------------------------------------------------------------ 9. sweep --overwrite into a user's folder
def test_sweep_overwrite_never_touches_a_users_folder(pets_cache, tmp_path):
    out = tmp_path / "s"
    before = user_folder(out)
    (out / "runs").mkdir()
    (out / "runs" / "r1").mkdir()
    (out / "runs" / "r1" / "config.json").write_text('{"format": "sanf-run"}')  # even a sanf run of the user's
    (out / "summary.csv").write_text("mine")
    before = snapshot(out)
    r = sanf("sweep", "--cache", pets_cache, "--classes", "cat", "--methods", "gaussian", "--out", out,
             "--overwrite", "--quiet", "--no-plots", "--workers", "1")
    assert_user_error(r, "not a sanf sweep")
    assert snapshot(out) == before


# ------------------------------------------------------------------ 10. atomic writes: model files readable by all
def test_model_file_has_the_default_mode(tiny_run):
    want = 0o666 & ~_umask()
    for name in ("model.safetensors", "config.json", "train_log.jsonl"):
        assert stat.S_IMODE(os.stat(Path(tiny_run) / name).st_mode) == want, name


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
