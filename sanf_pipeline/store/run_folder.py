"""Run folders: what a fit leaves on disk and how it is read back, with no pickle anywhere (the writes themselves:
``store.atomic``).

A run folder (``runs/<name>/``)::

    config.json              every setting, the cache's provenance + fingerprint, the normal class, the result
    model.safetensors        flow state (``flow.*``) + normaliser statistics (``normalizer.*``); the config JSON
                             again in the safetensors metadata (key ``sanf``); written last: it marks a finished run
    train_log.jsonl          one JSON object per completed epoch
    checkpoint.safetensors   while a fit is unfinished: model + optimiser state + RNG state after the last
                             checkpointed epoch (``FitConfig.checkpoint_every``; train_log.jsonl may be ahead of
                             it); JSON state in the metadata; removed when the fit finishes
    metrics.json, scores.csv, report.md, *.png   written by ``sanf eval`` (``jobs/``, files: ``evaluate/metrics.py``)

This module writes and reads these files; it never builds a model (``jobs.flow.load_run`` rebuilds a run's flow).
Every file is written to a temporary name and moved into place (``os.replace``), so a reader sees the old
file or the new one, never half of one. Runs may come from someone else: tensors are read only with
safetensors, JSON only with a size limit, and nothing else in the folder (``*.pt``, ``*.pkl``, ...) is ever
opened.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..cache.schema import diff_settings, read_json_file
from ..errors import SanfError
from .atomic import (
    _os_error,
    now,
    package_versions,
    save_tensors_atomic,
    settings_id,
    write_json_atomic,
    write_jsonl_atomic,
)

RUN_FORMAT = "sanf-run"
RUN_FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"
LOG_FILE = "train_log.jsonl"
METRICS_FILE = "metrics.json"
SCORES_FILE = "scores.csv"
REPORT_FILE = "report.md"
HIST_PNG = "score_hist.png"
ROC_PNG = "roc.png"
MAPS_PNG = "maps.png"
RESULT_FILES = (METRICS_FILE, SCORES_FILE, REPORT_FILE, HIST_PNG, ROC_PNG, MAPS_PNG)
# the model file's held-out normal evidence maps (token grids, one per map kind), behind a run's pixel threshold
HELD_OUT_MAP_PREFIX = "held_out_map."
RUN_FILES = (CONFIG_FILE, MODEL_FILE, CHECKPOINT_FILE, LOG_FILE, *RESULT_FILES)


# ------------------------------------------------------------------------------------------ cache identity
def cache_identity(cache) -> dict:
    """What a run records about the cache it was trained on (provenance + the keys compat.py checks at eval time)."""
    meta = cache.meta
    bb = meta.get("backbone") or {}
    return {
        "path": str(Path(cache.path).resolve()),
        "fingerprint": cache.fingerprint,
        "dim": cache.dim,
        **({"patch_dim": cache.patch_dim} if cache.patch_dim != cache.dim else {}),
        "num_tokens": cache.num_tokens,
        "class_names": cache.class_names,
        "backbone": bb,
        "grid": meta.get("grid"),
        "dataset": meta.get("dataset"),
        "settings": meta.get("settings"),
        "dtype": meta.get("dtype"),
        "storage": meta.get("storage"),
    }


# --------------------------------------------------------------------------------------------- run folders
def check_finite(name: str, *arrays: np.ndarray | None) -> None:
    for a in arrays:
        if a is None:
            continue
        finite = np.isfinite(a)
        if not finite.all():
            rows = int((~finite.reshape(len(a), -1)).any(axis=1).sum())
            raise SanfError(f"{name} holds NaN/Inf values ({rows} row(s)); the cache is damaged or the backbone "
                            f"overflowed: check it with `sanf cache verify` and re-extract (e.g. --dtype float32)")


def is_sanf_folder(folder) -> bool:
    """Whether ``folder`` holds a config.json that sanf wrote (a run's or a baseline's) or the metrics.json of an
    ``eval --out``: sanf's own metadata, the only thing that lets sanf replace or remove files there
    (docs/file-safety.md)."""
    for name, is_ours in ((CONFIG_FILE, lambda d: str(d.get("format", "")).startswith("sanf-")),
                          (METRICS_FILE, lambda d: "cache_fingerprint" in d and "auroc" in d)):  # `eval --out`
        path = Path(folder) / name
        if not path.is_file():
            continue
        try:
            doc = read_json_file(path)
        except SanfError:
            continue
        if isinstance(doc, dict) and is_ours(doc):
            return True
    return False


def refuse_foreign_files(folder, names, option: str = "--out") -> None:
    """Refuse, whatever the flags, to write files named ``names`` into a folder that is not sanf's when one of them
    is there already: it is the user's file, and an atomic replace would delete it."""
    folder = Path(folder)
    if not folder.is_dir() or is_sanf_folder(folder):
        return
    taken = [n for n in names if (folder / n).exists() or (folder / n).is_symlink()]
    if taken:
        raise SanfError(f"{folder} is not a sanf folder but holds {', '.join(taken[:3])}, which sanf would replace; "
                        f"sanf never overwrites files it did not make, even with --overwrite: choose another {option}")


def run_state(run_dir) -> str:
    """'absent' (no folder or an empty one), 'foreign' (files but no run), 'unfinished', 'finished'."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        return "absent"
    if not run_dir.is_dir():
        return "foreign"
    if not is_sanf_folder(run_dir):  # a model.safetensors or config.json of the user's is not a run
        return "foreign" if any(run_dir.iterdir()) else "absent"
    if (run_dir / MODEL_FILE).exists():
        return "finished"
    return "unfinished"


def prepare_out_dir(out_dir, settings: dict, *, overwrite: bool, what: str = "run",
                    finished_hint: str = "", convert=None) -> str:
    """Decide what to do with ``out_dir`` before a job writes there; returns 'new' or 'resume'. ``convert``: turns
    a recorded identity into today's terms before it is compared (``fit_config.current_run_settings``).

    A finished folder or one with other settings is refused unless ``overwrite`` (then only sanf's own files
    are removed); a folder holding other files is refused unless ``overwrite``.
    """
    out_dir = Path(out_dir)
    state = run_state(out_dir)
    if state == "foreign" and not out_dir.is_dir():
        raise SanfError(f"{out_dir} exists and is not a folder; choose another --out")
    if state == "foreign":
        refuse_foreign_files(out_dir, RUN_FILES)
    if state == "foreign" and not overwrite:
        raise SanfError(f"{out_dir} exists and holds files that are not a sanf {what}; choose another --out "
                        f"(or pass --overwrite to add the {what}'s files beside them; sanf replaces none of them)")
    if state == "finished" and not overwrite:
        raise SanfError(f"{out_dir} already holds a finished {what}{finished_hint}; pass --overwrite to replace it "
                        f"or choose another --out")
    result = "new"
    if state == "unfinished":
        old = read_json_file(out_dir / CONFIG_FILE, f"{out_dir / CONFIG_FILE}")
        old_settings = old.get("settings") if isinstance(old, dict) else None
        if convert is not None:
            old_settings = convert(old_settings)
        if old_settings == settings:
            result = "resume"
        elif not overwrite:
            diff = diff_settings(old_settings or {}, settings)
            shown = ", ".join(diff[:6]) + (f" and {len(diff) - 6} more" if len(diff) > 6 else "")
            raise SanfError(f"{out_dir} holds an unfinished {what} with other settings ({shown}); rerun with the "
                            f"same settings to resume it, choose another --out, or pass --overwrite")
    if overwrite and result == "new" and out_dir.is_dir():
        remove_run_files(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-test.{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise _os_error(exc, out_dir, "write to") from None
    for stale in out_dir.glob(".*.tmp"):  # temporary files of an interrupted writer: never trusted
        if any(stale.name.startswith(f".{n}.") and stale.name[len(n) + 2:-4].isdigit() for n in RUN_FILES):
            stale.unlink(missing_ok=True)  # only .<run file>.<pid>.tmp: another hidden .tmp file is not ours
    return result


def remove_run_files(run_dir) -> None:
    """Remove sanf's own files from a run folder (nothing else; nothing at all from a folder that is not sanf's)."""
    run_dir = Path(run_dir)
    if not is_sanf_folder(run_dir):
        return
    try:
        for name in RUN_FILES:
            (run_dir / name).unlink(missing_ok=True)
    except OSError as exc:
        raise _os_error(exc, run_dir, "clean") from None


def default_run_name(cache_path, class_name: str, suffix: str = "") -> Path:
    stem = Path(str(cache_path).rstrip("/\\")).name
    for ext in (".h5", ".hdf5", ".zarr"):
        if stem.endswith(ext):
            stem = stem[: -len(ext)]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{stem}-{class_name}{suffix}")
    return Path("runs") / safe.strip(".")


# ------------------------------------------------------------------------------------ writing a flow run
def fit_as_run(cfg) -> dict:
    """The fit settings as the run used them (``config.json: fit``, the report): only the training-length keys
    that applied (``epochs`` or the early-stopping ones), and ``amp`` true only where mixed precision ran (GPU).
    The run's identity is ``settings`` (``FitConfig.settings``), not this."""
    from ..device import amp_dtype, resolve_device

    d = cfg.to_dict()
    d.pop("checkpoint_every")  # how often the fit was saved, not how it trained: a sweep and `sanf fit` agree
    for k in (("val_fraction", "patience", "max_epochs", "min_delta") if not cfg.early_stopping else ("epochs",)):
        d.pop(k, None)
    d["amp"] = amp_dtype(resolve_device(cfg.device), cfg.amp) is not None
    return d


def start_run_config(run_dir, cfg, settings: dict, *, class_index: int, class_name: str, n_train: int,
                     cache_identity: dict, created: str, extra: dict | None = None) -> dict:
    """Write (atomically) and return the ``config.json`` of a flow run (``cfg``: a FitConfig) about to train."""
    from ..device import resolve_device

    config = {
        "format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "kind": "flow", "method": "sanf-flow",
        "run_id": settings_id(settings), "settings": settings, "fit": fit_as_run(cfg),
        "normal_class": class_index, "normal_class_name": class_name, "n_train_total": int(n_train),
        "cache": cache_identity, "epoch_selection": cfg.epoch_selection, "device": str(resolve_device(cfg.device)),
        "created": created, "versions": package_versions(), "status": "running", **(extra or {}),
    }
    write_json_atomic(Path(run_dir) / CONFIG_FILE, config)
    return config


def finish_run(run_dir, config: dict, result) -> None:
    """Mark ``config`` finished, then write config, training log and model; drop the epoch checkpoint last."""
    run_dir = Path(run_dir)
    part = getattr(result, "patch_score", None)
    config.update({"flow": result.model.config(), "normalizer": result.normalizer.config(),
                   "result": result.summary(), "status": "finished", "finished": now(),
                   "calibration": getattr(result, "calibration", None),
                   "patch_score": None if part is None else part.part_config()})
    skipped = getattr(result, "patch_score_skipped", None)
    if skipped:
        config["patch_score_skipped"] = skipped
    write_json_atomic(run_dir / CONFIG_FILE, config)
    write_jsonl_atomic(run_dir / LOG_FILE, result.log)
    extra = {} if part is None else part.tensors()
    extra.update(held_out_map_tensors(getattr(result, "held_out_maps", None)))
    save_model(run_dir, result.model, result.normalizer, config, extra=extra)
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)


def save_model(run_dir, flow, normalizer, config: dict, extra: dict | None = None) -> Path:
    """``model.safetensors``: flow state + normaliser statistics (+ ``extra`` tensors: the run's patch score);
    the run config as JSON metadata."""
    tensors = {f"flow.{k}": v for k, v in flow.state_dict().items()}
    tensors.update(normalizer.tensors())
    tensors.update(extra or {})
    path = Path(run_dir) / MODEL_FILE
    save_tensors_atomic(path, tensors, config)
    return path


def held_out_map_tensors(maps: dict | None) -> dict:
    """Held-out evidence maps (``{kind: (n, H, W)}``) as model-file tensors."""
    import torch

    return {HELD_OUT_MAP_PREFIX + k: torch.as_tensor(np.ascontiguousarray(v, np.float32)) for k, v in
            (maps or {}).items()}


def held_out_maps_of(tensors: dict) -> dict[str, np.ndarray]:
    """The held-out evidence maps in a model file's tensors (empty for runs written before maps)."""
    n = len(HELD_OUT_MAP_PREFIX)
    return {k[n:]: v.float().numpy() for k, v in tensors.items() if k.startswith(HELD_OUT_MAP_PREFIX)}


def read_run_config(run_dir) -> dict:
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise SanfError(f"run folder {run_dir} does not exist; create it with `sanf fit`")
    path = run_dir / CONFIG_FILE
    if not path.exists():
        raise SanfError(f"{run_dir} is not a sanf run (no {CONFIG_FILE}); create it with `sanf fit`")
    config = read_json_file(path)
    if not isinstance(config, dict) or config.get("format") != RUN_FORMAT:
        raise SanfError(f"{path} is not a sanf run config")
    if int(config.get("format_version", 0)) > RUN_FORMAT_VERSION:
        raise SanfError(f"{run_dir} was written by a newer sanf (run format {config['format_version']}); upgrade sanf")
    return config
