"""Shared helpers and fixtures of the fault-injection tests (not a conftest.py: tests/conftest.py owns that name
for `from conftest import ...`): a small synthetic cache, the fit command, a finished tiny run, and `sanf` in a
separate process (:func:`start_sanf`), optionally with an injection point: :func:`run_killed_at` SIGKILLs it at an
exact point of its code, :func:`pause_at` stops it there until the test signals it."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import pytest
import sanf_proc
from click.testing import CliRunner
from conftest import TINY_FLOW, sub_env

from sanf_pipeline.cli.main import cli

EPOCHS = 6
TINY_FIT = {**TINY_FLOW, "early_stopping": False, "epochs": 2}
SANF_PROC = Path(sanf_proc.__file__)
NO_FORK_SERVER_ENV = "SANF_TEST_NO_FORK_SERVER"  # set (to anything) to start every process afresh


def sanf(*args):
    """Run the CLI in this process; returns click's Result (stdout and stderr apart)."""
    return CliRunner().invoke(cli, [str(a) for a in args])


def fit_args(cache, out) -> list[str]:
    # a checkpoint after every epoch (the default waits 60 s between them): these tests kill and fail the writes
    # of each epoch's checkpoint
    return ["fit", "--cache", str(cache), "--normal-class", "class0", "--out", str(out), "--hidden", "16",
            "--epochs", str(EPOCHS), "--device", "cpu", "--quiet", "--checkpoint-every", "0"]


def log_lines(run_dir) -> int:
    try:
        return sum(1 for line in (Path(run_dir) / "train_log.jsonl").read_text().splitlines() if line.strip())
    except OSError:
        return 0


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
    from sanf_pipeline.jobs.api import fit_run
    from sanf_pipeline.train.config import FitConfig

    return fit_run(pets_cache, "cat", FitConfig(**TINY_FIT), tmp_path_factory.mktemp("r") / "run", quiet=True).run_dir


# ------------------------------------------------------------------------------------------ injection points
def process_gone(pid: int) -> bool:
    """Whether process ``pid`` has exited (a zombie counts: it has exited, only its parent has not reaped it)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


def kill_at(target: str, at: int = 1, when: str = "before", match: str | None = None) -> dict:
    """SIGKILL right ``before`` or ``after`` the ``at``-th call of ``target`` (``"module:attribute.path"``) whose
    arguments' repr contains ``match`` (every call counts when None); see sanf_proc.install_point."""
    assert when in ("before", "after")
    return {"target": target, "at": at, "when": when, "match": match, "action": "kill"}


def pause_at(target: str, at: int = 1, when: str = "before", match: str | None = None) -> dict:
    """Like :func:`kill_at`, but the process waits there (:meth:`SanfProcess.wait_paused`) until the test signals
    it: what the process has written at that moment is exactly what the case means, whatever the load."""
    return {**kill_at(target, at, when, match), "action": "pause"}


def in_epoch(n: int) -> dict:
    """Epoch ``n`` of `sanf fit` has begun, no step taken: epoch n-1's checkpoint and log are in place."""
    return pause_at("sanf_pipeline.train.fit:_train_epoch", at=n, when="before")


# ------------------------------------------------------------------------------------------ `sanf` processes
_WORK = Path(tempfile.mkdtemp(prefix="sanf-procs-"))
atexit.register(shutil.rmtree, _WORK, ignore_errors=True)


class SanfProcess:
    """A running ``python -m sanf_pipeline ARGS...``: a child of the fork server, or a subprocess (the fallback).
    Its stdout and stderr go to files (no pipe to fill up while the test waits for it)."""

    def __init__(self, files: Path):
        self.files = files
        self.ready = files / "ready"  # where a process paused at the injection point says so (sanf_proc._pause)
        self.returncode: int | None = None
        self.pid = 0

    def send_signal(self, sig: int) -> None:
        if self.returncode is None:  # unreaped until then: the pid is still this process's (or its zombie's)
            os.kill(self.pid, sig)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def poll(self) -> int | None:
        raise NotImplementedError

    def wait(self, timeout: float) -> int:
        """The exit status (``-N``: killed by signal N); past ``timeout`` seconds the process is SIGKILLed and
        ``subprocess.TimeoutExpired`` raised."""
        raise NotImplementedError

    def output(self) -> tuple[str, str]:
        """(stdout, stderr) so far."""
        return tuple((self.files / name).read_text(errors="replace") for name in ("stdout", "stderr"))

    def wait_paused(self, timeout: float = 180.0, count: int = 1) -> int:
        """Until ``count`` processes stop at the injection point (this one, or processes it forked); returns the pid
        of one of them. Fails if this process exits first or they do not all pause within ``timeout`` seconds."""
        end = time.monotonic() + timeout
        while True:
            paused = sorted(self.ready.glob("[0-9]*"))
            if len(paused) >= count:
                return int(paused[0].name)
            if self.poll() is not None:
                pytest.fail(f"`sanf` exited (rc {self.returncode}) before reaching the injection point:\n"
                            f"{self.output()[1][-3000:]}")
            if time.monotonic() > end:
                self.kill()
                self.wait(60)
                pytest.fail(f"`sanf` did not reach the injection point within {timeout:.0f} s:\n"
                            f"{self.output()[1][-3000:]}")
            time.sleep(0.01)


class _Spawned(SanfProcess):
    def __init__(self, files: Path, argv: list[str], env: dict, point: dict | None):
        super().__init__(files)
        if point is not None:
            env = {**env, sanf_proc.POINT_ENV: json.dumps(point)}
        with open(files / "stdout", "wb") as out, open(files / "stderr", "wb") as err:
            self.popen = subprocess.Popen([sys.executable, str(SANF_PROC), "run", *argv], env=env,
                                          stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        self.pid = self.popen.pid

    def poll(self) -> int | None:
        self.returncode = self.popen.poll()
        return self.returncode

    def wait(self, timeout: float) -> int:
        try:
            self.returncode = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.returncode = self.popen.wait()
            raise
        return self.returncode


class _Forked(SanfProcess):
    def __init__(self, files: Path, server: _ForkServer, pid: int):
        super().__init__(files)
        self.server, self.pid = server, pid

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.request({"op": "poll", "pid": self.pid})["returncode"]
        return self.returncode

    def wait(self, timeout: float) -> int:
        if self.returncode is None:
            reply, in_time = self.server.wait(self.pid, timeout)
            self.returncode = reply["returncode"]
            if not in_time:
                raise subprocess.TimeoutExpired(f"sanf (pid {self.pid})", timeout)
        return self.returncode


class _ServerGone(RuntimeError):
    pass


# environment variables read when a process starts (a fork inherits the server's reading of them): a request whose
# values differ starts a fresh process instead. Not all of the environment: torch sets KMP_* and TORCHINDUCTOR_* for
# itself when imported, so this process's environment gains them only after some test imported that part of torch.
_STARTUP_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "LD_PRELOAD",
                 "LD_LIBRARY_PATH")


def _startup_env(env: dict) -> dict:
    return {k: v for k, v in env.items() if k.startswith("PYTHON") or k in _STARTUP_VARS}


class _ForkServer:
    """``python sanf_proc.py serve``: one per test session, started on first use, ended with the session."""

    START_TIMEOUT_S = 600.0  # it imports torch, timm, sklearn and sanf_pipeline: tens of seconds on loaded cores

    def __init__(self):
        self.env = sub_env()
        self.lock = threading.Lock()
        self.buf = b""
        req_r, self.req_w = os.pipe()
        self.resp_r, resp_w = os.pipe()
        with open(_WORK / "server.log", "wb") as log:
            self.proc = subprocess.Popen([sys.executable, str(SANF_PROC), "serve", str(req_r), str(resp_w)],
                                         pass_fds=(req_r, resp_w), env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT)
        os.close(req_r)
        os.close(resp_w)
        self.started = False

    def _read(self, timeout: float | None) -> dict | None:
        """The next reply, or None when ``timeout`` passed first."""
        import select

        end = None if timeout is None else time.monotonic() + timeout
        while b"\n" not in self.buf:
            left = None if end is None else max(0.0, end - time.monotonic())
            if not select.select([self.resp_r], [], [], left)[0]:
                return None
            chunk = os.read(self.resp_r, 65536)
            if not chunk:
                raise _ServerGone(f"the fork server ended (rc {self.proc.wait()}):\n{self.log()}")
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        reply = json.loads(line)
        if "error" in reply:
            raise _ServerGone(f"fork server: {reply['error']}\n{self.log()}")
        return reply

    def _send(self, msg: dict) -> None:
        data = (json.dumps(msg) + "\n").encode()
        try:
            while data:
                data = data[os.write(self.req_w, data):]
        except BrokenPipeError:
            raise _ServerGone(f"the fork server ended (rc {self.proc.wait()}):\n{self.log()}") from None

    def log(self) -> str:
        return (_WORK / "server.log").read_text(errors="replace")[-3000:]

    def wait_started(self) -> None:
        if not self.started:
            if self._read(self.START_TIMEOUT_S) is None:
                raise _ServerGone(f"the fork server did not start within {self.START_TIMEOUT_S:.0f} s")
            self.started = True

    def request(self, msg: dict) -> dict:
        with self.lock:
            self.wait_started()
            self._send(msg)
            return self._read(None)

    def wait(self, pid: int, timeout: float) -> tuple[dict, bool]:
        """(the reply to "wait", whether the process ended within ``timeout`` s; if not, it was SIGKILLed)."""
        with self.lock:
            self.wait_started()
            self._send({"op": "wait", "pid": pid})
            reply = self._read(timeout)
            if reply is not None:
                return reply, True
            os.kill(pid, signal.SIGKILL)  # not reaped yet: still that process
            return self._read(None), False

    def close(self) -> None:
        os.close(self.req_w)  # the server reads end-of-file and exits
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self.resp_r)


_server: _ForkServer | None = None
_server_failed: str | None = None


def start_fork_server() -> None:
    """Start the fork server if it is not running yet (returns at once; it warms up while the test goes on)."""
    global _server, _server_failed
    if _server is not None or _server_failed is not None:
        return
    if os.environ.get(NO_FORK_SERVER_ENV):
        _server_failed = f"${NO_FORK_SERVER_ENV} is set"
        return
    try:
        _server = _ForkServer()
    except OSError as exc:
        _server_failed = f"{type(exc).__name__}: {exc}"
        return
    atexit.register(_server.close)


def _give_up_fork_server(why: str) -> None:
    global _server, _server_failed
    warnings.warn(f"the fork server is not available, every `sanf` process starts afresh (slow): {why}",
                  stacklevel=3)
    _server_failed = why
    if _server is not None:
        _server.proc.kill()
        _server = None


@pytest.fixture(scope="module")
def fork_server():
    """Starts the fork server early, and meanwhile imports here what the in-process reruns import: on two cores
    both warm up at once."""
    start_fork_server()
    sanf_proc.preload()


def start_sanf(args, *, point: dict | None = None, env: dict | None = None, cwd=None) -> SanfProcess:
    """``python -m sanf_pipeline *args`` in its own process (one torch thread: ``sub_env()``) with the injection
    point ``point`` (:func:`kill_at`, :func:`pause_at`): a child forked by the fork server when its environment
    allows, else a fresh interpreter."""
    argv = [str(a) for a in args]
    env = sub_env() if env is None else env
    cwd = str(cwd or os.getcwd())
    files = Path(tempfile.mkdtemp(dir=_WORK))
    if point is not None:
        point = {**point, "ready": str(files / "ready")}
    start_fork_server()
    if _server is not None and _startup_env(env) != _startup_env(_server.env):
        warnings.warn("this `sanf` process starts afresh (slow): its environment differs from the fork server's in "
                      f"{sorted(set(_startup_env(env).items()) ^ set(_startup_env(_server.env).items()))}",
                      stacklevel=2)
    elif _server is not None:
        try:
            reply = _server.request({"op": "spawn", "argv": argv, "cwd": cwd, "env": env, "point": point,
                                     "stdout": str(files / "stdout"), "stderr": str(files / "stderr")})
            return _Forked(files, _server, reply["pid"])
        except _ServerGone as exc:
            _give_up_fork_server(str(exc))
    return _Spawned(files, argv, env, point)


def run_killed_at(args, *, target: str, at: int = 1, when: str = "before", match: str | None = None,
                  expect_rc: int = -signal.SIGKILL, timeout: float = 300) -> str:
    """Run ``python -m sanf_pipeline *args`` in its own process that SIGKILLs itself (whichever thread gets
    there) at :func:`kill_at` ``(target, at, when, match)``. Fails unless the process died of that SIGKILL (the
    point was reached), or exited with ``expect_rc`` (e.g. 2 when a forked worker process is the one killed);
    returns its output."""
    proc = start_sanf(args, point=kill_at(target, at, when, match))
    rc = proc.wait(timeout)
    out, err = proc.output()
    if rc != expect_rc:
        pytest.fail(f"the kill point {when} call {at} of {target} (match {match!r}) was not reached: rc {rc}\n"
                    f"{(out + err)[-3000:]}")
    return out + err
