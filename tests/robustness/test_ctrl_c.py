"""Ctrl-C (SIGINT) to a running `sanf fit`: one line saying "interrupted", exit 130, no traceback, rerun finishes."""

from __future__ import annotations

import signal

import pytest
from robust_helpers import (  # noqa: F401 (fixtures)
    EPOCHS,
    fit_args,
    log_lines,
    sanf,
    small_cache_fixture,
    start_fit,
    wait_for_epochs,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.mark.parametrize("after_epochs", [2])
def test_sigint_stops_cleanly_and_rerun_finishes(small_cache, tmp_path, after_epochs):
    out = tmp_path / "run"
    proc = start_fit(small_cache, out)
    wait_for_epochs(proc, out, after_epochs)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    hits = [line for line in lines if "interrupted" in line]
    assert len(hits) == 1, err
    assert log_lines(out) < EPOCHS
    assert not (out / "model.safetensors").exists(), "an interrupted fit must not leave a model a later run trusts"

    res = sanf(*fit_args(small_cache, out))
    assert res.exit_code == 0, (res.output, res.exception)
    assert (out / "model.safetensors").is_file()
    assert log_lines(out) == EPOCHS
