"""`sanf sweep` / `sanf report` and the sweep API: run folders, summaries, equality with single runs and baselines,
errors, the Ray executor. Fast: synthetic caches (d=16, T=4) and tiny flows. SIGKILL and resume, one sweep per
folder: tests/robustness/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from sanf_pipeline.cache.synthetic import write_synthetic_cache
from sanf_pipeline.cli.sweep import report, sweep
from sanf_pipeline.errors import SanfError
from sanf_pipeline.sweep import (
    HEATMAP_PNG,
    PLAN_FILE,
    SUMMARY_CSV,
    SUMMARY_JSON,
    SUMMARY_MD,
    parse_grid,
    plan_sweep,
    run_sweep,
)
from sanf_pipeline.train.config import FitConfig

FIXED = ["epochs=2", "early_stopping=false", "hidden=32", "blocks=2", "batch_size=16", "lr=2e-3"]
SET_ARGS = [a for f in FIXED for a in ("--set", f)]
GRID = ["fusion=none,semantic"]
CLASSES = ["cat", "dog", "frog"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_synthetic_cache(tmp_path_factory.mktemp("c") / "syn", n_classes=3, n_train=40, n_test=20, dim=16,
                                 num_tokens=4, separation=1.0, seed=1, class_names=CLASSES)


def invoke(command, *args):
    return CliRunner().invoke(command, [str(a) for a in args], catch_exceptions=True)


@pytest.fixture(scope="module")
def swept(cache, tmp_path_factory):
    """One CLI sweep: 3 classes x (2 flow settings x 1 seed + knn), 2 workers (plots: see test_plots_option)."""
    out = tmp_path_factory.mktemp("s") / "sweep"
    r = invoke(sweep, "--cache", cache, "--out", out, "--grid", *GRID, "--methods", "flow,knn",
               "--seeds", "0", *SET_ARGS, "--device", "cpu", "--workers", "2", "--no-plots", "--keep-models",
               "--quiet")
    assert r.exit_code == 0, (r.output, r.exception)
    return out, r.output


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def test_sweep_writes_runs_summary_and_heatmap(swept):
    out, stdout = swept
    assert "9 run(s) computed" in stdout and str(out / "summary.md") in stdout
    runs = sorted(p.name for p in (out / "runs").iterdir())
    expected = sorted([f"{c}-flow-fusion={f}-s0" for c in CLASSES for f in ("none", "semantic")]
                      + [f"{c}-knn" for c in CLASSES])
    assert runs == expected
    for name in runs:
        files = {p.name for p in (out / "runs" / name).iterdir()}
        assert {"metrics.json", "scores.csv", "report.md", "config.json"} <= files and "roc.png" not in files
        if "-flow-" in name:
            assert {"model.safetensors", "train_log.jsonl"} <= files and "checkpoint.safetensors" not in files
    for f in (PLAN_FILE, SUMMARY_CSV, SUMMARY_JSON, SUMMARY_MD, HEATMAP_PNG):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    assert (out / HEATMAP_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # M-AUROC = the mean over classes of each run's metrics.json
    s = json.loads((out / SUMMARY_JSON).read_text())
    assert s["n_finished"] == s["n_runs"] == 9
    for setting, run_suffix in (("flow fusion=semantic", "flow-fusion=semantic-s0"), ("knn", "knn")):
        per_class = [metrics(out / "runs" / f"{c}-{run_suffix}")["auroc"] for c in CLASSES]
        assert s["m_auroc"][setting]["mean"] == pytest.approx(np.mean(per_class), abs=1e-12)
        assert [s["cells"][setting][c]["auroc_mean"] for c in CLASSES] == pytest.approx(per_class, abs=1e-12)
    md = (out / SUMMARY_MD).read_text()
    assert "M-AUROC" in md and "flow fusion=none" in md and "| 1 dog |" in md
    # a sweep run is an ordinary run folder: `sanf eval --run` accepts it
    from sanf_pipeline.jobs.api import eval_run

    again = eval_run(out / "runs" / "dog-flow-fusion=none-s0", out_dir=out.parent / "re-eval", plots=False)
    assert again.metrics["auroc"] == pytest.approx(metrics(out / "runs" / "dog-flow-fusion=none-s0")["auroc"],
                                                   abs=1e-9)


def test_plots_option(cache, tmp_path):
    res = run_sweep(cache, tmp_path / "p", "dog", None, "knn", "0", None, plots=True)
    files = {p.name for p in (tmp_path / "p" / "runs" / "dog-knn").iterdir()}
    assert {"score_hist.png", "roc.png", "report.md", "metrics.json", "scores.csv"} <= files
    assert res.summary["n_finished"] == 1 and (tmp_path / "p" / HEATMAP_PNG).is_file()


def test_report_rerenders_identical_summary(swept):
    out, _ = swept
    before = {f: (out / f).read_bytes() for f in (SUMMARY_CSV, SUMMARY_JSON, SUMMARY_MD)}
    for f in (*before, HEATMAP_PNG):
        (out / f).unlink()
    r = invoke(report, out)
    assert r.exit_code == 0, (r.output, r.exception)
    assert "9 of 9 run(s) finished" in r.output
    assert {f: (out / f).read_bytes() for f in before} == before
    assert (out / HEATMAP_PNG).is_file()
    r = invoke(report, out.parent / "nothing-here")
    assert isinstance(r.exception, SanfError) and "not a sanf sweep" in str(r.exception)


# where and when a result was written, and the sweep's own keys: everything else in metrics.json must match
PER_LOCATION = ("run", "evaluated", "sweep", "sweep_run_id")
SINGLE_ONLY = ("localisation",)  # `sanf eval`/`baseline`'s anomaly maps: a sweep scores images only (README)


def same_results(single: Path, swept_run: Path) -> None:
    """scores.csv byte-identical; metrics.json identical except the keys that say where/when it was written."""
    assert (single / "scores.csv").read_bytes() == (swept_run / "scores.csv").read_bytes()
    a, b = metrics(single), metrics(swept_run)
    assert not set(b) & set(SINGLE_ONLY)
    a = {k: v for k, v in a.items() if k not in SINGLE_ONLY}
    assert set(a) - set(PER_LOCATION) == set(b) - set(PER_LOCATION)
    assert {k: v for k, v in a.items() if k not in PER_LOCATION} == {k: v for k, v in b.items()
                                                                     if k not in PER_LOCATION}


def test_sweep_run_equals_fit_eval_and_baseline_run(swept, cache, tmp_path):
    """One code path (jobs.py): the pool executor's runs are byte for byte `sanf fit` + `sanf eval` and
    `sanf baseline` (both here on one torch thread, as each pool worker)."""
    from sanf_pipeline.jobs.api import baseline_run, eval_run, fit_run
    from sanf_pipeline.models import BASELINES

    out, _ = swept
    cfg = FitConfig(fusion="semantic", epochs=2, early_stopping=False, hidden=32, blocks=2, batch_size=16, lr=2e-3,
                    seed=0, device="cpu")
    fit_run(cache, "frog", cfg, tmp_path / "single", quiet=True)
    eval_run(tmp_path / "single", cache, plots=False)
    same_results(tmp_path / "single", out / "runs" / "frog-flow-fusion=semantic-s0")
    others = [m for m in BASELINES if m != "knn"]
    base = run_sweep(cache, tmp_path / "base", "cat", None, ",".join(others), "0", None, plots=False).out_dir
    for method in BASELINES:
        baseline_run(cache, "cat", method, tmp_path / method, plots=False)
        same_results(tmp_path / method, (out if method == "knn" else base) / "runs" / f"cat-{method}")


@pytest.mark.parametrize("workers", [1, 2])
def test_a_sweep_fits_each_patch_part_once(cache, tmp_path, monkeypatch, workers):
    """Flow runs that differ in flow settings only (here clamp) share their patch part: one bank per class and
    seed, fitted by whichever worker needs it first, the test split scored against it once; each run still
    equals the same `sanf fit` + `sanf eval` (which fits its own). The parts go once their runs are done."""
    from sanf_pipeline.jobs import parts as jobs

    calls = tmp_path / "fits.txt"
    real = jobs.fit_patch_part

    def counting(cfg, *args, **kwargs):  # forked pool workers inherit the patch; a file collects their calls
        with open(calls, "a") as fh:
            fh.write(f"{cfg.seed}\n")
        return real(cfg, *args, **kwargs)

    monkeypatch.setattr(jobs, "fit_patch_part", counting)
    res = run_sweep(cache, tmp_path / "s", "dog", ["clamp=2,3"], "flow", "0,1", FIXED, plots=False, workers=workers,
                    device="cpu", start_method="fork")
    assert sorted(calls.read_text().split()) == ["0", "1"]  # 4 runs, 2 banks
    assert not (res.out_dir / jobs.PARTS_DIR).exists()
    cfg = FitConfig(clamp=3.0, epochs=2, early_stopping=False, hidden=32, blocks=2, batch_size=16, lr=2e-3, seed=1,
                    device="cpu")
    from sanf_pipeline.jobs.api import eval_run, fit_run

    fit_run(cache, "dog", cfg, tmp_path / "single", quiet=True)
    eval_run(tmp_path / "single", cache, plots=False)
    run = next(p for p in (res.out_dir / "runs").iterdir() if "clamp=3" in p.name and p.name.endswith("-s1"))
    same_results(tmp_path / "single", run)
    assert metrics(run)["score"] == "combined"


def test_plan_ids_and_validation(cache):
    specs = plan_sweep(cache, "frog,0", GRID + ["clamp=2,3"], "flow,knn", "0,1", FIXED)
    ids = [s.run_id for s in specs]
    assert ids[:3] == ["frog-flow-fusion=none-clamp=2-s0", "frog-flow-fusion=none-clamp=2-s1",
                       "frog-flow-fusion=none-clamp=3-s0"]
    assert "frog-knn" in ids and "cat-knn" in ids and len(ids) == 2 * (2 * 2 * 2 + 1)
    assert ids == [s.run_id for s in plan_sweep(cache, "frog,0", GRID + ["clamp=2,3"], "flow,knn", "0,1", FIXED)]
    assert specs[0].fit["clamp"] == 2.0 and specs[0].fit["epochs"] == 2 and specs[0].fit["early_stopping"] is False
    # unsafe class names become safe, unique ids
    odd = plan_sweep(["a b/c", "a_b_c"], "all", None, "knn", "0", None)
    assert len({s.run_id for s in odd}) == 2 and all("/" not in s.run_id and " " not in s.run_id for s in odd)
    assert parse_grid(["betas=0.8:0.8,0.9:0.999", "attn_dim=none,8"]) == {"betas": [(0.8, 0.8), (0.9, 0.999)],
                                                                          "attn_dim": [None, 8]}
    for args, fragment in (
        (dict(grid=["fuson=gap"]), "unknown grid key 'fuson'"),
        (dict(grid=["seed=1,2"]), "use --seeds"),
        (dict(fixed=["seed=1"]), "--set seed=... is not allowed"),
        (dict(grid=["clamp=2", "clamp=3"]), "--grid clamp is given twice"),
        (dict(fixed=["epochs=1", "epochs=2"]), "--set epochs is given twice"),
        (dict(fixed=["bogus=1"]), "unknown --set key 'bogus'"),
        (dict(grid=["clamp=2,x"]), "invalid value 'x' for clamp"),
        (dict(grid=["fusion=bogus"]), "invalid fusion='bogus'"),
        (dict(classes="zebra"), "unknown class 'zebra'; valid classes are 0=cat, 1=dog, 2=frog"),
        (dict(methods="flow,svm"), "unknown method 'svm'"),
        (dict(fixed=["epochs=2", "early_stopping=true"]), "exclude each other"),
        (dict(grid=["clamp=2"], fixed=["clamp=3"]), "both a grid key and a fixed"),
        (dict(methods="knn", grid=["clamp=2"]), "flow runs only"),
    ):
        kwargs = {"classes": "all", "grid": None, "methods": "flow", "seeds": "0", "fixed": None, **args}
        with pytest.raises(SanfError, match=None) as exc:
            plan_sweep(cache, **kwargs)
        assert fragment in str(exc.value), (fragment, str(exc.value))
    assert "valid keys are the fit settings: " in str(pytest.raises(SanfError, parse_grid, ["x=1"]).value)


def test_other_plan_refused_unless_overwrite(cache, tmp_path):
    out = tmp_path / "sw"
    kw = dict(methods="flow,knn", seeds="0", fixed=FIXED, device="cpu", plots=False, workers=1, threads=1)
    run_sweep(cache, out, "cat,dog", ["fusion=none"], **kw)
    mtime = (out / "runs" / "cat-knn" / "metrics.json").stat().st_mtime_ns
    with pytest.raises(SanfError, match="another plan"):
        run_sweep(cache, out, "cat,dog", ["fusion=none,gap"], **kw)
    res = run_sweep(cache, out, "cat", ["fusion=none,gap"], **kw, overwrite=True)
    assert sorted(res.removed) == ["dog-flow-fusion=none-s0", "dog-knn"] and not (out / "runs" / "dog-knn").exists()
    assert sorted(res.skipped) == ["cat-flow-fusion=none-s0", "cat-knn"]
    assert (out / "runs" / "cat-knn" / "metrics.json").stat().st_mtime_ns == mtime
    assert [c["name"] for c in res.summary["classes"]] == ["cat"]
    # a folder with other files is not a sweep
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(SanfError, match="not a sanf sweep"):
        run_sweep(cache, tmp_path / "foreign", "cat", None, **kw)
    assert [p.name for p in (tmp_path / "foreign").iterdir()] == ["notes.txt"]


def test_ray_executor(swept, cache, tmp_path):
    try:
        import ray
    except ImportError as exc:  # pragma: no cover - depends on the optional extra
        pytest.skip(f"Ray is not installed (optional extra sanf[ray]): {exc}")
    out, _ = swept
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        res = run_sweep(cache, tmp_path / "ray", "dog,frog", GRID, "flow,knn", "0", FIXED, executor="ray",
                        device="cpu", plots=False, ray_cpus_per_task=1)
    finally:
        ray.shutdown()
    assert len(res.computed) == 6 and not res.failed
    for run in ("dog-flow-fusion=none-s0", "frog-flow-fusion=semantic-s0", "dog-knn"):  # one thread per task
        same_results(out / "runs" / run, tmp_path / "ray" / "runs" / run)
    # without --keep-models a sweep keeps results, not models
    assert not (tmp_path / "ray" / "runs" / "dog-flow-fusion=semantic-s0" / "model.safetensors").exists()


def test_ray_missing_and_option_errors(cache, tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(SanfError, match=r"pip install 'sanf\[ray\]'"):
        run_sweep(cache, tmp_path / "r", "cat", None, "knn", "0", None, executor="ray")
    r = invoke(sweep, "--cache", cache, "--out", tmp_path / "x", "--ray-gpus-per-task", "0.5")
    assert isinstance(r.exception, SanfError) and "--executor ray" in str(r.exception)
    r = invoke(sweep, "--cache", cache, "--out", tmp_path / "x", "--grid", "fuson=gap")
    assert isinstance(r.exception, SanfError) and "unknown grid key 'fuson'" in str(r.exception)
    assert not (tmp_path / "x").exists()


