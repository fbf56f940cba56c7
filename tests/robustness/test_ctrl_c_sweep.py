"""Ctrl-C (SIGINT) to a `sanf sweep` whose pool workers are busy: the sweep stops its workers instead of waiting for
their runs, prints one line saying how many runs are kept, exits 130, and the same command finishes the sweep.

Deterministic: each worker pauses at the start of its second run (an injection point it inherits when forked), the
test waits until both have, and only the parent gets the SIGINT, as when a sweep is signalled by pid; before the fix
the parent waited for the paused workers (until the pause expired) and said nothing.
"""

from __future__ import annotations

import signal
import time

import pytest
from robust_helpers import fork_server, pause_at, process_gone, sanf, start_sanf  # noqa: F401 (fixtures)

pytestmark = pytest.mark.usefixtures("one_torch_thread", "fork_server")  # tests/conftest.py, robust_helpers.py


def test_sigint_stops_pool_workers_and_says_what_is_kept(pets_cache, tmp_path):
    out = tmp_path / "sweep"
    args = ["sweep", "--cache", str(pets_cache), "--out", str(out), "--grid", "fusion=none,semantic", "--methods",
            "flow", "--seeds", "0", "--set", "hidden=16", "--set", "blocks=2", "--set", "epochs=1", "--set",
            "early_stopping=false", "--set", "batch_size=16", "--device", "cpu", "--no-plots", "--quiet"]
    proc = start_sanf([*args, "--workers", "2"], point=pause_at("sanf_pipeline.sweep.executors:execute_run", at=2))
    # both workers paused at their second run, so exactly their first runs are finished whatever the load: the
    # other worker cannot be finishing a run while the parent counts them
    worker = proc.wait_paused(count=2)
    assert worker != proc.pid
    proc.send_signal(signal.SIGINT)
    rc = proc.wait(timeout=60)  # the paused worker would hold the sweep for minutes if it were waited for
    _, err = proc.output()
    assert rc == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("interrupted; ") and "Traceback" not in err, err
    assert "of 6 run(s) finished and kept in" in lines[0] and "rerun the same command to resume" in lines[0]
    end = time.monotonic() + 30
    while not process_gone(worker) and time.monotonic() < end:
        time.sleep(0.01)
    assert process_gone(worker), "a pool worker outlived the interrupted sweep"
    done = len(list(out.glob("runs/*/metrics.json")))  # each worker's first run, counted on disk by the sweep too
    assert done == 2 and lines[0].startswith("interrupted; 2 of 6"), lines[0]

    r = sanf(*args, "--workers", "1")
    assert r.exit_code == 0, (r.output, r.exception)
    assert f"{6 - done} run(s) computed" in r.output and f"{done} already finished" in r.output
