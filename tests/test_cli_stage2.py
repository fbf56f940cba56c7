"""`sanf fit`, `sanf eval`, `sanf baseline` through click: happy paths, a finished run never silently replaced, and
the CLI's fit defaults. Bad arguments and mismatches (one-line errors, exit code 2): tests/robustness/."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from conftest import FAST_FIT, assert_user_error

from sanf_pipeline.cli.main import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def test_fit_eval_baseline_happy_path(pets_cache, tmp_path):
    out = tmp_path / "run"
    r = run("fit", "--cache", pets_cache, "--normal-class", "dog", "--out", out, "--max-epochs", "2", *FAST_FIT)
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
    r = run("baseline", "--cache", pets_cache, "--normal-class", "1", "--method", "knn-l2", "--out", tmp_path / "b")
    assert r.exit_code == 0, r.output
    assert str(tmp_path / "b") in r.stdout and json.loads((tmp_path / "b" / "metrics.json").read_text())["auroc"] > 0.8
    # the same fit again is a no-op (exit 0, as extract and sweep); other settings never silently replace it
    r = run("fit", "--cache", pets_cache, "--normal-class", "dog", "--out", out, "--max-epochs", "2", *FAST_FIT)
    assert r.exit_code == 0 and "already finished" in r.stdout, r.output
    r = run("fit", "--cache", pets_cache, "--normal-class", "dog", "--out", out, "--max-epochs", "3", *FAST_FIT)
    assert_user_error(r, "already holds a finished run with other settings", "max_epochs", "--overwrite")
    r = run("fit", "--cache", pets_cache, "--normal-class", "dog", "--out", out, "--epochs", "1", "--overwrite",
            *FAST_FIT)
    assert r.exit_code == 0, r.output
    assert json.loads((out / "config.json").read_text())["fit"]["early_stopping"] is False


def test_fit_default_out_folder(pets_cache, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = run("fit", "--cache", pets_cache, "--normal-class", "0", "--epochs", "1", "--fusion", "none", *FAST_FIT)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "runs" / "syn-cat" / "model.safetensors").exists()
    assert "runs/syn-cat" in r.stdout


def test_fit_cli_defaults_equal_fitconfig_defaults():
    """`sanf fit --help` shows the Python API's defaults (the CLI spells them out to avoid importing torch)."""
    import dataclasses

    from sanf_pipeline.train.config import FitConfig

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


def _api_defaults(api) -> dict:
    import dataclasses
    import inspect

    if dataclasses.is_dataclass(api):
        return {f.name: f.default for f in dataclasses.fields(api) if f.default is not dataclasses.MISSING}
    return {n: p.default for n, p in inspect.signature(api).parameters.items() if p.default is not p.empty}


def _same(cli_value, api_value) -> bool:
    from pathlib import Path

    def norm(v):
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, (list, tuple)):
            return [norm(x) for x in v]
        return v

    a, b = norm(cli_value), norm(api_value)
    if isinstance(b, list) and isinstance(a, str):  # "flow" / "0" (comma lists) against (FLOW,) / (0,)
        a = [type(b[0])(x) for x in a.split(",")] if b else []
    return a == b


def test_every_command_default_equals_the_api_default():
    """Each `sanf` command's option defaults equal the Python API's (the function or config the command calls)."""
    from sanf_pipeline.cli.demo import run_demo
    from sanf_pipeline.extract.backbones import create_backbone
    from sanf_pipeline.extract.job import ExtractConfig
    from sanf_pipeline.flow.normalizer import Normalizer
    from sanf_pipeline.jobs.api import baseline_run, eval_run
    from sanf_pipeline.sweep import run_sweep
    from sanf_pipeline.train.config import FitConfig

    apis = {"extract": (ExtractConfig, {"fmt": "format"}), "fit": (FitConfig, {}), "eval": (eval_run, {}),
            "baseline": (baseline_run, {}), "sweep": (run_sweep, {}), "demo": (run_demo, {})}
    checked = {}
    for command, (api, rename) in apis.items():
        defaults = _api_defaults(api)
        for param in cli.commands[command].params:
            name = rename.get(param.name, param.name)
            if name not in defaults or param.default in (None, click_unset()) or param.name in ("help", "version"):
                continue
            assert _same(param.default, defaults[name]), (command, name, param.default, defaults[name])
            checked.setdefault(command, []).append(name)
    # a flag that inverts an API setting: off by default, as the API's amp=True
    no_amp = next(p for p in cli.commands["fit"].params if p.name == "no_amp")
    assert no_amp.is_flag and no_amp.default in (False, None, click_unset()) and FitConfig().amp is True
    assert {"dtype", "precision", "device", "batch_size", "on_error"} <= set(checked["extract"])
    # no default on the command line either way: the backbone's recipe decides (recipes.py)
    pool = next(p for p in cli.commands["extract"].params if p.name == "pool")
    assert pool.default in (None, click_unset()) and ExtractConfig.__dataclass_fields__["pool"].default is None
    assert {"score", "device"} <= set(checked["eval"])
    assert {"classes", "methods", "seeds", "score", "executor", "device", "plots"} <= set(checked["sweep"])
    assert {"out", "device"} <= set(checked["demo"])
    # the API below the commands: create_backbone and the Normalizer default like `sanf extract` and `sanf fit`
    assert _api_defaults(create_backbone)["device"] == _api_defaults(ExtractConfig)["device"] == "auto"
    # create_backbone is recipe-free by default (pool 1); extraction's None lets the recipe choose
    assert _api_defaults(create_backbone)["pool"] == 1 and _api_defaults(ExtractConfig)["pool"] is None
    assert _api_defaults(create_backbone)["recipe"] is False and _api_defaults(ExtractConfig)["recipe"] is True
    assert _api_defaults(Normalizer.fit)["token_pool"] == FitConfig().token_pool
