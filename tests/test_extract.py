"""Stage one end to end on tiny random ViTs: `sanf extract` into Zarr and HDF5, several processes into one cache,
pooling/layers, and one real-weights check. Resume after SIGKILL, settings mismatches, locks and bad images:
tests/robustness/."""

from __future__ import annotations

import hashlib
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from conftest import (
    DINOV2_WEIGHTS,
    FORMATS,
    TINY_IMAGE_SIZE,
    TINY_VIT,
    cache_path,
    extract_args,
    extract_config,
    sub_env,
)

from sanf_pipeline.cache import open_cache
from sanf_pipeline.cache.inspect import verify_cache
from sanf_pipeline.cache.lock import lock_dir
from sanf_pipeline.cli.main import cli
from sanf_pipeline.extract.job import ExtractConfig, extract


def sanf(*args):
    """Run the CLI in this process; returns click's Result (stdout and stderr apart)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


# ------------------------------------------------------------------------------------------------ basics
def test_zarr_and_hdf5_hold_identical_arrays(extract_reference, folder_dataset, same_cache):
    same_cache(extract_reference["zarr"], extract_reference["hdf5"])
    with open_cache(extract_reference["zarr"]) as c:
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
        assert verify_cache(extract_reference[fmt]).ok


@pytest.mark.parametrize("fmt", FORMATS)
def test_rerun_on_complete_cache_is_a_no_op(extract_reference, folder_dataset, fmt, tmp_path, same_cache):
    copy = cache_path(tmp_path, fmt)
    (shutil.copytree if fmt == "zarr" else shutil.copy)(extract_reference[fmt], copy)
    r = sanf(*extract_args(folder_dataset, copy))
    assert r.exit_code == 0, r.output
    assert "complete; 0 images extracted" in r.stdout
    same_cache(extract_reference[fmt], copy)


# ------------------------------------------------------------------------------------ several processes
@pytest.mark.slow
def test_job_array_processes_into_one_cache(extract_reference, folder_dataset, tmp_path, same_cache):
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
    same_cache(extract_reference["zarr"], cache)


def test_job_array_hdf5_sequential(extract_reference, folder_dataset, tmp_path, same_cache):
    cache = cache_path(tmp_path, "hdf5")
    r0 = sanf(*extract_args(folder_dataset, cache, "--num-shards", 2, "--shard-index", 0))
    assert r0.exit_code == 0 and "partial" in r0.stdout, r0.output
    r1 = sanf(*extract_args(folder_dataset, cache, "--num-shards", 2, "--shard-index", 1))
    assert r1.exit_code == 0 and ": complete;" in r1.stdout, r1.output
    same_cache(extract_reference["hdf5"], cache)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_torchrun_two_cpu_ranks_equal_single_process(extract_reference, folder_dataset, tmp_path, same_cache):
    cache = cache_path(tmp_path, "zarr")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_free_port()), "-m", "sanf_pipeline", *extract_args(folder_dataset, cache)]
    p = subprocess.run(cmd, cwd=tmp_path, env=sub_env(), capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stdout + p.stderr
    with open_cache(cache) as c:
        assert c.meta["sealed"]
    assert verify_cache(cache).ok
    same_cache(extract_reference["zarr"], cache)


# ------------------------------------------------------------------------------------------ pool, layer
def test_pool_and_layer_are_recorded_and_applied(make_folder_dataset, tmp_path, tiny_vit_kwargs):
    from sanf_pipeline.data.images import decode_image
    from sanf_pipeline.extract.backbones import create_backbone

    data = make_folder_dataset(n_train=2, n_test=1)
    runs = {"base": {}, "pool": {"pool": 2}, "layer": {"layer": 0}}
    # DINOv2's LayerScale starts at 1e-5, which makes a random ViT's blocks near-identities: start it at 1
    kwargs = dict(tiny_vit_kwargs, init_values=1.0)
    caches = {}
    for name, kw in runs.items():
        cfg = extract_config(data, tmp_path / name, dtype="float32", model_kwargs=kwargs, **kw)
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
    from sanf_pipeline.data.images import decode_image
    from sanf_pipeline.extract import backbones

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


# ------------------------------------------------------------------------ device-side resize and normalisation
def _direct_forward(data, ids, **kw):
    """Tokens of a direct forward of the float preprocessing the CPU path has always used (PIL resize in numpy)."""
    from sanf_pipeline.data.images import decode_image
    from sanf_pipeline.extract.backbones import create_backbone

    bb = create_backbone(TINY_VIT, weights="random", image_size=TINY_IMAGE_SIZE, **kw)
    x = torch.stack([bb.preprocess(decode_image(data / i)) for i in ids])
    with torch.inference_mode():
        cls, patch = bb(x)
    return cls.numpy(), patch.numpy()


def test_cpu_path_writes_what_the_float_preprocessing_gives(make_folder_dataset, tmp_path, tiny_vit_kwargs):
    """uint8 batches normalised after the DataLoader: the same float32 tokens as before (bit for bit)."""
    data = make_folder_dataset(n_train=3, n_test=1, size=32)
    kwargs = dict(tiny_vit_kwargs, init_values=1.0)
    with open_cache(extract(extract_config(data, tmp_path / "c", dtype="float32", model_kwargs=kwargs)).path) as c:
        assert "resize_on" not in c.meta["settings"]
        cls, patch, _, ids = c.split("train").read_all()
    ref_cls, ref_patch = _direct_forward(data, ids, model_kwargs=kwargs)
    np.testing.assert_array_equal(cls, ref_cls)
    np.testing.assert_array_equal(patch, ref_patch)


@pytest.mark.parametrize("size", [32, 20, 80])
def test_device_resize_matches_pil_within_one_level(size):
    """32 px (and 20 px) images travel as uint8 at their own size and are upsampled by ``normalize``: within one
    uint8 level of PIL's bicubic; larger images are downscaled by PIL in the worker, as before (exact)."""
    from sanf_pipeline.extract.preprocess import Preprocess

    pre = Preprocess((56, 56), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3))
    rng = np.random.default_rng(size)
    smooth = np.kron(rng.integers(0, 256, (size // 4 + 1, size // 4 + 1, 3)), np.ones((4, 4, 1)))[:size, :size]
    for img in (rng.integers(0, 256, (size, size, 3)).astype(np.uint8), smooth.astype(np.uint8)):
        u = pre.to_uint8(img, keep_smaller=True)
        assert tuple(u.shape) == ((3, size, size) if size <= 56 else (3, 56, 56)) and u.dtype == torch.uint8
        levels = ((pre.normalize(u[None])[0] - pre(img)) * torch.tensor(pre.std).view(3, 1, 1) * 255).abs()
        assert levels.max().item() <= 1.0 + 1e-3
        if size > 56:
            assert levels.max().item() <= 1e-3
        assert (levels > 0.5).float().mean().item() < 0.01


def test_device_resize_extract_within_tolerance_and_recorded(make_folder_dataset, tmp_path, tiny_vit_kwargs):
    data = make_folder_dataset(n_train=3, n_test=1, size=32)
    kwargs = dict(tiny_vit_kwargs, init_values=1.0)
    cfg = extract_config(data, tmp_path / "dev", dtype="float32", model_kwargs=kwargs, resize_on="device",
                         precision="fp32")
    with open_cache(extract(cfg).path) as c:
        assert c.meta["settings"]["resize_on"] == "device"
        cls, patch, _, ids = c.split("train").read_all()
    ref_cls, ref_patch = _direct_forward(data, ids, model_kwargs=kwargs)
    assert not np.array_equal(patch, ref_patch)  # resized on the "device", not by PIL
    np.testing.assert_allclose(cls, ref_cls, rtol=0, atol=0.02 * float(np.abs(ref_cls).max()))
    np.testing.assert_allclose(patch, ref_patch, rtol=0, atol=0.02 * float(np.abs(ref_patch).max()))
    # a cache begun with PIL resizing is not resumed with device resizing (different bits)
    cfg_cpu = extract_config(data, tmp_path / "dev", dtype="float32", model_kwargs=kwargs, resize_on="cpu",
                             precision="fp32")
    with pytest.raises(Exception, match="settings|overwrite"):
        extract(cfg_cpu)


def test_mixed_sizes_and_bad_images_in_one_batch():
    from sanf_pipeline.extract.job import _Collate
    from sanf_pipeline.extract.preprocess import Preprocess

    pre = Preprocess((56, 56), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    small = pre.to_uint8(np.full((32, 32, 3), 100, np.uint8), keep_smaller=True)
    x, reasons = _Collate(pre)([(small, ""), (None, "broken"), (small, "")])
    assert tuple(x.shape) == (3, 3, 32, 32) and reasons == ["", "broken", ""] and int(x[1].max()) == 0
    other = pre.to_uint8(np.full((40, 40, 3), 7, np.uint8), keep_smaller=True)
    x, _ = _Collate(pre)([(small, ""), (other, ""), (None, "broken")])
    assert tuple(x.shape) == (3, 3, 56, 56)
    assert int(x[0].min()) == 100 and int(x[1].max()) == 7 and int(x[2].max()) == 0
