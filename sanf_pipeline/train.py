"""Fitting a SANF flow on one normal class: optimiser, epochs or early stopping, checkpoints, resume, seeds.

Two entry points:

- ``fit_flow(train_cls, train_patch, cfg)`` works on in-memory arrays (a sweep reads the cache once and calls
  it many times); with ``run_dir`` it also checkpoints every completed epoch there and resumes from it.
- ``fit_run(cache_path, normal_class, cfg, out_dir)`` reads only the normal class's block of the train split,
  writes ``config.json``, ``train_log.jsonl``, ``model.safetensors`` (see ``runs.py``) and resumes an
  unfinished run with the same settings.

Loss: the mean over the batch of the negative log-likelihood divided by the dimension of ``z`` (nats per
dimension, as in DifferNet/CS-Flow and the official code; the gradient-norm clip of 1.0 applies to this
scale). ``val_nll`` in the log is the same quantity on the held-out slice.

Training length (the default, ``FitConfig.early_stopping=True``): train up to ``max_epochs`` and keep the
epoch with the lowest NLL on a held-out ``val_fraction`` of the normal class's *training* rows, stopping after
``patience`` epochs without improvement. The test split is never read. METHOD.md section 6 found the best
fixed length to depend on the features (1 epoch on a 1280-d CNN feature, about 4 on 384-d ViT tokens; AUROC
fell from 0.85 to 0.71 after 10 epochs); the measurements behind this default are in ``TRAINING_LENGTH_NOTE``
below (early stopping wins on ViT tokens, a fixed single epoch on a 1280-d CNN feature).
``--epochs N`` trains a fixed number of epochs on all training rows instead (the official code: 1).

Determinism: the weights are initialised under ``torch.manual_seed(seed)`` inside ``torch.random.fork_rng``
(the caller's RNG is left alone); the held-out slice comes from ``numpy.random.default_rng(seed)``; the batch
order of epoch ``e`` from a ``torch.Generator`` seeded with ``(seed, e)``. So on CPU the same seed, data and
number of torch threads give bit-identical weights (a different thread count changes the last bits of the float
sums), and a resumed run needs only the model and optimiser state of its last completed
epoch to continue exactly as an uninterrupted one (the global RNG state is saved too, for safety).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from .errors import SanfError
from .features import NORMALIZATIONS, Normalizer
from .runs import (
    CHECKPOINT_FILE,
    CONFIG_FILE,
    LOG_FILE,
    MODEL_FILE,
    RUN_FORMAT,
    RUN_FORMAT_VERSION,
    cache_identity,
    check_finite,
    default_run_name,
    load_tensors,
    now,
    package_versions,
    prepare_out_dir,
    read_json_file,
    save_tensors_atomic,
    settings_id,
    write_json_atomic,
    write_jsonl_atomic,
)

EPOCH_SELECTION_FIXED = "fixed final epoch (no epoch selection), never test AUROC"
EPOCH_SELECTION_EARLY = "early stopping on held-out normal training NLL, never test AUROC"

TRAINING_LENGTH_NOTE = """\
Why early stopping is the default (probe on CIFAR-10, one-vs-rest, 1,000 training images of the normal class,
200 test images per class; default flow: semantic fusion, 4 blocks, hidden 1024, lr 5e-5, batch 32, l2+standardize;
AUROC of every epoch recorded for the analysis only, the rule itself sees the held-out training NLL alone):

| features | 1 epoch | 4 | 8 | 15 | 30 | early stop (kept epochs) | knn-l2 | gaussian |
|---|---|---|---|---|---|---|---|---|
| DINOv2 ViT-S/14 blk8 112px d384+16tok (4 cl) | 0.820 | 0.833 | 0.839 | 0.831 | 0.804 | 0.832 (14-19) | 0.847 | 0.837 |
| EffNet-Lite0 224px d1280+49 tok (2 cl) | 0.853 | 0.829 | 0.790 | 0.732 | - | 0.824 (4-6) | 0.843 | 0.829 |
| synthetic d64, 300 samples (2 cl) | 0.903 | 0.902 | 0.885 | 0.774 | - | 0.904 (1-2) | 0.778 | 0.653 |

The held-out NLL keeps falling for about 15 epochs on the 384-d ViT tokens (AUROC rises from 0.820 to about
0.83 over that span) but turns after 4-6 epochs on the 1280-d CNN feature, where AUROC is best at epoch 1.
No fixed length is right for both; early stopping adapts to the features, never looks at the test split
(METHOD.md: choose the length by held-out normal NLL, never by test AUROC) and never reaches the collapse of long
fixed runs. It lags the AUROC optimum on high-dimensional CNN features: there ``--epochs 1`` (the official code)
is 0.03 better. ``patience=3``: the held-out NLL is noisy (+-0.01 per epoch on ViT tokens); patience 2-5 kept the
same epochs within 0.001 AUROC. The held-out slice costs 10% of the training rows.
"""


@dataclass
class FitConfig:
    """Every setting of a fit. Defaults: the paper (METHOD.md) unless a measurement says otherwise."""

    # the flow (flow.SANFlow)
    blocks: int = 4
    fusion: str = "semantic"
    clamp: float = 2.0
    hidden: int = 1024
    heads: int = 1
    spatial_channels: str = "half"
    main_input: str = "semantic"
    attn_dim: int | None = None
    # inputs (features.py): KxK average pooling of the cached patch grid, then normalisation
    token_pool: int = 1
    normalize: str = "l2+whiten"
    # optimiser: Adam as the paper's final setting; eps is PyTorch's default (the official code used 1e-4)
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-5
    batch_size: int = 32
    grad_clip: float | None = 1.0
    # training length: a fixed number of epochs, or early stopping on held-out normal training NLL
    early_stopping: bool = True
    epochs: int = 1
    val_fraction: float = 0.1
    patience: int = 3
    max_epochs: int = 30
    min_delta: float = 0.0
    # reproducibility and hardware
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    eval_batch_size: int = 256
    # the detector's default threshold: target false-positive rate on held-out normal images (calibration.py)
    fpr: float = 0.01

    NOT_SETTINGS = ("device", "eval_batch_size", "fpr")  # do not change the model; not compared on resume

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)

    @classmethod
    def from_dict(cls, data: dict) -> FitConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SanfError(f"unknown fit setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**data)

    def validate(self) -> FitConfig:
        from .flow import FUSION_MODES, MAIN_INPUTS, SPATIAL_CHANNELS

        def bad(name, value, want):
            raise SanfError(f"invalid {name}={value!r}: {want}")

        if self.fusion not in FUSION_MODES:
            bad("fusion", self.fusion, f"choose one of {', '.join(FUSION_MODES)}")
        if self.spatial_channels not in SPATIAL_CHANNELS:
            bad("spatial_channels", self.spatial_channels, f"choose one of {', '.join(SPATIAL_CHANNELS)}")
        if self.main_input not in MAIN_INPUTS:
            bad("main_input", self.main_input, f"choose one of {', '.join(MAIN_INPUTS)}")
        if self.normalize not in NORMALIZATIONS:
            bad("normalize", self.normalize, f"choose one of {', '.join(NORMALIZATIONS)}")
        for name in ("blocks", "hidden", "heads", "batch_size", "epochs", "patience", "max_epochs",
                     "eval_batch_size", "token_pool"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, v, "must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", self.seed, "must be a non-negative integer")
        for name in ("clamp", "lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < math.inf):
                bad(name, v, "must be a finite number > 0")
        if not (0 <= self.weight_decay < math.inf) or not (0 < self.eps < 1) or self.min_delta < 0:
            bad("weight_decay/eps/min_delta", (self.weight_decay, self.eps, self.min_delta), "out of range")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", self.betas, "two numbers in [0, 1)")
        if self.grad_clip is not None and not (0 < self.grad_clip < math.inf):
            bad("grad_clip", self.grad_clip, "must be > 0 (or None for no clipping)")
        if not (0 < self.val_fraction < 1):
            bad("val_fraction", self.val_fraction, "must be between 0 and 1 (exclusive)")
        if not (0 < self.fpr < 1):
            bad("fpr", self.fpr, "must be between 0 and 1 (exclusive)")
        return self

    @property
    def needs_patch(self) -> bool:
        return self.fusion != "none" or self.main_input == "spatial"

    @property
    def total_epochs(self) -> int:
        return self.max_epochs if self.early_stopping else self.epochs

    @property
    def epoch_selection(self) -> str:
        return EPOCH_SELECTION_EARLY if self.early_stopping else EPOCH_SELECTION_FIXED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    def settings(self) -> dict:
        """The settings that determine the result (compared when an unfinished run is resumed)."""
        d = self.to_dict()
        for k in self.NOT_SETTINGS:
            d.pop(k, None)
        if self.token_pool == 1:  # added later: runs fitted before token_pool existed keep their identity
            d.pop("token_pool")
        if not self.early_stopping:  # val_fraction stays: the same share is held out for calibration
            for k in ("patience", "max_epochs", "min_delta"):
                d.pop(k)
        else:
            d.pop("epochs")
        return d

    def flow_kwargs(self, dim: int, patch_dim: int, num_tokens: int) -> dict:
        return dict(dim=dim, patch_dim=patch_dim, num_tokens=num_tokens, blocks=self.blocks, fusion=self.fusion,
                    clamp=float(self.clamp), hidden=self.hidden, heads=self.heads,
                    spatial_channels=self.spatial_channels, main_input=self.main_input, attn_dim=self.attn_dim,
                    seed=self.seed)


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

    def summary(self) -> dict:
        last = self.log[-1] if self.log else {}
        best = next((r for r in self.log if r["epoch"] == self.best_epoch), {})
        return {"best_epoch": self.best_epoch, "epochs_run": self.epochs_run, "stopped_early": self.stopped_early,
                "n_train": self.n_train, "n_val": self.n_val, "final_train_loss": last.get("train_loss"),
                "best_val_nll": best.get("val_nll"), "epoch_selection": self.epoch_selection,
                "resumed_from_epoch": self.resumed_from}


# ----------------------------------------------------------------------------------------------- helpers
def resolve_device(device: str) -> torch.device:
    text = str(device or "auto").strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise SanfError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SanfError(f"device {device!r} requested but CUDA is not available here; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SanfError(f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} GPU(s)")
    elif dev.type != "cpu":
        raise SanfError(f"unsupported device {device!r}; use auto, cpu, cuda or cuda:N")
    return dev


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    if not enabled or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def score_flow(flow, cls: torch.Tensor, patch: torch.Tensor | None, score: str = "nll", *, batch_size: int = 256,
               amp: torch.dtype | None = None) -> np.ndarray:
    """Per-sample scores of a flow, no grad, in batches: ``nll`` (-log p, nats) or ``z2`` (mean z^2); float64."""
    from .flow import log_likelihood

    if score not in ("nll", "z2"):
        raise SanfError(f"unknown score {score!r}; choose nll or z2")
    device = next(flow.parameters()).device
    was_training = flow.training
    flow.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(cls), batch_size):
            x = cls[start:start + batch_size].to(device)
            p = None if patch is None else patch[start:start + batch_size].to(device)
            with autocast(device, amp):
                z, logdet = flow(x, p)
            if score == "nll":
                s = -log_likelihood(z, logdet)
            else:
                s = z.float().pow(2).mean(dim=-1)
            out.append(s.double().cpu())
    flow.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def _data_digest(*arrays) -> str:
    h = hashlib.sha256()
    for a in arrays:
        if a is not None:
            a = np.ascontiguousarray(a)
            h.update(str((a.shape, a.dtype.str)).encode())
            h.update(a.tobytes())
    return h.hexdigest()[:16]


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


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


def _diverged(what, epoch, step, steps, cfg, last_good, run_dir) -> SanfError:
    kept = (f"the checkpoint of epoch {last_good} is kept in {run_dir}" if run_dir and last_good
            else "no epoch had completed")
    return SanfError(
        f"training diverged: {what} at epoch {epoch}, step {step}/{steps}; {kept}; retry with a lower --lr "
        f"(now {cfg.lr:g}), a lower --clamp (now {cfg.clamp:g}) or --normalize l2+standardize (now {cfg.normalize}),"
        f" into a new --out or with --overwrite")


# ------------------------------------------------------------------------------------------------ fitting
def fit_flow(train_cls: np.ndarray, train_patch: np.ndarray | None, cfg: FitConfig | None = None, *,
             run_dir=None, quiet: bool = True, callback: Callable[[int, dict, torch.nn.Module], None] | None = None,
             description: str = "fit") -> FitResult:
    """Fit a flow on the normal class's training features (in memory).

    ``train_cls (n, d)``, ``train_patch (n, T, d)`` or None when ``cfg.needs_patch`` is False. With ``run_dir``
    every completed epoch is checkpointed there (``checkpoint.safetensors``, replaced atomically) and an
    existing checkpoint of the same settings and data is resumed. ``callback(epoch, log_row, model)`` runs after
    each epoch's checkpoint (for monitoring; it must not change the model). Returns the model (in eval mode, on
    CPU) of the final epoch, or of the best epoch with early stopping.
    """
    from .flow import SANFlow, log_likelihood

    cfg = (cfg or FitConfig()).validate()
    train_cls = np.asarray(train_cls, dtype=np.float32)
    if train_cls.ndim != 2:
        raise SanfError(f"class features must be (n, d), got shape {train_cls.shape}")
    if cfg.needs_patch:
        if train_patch is None:
            raise SanfError(f"fusion={cfg.fusion!r} / main_input={cfg.main_input!r} needs the patch tokens")
        train_patch = np.asarray(train_patch, dtype=np.float32)
        if train_patch.ndim != 3 or len(train_patch) != len(train_cls):
            raise SanfError(f"patch tokens must be (n, T, d) with n={len(train_cls)}, got {train_patch.shape}")
    else:
        train_patch = None
    check_finite("the training features", train_cls, train_patch)
    n = len(train_cls)
    # the held-out slice: early stopping's, or with a fixed length the same share kept for calibration only
    n_val = max(1, int(round(cfg.val_fraction * n)))
    if not cfg.early_stopping and n - n_val < 2:
        n_val = 0  # too few rows to hold any out: no calibrated threshold
    if n - n_val < 2:
        raise SanfError(f"only {n} training sample(s) of the normal class ({n_val} held out); need at least "
                        f"{n_val + 2}: use --epochs N without early stopping or a class with more samples")
    order = np.random.default_rng(cfg.seed).permutation(n) if n_val else np.arange(n)
    tr_idx, va_idx = np.sort(order[n_val:]), np.sort(order[:n_val])

    normalizer = Normalizer.fit(cfg.normalize, train_cls[tr_idx], None if train_patch is None else
                                train_patch[tr_idx], token_pool=cfg.token_pool)
    x_all, p_all = normalizer.transform(train_cls, train_patch)
    device = resolve_device(cfg.device)
    amp = amp_dtype(device, cfg.amp)
    x_tr = torch.from_numpy(x_all[tr_idx]).to(device)
    p_tr = None if p_all is None else torch.from_numpy(p_all[tr_idx]).to(device)
    x_va = torch.from_numpy(x_all[va_idx]).to(device)
    p_va = None if p_all is None else torch.from_numpy(p_all[va_idx]).to(device)

    d = train_cls.shape[1]
    patch_dim = d if p_all is None else p_all.shape[2]
    num_tokens = 1 if p_all is None else p_all.shape[1]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        try:
            flow = SANFlow(**cfg.flow_kwargs(d, patch_dim, num_tokens))
        except ValueError as exc:
            raise SanfError(f"invalid flow settings: {exc}") from None
    flow.to(device).train()
    # fused: one kernel for all 20M+ parameters; PyTorch's CPU default (per-tensor loop) spent 9x longer per step
    # than the fused kernel and dominated the fit time of the default flow (benchmarks/flow_speed.md)
    opt = torch.optim.Adam(flow.parameters(), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                           weight_decay=cfg.weight_decay, fused=True)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    ckpt_id = settings_id({"settings": cfg.settings(), "data": _data_digest(train_cls, train_patch)})
    log: list[dict] = []
    start_epoch, best_epoch, best_val, bad_epochs = 0, 0, math.inf, 0
    best_state: dict[str, torch.Tensor] | None = None
    run_dir = Path(run_dir) if run_dir is not None else None
    ckpt_path = run_dir / CHECKPOINT_FILE if run_dir else None
    if ckpt_path is not None and ckpt_path.exists():
        tensors, meta = load_tensors(ckpt_path)
        if meta.get("checkpoint_id") != ckpt_id:
            raise SanfError(f"{ckpt_path} belongs to other settings or other training data; remove it or pass "
                            f"--overwrite to start this run afresh")
        flow.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        _load_optimizer(opt, tensors)
        if "rng.torch" in tensors:
            torch.set_rng_state(tensors["rng.torch"])
        if scaler is not None and meta.get("scaler"):
            scaler.load_state_dict(meta["scaler"])
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        best_state = best or None
        log = list(meta["log"])
        start_epoch, best_epoch, bad_epochs = int(meta["epoch"]), int(meta["best_epoch"]), int(meta["bad_epochs"])
        best_val = math.inf if meta.get("best_val") is None else float(meta["best_val"])
    resumed_from = start_epoch

    def save_checkpoint(epoch: int) -> None:
        tensors = {f"model.{k}": v for k, v in flow.state_dict().items()}
        tensors.update(_optimizer_tensors(opt))
        tensors["rng.torch"] = torch.get_rng_state()
        if best_state is not None:
            tensors.update({f"best.{k}": v for k, v in best_state.items()})
        meta = {"kind": "checkpoint", "checkpoint_id": ckpt_id, "epoch": epoch, "log": log, "best_epoch": best_epoch,
                "best_val": None if math.isinf(best_val) else best_val, "bad_epochs": bad_epochs,
                "scaler": scaler.state_dict() if scaler is not None else None, "saved": now()}
        save_tensors_atomic(ckpt_path, tensors, meta)
        write_jsonl_atomic(run_dir / LOG_FILE, log)

    n_tr = len(x_tr)
    steps = (n_tr + cfg.batch_size - 1) // cfg.batch_size
    total_epochs = cfg.total_epochs
    stopped_early = cfg.early_stopping and bad_epochs >= cfg.patience
    from .progress import progress_bar

    with progress_bar(quiet, unit="samples") as bar:
        task = bar.add_task(description, total=steps * total_epochs, completed=steps * start_epoch, rate="")
        for epoch in range(start_epoch + 1, total_epochs + 1):
            if stopped_early:
                break
            flow.train()
            t0 = time.perf_counter()
            perm = torch.randperm(n_tr, generator=_epoch_generator(cfg.seed, epoch)).to(device)
            loss_sum = 0.0
            for step in range(steps):
                idx = perm[step * cfg.batch_size:(step + 1) * cfg.batch_size]
                xb = x_tr[idx]
                pb = None if p_tr is None else p_tr[idx]
                with autocast(device, amp):
                    z, logdet = flow(xb, pb)
                loss = (-log_likelihood(z, logdet)).mean() / z.shape[-1]
                if not torch.isfinite(loss):
                    raise _diverged(f"the loss became {loss.item()}", epoch, step + 1, steps, cfg, start_epoch,
                                    run_dir)
                opt.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.unscale_(opt)
                else:
                    loss.backward()
                if cfg.grad_clip is not None:
                    norm = torch.nn.utils.clip_grad_norm_(flow.parameters(), cfg.grad_clip)
                    if scaler is None and not torch.isfinite(norm):
                        raise _diverged("the gradient became non-finite", epoch, step + 1, steps, cfg,
                                        start_epoch, run_dir)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                loss_value = float(loss.detach())
                loss_sum += loss_value * len(idx)
                seen = step * cfg.batch_size + len(idx)
                rate = seen / max(time.perf_counter() - t0, 1e-9)
                bar.update(task, advance=1, rate=f"{rate:.0f} samples/s",
                           description=f"{description} epoch {epoch}/{total_epochs} loss {loss_value:.4f}")
            seconds = time.perf_counter() - t0
            row = {"epoch": epoch, "train_loss": loss_sum / n_tr, "val_nll": None, "samples_per_s": n_tr / seconds,
                   "seconds": seconds, "lr": cfg.lr}
            if n_val and cfg.early_stopping:
                # held-out NLL in full precision (also under AMP): it decides the epoch
                val = float(score_flow(flow, x_va, p_va, "nll", batch_size=cfg.eval_batch_size).mean() / flow.z_dim)
                if not math.isfinite(val):
                    raise _diverged(f"the held-out NLL became {val}", epoch, steps, steps, cfg, start_epoch,
                                    run_dir)
                row["val_nll"] = val
                if val < best_val - cfg.min_delta:
                    best_val, best_epoch, bad_epochs = val, epoch, 0
                    best_state = {k: v.detach().clone() for k, v in flow.state_dict().items()}
                else:
                    bad_epochs += 1
                stopped_early = cfg.early_stopping and bad_epochs >= cfg.patience
            else:
                best_epoch = epoch
            row["best_epoch"] = best_epoch
            log.append(row)
            if ckpt_path is not None:
                save_checkpoint(epoch)
            start_epoch = epoch  # the last good checkpoint
            if callback is not None:
                callback(epoch, row, flow)
        if stopped_early:
            bar.update(task, completed=steps * total_epochs)

    if cfg.early_stopping and best_state is not None:
        flow.load_state_dict(best_state)
    calibration = None
    if n_val:
        from .calibration import SLICE_EARLY, SLICE_FIXED, calibration_record

        held_out = {s: score_flow(flow, x_va, p_va, s, batch_size=cfg.eval_batch_size) for s in ("nll", "z2")}
        calibration = calibration_record(held_out, fpr=cfg.fpr, slice_desc=SLICE_EARLY if cfg.early_stopping
                                         else SLICE_FIXED, seed=cfg.seed, fraction=cfg.val_fraction)
    flow.eval().to("cpu")
    return FitResult(model=flow, normalizer=normalizer, log=log, best_epoch=best_epoch, epochs_run=len(log),
                     stopped_early=bool(stopped_early), n_train=n_tr, n_val=n_val, device=str(device),
                     resumed_from=resumed_from,
                     epoch_selection=cfg.epoch_selection, calibration=calibration)


@dataclass
class FitRun:
    run_dir: Path
    config: dict
    result: FitResult
    resumed: bool = False
    extra: dict = field(default_factory=dict)


def fit_run(cache_path, normal_class, cfg: FitConfig | None = None, out_dir=None, *, overwrite: bool = False,
            quiet: bool = False, callback: Callable[[int, dict, torch.nn.Module], None] | None = None) -> FitRun:
    """Fit a flow on one normal class of a cache and write the run folder (resuming an unfinished one)."""
    from .cache import open_cache

    cfg = (cfg or FitConfig()).validate()
    cache = open_cache(cache_path)
    try:
        ci = cache.class_index(normal_class)
        name = cache.class_names[ci]
        run_dir = Path(out_dir) if out_dir else default_run_name(cache_path, name)
        settings = {"fit": cfg.settings(), "cache_fingerprint": cache.fingerprint, "normal_class": ci}
        cls, patch = cache.split("train").read_class(ci, patch=cfg.needs_patch)
        if len(cls) == 0:
            raise SanfError(f"class {name!r} has no valid training samples in {cache.path}")
        check_finite(f"the training features of class {name!r} in {cache.path}", cls, patch)
        identity = cache_identity(cache)
    finally:
        cache.close()
    mode = prepare_out_dir(run_dir, settings, overwrite=overwrite, what="run",
                           finished_hint=f" (evaluate it with `sanf eval --run {run_dir}`)")
    created = now()
    if mode == "resume":
        created = read_json_file(run_dir / CONFIG_FILE).get("created", created)
    config = start_run_config(run_dir, cfg, settings, class_index=ci, class_name=name, n_train=len(cls),
                              cache_identity=identity, created=created)
    if mode == "resume":
        config["resumed"] = now()
        write_json_atomic(run_dir / CONFIG_FILE, config)
    result = fit_flow(cls, patch, cfg, run_dir=run_dir, quiet=quiet, callback=callback,
                      description=f"fit {name}")
    finish_run(run_dir, config, result)
    return FitRun(run_dir=run_dir, config=config, result=result, resumed=mode == "resume")


def start_run_config(run_dir, cfg: FitConfig, settings: dict, *, class_index: int, class_name: str, n_train: int,
                     cache_identity: dict, created: str, extra: dict | None = None) -> dict:
    """Write (atomically) and return the ``config.json`` of a flow run that is about to train."""
    config = {
        "format": RUN_FORMAT, "format_version": RUN_FORMAT_VERSION, "kind": "flow", "method": "sanf-flow",
        "run_id": settings_id(settings), "settings": settings, "fit": cfg.to_dict(),
        "normal_class": class_index, "normal_class_name": class_name, "n_train_total": int(n_train),
        "cache": cache_identity, "epoch_selection": cfg.epoch_selection, "device": str(resolve_device(cfg.device)),
        "created": created, "versions": package_versions(), "status": "running", **(extra or {}),
    }
    write_json_atomic(Path(run_dir) / CONFIG_FILE, config)
    return config


def finish_run(run_dir, config: dict, result: FitResult) -> None:
    """Mark ``config`` finished, then write config, training log and model; drop the epoch checkpoint last."""
    run_dir = Path(run_dir)
    config.update({"flow": result.model.config(), "normalizer": result.normalizer.config(),
                   "result": result.summary(), "status": "finished", "finished": now(),
                   "calibration": result.calibration})
    write_json_atomic(run_dir / CONFIG_FILE, config)
    write_jsonl_atomic(run_dir / LOG_FILE, result.log)
    save_model(run_dir, result.model, result.normalizer, config)
    (run_dir / CHECKPOINT_FILE).unlink(missing_ok=True)


def save_model(run_dir, flow, normalizer: Normalizer, config: dict) -> Path:
    """``model.safetensors``: flow state + normaliser statistics; the run config as JSON metadata."""
    tensors = {f"flow.{k}": v for k, v in flow.state_dict().items()}
    tensors.update(normalizer.state_dict())
    path = Path(run_dir) / MODEL_FILE
    save_tensors_atomic(path, tensors, config)
    return path
