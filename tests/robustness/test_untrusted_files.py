"""Untrusted files: nothing sanf reads can run code or exhaust memory. Crafted pickles (a CIFAR batch, files in a run
folder, a weights file) are refused or ignored and never executed; an oversized JSON file is refused before it is
parsed; corrupted cache shards are reported, never trusted."""

from __future__ import annotations

import io
import os
import pickle

import pytest
import torch
from conftest import TINY_TIMM_KWARGS, TINY_VIT, cache_path, write_hand_cache
from robust_helpers import sanf, tiny_run_fixture  # noqa: F401 (fixtures)

from sanf_pipeline.data import create_dataset
from sanf_pipeline.errors import SanfError
from sanf_pipeline.extract.backbones import create_backbone
from sanf_pipeline.jobs.api import eval_run
from sanf_pipeline.jobs.flow import load_run
from sanf_pipeline.store.run_folder import MODEL_FILE

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


class _Evil:
    """Unpickling it creates ``marker`` (so a test can tell whether a pickle was executed)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_crafted_pickles_in_run_folder_are_never_loaded(tiny_run, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(tiny_run, run)
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Evil(marker))
    for name in ("model.pt", "model.pkl", "checkpoint.pt", "normalizer.pkl", "optimizer.pt"):
        (run / name).write_bytes(payload)
    res = eval_run(run, plots=False)
    assert res.metrics["auroc"] > 0.8
    load_run(run)
    assert not marker.exists()
    # a model file replaced by a pickle is refused, not unpickled
    (run / MODEL_FILE).write_bytes(payload)
    with pytest.raises(SanfError, match="not a readable safetensors"):
        eval_run(run, overwrite=True)
    # an incomplete run with only pickles is refused too
    os.remove(run / MODEL_FILE)
    with pytest.raises(SanfError, match="incomplete"):
        eval_run(run)
    assert not marker.exists()
    # sanity: the payload does create the marker when unpickled (so the test can fail)
    pickle.loads(payload).close()
    assert marker.exists()


def test_oversized_config_json_refused(tiny_run, tmp_path, monkeypatch):
    import shutil

    import sanf_pipeline.cache.schema as schema

    run = tmp_path / "big"
    shutil.copytree(tiny_run, run)
    monkeypatch.setattr(schema, "MAX_JSON_BYTES", 100)
    with pytest.raises(SanfError, match="limit"):
        eval_run(run)


def test_cifar_refuses_code_in_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    meta = folder / "batches.meta"
    meta.write_bytes(pickle.dumps({"label_names": _Evil(marker)}, protocol=2))
    with pytest.raises(SanfError, match="not a readable CIFAR pickle"):
        create_dataset("cifar10", tmp_path, "train")
    assert not marker.exists()
    # a readable meta file, then a batch holding code where its labels go
    meta.write_bytes(pickle.dumps({"label_names": ["airplane", "automobile"]}, protocol=2))
    rows = bytes(3072)
    (folder / "data_batch_1").write_bytes(pickle.dumps({"labels": _Evil(marker), "data": [rows]}, protocol=2))
    with pytest.raises(SanfError, match="data_batch_1 is not a readable CIFAR pickle"):
        create_dataset("cifar10", tmp_path, "train")
    assert not marker.exists()
    pickle.loads(pickle.dumps(_Evil(marker))).close()  # the payload does create the marker when unpickled
    assert marker.exists()


def test_unreadable_and_missing_weights_files(tmp_path, no_hub):
    with pytest.raises(SanfError, match="does not exist"):
        create_backbone(TINY_VIT, weights=tmp_path / "nope.safetensors", model_kwargs=TINY_TIMM_KWARGS)
    bad = tmp_path / "garbage.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(SanfError, match="cannot read weights file"):
        create_backbone(TINY_VIT, weights=bad, image_size=56, model_kwargs=TINY_TIMM_KWARGS)
    pickled = tmp_path / "object.pth"
    torch.save({"w": torch.zeros(1), "obj": io.StringIO("x")}, pickled)  # not allowed by weights_only
    with pytest.raises(SanfError, match="cannot read weights file"):
        create_backbone(TINY_VIT, weights=pickled, image_size=56, model_kwargs=TINY_TIMM_KWARGS)


def test_verify_detects_corrupted_zarr_shard_bytes(tmp_path):
    path = cache_path(tmp_path, "zarr")
    write_hand_cache(path, "zarr")
    shard_file = path / "train" / "patch" / "c" / "1" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[20] ^= 0xFF  # inside the chunk's data
    shard_file.write_bytes(bytes(data))
    r = sanf("cache", "verify", path)
    assert r.exit_code == 2, r.output
    assert "train: shard 1 (rows 4:8) does not match its checksum" in r.stderr
    assert "Traceback" not in r.output


def test_verify_reports_an_unreadable_zarr_shard(tmp_path):
    path = cache_path(tmp_path, "zarr")
    write_hand_cache(path, "zarr")
    shard_file = path / "test" / "cls" / "c" / "0" / "0"
    data = bytearray(shard_file.read_bytes())
    data[-2] ^= 0xFF  # inside the shard index's checksum: zarr refuses to decode the shard
    shard_file.write_bytes(bytes(data))
    r = sanf("cache", "verify", path)
    assert r.exit_code == 2, r.output
    assert "test: shard 0" in r.stderr and "cannot be read" in r.stderr
    assert "Traceback" not in r.output
