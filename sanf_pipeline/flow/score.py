"""Scoring with a fitted flow: its per-sample scores (``flow_score``), batched on normalised tensors (``score_flow``:
the fit's held-out NLL), the score kinds and the test split's block size.

Every flow score is computed by ``flow_score`` (the fit's held-out NLL here; `sanf eval`, the sweep and the
detector through ``models.FlowModel``), so one code path decides the numbers. Higher score = more anomalous:
``nll`` is -log p(x) of the flow (the default), ``z2`` the mean of z^2 (the official code's score, no
log-determinant).
"""

from __future__ import annotations

import numpy as np
import torch

from ..device import autocast
from ..errors import SanfError

SCORES = ("nll", "z2")
SCORE_DESCRIPTIONS = {
    "nll": "negative log-likelihood of the flow (nats), higher = more anomalous",
    "z2": "mean of z^2 over the latent dimensions (official code), higher = more anomalous",
    # a flow run's scores with its patch part (combined.py)
    "combined": "flow NLL plus patch-knn distance, each standardised on held-out normal images, "
                "higher = more anomalous",
    "patch": "the run's patch part alone: largest distance of any patch token to its nearest normal training "
             "patch token, higher = more anomalous",
}
EVAL_BLOCK_BYTES = 256 * 2**20


def check_score(score: str) -> str:
    if score not in SCORES:
        raise SanfError(f"unknown score {score!r}; choose one of {', '.join(SCORES)}")
    return score


def flow_score(z: torch.Tensor, logdet: torch.Tensor, score: str = "nll") -> torch.Tensor:
    """A flow's per-sample score from its output: ``nll`` (-log p, nats) or ``z2`` (mean z^2)."""
    from . import log_likelihood

    if score == "nll":
        return -log_likelihood(z, logdet)
    return z.float().pow(2).mean(dim=-1)


def score_flow(flow, cls: torch.Tensor, patch: torch.Tensor | None, score: str = "nll", *, batch_size: int = 256,
               amp: torch.dtype | None = None) -> np.ndarray:
    """Per-sample scores of a flow on normalised tensors, no grad, in batches (the fit's held-out NLL); float64."""
    if score not in SCORES:
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
            out.append(flow_score(z, logdet, score).double().cpu())
    flow.train(was_training)
    return torch.cat(out).numpy() if out else np.zeros(0)


def block_rows(dim: int, num_tokens: int, with_patch: bool) -> int:
    """Rows per block of the test split so that one float32 block stays near ``EVAL_BLOCK_BYTES``."""
    row_bytes = (num_tokens + 1 if with_patch else 1) * dim * 4
    return max(256, EVAL_BLOCK_BYTES // max(row_bytes, 1))
