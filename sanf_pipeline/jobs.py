"""The run jobs: one code path per kind of run, shared by `sanf fit`/`eval`/`baseline`, `sanf sweep` and `sanf demo`.

A job works on arrays that its caller has read (``TrainData``: the normal class's training rows; ``TestData``: the
test split, in memory or streamed from a cache in blocks), so the sweep can read the cache once and pass shared
memory in, while the single-run commands read just what one run needs. Jobs write every result file.

- ``fit_flow_job``: fit a flow into a run folder (``config.json``, checkpoints, ``train_log.jsonl``,
  ``model.safetensors``), resuming an unfinished fit of the same settings and data.
- ``eval_flow_job``: score the test split with a fitted flow and write ``metrics.json``, ``scores.csv``,
  ``report.md`` and the plots.
- ``flow_job``: both (reusing a model already fitted into the folder): a sweep's flow run.
- ``baseline_job``: fit a registered baseline on the class tokens, score, write the same result files.

The cache-reading wrappers behind the CLI are here too: ``fit_run`` (`sanf fit`), ``eval_run`` (`sanf eval`),
``baseline_run`` (`sanf baseline`), and ``load_run`` rebuilds a finished run's flow and normaliser.
So for one class, settings and seed a sweep run's ``scores.csv`` is byte-identical to `sanf fit` + `sanf eval`
(same torch thread count; tests/test_sweep.py), and its ``metrics.json`` differs only in where and when it was
written (``run``, ``evaluated``) and the sweep's own keys (``sweep``, ``sweep_run_id``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .device import resolve_device
from .errors import SanfError
from .evaluate import compute_metrics, guard_results, write_results
from .fit_config import current_run_settings
from .models import (
    PATCH_KINDS,
    AnomalyModel,
    Combined,
    FlowModel,
    add_patch_score,
    baseline_tensors,
    create_baseline,
    flow_uses_patch,
    resolve_score,
    score_arrays,
    score_blocks,
)
from .models.combined import fit_patch_part, patch_part_key
from .runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOG_FILE,
    MODEL_FILE,
    RESULT_FILES,
    cache_identity,
    check_finite,
    default_run_name,
    diff_settings,
    finish_run,
    load_tensors,
    now,
    package_versions,
    prepare_out_dir,
    read_json_file,
    read_jsonl,
    read_run_config,
    refuse_foreign_files,
    run_state,
    save_tensors_atomic,
    start_run_config,
    write_json_atomic,
)
from .scoring import SCORE_DESCRIPTIONS, block_rows
from .train import FitConfig, FitResult, fit_flow

BASELINE_EPOCH_SELECTION = "not applicable (no training epochs; fitted on normal training data only)"


# ---------------------------------------------------------------------------------------------- job inputs
@dataclass
class TrainData:
    """The normal class's training rows (valid rows only, finite): ``cls (n, d)``, ``patch (n, T, d)`` or None."""

    cls: np.ndarray
    patch: np.ndarray | None
    class_index: int
    class_name: str

    @classmethod
    def from_cache(cls_, cache, class_index: int, patch: bool) -> TrainData:
        cls, tokens = cache.split("train").read_class(class_index, patch=patch)
        name = cache.class_names[class_index]
        if len(cls) == 0:
            raise SanfError(f"class {name!r} has no valid training samples in {cache.path}")
        check_finite(f"the training features of class {name!r} in {cache.path}", cls, tokens)
        return cls_(cls, tokens, class_index, name)


@dataclass
class TestData:
    """The test split of a cache: labels, sample ids and raw rows in blocks (``blocks``), with the cache's identity.

    ``from_arrays``: rows already in memory (a sweep); ``from_cache``: streamed from an open cache block by block
    (bounded memory), checked for NaN/Inf block by block."""

    labels: np.ndarray
    sample_ids: list[str]
    dim: int
    num_tokens: int
    n: int
    read: Callable[[int, int, bool], tuple[np.ndarray, np.ndarray | None]]
    fingerprint: str
    cache_path: str
    identity: dict = field(default_factory=dict)

    @classmethod
    def from_arrays(cls_, cls, patch, labels, sample_ids, *, num_tokens: int, fingerprint: str, cache_path: str,
                    identity: dict | None = None) -> TestData:
        def read(start, stop, with_patch):
            if with_patch and patch is None:
                raise SanfError("this run needs the test patch tokens, which were not read")
            return cls[start:stop], (patch[start:stop] if with_patch else None)

        return cls_(labels, sample_ids, int(cls.shape[1]), int(num_tokens), len(cls), read, fingerprint,
                    str(cache_path), identity or {})

    @classmethod
    def from_cache(cls_, cache, cache_path=None) -> TestData:
        split = cache.split("test")

        def read(start, stop, with_patch):
            cls, patch = split.read(start, stop, patch=with_patch)
            if len(cls):
                check_finite(f"the test features in {cache.path}", cls, patch)
            return cls, patch

        return cls_(split.labels, split.sample_ids, cache.dim, cache.num_tokens, split.n, read, cache.fingerprint,
                    str(cache_path if cache_path is not None else cache.path), cache_identity(cache))

    def blocks(self, with_patch: bool) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
        rows = block_rows(self.dim, self.num_tokens, with_patch)
        for start in range(0, self.n, rows):
            yield self.read(start, min(start + rows, self.n), with_patch)

    def class_tokens(self) -> np.ndarray:
        parts = [c for c, _ in self.blocks(False)]
        return np.concatenate(parts) if parts else np.zeros((0, self.dim), np.float32)


@dataclass
class EvalResult:
    out_dir: Path
    metrics: dict
    paths: dict
    scores: np.ndarray
    is_anomaly: np.ndarray
    parts: dict = field(default_factory=dict)


BaselineRun = EvalResult


@dataclass
class FitRun:
    run_dir: Path
    config: dict
    result: FitResult
    resumed: bool = False
    extra: dict = field(default_factory=dict)
    already_finished: bool = False  # the folder held this finished run already (``result`` is then None)


@dataclass
class LoadedRun:
    """A finished flow run read back from its folder: ``flow_model`` (normaliser + flow), ``patch_score`` (the
    ``Combined`` model of its patch part, None for the flow alone); ``model(kind)`` the module of a score kind."""

    run_dir: Path
    config: dict
    flow_model: FlowModel
    extra: dict = field(default_factory=dict)
    patch_score: Combined | None = None

    @property
    def flow(self) -> torch.nn.Module:
        return self.flow_model.flow

    @property
    def normalizer(self):
        return self.flow_model.normalizer

    @property
    def needs_patch(self) -> bool:
        """The flow takes patch tokens."""
        return flow_needs_patch(self.config)

    def model(self, score: str = "auto") -> AnomalyModel:
        """The run's model scoring ``score`` (a kind of ``RUN_SCORES``; ``auto``: the run's default)."""
        return run_model(self.flow_model, self.patch_score, resolve_score(score, self.config, self.run_dir))


def run_model(flow_model: FlowModel, patch_score: Combined | None, kind: str) -> AnomalyModel:
    """The module of score ``kind`` for a flow run (its flow, or its combined model)."""
    if kind in PATCH_KINDS:
        if patch_score is None:
            raise SanfError(f"the {kind} score needs the run's patch part; the run has none")
        return patch_score.with_score(kind)
    return flow_model.with_score(kind)


def load_run(run_dir, device: str = "cpu") -> LoadedRun:
    """Rebuild the flow, the normaliser and the patch part of a finished run (safetensors + JSON only)."""
    run_dir = Path(run_dir)
    config = read_run_config(run_dir)
    config["settings"] = current_run_settings(config.get("settings"))  # an older identity version, in today's terms
    model_path = run_dir / MODEL_FILE
    if not model_path.exists() and config.get("model_kept") is False:
        raise SanfError(f"run {run_dir} finished but its model was not kept (a sweep keeps models only with "
                        f"--keep-models); its results are in the folder, to score again refit it with `sanf fit`")
    if not model_path.exists():
        raise SanfError(f"run {run_dir} is incomplete (no {MODEL_FILE}): its fit did not finish; rerun the same "
                        f"`sanf fit` command to resume it")
    tensors, meta = load_tensors(model_path)
    if meta.get("run_id") != config.get("run_id"):
        raise SanfError(f"{model_path} does not belong to {run_dir / CONFIG_FILE} (run ids differ); the folder mixes "
                        f"files of two runs, refit it")
    flow_model = FlowModel.from_state(meta.get("flow"), meta.get("normalizer") or {}, tensors, where=str(model_path))
    part = config.get("patch_score")
    patch_score = Combined.from_state(flow_model, part, tensors) if part else None
    flow_model.to(device)
    if patch_score is not None:
        patch_score.to(device)
    return LoadedRun(run_dir=run_dir, config=config, flow_model=flow_model, patch_score=patch_score)


def flow_needs_patch(config: dict) -> bool:
    """Whether the flow of a run ``config`` takes patch tokens (a fusion, or the spatial main input)."""
    return flow_uses_patch(config.get("flow") or {})


def fit_settings(cfg: FitConfig, fingerprint: str, class_index: int) -> dict:
    """What identifies a flow run (``config.json: settings``; its hash is the run id)."""
    return {"fit": cfg.settings(), "cache_fingerprint": fingerprint, "normal_class": class_index}


# ------------------------------------------------------------------------------------------------ the jobs
def fit_flow_job(run_dir, cfg: FitConfig, train: TrainData, *, fingerprint: str, cache_info: dict,
                 created: str | None = None, resumed: bool = False, extra: dict | None = None, quiet: bool = True,
                 callback=None, parts: PatchParts | None = None) -> tuple[dict, FitResult]:
    """Fit a flow on ``train`` into ``run_dir``: config first, epoch checkpoints (``cfg.checkpoint_every``), model
    last. ``parts``: patch parts already fitted by other runs of a sweep (reused when their key matches)."""
    run_dir = Path(run_dir)
    settings = fit_settings(cfg, fingerprint, train.class_index)
    config = start_run_config(run_dir, cfg, settings, class_index=train.class_index, class_name=train.class_name,
                              n_train=len(train.cls), cache_identity=cache_info, created=created or now(),
                              extra=extra)
    if resumed:
        config["resumed"] = now()
        write_json_atomic(run_dir / CONFIG_FILE, config)
    result = fit_flow(train.cls, train.patch if cfg.flow_needs_patch else None, cfg, run_dir=run_dir, quiet=quiet,
                      callback=callback, description=f"fit {train.class_name}")
    result.patch_part_key = attach_patch_part(result, cfg, train, fingerprint, parts, quiet=quiet)
    finish_run(run_dir, config, result)
    return config, result


PARTS_DIR = "parts"  # a sweep folder's shared patch parts (sweep/run.py removes each once its runs are done)


class PatchParts:
    """A sweep's fitted patch parts, by ``combined.patch_part_key``: a patch-knn bank, its held-out scores and, once
    computed, its test scores, so flow runs that differ in flow settings only fit and score one bank. In memory
    (the ``keep`` most recently used; banks are large) and, with ``root``, in ``root/<key>.safetensors`` so that
    every worker process of a sweep (and a resumed sweep) finds a part another one fitted; a worker fitting a part
    holds ``root/<key>.lock`` (flock: released by the kernel if the worker dies), so each is fitted once."""

    def __init__(self, root=None, keep: int = 2):
        self.root, self.keep, self.items = (Path(root) if root else None), int(keep), {}
        self.fitted = self.reused = 0

    @staticmethod
    def key(cfg: FitConfig, fingerprint: str, class_index: int) -> str:
        import hashlib
        import json

        text = json.dumps(patch_part_key(cfg, fingerprint, class_index), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def _remember(self, key: str, item: dict) -> dict:
        self.items.pop(key, None)
        self.items[key] = item  # most recently used last
        while len(self.items) > self.keep:
            self.items.pop(next(iter(self.items)))
        return item

    def _load(self, key: str) -> dict | None:
        from .models import PatchKNN

        path = self.root / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            tensors, meta = load_tensors(path)
            bank = PatchKNN.from_config(meta["bank"])
            bank.bank = tensors["bank"]
            test = tensors["test"].numpy() if "test" in tensors else None
            return {"bank": bank, "held_out": tensors["held_out"].numpy(), "test": test}
        except (SanfError, KeyError, TypeError):
            return None  # damaged (a kill mid-write leaves only a temporary file, so rare): fitted again

    def _save(self, key: str, item: dict) -> None:
        tensors = {"bank": item["bank"].bank, "held_out": torch.from_numpy(np.asarray(item["held_out"]))}
        if item.get("test") is not None:
            tensors["test"] = torch.from_numpy(np.asarray(item["test"]))
        save_tensors_atomic(self.root / f"{key}.safetensors", tensors, {"kind": "sanf-patch-part",
                                                                         "bank": item["bank"].config()})

    def _locked(self, key: str):
        import contextlib

        @contextlib.contextmanager
        def hold():
            try:
                import fcntl
            except ImportError:  # not POSIX: no lock, at worst two workers fit the same part
                yield
                return
            self.root.mkdir(parents=True, exist_ok=True)
            with open(self.root / f"{key}.lock", "a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

        return hold()

    def fetch(self, key: str, fit) -> dict:
        """The part of ``key``: from memory, from ``root``, or ``fit()`` -> (bank, held-out scores), stored."""
        if key in self.items:
            self.reused += 1
            return self._remember(key, self.items[key])
        if self.root is None:
            bank, held_out = fit()
            self.fitted += 1
            return self._remember(key, {"bank": bank.to("cpu"), "held_out": held_out, "test": None})
        with self._locked(key):
            item = self._load(key)
            if item is not None:
                self.reused += 1
            else:
                bank, held_out = fit()
                item = {"bank": bank.to("cpu"), "held_out": held_out, "test": None}
                self._save(key, item)
                self.fitted += 1
        return self._remember(key, item)

    def test_scores(self, key: str) -> np.ndarray | None:
        item = self.items.get(key)
        return None if item is None else item.get("test")

    def add_test(self, key: str, scores: np.ndarray) -> None:
        """Record the part's test scores (computed by the first run that evaluated with it)."""
        item = self.items.get(key)
        if item is None or item.get("test") is not None:
            return
        item["test"] = np.asarray(scores, np.float64)
        if self.root is not None:
            with self._locked(key):
                if (self.root / f"{key}.safetensors").is_file():
                    self._save(key, item)


def attach_patch_part(result: FitResult, cfg: FitConfig, train: TrainData, fingerprint: str,
                      parts: PatchParts | None = None, *, quiet: bool = True) -> str | None:
    """``models.add_patch_score``, with the sweep's part of the same key when ``parts`` is given (fitted there
    first if it is new). Returns the part's key (None without ``parts`` or without a patch part)."""
    from .models.combined import MIN_HELD_OUT

    tr, va = cfg.held_out_split(len(train.cls))
    if parts is None or cfg.patch_score == "none" or not result.calibration or len(va) < MIN_HELD_OUT:
        add_patch_score(result, cfg, train.cls, train.patch, quiet=quiet)
        return None
    key = parts.key(cfg, fingerprint, train.class_index)
    item = parts.fetch(key, lambda: fit_patch_part(cfg, train.patch, tr, va, quiet=quiet))
    add_patch_score(result, cfg, train.cls, train.patch, quiet=quiet, part=item["bank"],
                    held_out_patch=item["held_out"])
    return key


def eval_flow_job(out_dir, flow_model: FlowModel, patch_score: Combined | None, config: dict, test: TestData, *,
                  score: str = "auto", device: str = "auto", batch_size: int = 256, plots: bool = True, run_dir=None,
                  train_log: list | None = None, extra_metrics: dict | None = None,
                  flow_scores: np.ndarray | None = None, patch_scores: np.ndarray | None = None,
                  fpr: float | None = None, normal_class: int | None = None) -> EvalResult:
    """Score ``test`` with a fitted flow run (``flow_model``; ``patch_score``: its combined model, None for the flow
    alone) and write the result files into ``out_dir``. ``score``: a kind of ``models.RUN_SCORES`` (``auto``: the
    run's default). ``flow_scores`` / ``patch_scores``: the parts' scores of ``test`` already computed by the caller
    (a stack of flows scored in one pass; a sweep's patch part shared by runs); ``normal_class``: the normal class's
    index in ``test`` when it is another cache than the run's (by name); ``fpr``: target false-positive rate of the
    calibrated threshold (default: the run's). ``EvalResult.parts`` holds the parts' test scores."""
    from .calibration import eval_threshold_metrics

    requested, score = score, resolve_score(score, config, run_dir or out_dir)
    if score in PATCH_KINDS and patch_score is None:
        raise SanfError(f"the {score} score needs the run's patch part; load the run with jobs.load_run")
    normal = int(config["normal_class"]) if normal_class is None else int(normal_class)
    scores, parts = _score_test(flow_model, patch_score, test, score, flow_scores, patch_scores, device, batch_size)
    is_anomaly = test.labels != normal
    metrics = compute_metrics(is_anomaly, scores)
    if score == "combined":  # what each part of the combined score alone would have scored (the same runs, no refit)
        metrics["auroc_parts"] = {k: compute_metrics(is_anomaly, parts[k])["auroc"] for k in ("nll", "patch")}
    result = config.get("result") or {}
    metrics.update(eval_identity(config, test.fingerprint, score, normal))
    metrics.update({
        "normal_class_name": config.get("normal_class_name"), "score_description": SCORE_DESCRIPTIONS[score],
        "epoch_selection": config.get("epoch_selection"), "best_epoch": result.get("best_epoch"),
        "epochs_run": result.get("epochs_run"), "n_train": config.get("n_train_total"), "n_val": result.get("n_val"),
        "n_nonfinite_scores": int((~np.isfinite(scores)).sum()), "run": str(run_dir or out_dir),
        "cache": test.cache_path, "flow": config.get("flow"), "fit": config.get("fit", {}), "evaluated": now(),
        "patch_score": config.get("patch_score"), "score_requested": requested,
        **(extra_metrics or {}),
    })
    metrics.update(eval_threshold_metrics(config.get("calibration"), score, is_anomaly, scores, fpr))
    out_dir = Path(out_dir)
    _mkdir(out_dir)
    paths = write_results(out_dir, metrics, test.sample_ids, test.labels, is_anomaly, scores, train_log=train_log,
                          plots=plots)
    return EvalResult(out_dir=out_dir, metrics=metrics, paths=paths, scores=scores, is_anomaly=is_anomaly,
                      parts=parts)


def _score_test(flow_model: FlowModel, patch_score: Combined | None, test: TestData, kind: str, flow_scores,
                patch_scores, device, batch_size: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """The run's ``kind`` scores of ``test`` streamed block by block through the run's model, and the parts'
    scores (``nll``, ``patch``) that were computed or given. Parts given by the caller are not recomputed; when
    both parts are needed, each block is read once for both."""
    dev = resolve_device(device)
    given = {k: np.asarray(v, np.float64) for k, v in (("nll", flow_scores), ("patch", patch_scores))
             if v is not None}
    if kind not in PATCH_KINDS:
        if "nll" in given:  # the flow's own score of this kind (flow_score_kind)
            return given["nll"], {}
        need = [kind]
    else:
        need = [k for k in (("nll", "patch") if kind == "combined" else ("patch",)) if k not in given]
    model = None
    if kind not in PATCH_KINDS:
        model = flow_model.with_score(kind)
    elif need == ["nll", "patch"]:
        model = patch_score.with_score("combined")
    elif need == ["nll"]:
        model = flow_model.with_score("nll")
    elif need == ["patch"]:
        model = patch_score.with_score("patch")
    parts = dict(given)
    if model is not None:
        model.to(dev)
        try:
            out = score_blocks(model, test.blocks(model.needs_patch), batch_size=batch_size)
        finally:
            model.to("cpu")
        if kind not in PATCH_KINDS:
            return out["score"], {}
        parts.update({k: out[k] for k in ("nll", "patch") if k in out})
        if need == ["nll"]:
            parts["nll"] = out["score"]
        elif need == ["patch"]:
            parts["patch"] = out["score"]
    if kind == "patch":
        return parts["patch"], {"patch": parts["patch"]}
    combined = patch_score.combine(torch.from_numpy(parts["nll"]), torch.from_numpy(parts["patch"])).numpy()
    return combined, parts


def flow_score_kind(kind: str) -> str:
    """The flow's own score behind a run score kind (``nll`` for the patch kinds)."""
    return "nll" if kind in PATCH_KINDS else kind


def eval_identity(config: dict, fingerprint: str, score: str, normal_class: int | None = None) -> dict:
    """What must match for earlier results of a flow run to be kept (``metrics.json``)."""
    normal = int(config["normal_class"]) if normal_class is None else int(normal_class)
    return {"method": config.get("method", "sanf-flow"), "score": score, "normal_class": normal,
            "cache_fingerprint": fingerprint, "run_id": config.get("run_id")}


def _reusable_model(run_dir: Path, settings: dict):
    """A model fitted into ``run_dir`` with ``settings`` whose results were never written (killed in between)."""
    if not (run_dir / MODEL_FILE).exists():
        return None
    try:
        loaded = load_run(run_dir)
    except SanfError:
        return None
    if loaded.config.get("settings") != settings or loaded.config.get("status") != "finished":
        return None
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)  # killed between saving the model and removing this
    return loaded


def flow_job(run_dir, cfg: FitConfig, train: TrainData, test: TestData, *, cache_info: dict, score: str = "auto",
             plots: bool = True, extra_config: dict | None = None, extra_metrics: dict | None = None,
             parts: PatchParts | None = None) -> dict:
    """A whole flow run into ``run_dir``: fit (or reuse a model fitted there, or resume its checkpoint), score,
    write every file. Returns timings and the AUROC (the caller's log record). ``parts``: the sweep's patch parts
    (a bank and its test scores fitted once per ``combined.patch_part_key``)."""
    run_dir = Path(run_dir)
    t0 = time.perf_counter()
    settings = fit_settings(cfg, test.fingerprint, train.class_index)
    loaded = _reusable_model(run_dir, settings)
    key = None
    if loaded is not None:
        flow_model, config, part = loaded.flow_model, loaded.config, loaded.patch_score
        log = read_jsonl(run_dir / LOG_FILE) if (run_dir / LOG_FILE).exists() else []
    else:
        (run_dir / MODEL_FILE).unlink(missing_ok=True)
        created = None
        if (run_dir / CONFIG_FILE).exists():  # an unfinished fit (killed before or after its first checkpoint)
            try:
                old = read_json_file(run_dir / CONFIG_FILE)
                created = old.get("created") if old.get("status") == "running" else None
            except (SanfError, AttributeError):
                created = None
        config, result = fit_flow_job(run_dir, cfg, train, fingerprint=test.fingerprint, cache_info=cache_info,
                                      created=created, extra=extra_config, parts=parts)
        flow_model, log, part = FlowModel(result.normalizer, result.model), result.log, result.patch_score
        key = result.patch_part_key
    t_fit = time.perf_counter() - t0
    res = eval_flow_job(run_dir, flow_model, part, config, test, score=score, device=cfg.device,
                        batch_size=cfg.eval_batch_size, plots=plots, train_log=log, extra_metrics=extra_metrics,
                        patch_scores=parts.test_scores(key) if key else None)
    if key and "patch" in res.parts:
        parts.add_test(key, res.parts["patch"])
    summary = config.get("result") or {}
    seen = 0 if loaded is not None else int(summary.get("n_train") or 0) * int(summary.get("epochs_run") or 0)
    return {"auroc": res.metrics["auroc"], "fit_s": t_fit, "score_write_s": time.perf_counter() - t0 - t_fit,
            "reused_model": loaded is not None, "train_samples_seen": seen, "n_test": len(res.scores)}


def baseline_job(out_dir, method: str, train: TrainData, test: TestData, *, plots: bool = True,
                 extra: dict | None = None, extra_metrics: dict | None = None, options: dict | None = None,
                 quiet: bool = True, fpr: float = 0.01, device: str = "auto",
                 batch_size: int | None = None) -> EvalResult:
    """Fit baseline ``method`` on ``train`` (class tokens; patch tokens for patch-knn), score ``test`` streamed in
    blocks, write config, the fitted model (``model.safetensors``: every baseline run is a detector) and the
    result files. ``options`` go to the method's factory. The threshold is calibrated on the held-out 10% of
    ``train`` scored by the baseline fitted on the other rows (``calibrate_baseline``)."""
    from .calibration import eval_threshold_metrics

    dev = resolve_device(device)
    model = create_baseline(method, **(options or {}))
    model.fit(train.cls, train.patch if model.needs_patch else None, device=dev, quiet=quiet)
    scores = score_blocks(model, test.blocks(model.needs_patch), batch_size=batch_size)["score"]
    ci = train.class_index
    is_anomaly = test.labels != ci
    metrics = compute_metrics(is_anomaly, scores)
    metrics.update(baseline_identity(method, ci, test.fingerprint, options))
    metrics.update({"normal_class_name": train.class_name, "score_description": model.description,
                    "epoch_selection": BASELINE_EPOCH_SELECTION, "n_train": int(len(train.cls)),
                    "cache": test.cache_path, "evaluated": now(), "settings": {"method": method,
                                                                                **model.settings()},
                    **(extra or {}), **(extra_metrics or {})})
    calibration = calibrate_baseline(method, train.cls, fpr=fpr, train_patch=train.patch, options=options,
                                     device=dev)
    metrics.update(eval_threshold_metrics(calibration, method, is_anomaly, scores))
    out_dir = Path(out_dir)
    config = {"format": "sanf-baseline", "format_version": 1, "method": method, "normal_class": ci,
              "normal_class_name": train.class_name, "cache": test.identity, "created": now(),
              "versions": package_versions(), "calibration": calibration, "model": model.config(), **(extra or {})}
    write_json_atomic(out_dir / CONFIG_FILE, config)
    save_tensors_atomic(out_dir / MODEL_FILE, baseline_tensors(model), config)
    paths = write_results(out_dir, metrics, test.sample_ids, test.labels, is_anomaly, scores, plots=plots)
    return EvalResult(out_dir=out_dir, metrics=metrics, paths=paths, scores=scores, is_anomaly=is_anomaly)


def calibrate_baseline(method: str, train_cls: np.ndarray, *, fpr: float = 0.01, seed: int = 0,
                       fraction: float = 0.1, train_patch: np.ndarray | None = None,
                       options: dict | None = None, device="cpu") -> dict | None:
    """Held-out scores of a baseline: the slice a flow with ``seed`` would hold out, scored by the baseline fitted
    on the remaining rows. None when the class is too small to hold any row out."""
    from .calibration import SLICE_BASELINE, calibration_record

    train_cls = np.asarray(train_cls)
    n = len(train_cls)
    n_val = max(1, int(round(fraction * n)))
    if n - n_val < 2:
        return None
    order = np.random.default_rng(seed).permutation(n)
    tr, va = np.sort(order[n_val:]), np.sort(order[:n_val])
    try:
        model = create_baseline(method, **(options or {}))
        patch = np.asarray(train_patch) if model.needs_patch else None
        model.fit(train_cls[tr], None if patch is None else patch[tr], device=device, quiet=True)
        held_out = score_arrays(model, train_cls[va], None if patch is None else patch[va])["score"]
    except SanfError:
        return None  # e.g. kNN with fewer rows than k
    return calibration_record({method: held_out}, fpr=fpr, slice_desc=SLICE_BASELINE, seed=seed, fraction=fraction)


def baseline_identity(method: str, class_index: int, fingerprint: str, options: dict | None = None) -> dict:
    out = {"method": method, "score": method, "normal_class": class_index, "cache_fingerprint": fingerprint}
    if options:
        out["options"] = dict(options)
    return out


# ------------------------------------------------------------------------- single runs from a cache (the CLI)
def _mkdir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise SanfError(f"{out_dir} exists and is not a folder; choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SanfError(f"cannot create {out_dir}: {exc.strerror or exc}; choose another --out") from None


def fit_run(cache_path, normal_class, cfg: FitConfig | None = None, out_dir=None, *, overwrite: bool = False,
            quiet: bool = False, callback=None) -> FitRun:
    """`sanf fit`: fit a flow on one normal class of a cache and write the run folder (resuming an unfinished one).
    Reads only the normal class's block of the train split."""
    from .cache import open_cache

    cfg = (cfg or FitConfig()).validate()
    with open_cache(cache_path) as cache:
        ci = cache.class_index(normal_class)
        fingerprint, info = cache.fingerprint, cache_identity(cache)
        run_dir = Path(out_dir) if out_dir else default_run_name(cache_path, cache.class_names[ci])
        settings = fit_settings(cfg, fingerprint, ci)
        hint = f" (evaluate it with `sanf eval --run {run_dir}`)"
        if not overwrite and run_state(run_dir) == "finished":  # the same fit again: nothing to do, as extract/sweep
            try:
                old = read_run_config(run_dir)
                old["settings"] = current_run_settings(old.get("settings"))
            except SanfError:
                old = {}
            if old.get("settings") == settings and old.get("status") == "finished":
                return FitRun(run_dir=run_dir, config=old, result=None, already_finished=True)
            diff = diff_settings(old.get("settings") or {}, settings)
            if diff:
                hint = f" with other settings ({', '.join(diff[:6])}{' ...' if len(diff) > 6 else ''})"
        train = TrainData.from_cache(cache, ci, cfg.needs_patch)
    mode = prepare_out_dir(run_dir, settings, overwrite=overwrite, what="run", finished_hint=hint,
                           convert=current_run_settings)
    created = read_json_file(run_dir / CONFIG_FILE).get("created") if mode == "resume" else None
    config, result = fit_flow_job(run_dir, cfg, train, fingerprint=fingerprint, cache_info=info, created=created,
                                  resumed=mode == "resume", quiet=quiet, callback=callback)
    return FitRun(run_dir=run_dir, config=config, result=result, resumed=mode == "resume")


def eval_run(run_dir, cache=None, score: str = "auto", *, out_dir=None, overwrite: bool = False,
             device: str = "auto", batch_size: int = 256, plots: bool = True, fpr: float | None = None) -> EvalResult:
    """`sanf eval`: score the whole test split with a finished run (default: of its own cache) and write the result
    files (default: into the run folder). ``cache`` may be any cache in the run's feature space (``compat.py``);
    the normal class is found there by name. ``fpr``: target FPR of the calibrated threshold (default: the run's)."""
    from .cache import open_cache
    from .compat import check_cache_compatible, normal_class_in

    run_dir = Path(run_dir)
    dev = resolve_device(device)
    run = load_run(run_dir, device=str(dev))
    cfg = run.config
    kind = resolve_score(score, cfg, run_dir)
    cache_path = Path(cache) if cache is not None else Path(cfg["cache"]["path"])
    if cache is None and not cache_path.exists():
        raise SanfError(f"the cache this run was trained on ({cache_path}) is not there; pass --cache PATH")
    out_dir = Path(out_dir) if out_dir else run_dir
    log = read_jsonl(run_dir / LOG_FILE) if (run_dir / LOG_FILE).exists() else None
    with open_cache(cache_path) as c:
        check_cache_compatible(cfg["cache"], c, run_dir)
        normal = normal_class_in(c, cfg, run_dir)
        refuse_foreign_files(out_dir, RESULT_FILES)  # never replace a user's file (docs/file-safety.md)
        guard_results(out_dir, eval_identity(cfg, c.fingerprint, kind, normal), overwrite)
        return eval_flow_job(out_dir, run.flow_model, run.patch_score, cfg, TestData.from_cache(c, cache_path),
                             score=score, device=str(dev), batch_size=batch_size, plots=plots, run_dir=run_dir,
                             train_log=log, fpr=fpr, normal_class=normal)


def baseline_run(cache, normal_class, method: str = "gaussian", out_dir=None, *, overwrite: bool = False,
                 plots: bool = True, options: dict | None = None, quiet: bool = False,
                 fpr: float = 0.01, device: str = "auto") -> EvalResult:
    """`sanf baseline`: fit a baseline on the normal class's training rows, score the test split (streamed from the
    cache in blocks), write the results and the model. ``options``: the method's own settings (``{"k": 5}`` for the
    kNN baselines)."""
    from .cache import open_cache

    options = dict(options or {})
    patch = create_baseline(method, **options).needs_patch  # unknown names and options fail here
    with open_cache(cache) as c:
        ci = c.class_index(normal_class)
        train = TrainData.from_cache(c, ci, patch=patch)
        test = TestData.from_cache(c, cache)
        out_dir = Path(out_dir) if out_dir else default_run_name(cache, train.class_name, f"-{method}")
        if out_dir.exists() and not out_dir.is_dir():
            raise SanfError(f"{out_dir} exists and is not a folder; choose another --out")
        refuse_foreign_files(out_dir, (CONFIG_FILE, MODEL_FILE, *RESULT_FILES))  # never replace a user's file
        # (docs/file-safety.md)
        guard_results(out_dir, baseline_identity(method, ci, test.fingerprint, options), overwrite)
        _mkdir(out_dir)
        return baseline_job(out_dir, method, train, test, plots=plots, options=options, quiet=quiet, fpr=fpr,
                            device=device)
