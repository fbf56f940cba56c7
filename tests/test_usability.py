"""What a new user tripped over (issue 14, items 6, 8-12, 14-16): fast argument errors without torch, the baseline
default and the whitened Gaussian, models a sweep keeps, a rerun finished fit, consistent run metadata, clean sweep
tables and demo output, the fit's time estimate, help texts, README file names."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FAST_FIT, REPO, TINY_FLOW, assert_user_error, sub_env

from sanf_pipeline.cli.main import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


# ------------------------------------------------------------------------------- item 6: errors before torch
_ERRORS_WITHOUT_TORCH = r"""
import sys
from sanf_pipeline.cli import main
heavy = [m for m in ("torch", "timm") if m in sys.modules]
assert not heavy, f"importing the CLI imported {heavy}"
cache, tmp = sys.argv[1], sys.argv[2]
cases = [
    ["fit", "--cache", tmp + "/nope", "--normal-class", "0"],
    ["fit", "--cache", cache, "--normal-class", "zebra"],
    ["eval", "--run", tmp + "/nope"],
    ["eval", "--run", tmp],
    ["baseline", "--cache", cache, "--normal-class", "7"],
    ["sweep", "--cache", cache, "--classes", "cat,zebra"],
    ["sweep", "--cache", tmp + "/nope"],
    ["report", tmp],
    ["extract", "--backbone", "x", "--dataset", "cifar11"],
    ["extract", "--backbone", "x", "--dataset", "cifar10", "--data-root", tmp + "/nope"],
]
for args in cases:
    try:
        main(args)
    except SystemExit as exc:
        assert exc.code == 2, (args, exc.code)
    else:
        raise AssertionError(f"{args} did not fail")
    heavy = [m for m in ("torch", "timm") if m in sys.modules]
    assert not heavy, f"{args} imported {heavy} before failing"
print("ok", len(cases))
"""


def test_argument_errors_fail_before_torch_is_imported(pets_cache, tmp_path):
    r = subprocess.run([sys.executable, "-c", _ERRORS_WITHOUT_TORCH, str(pets_cache), str(tmp_path)],
                       capture_output=True, text=True, env=sub_env(), cwd=REPO, timeout=120)
    assert r.returncode == 0 and "ok 10" in r.stdout, (r.stdout, r.stderr)
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 10 and "Traceback" not in r.stderr, r.stderr
    assert any("unknown class 'zebra'" in e for e in errors) and any("--data-root" in e for e in errors)


def test_builtin_choices_are_registered():
    """The names the CLI accepts without importing torch are exactly the registries' built-ins."""
    from sanf_pipeline.cli import options as cli_options
    from sanf_pipeline.train import options as fit_options

    for load_name, names in fit_options.BUILTIN.items():
        load = getattr(fit_options, load_name, None) or getattr(cli_options, load_name)
        assert tuple(load()) == names, load_name


# --------------------------------------------------------------- item 8: the baseline default, gaussian-whiten
def test_baseline_default_is_gaussian_and_the_api_agrees():
    import inspect

    from sanf_pipeline.jobs.api import baseline_run

    method = next(p for p in cli.commands["baseline"].params if p.name == "method")
    assert method.default == "gaussian" == inspect.signature(baseline_run).parameters["method"].default


def test_gaussian_whiten_is_the_flows_starting_density():
    """The gaussian-whiten score is ||Normalizer('l2+whiten')(x)||^2, and an identity-initialised flow's NLL on
    those inputs is half of it plus a constant: the flow starts exactly at this baseline's density."""
    import torch

    from sanf_pipeline.flow import SANFlow
    from sanf_pipeline.flow.normalizer import Normalizer
    from sanf_pipeline.flow.score import score_flow
    from sanf_pipeline.models import fit_score
    from sanf_pipeline.train.config import FitConfig

    rng = np.random.default_rng(0)
    d, t = 12, 4
    train = rng.normal(size=(30, d)) * rng.uniform(0.5, 3, d) + 2.0
    test = rng.normal(size=(10, d)) * 2.0 + 1.0
    patch_tr, patch_te = rng.normal(size=(30, t, d)), rng.normal(size=(10, t, d))
    scores = fit_score("gaussian-whiten", train, test)
    norm = Normalizer.fit("l2+whiten", train, patch_tr)
    x, p = norm.transform(test, patch_te)
    np.testing.assert_allclose(scores, (x.astype(np.float64) ** 2).sum(axis=1), rtol=1e-4)
    raw = fit_score("gaussian", train, test)
    assert not np.allclose(raw, scores, rtol=1e-2)  # the raw-token Gaussian is another density
    flow = SANFlow(**FitConfig(hidden=16, blocks=2).flow_kwargs(d, d, t)).eval()
    nll = score_flow(flow, torch.from_numpy(x), torch.from_numpy(p), "nll")
    np.testing.assert_allclose(nll - 0.5 * scores, np.full(len(scores), 0.5 * d * np.log(2 * np.pi)), rtol=1e-4)


def test_baseline_k_and_quiet(pets_cache, tmp_path):
    out = tmp_path / "b"
    r = run("baseline", "--cache", pets_cache, "--normal-class", "dog", "--method", "knn", "--k", "5", "--out", out,
            "--quiet")
    assert r.exit_code == 0 and r.stderr == "", r.output  # --quiet: no progress output
    m = json.loads((out / "metrics.json").read_text())
    assert m["settings"]["k"] == 5 and m["options"] == {"k": 5}
    # another k is another result: never silently kept
    r = run("baseline", "--cache", pets_cache, "--normal-class", "dog", "--method", "knn", "--k", "3", "--out", out)
    assert_user_error(r, "--overwrite")
    r = run("baseline", "--cache", pets_cache, "--normal-class", "dog", "--method", "gaussian", "--k", "3",
            "--out", tmp_path / "g")
    assert_user_error(r, "gaussian", "takes no options k")


# ------------------------------------------------------------------------------- item 9: models a sweep keeps
def test_sweep_keeps_models_only_when_asked(pets_cache, tmp_path):
    from sanf_pipeline.jobs.flow import load_run
    from sanf_pipeline.sweep import run_sweep

    fixed = [f"{k}={v}" for k, v in {**TINY_FLOW, "epochs": 1}.items() if k != "device"]
    res = run_sweep(pets_cache, tmp_path / "s", "dog", None, "flow", "0", fixed, device="cpu", plots=False)
    run_dir = tmp_path / "s" / "runs" / "dog-flow-s0"
    assert len(res.computed) == 1 and (run_dir / "metrics.json").is_file() and (run_dir / "scores.csv").is_file()
    assert not (run_dir / "model.safetensors").exists()
    with pytest.raises(Exception, match="model was not kept.*--keep-models"):
        load_run(run_dir)
    again = run_sweep(pets_cache, tmp_path / "s", "dog", None, "flow", "0", fixed, device="cpu", plots=False)
    assert again.skipped == ["dog-flow-s0"] and not again.computed  # still a finished run
    kept = run_sweep(pets_cache, tmp_path / "k", "dog", None, "flow", "0", fixed, device="cpu", plots=False,
                     keep_models=True)
    assert kept.computed and (tmp_path / "k" / "runs" / "dog-flow-s0" / "model.safetensors").is_file()
    stacked = run_sweep(pets_cache, tmp_path / "st", "cat,dog", None, "flow", "0", fixed, device="cpu", plots=False,
                        stack=2)  # the stacked executor (sweep/stacked.py) drops them too
    assert len(stacked.computed) == 2 and not list((tmp_path / "st").rglob("model.safetensors"))


# ------------------------------------------------------------------------- item 11: consistent run metadata
def test_run_metadata_is_consistent(pets_cache, tmp_path):
    out = tmp_path / "r"
    r = run("fit", "--cache", pets_cache, "--normal-class", "dog", "--out", out, "--max-epochs", "2", *FAST_FIT)
    assert r.exit_code == 0, r.output
    config = json.loads((out / "config.json").read_text())
    fit = config["fit"]
    assert fit["early_stopping"] and "epochs" not in fit and fit["max_epochs"] == 2
    assert fit["amp"] is False  # a CPU run has no mixed precision, whatever the setting
    assert config["settings"]["fit"]["amp"] is True  # the identity keeps the setting as given
    res = config["result"]
    assert f"trained on {config['n_train_total']} samples" in r.stdout
    assert f"({res['n_train']} fitted, {res['n_val']} held out for early stopping)" in r.stdout
    r = run("eval", "--run", out)
    assert r.exit_code == 0, r.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_train"] == config["n_train_total"] == res["n_train"] + res["n_val"] == 40
    report = (out / "report.md").read_text()
    assert f"training samples: 40 ({res['n_train']} fitted, {res['n_val']} held out" in report
    assert "per feature dimension" in report and "epochs: 1" not in report
    r = run("fit", "--cache", pets_cache, "--normal-class", "dog", "--out", tmp_path / "f", "--epochs", "1",
            *FAST_FIT)
    fixed = json.loads((tmp_path / "f" / "config.json").read_text())["fit"]
    assert fixed["epochs"] == 1 and not ({"patience", "max_epochs", "val_fraction", "min_delta"} & set(fixed))


# ------------------------------------------------------------------------------ item 12: tables and the demo
def _summary(names=("0", "1"), sweep_name="sweep"):
    cells = {"flow": {n: {"auroc_mean": 0.8583999999999999, "auroc_std": None, "n_runs": 1, "n_planned": 1,
                          "aurocs": [0.8583999999999999], "aupr_mean": 0.1 + 0.2, "tpr_at_5_fpr_mean": None}
                      for n in names}}
    return {"sweep": sweep_name, "cache": "c", "cache_fingerprint": "f", "n_finished": 2, "n_runs": 2, "score": "nll",
            "methods": ["flow"], "seeds": [0], "grid": {}, "fixed": {}, "settings": ["flow"], "runs": [],
            "classes": [{"index": i, "name": n} for i, n in enumerate(names)], "cells": cells,
            "m_auroc": {"flow": {"mean": 0.8583999999999999, "std_over_seeds": None, "per_seed": {"0": 0.1 + 0.2},
                                 "n_classes": 2, "method": "flow"}}}


def test_summary_tables_without_noise_or_doubled_names():
    from sanf_pipeline.evaluate.report import summary_csv, summary_markdown

    csv = summary_csv(_summary())
    assert "0.8584" in csv and "0.8583999999999999" not in csv and "0.30000000000000004" not in csv
    md = summary_markdown(_summary())
    assert md.startswith("# Sweep summary\n") and "| 0 0 |" not in md and "| 0 |" in md
    named = summary_markdown(_summary(("cat", "dog"), "pets"))
    assert named.startswith("# Sweep summary: pets\n") and "| 0 cat |" in named


def test_demo_prints_no_markdown_image_line(tmp_path, monkeypatch):
    import sanf_pipeline.cli.demo as demo

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    (sweep / "summary.md").write_text("# Sweep summary\n\n| class | flow |\n![AUROC heatmap](heatmap.png)\n")
    monkeypatch.setattr(demo, "run_demo", lambda out, **kw: demo.DemoResult(tmp_path / "cache", sweep, {}))
    r = run("demo", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    assert "| class | flow |" in r.stdout and "![" not in r.stdout and str(sweep / "heatmap.png") in r.stdout


# --------------------------------------------------------------------------- item 14: the fit's time estimate
def test_time_left_comes_from_measured_epochs_only():
    from sanf_pipeline.train.config import FitConfig
    from sanf_pipeline.train.fit import time_left
    from sanf_pipeline.train.loop import EarlyStopping

    es = FitConfig(max_epochs=30, patience=3)
    stop = EarlyStopping(True, 3, 0.0)
    assert time_left([], 0, es, stop) == ""  # nothing measured: no guess
    # one 2-s epoch done: stopping takes at least 3 more epochs, at most 29
    assert time_left([2.0], 1, es, stop) == "~6-58 s left (early stopping)"
    stop.bad_epochs = 2
    assert time_left([2.0, 4.0], 2, es, stop) == "~3-84 s left (early stopping)"
    fixed = FitConfig(early_stopping=False, epochs=5)
    assert time_left([1.0, 3.0], 2, fixed, EarlyStopping(False, 3, 0.0)) == "~6 s left"


def test_log_lines_use_the_callers_estimate():
    from sanf_pipeline.progress import LogLines

    lines, clock = [], iter(range(0, 1000, 10)).__next__
    bar = LogLines(lines.append, interval=0, clock=clock)
    task = bar.add_task("fit", total=100, left="")
    bar.update(task, advance=10)
    assert "left" not in lines[-1]  # the first epoch is not done: no extrapolation from its first steps
    bar.update(task, advance=10, left="~6-58 s left (early stopping)")
    assert lines[-1].endswith("~6-58 s left (early stopping)")


# ------------------------------------------------------------------------------------------ item 15: help
def test_help_texts():
    import dataclasses

    from sanf_pipeline.cli.sweep import GRID_KEYS
    from sanf_pipeline.sweep.plan import NOT_GRID
    from sanf_pipeline.train.config import FitConfig

    assert set(GRID_KEYS) == {f.name for f in dataclasses.fields(FitConfig)} - set(NOT_GRID)
    helps = {name: run(*name.split(), "--help").output for name in ("sweep", "baseline", "report", "demo", "extract")}
    assert "normalize, patch_coreset" in " ".join(helps["sweep"].split()) and "--keep-models" in helps["sweep"]
    for option in ("--k ", "--quiet"):
        assert option in helps["baseline"], option
    assert "--out" in helps["report"]
    demo_device = next(p for p in cli.commands["demo"].params if p.name == "device")
    assert demo_device.help
    weights = next(p for p in cli.commands["extract"].params if p.name == "weights")
    assert "'timm'" in weights.help


def test_num_workers_help_states_the_cap(monkeypatch):
    import os

    from sanf_pipeline.extract import job as extract

    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    cap = extract._default_workers()
    workers = next(p for p in cli.commands["extract"].params if p.name == "num_workers")
    assert f"at most {cap}" in workers.help


def test_report_out(pets_cache, tmp_path):
    from sanf_pipeline.sweep import run_sweep

    run_sweep(pets_cache, tmp_path / "s", "dog", None, "knn", "0", None, plots=False)
    r = run("report", tmp_path / "s", "--out", tmp_path / "elsewhere")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "elsewhere" / "summary.md").is_file() and (tmp_path / "elsewhere" / "heatmap.png").is_file()
    r = run("report", tmp_path / "s", "--out", tmp_path / "elsewhere")  # its own earlier report: replaced
    assert r.exit_code == 0, r.output
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.md").write_text("my notes")
    assert_user_error(run("report", tmp_path / "s", "--out", mine), "summary.md", "another --out")
    assert (mine / "summary.md").read_text() == "my notes"


# ------------------------------------------------------------------------------------------ item 16: README
def test_readme_names_the_files_runs_write():
    from sanf_pipeline.store.run_folder import RESULT_FILES

    readme = (REPO / "README.md").read_text()
    assert "hist.png" not in readme.replace("score_hist.png", "")
    assert all(name in readme for name in RESULT_FILES)
