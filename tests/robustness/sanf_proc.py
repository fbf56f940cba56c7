"""The child side of the fault-injection tests' `sanf` processes (the test side is robust_helpers.start_sanf).

``python sanf_proc.py run ARGS...`` is ``python -m sanf_pipeline ARGS...`` with the injection point (see
:func:`install_point`) of ``$SANF_TEST_POINT``, if any.

``python sanf_proc.py serve REQ_FD RESP_FD`` is a fork server: it imports torch, timm, sklearn and every module of
sanf_pipeline once, and warms up what a fresh interpreter pays for on first use (the first fused Adam imports
torch._dynamo), then forks one child per request; the child takes the request's working directory, environment,
stdio files and injection point and becomes that ``python -m sanf_pipeline ARGS...``. A fresh interpreter per case
spent 8-25 s (load-dependent) importing before the first line of `sanf` ran; a fork takes milliseconds.

Requests and replies are JSON lines: ``{"op": "spawn", "argv", "cwd", "env", "stdout", "stderr", "point"}`` ->
``{"pid"}``; ``{"op": "wait", "pid"}`` -> ``{"returncode"}`` (as subprocess reports it: ``-N`` for signal N);
``{"op": "poll", "pid"}`` -> ``{"returncode"}`` or ``{"returncode": null}`` while it runs. A child is reaped only
when the test asks, so its pid cannot be reused while the test may still signal it.

Only the standard library is imported at module level: the ``run`` path must import the rest in the order
`python -m sanf_pipeline` does.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import runpy
import signal
import sys
import threading
import time
from pathlib import Path

POINT_ENV = "SANF_TEST_POINT"
PAUSE_LIMIT_S = 300.0  # a paused child nobody signals (a test that failed in between) ends itself
PAUSE_EXPIRED = 97

# imported before the first fork; sanf_pipeline's own modules are all imported too (pkgutil walk)
PRELOAD = ("torch", "torch._dynamo", "timm", "sklearn.metrics", "sklearn.covariance", "safetensors.torch", "zarr",
           "h5py", "PIL.Image", "click", "rich")


# ------------------------------------------------------------------------------------------ injection points
def install_point(point: dict) -> None:
    """Act right ``before`` or ``after`` the ``at``-th call of ``target`` (``"module:attribute.path"``) whose
    arguments' repr contains ``match`` (every call counts when None). ``action`` "kill": SIGKILL this process
    (whichever thread gets there); "pause": create ``ready/<pid>`` and wait there until a signal ends the process or
    raises (SIGINT: KeyboardInterrupt at exactly that point of the code). Processes forked later (pool workers)
    inherit the point, each with its own count."""
    module_name, _, attr = point["target"].partition(":")
    *owner_path, name = attr.split(".")
    owner = importlib.import_module(module_name)
    for part in owner_path:
        owner = getattr(owner, part)
    real = getattr(owner, name)
    calls = 0
    lock = threading.Lock()  # the background shard writer and the main thread may both call the target

    def act() -> None:
        if point["action"] == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        _pause(Path(point["ready"]))

    def hooked(*args, **kwargs):
        nonlocal calls
        hit = False
        if point["match"] is None or point["match"] in repr(args) + repr(kwargs):
            with lock:
                calls += 1
                hit = calls == point["at"]
        if hit and point["when"] == "before":
            act()
        out = real(*args, **kwargs)
        if hit and point["when"] == "after":
            act()
        return out

    setattr(owner, name, hooked)


def _pause(ready: Path) -> None:
    # renamed into place: the test never sees a half-created marker, and reads the state only once it exists
    ready.mkdir(parents=True, exist_ok=True)
    tmp = ready / f".{os.getpid()}.tmp"
    tmp.write_text("")
    os.replace(tmp, ready / str(os.getpid()))
    end = time.monotonic() + PAUSE_LIMIT_S
    while time.monotonic() < end:
        # a signal interrupts the sleep; one that lands between two sleeps has its handler run before the next
        time.sleep(0.05)
    print(f"sanf_proc: paused {PAUSE_LIMIT_S:.0f} s at the injection point and nobody signalled", file=sys.stderr)
    os._exit(PAUSE_EXPIRED)


# ----------------------------------------------------------------------------------------- becoming `sanf`
def _prepare(point: dict | None) -> None:
    # what an interactive shell gives a foreground command: a test run as a background job (`pytest &`, as load
    # tests and CI runners do) inherits SIGINT ignored, and Python then never installs its Ctrl-C handler; that is
    # how the Ctrl-C test once saw a fit finish (exit 0) although SIGINT had been sent
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.path[0] = os.getcwd()  # as `python -m` has it
    if point is not None:
        install_point(point)


def _run_sanf(argv: list[str]) -> None:
    sys.argv = [sys.argv[0], *argv]
    runpy.run_module("sanf_pipeline", run_name="__main__", alter_sys=True)


# ------------------------------------------------------------------------------------------------ fork server
def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def preload() -> None:
    """Import what `sanf` commands import and construct a fused Adam once (its first construction imports
    torch._dynamo); torch's default generator is left as it was."""
    import pkgutil

    for name in PRELOAD:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    import sanf_pipeline

    # a module that does not import now (being edited, an optional dependency missing) fails the same way in the
    # child as in a fresh interpreter, so it is left out here and not an error
    for info in pkgutil.walk_packages(sanf_pipeline.__path__, "sanf_pipeline.", onerror=lambda name: None):
        if not info.name.endswith("__main__"):
            with contextlib.suppress(Exception):
                importlib.import_module(info.name)
    import torch

    rng = torch.get_rng_state()
    layer = torch.nn.Linear(4, 4)
    opt = torch.optim.Adam(layer.parameters(), lr=1e-3, fused=True)
    layer(torch.ones(2, 4)).sum().backward()
    opt.step()
    torch.set_rng_state(rng)


def _warm_up() -> None:
    import gc

    import torch

    preload()
    # the imported heap stays out of every child's collections and its finalization: touching it would copy its
    # pages into each child (a child's exit took 4-5 s, 1.3 s frozen; a fresh interpreter's exit 3-4 s)
    gc.collect()
    gc.freeze()
    if torch.get_num_threads() != 1:
        raise RuntimeError(f"torch runs {torch.get_num_threads()} threads; the server needs OMP_NUM_THREADS=1")
    if _threads() != 1:
        # a fork copies only the forking thread: a lock another thread held would stay held in every child
        raise RuntimeError(f"{_threads()} threads after the warm-up; forking would not be safe")


class _Channel:
    def __init__(self, req_fd: int, resp_fd: int):
        self.req_fd, self.resp_fd, self.buf = req_fd, resp_fd, b""

    def read(self) -> dict | None:
        while b"\n" not in self.buf:
            chunk = os.read(self.req_fd, 65536)
            if not chunk:
                return None  # the test process closed its end (or died): the server ends
            self.buf += chunk
        line, _, self.buf = self.buf.partition(b"\n")
        return json.loads(line)

    def send(self, obj: dict) -> None:
        data = (json.dumps(obj) + "\n").encode()
        while data:
            data = data[os.write(self.resp_fd, data):]

    def close(self) -> None:
        os.close(self.req_fd)
        os.close(self.resp_fd)


def _serve(channel: _Channel) -> dict | None:
    """Answer requests until the test closes the channel (returns None); in a forked child, return its request."""
    while (msg := channel.read()) is not None:
        try:
            if msg["op"] == "spawn":
                sys.stdout.flush()
                sys.stderr.flush()
                pid = os.fork()
                if pid == 0:
                    channel.close()
                    return msg
                channel.send({"pid": pid})
            elif msg["op"] == "wait":
                _, status = os.waitpid(msg["pid"], 0)
                channel.send({"returncode": os.waitstatus_to_exitcode(status)})
            elif msg["op"] == "poll":
                pid, status = os.waitpid(msg["pid"], os.WNOHANG)
                channel.send({"returncode": os.waitstatus_to_exitcode(status) if pid else None})
            else:
                channel.send({"error": f"unknown op {msg['op']!r}"})
        except OSError as exc:
            channel.send({"error": f"{type(exc).__name__}: {exc}"})
    return None


def _become(msg: dict) -> None:
    os.chdir(msg["cwd"])
    os.environ.clear()
    os.environ.update(msg["env"])
    for fd, path, flags in ((0, os.devnull, os.O_RDONLY), (1, msg["stdout"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                            (2, msg["stderr"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        new = os.open(path, flags, 0o644)
        os.dup2(new, fd)
        os.close(new)


def main() -> None:
    mode = sys.argv[1]
    if mode == "run":
        point = os.environ.get(POINT_ENV)
        argv = sys.argv[2:]
        _prepare(json.loads(point) if point else None)
        _run_sanf(argv)
        return
    assert mode == "serve", mode
    channel = _Channel(int(sys.argv[2]), int(sys.argv[3]))
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
        _warm_up()
    except Exception as exc:
        channel.send({"error": f"warm-up failed: {type(exc).__name__}: {exc}"})
        raise
    channel.send({"ready": True, "pid": os.getpid()})
    msg = _serve(channel)
    if msg is None:
        return
    _become(msg)
    _prepare(msg["point"])
    _run_sanf(msg["argv"])


if __name__ == "__main__":
    main()
