"""Running the planned runs of a sweep: in this process, in a local process pool, or as Ray tasks.

Every run goes through ``execute_run``, which hands the arrays to the run jobs of ``jobs/`` (``flow_job``,
``baseline_job``): the same code path as `sanf fit` + `sanf eval` and `sanf baseline`. What makes a sweep fast is
only how the arrays reach the jobs: the test split is read once (``_Data``), each class's training block once
and released after the class's last run (``_schedule``), and no process starts per run.

- ``local`` with ``workers == 1``: every run in this process, with ``torch.set_num_threads(threads)``.
- ``local`` with ``workers > 1``: a process pool. The parent puts the test arrays and, class by class, the
  training blocks into POSIX shared memory (one copy, whatever the number of workers); workers map them
  read-only by name, so the same design works with every start method. Each worker runs
  ``torch.set_num_threads(max(1, cores // workers))`` so workers do not oversubscribe the cores. Start method:
  ``fork`` when each worker has one thread (cheapest; safe even after the parent used OpenMP), else
  ``forkserver`` (a fork of an OpenMP-using parent hangs in multi-threaded torch ops), ``spawn`` off Linux.
- ``ray``: each run is a Ray task with ``num_cpus``/``num_gpus`` (fractions allowed); the test arrays are
  ``ray.put`` once, each class block once; ``import ray`` happens only here (optional extra ``sanf[ray]``).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SanfError
from .plan import RAY_MISSING, RunSpec


def _clean_tmp(run_dir: Path) -> None:
    """Before a run (re)starts: temporary files of an interrupted writer, and a metrics.json that is not this
    run's (a run is only started when it is not finished), so that metrics.json keeps meaning 'complete'."""
    from ..store.run_folder import METRICS_FILE

    for stale in run_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)


def _model_extras(ctx: dict) -> dict:
    """What a flow run's config.json says about its model: without --keep-models ``model_kept: false`` (written
    with the config at fit time, so dropping the model after metrics.json is a bare unlink, and `load_run`
    explains the missing file)."""
    return {} if ctx.get("keep_models", False) else {"model_kept": False}


def _drop_model(run_dir: Path, ctx: dict) -> None:
    """Without --keep-models: delete the model once the results are written (a kill before leaves it, harmless)."""
    from ..store.run_folder import MODEL_FILE

    if not ctx.get("keep_models", False):
        (run_dir / MODEL_FILE).unlink(missing_ok=True)


def _sweep_extras(spec: RunSpec, ctx: dict) -> dict:
    """What a sweep adds to a run's ``metrics.json`` (and, under ``sweep``, to its ``config.json``)."""
    info = {"run_id": spec.run_id, "setting": spec.setting}
    if spec.is_flow:
        info.update(grid=spec.to_dict()["grid"], seed=spec.seed)
    return info


_PARTS: dict = {}  # this process's fitted patch parts (jobs.PatchParts), one store per sweep folder


def patch_parts(ctx: dict):
    """This process's view of the sweep's patch parts (``jobs.parts.PatchParts`` over ``<sweep>/parts``): runs of one
    class and seed that differ in flow settings only fit and score one patch-knn bank, across worker processes
    (runs are planned class by class, seeds innermost, so memory keeps one part per seed)."""
    from ..jobs.parts import PARTS_DIR, PatchParts

    key = ctx["runs_dir"]
    if key not in _PARTS:
        _PARTS.clear()
        _PARTS[key] = PatchParts(Path(ctx["runs_dir"]).parent / PARTS_DIR, keep=max(1, int(ctx.get("n_seeds", 1))))
    return _PARTS[key]


def execute_run(spec: RunSpec, ctx: dict, test: dict, train: dict) -> dict:
    """Run one planned run on in-memory arrays through the run jobs; a SanfError becomes ``{"error": ...}``."""
    from ..jobs.baseline import baseline_job
    from ..jobs.data import TestData, TrainData
    from ..jobs.flow import flow_job

    t0 = time.perf_counter()
    try:
        run_dir = Path(ctx["runs_dir"]) / spec.run_id
        run_dir.mkdir(parents=True, exist_ok=True)
        _clean_tmp(run_dir)
        test_data = TestData.from_arrays(test["cls"], test.get("patch"), test["labels"], test["sample_ids"],
                                         num_tokens=ctx["num_tokens"], fingerprint=ctx["fingerprint"],
                                         cache_path=ctx["cache_path"], identity=ctx["cache_identity"])
        train_data = TrainData(train["cls"], train.get("patch"), spec.class_index, spec.class_name)
        info = _sweep_extras(spec, ctx)
        if spec.is_flow:
            cfg = spec.fit_config(ctx["device"])
            rec = flow_job(run_dir, cfg, train_data, test_data, cache_info=ctx["cache_identity"], score=ctx["score"],
                           plots=ctx["plots"], extra_config={"sweep": info, **_model_extras(ctx)},
                           extra_metrics={"sweep_run_id": spec.run_id, "sweep": {**info, "settings": cfg.settings()}},
                           parts=patch_parts(ctx))
            _drop_model(run_dir, ctx)
        else:
            t = time.perf_counter()
            res = baseline_job(run_dir, spec.method, train_data, test_data, plots=ctx["plots"],
                               extra={"sweep": info}, extra_metrics={"sweep_run_id": spec.run_id},
                               device=ctx["device"] or "auto")
            rec = {"auroc": res.metrics["auroc"], "fit_s": 0.0, "score_write_s": time.perf_counter() - t,
                   "reused_model": False, "train_samples_seen": 0, "n_test": len(res.scores)}
        rec = {"run_id": spec.run_id, **rec}
    except SanfError as exc:
        rec = {"run_id": spec.run_id, "error": str(exc)}
    rec["seconds"] = time.perf_counter() - t0
    rec["pid"] = os.getpid()
    return rec


# --------------------------------------------------------------------------------------------- data access
class _Data:
    """Reads the cache for the parent: the test split once, each class's training block once (on demand)."""

    def __init__(self, cache, needs_test_patch: bool):
        self.cache = cache
        self.read_s = 0.0
        self.reads: list[dict] = []
        self.needs_test_patch = needs_test_patch
        self._test: dict | None = None

    def test(self) -> dict:
        from ..store.run_folder import check_finite

        if self._test is None:
            t = time.perf_counter()
            # as stored (float16 by default): the sweep holds the test split for all its runs, and every scorer
            # converts it to float32 batch by batch (exactly: float16 -> float32 is lossless)
            cls, patch, labels, ids = self.cache.split("test").read_all(patch=self.needs_test_patch, dtype=None)
            self.read_s += time.perf_counter() - t
            self.reads.append({"what": "test", "rows": len(cls), "patch": patch is not None})
            check_finite(f"the test features in {self.cache.path}", cls, patch)
            self._test = {"cls": cls, "patch": patch, "labels": labels, "sample_ids": ids}
        return self._test

    def train(self, ci: int, patch: bool) -> dict:
        from ..store.run_folder import check_finite

        t = time.perf_counter()
        cls, tokens = self.cache.split("train").read_class(ci, patch=patch)
        self.read_s += time.perf_counter() - t
        self.reads.append({"what": f"train class {ci}", "rows": len(cls), "patch": tokens is not None})
        name = self.cache.class_names[ci]
        if len(cls) == 0:
            raise SanfError(f"class {name!r} has no valid training samples in {self.cache.path}")
        check_finite(f"the training features of class {name!r} in {self.cache.path}", cls, tokens)
        return {"cls": cls, "patch": tokens}


def _class_patch_needs(todo: list[RunSpec]) -> dict[int, bool]:
    needs: dict[int, bool] = {}
    for s in todo:
        needs[s.class_index] = needs.get(s.class_index, False) or s.needs_patch
    return needs


def cpu_count() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


# ------------------------------------------------------------------------------------------------ executors
@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def _run_serial(todo, ctx, data: _Data, threads: int, on_done) -> None:
    test = data.test()
    needs = _class_patch_needs(todo)
    cur, train = None, None
    with _torch_threads(threads):
        for spec in todo:
            if spec.class_index != cur:
                cur, train = None, None  # drop the previous block before reading the next
                train = data.train(spec.class_index, needs[spec.class_index])
                cur = spec.class_index
            on_done(spec, execute_run(spec, ctx, test, train))


class _SharedArrays:
    """Parent side of the process pool: arrays in POSIX shared memory, described to workers by name."""

    def __init__(self):
        self._segments: dict[str, Any] = {}

    def put(self, array: np.ndarray | None):
        from multiprocessing import shared_memory

        if array is None:
            return None
        a = np.ascontiguousarray(array)
        shm = shared_memory.SharedMemory(create=True, size=max(1, a.nbytes))
        self._segments[shm.name] = shm
        np.ndarray(a.shape, a.dtype, buffer=shm.buf)[...] = a
        return (shm.name, tuple(a.shape), a.dtype.str)

    def free(self, desc) -> None:
        if desc is None:
            return
        shm = self._segments.pop(desc[0], None)
        if shm is not None:
            shm.close()
            with contextlib.suppress(FileNotFoundError):
                shm.unlink()

    def close(self) -> None:
        for name in list(self._segments):
            self.free((name,))


_WORKER: dict[str, Any] = {}
_ATTACHED: dict[str, tuple[Any, np.ndarray]] = {}


def _set_parent_death_signal() -> None:
    """Linux: a pool worker dies with its parent (e.g. a SIGKILLed sweep) instead of lingering."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(Exception):
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def _init_worker(ctx: dict, test_descs: dict, labels: np.ndarray, sample_ids: list[str], threads: int) -> None:
    import torch

    _set_parent_death_signal()
    torch.set_num_threads(max(1, int(threads)))
    _WORKER.update(ctx=ctx, test_descs=test_descs, labels=labels, sample_ids=sample_ids)


def _attach(desc) -> np.ndarray | None:
    from multiprocessing import shared_memory

    if desc is None:
        return None
    name, shape, dtype = desc
    if name not in _ATTACHED:
        shm = shared_memory.SharedMemory(name=name)
        arr = np.ndarray(shape, np.dtype(dtype), buffer=shm.buf)
        arr.flags.writeable = False
        _ATTACHED[name] = (shm, arr)
    return _ATTACHED[name][1]


def _detach_except(keep: set) -> None:
    for name in list(_ATTACHED):
        if name not in keep:
            shm, arr = _ATTACHED.pop(name)
            del arr  # the view must go before the mapping can close
            with contextlib.suppress(BufferError):  # still referenced somewhere: unmapped when collected
                shm.close()


def _ping() -> int:
    return os.getpid()


def _pool_task(spec_dict: dict, train_descs: dict) -> dict:
    spec = RunSpec.from_dict(spec_dict)
    tdesc = _WORKER["test_descs"]
    keep = {d[0] for d in (*tdesc.values(), *train_descs.values()) if d is not None}
    _detach_except(keep)
    test = {"cls": _attach(tdesc["cls"]), "patch": _attach(tdesc.get("patch")) if spec.needs_patch else None,
            "labels": _WORKER["labels"], "sample_ids": _WORKER["sample_ids"]}
    train = {"cls": _attach(train_descs["cls"]),
             "patch": _attach(train_descs.get("patch")) if spec.needs_patch else None}
    return execute_run(spec, _WORKER["ctx"], test, train)


PRELOAD = ("torch._dynamo", "sanf_pipeline.jobs.flow", "sanf_pipeline.train.fit", "sanf_pipeline.flow",
           "sanf_pipeline.flow.normalizer", "sanf_pipeline.evaluate.metrics", "sanf_pipeline.models",
           "sanf_pipeline.evaluate.report", "sklearn.metrics", "sklearn.covariance")
PRELOAD_PLOTS = ("matplotlib.figure", "matplotlib.backends.backend_agg")


def _warm_up(plots: bool) -> None:
    """Import (and, for plots, load the fonts) once in the parent so forked workers inherit it all."""
    import importlib

    import torch

    for name in PRELOAD + (PRELOAD_PLOTS if plots else ()):
        importlib.import_module(name)
    torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # its first construction imports torch._dynamo (~2 s)
    if plots:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        fig = Figure(figsize=(1, 1))
        FigureCanvasAgg(fig)
        ax = fig.add_subplot(1, 1, 1)
        ax.set_title("warm-up")
        ax.legend(handles=[ax.plot([0, 1], label="x")[0]])
        fig.savefig(io.BytesIO(), format="png")


def _schedule(todo: list[RunSpec], window: int, load_class, submit, wait_any, result, release_class,
              on_done) -> None:
    """Keep at most ``window`` runs in flight, in plan order; the executors differ only in the callbacks.

    ``load_class(ci)`` makes a class's training block available (once, before its first run), ``submit(spec, block)``
    returns a handle, ``wait_any(handles)`` the finished ones, ``result(handle, spec, pending)`` the run's record
    (or raises, after cancelling ``pending``), ``release_class(block)`` frees the block after the class's last run.
    """
    left: dict[int, int] = {}
    for s in todo:
        left[s.class_index] = left.get(s.class_index, 0) + 1
    loaded: dict[int, Any] = {}
    pending: dict = {}
    queue = iter(todo)
    while True:
        for spec in itertools.islice(queue, max(0, window - len(pending))):
            ci = spec.class_index
            if ci not in loaded:
                loaded[ci] = load_class(ci)
            pending[submit(spec, loaded[ci])] = spec
        if not pending:
            return
        for handle in wait_any(list(pending)):
            spec = pending.pop(handle)
            on_done(spec, result(handle, spec, pending))
            left[spec.class_index] -= 1
            if left[spec.class_index] == 0:
                release_class(loaded.pop(spec.class_index))


def _start_method(threads: int, gpu: bool, requested: str | None) -> str:
    import multiprocessing as mp

    if requested:
        if requested not in mp.get_all_start_methods():
            raise SanfError(f"start method {requested!r} is not available here; use one of "
                            f"{', '.join(mp.get_all_start_methods())}")
        return requested
    if not sys.platform.startswith("linux"):
        return "spawn"
    return "fork" if threads == 1 and not gpu else "forkserver"


def _run_pool(todo, ctx, data: _Data, workers: int, threads: int, start_method: str, on_done) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    test = data.test()
    shared = _SharedArrays()
    needs = _class_patch_needs(todo)
    mpctx = mp.get_context(start_method)
    if start_method == "forkserver":
        plots = PRELOAD_PLOTS if ctx["plots"] else ()
        mpctx.set_forkserver_preload(["sanf_pipeline.sweep.executors", *PRELOAD, *plots])
    elif start_method == "fork":
        _warm_up(ctx["plots"])
    try:
        test_descs = {"cls": shared.put(test["cls"]), "patch": shared.put(test["patch"])}
        test["cls"] = test["patch"] = None  # the workers read the shared copy; keep one copy only
        pool = ProcessPoolExecutor(max_workers=workers, mp_context=mpctx, initializer=_init_worker,
                                   initargs=(ctx, test_descs, test["labels"], test["sample_ids"], threads))
        with pool:
            pool.submit(_ping).result()  # start the workers before anything else runs threads in this process

            def load_class(ci: int) -> dict:
                block = data.train(ci, needs[ci])
                return {"cls": shared.put(block["cls"]), "patch": shared.put(block["patch"])}

            def result(fut, spec: RunSpec, pending: dict) -> dict:
                try:
                    return fut.result()
                except BrokenProcessPool:
                    raise SanfError(f"a sweep worker process died (out of memory?) during {spec.run_id}; "
                                    f"finished runs are kept: rerun the same command (with fewer --workers) "
                                    f"to resume") from None
                except BaseException:
                    for f in pending:
                        f.cancel()
                    raise

            def release_class(descs: dict) -> None:
                for desc in descs.values():
                    shared.free(desc)

            try:
                _schedule(todo, max(2, 2 * workers), load_class,
                          lambda spec, descs: pool.submit(_pool_task, spec.to_dict(), descs),
                          lambda futs: wait(futs, return_when=FIRST_COMPLETED)[0], result, release_class, on_done)
            except KeyboardInterrupt:
                _stop_workers(pool)
                raise
    finally:
        shared.close()


def _stop_workers(pool) -> None:
    """Ctrl-C: end the pool's workers now. Leaving the ``with pool`` block would otherwise wait for every run in
    flight and start the queued ones (a worker that did not get the SIGINT itself, e.g. when only the parent was
    signalled, goes on; issue 22 measured 57 s). Killing a run is safe: its files are written atomically and a
    rerun resumes it (tests/robustness/test_sweep_kill.py)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.terminate()
    for proc in processes:
        with contextlib.suppress(Exception):
            proc.join(10)


def _ray_entry(spec_dict: dict, ctx: dict, test: dict, train: dict, threads: int) -> dict:
    import torch

    torch.set_num_threads(max(1, int(threads)))
    return execute_run(RunSpec.from_dict(spec_dict), ctx, test, train)


def _run_ray(todo, ctx, data: _Data, address: str | None, cpus: float, gpus: float, on_done,
             init_kwargs: dict | None = None) -> None:
    try:
        import ray
    except ImportError:
        raise SanfError(RAY_MISSING) from None
    if cpus <= 0 or gpus < 0:
        raise SanfError("--ray-cpus-per-task must be > 0 and --ray-gpus-per-task >= 0")
    own = not ray.is_initialized()
    if own:
        kwargs = {"include_dashboard": False, "log_to_driver": False, **(init_kwargs or {})}
        try:
            ray.init(address=address or None, **kwargs)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            where = f"the Ray cluster at {address}" if address else "a local Ray instance"
            raise SanfError(f"cannot start or reach {where}: {str(exc).splitlines()[0] if str(exc) else exc}; "
                            f"check --ray-address (e.g. ray://host:10001 or auto)") from None
    try:
        test = data.test()
        test_ref = ray.put({"cls": test["cls"], "patch": test["patch"], "labels": test["labels"],
                            "sample_ids": test["sample_ids"]})
        task = ray.remote(_ray_entry).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)
        total_cpus = float(ray.cluster_resources().get("CPU", 1))
        window = max(2, 2 * int(total_cpus // cpus))
        needs = _class_patch_needs(todo)

        def result(ref, spec: RunSpec, pending: dict) -> dict:
            try:
                return ray.get(ref)
            except ray.exceptions.RayError as exc:
                for r in pending:
                    with contextlib.suppress(Exception):
                        ray.cancel(r)
                cause = getattr(exc, "cause", None)
                if isinstance(cause, SanfError):
                    raise cause from None
                raise

        _schedule(todo, window, lambda ci: ray.put(data.train(ci, needs[ci])),
                  lambda spec, block: task.remote(spec.to_dict(), ctx, test_ref, block, max(1, int(cpus))),
                  lambda refs: ray.wait(refs, num_returns=1)[0], result, lambda block: None, on_done)
    finally:
        if own:
            ray.shutdown()


