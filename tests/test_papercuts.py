"""What a new user still tripped over (issue 22): a rejected fit leaves nothing behind, export checks its output path
before loading, running out of memory in extract is one line, Ctrl-C says what is really kept, thresholds say when
the held-out slice is too small and can be set explicitly (and plots mark them), the demo leads with sanf's own
detector, no internal names in user text, click's errors read like sanf's, and no --help imports torch."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import FAST_FIT, REPO, TINY_FLOW, assert_user_error, extract_args, extract_config, sub_env

from sanf_pipeline.cli.main import cli

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def run(*args, **kw):
    return CliRunner().invoke(cli, [str(a) for a in args], **kw)


@pytest.fixture(scope="module")
def tiny_run(folder_dataset, tmp_path_factory):
    """A finished flow run of class a on a tiny random ViT's cache of ``folder_dataset`` (1 held-out image)."""
    from sanf_pipeline.extract.job import extract
    from sanf_pipeline.jobs.api import fit_run
    from sanf_pipeline.train.config import FitConfig

    root = tmp_path_factory.mktemp("tiny")
    extract(extract_config(folder_dataset, root / "cache", dtype="float32"))
    fit_run(root / "cache", "a", FitConfig(**{**TINY_FLOW, "max_epochs": 1}), root / "run", quiet=True)
    return root / "run"


# ------------------------------------------------------------------------- item 1: a rejected fit leaves nothing
def test_rejected_fit_leaves_no_config_and_the_corrected_command_runs(pets_cache, tmp_path):
    out = tmp_path / "run"
    # the pets cache has a 2x2 patch grid: --token-pool 3 is refused only once the run folder is prepared
    assert_user_error(run("fit", "--cache", pets_cache, "--normal-class", "cat", "--out", out, "--token-pool", "3",
                          "--epochs", "1", *FAST_FIT), "token_pool=3 does not divide")
    assert not out.exists(), "a folder this failed attempt made is removed again"
    r = run("fit", "--cache", pets_cache, "--normal-class", "cat", "--out", out, "--epochs", "1", *FAST_FIT)
    assert r.exit_code == 0, r.output
    assert (out / "model.safetensors").is_file()


def test_rejected_fit_keeps_a_folder_and_files_it_did_not_make(pets_cache, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    assert_user_error(run("fit", "--cache", pets_cache, "--normal-class", "cat", "--out", out, "--token-pool", "3",
                          "--epochs", "1", *FAST_FIT), "token_pool=3")
    assert out.is_dir() and not any(out.iterdir())  # the user's (empty) folder stays, without sanf's files


# ------------------------------------------------------------------------ item 2: export's output path first
def test_export_checks_its_path_before_loading_and_makes_a_missing_folder(tiny_run, tmp_path, monkeypatch):
    from sanf_pipeline.detect.detector import Detector

    real_load = Detector.load
    loads = []

    def load(*a, **kw):
        loads.append(a)
        return real_load(*a, **kw)

    monkeypatch.setattr(Detector, "load", load)
    (tmp_path / "afile").write_text("mine")
    assert_user_error(run("export", "--run", tiny_run, "--format", "torchscript", "--out",
                          tmp_path / "afile" / "sub" / "m.pt"), "is a file")
    assert not loads, "the output path is checked before the model loads"
    out = tmp_path / "new" / "deeper" / "m.pt"
    r = run("export", "--run", tiny_run, "--format", "torchscript", "--out", out)
    assert r.exit_code == 0, r.output
    assert out.is_file() and (out.parent / "m.pt.json").is_file()
    assert (tmp_path / "afile").read_text() == "mine"


# ------------------------------------------------------------------------ item 3: out of memory in extract
def _oom_cases():
    import torch

    return [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
            RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory"),
            MemoryError()]


@pytest.mark.parametrize("case", range(3))
def test_extract_out_of_memory_is_one_line_and_a_smaller_batch_resumes(folder_dataset, tmp_path, monkeypatch, case):
    from sanf_pipeline.extract import job

    exc = _oom_cases()[case]
    real = job._Forward.launch
    calls = []

    def launch(self, x):
        calls.append(len(x))
        if len(calls) == 5:  # batches of 4, shards of 8: the first shard is whole by then
            raise exc
        return real(self, x)

    monkeypatch.setattr(job._Forward, "launch", launch)
    cache = tmp_path / "cache"
    line = assert_user_error(run(*extract_args(folder_dataset, cache)), "out of memory", "a batch of 4 images",
                             "smaller --batch-size (e.g. 2)", "to resume")
    assert "8 of 45 images in finished shards are kept" in line
    monkeypatch.setattr(job._Forward, "launch", real)
    r = run(*extract_args(folder_dataset, cache, "--batch-size", "2"))
    assert r.exit_code == 0, r.output
    assert "complete; 37 images extracted" in r.stdout  # the kept shard was not extracted again


def test_extract_other_runtime_errors_keep_their_traceback(folder_dataset, tmp_path, monkeypatch):
    from sanf_pipeline.extract import job

    def launch(self, x):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")

    monkeypatch.setattr(job._Forward, "launch", launch)
    r = run(*extract_args(folder_dataset, tmp_path / "cache"))
    assert r.exit_code == 1 and isinstance(r.exception, RuntimeError)  # a bug, not a user's setting


# ------------------------------------------------------------------------------- item 4: Ctrl-C tells the truth
def test_ctrl_c_in_score_says_nothing_was_written(tmp_path, monkeypatch):
    from PIL import Image

    from sanf_pipeline.detect.detector import Detector

    img = tmp_path / "x.png"
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(img)

    def load(*a, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(Detector, "load", load)
    r = run("score", "--run", tmp_path, img, "--out", tmp_path / "s.csv")
    assert r.exit_code == 130
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted; nothing was written"), r.stderr
    assert "resume" not in lines[0] and not (tmp_path / "s.csv").exists()


def test_ctrl_c_in_sweep_says_what_is_kept_and_rerun_resumes(pets_cache, tmp_path, monkeypatch):
    from sanf_pipeline.sweep import executors

    real = executors.execute_run
    calls = []

    def execute(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(executors, "execute_run", execute)
    args = ["sweep", "--cache", pets_cache, "--out", tmp_path / "s", "--methods", "knn", "--workers", "1",
            "--no-plots", "--quiet", "--device", "cpu"]
    r = run(*args)
    assert r.exit_code == 130
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("interrupted; 1 of 3 run(s) finished and kept in "), r.stderr
    assert "rerun the same command to resume" in lines[0]
    monkeypatch.setattr(executors, "execute_run", real)
    r = run(*args)
    assert r.exit_code == 0, r.output
    assert "2 run(s) computed" in r.stdout and "1 already finished" in r.stdout


def test_sweep_progress_label_is_not_doubled(tmp_path):
    from sanf_pipeline.sweep.run import sweep_label

    assert sweep_label(tmp_path / "demo" / "sweep") == "sweep"  # `sanf demo`'s folder: not "sweep sweep"
    assert sweep_label(tmp_path / "pets") == "sweep pets"


# ---------------------------------------------------------------------------------------- item 5: thresholds
def test_too_few_held_out_images_are_said_with_the_fpr_they_can_bound():
    from sanf_pipeline.evaluate.calibration import conformal_threshold, describe_threshold

    scores = np.arange(34, dtype=float)
    t1, t5 = conformal_threshold(scores, 0.01), conformal_threshold(scores, 0.05)
    assert t1["value"] == t5["value"] == 33.0  # the two targets cannot be told apart with 34 images
    assert t1["min_fpr_bound"] == pytest.approx(1 / 35)
    assert "cannot bound FPR 0.01" in t1["note"] and "1/(n+1) = 0.0286" in t1["note"]
    assert "below 0.0571 gives this same threshold" in t1["note"] and "--threshold" in t1["note"]
    assert "below 0.0571 gives this same threshold" in t5["note"] and "cannot" not in t5["note"]
    assert conformal_threshold(np.arange(1000.0), 0.05)["note"] is None  # enough images: nothing to say
    assert "note: 34 held-out" in describe_threshold(t1)


def test_explicit_threshold_record():
    from sanf_pipeline.errors import SanfError
    from sanf_pipeline.evaluate.calibration import describe_threshold, explicit_threshold, run_threshold

    thr = explicit_threshold(2.5, [1.0, 2.0, 3.0, 4.0])
    assert thr["explicit"] and thr["value"] == 2.5 and thr["held_out_fpr"] == 0.5 and thr["target_fpr"] is None
    assert describe_threshold(thr) == ("threshold 2.5 set with --threshold; 50% of the 4 held-out normal images "
                                       "score above it")
    with pytest.raises(SanfError, match="exclude each other"):
        run_threshold({"scores": {"nll": [1.0]}}, "nll", fpr=0.1, threshold=1.0)
    with pytest.raises(SanfError, match="finite"):
        explicit_threshold(float("nan"))


def test_eval_threshold_option_and_the_small_slice_note(pets_cache, tmp_path):
    out = tmp_path / "run"
    r = run("fit", "--cache", pets_cache, "--normal-class", "cat", "--out", out, "--epochs", "1", *FAST_FIT)
    assert r.exit_code == 0, r.output
    assert "note: 4 held-out normal images cannot bound FPR 0.01" in r.stdout
    r = run("eval", "--run", out, "--no-maps", "--device", "cpu")
    assert r.exit_code == 0, r.output
    assert "note: 4 held-out normal images cannot bound FPR 0.01" in r.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert "1/(n+1) = 0.2" in m["threshold"]["note"]
    r = run("eval", "--run", out, "--no-maps", "--device", "cpu", "--threshold", "1.5", "--out", tmp_path / "e")
    assert r.exit_code == 0, r.output
    assert "threshold 1.5 set with --threshold" in r.stdout
    m = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert m["threshold"]["explicit"] and m["threshold"]["value"] == 1.5
    scores = np.array([float(line.split(",")[-1]) for line in
                       (tmp_path / "e" / "scores.csv").read_text().splitlines()[1:]])
    assert m["threshold"]["realised"]["n_flagged"] == int((scores > 1.5).sum())
    report = (tmp_path / "e" / "report.md").read_text()
    assert "set with --threshold" in report and "combined.py" not in report and ".py)" not in report
    assert_user_error(run("eval", "--run", out, "--threshold", "1", "--fpr", "0.1"), "exclude each other")


def test_score_and_export_take_a_threshold(tiny_run, folder_dataset, tmp_path):
    doc = tmp_path / "s.json"
    r = run("score", "--run", tiny_run, folder_dataset / "test" / "a", "--threshold", "-1e9", "--json", doc,
            "--num-workers", "0", "--quiet")
    assert r.exit_code == 0, r.output
    res = json.loads(doc.read_text())
    assert res["threshold"]["explicit"] and res["threshold"]["value"] == -1e9
    assert res["n_flagged"] == res["n_scored"] == 5
    assert "set with --threshold" in r.output
    assert_user_error(run("score", "--run", tiny_run, folder_dataset / "test" / "a", "--threshold", "1", "--fpr",
                          "0.1"), "exclude each other")
    out = tmp_path / "m.pt"
    r = run("export", "--run", tiny_run, "--format", "torchscript", "--out", out, "--threshold", "7.5")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "m.pt.json").read_text())["threshold"]["value"] == 7.5


def test_plots_mark_the_threshold(tmp_path, monkeypatch):
    from sanf_pipeline.evaluate import report

    figures = []
    real = report._figure

    def figure(*a, **kw):
        figures.append(real(*a, **kw))
        return figures[-1]

    monkeypatch.setattr(report, "_figure", figure)
    y = np.array([False] * 10 + [True] * 10)
    s = np.concatenate([np.linspace(0, 1, 10), np.linspace(0.8, 2, 10)])
    metrics = {"score": "nll", "auroc": 0.9, "threshold": {"value": 0.95, "realised": {"fpr": 0.1, "tpr": 0.9}}}
    report.write_plots(tmp_path, y, s, metrics)
    hist, roc = (f.axes[0] for f in figures)
    assert any(list(line.get_xdata()) == [0.95, 0.95] and "threshold" in line.get_label() for line in hist.lines)
    assert any(list(line.get_xdata()) == [0.1] and list(line.get_ydata()) == [0.9] for line in roc.lines)
    figures.clear()
    report.write_plots(tmp_path, y, s, {"score": "nll", "auroc": 0.9, "threshold": None})
    assert not any("threshold" in line.get_label() for f in figures for line in f.axes[0].lines)


# --------------------------------------------------------------------------------------------- item 6: the demo
def test_demo_leads_with_sanfs_detector_and_says_what_each_column_is(tmp_path, monkeypatch):
    import sanf_pipeline.extract.job as job
    import sanf_pipeline.sweep as sweep_pkg
    from sanf_pipeline.cli.demo import DemoResult

    classes = [{"index": i, "name": str(i)} for i in range(2)]
    summary = {"settings": ["flow", "knn-l2", "gaussian"], "classes": classes,
               "cells": {s: {c["name"]: {"auroc_mean": v} for c in classes}
                         for s, v in (("flow", 0.9), ("knn-l2", 0.8), ("gaussian", 0.95))},
               "m_auroc": {s: {"mean": v} for s, v in (("flow", 0.9), ("knn-l2", 0.8), ("gaussian", 0.95))},
               "runs": [{"method": "flow", "status": "finished", "run_id": "0-flow-s0"}]}
    run_dir = tmp_path / "sweep" / "runs" / "0-flow-s0"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text(json.dumps({"score": "combined"}))
    order = []
    monkeypatch.setattr(job, "extract", lambda cfg: order.append("extract"))

    class Swept:
        pass

    def fake_sweep(*a, **kw):
        order.append("sweep")
        res = Swept()
        res.summary = summary
        return res

    monkeypatch.setattr(sweep_pkg, "run_sweep", fake_sweep)
    r = run("demo", "--out", tmp_path)
    assert r.exit_code == 0, r.output
    err = r.stderr.splitlines()
    assert err[0].startswith("sanf demo: loading torch") and any(line.startswith("step 1/2") for line in err)
    assert any(line.startswith("step 2/2") for line in err) and order == ["extract", "sweep"]
    table = [line for line in r.stdout.splitlines() if line.startswith("|")]
    assert table[0] == "| normal digit | sanf | knn-l2 | gaussian |"  # sanf's own detector first, not by rank
    assert "| mean (M-AUROC) | 0.9000 | 0.8000 | 0.9500 |" in r.stdout
    assert "sanf's default detector" in r.stdout and "the combined score" in r.stdout
    assert "patch part" in r.stdout and "baseline `sanf baseline --method gaussian`" in r.stdout
    assert "![" not in r.stdout
    assert DemoResult(tmp_path, tmp_path, {}).table == ""  # built without a table: summary.md stands in


# ------------------------------------------------------------------------------------------ item 7: user text
def test_baseline_help_shows_the_patch_knn_numbers():
    from sanf_pipeline.cli.main import PATCH_KNN_CORESET, PATCH_KNN_NEIGHBOURHOOD
    from sanf_pipeline.models import patchknn

    assert (PATCH_KNN_CORESET, PATCH_KNN_NEIGHBOURHOOD) == (patchknn.DEFAULT_CORESET, patchknn.DEFAULT_NEIGHBOURHOOD)
    text = " ".join(run("baseline", "--help").output.split())
    assert "patchknn." not in text and "DEFAULT_" not in text
    assert "coreset [default: 0.1]" in text and "(odd; 1 = off) [default: 3]" in text


def test_cache_info_of_an_unfinished_cache(tmp_path):
    from conftest import hand_spec, write_hand_shards

    from sanf_pipeline.cache import CacheWriter

    path = tmp_path / "part"
    writer = CacheWriter(path, hand_spec(shard_size=4))
    try:
        jobs = writer.open()
        write_hand_shards(writer, [j for j in jobs if j.split == "train"][:2])  # rows 0-7 of 15, row 1 unreadable
    finally:
        writer.close()
    r = run("cache", "info", path)
    assert r.exit_code == 0, r.output
    assert "None valid" not in r.stdout
    assert "split      train: 15 samples (8 extracted so far, 7 of them valid), 4 shards, 2/4 shards done" in r.stdout
    assert "skipped    1 files so far" in r.stdout


@pytest.mark.parametrize("args, fragment", [
    (["fit"], "missing option '--cache' (see `sanf fit --help`)"),
    (["fitt"], "no such command 'fitt'"),
    (["--bogus"], "no such option '--bogus'"),
    (["eval", "--run", "x", "--fpr", "abc"], "invalid value for '--fpr': 'abc' is not a valid float"),
    (["cache", "info"], "missing argument 'PATH' (see `sanf cache info --help`)"),
])
def test_click_usage_errors_look_like_sanf_errors(args, fragment):
    r = CliRunner().invoke(cli, args, prog_name="sanf")
    assert_user_error(r, fragment)
    assert "Usage:" not in r.output and "Error:" not in r.output


def test_skipped_images_are_listed_on_stderr(capsys):
    from sanf_pipeline.cli.main import echo_skipped

    echo_skipped([{"sample_id": f"train/a/{i:02d}.png", "reason": "truncated"} for i in range(25)], "the metadata")
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "skipped train/a/00.png: truncated" and err[19] == "skipped train/a/19.png: truncated"
    assert err[20] == "... and 5 more skipped" and err[21].startswith("skipped 25 unreadable image(s) in all")


def test_extract_prints_each_skipped_image(make_folder_dataset, tmp_path):
    data = make_folder_dataset(n_train=4, n_test=2)
    (data / "train" / "a" / "001.png").write_bytes(b"not a png")
    (data / "test" / "b" / "000.png").write_bytes(b"")
    r = run(*extract_args(data, tmp_path / "cache"))
    assert r.exit_code == 0, r.output
    skipped = [line for line in r.stderr.splitlines() if line.startswith("skipped ") and ": " in line]
    assert {line.split(":")[0] for line in skipped} >= {"skipped train/a/001.png", "skipped test/b/000.png"}


# ------------------------------------------------------------------------------- item 8: --help without torch
_HELP_WITHOUT_TORCH = r"""
import sys
from click.testing import CliRunner
from sanf_pipeline.cli.main import cli

def commands(group, path=()):
    for name, cmd in group.commands.items():
        yield (*path, name)
        if hasattr(cmd, "commands"):
            yield from commands(cmd, (*path, name))

seen = []
for path in [(), *commands(cli)]:
    r = CliRunner().invoke(cli, [*path, "--help"])
    assert r.exit_code == 0, (path, r.output)
    heavy = [m for m in ("torch", "timm") if m in sys.modules]
    assert not heavy, f"`sanf {' '.join(path)} --help` imported {heavy}"
    seen.append(" ".join(path))
for path in [("fit",), ("eval",), ("baseline",), ("sweep",), ("score",), ("export",), ("extract",),
             ("eval", "--run", "x", "--threshold", "nan"), ("fit", "--fusion")]:
    r = CliRunner().invoke(cli, list(path))
    assert r.exit_code == 2, (path, r.output)
    heavy = [m for m in ("torch", "timm") if m in sys.modules]
    assert not heavy, f"`sanf {' '.join(path)}` imported {heavy} before failing"
print("ok", len(seen), "|".join(seen))
"""


def test_every_help_and_usage_error_answers_without_torch():
    r = subprocess.run([sys.executable, "-c", _HELP_WITHOUT_TORCH], capture_output=True, text=True, env=sub_env(),
                       cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("ok "), (r.stdout, r.stderr)
    assert {"fit", "eval", "baseline", "sweep", "score", "export", "serve", "cache info"} <= set(
        r.stdout.split(" ", 2)[2].strip().split("|"))
