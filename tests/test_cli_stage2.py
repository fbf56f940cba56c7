"""`sanf fit`, `sanf eval`, `sanf baseline` through click: happy paths and one-line errors with exit code 2."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from sanf_pipeline.cache.synthetic import write_synthetic_cache
from sanf_pipeline.cli import cli

FAST = ["--hidden", "16", "--blocks", "2", "--batch-size", "16", "--lr", "2e-3", "--device", "cpu", "--quiet"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("c") / "syn", n_classes=3, n_train=40, n_test=20, dim=16,
                                 num_tokens=4, separation=1.0, seed=1, class_names=["cat", "dog", "frog"])


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def assert_user_error(result, *fragments):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_fit_eval_baseline_happy_path(cache, tmp_path):
    out = tmp_path / "run"
    r = run("fit", "--cache", cache, "--normal-class", "dog", "--out", out, "--max-epochs", "2", *FAST)
    assert r.exit_code == 0, r.output
    assert str(out) in r.stdout and "model.safetensors" in r.stdout and "sanf eval --run" in r.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["normal_class"] == 1 and config["fit"]["max_epochs"] == 2 and config["fit"]["early_stopping"]
    r = run("eval", "--run", out)
    assert r.exit_code == 0, r.output
    assert "AUROC" in r.stdout and str(out) in r.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["auroc"] > 0.8 and metrics["normal_class_name"] == "dog"
    r = run("eval", "--run", out, "--score", "z2", "--out", tmp_path / "z2")
    assert r.exit_code == 0 and (tmp_path / "z2" / "metrics.json").exists()
    r = run("baseline", "--cache", cache, "--normal-class", "1", "--method", "knn-l2", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert str(tmp_path / "b") in r.stdout and json.loads((tmp_path / "b" / "metrics.json").read_text())["auroc"] > 0.8
    # a finished run is never silently replaced
    r = run("fit", "--cache", cache, "--normal-class", "dog", "--out", out, "--max-epochs", "2", *FAST)
    assert_user_error(r, "already holds a finished run", "--overwrite")
    r = run("fit", "--cache", cache, "--normal-class", "dog", "--out", out, "--epochs", "1", "--overwrite", *FAST)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["fit"]["early_stopping"] is False


def test_fit_default_out_folder(cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("fit", "--cache", cache, "--normal-class", "0", "--epochs", "1", "--fusion", "none", *FAST)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "runs" / "syn-cat" / "model.safetensors").exists()
    assert "runs/syn-cat" in r.stdout


def test_unknown_class_lists_valid_ones(cache, tmp_path):
    r = run("fit", "--cache", cache, "--normal-class", "zebra", "--out", tmp_path / "r", *FAST)
    assert_user_error(r, "unknown class 'zebra'", "0=cat, 1=dog, 2=frog")
    r = run("baseline", "--cache", cache, "--normal-class", "7", "--out", tmp_path / "b")
    assert_user_error(r, "unknown class '7'", "0=cat")


def test_not_a_cache_and_incomplete_cache(cache, tmp_path):
    (tmp_path / "junk").mkdir()
    r = run("fit", "--cache", tmp_path / "junk", "--normal-class", "0", "--out", tmp_path / "r", *FAST)
    assert_user_error(r, "is not a sanf feature cache")
    r = run("baseline", "--cache", tmp_path / "missing", "--normal-class", "0")
    assert_user_error(r, "does not exist")
    part = write_synthetic_cache(tmp_path / "part", n_classes=2, n_train=4, n_test=4, dim=8, num_tokens=2)
    meta = json.loads((part / "sanf.json").read_text())
    meta["sealed"] = False
    (part / "sanf.json").write_text(json.dumps(meta))
    r = run("fit", "--cache", part, "--normal-class", "0", "--out", tmp_path / "r", *FAST)
    assert_user_error(r, "incomplete cache")


def test_nan_features_in_cache_refused(tmp_path):
    import zarr

    bad = write_synthetic_cache(tmp_path / "nan", n_classes=2, n_train=8, n_test=4, dim=8, num_tokens=2)
    root = zarr.open_group(str(bad), mode="r+")
    cls = root["train"]["cls"][...]
    cls[1, 3] = np.nan
    root["train"]["cls"][...] = cls
    r = run("fit", "--cache", bad, "--normal-class", "0", "--out", tmp_path / "r", *FAST)
    assert_user_error(r, "NaN/Inf", "sanf cache verify")
    r = run("baseline", "--cache", bad, "--normal-class", "0", "--out", tmp_path / "b")
    assert_user_error(r, "NaN/Inf")


def test_unwritable_out_and_bad_options(cache, tmp_path):
    (tmp_path / "file").write_text("x")
    r = run("fit", "--cache", cache, "--normal-class", "0", "--out", tmp_path / "file" / "run", "--epochs", "1",
            *FAST)
    assert_user_error(r, "cannot write to")
    r = run("fit", "--cache", cache, "--normal-class", "0", "--epochs", "2", "--early-stopping", *FAST)
    assert_user_error(r, "exclude each other")
    r = run("fit", "--cache", cache, "--normal-class", "0", "--clamp", "-1", "--out", tmp_path / "r", *FAST)
    assert_user_error(r, "invalid clamp=-1.0")
    assert not (tmp_path / "r").exists()
    r = run("eval", "--run", tmp_path / "nowhere")
    assert_user_error(r, "does not exist")


def test_eval_with_mismatched_cache_refused(cache, tmp_path):
    out = tmp_path / "r"
    assert run("fit", "--cache", cache, "--normal-class", "2", "--out", out, "--epochs", "1", *FAST).exit_code == 0
    other = write_synthetic_cache(tmp_path / "other", n_classes=3, n_train=4, n_test=4, dim=8, num_tokens=4,
                                  class_names=["cat", "dog", "frog"])
    r = run("eval", "--run", out, "--cache", other)
    assert_user_error(r, "trained on another cache", "dim 16 vs 8")


def test_fit_cli_defaults_equal_fitconfig_defaults():
    """`sanf fit --help` shows the Python API's defaults (the CLI spells them out to avoid importing torch)."""
    import dataclasses

    from sanf_pipeline.train import FitConfig

    defaults = {f.name: f.default for f in dataclasses.fields(FitConfig)}
    checked = []
    for param in cli.commands["fit"].params:
        if param.name in defaults and param.default not in (None, click_unset()):
            assert param.default == defaults[param.name], param.name
            checked.append(param.name)
    assert {"fusion", "clamp", "hidden", "blocks", "spatial_channels", "token_pool", "normalize", "lr"} <= set(checked)


def click_unset():
    """click 8.2+ marks an option without a default with a sentinel instead of None."""
    try:
        from click._utils import UNSET
    except ImportError:
        return None
    return UNSET
