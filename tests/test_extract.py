"""Stage one end to end on tiny random ViTs: `sanf extract` into Zarr and HDF5, resume after SIGKILL, settings
mismatches, several processes into one cache, locks, bad images, pooling/layers, and one real-weights check."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import DINOV2_WEIGHTS, TINY_IMAGE_SIZE, TINY_VIT, TINY_VIT_KWARGS

from sanf_pipeline.cache import open_cache
from sanf_pipeline.cache.inspect import verify_cache
from sanf_pipeline.cache.lock import lock_dir
from sanf_pipeline.cli import cli
from sanf_pipeline.errors import SanfError
from sanf_pipeline.extract import ExtractConfig, extract

REPO = Path(__file__).resolve().parents[1]
FORMATS = ["zarr", "hdf5"]
SUFFIX = {"zarr": "", "hdf5": ".h5"}

# folder_dataset: 3 classes x 10 train / 5 test images; 4 per batch, 8 per shard: 4 train and 2 test shards
TINY_ARGS = ["--backbone", TINY_VIT, "--weights", "random", "--model-kwargs", json.dumps(TINY_VIT_KWARGS),
             "--image-size", str(TINY_IMAGE_SIZE), "--dataset", "folder", "--batch-size", "4", "--shard-size", "8",
             "--num-workers", "0", "--quiet"]


def extract_args(data, cache, *extra) -> list[str]:
    return ["extract", *TINY_ARGS, "--data-root", str(data), "--cache", str(cache), *map(str, extra)]


def sanf(*args):
    """Run the CLI in this process; returns click's Result (stdout and stderr apart)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert "Traceback" not in result.output and lines and lines[-1].startswith("error: "), result.output
    return lines[-1]


def sub_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


def cache_path(folder: Path, fmt: str, name: str = "cache") -> Path:
    return Path(folder) / f"{name}{SUFFIX[fmt]}"


def work_dir(cache: Path, fmt: str) -> Path:
    """Where a cache's shard markers live while it is being written."""
    return cache if fmt == "zarr" else Path(f"{cache}.parts")


def markers(cache: Path, fmt: str, split: str | None = None) -> list[Path]:
    folder = work_dir(cache, fmt) / "_progress"
    return sorted(folder.glob(f"{split or '*'}/[0-9]*.json"))


@pytest.fixture(scope="session")
def reference(folder_dataset, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted single-process extractions of ``folder_dataset`` into both formats."""
    out = {}
    folder = tmp_path_factory.mktemp("reference")
    for fmt in FORMATS:
        out[fmt] = cache_path(folder, fmt)
        r = sanf(*extract_args(folder_dataset, out[fmt]))
        assert r.exit_code == 0, r.output
        assert "complete; 45 images extracted" in r.stdout
    return out


# ------------------------------------------------------------------------------------------------ basics
def test_zarr_and_hdf5_hold_identical_arrays(reference, folder_dataset, same_cache):
    same_cache(reference["zarr"], reference["hdf5"])
    with open_cache(reference["zarr"]) as c:
        assert c.class_names == ["a", "b", "c"] and c.dim == 32 and c.num_tokens == 16
        meta = c.meta
        assert meta["dtype"] == "float16" and meta["shard_size"] == 8
        assert meta["splits"]["train"] == {"n": 30, "shards": 4, "n_valid": 30}
        assert meta["backbone"]["arch"] == TINY_VIT and meta["backbone"]["weights"]["source"] == "random"
        assert meta["preprocessing"]["image_size"] == [56, 56] and meta["grid"] == [4, 4]
        assert {"torch", "timm", "zarr", "h5py", "numpy", "sanf"} <= set(meta["versions"])
        s = c.split("train")
        np.testing.assert_array_equal(s.class_offsets, [0, 10, 20, 30])
        assert "train/b/003 çà 猫.png" in s.sample_ids
        assert s.sample_ids[:2] == ["train/a/000.png", "train/a/001.png"]
        cls, patch = s.read_class(1)
        assert cls.shape == (10, 32) and patch.shape == (10, 16, 32) and np.isfinite(patch).all()
        assert not np.array_equal(patch[0], patch[1])
    for fmt in FORMATS:
        assert verify_cache(reference[fmt]).ok


@pytest.mark.parametrize("fmt", FORMATS)
def test_rerun_on_complete_cache_is_a_no_op(reference, folder_dataset, fmt, tmp_path, same_cache):
    copy = cache_path(tmp_path, fmt)
    (shutil.copytree if fmt == "zarr" else shutil.copy)(reference[fmt], copy)
    r = sanf(*extract_args(folder_dataset, copy))
    assert r.exit_code == 0, r.output
    assert "complete; 0 images extracted" in r.stdout
    same_cache(reference[fmt], copy)


# --------------------------------------------------------------------------------------- settings mismatch
@pytest.mark.parametrize("fmt", FORMATS)
def test_changed_settings_are_refused_and_overwrite_replaces(reference, folder_dataset, fmt, tmp_path):
    copy = cache_path(tmp_path, fmt)
    (shutil.copytree if fmt == "zarr" else shutil.copy)(reference[fmt], copy)
    for extra, named in ((["--image-size", "70"], "backbone.image_size"), (["--dtype", "float32"], "dtype"),
                         (["--pool", "2"], "backbone.pool")):
        line = one_line_error(sanf(*extract_args(folder_dataset, copy, *extra)))
        assert "different settings" in line and named in line and "--overwrite" in line, line
    assert open_cache(copy).meta["settings"]["backbone"]["pool"] == 1  # untouched
    r = sanf(*extract_args(folder_dataset, copy, "--pool", "2", "--overwrite"))
    assert r.exit_code == 0 and "complete" in r.stdout, r.output
    with open_cache(copy) as c:
        assert c.meta["settings"]["backbone"]["pool"] == 2 and c.num_tokens == 4
    assert not Path(f"{copy}.parts").exists()


# ------------------------------------------------------------------------------------- resume after SIGKILL
SLOW_SANF = """
import os, runpy, time
from sanf_pipeline.cache import stores
_mark_done = stores._Store.mark_done
def mark_done(self, *args, **kwargs):
    time.sleep(float(os.environ["SANF_TEST_MARKER_DELAY"]))  # widen the window between shard data and marker
    _mark_done(self, *args, **kwargs)
stores._Store.mark_done = mark_done
runpy.run_module("sanf_pipeline", run_name="__main__", alter_sys=True)
"""


def shard_data_file(cache: Path, fmt: str, split: str, shard: int) -> Path:
    if fmt == "zarr":
        return cache / split / "cls" / "c" / str(shard) / "0"
    return work_dir(cache, fmt) / split / "shards" / f"{shard:06d}.cls.npy"


def half_written(cache: Path, fmt: str) -> bool:
    """Some shard's data is on disk but its marker is not (yet)."""
    for split, n in (("train", 4), ("test", 2)):
        done = {int(p.stem) for p in markers(cache, fmt, split)}
        if any(shard_data_file(cache, fmt, split, k).exists() and k not in done for k in range(n)):
            return True
    return False


KILL_POINTS = {
    "while creating the cache": lambda c, f: work_dir(c, f).exists() or Path(c.parent, f".{c.name}.creating").exists(),
    "after the first shard marker, between the next shard's data and its marker":
        lambda c, f: len(markers(c, f)) >= 1 and half_written(c, f),
    "after the first test-split marker": lambda c, f: len(markers(c, f, "test")) >= 1,
}


def kill_when(runs: list[tuple[subprocess.Popen, callable, Path]], timeout: float = 120) -> None:
    """SIGKILL each process as soon as its condition holds; fail if one ends on its own first."""
    pending = list(runs)
    deadline = time.monotonic() + timeout
    while pending:
        assert time.monotonic() < deadline, "kill point not reached in time"
        for run in list(pending):
            proc, condition, log = run
            if condition():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                pending.remove(run)
            elif proc.poll() is not None:
                pytest.fail(f"extract ({log.name}) ended (rc {proc.returncode}) before its kill point:\n"
                            f"{log.read_text()}")
        time.sleep(0.002)


@pytest.mark.slow
def test_resume_after_sigkill_is_bitwise_identical(reference, folder_dataset, tmp_path, same_cache):
    caches = {fmt: cache_path(tmp_path, fmt) for fmt in FORMATS}
    env = dict(sub_env(), SANF_TEST_MARKER_DELAY="0.12")
    script = tmp_path / "slow_sanf.py"
    script.write_text(SLOW_SANF)
    for i, (point, condition) in enumerate(KILL_POINTS.items()):
        runs = []
        for fmt, cache in caches.items():
            log = tmp_path / f"{fmt}-{i}.log"
            with open(log, "w") as fh:
                proc = subprocess.Popen([sys.executable, str(script), *extract_args(folder_dataset, cache)],
                                        cwd=tmp_path, env=env, stdout=fh, stderr=subprocess.STDOUT)
            runs.append((proc, lambda c=cache, f=fmt, cond=condition: cond(c, f), log))
        kill_when(runs)
        # a killed run never leaves a cache that looks complete
        assert not caches["hdf5"].exists(), point
        zarr_meta = caches["zarr"] / "sanf.json"
        assert not zarr_meta.exists() or not json.loads(zarr_meta.read_text())["sealed"], point
    done_before = {fmt: len(markers(cache, fmt)) for fmt, cache in caches.items()}
    assert all(0 < n < 6 for n in done_before.values()), done_before
    for fmt, cache in caches.items():
        r = sanf(*extract_args(folder_dataset, cache))  # the same command, to completion
        assert r.exit_code == 0 and ": complete;" in r.stdout, r.output
        same_cache(reference[fmt], cache)
        assert verify_cache(cache).ok
        assert not list(lock_dir(cache).glob("*.json"))  # the killed runs' stale owner locks were removed
    assert not Path(f"{caches['hdf5']}.parts").exists()


class _Crash(RuntimeError):
    pass


@pytest.mark.parametrize("fmt", FORMATS)
def test_half_written_shard_is_never_counted_complete(reference, folder_dataset, fmt, tmp_path, monkeypatch,
                                                       same_cache):
    from sanf_pipeline.cache.writer import CacheWriter

    cache = cache_path(tmp_path, fmt)
    write_shard = CacheWriter.write_shard

    def crash_after_two(self, job, *args):
        if len(markers(cache, fmt)) >= 2:
            raise _Crash("injected crash")
        write_shard(self, job, *args)

    monkeypatch.setattr(CacheWriter, "write_shard", crash_after_two)
    with pytest.raises(_Crash):
        extract(_config(folder_dataset, cache))
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
    result = extract(_config(folder_dataset, cache))
    assert result.sealed and result.shards_written == 4
    assert verify_cache(cache).ok
    same_cache(reference[fmt], cache)


def _config(data, cache, **kw) -> ExtractConfig:
    base = dict(backbone=TINY_VIT, dataset="folder", data_root=str(data), cache=str(cache), weights="random",
                model_kwargs=dict(TINY_VIT_KWARGS), image_size=TINY_IMAGE_SIZE, batch_size=4, shard_size=8,
                num_workers=0, quiet=True)
    base.update(kw)
    return ExtractConfig(**base)


# ------------------------------------------------------------------------------------ several processes
@pytest.mark.slow
def test_job_array_processes_into_one_cache(reference, folder_dataset, tmp_path, same_cache):
    """``--num-shards 2``: index 1 in a subprocess, index 0 here while it runs; the cache equals the reference."""
    cache = cache_path(tmp_path, "zarr")
    other = subprocess.Popen([sys.executable, "-m", "sanf_pipeline",
                              *extract_args(folder_dataset, cache, "--num-shards", 2, "--shard-index", 1)],
                             cwd=tmp_path, env=sub_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list(lock_dir(cache).glob("*.json")) and other.poll() is None:  # it has claimed its shards
        assert time.monotonic() < deadline
        time.sleep(0.01)
    mine = sanf(*extract_args(folder_dataset, cache, "--num-shards", 2, "--shard-index", 0))
    out, err = other.communicate(timeout=120)
    assert other.returncode == 0, err
    assert mine.exit_code == 0, mine.output
    assert ": complete;" in out + mine.stdout
    with open_cache(cache) as c:
        assert c.meta["sealed"]
    assert verify_cache(cache).ok
    same_cache(reference["zarr"], cache)


def test_job_array_hdf5_sequential(reference, folder_dataset, tmp_path, same_cache):
    cache = cache_path(tmp_path, "hdf5")
    r0 = sanf(*extract_args(folder_dataset, cache, "--num-shards", 2, "--shard-index", 0))
    assert r0.exit_code == 0 and "partial" in r0.stdout, r0.output
    r1 = sanf(*extract_args(folder_dataset, cache, "--num-shards", 2, "--shard-index", 1))
    assert r1.exit_code == 0 and ": complete;" in r1.stdout, r1.output
    same_cache(reference["hdf5"], cache)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_equal_single_process(reference, folder_dataset, tmp_path, same_cache):
    cache = cache_path(tmp_path, "zarr")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "sanf_pipeline", *extract_args(folder_dataset, cache)]
    p = subprocess.run(cmd, cwd=tmp_path, env=sub_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    with open_cache(cache) as c:
        assert c.meta["sealed"]
    assert verify_cache(cache).ok
    same_cache(reference["zarr"], cache)


# ------------------------------------------------------------------------------------------------ locks
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
        line = one_line_error(sanf(*extract_args(data, cache)))
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


# ------------------------------------------------------------------------------------------- bad images
def _add_bad_images(folder: Path) -> list[str]:
    from PIL import Image

    good = folder / "ok.jpg"
    Image.fromarray(np.full((32, 32, 3), 100, np.uint8)).save(good, quality=90)
    data = good.read_bytes()
    good.unlink()
    (folder / "zz_truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "zz_empty.png").write_bytes(b"")
    (folder / "zz_text.jpg").write_text("this is not an image\n")
    return ["zz_empty.png", "zz_text.jpg", "zz_truncated.jpg"]


def test_bad_images_are_skipped_and_recorded(make_folder_dataset, tmp_path):
    data = make_folder_dataset(n_train=4, n_test=2)
    bad = [f"train/a/{name}" for name in _add_bad_images(data / "train" / "a")]
    cache = tmp_path / "cache"
    r = sanf(*extract_args(data, cache, "--on-error", "skip"))
    assert r.exit_code == 0 and "complete" in r.stdout, r.output
    assert "skipped 3 unreadable image(s)" in r.stderr and "train/a/zz_empty.png" in r.stderr
    with open_cache(cache) as c:
        skipped = c.meta["skipped"]
        assert sorted(s["sample_id"] for s in skipped) == bad
        assert all(s["reason"] and s["split"] == "train" and s["label"] == 0 for s in skipped)
        s = c.split("train")
        assert s.n == 15 and s.n_valid == 12 and c.meta["splits"]["train"]["n_valid"] == 12
        assert not set(bad) & set(s.sample_ids) and set(bad) <= set(s.sample_ids_all)
        cls, patch = s.read_class(0)
        assert cls.shape == (4, 32) and patch.shape == (4, 16, 32)
        assert len(s.read_all()[0]) == 12
    assert verify_cache(cache).ok
    info = sanf("cache", "info", cache)
    assert "skipped    3 files" in info.stdout

    line = one_line_error(sanf(*extract_args(data, tmp_path / "strict", "--on-error", "fail")))
    assert "train/a/zz_empty.png" in line, line


def test_class_without_a_usable_image_is_refused(make_folder_dataset, tmp_path):
    data = make_folder_dataset(n_train=2, n_test=1)
    for f in (data / "test" / "c").iterdir():
        f.unlink()
    _add_bad_images(data / "test" / "c")
    line = one_line_error(sanf(*extract_args(data, tmp_path / "cache")))
    assert "no usable image in class c of split test" in line, line


# ------------------------------------------------------------------------------------------ pool, layer
def test_pool_and_layer_are_recorded_and_applied(make_folder_dataset, tmp_path, tiny_vit_kwargs):
    from sanf_pipeline.backbones import create_backbone
    from sanf_pipeline.data.images import decode_image

    data = make_folder_dataset(n_train=2, n_test=1)
    runs = {"base": {}, "pool": {"pool": 2}, "layer": {"layer": 0}}
    # DINOv2's LayerScale starts at 1e-5, which makes a random ViT's blocks near-identities: start it at 1
    kwargs = dict(tiny_vit_kwargs, init_values=1.0)
    caches = {}
    for name, kw in runs.items():
        cfg = _config(data, tmp_path / name, dtype="float32", model_kwargs=kwargs, **kw)
        caches[name] = open_cache(extract(cfg).path)
    base, pool, layer = caches["base"], caches["pool"], caches["layer"]
    assert base.num_tokens == 16 and pool.num_tokens == 4 and layer.num_tokens == 16
    assert pool.meta["backbone"]["pool"] == 2 and pool.meta["settings"]["backbone"]["pool"] == 2
    assert pool.meta["grid"] == [2, 2] and base.meta["grid"] == [4, 4]
    assert layer.meta["backbone"]["layer"] == 0 and layer.meta["settings"]["backbone"]["layer"] == 0
    assert base.meta["backbone"]["layer"] is None
    b_cls, b_patch, _, ids = base.split("train").read_all()
    p_cls, p_patch, _, _ = pool.split("train").read_all()
    l_cls, l_patch, _, _ = layer.split("train").read_all()
    n, d = b_cls.shape
    expected = b_patch.reshape(n, 2, 2, 2, 2, d).mean(axis=(2, 4)).reshape(n, 4, d)
    np.testing.assert_allclose(p_patch, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(p_cls, b_cls, rtol=1e-6, atol=1e-6)
    assert not np.allclose(l_cls, b_cls, atol=1e-2) and not np.allclose(l_patch, b_patch, atol=1e-2)
    bb = create_backbone(TINY_VIT, weights="random", image_size=TINY_IMAGE_SIZE, layer=0, model_kwargs=kwargs)
    x = torch.stack([bb.preprocess(decode_image(data / i)) for i in ids])
    with torch.inference_mode():
        cls, patch = bb(x)
    np.testing.assert_allclose(l_cls, cls.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(l_patch, patch.numpy(), rtol=1e-4, atol=1e-4)
    for c in caches.values():
        c.close()


# -------------------------------------------------------------------------------------- real weights
@pytest.mark.slow
def test_real_dinov2_weights_match_a_direct_forward(cifar_slice, tmp_path, monkeypatch):
    from sanf_pipeline import backbones
    from sanf_pipeline.data.images import decode_image

    if not DINOV2_WEIGHTS.is_file():
        pytest.skip(f"DINOv2 weights not found at {DINOV2_WEIGHTS}")
    create_backbone, created = backbones.create_backbone, []

    def spy(*args, **kwargs):  # keep the backbone extract builds (~4 s on CPU) for the direct forward below
        created.append((args, kwargs, create_backbone(*args, **kwargs)))
        return created[-1][2]

    monkeypatch.setattr(backbones, "create_backbone", spy)
    cfg = ExtractConfig(backbone=TINY_VIT, dataset="folder", data_root=str(cifar_slice), cache=str(tmp_path / "c"),
                        weights=str(DINOV2_WEIGHTS), image_size=112, batch_size=4, num_workers=0, quiet=True)
    result = extract(cfg)
    assert result.sealed and result.images == 12
    [(args, kwargs, bb)] = created
    assert args == (TINY_VIT,) and kwargs["weights"] == str(DINOV2_WEIGHTS) and kwargs["image_size"] == 112
    sha = hashlib.sha256(DINOV2_WEIGHTS.read_bytes()).hexdigest()
    with open_cache(result.path) as c:
        assert c.meta["backbone"]["weights"]["sha256"] == sha
        assert c.meta["settings"]["backbone"]["weights"] == sha
        assert c.dim == 384 and c.num_tokens == 64 and c.class_names == ["airplane", "automobile"]
        for split in ("train", "test"):
            cls, patch, labels, ids = c.split(split).read_all()
            assert list(labels) == [0, 0, 0, 1, 1, 1]
            rows = [0, 4]  # one image of each class (a direct forward costs seconds on a shared CPU)
            x = torch.stack([bb.preprocess(decode_image(cifar_slice / ids[i])) for i in rows])
            with torch.inference_mode():
                ref_cls, ref_patch = bb(x)
            np.testing.assert_allclose(cls[rows], ref_cls.numpy(), rtol=2e-3, atol=2e-3 * float(ref_cls.abs().max()))
            np.testing.assert_allclose(patch[rows], ref_patch.numpy(), rtol=2e-3,
                                       atol=2e-3 * float(ref_patch.abs().max()))
            assert not np.allclose(cls[0], cls[3], atol=1e-2)
