"""Soft clamp of the coupling log-scales.

Owns ``soft_clamp``: ``c(s) = (2 * alpha / pi) * atan(s / alpha)`` (METHOD.md section 2). It bounds every
log-scale to ``(-alpha, alpha)`` so one coupling can never scale a channel by more than ``exp(alpha)``,
while staying linear near zero, where a freshly initialised flow lives. Note the slope there is
``2 / pi ~ 0.64``, not 1 (the formula of the paper and of the official code, FrEIA's ``0.636 * atan``): the
FFM learns ``s`` up to that constant factor, which changes nothing about invertibility or the log-det.
"""

from __future__ import annotations

import math

import torch


def soft_clamp(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """Smoothly clamp ``s`` into ``(-alpha, alpha)``; odd, increasing, ``c(0) = 0``, ``c'(0) = 2 / pi``."""
    if not alpha > 0:
        raise ValueError(f"soft clamp alpha must be > 0, got {alpha!r}")
    return (2.0 * alpha / math.pi) * torch.atan(s / alpha)
