"""The plan of a sweep: parsing the options, the planned runs (``RunSpec``) and their stable ids, ``plan.json``.

Grid keys are ``FitConfig`` fields and apply to ``flow`` runs only; ``fixed`` settings (``--set key=value``) apply
to every flow run; baselines (``models.BASELINES``) run once per class (they are seed-independent). Run ids are
readable and stable, e.g. ``cat-flow-fusion=gap-clamp=3-s0`` and ``cat-knn``; characters other than letters,
digits and ``._=+-`` become ``_`` and then a short hash of the original id is appended, so ids stay unique.
``is_finished`` says whether a run folder holds this planned run's complete results (``metrics.json``, written
last, with the run's identity).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import SanfError

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
SWEEP_FILES = (PLAN_FILE, SUMMARY_CSV, SUMMARY_JSON, SUMMARY_MD, HEATMAP_PNG, SWEEP_LOG)
FLOW = "flow"
EXECUTORS = ("local", "ray")
NOT_GRID = {"seed": "use --seeds", "device": "use --device"}
MAX_RUN_ID = 160
RAY_MISSING = "--executor ray needs Ray, an optional extra: pip install 'sanf[ray]' (or use --executor local)"
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")


# ------------------------------------------------------------------------------------------------ parsing
def _fit_fields() -> dict[str, dataclasses.Field]:
    from ..train.config import FitConfig

    return {f.name: f for f in dataclasses.fields(FitConfig)}


def _unknown_key(key: str, what: str) -> SanfError:
    valid = sorted(k for k in _fit_fields() if k not in NOT_GRID)
    return SanfError(f"unknown {what} key {key!r}; valid keys are the fit settings: {', '.join(valid)}")


def parse_value(key: str, text) -> Any:
    """One value of the FitConfig field ``key`` from text (``2``, ``2.5``, ``true``, ``none``, ``0.9:0.999``),
    converted by the click type of `sanf fit`'s option for it (``train.options.fit_value_type``): `--set`/`--grid` and
    `sanf fit` accept the same values, ranges included; ``FitConfig.validate`` then checks both alike."""
    import click

    from ..train.options import fit_value_type

    if key not in _fit_fields():
        raise _unknown_key(key, "setting")
    if text is None:
        return None
    if isinstance(text, (list, tuple)):
        text = ":".join(str(x) for x in text)
    t = str(text).strip()  # API values go through the same parsing as CLI text, so 2 and "2" plan the same run
    kind = fit_value_type(key)
    try:
        return kind.convert(t, None, None)
    except click.BadParameter as exc:
        if isinstance(kind, click.Choice):  # worded as FitConfig.validate words a bad choice
            raise SanfError(f"invalid {key}={t!r}: choose one of {', '.join(map(str, kind.choices))}") from None
        raise SanfError(f"invalid value {text!r} for {key}: {exc.message}") from None


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


def method_names() -> list[str]:
    """``flow`` and every registered baseline (``models.BASELINES``)."""
    from ..models import BASELINES

    return [FLOW, *BASELINES]


def parse_methods(value) -> list[str]:
    from ..train.options import BUILTIN

    methods = _csv_list(value if value is not None else FLOW, "--methods")
    if set(methods) <= {FLOW, *BUILTIN["_baselines"]}:  # built-in names: no registry, so no torch (CLI checks)
        return methods
    valid = method_names()
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
            from ..models import needs_patch

            return needs_patch(self.method)
        return self.fit_config().needs_patch

    def fit_config(self, device: str | None = None):
        from ..train.config import FitConfig

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
    from ..train.config import training_length

    return training_length(fixed, set(grid))


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
    from ..train.config import FitConfig

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
    from ..cache import open_cache

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
    from ..cache import open_cache

    with open_cache(cache) as c:
        return list(c.class_names)


def make_plan(specs: list[RunSpec], cache, *, classes: list[int], grid: dict, methods: list[str], seeds: list[int],
              fixed: dict, score: str) -> dict:
    from ..store.atomic import now
    from ..store.run_folder import cache_identity

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
    from ..cache.schema import read_json_file  # not runs': `sanf report` checks the folder before torch is imported

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
    from ..cache.schema import read_json_file
    from ..store.run_folder import METRICS_FILE

    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return False
    try:
        m = read_json_file(path)
    except SanfError:
        return False
    want = _result_identity(spec, {"score": score, "fingerprint": fingerprint})
    if not isinstance(m, dict):
        return False
    if spec.is_flow:  # a flow's "auto" score is resolved per run; metrics.json keeps what was asked for
        m = {**m, "score": m.get("score_requested", m.get("score"))}
    if any(m.get(k) != v for k, v in want.items()):
        return False
    if spec.is_flow:
        return (m.get("sweep") or {}).get("settings") == spec.fit_config().settings()
    return True

