"""Shared helpers and fixtures of the fault-injection tests (not a conftest.py: tests/conftest.py owns that name
for `from conftest import ...`): a small synthetic cache, the fit command, subprocess helpers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from sanf_pipeline.cli import cli

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 6


def sanf(*args):
    """Run the CLI in this process; returns click's Result (stdout and stderr apart)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def fit_args(cache, out) -> list[str]:
    return ["fit", "--cache", str(cache), "--normal-class", "class0", "--out", str(out), "--hidden", "16",
            "--epochs", str(EPOCHS), "--device", "cpu", "--quiet"]


def sub_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    return env


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
