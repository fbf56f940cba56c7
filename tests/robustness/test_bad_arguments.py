"""Bad arguments and mismatches: one line `error: ...`, exit code 2, no traceback, nothing written or changed.
Unknown classes (the valid ones listed), a folder that is not a cache, an incomplete cache, NaN features, an
unwritable --out, options that exclude each other; a cache built with other settings, a foreign folder as --cache; a
run evaluated on another cache; weights of another shape."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
import zarr
from conftest import (
    FAST_FIT,
    FORMATS,
    TINY_TIMM_KWARGS,
    TINY_VIT,
    assert_user_error,
    cache_path,
    extract_args,
    hand_spec,
    save_weights,
    tiny_timm,
    write_hand_cache,
    write_hand_shards,
)
from robust_helpers import TINY_FIT, sanf, tiny_run_fixture  # noqa: F401 (fixtures)

from sanf_pipeline.cache import CacheWriter, open_cache
from sanf_pipeline.cache.inspect import cache_info, verify_cache
from sanf_pipeline.cache.synthetic import write_synthetic_cache
from sanf_pipeline.errors import SanfError
from sanf_pipeline.extract.backbones import create_backbone
from sanf_pipeline.jobs.api import eval_run, fit_run
from sanf_pipeline.train.config import FitConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# ----------------------------------------------------------------------------- sanf fit / eval / baseline
def test_unknown_class_lists_valid_ones(pets_cache, tmp_path):
    r = sanf("fit", "--cache", pets_cache, "--normal-class", "zebra", "--out", tmp_path / "r", *FAST_FIT)
    assert_user_error(r, "unknown class 'zebra'", "0=cat, 1=dog, 2=frog")
    r = sanf("baseline", "--cache", pets_cache, "--normal-class", "7", "--out", tmp_path / "b")
    assert_user_error(r, "unknown class '7'", "0=cat")


def test_not_a_cache_and_incomplete_cache(pets_cache, tmp_path):
    (tmp_path / "junk").mkdir()
    r = sanf("fit", "--cache", tmp_path / "junk", "--normal-class", "0", "--out", tmp_path / "r", *FAST_FIT)
    assert_user_error(r, "is not a sanf feature cache")
    r = sanf("baseline", "--cache", tmp_path / "missing", "--normal-class", "0")
    assert_user_error(r, "does not exist")
    part = write_synthetic_cache(tmp_path / "part", n_classes=2, n_train=4, n_test=4, dim=8, num_tokens=2)
    meta = json.loads((part / "sanf.json").read_text())
    meta["sealed"] = False
    (part / "sanf.json").write_text(json.dumps(meta))
    r = sanf("fit", "--cache", part, "--normal-class", "0", "--out", tmp_path / "r", *FAST_FIT)
    assert_user_error(r, "incomplete cache")


def rehash(path) -> None:
    """Record the checksums of a Zarr cache's current rows (sanf.json), as a writer would have."""
    from sanf_pipeline.cache.writer import array_digests, shard_digest

    meta = json.loads((path / "sanf.json").read_text())
    root, size = zarr.open_group(str(path), mode="r"), meta["shard_size"]
    for split in meta["splits"]:
        n = meta["splits"][split]["n"]
        rows = [{k: root[split][k][a : a + size] for k in ("cls", "patch", "valid")} for a in range(0, n, size)]
        meta["shard_sha256"][split] = [shard_digest(r) for r in rows]
        meta["shard_sha256_arrays"][split] = [array_digests(r) for r in rows]
    (path / "sanf.json").write_text(json.dumps(meta))


def test_nan_features_in_cache_refused(tmp_path):
    import zarr

    bad = write_synthetic_cache(tmp_path / "nan", n_classes=2, n_train=8, n_test=4, dim=8, num_tokens=2)
    root = zarr.open_group(str(bad), mode="r+")
    cls = root["train"]["cls"][...]
    cls[1, 3] = np.nan
    root["train"]["cls"][...] = cls
    rehash(bad)  # as if the backbone had produced the NaN: the checksums match, the NaN guard must catch it
    r = sanf("fit", "--cache", bad, "--normal-class", "0", "--out", tmp_path / "r", *FAST_FIT)
    assert_user_error(r, "NaN/Inf", "sanf cache verify")
    r = sanf("baseline", "--cache", bad, "--normal-class", "0", "--out", tmp_path / "b")
    assert_user_error(r, "NaN/Inf")


def test_unwritable_out_and_bad_options(pets_cache, tmp_path):
    (tmp_path / "file").write_text("x")
    r = sanf("fit", "--cache", pets_cache, "--normal-class", "0", "--out", tmp_path / "file" / "run", "--epochs", "1",
            *FAST_FIT)
    assert_user_error(r, "cannot write to")
    r = sanf("fit", "--cache", pets_cache, "--normal-class", "0", "--epochs", "2", "--early-stopping", *FAST_FIT)
    assert_user_error(r, "exclude each other")
    r = sanf("fit", "--cache", pets_cache, "--normal-class", "0", "--clamp", "-1", "--out", tmp_path / "r", *FAST_FIT)
    assert_user_error(r, "invalid clamp=-1.0")
    assert not (tmp_path / "r").exists()
    r = sanf("eval", "--run", tmp_path / "nowhere")
    assert_user_error(r, "does not exist")


def test_eval_with_mismatched_cache_refused(pets_cache, tmp_path):
    out = tmp_path / "r"
    r = sanf("fit", "--cache", pets_cache, "--normal-class", "2", "--out", out, "--epochs", "1", *FAST_FIT)
    assert r.exit_code == 0, r.output
    other = write_synthetic_cache(tmp_path / "other", n_classes=3, n_train=4, n_test=4, dim=8, num_tokens=4,
                                  class_names=["cat", "dog", "frog"])
    r = sanf("eval", "--run", out, "--cache", other)
    assert_user_error(r, "not compatible", "token width differs (run 16, cache 8)")


# ---------------------------------------------------------------------------------------- the cache itself
def test_writer_refuses_other_settings_and_overwrites(tmp_path):
    path = tmp_path / "c"
    write_hand_cache(path, "zarr")
    with pytest.raises(SanfError, match=r"different settings \(hand \(1 -> 2\)\)"):
        CacheWriter(path, hand_spec(settings={"hand": 2}), fmt="zarr").open()
    assert open_cache(path).meta["settings"] == {"hand": 1}  # untouched
    w = CacheWriter(path, hand_spec(settings={"hand": 2}), fmt="zarr", overwrite=True)
    jobs = w.open()
    assert len(jobs) == len(w.all_jobs())  # a fresh cache: everything pending
    w.close()
    assert open_cache(path, allow_unsealed=True).meta["settings"] == {"hand": 2}


def test_writer_refuses_a_foreign_folder(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(SanfError, match="not a sanf cache"):
        CacheWriter(tmp_path / "c", hand_spec(), fmt="zarr").open()
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


def _incomplete(path, fmt):
    writer = CacheWriter(path, hand_spec(), fmt=fmt)
    jobs = writer.open()
    write_hand_shards(writer, jobs[:2])
    writer.close()
    return len(jobs)


@pytest.mark.parametrize("fmt", FORMATS)
def test_incomplete_cache_is_reported(tmp_path, fmt):
    path = cache_path(tmp_path, fmt)
    total = _incomplete(path, fmt)
    r = sanf("cache", "info", path)
    assert r.exit_code == 0 and "INCOMPLETE" in r.stdout, r.output
    info = cache_info(path)
    assert not info["sealed"]
    assert sum(s["shards_done"] for s in info["splits"].values()) == 2
    assert sum(s["shards"] for s in info["splits"].values()) == total
    r = sanf("cache", "verify", path)
    assert r.exit_code == 2 and "incomplete cache" in r.stderr and "Traceback" not in r.output
    with pytest.raises(SanfError, match="incomplete cache"):
        open_cache(path)
    # the same writer settings resume it: only the missing shards are pending
    writer = CacheWriter(path, hand_spec(), fmt=fmt)
    pending = writer.open()
    assert len(pending) == total - 2
    write_hand_shards(writer, pending)
    writer.seal()
    writer.close()
    assert verify_cache(path).ok


@pytest.mark.parametrize("fmt", FORMATS)
def test_verify_detects_nan(tmp_path, fmt):
    path = cache_path(tmp_path, fmt)
    write_hand_cache(path, fmt)
    if fmt == "zarr":
        zarr.open_group(str(path), mode="r+")["train/cls"][6, 1] = np.nan
    else:
        with h5py.File(path, "r+") as f:
            f["train/cls"][6, 1] = np.inf
    r = sanf("cache", "verify", path)
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
        r = sanf("cache", cmd, path)
        assert r.exit_code == 2, r.output
        assert "Traceback" not in r.output and r.stderr.count("\n") <= 2


# --------------------------------------------------------------------------------------- run vs cache
def test_run_cache_mismatch_refused(tiny_run, tmp_path):
    other_dim = write_synthetic_cache(tmp_path / "d8", n_classes=3, n_train=10, n_test=5, dim=8, num_tokens=4)
    with pytest.raises(SanfError, match="not compatible.*token width differs"):
        eval_run(tiny_run, cache=other_dim)
    other_tokens = write_synthetic_cache(tmp_path / "t2", n_classes=3, n_train=10, n_test=5, dim=16, num_tokens=9)
    with pytest.raises(SanfError, match="not compatible.*token count differs"):
        eval_run(tiny_run, cache=other_tokens)
    # other images in the same feature space (issue 11): scored, not refused for their fingerprint
    other_data = write_synthetic_cache(tmp_path / "s2", n_classes=3, n_train=40, n_test=20, dim=16, num_tokens=4,
                                       separation=1.0, seed=2, class_names=["cat", "dog", "frog"])
    assert eval_run(tiny_run, cache=other_data, out_dir=tmp_path / "e").metrics["n_test"] == 60


def test_missing_and_incomplete_runs_refused(tmp_path, pets_cache):
    with pytest.raises(SanfError, match="does not exist"):
        eval_run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SanfError, match="not a sanf run"):
        eval_run(tmp_path / "empty")

    def stop(epoch, row, model):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        fit_run(pets_cache, 1, FitConfig(**TINY_FIT), tmp_path / "half", quiet=True, callback=stop)
    with pytest.raises(SanfError, match="incomplete.*rerun the same `sanf fit`"):
        eval_run(tmp_path / "half")


# ------------------------------------------------------------------------------------------------ weights
def test_mismatched_weights_file(tmp_path, no_hub):
    f = save_weights(tiny_timm(embed_dim=48), tmp_path / "wide.safetensors")
    with pytest.raises(SanfError) as e:
        create_backbone(TINY_VIT, weights=f, image_size=56, model_kwargs=TINY_TIMM_KWARGS)
    assert str(f) in str(e.value) and "shape mismatch" in str(e.value) and "cls_token" in str(e.value)

    sd = tiny_timm().state_dict()
    del sd["blocks.2.mlp.fc2.bias"]
    sd["extra.weight"] = torch.zeros(2)
    f2 = tmp_path / "broken.pth"
    torch.save(sd, f2)
    with pytest.raises(SanfError) as e:
        create_backbone(TINY_VIT, weights=f2, image_size=56, model_kwargs=TINY_TIMM_KWARGS)
    assert "missing keys blocks.2.mlp.fc2.bias" in str(e.value) and "unexpected keys extra.weight" in str(e.value)


# ------------------------------------------------------------------------------------------ sanf extract
@pytest.mark.parametrize("fmt", FORMATS)
def test_changed_settings_are_refused_and_overwrite_replaces(extract_reference, folder_dataset, fmt, tmp_path):
    copy = cache_path(tmp_path, fmt)
    (shutil.copytree if fmt == "zarr" else shutil.copy)(extract_reference[fmt], copy)
    for extra, named in ((["--image-size", "70"], "backbone.image_size"), (["--dtype", "float32"], "dtype"),
                         (["--pool", "2"], "backbone.pool")):
        line = assert_user_error(sanf(*extract_args(folder_dataset, copy, *extra)))
        assert "different settings" in line and named in line and "--overwrite" in line, line
    assert open_cache(copy).meta["settings"]["backbone"]["pool"] == 1  # untouched
    r = sanf(*extract_args(folder_dataset, copy, "--pool", "2", "--overwrite"))
    assert r.exit_code == 0 and "complete" in r.stdout, r.output
    with open_cache(copy) as c:
        assert c.meta["settings"]["backbone"]["pool"] == 2 and c.num_tokens == 4
    assert not Path(f"{copy}.parts").exists()


# -------------------------------------------------------------------------------------------- sanf sweep
def test_cli_group_one_line_errors(pets_cache, tmp_path):
    for args, fragment in ((["sweep", "--cache", pets_cache, "--out", tmp_path / "x", "--classes", "zebra"],
                            "unknown class 'zebra'"),
                           (["report", tmp_path / "nothing"], "not a sanf sweep")):
        assert_user_error(sanf(*args), fragment)
    assert not (tmp_path / "x").exists()
