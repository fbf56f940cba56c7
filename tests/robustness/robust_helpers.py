"""Shared helpers and fixtures of the fault-injection tests (not a conftest.py: tests/conftest.py owns that name
for `from conftest import ...`): a small synthetic cache, the fit command, a finished tiny run, subprocess helpers,
and :func:`run_killed_at`, which SIGKILLs a `sanf` command at an exact point of its code."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import TINY_FLOW, sub_env

from sanf_pipeline.cli import cli

EPOCHS = 6
TINY_FIT = {**TINY_FLOW, "early_stopping": False, "epochs": 2}


def sanf(*args):
    """Run the CLI in this process; returns click's Result (stdout and stderr apart)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def fit_args(cache, out) -> list[str]:
    # a checkpoint after every epoch (the default waits 60 s between them): these tests kill and fail the writes
    # of each epoch's checkpoint
    return ["fit", "--cache", str(cache), "--normal-class", "class0", "--out", str(out), "--hidden", "16",
            "--epochs", str(EPOCHS), "--device", "cpu", "--quiet", "--checkpoint-every", "0"]


def start_fit(cache, out) -> subprocess.Popen:
    """``python -m sanf_pipeline fit ...`` in a subprocess (one torch thread), stderr captured."""
    return subprocess.Popen([sys.executable, "-m", "sanf_pipeline", *fit_args(cache, out)], env=sub_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def log_lines(run_dir) -> int:
    try:
        return sum(1 for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


def wait_for_epochs(proc: subprocess.Popen, run_dir, n: int, timeout: float = 60.0) -> None:
    """Poll until ``run_dir/train_log.jsonl`` holds at least ``n`` epochs (the process must still run)."""
    end = time.monotonic() + timeout
    while log_lines(run_dir) < n:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"fit ended (rc {proc.returncode}) before epoch {n}: {err[-2000:]}")
        if time.monotonic() > end:
            proc.kill()
            proc.communicate()
            pytest.fail(f"fit did not reach epoch {n} within {timeout}s")
        time.sleep(0.005)


def read_metrics(run_dir) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="session", name="small_cache")
def small_cache_fixture(tmp_path_factory) -> Path:
    """A synthetic cache (d=16, T=4, 3 classes, 150 train rows per class) so one epoch takes a noticeable moment."""
    from sanf_pipeline.cache.synthetic import write_synthetic_cache

    return write_synthetic_cache(tmp_path_factory.mktemp("robust") / "cache", n_train=150, n_test=20, dim=16,
                                 separation=0.3, num_tokens=4)


@pytest.fixture(scope="module", name="tiny_run")
def tiny_run_fixture(pets_cache, tmp_path_factory) -> Path:
    """A finished (not evaluated) tiny flow run of class cat of ``pets_cache`` (tests/conftest.py)."""
    from sanf_pipeline.jobs import fit_run
    from sanf_pipeline.train import FitConfig

    return fit_run(pets_cache, "cat", FitConfig(**TINY_FIT), tmp_path_factory.mktemp("r") / "run", quiet=True).run_dir


# ------------------------------------------------------------------------------------- SIGKILL at a point
_KILL_AT = r"""
import importlib, json, os, runpy, signal, sys, threading

point = json.loads(os.environ["SANF_TEST_KILL_AT"])
module_name, _, attr = point["target"].partition(":")
*owner_path, name = attr.split(".")
owner = importlib.import_module(module_name)
for part in owner_path:
    owner = getattr(owner, part)
real = getattr(owner, name)
calls = 0
lock = threading.Lock()  # the background shard writer and the main thread may both call the target


def killed(*args, **kwargs):
    global calls
    hit = False
    if point["match"] is None or point["match"] in repr(args) + repr(kwargs):
        with lock:
            calls += 1
            hit = calls == point["at"]
    if hit and point["when"] == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    out = real(*args, **kwargs)
    if hit and point["when"] == "after":
        os.kill(os.getpid(), signal.SIGKILL)
    return out


setattr(owner, name, killed)
runpy.run_module("sanf_pipeline", run_name="__main__", alter_sys=True)
"""


def run_killed_at(args, *, target: str, at: int = 1, when: str = "before", match: str | None = None,
                  expect_rc: int = -signal.SIGKILL, timeout: float = 300) -> str:
    """Run ``python -m sanf_pipeline *args`` in a subprocess that SIGKILLs itself (whichever thread gets there)
    right ``before`` or ``after`` the ``at``-th call of ``target`` (``"module:attribute.path"``) whose arguments'
    repr contains ``match`` (every call counts when None). Fails unless the process died of that SIGKILL (the
    point was reached), or exited with ``expect_rc`` (e.g. 2 when a forked worker process is the one killed);
    returns its output."""
    assert when in ("before", "after")
    env = dict(sub_env(), SANF_TEST_KILL_AT=json.dumps({"target": target, "at": at, "when": when, "match": match}))
    proc = subprocess.run([sys.executable, "-c", _KILL_AT, *map(str, args)], env=env, capture_output=True, text=True,
                          timeout=timeout)
    output = proc.stdout + proc.stderr
    if proc.returncode != expect_rc:
        pytest.fail(f"the kill point {when} call {at} of {target} (match {match!r}) was not reached: rc "
                    f"{proc.returncode}\n{output[-3000:]}")
    return output
