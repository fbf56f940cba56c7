"""Fitting a SANF flow on one normal class: optimiser, epochs or early stopping, checkpoints, resume, seeds.

``fit_flow(train_cls, train_patch, cfg)`` works on in-memory arrays; with ``run_dir`` it also checkpoints
completed epochs there (at most every ``cfg.checkpoint_every`` seconds) and resumes from the last one. It reads as
four steps, each a function of its own: data preparation (``prepare_data``: held-out slice, normaliser, tensors),
resume (``_Checkpoint``), the epoch loop (``_train_epoch``) and the stopping rule (``EarlyStopping``). The run
folder around it (config, model, results) is written by the jobs (``jobs/``: ``fit_run`` is `sanf fit`).
The epoch loop (``run_epoch``, ``train_step``) and the stopping rule are also the stacked trainer's
(``train.stack.fit_stack``): a single fit is run as a stack of one flow, so both train alike by construction.

Loss: the mean over the batch of the negative log-likelihood divided by the dimension of ``z`` (nats per
dimension, as in DifferNet/CS-Flow and the official code; the gradient-norm clip of 1.0 applies to this
scale). ``val_nll`` in the log is the same quantity on the held-out slice.

Training length (the default, ``FitConfig.early_stopping=True``): train up to ``max_epochs`` and keep the
epoch with the lowest NLL on a held-out ``val_fraction`` of the normal class's *training* rows, stopping after
``patience`` epochs without improvement. The test split is never read. METHOD.md section 6 found the best
fixed length to depend on the features; the measurements behind this default are in README.md ("Training
length"). ``--epochs N`` trains a fixed number of epochs on all training rows instead (the official code: 1);
``training_length`` is the one place that turns the given options into that choice (CLI and sweep alike).

Determinism: the weights are initialised under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``
(the caller's RNG is left alone); the held-out slice comes from ``numpy.random.default_rng(seed)``; the batch
order of epoch ``e`` from a ``torch.Generator`` seeded with ``(seed, e)``. So on CPU the same seed, data and
number of torch threads give bit-identical weights (a different thread count changes the last bits of the float
sums), and a resumed run needs only the model and optimiser state of the epoch it was last checkpointed after
to continue exactly as an uninterrupted one (the global RNG state is saved too, for safety).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..device import amp_dtype, resolve_device
from ..errors import Interrupted, SanfError
from ..flow.normalizer import Normalizer
from ..flow.score import SCORES, score_flow
from ..progress import progress_bar
from ..store.atomic import load_tensors, now, save_tensors_atomic, settings_id, write_jsonl_atomic
from ..store.run_folder import CHECKPOINT_FILE, LOG_FILE, check_finite
from .config import FitConfig
from .loop import EarlyStopping, PreparedData, _train_epoch, close_epoch, epoch_steps, make_optimizer, make_scaler


@dataclass
class FitResult:
    model: torch.nn.Module
    normalizer: Normalizer
    log: list[dict]
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    n_train: int
    n_val: int
    device: str
    resumed_from: int = 0
    epoch_selection: str = ""
    calibration: dict | None = None  # held-out normal scores + default threshold (calibration.py)
    initial_val_nll: float | None = None  # held-out NLL of the untrained flow (epoch 0), with keep_initial
    patch_score: object | None = None  # the run's patch part (combined.PatchScore), added after the fit

    def summary(self) -> dict:
        last = self.log[-1] if self.log else {}
        best = next((r for r in self.log if r["epoch"] == self.best_epoch), {})
        return {"best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "stopped_early": self.stopped_early,
                "n_train": self.n_train, "n_val": self.n_val, "final_train_loss": last.get("train_loss"),
                "best_val_nll": best.get("val_nll", self.initial_val_nll if self.best_epoch == 0 else None),
                "initial_val_nll": self.initial_val_nll, "epoch_selection": self.epoch_selection,
                "resumed_from_epoch": self.resumed_from}


# ----------------------------------------------------------------------------------------------- helpers
def _data_digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(a)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def _optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, state in opt.state_dict()["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            out[f"optim.{idx}.{key}"] = t
    return out


def _load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        if name.startswith("optim."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = t
    opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})


def _diverged(what, epoch, step, steps, cfg, saved_epoch, run_dir) -> SanfError:
    kept = (f"the checkpoint of epoch {saved_epoch} is kept in {run_dir}" if run_dir and saved_epoch
            else "no checkpoint had been written" if run_dir else "nothing was saved (no run folder)")
    return SanfError(
        f"training diverged: {what} at epoch {epoch}, step {step}/{steps}; {kept}; retry with a lower --lr "
        f"(now {cfg.lr:g}), a lower --clamp (now {cfg.clamp:g}) or --normalize l2+standardize (now {cfg.normalize}),"
        f" into a new --out or with --overwrite")


def prepare_data(train_cls: np.ndarray, train_patch: np.ndarray | None, cfg: FitConfig,
                 device: torch.device) -> PreparedData:
    """Check the arrays, hold out ``val_fraction`` of the rows (early stopping's slice; with a fixed length the same
    share, kept for calibrating the threshold only), fit the normaliser on the rest."""
    train_cls = np.asarray(train_cls, dtype=np.float32)
    if train_cls.ndim != 2:
        raise SanfError(f"class features must be (n, d), got shape {train_cls.shape}")
    if cfg.flow_needs_patch:
        if train_patch is None:
            raise SanfError(f"fusion={cfg.fusion!r} / main_input={cfg.main_input!r} needs the patch tokens")
        train_patch = np.asarray(train_patch, dtype=np.float32)
        if train_patch.ndim != 3 or len(train_patch) != len(train_cls):
            raise SanfError(f"patch tokens must be (n, T, d) with n={len(train_cls)}, got {train_patch.shape}")
    else:
        train_patch = None
    check_finite("the training features", train_cls, train_patch)
    tr_idx, va_idx = cfg.held_out_split(len(train_cls))
    normalizer = Normalizer.fit(cfg.normalize, train_cls[tr_idx], None if train_patch is None else
                                train_patch[tr_idx], token_pool=cfg.token_pool)
    x_all, p_all = normalizer.transform(train_cls, train_patch)

    def on_device(a, idx):
        return None if a is None else torch.from_numpy(a[idx]).to(device)

    return PreparedData(
        normalizer=normalizer, x_tr=on_device(x_all, tr_idx), p_tr=on_device(p_all, tr_idx),
        x_va=on_device(x_all, va_idx), p_va=on_device(p_all, va_idx), dim=train_cls.shape[1],
        patch_dim=train_cls.shape[1] if p_all is None else p_all.shape[2],
        num_tokens=1 if p_all is None else p_all.shape[1], digest=_data_digest(train_cls, train_patch))


def new_flow(cfg: FitConfig, dim: int, patch_dim: int, num_tokens: int):
    """The untrained flow of ``cfg`` on CPU, initialised under ``cfg.seed`` (the caller's RNG left alone)."""
    from ..flow import SANFlow

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            return SANFlow(**cfg.flow_kwargs(dim, patch_dim, num_tokens))
        except ValueError as exc:
            raise SanfError(f"invalid flow settings: {exc}") from None


def build_flow(cfg: FitConfig, data: PreparedData, device: torch.device):
    """The flow, its optimiser and AMP scaler."""
    flow = new_flow(cfg, data.dim, data.patch_dim, data.num_tokens)
    flow.to(device).train()
    return flow, make_optimizer(flow.parameters(), cfg), make_scaler(device, amp_dtype(device, cfg.amp))


# --------------------------------------------------------------------------------------------------- resume
_clock = time.monotonic  # the checkpoint interval's clock (a test advances it by epochs)


class _Checkpoint:
    """``checkpoint.safetensors`` in the run folder: model, optimiser, RNG and stopping state after an epoch."""

    def __init__(self, run_dir, checkpoint_id: str):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / CHECKPOINT_FILE
        self.checkpoint_id = checkpoint_id
        self.saved_at = _clock()
        self.saved_epoch = 0

    def load(self, flow, opt, scaler, stopping: EarlyStopping) -> tuple[int, list[dict]]:
        """Restore an earlier checkpoint of the same settings and data; returns (its epoch, its log)."""
        if not self.path.exists():
            return 0, []
        tensors, meta = load_tensors(self.path)
        if meta.get("checkpoint_id") != self.checkpoint_id:
            raise SanfError(f"{self.path} belongs to other settings or other training data; remove it or pass "
                            f"--overwrite to start this run afresh")
        flow.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _load_optimizer(opt, tensors)
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        stopping.load(meta, {k[5:]: v for k, v in tensors.items() if k.startswith("best.")})
        self.saved_epoch = int(meta["epoch"])
        return self.saved_epoch, list(meta["log"])

    def after_epoch(self, epoch: int, flow, opt, scaler, stopping: EarlyStopping, log: list[dict],
                    every_s: float) -> None:
        """The training log after every epoch (a few KB, for whoever watches the run); the checkpoint once
        ``every_s`` seconds have passed since the last one (or since this process started fitting)."""
        if _clock() - self.saved_at >= every_s:
            self.save(epoch, flow, opt, scaler, stopping, log)
        else:
            write_jsonl_atomic(self.run_dir / LOG_FILE, log)

    def kept_after_interrupt(self, epochs_done: int, every_s: float) -> str:
        """What an interrupted fit keeps, in one line (the CLI prints it after "interrupted; ")."""
        if not self.saved_epoch:
            return (f"no epoch checkpoint was written yet in {self.run_dir} (--checkpoint-every {every_s:g} s); "
                    f"the same command starts the fit again")
        redo = f" (epochs {self.saved_epoch + 1}-{epochs_done} are trained again)" if epochs_done > self.saved_epoch \
            else ""
        return (f"the checkpoint of epoch {self.saved_epoch} is kept in {self.run_dir}; the same command resumes "
                f"from it{redo}")

    def save(self, epoch: int, flow, opt, scaler, stopping: EarlyStopping, log: list[dict]) -> None:
        tensors = {f"model.{k}": v for k, v in flow.state_dict().items()}
        tensors.update(_optimizer_tensors(opt))
        tensors["rng.torch"] = torch.get_rng_state()
        if stopping.best_state is not None:
            tensors.update({f"best.{k}": v for k, v in stopping.best_state.items()})
        meta = {"kind": "checkpoint", "checkpoint_id": self.checkpoint_id, "epoch": epoch, "log": log,
                **stopping.state(), "scaler": scaler.state_dict() if scaler is not None else None, "saved": now()}
        save_tensors_atomic(self.path, tensors, meta)
        write_jsonl_atomic(self.run_dir / LOG_FILE, log)
        self.saved_at, self.saved_epoch = _clock(), epoch


# ------------------------------------------------------------------------------------------------ fitting
def time_left(epoch_seconds: list[float], epoch: int, cfg: FitConfig, stopping: EarlyStopping) -> str:
    """The time left after ``epoch``, from the mean of the epochs measured so far (no estimate before one
    has finished). With early stopping the end is unknown: the range from stopping at the earliest (``patience``
    epochs without improvement) to running to ``max_epochs``."""
    if not epoch_seconds:
        return ""
    per = sum(epoch_seconds) / len(epoch_seconds)
    most = max(0, cfg.total_epochs - epoch)
    least = most if not cfg.early_stopping else min(most, max(0, cfg.patience - stopping.bad_epochs))
    if stopping.stopped or most == 0:
        return ""
    if least == most:
        return f"~{per * most:.0f} s left"
    return f"~{per * least:.0f}-{per * most:.0f} s left (early stopping)"


def fit_flow(train_cls: np.ndarray, train_patch: np.ndarray | None, cfg: FitConfig | None = None, *,
             run_dir=None, quiet: bool = True, callback: Callable[[int, dict, torch.nn.Module], None] | None = None,
             description: str = "fit") -> FitResult:
    """Fit a flow on the normal class's training features (in memory).

    ``train_cls (n, d)``, ``train_patch (n, T, d)`` or None when ``cfg.flow_needs_patch`` is False. With ``run_dir``
    a completed epoch is checkpointed there (``checkpoint.safetensors``, replaced atomically) once
    ``cfg.checkpoint_every`` seconds have passed since the last checkpoint (0: every epoch), the training log after
    every epoch, and an existing checkpoint of the same settings and data is resumed. ``callback(epoch, log_row,
    model)`` runs after each epoch's checkpoint decision (for monitoring; it must not change the model). Returns
    the model (in eval mode, on CPU) of the final epoch, or of the best epoch with early stopping.
    """
    cfg = (cfg or FitConfig()).validate()
    device = resolve_device(cfg.device)
    amp = amp_dtype(device, cfg.amp)
    data = prepare_data(train_cls, train_patch, cfg, device)
    flow, opt, scaler = build_flow(cfg, data, device)
    stopping = EarlyStopping(cfg.early_stopping, cfg.patience, cfg.min_delta)
    ckpt = None
    if run_dir is not None:
        ckpt = _Checkpoint(run_dir, settings_id({"settings": cfg.settings(), "data": data.digest}))
    start_epoch, log = ckpt.load(flow, opt, scaler, stopping) if ckpt is not None else (0, [])
    resumed_from = start_epoch
    if cfg.early_stopping and cfg.keep_initial and start_epoch == 0:
        # the untrained flow competes too: a few hundred images can leave every trained epoch worse on held-out
        # rows than the starting density (benchmarks/flow_industrial_probe.md)
        stopping.start(float(score_flow(flow, data.x_va, data.p_va, "nll", batch_size=cfg.eval_batch_size).mean()
                             / flow.z_dim), flow)
    steps = epoch_steps(data.n_train, cfg)
    total_epochs = cfg.total_epochs

    epoch_seconds: list[float] = []  # measured in this process: the time left is estimated from these only
    try:
        with progress_bar(quiet, unit="samples", measured_eta=True) as bar:
            task = bar.add_task(description, total=steps * total_epochs, completed=steps * start_epoch, rate="",
                                left="")
            for epoch in range(start_epoch + 1, total_epochs + 1):
                if stopping.stopped:
                    break
                t_epoch = time.perf_counter()

                def diverged(what, step, epoch=epoch):
                    kept = ckpt.saved_epoch if ckpt is not None else 0
                    return _diverged(what, epoch, step, steps, cfg, kept, run_dir)

                def progress(loss_value, rate, epoch=epoch):
                    shown = "" if loss_value is None else f" loss {loss_value:.4f}"
                    bar.update(task, advance=1, rate=f"{rate:.0f} samples/s",
                               description=f"{description} epoch {epoch}/{total_epochs}{shown}")

                row = _train_epoch(flow, opt, scaler, data, cfg, epoch, amp, diverged, progress)
                val = None
                if data.n_val and cfg.early_stopping:
                    # held-out NLL in full precision (also under AMP): it decides the epoch
                    val = float(score_flow(flow, data.x_va, data.p_va, "nll", batch_size=cfg.eval_batch_size).mean()
                                / flow.z_dim)
                why = close_epoch(stopping, epoch, row, val, flow)
                if why is not None:
                    raise diverged(why, steps)
                log.append(row)
                if ckpt is not None:
                    ckpt.after_epoch(epoch, flow, opt, scaler, stopping, log, cfg.checkpoint_every)
                epoch_seconds.append(time.perf_counter() - t_epoch)
                bar.update(task, left=time_left(epoch_seconds, epoch, cfg, stopping))
                if callback is not None:
                    callback(epoch, row, flow)
            if stopping.stopped:
                bar.update(task, completed=steps * total_epochs)
    except KeyboardInterrupt:
        if ckpt is None:
            raise
        raise Interrupted(ckpt.kept_after_interrupt(len(log), cfg.checkpoint_every)) from None

    if stopping.kept_state() is not None:
        flow.load_state_dict(stopping.kept_state())
    calibration = None
    if data.n_val:
        from ..evaluate.calibration import SLICE_EARLY, SLICE_FIXED, calibration_record

        held_out = {s: score_flow(flow, data.x_va, data.p_va, s, batch_size=cfg.eval_batch_size) for s in SCORES}
        calibration = calibration_record(held_out, fpr=cfg.fpr, slice_desc=SLICE_EARLY if cfg.early_stopping
                                         else SLICE_FIXED, seed=cfg.seed, fraction=cfg.val_fraction)
    flow.eval().to("cpu")
    return FitResult(model=flow, normalizer=data.normalizer, log=log, best_epoch=stopping.best_epoch,
                     epochs_run=len(log), stopped_early=bool(stopping.stopped), n_train=data.n_train,
                     n_val=data.n_val, device=str(device), resumed_from=resumed_from,
                     epoch_selection=cfg.epoch_selection, calibration=calibration,
                     initial_val_nll=stopping.initial_val)
