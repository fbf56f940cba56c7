"""Many flows of one architecture trained together: ``fit_stack`` and ``score_stack``.

Owns the stacked trainer of the GPU path. ``K`` flows whose settings differ only in ``seed`` (and in the normal
class whose data they see) are one batched model: their parameters are stacked along a new leading axis
(``torch.func.stack_module_state``) and the shared architecture runs once per step for all of them
(``torch.func.functional_call`` under ``torch.func.vmap``, i.e. batched matmuls). Each flow keeps everything a
separate ``train.fit_flow`` would have:

- its own initial weights (built under ``torch.manual_seed(seed)`` exactly as ``fit_flow`` builds them) and
  permutations (buffers, stacked too);
- its own held-out slice and normaliser (fitted on its own training rows), batch order (the ``(seed, epoch)``
  generator of ``fit_flow``), gradient-norm clip (per flow) and early-stopping epoch;
- its own Adam state: Adam is element-wise, so one (fused) Adam over the stacked tensors updates every flow as
  its own optimiser would. A flow that stops early leaves the stack at the end of that epoch (the stacked
  tensors and the Adam state are compacted), so finished flows cost nothing.

Data are on the device once: the class tokens normalised per flow ``(K, n, d)`` (small), the patch tokens
once per class (pooled and, with an ``l2`` method, L2-normalised), and each flow's per-channel
standardisation applied per batch, so ``K`` flows of one class never hold ``K`` copies of the patch tokens.
The step loop never waits on the host (no ``.item()``): losses and the first non-finite step are kept on the
device and read once per epoch. ``score_stack`` scores every flow of a stack against a split in one pass.

Results equal ``K`` separate ``fit_flow`` runs up to float rounding (the per-channel standardisation is done
in float32 instead of float64, sums are batched): ``tests/test_stack.py`` checks weights, NLLs and AUROCs to
1e-5 in fp32. Differences from ``fit_flow``: no per-epoch checkpoint (a killed stack is retrained; the sweep
resumes flows that have a ``fit_flow`` checkpoint with ``fit_flow``), and with fp16 autocast one GradScaler
serves the whole stack (an overflow in one flow skips the step of all; bf16 needs no scaler).
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .device import amp_dtype, autocast, resolve_device
from .errors import SanfError
from .features import Normalizer
from .fit_config import FitConfig
from .train import FitResult, _diverged, _epoch_generator

# Settings that may differ inside one stack; everything else in FitConfig.settings() must be equal.
PER_FLOW_SETTINGS = ("seed",)


@dataclass
class StackMember:
    """One flow of a stack: its settings and the raw training features of its normal class.

    ``data_key`` names the training block; members with the same key share one copy of the patch tokens on
    the device (the sweep passes the class index). ``None``: the block is identified by ``id(patch)``.
    """

    cfg: FitConfig
    cls: np.ndarray
    patch: np.ndarray | None = None
    data_key: object = None


def stack_key(cfg: FitConfig) -> str:
    """Flows with the same key can share a stack (same architecture, optimiser and training length)."""
    import json

    s = cfg.settings()
    for k in PER_FLOW_SETTINGS:
        s.pop(k, None)
    return json.dumps({"settings": s, "device": str(cfg.device)}, sort_keys=True, default=str)


# ------------------------------------------------------------------------------------------ data on device
def _patch_rows(norm: Normalizer, patch: np.ndarray) -> torch.Tensor:
    """Pooled (and, for l2 methods, L2-normalised) patch tokens as float32; the shared part of the transform."""
    pooled = norm.pool(patch)
    out = np.empty(pooled.shape, dtype=np.float32)
    flat_in = pooled.reshape(-1, pooled.shape[-1])
    flat_out = out.reshape(-1, pooled.shape[-1])
    for s in range(0, len(flat_in), 65536):
        b = flat_in[s:s + 65536].astype(np.float64)
        if norm.l2:
            b = b / np.maximum(np.linalg.norm(b, axis=-1, keepdims=True), 1e-12)
        flat_out[s:s + len(b)] = b
    return torch.from_numpy(out)


def _channel_stats(rows: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in float64 over ``rows (m, T, d)``, as ``features._stats`` (two passes)."""
    from .features import _STD_REL_FLOOR

    flat = rows.reshape(-1, rows.shape[-1])
    n = max(1, flat.shape[0])
    total = torch.zeros(flat.shape[1], dtype=torch.float64, device=rows.device)
    for s in range(0, flat.shape[0], 65536):
        total += flat[s:s + 65536].double().sum(0)
    mean = total / n
    sq = torch.zeros_like(total)
    for s in range(0, flat.shape[0], 65536):
        sq += (flat[s:s + 65536].double() - mean).pow(2).sum(0)
    std = (sq / n).sqrt().cpu().numpy()
    floor = max(np.finfo(np.float64).tiny, _STD_REL_FLOOR * float(std.max(initial=0.0)))
    return mean.cpu().numpy(), np.where(std < floor, 1.0, std)


class _PatchPool:
    """The patch tokens of every training block of a stack in one device tensor, each block copied there once
    (allocated once, filled block by block, so the host holds one converted block at a time); rows are addressed
    globally (block offset + row). ``dtype``: float32, or bfloat16 under bf16 autocast (half the memory; the
    FFMs read the tokens in bf16 anyway)."""

    def __init__(self, device: torch.device, dtype: torch.dtype = torch.float32):
        self.device, self.dtype = device, dtype
        self.blocks: dict[object, tuple[Normalizer, np.ndarray]] = {}
        self.offsets: dict[object, int] = {}
        self.tensor: torch.Tensor | None = None

    def add(self, key, norm: Normalizer, patch: np.ndarray) -> int:
        if key not in self.offsets:
            self.offsets[key] = sum(len(p) for _, p in self.blocks.values())
            self.blocks[key] = (norm, patch)
        return self.offsets[key]

    def finish(self) -> torch.Tensor | None:
        if not self.blocks:
            return None
        first = next(iter(self.blocks.values()))
        shape = _patch_rows(first[0], first[1][:1]).shape[1:]
        rows = sum(len(p) for _, p in self.blocks.values())
        self.tensor = torch.empty((rows, *shape), dtype=self.dtype, device=self.device)
        for key, (norm, patch) in self.blocks.items():
            off = self.offsets[key]
            block = _patch_rows(norm, patch)
            if not bool(torch.isfinite(block).all()):
                raise SanfError("the training patch tokens hold NaN or Inf values")
            self.tensor[off:off + len(block)] = block.to(self.device, self.dtype)
        self.blocks = {}
        return self.tensor


def _stacked_forward(base):
    from torch.func import functional_call, vmap

    def one(params, buffers, x, p):
        return functional_call(base, (params, buffers), (x, p))

    return vmap(one, in_dims=(0, 0, 0, 0)), vmap(one, in_dims=(0, 0, 0, None))


def _gather_patch(pool, rows, mean, std):
    """Patch tokens of global ``rows (K, b)``, standardised per flow: ``(K, b, T, d)`` float32."""
    p = pool[rows].float()
    if mean is not None:
        p = (p - mean[:, None, None, :]) / std[:, None, None, :]
    return p


# ------------------------------------------------------------------------------------------------ training
def fit_stack(members: Sequence[StackMember], *, quiet: bool = True, description: str = "fit stack"
              ) -> list[FitResult | SanfError]:
    """Train the flows of ``members`` together; one result per member, in order: the ``FitResult`` a separate
    ``fit_flow(m.cls, m.patch, m.cfg)`` returns (model on CPU, eval mode), or the ``SanfError`` it would raise
    (a diverged flow leaves the stack; the others go on)."""
    from .flow import SANFlow, log_likelihood
    from .progress import progress_bar
    from .runs import check_finite

    if not members:
        return []
    cfgs = [m.cfg.validate() for m in members]
    keys = {stack_key(c) for c in cfgs}
    if len(keys) > 1:
        raise SanfError("a stack needs flows whose settings differ only in seed; group them with plan_stacks")
    c0 = cfgs[0]
    n = len(members[0].cls)
    if any(len(m.cls) != n for m in members):
        raise SanfError("a stack needs training blocks of one size; group them with plan_stacks")
    device = resolve_device(c0.device)
    amp = amp_dtype(device, c0.amp)
    K = len(members)

    pool = _PatchPool(device, torch.bfloat16 if amp == torch.bfloat16 else torch.float32)
    norms, tr_idx, va_idx, x_all, offsets = [], [], [], [], []
    for m, cfg in zip(members, cfgs, strict=True):
        cls = np.asarray(m.cls, dtype=np.float32)
        patch = None
        if cfg.flow_needs_patch:
            if m.patch is None:
                raise SanfError(f"fusion={cfg.fusion!r} / main_input={cfg.main_input!r} needs the patch tokens")
            patch = m.patch
        check_finite("the training features", cls)
        tr, va = cfg.held_out_split(n)  # as train.prepare_data: held out for calibration also
        norm = Normalizer.fit(cfg.normalize, cls[tr], None, token_pool=cfg.token_pool)
        offsets.append(0 if patch is None else pool.add(m.data_key if m.data_key is not None else id(patch),
                                                          norm, patch))
        norms.append(norm)
        tr_idx.append(tr)
        va_idx.append(va)
        x_all.append(norm.transform_cls(cls))
    P = pool.finish()
    # per-flow patch standardisation, fitted on each flow's own training rows (in float64, on the device)
    p_mean = p_std = None
    if P is not None and norms[0].standardize:
        means, stds = [], []
        for k, norm in enumerate(norms):
            rows = torch.from_numpy(offsets[k] + tr_idx[k]).to(device)
            mu, sd = _channel_stats(P[rows])
            norm.patch_mean, norm.patch_std = mu, sd
            means.append(mu)
            stds.append(sd)
        p_mean = torch.tensor(np.stack(means), dtype=torch.float32, device=device)
        p_std = torch.tensor(np.stack(stds), dtype=torch.float32, device=device)
    X = torch.from_numpy(np.stack(x_all)).to(device)  # (K, n, d)
    offs = torch.tensor(offsets, dtype=torch.long, device=device)

    d = X.shape[-1]
    patch_dim = d if P is None else P.shape[-1]
    num_tokens = 1 if P is None else P.shape[1]
    flows = []
    for cfg in cfgs:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            try:
                flows.append(SANFlow(**cfg.flow_kwargs(d, patch_dim, num_tokens)))
            except ValueError as exc:
                raise SanfError(f"invalid flow settings: {exc}") from None
    z_dim = flows[0].z_dim
    base = copy.deepcopy(flows[0]).to("meta")
    fwd_patch, fwd_nopatch = _stacked_forward(base)
    from torch.func import stack_module_state

    p0, b0 = stack_module_state(flows)
    params = {k: v.detach().to(device).requires_grad_(True) for k, v in p0.items()}
    buffers = {k: v.to(device) for k, v in b0.items()}
    del p0, b0

    def make_opt(ps):
        return torch.optim.Adam(list(ps.values()), lr=c0.lr, betas=c0.betas, eps=c0.eps,
                                weight_decay=c0.weight_decay, fused=True)

    opt = make_opt(params)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    def forward(ps, bs, x, p):
        return (fwd_patch if p is not None else fwd_nopatch)(ps, bs, x, p)

    active = list(range(K))  # member indices, in stack order
    results: list[FitResult | SanfError | None] = [None] * K
    logs: list[list[dict]] = [[] for _ in range(K)]
    best_val = [math.inf] * K
    best_epoch = [0] * K
    bad_epochs = [0] * K
    best_state: list[dict | None] = [None] * K
    initial_val: list[float | None] = [None] * K
    n_val = len(va_idx[0])
    n_tr = n - n_val
    bs = c0.batch_size
    steps = (n_tr + bs - 1) // bs
    total_epochs = c0.total_epochs
    tr_t = torch.from_numpy(np.stack(tr_idx)).to(device)  # (K, n_tr) local rows
    va_t = torch.from_numpy(np.stack(va_idx)).to(device) if n_val else None

    def finish(k: int, state: dict, stopped: bool) -> None:
        flow = flows[k]
        flow.load_state_dict({name: t.to("cpu") for name, t in state.items()})
        results[k] = FitResult(model=flow.eval(), normalizer=norms[k], log=logs[k], best_epoch=best_epoch[k],
                               epochs_run=len(logs[k]), stopped_early=stopped, n_train=n_tr, n_val=n_val,
                               device=str(device), resumed_from=0, epoch_selection=cfgs[k].epoch_selection,
                               calibration=_calibration(flow, norms[k], members[k], cfgs[k], va_idx[k]),
                               initial_val_nll=initial_val[k])

    def member_state(pos: int) -> dict:
        out = {name: t[pos].detach().clone() for name, t in params.items()}
        out.update({name: t[pos].clone() for name, t in buffers.items()})
        return out

    if n_val and c0.early_stopping and c0.keep_initial:
        # as fit_flow: the untrained flows compete as epoch 0 (FitConfig.keep_initial)
        every = torch.arange(K, dtype=torch.long, device=device)
        init = _stacked_nll(forward, params, buffers, X[every], va_t[every], P, offs[every][:, None],
                            None if p_mean is None else p_mean[every], None if p_std is None else p_std[every],
                            c0.eval_batch_size, z_dim, amp=None)
        for k in range(K):
            initial_val[k] = best_val[k] = float(init[k])
            best_state[k] = member_state(k)

    with progress_bar(quiet, unit="steps") as bar:
        task = bar.add_task(f"{description} ({K} flows)", total=steps * total_epochs, rate="")
        for epoch in range(1, total_epochs + 1):
            if not active:
                break
            ka = len(active)
            act = torch.tensor(active, dtype=torch.long, device=device)
            t0 = time.perf_counter()
            perms = torch.stack([torch.randperm(n_tr, generator=_epoch_generator(cfgs[k].seed, epoch))
                                 for k in active]).to(device)
            local = torch.gather(tr_t[act], 1, perms)  # (ka, n_tr) rows of each flow's own block, epoch order
            x_act, mean_act = X[act], None if p_mean is None else p_mean[act]
            std_act = None if p_std is None else p_std[act]
            off_act = offs[act][:, None]
            loss_sum = torch.zeros(ka, dtype=torch.float64, device=device)
            first_bad = torch.full((ka,), -1, dtype=torch.long, device=device)
            for step in range(steps):
                rows = local[:, step * bs:(step + 1) * bs]
                xb = torch.gather(x_act, 1, rows[:, :, None].expand(-1, -1, d))
                pb = None if P is None else _gather_patch(P, rows + off_act, mean_act, std_act)
                with autocast(device, amp):
                    z, logdet = forward(params, buffers, xb, pb)
                loss = (-log_likelihood(z, logdet)).mean(dim=-1) / z_dim  # (ka,)
                for p in params.values():
                    p.grad = None
                total = loss.sum()
                if scaler is not None:
                    scaler.scale(total).backward()
                    scaler.unscale_(opt)
                else:
                    total.backward()
                bad = ~torch.isfinite(loss)
                if c0.grad_clip is not None:
                    grads = [p.grad for p in params.values() if p.grad is not None]
                    norms_k = torch.stack([g.reshape(ka, -1).norm(dim=1) for g in grads]).norm(dim=0)  # (ka,)
                    coef = torch.clamp(c0.grad_clip / (norms_k + 1e-6), max=1.0)
                    for g in grads:
                        g.mul_(coef.view(-1, *([1] * (g.dim() - 1))).to(g.dtype))
                    if scaler is None:
                        bad = bad | ~torch.isfinite(norms_k)
                first_bad = torch.where((first_bad < 0) & bad, torch.full_like(first_bad, step + 1), first_bad)
                if scaler is not None:
                    scaler.step(opt)
                    scaler.update()
                else:
                    opt.step()
                loss_sum += loss.detach().double() * rows.shape[1]
                bar.update(task, advance=1)
            # one host sync per epoch: losses, divergence, held-out NLL
            seconds = time.perf_counter() - t0
            losses = (loss_sum / n_tr).cpu().numpy()
            bad_at = first_bad.cpu().numpy()
            val = None
            if n_val and c0.early_stopping:
                val = _stacked_nll(forward, params, buffers, X[act], va_t[act], P, off_act, mean_act, std_act,
                                   c0.eval_batch_size, z_dim, amp=None)
            keep = []
            for pos, k in enumerate(active):
                row = {"epoch": epoch, "train_loss": float(losses[pos]), "val_nll": None,
                       "samples_per_s": n_tr / seconds, "seconds": seconds, "lr": cfgs[k].lr}
                if bad_at[pos] >= 0:
                    results[k] = _diverged("the loss or its gradient became non-finite", epoch, int(bad_at[pos]),
                                           steps, cfgs[k], epoch - 1, None)
                    continue
                stopped = False
                if val is not None:
                    v = float(val[pos])
                    if not math.isfinite(v):
                        results[k] = _diverged(f"the held-out NLL became {v}", epoch, steps, steps, cfgs[k],
                                               epoch - 1, None)
                        continue
                    row["val_nll"] = v
                    if v < best_val[k] - cfgs[k].min_delta:
                        best_val[k], best_epoch[k], bad_epochs[k] = v, epoch, 0
                        best_state[k] = member_state(pos)
                    else:
                        bad_epochs[k] += 1
                    stopped = cfgs[k].early_stopping and bad_epochs[k] >= cfgs[k].patience
                else:
                    best_epoch[k] = epoch
                row["best_epoch"] = best_epoch[k]
                logs[k].append(row)
                if stopped:
                    finish(k, best_state[k], True)
                elif epoch == total_epochs:
                    state = best_state[k] if (cfgs[k].early_stopping and best_state[k] is not None) \
                        else member_state(pos)
                    finish(k, state, False)
                else:
                    keep.append(pos)
            if len(keep) < ka and keep:
                params, buffers, opt = _compact(params, buffers, opt, keep, make_opt)
            active = [active[pos] for pos in keep]
        bar.update(task, completed=steps * total_epochs)
    return results  # type: ignore[return-value]


def _calibration(flow, norm: Normalizer, member, cfg: FitConfig, va: np.ndarray) -> dict | None:
    """The held-out normal scores and default threshold of one member, as ``train.fit_flow`` stores them."""
    from .calibration import SLICE_EARLY, SLICE_FIXED, calibration_record
    from .scoring import SCORES, score_flow

    if not len(va):
        return None
    cls = np.asarray(member.cls, dtype=np.float32)[va]
    patch = np.asarray(member.patch[va], dtype=np.float32) if cfg.flow_needs_patch else None
    x, p = norm.transform(cls, patch)
    held_out = {s: score_flow(flow, torch.from_numpy(x), None if p is None else torch.from_numpy(p), s,
                              batch_size=cfg.eval_batch_size) for s in SCORES}
    return calibration_record(held_out, fpr=cfg.fpr, slice_desc=SLICE_EARLY if cfg.early_stopping else SLICE_FIXED,
                              seed=cfg.seed, fraction=cfg.val_fraction)


def _compact(params, buffers, opt, keep: list[int], make_opt):
    """The stack without the flows that left: sliced parameters, buffers and Adam state."""
    idx = torch.tensor(keep, dtype=torch.long, device=next(iter(params.values())).device)
    new_params = {k: v.detach()[idx].clone().requires_grad_(True) for k, v in params.items()}
    new_buffers = {k: v[idx].clone() for k, v in buffers.items()}
    new_opt = make_opt(new_params)
    for old, new in zip(params.values(), new_params.values(), strict=True):
        state = opt.state.get(old)
        if state:
            new_opt.state[new] = {name: (t[idx].clone() if torch.is_tensor(t) and t.dim() > 0 else
                                         (t.clone() if torch.is_tensor(t) else t)) for name, t in state.items()}
    return new_params, new_buffers, new_opt


@torch.no_grad()
def _stacked_nll(forward, params, buffers, x_act, rows, P, off_act, mean_act, std_act, batch_size, z_dim,
                 amp=None) -> np.ndarray:
    """Mean held-out NLL per flow (nats per dimension), full precision, as ``fit_flow`` computes it."""
    from .flow import log_likelihood

    d = x_act.shape[-1]
    parts = []
    for s in range(0, rows.shape[1], batch_size):
        r = rows[:, s:s + batch_size]
        xb = torch.gather(x_act, 1, r[:, :, None].expand(-1, -1, d))
        pb = None if P is None else _gather_patch(P, r + off_act, mean_act, std_act)
        z, logdet = forward(params, buffers, xb, pb)
        parts.append((-log_likelihood(z, logdet)).double())
    nll = torch.cat(parts, dim=1).cpu().numpy()
    return nll.mean(axis=1) / z_dim


# ------------------------------------------------------------------------------------------------- scoring
@torch.no_grad()
def score_stack(models: Sequence[torch.nn.Module], normalizers: Sequence[Normalizer], cls: np.ndarray,
                patch: np.ndarray | None, score: str = "nll", *, batch_size: int = 256, device="auto",
                amp: torch.dtype | None = None) -> np.ndarray:
    """Scores ``(K, n)`` (float64) of ``K`` flows of one architecture on the same split, in one pass: the split's
    patch tokens go to the device once, each flow's normaliser is applied per batch. ``score``: ``nll`` or ``z2``
    (as ``train.score_flow``)."""
    from torch.func import stack_module_state

    from .flow import log_likelihood

    if score not in ("nll", "z2"):
        raise SanfError(f"unknown score {score!r}; choose nll or z2")
    dev = resolve_device(device) if isinstance(device, str) else device
    K = len(models)
    if K == 0:
        return np.zeros((0, len(cls)))
    flow_cfg = models[0].config()
    uses_patch = patch is not None and (flow_cfg["fusion"] != "none" or flow_cfg["main_input"] == "spatial")
    X = torch.from_numpy(np.stack([nz.transform_cls(cls) for nz in normalizers])).to(dev)
    P = mean = std = None
    if uses_patch:
        P = _patch_rows(normalizers[0], patch).to(dev)
        if normalizers[0].standardize:
            mean = torch.tensor(np.stack([nz.patch_mean for nz in normalizers]), dtype=torch.float32, device=dev)
            std = torch.tensor(np.stack([nz.patch_std for nz in normalizers]), dtype=torch.float32, device=dev)
    p0, b0 = stack_module_state([m.eval() for m in models])
    params = {k: v.detach().to(dev) for k, v in p0.items()}
    buffers = {k: v.to(dev) for k, v in b0.items()}
    base = copy.deepcopy(models[0]).to("meta")
    fwd_patch, fwd_nopatch = _stacked_forward(base)
    n = len(cls)
    out = []
    for s in range(0, n, batch_size):
        xb = X[:, s:s + batch_size]
        if P is None:
            z, logdet = _amp_call(fwd_nopatch, dev, amp, params, buffers, xb, None)
        else:
            pb = P[s:s + batch_size].unsqueeze(0)
            if mean is not None:
                pb = (pb - mean[:, None, None, :]) / std[:, None, None, :]
            else:
                pb = pb.expand(K, *pb.shape[1:])
            z, logdet = _amp_call(fwd_patch, dev, amp, params, buffers, xb, pb)
        s_ = -log_likelihood(z, logdet) if score == "nll" else z.float().pow(2).mean(dim=-1)
        out.append(s_.double())
    return torch.cat(out, dim=1).cpu().numpy() if out else np.zeros((K, 0))


def _amp_call(fn, dev, amp, *args):
    with autocast(dev, amp):
        return fn(*args)
