"""Many flows of one architecture trained together: ``fit_stack`` and ``score_stack``.

Owns the stacked trainer of the GPU path. ``K`` flows whose settings differ only in ``seed`` (and in the normal
class whose data they see) are one batched model: their parameters are stacked along a new leading axis
(``torch.func.stack_module_state``) and the shared architecture runs once per step for all of them
(``torch.func.functional_call`` under ``torch.func.vmap``, i.e. batched matmuls). Each flow keeps everything a
separate ``train.fit.fit_flow`` would have:

- its own initial weights (built under ``torch.manual_seed(seed)`` exactly as ``fit_flow`` builds them) and
  permutations (buffers, stacked too);
- its own held-out slice and normaliser (fitted on its own training rows), batch order (the ``(seed, epoch)``
  generator of ``fit_flow``, ``min_epoch_steps`` included), input noise (its own generator), gradient-norm clip
  (per flow) and early-stopping rule (a ``train.loop.EarlyStopping`` each, ``keep_initial`` included);
- its own Adam state: Adam is element-wise, so one (fused) Adam over the stacked tensors updates every flow as
  its own optimiser would. A flow that stops early leaves the stack at the end of that epoch (the stacked
  tensors and the Adam state are compacted), so finished flows cost nothing.

Data are on the device once: the class tokens normalised per flow ``(K, n, d)`` (small), the patch tokens
once per class (pooled and, with an ``l2`` method, L2-normalised), and each flow's per-channel
standardisation applied per batch, so ``K`` flows of one class never hold ``K`` copies of the patch tokens.
The epoch and its steps are ``fit_flow``'s own (``train.loop.run_epoch`` / ``train.loop.train_step``: batch schedule,
noise, loss, clip, AMP scaler, divergence; the single fit runs them as a stack of one), so only the data layout
and the stacked forward are this module's. The step loop never waits on the host (no ``.item()``): losses and
the first non-finite step are kept on the device and read once per epoch. ``score_stack`` scores every flow of
a stack against a split in one pass.

Results equal ``K`` separate ``fit_flow`` runs up to float rounding (the per-channel standardisation is done
in float32 instead of float64, sums are batched): ``tests/test_stack.py`` checks weights, NLLs and AUROCs to
1e-5 in fp32. Differences from ``fit_flow``: no per-epoch checkpoint (a killed stack is retrained; the sweep
resumes flows that have a ``fit_flow`` checkpoint with ``fit_flow``), and with fp16 autocast one GradScaler
serves the whole stack (an overflow in one flow skips the step of all; bf16 needs no scaler).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from ..device import amp_dtype, as_tensor, autocast, resolve_device
from ..errors import SanfError
from ..flow.normalizer import Normalizer, channel_stats
from .config import FitConfig
from .fit import FitResult, _diverged, new_flow
from .loop import NON_FINITE, EarlyStopping, close_epoch, epoch_steps, make_optimizer, make_scaler, run_epoch

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
    """Stage one of ``norm``'s patch transform (``Normalizer.shared_patch``) on host arrays, in blocks; float32."""
    rows = max(1, 65536 // max(1, patch.shape[1]))
    parts = [norm.shared_patch(as_tensor(patch[s:s + rows], "cpu")) for s in range(0, len(patch), rows)]
    return torch.cat(parts) if parts else norm.shared_patch(torch.zeros((0, *patch.shape[1:])))


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
    from ..progress import progress_bar
    from ..store.run_folder import check_finite

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
            mu, sd = channel_stats(P[rows], l2=False)  # P holds stage one: L2 is done
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
    flows = [new_flow(cfg, d, patch_dim, num_tokens) for cfg in cfgs]
    z_dim = flows[0].z_dim
    base = copy.deepcopy(flows[0]).to("meta")
    fwd_patch, fwd_nopatch = _stacked_forward(base)
    from torch.func import stack_module_state

    p0, b0 = stack_module_state(flows)
    params = {k: v.detach().to(device).requires_grad_(True) for k, v in p0.items()}
    buffers = {k: v.to(device) for k, v in b0.items()}
    del p0, b0

    def make_opt(ps):
        return make_optimizer(ps.values(), c0)

    opt = make_opt(params)
    scaler = make_scaler(device, amp)

    def forward(ps, bs, x, p):
        return (fwd_patch if p is not None else fwd_nopatch)(ps, bs, x, p)

    active = list(range(K))  # member indices, in stack order
    results: list[FitResult | SanfError | None] = [None] * K
    logs: list[list[dict]] = [[] for _ in range(K)]
    stopping = [EarlyStopping(c.early_stopping, c.patience, c.min_delta) for c in cfgs]
    n_val = len(va_idx[0])
    n_tr = n - n_val
    steps = epoch_steps(n_tr, c0)
    total_epochs = c0.total_epochs
    tr_t = torch.from_numpy(np.stack(tr_idx)).to(device)  # (K, n_tr) local rows
    va_t = torch.from_numpy(np.stack(va_idx)).to(device) if n_val else None

    def finish(k: int, state: dict, stopped: bool) -> None:
        flow = flows[k]
        flow.load_state_dict({name: t.to("cpu") for name, t in state.items()})
        results[k] = FitResult(model=flow.eval(), normalizer=norms[k], log=logs[k], best_epoch=stopping[k].best_epoch,
                               epochs_run=len(logs[k]), stopped_early=stopped, n_train=n_tr, n_val=n_val,
                               device=str(device), resumed_from=0, epoch_selection=cfgs[k].epoch_selection,
                               calibration=_calibration(flow, norms[k], members[k], cfgs[k], va_idx[k]),
                               initial_val_nll=stopping[k].initial_val)

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
            stopping[k].start(float(init[k]), lambda k=k: member_state(k))

    with progress_bar(quiet, unit="steps") as bar:
        task = bar.add_task(f"{description} ({K} flows)", total=steps * total_epochs, rate="")
        for epoch in range(1, total_epochs + 1):
            if not active:
                break
            act = torch.tensor(active, dtype=torch.long, device=device)
            tr_act, x_act, mean_act = tr_t[act], X[act], None if p_mean is None else p_mean[act]
            std_act = None if p_std is None else p_std[act]
            off_act = offs[act][:, None]

            def batch(rows, tr_act=tr_act, x_act=x_act, mean_act=mean_act, std_act=std_act, off_act=off_act):
                local = torch.gather(tr_act, 1, rows)  # rows of each flow's own block
                xb = torch.gather(x_act, 1, local[:, :, None].expand(-1, -1, d))
                return xb, None if P is None else _gather_patch(P, local + off_act, mean_act, std_act)

            def stacked_forward(xb, pb, params=params, buffers=buffers):  # the stack of this epoch
                return forward(params, buffers, xb, pb)

            totals = run_epoch(stacked_forward, list(params.values()), opt, scaler, batch,
                               [cfgs[k].seed for k in active], n_tr, c0, epoch, amp, stacked=True, device=device,
                               progress=lambda *_: bar.update(task, advance=1))
            # one host sync per epoch: losses and divergence above, the held-out NLL here
            val = None
            if n_val and c0.early_stopping:
                val = _stacked_nll(forward, params, buffers, x_act, va_t[act], P, off_act, mean_act, std_act,
                                   c0.eval_batch_size, z_dim, amp=None)
            keep = []
            for pos, k in enumerate(active):
                if totals.bad_at[pos] >= 0:
                    results[k] = _diverged(NON_FINITE, epoch, int(totals.bad_at[pos]), steps, cfgs[k], epoch - 1, None)
                    continue
                row = totals.row(pos, epoch, cfgs[k])
                why = close_epoch(stopping[k], epoch, row, None if val is None else float(val[pos]),
                                  lambda pos=pos: member_state(pos))
                if why is not None:
                    results[k] = _diverged(why, epoch, steps, steps, cfgs[k], epoch - 1, None)
                    continue
                logs[k].append(row)
                if stopping[k].stopped:
                    finish(k, stopping[k].best_state, True)
                elif epoch == total_epochs:
                    kept = stopping[k].kept_state()
                    finish(k, member_state(pos) if kept is None else kept, False)
                else:
                    keep.append(pos)
            if len(keep) < len(active) and keep:
                params, buffers, opt = _compact(params, buffers, opt, keep, make_opt)
            active = [active[pos] for pos in keep]
        bar.update(task, completed=steps * total_epochs)
    return results  # type: ignore[return-value]


def _calibration(flow, norm: Normalizer, member, cfg: FitConfig, va: np.ndarray) -> dict | None:
    """The held-out normal scores and default threshold of one member, as ``train.fit.fit_flow`` stores them."""
    from ..evaluate.calibration import SLICE_EARLY, SLICE_FIXED, calibration_record
    from ..flow.score import SCORES, score_flow

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
    from ..flow import log_likelihood

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
    """Scores ``(K, n)`` (float64) of ``K`` flows of one architecture on the same split, in one pass, batch by
    batch: each batch's patch tokens go through the normalisers' shared stage once, each flow's standardisation is
    applied on the device. ``score``: ``nll`` or ``z2`` (``flow.score.flow_score``)."""
    from torch.func import stack_module_state

    from ..flow.score import flow_score

    if score not in ("nll", "z2"):
        raise SanfError(f"unknown score {score!r}; choose nll or z2")
    dev = resolve_device(device) if isinstance(device, str) else device
    K = len(models)
    if K == 0:
        return np.zeros((0, len(cls)))
    flow_cfg = models[0].config()
    uses_patch = patch is not None and (flow_cfg["fusion"] != "none" or flow_cfg["main_input"] == "spatial")
    p0, b0 = stack_module_state([m.eval() for m in models])
    params = {k: v.detach().to(dev) for k, v in p0.items()}
    buffers = {k: v.to(dev) for k, v in b0.items()}
    base = copy.deepcopy(models[0]).to("meta")
    fwd_patch, fwd_nopatch = _stacked_forward(base)
    out = []
    # batch by batch from the host arrays: the split's tokens never sit on the device (or on the host as float32)
    # as a whole; stage one of the patch transform is shared by the K flows, stage two is each flow's own
    for s in range(0, len(cls), batch_size):
        xb = torch.stack([nz.normalize_cls(as_tensor(cls[s:s + batch_size], "cpu")) for nz in normalizers]).to(dev)
        if not uses_patch:
            z, logdet = _amp_call(fwd_nopatch, dev, amp, params, buffers, xb, None)
        else:
            shared = normalizers[0].shared_patch(as_tensor(patch[s:s + batch_size], "cpu")).to(dev)
            pb = torch.stack([nz.standardize_shared(shared) for nz in normalizers])
            z, logdet = _amp_call(fwd_patch, dev, amp, params, buffers, xb, pb)
        out.append(flow_score(z, logdet, score).double())
    return torch.cat(out, dim=1).cpu().numpy() if out else np.zeros((K, 0))


def _amp_call(fn, dev, amp, *args):
    with autocast(dev, amp):
        return fn(*args)
