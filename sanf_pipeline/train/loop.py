"""The step loop both trainers share (``train.fit.fit_flow`` for one flow, ``train.stack.fit_stack`` for K): the
epoch's batch order (``epoch_order``, ``min_epoch_steps``), input noise, the loss (NLL per dimension), per-flow
gradient clipping, the AMP scaler, divergence checks (``train_step``, ``run_epoch``) and early stopping
(``EarlyStopping``, ``close_epoch``), so each is written once."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..device import autocast
from ..flow.normalizer import Normalizer
from .config import FitConfig


def _epoch_generator(seed: int, epoch: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch))


# --------------------------------------------------------------------------------------- data preparation
@dataclass
class PreparedData:
    """The fit's inputs on the device: normalised training and held-out rows, and the fitted normaliser."""

    normalizer: Normalizer
    x_tr: torch.Tensor
    p_tr: torch.Tensor | None
    x_va: torch.Tensor
    p_va: torch.Tensor | None
    dim: int
    patch_dim: int
    num_tokens: int
    digest: str

    @property
    def n_train(self) -> int:
        return len(self.x_tr)

    @property
    def n_val(self) -> int:
        return len(self.x_va)


# -------------------------------------------------------------------------------------------- stopping rule
def _snapshot(flow) -> dict:
    """A copy of the weights: of a module, or what a callable returns (a stacked flow's slice, already a copy)."""
    if isinstance(flow, torch.nn.Module):
        return {k: v.detach().clone() for k, v in flow.state_dict().items()}
    return flow()


@dataclass
class EarlyStopping:
    """Keep the epoch with the lowest held-out NLL; stop after ``patience`` epochs without an improvement of more
    than ``min_delta``. With a fixed length (no held-out rows) the last epoch is the kept one and nothing stops.

    One per flow in both trainers. ``flow`` is the module, or (a stacked flow) a callable returning its weights;
    it is only read when the epoch is kept."""

    enabled: bool
    patience: int
    min_delta: float
    best_epoch: int = 0
    best_val: float = math.inf
    bad_epochs: int = 0
    best_state: dict | None = None
    initial_val: float | None = None

    def start(self, val: float, flow) -> None:
        """Score the untrained flow as "epoch 0": it is kept unless a trained epoch beats it (keep_initial)."""
        self.initial_val = self.best_val = val
        self.best_state = _snapshot(flow)

    @property
    def stopped(self) -> bool:
        return self.enabled and self.bad_epochs >= self.patience

    def update(self, epoch: int, val: float | None, flow) -> None:
        if val is None:
            self.best_epoch = epoch
        elif val < self.best_val - self.min_delta:
            self.best_val, self.best_epoch, self.bad_epochs = val, epoch, 0
            self.best_state = _snapshot(flow)
        else:
            self.bad_epochs += 1

    def kept_state(self) -> dict | None:
        """The weights the fit returns; None: the last epoch's (a fixed length)."""
        return self.best_state if self.enabled else None

    def state(self) -> dict:
        return {"best_epoch": self.best_epoch, "best_val": None if math.isinf(self.best_val) else self.best_val,
                "bad_epochs": self.bad_epochs, "initial_val": self.initial_val}

    def load(self, meta: dict, best_state: dict | None) -> None:
        self.best_epoch, self.bad_epochs = int(meta["best_epoch"]), int(meta["bad_epochs"])
        self.best_val = math.inf if meta.get("best_val") is None else float(meta["best_val"])
        self.best_state = best_state or None
        self.initial_val = meta.get("initial_val")


def close_epoch(stopping: EarlyStopping, epoch: int, row: dict, val: float | None, flow) -> str | None:
    """After an epoch of one flow: its held-out NLL into ``row`` and the stopping rule; returns why the flow
    diverged (None: it did not)."""
    if val is not None:
        if not math.isfinite(val):
            return f"the held-out NLL became {val}"
        row["val_nll"] = val
    stopping.update(epoch, val, flow)
    row["best_epoch"] = stopping.best_epoch
    return None


# ----------------------------------------------------------------------------------------------- epoch loop
# The training step of both trainers (fit_flow here, stack.fit_stack): batch order, input noise, loss, clipping, AMP
# scaler, divergence. Flows have a leading flow axis throughout: K stacked flows, or one module (K = 1) whose batch
# and outputs carry an axis of 1, so a stacked flow computes what its single fit computes.

# devices where the step loop checks the loss on the host each step (free on CPU; on a GPU it would stall the queue)
HOST_CHECK_DEVICES = ("cpu",)
NON_FINITE = "the loss or its gradient became non-finite"


def epoch_steps(n_train: int, cfg: FitConfig) -> int:
    """Optimiser steps of one epoch: one pass over the rows, or ``min_epoch_steps`` if that is more."""
    return max((n_train + cfg.batch_size - 1) // cfg.batch_size, cfg.min_epoch_steps)


def epoch_order(seed: int, n_train: int, cfg: FitConfig, epoch: int) -> torch.Tensor:
    """The training rows of ``epoch`` in batch order, from the ``(seed, epoch)`` generator: one permutation, or as
    many passes as ``min_epoch_steps`` batches need (a short last batch, as one pass has, unless the epoch is longer
    than one pass)."""
    steps = epoch_steps(n_train, cfg)
    gen = _epoch_generator(seed, epoch)
    one_pass = steps == (n_train + cfg.batch_size - 1) // cfg.batch_size
    passes = 1 if one_pass else -(-steps * cfg.batch_size // n_train)
    return torch.cat([torch.randperm(n_train, generator=gen) for _ in range(passes)])


def noise_generator(seed: int, epoch: int) -> torch.Generator:
    # apart from the batch-order generator's seeds, so adding noise leaves the batch order as it was
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + int(epoch) + 500_000_001)


def add_noise(cfg: FitConfig, xb: torch.Tensor, pb: torch.Tensor | None, gens: list[torch.Generator]):
    """Input noise on what the flow transforms (the class feature, or the tokens with ``main_input="spatial"``);
    ``xb (K, b, d)``, ``pb (K, b, T, d)``. Each flow draws from its own generator on the host, so a stacked flow
    draws the numbers of its single fit on any device."""
    if not cfg.noise:
        return xb, pb

    def noisy(t):
        draws = torch.stack([torch.randn(t.shape[1:], generator=g) for g in gens])
        return t + cfg.noise * draws.to(t.device)

    if cfg.main_input == "spatial":
        return xb, noisy(pb)
    return noisy(xb), pb


def nll_loss(z: torch.Tensor, logdet: torch.Tensor) -> torch.Tensor:
    """Per flow, the batch mean of the negative log-likelihood in nats per dimension: ``z (K, b, d)`` -> ``(K,)``."""
    from ..flow import log_likelihood

    return (-log_likelihood(z, logdet)).mean(dim=-1) / z.shape[-1]


def clip_per_flow_(grads: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """Clip each flow's gradient (all its tensors together) to norm ``max_norm`` in place; ``grads`` carry the flow
    axis first. Returns the norms before clipping ``(K,)``. The coefficient is ``clip_grad_norm_``'s, so one flow
    is clipped as ``torch.nn.utils.clip_grad_norm_`` clips it."""
    k = grads[0].shape[0]
    norms = torch.stack([g.reshape(k, -1).norm(dim=1) for g in grads]).norm(dim=0)
    coef = torch.clamp(max_norm / (norms + 1e-6), max=1.0)
    for g in grads:
        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
    return norms


def make_optimizer(params, cfg: FitConfig) -> torch.optim.Optimizer:
    # fused: one kernel for all parameters; PyTorch's CPU default (a per-tensor loop) dominated the fit time of
    # the default flow (benchmarks/flow_speed.md). Adam is element-wise, so over stacked tensors it is one Adam
    # per flow.
    return torch.optim.Adam(list(params), lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                            weight_decay=cfg.weight_decay, fused=True)


def make_scaler(device: torch.device, amp: torch.dtype | None) -> torch.amp.GradScaler | None:
    """float16 needs loss scaling against underflowing gradients; bfloat16 has float32's range and needs none."""
    return torch.amp.GradScaler(device.type) if amp == torch.float16 else None


def train_step(forward, params: list[torch.Tensor], opt, scaler, xb, pb, cfg: FitConfig, amp, *, stacked: bool,
               diverged: Callable[[str], Exception] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step of K flows: ``forward(xb, pb) -> (z, logdet)`` with the flow axis first. ``params``: the
    stacked tensors (``stacked``) or one module's. Returns the losses ``(K,)`` and where the step went non-finite
    ``(K,)`` bool, on the device. With ``diverged`` (host checks) a non-finite loss or gradient raises at once.

    Under an fp16 scaler a non-finite gradient is an overflow the scaler skips, not a divergence."""
    device = xb.device
    with autocast(device, amp):
        z, logdet = forward(xb, pb)
    loss = nll_loss(z, logdet)
    if diverged is not None and not bool(torch.isfinite(loss).all()):
        raise diverged(f"the loss became {loss[~torch.isfinite(loss)][0].item()}")
    opt.zero_grad(set_to_none=True)
    total = loss.sum()  # the flows' losses are independent: the gradient of the sum is each flow's own
    if scaler is not None:
        scaler.scale(total).backward()
        scaler.unscale_(opt)  # clip the true gradient
    else:
        total.backward()
    bad = ~torch.isfinite(loss.detach())
    if cfg.grad_clip is not None:
        grads = [p.grad if stacked else p.grad[None] for p in params if p.grad is not None]
        norms = clip_per_flow_(grads, cfg.grad_clip)
        if scaler is None:
            if diverged is not None and not bool(torch.isfinite(norms).all()):
                raise diverged("the gradient became non-finite")
            bad = bad | ~torch.isfinite(norms)
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()
    return loss.detach(), bad


@dataclass
class EpochTotals:
    """One epoch of K flows, read back once: mean training loss and first non-finite step (1-based, -1: none)."""

    losses: np.ndarray
    bad_at: np.ndarray
    seen: int
    seconds: float

    def row(self, pos: int, epoch: int, cfg: FitConfig) -> dict:
        """Flow ``pos``'s log row (``val_nll`` and ``best_epoch`` follow from ``close_epoch``)."""
        return {"epoch": epoch, "train_loss": float(self.losses[pos]), "val_nll": None,
                "samples_per_s": self.seen / self.seconds, "seconds": self.seconds, "lr": cfg.lr}


def run_epoch(forward, params, opt, scaler, batch, seeds: list[int], n_train: int, cfg: FitConfig, epoch: int,
              amp, *, stacked: bool, device: torch.device, diverged: Callable[[str, int], Exception] | None = None,
              progress: Callable | None = None) -> EpochTotals:
    """One epoch of K flows with ``n_train`` training rows each, flow ``k`` in the order of ``seeds[k]``.
    ``batch(rows)``: the inputs ``(xb, pb)`` of ``rows (K, b)``, positions in each flow's training rows.
    ``diverged(what, step)``: host checks each step (one flow on CPU); otherwise the device keeps the first bad
    step, read with the losses after the epoch. ``progress(loss or None, samples/s)`` after each step."""
    steps = epoch_steps(n_train, cfg)
    t0 = time.perf_counter()
    order = torch.stack([epoch_order(s, n_train, cfg, epoch) for s in seeds]).to(device)
    gens = [noise_generator(s, epoch) for s in seeds]
    loss_sum = torch.zeros(len(seeds), dtype=torch.float64, device=device)
    first_bad = torch.full((len(seeds),), -1, dtype=torch.long, device=device)
    bs = cfg.batch_size
    for step in range(steps):
        rows = order[:, step * bs:(step + 1) * bs]
        xb, pb = add_noise(cfg, *batch(rows), gens)
        check = None if diverged is None else (lambda what, step=step: diverged(what, step + 1))
        loss, bad = train_step(forward, params, opt, scaler, xb, pb, cfg, amp, stacked=stacked, diverged=check)
        first_bad = torch.where((first_bad < 0) & bad, step + 1, first_bad)
        loss_sum += loss.double() * rows.shape[1]
        if progress is not None:
            seen = min(step * bs + rows.shape[1], order.shape[1])
            progress(loss if diverged is not None else None, seen / max(time.perf_counter() - t0, 1e-9))
    seen = min(steps * bs, order.shape[1])
    losses = loss_sum.cpu().numpy() / seen
    return EpochTotals(losses=losses, bad_at=first_bad.cpu().numpy(), seen=seen, seconds=time.perf_counter() - t0)


def _train_epoch(flow, opt, scaler, data: PreparedData, cfg: FitConfig, epoch: int, amp, diverged, progress) -> dict:
    """One epoch of the single fit in the seeded order of ``epoch``; returns the epoch's log row."""
    device = data.x_tr.device
    flow.train()

    def forward(xb, pb):
        z, logdet = flow(xb[0], None if pb is None else pb[0])
        return z[None], logdet[None]

    def batch(rows):
        return data.x_tr[rows], None if data.p_tr is None else data.p_tr[rows]

    def shown(loss, rate):
        progress(None if loss is None else float(loss[0]), rate)

    host_checks = device.type in HOST_CHECK_DEVICES
    totals = run_epoch(forward, list(flow.parameters()), opt, scaler, batch, [cfg.seed], data.n_train, cfg, epoch,
                       amp, stacked=False, device=device, diverged=diverged if host_checks else None,
                       progress=shown)
    if totals.bad_at[0] > 0:
        raise diverged(NON_FINITE, int(totals.bad_at[0]))
    return totals.row(0, epoch, cfg)
