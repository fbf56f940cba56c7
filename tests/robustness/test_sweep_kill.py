"""SIGKILL a running `sanf sweep` at exact points: while writing its plan, after one and after three finished runs,
in the middle of a flow fit (a checkpoint half written; a checkpoint written but not its log), after a run's model
was saved but before its results, while writing a run's results, while writing the summary; also a pool worker
killed, and the whole sweep killed from outside while pool workers run. Rerunning the same command must keep the
finished runs, compute only the others, leave no temporary file, and write the summary an uninterrupted sweep
writes. Tiny flows on a synthetic cache: each case takes seconds."""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest
from robust_helpers import fork_server, pause_at, process_gone, run_killed_at, sanf, start_sanf  # noqa: F401 (fixtures)

from sanf_pipeline.sweep import SUMMARY_CSV, SUMMARY_JSON, SUMMARY_MD, run_sweep, summarize

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fork_server")  # tests/conftest.py, robust_helpers.py

EPOCHS = 3
N_RUNS = 9  # 3 classes x (flow fusion=none, flow fusion=semantic, knn), in this order per class
SUMMARY = (SUMMARY_CSV, SUMMARY_JSON, SUMMARY_MD)


def sweep_args(cache, out, *extra) -> list[str]:
    return ["sweep", "--cache", str(cache), "--out", str(out), "--grid", "fusion=none,semantic", "--methods",
            "flow,knn", "--seeds", "0", "--set", "hidden=16", "--set", "blocks=2", "--set", f"epochs={EPOCHS}",
            "--set", "early_stopping=false", "--set", "batch_size=16", "--set", "checkpoint_every=0", "--device", "cpu",
            "--no-plots", "--quiet", *extra]


def finished(out: Path) -> dict[str, int]:
    """run id -> mtime of its metrics.json (the last file a run writes)."""
    return {p.parent.name: p.stat().st_mtime_ns for p in out.glob("runs/*/metrics.json")}


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if p.name.endswith(".tmp") or p.name == "checkpoint.safetensors"]


@pytest.fixture(scope="module")
def reference(pets_cache, tmp_path_factory) -> dict[str, bytes]:
    """summary.{csv,json,md} of the uninterrupted sweep (same folder name, so the files can be compared whole)."""
    out = tmp_path_factory.mktemp("reference") / "sweep"
    r = sanf(*sweep_args(pets_cache, out, "--workers", "1"))
    assert r.exit_code == 0, (r.output, r.exception)
    summary = summarize(out)
    assert summary["n_finished"] == N_RUNS
    aurocs = [row["auroc"] for row in summary["runs"]]
    assert len(set(aurocs)) > 3 and all(0.5 < a <= 1.0 for a in aurocs)
    return {name: (out / name).read_bytes() for name in SUMMARY}


CAT_NONE, CAT_SEMANTIC = "runs/cat-flow-fusion=none-s0", "runs/cat-flow-fusion=semantic-s0"
# target, at, when, match (see robust_helpers.run_killed_at), runs finished at the kill, paths there at the kill
KILL_POINTS = {
    "writing the plan": ("os:replace", 1, "before", "plan.json", 0, [".plan.json.*.tmp"]),
    "after the first run": ("sanf_pipeline.sweep.executors:execute_run", 1, "after", None, 1, []),
    "after three runs (the third a baseline)": ("sanf_pipeline.sweep.executors:execute_run", 3, "after", None, 3, []),
    "mid-fit, the second epoch's checkpoint half written": (
        "os:replace", 2, "before", "checkpoint.safetensors", 0,
        [f"{CAT_NONE}/checkpoint.safetensors", f"{CAT_NONE}/.checkpoint.safetensors.*.tmp"]),
    "mid-fit of the second run, a checkpoint written but not its log": (
        "sanf_pipeline.train.fit:save_tensors_atomic", EPOCHS + 2, "after", "checkpoint", 1,
        [f"{CAT_SEMANTIC}/checkpoint.safetensors", f"{CAT_SEMANTIC}/train_log.jsonl"]),
    "model saved, its results not written": (
        "sanf_pipeline.store.run_folder:save_model", 2, "after", None, 1, [f"{CAT_SEMANTIC}/model.safetensors"]),
    "writing the fourth run's results (scores written, metrics not in place)": (
        "os:replace", 4, "before", "metrics.json", 3, ["runs/dog-flow-fusion=none-s0/scores.csv"]),
    "writing the summary (csv in place, json not)": (
        "os:replace", 1, "before", "summary.json", N_RUNS, [SUMMARY_CSV, ".summary.json.*.tmp"]),
}


@pytest.mark.parametrize("target, at, when, match, done, present",
                         [pytest.param(*case, id=name) for name, case in KILL_POINTS.items()])
def test_sigkill_then_rerun_gives_the_uninterrupted_summary(pets_cache, tmp_path, reference, target, at, when,
                                                             match, done, present):
    out = tmp_path / "sweep"
    args = sweep_args(pets_cache, out, "--workers", "1")
    run_killed_at(args, target=target, at=at, when=when, match=match)
    before = finished(out)
    assert len(before) == done, f"killed with {sorted(before)} finished; not where this case means to kill"
    for pattern in present:
        assert list(out.glob(pattern)), f"{pattern} should exist at this kill point"
    if done < N_RUNS:
        assert not (out / SUMMARY_JSON).exists()

    r = sanf(*args)  # the same command again, to completion
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"{N_RUNS - done} run(s) computed" in r.output and f"{done} already finished" in r.output, r.output
    after = finished(out)
    assert {k: after[k] for k in before} == before, "a run finished before the kill was computed again"
    assert len(after) == N_RUNS
    assert not temporaries(out), "temporary files or checkpoints were left behind"
    assert {name: (out / name).read_bytes() for name in SUMMARY} == reference


def test_killed_pool_worker_is_a_one_line_error_and_rerun_resumes(pets_cache, tmp_path, reference):
    """A worker process SIGKILLed in its second run (as the OOM killer would): the sweep stops with one line, exit
    2, keeps the finished runs, and the same command finishes the sweep."""
    out = tmp_path / "sweep"
    args = sweep_args(pets_cache, out, "--workers", "2")  # 2 workers x 1 thread: forked, so the kill point carries
    output = run_killed_at(args, target="sanf_pipeline.sweep.executors:execute_run", at=2, when="before", expect_rc=2)
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "worker process died" in lines[0], output
    assert "rerun the same command" in lines[0]
    before = finished(out)
    assert 0 < len(before) < N_RUNS

    r = sanf(*sweep_args(pets_cache, out, "--workers", "1"))
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"{len(before)} already finished" in r.output
    after = finished(out)
    assert {k: after[k] for k in before} == before
    assert not temporaries(out)
    assert {name: (out / name).read_bytes() for name in SUMMARY} == reference


def test_sigkill_from_outside_with_pool_workers(pets_cache, tmp_path):
    """SIGKILL the parent once a pool worker finished a run (the workers get the parent's death signal)."""
    grid = ["fusion=none,semantic"]
    slow = ["--set", "epochs=6", "--set", "early_stopping=false", "--set", "hidden=32", "--set", "blocks=2",
            "--set", "batch_size=8"]
    out = tmp_path / "killed"
    args = ["sweep", "--cache", str(pets_cache), "--out", str(out), "--grid", *grid, "--methods", "flow", "--seeds",
            "0", "--device", "cpu", "--no-plots", "--quiet", *slow]
    # each worker (forked: it inherits the point) stops before its second run, so when the first stops one run is
    # finished and at most one more; polling for a finished run let the others finish too on a loaded machine
    proc = start_sanf([*args, "--workers", "2"], point=pause_at("sanf_pipeline.sweep.executors:execute_run", at=2))
    worker = proc.wait_paused()
    assert worker != proc.pid
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    end = time.monotonic() + 60
    while not process_gone(worker) and time.monotonic() < end:
        time.sleep(0.01)
    assert process_gone(worker), "a pool worker outlived the sweep that started it"
    done = list(out.glob("runs/*/metrics.json"))
    assert 1 <= len(done) <= 2, f"{len(done)} runs finished; each of the two workers should have stopped after one"
    mtimes = {p.parent.name: p.stat().st_mtime_ns for p in done}
    r = sanf(*args, "--workers", "2")
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"{6 - len(done)} run(s) computed" in r.output and f"{len(done)} already finished" in r.output
    assert {n: (out / "runs" / n / "metrics.json").stat().st_mtime_ns for n in mtimes} == mtimes
    assert not list(out.glob("runs/*/checkpoint.safetensors")) and not list(out.glob("runs/*/.*.tmp"))
    # the same summary as an uninterrupted sweep (in this process, one run after the other)
    fixed = [a for a in slow if a != "--set"]
    ref = run_sweep(pets_cache, tmp_path / "ref", "all", grid, "flow", "0", fixed, workers=1, threads=1, device="cpu",
                    plots=False)
    a, b = summarize(out), ref.summary
    assert a["n_finished"] == b["n_finished"] == 6
    assert [r["auroc"] for r in a["runs"]] == pytest.approx([r["auroc"] for r in b["runs"]], abs=1e-9)
    assert {k: v["mean"] for k, v in a["m_auroc"].items()} == pytest.approx(
        {k: v["mean"] for k, v in b["m_auroc"].items()}, abs=1e-9)
