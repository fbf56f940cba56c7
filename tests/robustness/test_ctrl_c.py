"""Ctrl-C (SIGINT) to a running `sanf fit`: one line saying "interrupted", exit 130, no traceback, rerun finishes."""

from __future__ import annotations

import signal

import pytest
from robust_helpers import (  # noqa: F401 (fixtures)
    EPOCHS,
    fit_args,
    fork_server,
    in_epoch,
    log_lines,
    sanf,
    small_cache_fixture,
    start_sanf,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fork_server")  # tests/conftest.py, robust_helpers.py


@pytest.mark.parametrize("after_epochs", [1, 2, 5])
def test_sigint_stops_cleanly_and_rerun_finishes(small_cache, tmp_path, after_epochs):
    out = tmp_path / "run"
    # the fit waits at the start of the next epoch until the signal comes: sent when the log showed the epoch, it
    # raced the fit's remaining epochs (a quarter second each) and lost under load
    proc = start_sanf(fit_args(small_cache, out), point=in_epoch(after_epochs + 1))
    proc.wait_paused()
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)
    _, err = proc.output()
    assert rc == 130, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    hits = [line for line in lines if "interrupted" in line]
    assert len(hits) == 1 and len(lines) == 1, err
    assert f"epoch {after_epochs} " in hits[0], "the line should name the epoch whose checkpoint is kept"
    assert log_lines(out) == after_epochs
    assert not (out / "model.safetensors").exists(), "an interrupted fit must not leave a model a later run trusts"

    res = sanf(*fit_args(small_cache, out))
    assert res.exit_code == 0, (res.output, res.exception)
    assert (out / "model.safetensors").is_file()
    assert log_lines(out) == EPOCHS
