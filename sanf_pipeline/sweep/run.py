"""`sanf sweep` as a function: ``run_sweep`` plans, locks the folder, skips finished runs, executes the rest and
writes the summary; see the package docstring for the folder layout and resume."""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import Interrupted, SanfError
from .executors import _Data, _run_pool, _run_ray, _run_serial, _start_method, cpu_count
from .plan import (
    EXECUTORS,
    FLOW,
    HEATMAP_PNG,
    LOCK_FILE,
    PLAN_FILE,
    RAY_MISSING,
    RUNS_DIR,
    SUMMARY_CSV,
    SUMMARY_JSON,
    SUMMARY_MD,
    SWEEP_FILES,
    SWEEP_LOG,
    RunSpec,
    _training_length,
    is_finished,
    make_plan,
    parse_fixed,
    parse_grid,
    parse_methods,
    parse_seeds,
    plan_sweep,
    read_plan,
)
from .summary import write_summary

LOCK_WAIT_S = 5.0

# ------------------------------------------------------------------------------------------------ the sweep
@dataclass
class SweepResult:
    out_dir: Path
    specs: list[RunSpec]
    computed: list[dict]
    skipped: list[str]
    failed: list[dict]
    removed: list[str]
    summary: dict
    timings: dict
    executor: str
    workers: int
    threads_per_worker: int
    start_method: str | None = None

    @property
    def m_auroc(self) -> dict[str, float | None]:
        return {s: v["mean"] for s, v in self.summary["m_auroc"].items()}


@contextlib.contextmanager
def _sweep_lock(out: Path):
    """One `sanf sweep` per folder at a time (flock: released by the kernel when a process dies, even SIGKILLed;
    waits a few seconds so the pool workers of a just-killed sweep can exit)."""
    if out.exists() and not out.is_dir():
        raise SanfError(f"{out} exists and is not a folder; choose another --out")
    created = not out.exists()
    try:
        import fcntl

        out.mkdir(parents=True, exist_ok=True)
        fh = open(out / LOCK_FILE, "a+")  # noqa: SIM115 (held for the whole sweep)
    except ImportError:  # no fcntl (not POSIX): no lock
        yield
        return
    except OSError as exc:
        raise SanfError(f"cannot create {out}: {exc.strerror or exc}; choose another --out") from None
    deadline = time.monotonic() + LOCK_WAIT_S
    locked = False
    try:
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                locked = True
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise SanfError(f"another `sanf sweep` is writing to {out}; wait for it to finish (or stop it) "
                                    f"and rerun, or choose another --out") from None
                time.sleep(0.2)
            except OSError:  # a filesystem without flock: go on without the lock
                break
        yield
    except BaseException:
        if locked and not (out / PLAN_FILE).exists():  # refused before anything was written: leave no trace
            (out / LOCK_FILE).unlink(missing_ok=True)
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise
    finally:
        if locked:
            fcntl.flock(fh, fcntl.LOCK_UN)
        fh.close()


def _stale_temporaries(out: Path) -> list[Path]:
    """``.<file>.<pid>.tmp`` of the sweep's own files (plan.json, the summary) that a killed sweep was writing."""
    prefixes = [f".{name}." for name in SWEEP_FILES]
    return [p for p in (out.iterdir() if out.is_dir() else ()) if p.name.endswith(".tmp") and
            any(p.name.startswith(pre) and p.name[len(pre):-4].isdigit() for pre in prefixes)]


def _empty_runs_dir(p: Path) -> bool:
    """The runs folder a sweep killed before its plan.json was in place had created (a plan is written last)."""
    return p.name == RUNS_DIR and p.is_dir() and not any(p.iterdir())


def _prepare_sweep_dir(out: Path, plan: dict, specs: list[RunSpec], overwrite: bool) -> tuple[bool, list[str]]:
    """Check or write plan.json; with overwrite, clean run folders the new plan does not contain as they are.

    Returns (plan_is_new, removed run ids)."""
    from ..store.atomic import write_json_atomic
    from ..store.run_folder import remove_run_files

    removed: list[str] = []
    if out.exists() and not out.is_dir():
        raise SanfError(f"{out} exists and is not a folder; choose another --out")
    for stale in _stale_temporaries(out):  # we hold the sweep lock: no other sweep is writing them
        stale.unlink(missing_ok=True)
    plan_path = out / PLAN_FILE
    if plan_path.exists():
        try:
            old = read_plan(out)
        except SanfError:
            if not overwrite:
                raise
            old = {}
        if old.get("identity") == plan["identity"]:
            (out / RUNS_DIR).mkdir(parents=True, exist_ok=True)
            return False, removed
        if not overwrite:
            old_ident = old.get("identity") or {}
            why = []
            if old_ident.get("cache_fingerprint") != plan["identity"]["cache_fingerprint"]:
                why.append("another cache")
            if old_ident.get("score") != plan["identity"]["score"]:
                why.append(f"score {old_ident.get('score')} -> {plan['identity']['score']}")
            old_ids = [r.get("run_id") for r in old_ident.get("runs", [])]
            new_ids = [s.run_id for s in specs]
            if old_ids != new_ids:
                why.append(f"{len(set(new_ids) - set(old_ids))} run(s) added, {len(set(old_ids) - set(new_ids))} "
                           f"removed")
            else:
                why.append("settings of the same runs differ")
            raise SanfError(f"{out} holds a sweep with another plan ({'; '.join(why)}); rerun the same command to "
                            f"resume it, choose another --out, or pass --overwrite to replace the plan (finished runs "
                            f"that stay identical are kept)")
    elif out.is_dir() and any(p.name != LOCK_FILE and not _empty_runs_dir(p) for p in out.iterdir()):
        # not a sweep (no plan.json): nothing there is sanf's to replace or remove, whatever the flags
        taken = any((out / n).exists() for n in SWEEP_FILES) or \
            ((out / RUNS_DIR).exists() and not _empty_runs_dir(out / RUNS_DIR))
        if not overwrite or taken:
            raise SanfError(f"{out} exists and holds files that are not a sanf sweep; choose another --out "
                            f"(--overwrite adds a sweep beside other files only when none of its names are taken)")
    runs_dir = out / RUNS_DIR
    if overwrite and runs_dir.is_dir() and plan_path.exists():  # only a sweep's own runs are ever removed
        fp, score = plan["identity"]["cache_fingerprint"], plan["identity"]["score"]
        keep = {s.run_id for s in specs if is_finished(runs_dir / s.run_id, s, fp, score)}
        for d in sorted(runs_dir.iterdir()):
            if d.is_dir() and d.name not in keep:
                remove_run_files(d)
                with contextlib.suppress(OSError):
                    d.rmdir()
                removed.append(d.name)
        for name in (SUMMARY_CSV, SUMMARY_JSON, SUMMARY_MD, HEATMAP_PNG):
            (out / name).unlink(missing_ok=True)
    try:
        runs_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SanfError(f"cannot create {runs_dir}: {exc.strerror or exc}; choose another --out") from None
    write_json_atomic(plan_path, plan)
    return True, removed


def _is_gpu(device: str) -> bool:
    from ..device import resolve_device

    return resolve_device(device).type == "cuda"


def _parts_left(todo: list[RunSpec], ctx: dict, fingerprint: str) -> dict:
    """Which shared patch part (``jobs.parts.PatchParts`` key) each flow run with a patch part uses, and how many runs
    still need each: a part's files go once its last run is done (a part is as large as the class's memory bank)."""
    from ..jobs.parts import PatchParts

    by_run, count = {}, {}
    for s in todo:
        if not s.is_flow:
            continue
        cfg = s.fit_config(ctx["device"])
        if cfg.patch_score == "none":
            continue
        key = PatchParts.key(cfg, fingerprint, s.class_index)
        by_run[s.run_id] = key
        count[key] = count.get(key, 0) + 1
    return {"by_run": by_run, "count": count}


def _drop_part(out: Path, left: dict, run_id: str) -> None:
    from ..jobs.parts import PARTS_DIR

    key = left["by_run"].pop(run_id, None)
    if key is None:
        return
    left["count"][key] -= 1
    if left["count"][key] == 0:
        for suffix in (".safetensors", ".lock"):  # only the part's own files (docs/file-safety.md)
            (out / PARTS_DIR / f"{key}{suffix}").unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            (out / PARTS_DIR).rmdir()  # when empty


def sweep_label(out: Path) -> str:
    """The progress label of a sweep into ``out``: ``sweep <folder>``, or just ``sweep`` for a folder of that name
    (`sanf demo`'s), which read "sweep sweep: ..." (issue 22)."""
    name = Path(out).name
    return "sweep" if name in ("", "sweep", "sweeps") else f"sweep {name}"


def interrupted_message(out: Path, n_runs: int, n_finished: int) -> str:
    """What an interrupted sweep keeps (the CLI prints it after "interrupted; ")."""
    return (f"{n_finished} of {n_runs} run(s) finished and kept in {out}; rerun the same command to resume (finished "
            f"runs are not computed again, an unfinished flow continues from its last checkpoint)")


def run_sweep(cache, out, classes="all", grid=None, methods=(FLOW,), seeds=(0,), fixed=None, workers: int | None = None,
              executor: str = "local", *, device: str = "auto", score: str = "auto", plots: bool = True,
              overwrite: bool = False, quiet: bool = True, threads: int | None = None, start_method: str | None = None,
              ray_address: str | None = None, ray_cpus_per_task: float = 1.0, ray_gpus_per_task: float = 0.0,
              ray_init_kwargs: dict | None = None, stack: int | str = "auto", keep_models: bool = False) -> SweepResult:
    """Plan, run (skipping finished runs) and summarise a sweep into ``out``; see the module docstring.
    ``keep_models``: keep each flow run's ``model.safetensors`` once its results are written (by default it is
    deleted: a sweep's product is its scores and metrics, and models cost tens to hundreds of MB a run)."""
    from ..cache import open_cache
    from ..models import RUN_SCORES
    from ..progress import progress_bar
    from ..store.run_folder import cache_identity

    t_start = time.perf_counter()
    if executor not in EXECUTORS:
        raise SanfError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if score not in RUN_SCORES:
        raise SanfError(f"unknown score {score!r}; choose one of {', '.join(RUN_SCORES)}")
    if executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise SanfError(RAY_MISSING)
    if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
        raise SanfError(f"--workers must be a positive integer, got {workers}")
    from .stacked import parse_stack, run_stacked, stack_size_for  # torch: not at import (CLI checks come first)

    stack_arg = parse_stack(stack)
    out = Path(out)
    with contextlib.ExitStack() as stack:
        c = stack.enter_context(open_cache(cache))
        specs = plan_sweep(c, classes, grid, methods, seeds, fixed)
        grid_p, fixed_p = parse_grid(grid), _training_length(parse_fixed(fixed), parse_grid(grid))
        plan = make_plan(specs, c, classes=list(dict.fromkeys(s.class_index for s in specs)), grid=grid_p,
                         methods=parse_methods(methods), seeds=parse_seeds(seeds), fixed=fixed_p, score=score)
        stack.enter_context(_sweep_lock(out))
        _, removed = _prepare_sweep_dir(out, plan, specs, overwrite)
        runs_dir = out / RUNS_DIR
        fp = c.fingerprint
        todo = [s for s in specs if not is_finished(runs_dir / s.run_id, s, fp, score)]
        todo_ids = {s.run_id for s in todo}
        skipped = [s.run_id for s in specs if s.run_id not in todo_ids]
        gpu = executor == "local" and any(s.is_flow for s in todo) and _is_gpu(device)
        cores = cpu_count()
        if workers is None:
            workers = 1 if gpu or (stack_arg != "auto" and stack_arg > 1) else cores
        workers = max(1, min(int(workers), len(todo) or 1))
        if threads is None:
            threads = cores if workers == 1 else max(1, cores // workers)
        ctx = {"runs_dir": str(runs_dir.resolve()), "fingerprint": fp, "cache_identity": cache_identity(c),
               "cache_path": str(cache), "score": score, "plots": bool(plots), "device": device,
               "num_tokens": c.num_tokens, "keep_models": bool(keep_models),
               "n_seeds": len({s.seed for s in todo if s.is_flow}) or 1}
        computed: list[dict] = []
        failed: list[dict] = []
        method_used = None
        data = _Data(c, any(s.needs_patch for s in todo))
        # the stacked executor (stacked.py): one process, flows of one architecture K at a time
        stack_size = stack_size_for(todo, ctx, c, stack_arg) if executor == "local" and workers == 1 else 1
        t_run = time.perf_counter()
        if todo:
            log_path = out / SWEEP_LOG
            parts_left = _parts_left(todo, ctx, fp)
            label = sweep_label(out)
            try:
                with progress_bar(quiet, unit="runs") as bar:
                    task = bar.add_task(label, total=len(todo), rate="")

                    def on_done(spec: RunSpec, rec: dict) -> None:
                        (failed if "error" in rec else computed).append(rec)
                        if "error" not in rec:
                            _drop_part(out, parts_left, spec.run_id)
                        with open(log_path, "a", encoding="utf-8") as fh:
                            fh.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
                        what = f"AUROC {rec['auroc']:.4f}" if "auroc" in rec else "FAILED"
                        bar.update(task, advance=1, description=f"{label}: {spec.run_id} {what}")

                    if executor == "ray":
                        threads = max(1, int(ray_cpus_per_task))
                        _run_ray(todo, ctx, data, ray_address, float(ray_cpus_per_task), float(ray_gpus_per_task),
                                 on_done, ray_init_kwargs)
                        workers = 0
                    elif stack_size > 1:
                        run_stacked(todo, ctx, data, stack_size, threads, on_done)
                    elif workers == 1:
                        _run_serial(todo, ctx, data, threads, on_done)
                    else:
                        method_used = _start_method(threads, gpu, start_method)
                        _run_pool(todo, ctx, data, workers, threads, method_used, on_done)
            except KeyboardInterrupt:  # whichever executor: what the folder keeps, instead of the fit's own line
                # counted on disk, as a rerun will: a worker's result may be written but not yet received here
                kept = sum(is_finished(runs_dir / s.run_id, s, fp, score) for s in specs)
                raise Interrupted(interrupted_message(out, len(specs), kept)) from None
        t_run = time.perf_counter() - t_run
        c.close()
        t_sum = time.perf_counter()
        summary = write_summary(out)
        t_sum = time.perf_counter() - t_sum
    timings = {"wall_s": time.perf_counter() - t_start, "read_s": data.read_s, "run_s": t_run,
               "summary_s": t_sum, "reads": data.reads, "stack_size": stack_size}
    result = SweepResult(out_dir=out, specs=specs, computed=computed, skipped=skipped, failed=failed,
                         removed=removed, summary=summary, timings=timings, executor=executor, workers=workers,
                         threads_per_worker=threads, start_method=method_used)
    if failed:
        first = failed[0]
        raise SanfError(f"{len(failed)} of {len(todo)} run(s) failed; first: {first['run_id']}: {first['error']}; "
                        f"the other results and the summary are in {out}; rerun the same command to retry the "
                        f"failed runs")
    return result

