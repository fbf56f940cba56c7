"""Many runs from one cache: plan (classes x grid x methods x seeds), execute (in process, a local process pool,
or Ray tasks), resume, summarise.

Why it is fast: the test split is read from the cache once and scored by every model; each class's training
block is read once and used by every run of that class; no process starts per run; no backbone runs at all.

Planning (``plan_sweep``): grid keys are ``FitConfig`` fields and apply to ``flow`` runs only; ``fixed``
settings (``--set key=value``) apply to every flow run; baselines (``baselines.BASELINES``) run once per class
(they are seed-independent). Run ids are readable and stable, e.g. ``cat-flow-fusion=gap-clamp=3-s0`` and
``cat-knn``; characters other than letters, digits and ``._=+-`` become ``_`` and then a short hash of the
original id is appended, so ids stay unique.

Files (``sweeps/<name>/``)::

    plan.json                  every planned run with its settings; a restart must plan the same runs
    runs/<run-id>/             the files of `sanf fit` + `sanf eval` (config.json, model.safetensors,
                               train_log.jsonl, metrics.json, scores.csv, report.md, PNGs) or of `sanf baseline`
    summary.csv|json|md        AUROC per class x setting (mean +- std over seeds), M-AUROC = mean over classes
    heatmap.png                class x setting AUROC
    sweep_log.jsonl            one line per computed run with its timings (not part of the summary)

Resume: ``metrics.json`` is the last file a run writes, so a run counts as finished when it exists (and
belongs to the planned run). A restarted sweep skips finished runs, continues an unfinished flow fit from its
last epoch checkpoint, and produces the same summary. A folder holding another plan is refused unless
``overwrite``: then the new plan replaces it, finished runs the new plan contains with identical settings are
kept, and the sanf files of every other run folder are removed (other files are never touched).

Same numbers as single runs: a flow run calls ``train.fit_flow`` on the class block (with the run folder for
checkpoints, as ``fit_run`` does), writes the run like ``fit_run``, and scores the test split with the run's
normaliser and ``train.score_flow`` in blocks, as ``evaluate.eval_run`` does; a baseline run fits
``baselines.create_baseline(method)`` as ``baseline_run`` does. Results differ from ``sanf fit`` + ``sanf eval``
only by the last bits of float sums when the number of torch threads differs.

Executors (``executor=``):

- ``local`` with ``workers == 1``: every run in this process, with ``torch.set_num_threads(threads)``
  (default: all cores) for the duration of the sweep.
- ``local`` with ``workers > 1``: a process pool. The parent puts the test arrays and, class by class, the
  training blocks into POSIX shared memory (one copy, whatever the number of workers); workers map them
  read-only by name, so the same design works with every start method. Each worker runs
  ``torch.set_num_threads(max(1, cores // workers))`` so workers do not oversubscribe the cores. Start method:
  ``fork`` when each worker has one thread (cheapest; safe even after the parent used OpenMP), else
  ``forkserver`` (a fork of an OpenMP-using parent hangs in multi-threaded torch ops), ``spawn`` off Linux.
  Default ``workers`` on CPU: the cores (fewer when there are fewer runs): measured faster than one process
  with all threads (``benchmarks/sweep.md``).
- GPU (``device`` cuda, or auto with a GPU): default one worker, i.e. the flows run one after the other in this
  process; ``workers=N`` runs N processes sharing the GPU (``forkserver``). Stacking K flows into one batched
  model (``torch.func.stack_module_state`` + ``vmap``) was not implemented: no GPU was available to measure it.
- ``ray``: each run is a Ray task with ``num_cpus``/``num_gpus`` (fractions allowed) on the cluster at
  ``ray_address`` (or a local instance); the test arrays are ``ray.put`` once, each class block once; tasks
  write their run folders to ``out``, which must be on a filesystem every node sees. ``import ray`` happens only
  here (optional extra ``sanf[ray]``).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import hashlib
import io
import itertools
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .errors import SanfError

SWEEP_FORMAT = "sanf-sweep"
SWEEP_FORMAT_VERSION = 1
PLAN_FILE = "plan.json"
RUNS_DIR = "runs"
SUMMARY_CSV = "summary.csv"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
HEATMAP_PNG = "heatmap.png"
SWEEP_LOG = "sweep_log.jsonl"
LOCK_FILE = ".sweep.lock"
LOCK_WAIT_S = 5.0
SWEEP_FILES = (PLAN_FILE, SUMMARY_CSV, SUMMARY_JSON, SUMMARY_MD, HEATMAP_PNG, SWEEP_LOG)
FLOW = "flow"
EXECUTORS = ("local", "ray")
NOT_GRID = {"seed": "use --seeds", "device": "use --device"}
EARLY_STOPPING_KEYS = ("val_fraction", "patience", "max_epochs", "min_delta")
MAX_RUN_ID = 160
RAY_MISSING = "--executor ray needs Ray, an optional extra: pip install 'sanf[ray]' (or use --executor local)"
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")


# ------------------------------------------------------------------------------------------------ parsing
def _fit_fields() -> dict[str, dataclasses.Field]:
    from .train import FitConfig

    return {f.name: f for f in dataclasses.fields(FitConfig)}


def _unknown_key(key: str, what: str) -> SanfError:
    valid = sorted(k for k in _fit_fields() if k not in NOT_GRID)
    return SanfError(f"unknown {what} key {key!r}; valid keys are the fit settings: {', '.join(valid)}")


def parse_value(key: str, text) -> Any:
    """One value of the FitConfig field ``key`` from text (``2``, ``2.5``, ``true``, ``none``, ``0.9:0.999``)."""
    fields_ = _fit_fields()
    if key not in fields_:
        raise _unknown_key(key, "setting")
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        text = ":".join(str(x) for x in text)
    text = str(text)  # API values go through the same parsing as CLI text, so 2 and "2" plan the same run
    ann = str(fields_[key].type).replace(" ", "")
    t = text.strip()
    try:
        if t.lower() in ("none", "null") and "None" in ann:
            return None
        if ann.startswith("bool"):
            low = t.lower()
            if low in ("true", "1", "yes", "on"):
                return True
            if low in ("false", "0", "no", "off"):
                return False
            raise ValueError("not a boolean")
        if ann.startswith("int"):
            return int(t)
        if ann.startswith("float"):
            return float(t)
        if ann.startswith("tuple"):
            return tuple(float(p) for p in re.split(r"[,:/]", t) if p)
        return t
    except ValueError:
        want = ann.split("|")[0].split("[")[0]
        raise SanfError(f"invalid value {text!r} for {key}: expected {want}") from None


def _split_item(item: str, what: str) -> tuple[str, str]:
    key, sep, value = str(item).partition("=")
    key = key.strip().replace("-", "_")
    if not sep or not key or not value.strip():
        raise SanfError(f"{what} {item!r} must look like key=value (e.g. {what} fusion=gap)")
    return key, value


def _setting_pairs(items: Iterable[str] | dict | None, what: str) -> list[tuple[str, Any]]:
    """``key=value`` strings (or a dict) -> ``(key, value)`` with known, allowed and unrepeated FitConfig keys."""
    pairs = list(items.items()) if isinstance(items, dict) else [_split_item(i, what) for i in (items or [])]
    seen: set[str] = set()
    out = []
    for key, value in pairs:
        key = str(key).replace("-", "_")
        if key in NOT_GRID:
            raise SanfError(f"{what} {key}=... is not allowed: {NOT_GRID[key]}")
        if key not in _fit_fields():
            raise _unknown_key(key, "grid" if what == "--grid" else what)
        if key in seen:
            raise SanfError(f"{what} {key} is given twice; list all its values once: {what} {key}=a,b"
                            if what == "--grid" else f"{what} {key} is given twice")
        seen.add(key)
        out.append((key, value))
    return out


def parse_grid(items: Iterable[str] | dict | None) -> dict[str, list]:
    """``["fusion=none,gap", "clamp=2,3"]`` (or a dict of lists) -> ``{"fusion": [...], "clamp": [2.0, 3.0]}``."""
    out: dict[str, list] = {}
    for key, values in _setting_pairs(items, "--grid"):
        raw = values.split(",") if isinstance(values, str) else list(values)
        parsed = [parse_value(key, v) for v in raw if not (isinstance(v, str) and not v.strip())]
        if not parsed:
            raise SanfError(f"grid key {key!r} has no values")
        if len({format_value(v) for v in parsed}) != len(parsed):
            raise SanfError(f"grid key {key!r} lists the same value twice ({', '.join(map(format_value, parsed))})")
        out[key] = parsed
    return out


def parse_fixed(items: Iterable[str] | dict | None) -> dict[str, Any]:
    """``["epochs=1", "early_stopping=false"]`` (or a dict) -> typed FitConfig settings."""
    return {key: parse_value(key, value) for key, value in _setting_pairs(items, "--set")}


def _csv_list(value, what: str) -> list[str]:
    if value is None:
        return []
    items = value.split(",") if isinstance(value, str) else [str(v) for v in value]
    items = [i.strip() for i in items if str(i).strip()]
    if not items:
        raise SanfError(f"{what} is empty")
    return list(dict.fromkeys(items))


def parse_seeds(value) -> list[int]:
    seeds = []
    for s in _csv_list(value if value is not None else "0", "--seeds"):
        if not s.isdigit():
            raise SanfError(f"invalid seed {s!r}: seeds are non-negative integers, e.g. --seeds 0,1,2")
        seeds.append(int(s))
    return list(dict.fromkeys(seeds))


def parse_methods(value) -> list[str]:
    from .baselines import BASELINES

    valid = [FLOW, *BASELINES]
    methods = _csv_list(value if value is not None else FLOW, "--methods")
    for m in methods:
        if m not in valid:
            raise SanfError(f"unknown method {m!r}; choose from {', '.join(valid)}")
    return methods


def resolve_classes(class_names: Sequence[str], classes) -> list[int]:
    """``"all"``, ``"0,3,cat"`` or a list of names/indices -> class indices (the error lists the valid ones)."""
    if classes is None or (isinstance(classes, str) and classes.strip().lower() == "all"):
        return list(range(len(class_names)))
    items = _csv_list(classes, "--classes")
    out = []
    for text in items:
        if text in class_names:
            out.append(list(class_names).index(text))
        elif text.isdigit() and int(text) < len(class_names):
            out.append(int(text))
        else:
            listing = ", ".join(f"{i}={n}" for i, n in enumerate(class_names))
            raise SanfError(f"unknown class {text!r}; valid classes are {listing} (or all)")
    return list(dict.fromkeys(out))


def format_value(v) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if v is None:
        return "none"
    if isinstance(v, float):
        text = repr(v)
        return text[:-2] if text.endswith(".0") else text
    if isinstance(v, (tuple, list)):
        return ":".join(format_value(x) for x in v)
    return str(v)


def safe_id(text: str) -> str:
    """A filesystem-safe run id: unsafe characters -> ``_`` plus a hash of the original; long ids shortened."""
    safe = _SAFE.sub("_", text).strip(".") or "run"
    if safe != text or len(safe) > MAX_RUN_ID:
        digest = hashlib.sha256(text.encode()).hexdigest()[:8]
        safe = f"{safe[:MAX_RUN_ID - 9]}-{digest}"
    return safe


# --------------------------------------------------------------------------------------------------- plan
@dataclass
class RunSpec:
    """One planned run. ``fit`` holds the full FitConfig (flows); ``grid`` the values of the grid keys."""

    run_id: str
    method: str
    class_index: int
    class_name: str
    setting: str
    seed: int | None = None
    grid: dict = field(default_factory=dict)
    fit: dict | None = None

    @property
    def is_flow(self) -> bool:
        return self.method == FLOW

    @property
    def needs_patch(self) -> bool:
        if not self.is_flow:
            from .baselines import needs_patch

            return needs_patch(self.method)
        return self.fit_config().needs_patch

    def fit_config(self, device: str | None = None):
        from .train import FitConfig

        cfg = FitConfig.from_dict(dict(self.fit or {}))
        if device is not None:
            cfg.device = device
        return cfg.validate()

    def identity(self) -> dict:
        """What must match for an existing result to belong to this run (device etc. excluded)."""
        out = {"run_id": self.run_id, "method": self.method, "class_index": self.class_index, "seed": self.seed}
        if self.is_flow:
            out["settings"] = self.fit_config().settings()
        return out

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["grid"] = {k: list(v) if isinstance(v, tuple) else v for k, v in self.grid.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict) -> RunSpec:
        return cls(**{f.name: d.get(f.name) for f in dataclasses.fields(cls) if f.name in d})


def setting_label(method: str, grid_values: dict) -> str:
    if method != FLOW or not grid_values:
        return method
    return " ".join([FLOW, *(f"{k}={format_value(v)}" for k, v in grid_values.items())])


def _training_length(fixed: dict, grid: dict) -> dict:
    """``epochs`` without ``early_stopping`` means a fixed length, as ``sanf fit --epochs`` does."""
    fixed = dict(fixed)
    given = set(fixed) | set(grid)
    if "early_stopping" in grid:
        return fixed
    if "epochs" in given and "early_stopping" not in fixed:
        fixed["early_stopping"] = False
    if "epochs" in given and fixed.get("early_stopping") is True:
        raise SanfError("epochs (a fixed length) and early_stopping=true exclude each other; drop one")
    es_keys = [k for k in EARLY_STOPPING_KEYS if k in given]
    if es_keys and fixed.get("early_stopping") is False:
        raise SanfError(f"{', '.join(es_keys)} belong(s) to early stopping; drop them with a fixed number of epochs")
    return fixed


def plan_sweep(cache, classes="all", grid=None, methods=(FLOW,), seeds=(0,), fixed=None) -> list[RunSpec]:
    """The runs of a sweep, in execution order (class-major). ``cache``: a path, an open cache or class names."""
    names = _class_names(cache)
    class_idx = resolve_classes(names, classes)
    if classes is None or (isinstance(classes, str) and classes.strip().lower() == "all"):
        class_idx = _with_training_data(cache, names, class_idx)
    if not class_idx:
        raise SanfError("no classes selected")
    grid = parse_grid(grid)
    fixed = parse_fixed(fixed)
    methods = parse_methods(methods)
    seeds = parse_seeds(seeds)
    clash = sorted(set(grid) & set(fixed))
    if clash:
        raise SanfError(f"{', '.join(clash)} is both a grid key and a fixed --set setting; keep one")
    if FLOW not in methods and (grid or fixed):
        raise SanfError("--grid/--set apply to flow runs only; add flow to --methods or drop them")
    fixed = _training_length(fixed, grid)
    combos = [dict(zip(grid, values, strict=True)) for values in itertools.product(*grid.values())] or [{}]
    specs: list[RunSpec] = []
    from .train import FitConfig

    checked: dict[str, dict] = {}
    for ci in class_idx:
        cname = names[ci]
        for method in methods:
            if method != FLOW:
                specs.append(RunSpec(safe_id(f"{cname}-{method}"), method, ci, cname, method))
                continue
            for combo in combos:
                label = setting_label(FLOW, combo)
                for seed in seeds:
                    settings = {**fixed, **combo, "seed": seed}
                    key = json.dumps({k: format_value(v) for k, v in settings.items()}, sort_keys=True)
                    if key not in checked:
                        try:
                            cfg = FitConfig.from_dict(settings).validate()
                        except TypeError as exc:
                            raise SanfError(f"invalid fit settings {settings}: {exc}") from None
                        checked[key] = cfg.to_dict()
                    parts = [f"{k}={format_value(v)}" for k, v in combo.items()]
                    rid = safe_id("-".join([cname, FLOW, *parts, f"s{seed}"]))
                    specs.append(RunSpec(rid, FLOW, ci, cname, label, seed, dict(combo), dict(checked[key])))
    ids = [s.run_id for s in specs]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise SanfError(f"two planned runs share the id {dup[0]!r}; class names or grid values collide")
    return specs


def _with_training_data(cache, names: list[str], class_idx: list[int]) -> list[int]:
    """Drop the classes without training samples (an MVTec cache's defect classes) from ``--classes all``."""
    if isinstance(cache, (list, tuple)):
        return class_idx
    from .cache import open_cache

    if hasattr(cache, "split"):
        counts = cache.split("train").class_counts()
    else:
        with open_cache(cache) as c:
            counts = c.split("train").class_counts()
    empty = [i for i in class_idx if counts[i] == 0]
    if empty:
        print(f"note: skipping {len(empty)} class(es) without training images: "
              f"{', '.join(names[i] for i in empty)}", file=sys.stderr)
    return [i for i in class_idx if counts[i] > 0]


def _class_names(cache) -> list[str]:
    if isinstance(cache, (list, tuple)):
        return [str(c) for c in cache]
    if hasattr(cache, "class_names"):
        return list(cache.class_names)
    from .cache import open_cache

    with open_cache(cache) as c:
        return list(c.class_names)


def make_plan(specs: list[RunSpec], cache, *, classes: list[int], grid: dict, methods: list[str], seeds: list[int],
              fixed: dict, score: str) -> dict:
    from .runs import cache_identity, now

    ident = {"cache_fingerprint": cache.fingerprint, "score": score, "runs": [s.identity() for s in specs]}
    return {
        "format": SWEEP_FORMAT, "format_version": SWEEP_FORMAT_VERSION, "identity": ident,
        "cache": cache_identity(cache), "classes": [{"index": i, "name": cache.class_names[i]} for i in classes],
        "grid": {k: [format_value(v) for v in vs] for k, vs in grid.items()}, "methods": methods, "seeds": seeds,
        "fixed": {k: format_value(v) for k, v in fixed.items()}, "score": score,
        "settings": list(dict.fromkeys(s.setting for s in specs)), "runs": [s.to_dict() for s in specs],
        "created": now(),
    }


def read_plan(sweep_dir) -> dict:
    from .runs import read_json_file

    path = Path(sweep_dir) / PLAN_FILE
    if not path.is_file():
        raise SanfError(f"{sweep_dir} is not a sanf sweep (no {PLAN_FILE}); create one with `sanf sweep`")
    plan = read_json_file(path)
    if not isinstance(plan, dict) or plan.get("format") != SWEEP_FORMAT or not isinstance(plan.get("runs"), list):
        raise SanfError(f"{path} is not a sanf sweep plan")
    if int(plan.get("format_version", 0)) > SWEEP_FORMAT_VERSION:
        raise SanfError(f"{sweep_dir} was written by a newer sanf (sweep format {plan['format_version']}); upgrade")
    return plan


# ------------------------------------------------------------------------------------------ run execution
def _result_identity(spec: RunSpec, ctx: dict) -> dict:
    return {"sweep_run_id": spec.run_id, "method": spec.method if not spec.is_flow else "sanf-flow",
            "score": ctx["score"] if spec.is_flow else spec.method, "normal_class": spec.class_index,
            "cache_fingerprint": ctx["fingerprint"]}


def is_finished(run_dir: Path, spec: RunSpec, fingerprint: str, score: str) -> bool:
    """metrics.json exists (it is written last) and belongs to this planned run."""
    from .runs import METRICS_FILE, read_json_file

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return False
    try:
        m = read_json_file(path)
    except SanfError:
        return False
    want = _result_identity(spec, {"score": score, "fingerprint": fingerprint})
    if not isinstance(m, dict) or any(m.get(k) != v for k, v in want.items()):
        return False
    if spec.is_flow:
        return (m.get("sweep") or {}).get("settings") == spec.fit_config().settings()
    return True


def _clean_tmp(run_dir: Path) -> None:
    """Before a run (re)starts: temporary files of an interrupted writer, and a metrics.json that is not this
    run's (a run is only started when it is not finished), so that metrics.json keeps meaning 'complete'."""
    from .runs import METRICS_FILE

    for stale in run_dir.glob(".*.tmp"):
        stale.unlink(missing_ok=True)
    (run_dir / METRICS_FILE).unlink(missing_ok=True)


def _score_blocks(model, normalizer, cls: np.ndarray, patch: np.ndarray | None, score: str, batch_size: int,
                  device) -> np.ndarray:
    """Scores of the test split in row blocks (bounded memory), as ``evaluate.eval_run`` does."""
    import torch

    from .evaluate import EVAL_BLOCK_BYTES
    from .train import score_flow

    model = model.to(device)
    row_bytes = max(1, (patch.shape[1] + 1 if patch is not None else 1) * cls.shape[1] * 4)
    rows = max(256, EVAL_BLOCK_BYTES // row_bytes)
    parts = []
    for start in range(0, len(cls), rows):
        x, p = normalizer.transform(cls[start:start + rows], None if patch is None else patch[start:start + rows])
        x = np.require(x, requirements=["W"])  # Ray hands out read-only arrays; torch wants writable ones
        p = None if p is None else np.require(p, requirements=["W"])
        parts.append(score_flow(model, torch.from_numpy(x), None if p is None else torch.from_numpy(p), score,
                                batch_size=batch_size))
    model.to("cpu")
    return np.concatenate(parts) if parts else np.zeros(0)


def _run_flow(spec: RunSpec, ctx: dict, test: dict, train: dict) -> dict:
    from .evaluate import SCORE_DESCRIPTIONS, compute_metrics, write_results
    from .runs import (
        CHECKPOINT_FILE,
        CONFIG_FILE,
        LOG_FILE,
        MODEL_FILE,
        load_run,
        now,
        read_json_file,
        read_jsonl,
        settings_id,
    )
    from .train import finish_run, fit_flow, resolve_device, start_run_config

    run_dir = Path(ctx["runs_dir"]) / spec.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    _clean_tmp(run_dir)
    cfg = spec.fit_config(ctx["device"])
    ci, name = spec.class_index, spec.class_name
    settings = {"fit": cfg.settings(), "cache_fingerprint": ctx["fingerprint"], "normal_class": ci}
    rid = settings_id(settings)
    dev = resolve_device(cfg.device)
    sweep_info = {"run_id": spec.run_id, "setting": spec.setting, "grid": spec.to_dict()["grid"], "seed": spec.seed}
    t0 = time.perf_counter()
    model = normalizer = log = config = None
    reused = False
    if (run_dir / MODEL_FILE).exists():  # fitted, but killed before its results were written
        try:
            loaded = load_run(run_dir)
            if loaded.config.get("settings") == settings and loaded.config.get("status") == "finished":
                model, normalizer, config = loaded.flow, loaded.normalizer, loaded.config
                log = read_jsonl(run_dir / LOG_FILE) if (run_dir / LOG_FILE).exists() else []
                reused = True
                (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # killed between saving the model and this
        except SanfError:
            pass
    if model is None:
        (run_dir / MODEL_FILE).unlink(missing_ok=True)
        created = now()
        if (run_dir / CONFIG_FILE).exists() and (run_dir / CHECKPOINT_FILE).exists():  # an unfinished fit
            with contextlib.suppress(SanfError, AttributeError):
                created = read_json_file(run_dir / CONFIG_FILE).get("created", created)
        config = start_run_config(run_dir, cfg, settings, class_index=ci, class_name=name,
                                  n_train=len(train["cls"]), cache_identity=ctx["cache_identity"], created=created,
                                  extra={"sweep": sweep_info})
        result = fit_flow(train["cls"], train.get("patch") if cfg.needs_patch else None, cfg, run_dir=run_dir,
                          quiet=True, description=f"fit {name}")
        finish_run(run_dir, config, result)
        model, normalizer, log = result.model, result.normalizer, result.log
    t_fit = time.perf_counter() - t0
    scores = _score_blocks(model, normalizer, test["cls"], test.get("patch") if cfg.needs_patch else None,
                           ctx["score"], cfg.eval_batch_size, dev)
    t_score = time.perf_counter() - t0 - t_fit
    is_anomaly = test["labels"] != ci
    metrics = compute_metrics(is_anomaly, scores)
    result_summary = config.get("result") or {}
    metrics.update(_result_identity(spec, ctx))
    metrics.update({
        "run_id": rid, "normal_class_name": name, "score_description": SCORE_DESCRIPTIONS[ctx["score"]],
        "epoch_selection": config.get("epoch_selection"), "best_epoch": result_summary.get("best_epoch"),
        "epochs_run": result_summary.get("epochs_run"), "n_train": config.get("n_train_total"),
        "n_nonfinite_scores": int((~np.isfinite(scores)).sum()), "run": str(run_dir), "cache": ctx["cache_path"],
        "flow": config.get("flow"), "fit": config.get("fit"), "evaluated": now(),
        "sweep": {**sweep_info, "settings": cfg.settings()},
    })
    write_results(run_dir, metrics, test["sample_ids"], test["labels"], is_anomaly, scores, train_log=log,
                  plots=ctx["plots"])
    n_seen = 0 if reused else int(result_summary.get("n_train") or 0) * int(result_summary.get("epochs_run") or 0)
    return {"run_id": spec.run_id, "auroc": metrics["auroc"], "fit_s": t_fit, "score_s": t_score,
            "write_s": time.perf_counter() - t0 - t_fit - t_score, "reused_model": reused,
            "train_samples_seen": n_seen, "n_test": len(scores)}


def _run_baseline(spec: RunSpec, ctx: dict, test: dict, train: dict) -> dict:
    from .baselines import baseline_settings, create_baseline, fit_score
    from .evaluate import compute_metrics, write_results
    from .runs import now, package_versions, write_json_atomic

    run_dir = Path(ctx["runs_dir"]) / spec.run_id
    run_dir.mkdir(parents=True, exist_ok=True)
    _clean_tmp(run_dir)
    t0 = time.perf_counter()
    scorer = create_baseline(spec.method)
    scores = fit_score(scorer, train["cls"], test["cls"], train.get("patch"), test.get("patch"))
    t_fit = time.perf_counter() - t0
    ci = spec.class_index
    is_anomaly = test["labels"] != ci
    metrics = compute_metrics(is_anomaly, scores)
    metrics.update(_result_identity(spec, ctx))
    metrics.update({"normal_class_name": spec.class_name, "score_description": scorer.description,
                    "epoch_selection": "not applicable (no training epochs; fitted on normal training data only)",
                    "n_train": int(len(train["cls"])), "cache": ctx["cache_path"], "evaluated": now(),
                    "settings": baseline_settings(scorer, spec.method),
                    "sweep": {"run_id": spec.run_id, "setting": spec.setting}})
    write_json_atomic(run_dir / "config.json", {
        "format": "sanf-baseline", "format_version": 1, "method": spec.method, "normal_class": ci,
        "normal_class_name": spec.class_name, "cache": ctx["cache_identity"], "created": now(),
        "versions": package_versions(), "sweep": {"run_id": spec.run_id, "setting": spec.setting}})
    write_results(run_dir, metrics, test["sample_ids"], test["labels"], is_anomaly, scores, plots=ctx["plots"])
    return {"run_id": spec.run_id, "auroc": metrics["auroc"], "fit_s": t_fit, "score_s": 0.0,
            "write_s": time.perf_counter() - t0 - t_fit, "reused_model": False, "train_samples_seen": 0,
            "n_test": len(scores)}


def execute_run(spec: RunSpec, ctx: dict, test: dict, train: dict) -> dict:
    """Run one planned run on in-memory arrays and write its folder; a SanfError becomes ``{"error": ...}``."""
    t0 = time.perf_counter()
    try:
        rec = _run_flow(spec, ctx, test, train) if spec.is_flow else _run_baseline(spec, ctx, test, train)
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
        from .runs import check_finite

        if self._test is None:
            t = time.perf_counter()
            cls, patch, labels, ids = self.cache.split("test").read_all(patch=self.needs_test_patch)
            self.read_s += time.perf_counter() - t
            self.reads.append({"what": "test", "rows": len(cls), "patch": patch is not None})
            check_finite(f"the test features in {self.cache.path}", cls, patch)
            self._test = {"cls": cls, "patch": patch, "labels": labels, "sample_ids": ids}
        return self._test

    def train(self, ci: int, patch: bool) -> dict:
        from .runs import check_finite

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


PRELOAD = ("torch._dynamo", "sanf_pipeline.train", "sanf_pipeline.flow", "sanf_pipeline.features",
           "sanf_pipeline.evaluate", "sanf_pipeline.baselines", "sanf_pipeline.report", "sklearn.metrics",
           "sklearn.covariance")
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
        mpctx.set_forkserver_preload(["sanf_pipeline.sweep", *PRELOAD, *(PRELOAD_PLOTS if ctx["plots"] else ())])
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

            _schedule(todo, max(2, 2 * workers), load_class,
                      lambda spec, descs: pool.submit(_pool_task, spec.to_dict(), descs),
                      lambda futs: wait(futs, return_when=FIRST_COMPLETED)[0], result, release_class, on_done)
    finally:
        shared.close()


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
    from .runs import remove_run_files, write_json_atomic

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
    elif out.is_dir() and any(p.name != LOCK_FILE and not _empty_runs_dir(p) for p in out.iterdir()) and not overwrite:
        raise SanfError(f"{out} exists and holds files that are not a sanf sweep; choose another --out (or pass "
                        f"--overwrite to write into it anyway)")
    runs_dir = out / RUNS_DIR
    if overwrite and runs_dir.is_dir():
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
    from .train import resolve_device

    return resolve_device(device).type == "cuda"


def run_sweep(cache, out, classes="all", grid=None, methods=(FLOW,), seeds=(0,), fixed=None, workers: int | None = None,
              executor: str = "local", *, device: str = "auto", score: str = "nll", plots: bool = True,
              overwrite: bool = False, quiet: bool = True, threads: int | None = None, start_method: str | None = None,
              ray_address: str | None = None, ray_cpus_per_task: float = 1.0, ray_gpus_per_task: float = 0.0,
              ray_init_kwargs: dict | None = None) -> SweepResult:
    """Plan, run (skipping finished runs) and summarise a sweep into ``out``; see the module docstring."""
    from .cache import open_cache
    from .evaluate import SCORES
    from .progress import progress_bar
    from .runs import cache_identity

    t_start = time.perf_counter()
    if executor not in EXECUTORS:
        raise SanfError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
    if score not in SCORES:
        raise SanfError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    if executor == "ray":
        import importlib.util

        if importlib.util.find_spec("ray") is None:
            raise SanfError(RAY_MISSING)
    if workers is not None and (isinstance(workers, bool) or int(workers) < 1):
        raise SanfError(f"--workers must be a positive integer, got {workers}")
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
            workers = 1 if gpu else cores
        workers = max(1, min(int(workers), len(todo) or 1))
        if threads is None:
            threads = cores if workers == 1 else max(1, cores // workers)
        ctx = {"runs_dir": str(runs_dir.resolve()), "fingerprint": fp, "cache_identity": cache_identity(c),
               "cache_path": str(cache), "score": score, "plots": bool(plots), "device": device}
        computed: list[dict] = []
        failed: list[dict] = []
        method_used = None
        data = _Data(c, any(s.needs_patch for s in todo))
        t_run = time.perf_counter()
        if todo:
            log_path = out / SWEEP_LOG
            with progress_bar(quiet, unit="runs") as bar:
                task = bar.add_task(f"sweep {out.name}", total=len(todo), rate="")

                def on_done(spec: RunSpec, rec: dict) -> None:
                    (failed if "error" in rec else computed).append(rec)
                    with open(log_path, "a", encoding="utf-8") as fh:
                        fh.write(json.dumps(rec, sort_keys=True, default=str) + "\n")
                    what = f"AUROC {rec['auroc']:.4f}" if "auroc" in rec else "FAILED"
                    bar.update(task, advance=1, description=f"sweep {out.name}: {spec.run_id} {what}")

                if executor == "ray":
                    threads = max(1, int(ray_cpus_per_task))
                    _run_ray(todo, ctx, data, ray_address, float(ray_cpus_per_task), float(ray_gpus_per_task),
                             on_done, ray_init_kwargs)
                    workers = 0
                elif workers == 1:
                    _run_serial(todo, ctx, data, threads, on_done)
                else:
                    method_used = _start_method(threads, gpu, start_method)
                    _run_pool(todo, ctx, data, workers, threads, method_used, on_done)
        t_run = time.perf_counter() - t_run
        c.close()
        t_sum = time.perf_counter()
        summary = write_summary(out)
        t_sum = time.perf_counter() - t_sum
    timings = {"wall_s": time.perf_counter() - t_start, "read_s": data.read_s, "run_s": t_run,
               "summary_s": t_sum, "reads": data.reads}
    result = SweepResult(out_dir=out, specs=specs, computed=computed, skipped=skipped, failed=failed,
                         removed=removed, summary=summary, timings=timings, executor=executor, workers=workers,
                         threads_per_worker=threads, start_method=method_used)
    if failed:
        first = failed[0]
        raise SanfError(f"{len(failed)} of {len(todo)} run(s) failed; first: {first['run_id']}: {first['error']}; "
                        f"the other results and the summary are in {out}; rerun the same command to retry the "
                        f"failed runs")
    return result


# -------------------------------------------------------------------------------------------------- summary
def _mean(xs):
    return float(np.mean(xs)) if xs else None


def _std(xs):
    return float(np.std(xs, ddof=1)) if len(xs) >= 2 else None


def summarize(sweep_dir) -> dict:
    """The summary of a sweep from the files on disk (plan.json + each run's metrics.json); no scoring."""
    from .runs import METRICS_FILE, read_json_file

    sweep_dir = Path(sweep_dir)
    plan = read_plan(sweep_dir)
    ident = plan.get("identity") or {}
    fp, score = ident.get("cache_fingerprint"), ident.get("score")
    specs = [RunSpec.from_dict(r) for r in plan["runs"]]
    classes = list(dict.fromkeys((s.class_index, s.class_name) for s in specs))
    settings = list(dict.fromkeys(s.setting for s in specs))
    methods = {s.setting: s.method for s in specs}
    rows = []
    for s in specs:
        run_dir = sweep_dir / RUNS_DIR / s.run_id
        row = {"run_id": s.run_id, "class_index": s.class_index, "class_name": s.class_name, "method": s.method,
               "setting": s.setting, "seed": s.seed, "status": "missing", "auroc": None, "aupr": None,
               "tpr_at_5_fpr": None, "n_train": None, "epochs_run": None, "best_epoch": None}
        if is_finished(run_dir, s, fp, score):
            m = read_json_file(run_dir / METRICS_FILE)
            row.update({k: m.get(k) for k in ("auroc", "aupr", "tpr_at_5_fpr", "n_train", "epochs_run",
                                              "best_epoch")})
            row["status"] = "finished"
        rows.append(row)
    cells: dict[str, dict[str, dict]] = {}
    for setting in settings:
        cells[setting] = {}
        for ci, cname in classes:
            mine = [r for r in rows if r["setting"] == setting and r["class_index"] == ci]
            done = [r for r in mine if r["status"] == "finished"]
            au = [r["auroc"] for r in done]
            cells[setting][cname] = {
                "auroc_mean": _mean(au), "auroc_std": _std(au), "n_runs": len(done), "n_planned": len(mine),
                "aurocs": au, "seeds": [r["seed"] for r in done],
                "aupr_mean": _mean([r["aupr"] for r in done]),
                "tpr_at_5_fpr_mean": _mean([r["tpr_at_5_fpr"] for r in done])}
    m_auroc = {}
    for setting in settings:
        per_class = [cells[setting][cn]["auroc_mean"] for _, cn in classes]
        complete = all(v is not None for v in per_class)
        # per seed: the mean over classes of that seed's runs (only seeds finished for every class)
        seeds = [r["seed"] for r in rows if r["setting"] == setting]
        per_seed = {}
        for seed in dict.fromkeys(seeds):
            vals = [r["auroc"] for r in rows if r["setting"] == setting and r["seed"] == seed
                    and r["status"] == "finished"]
            if len(vals) == len(classes):
                per_seed[str(seed)] = float(np.mean(vals))
        m_auroc[setting] = {"mean": _mean([v for v in per_class if v is not None]) if complete else None,
                            "std_over_seeds": _std(list(per_seed.values())) if methods[setting] == FLOW else None,
                            "per_seed": per_seed, "n_classes": sum(v is not None for v in per_class),
                            "complete": complete, "method": methods[setting]}
    n_done = sum(r["status"] == "finished" for r in rows)
    return {"format": "sanf-sweep-summary", "sweep": sweep_dir.name, "cache": (plan.get("cache") or {}).get("path"),
            "cache_fingerprint": fp, "score": score, "classes": [{"index": i, "name": n} for i, n in classes],
            "settings": settings, "grid": plan.get("grid"), "fixed": plan.get("fixed"), "seeds": plan.get("seeds"),
            "methods": plan.get("methods"), "n_runs": len(rows), "n_finished": n_done, "cells": cells,
            "m_auroc": m_auroc, "runs": rows,
            "notes": {"m_auroc": "mean over classes of the per-class AUROC (mean over seeds)",
                      "std": "sample standard deviation (ddof=1) over seeds; none with one seed or for baselines",
                      "auroc": "anomalies (test label != normal class) are the positive class"}}


def _pm(mean, std) -> str:
    if mean is None:
        return "missing"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def summary_csv(summary: dict) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["setting", "method", "class_index", "class_name", "n_runs", "n_planned", "auroc_mean", "auroc_std",
                "aupr_mean", "tpr_at_5_fpr_mean", "aurocs_per_seed"])

    def f(v):
        return "" if v is None else repr(float(v))

    for setting in summary["settings"]:
        for c in summary["classes"]:
            cell = summary["cells"][setting][c["name"]]
            w.writerow([setting, summary["m_auroc"][setting]["method"], c["index"], c["name"], cell["n_runs"],
                        cell["n_planned"], f(cell["auroc_mean"]), f(cell["auroc_std"]), f(cell["aupr_mean"]),
                        f(cell["tpr_at_5_fpr_mean"]), ";".join(repr(float(a)) for a in cell["aurocs"])])
        m = summary["m_auroc"][setting]
        w.writerow([setting, m["method"], "", "M-AUROC", m["n_classes"], len(summary["classes"]), f(m["mean"]),
                    f(m["std_over_seeds"]), "", "", ";".join(repr(v) for v in m["per_seed"].values())])
    return buf.getvalue()


def summary_markdown(summary: dict) -> str:
    from .report import markdown_table

    settings = summary["settings"]
    out = [f"# Sweep {summary['sweep']}", "",
           f"- cache: {summary['cache']} (fingerprint {summary['cache_fingerprint']})",
           f"- runs finished: {summary['n_finished']} of {summary['n_runs']}",
           f"- flow score: `{summary['score']}`; anomalies (test label != normal class) are the positive class",
           f"- methods: {', '.join(summary.get('methods') or [])}; seeds: "
           f"{', '.join(map(str, summary.get('seeds') or []))} (baselines are seed-independent: one run per class)",
           f"- grid: {json.dumps(summary.get('grid') or {})}; fixed settings: {json.dumps(summary.get('fixed') or {})}",
           "- cells: AUROC, mean ± sample std over seeds; M-AUROC: mean over classes", "",
           "## AUROC per class and setting", ""]
    rows = []
    for c in summary["classes"]:
        row = {"class": f"{c['index']} {c['name']}"}
        for s in settings:
            cell = summary["cells"][s][c["name"]]
            row[s] = _pm(cell["auroc_mean"], cell["auroc_std"])
        rows.append(row)
    rows.append({"class": "**M-AUROC**", **{s: _pm(summary["m_auroc"][s]["mean"],
                                                    summary["m_auroc"][s]["std_over_seeds"]) for s in settings}})
    out.append(markdown_table(rows, ["class", *settings]))
    ranked = sorted(settings, key=lambda s: -(summary["m_auroc"][s]["mean"] if summary["m_auroc"][s]["mean"]
                                               is not None else -math.inf))
    out += ["## Settings by M-AUROC", "",
            markdown_table([{"rank": i + 1, "setting": s, "M-AUROC": summary["m_auroc"][s]["mean"],
                             "std over seeds": summary["m_auroc"][s]["std_over_seeds"],
                             "classes": summary["m_auroc"][s]["n_classes"]} for i, s in enumerate(ranked)],
                           ["rank", "setting", "M-AUROC", "std over seeds", "classes"]),
            f"![AUROC heatmap]({HEATMAP_PNG})", ""]
    missing = [r["run_id"] for r in summary["runs"] if r["status"] != "finished"]
    if missing:
        out += [f"**{len(missing)} run(s) not finished**: {', '.join(missing[:20])}"
                + (" ..." if len(missing) > 20 else ""), ""]
    return "\n".join(out)


def plot_heatmap(path, summary: dict) -> Path:
    """Class x setting AUROC (mean over seeds), the M-AUROC as the last row; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = summary["settings"]
    names = [c["name"] for c in summary["classes"]]
    grid = np.full((len(names) + 1, len(settings)), np.nan)
    for j, s in enumerate(settings):
        for i, n in enumerate(names):
            v = summary["cells"][s][n]["auroc_mean"]
            grid[i, j] = np.nan if v is None else v
        m = summary["m_auroc"][s]["mean"]
        grid[-1, j] = np.nan if m is None else m
    fig = Figure(figsize=(max(4.0, 1.0 + 1.1 * len(settings)), max(3.0, 0.8 + 0.42 * (len(names) + 1))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = grid[np.isfinite(grid)]
    lo = float(finite.min()) if finite.size else 0.5
    hi = float(finite.max()) if finite.size else 1.0
    if not hi > lo:
        lo, hi = lo - 0.01, hi + 0.01
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels([s.replace(" ", "\n") for s in settings], fontsize=8)
    ax.set_yticks(range(len(names) + 1))
    ax.set_yticklabels([*names, "M-AUROC"], fontsize=8)
    ax.axhline(len(names) - 0.5, color="white", linewidth=2)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            text = "—" if not np.isfinite(v) else f"{v:.3f}"
            dark = np.isfinite(v) and (v - lo) / (hi - lo) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if dark else "white")
    ax.set_title(f"AUROC, sweep {summary['sweep']} (mean over seeds)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    from .report import save_png

    return save_png(fig, path)


def write_summary(sweep_dir) -> dict:
    """(Re-)render summary.csv, summary.json, summary.md and heatmap.png from the run folders on disk."""
    from .runs import write_json_atomic, write_text_atomic

    sweep_dir = Path(sweep_dir)
    summary = summarize(sweep_dir)
    write_text_atomic(sweep_dir / SUMMARY_CSV, summary_csv(summary))
    write_json_atomic(sweep_dir / SUMMARY_JSON, summary)
    write_text_atomic(sweep_dir / SUMMARY_MD, summary_markdown(summary))
    plot_heatmap(sweep_dir / HEATMAP_PNG, summary)
    return summary


__all__ = ["FLOW", "RunSpec", "SweepResult", "execute_run", "format_value", "parse_fixed", "parse_grid",
           "parse_methods", "parse_seeds", "parse_value", "plan_sweep", "read_plan", "resolve_classes", "run_sweep",
           "safe_id", "summarize", "write_summary"]
