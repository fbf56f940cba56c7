"""Soft clamp of the coupling log-scales.

Owns ``soft_clamp``: ``c(s) = (2 * alpha / pi) * atan(s / alpha)`` (METHOD.md section 2). It bounds every
log-scale to ``(-alpha, alpha)`` so one coupling can never scale a channel by more than ``exp(alpha)``,
while staying close to the identity (slope 1) near zero, where a freshly initialised flow lives.
"""

from __future__ import annotations

import math

import torch


def soft_clamp(s: torch.Tensor, alpha: float) -> torch.Tensor:
    """Smoothly clamp ``s`` into ``(-alpha, alpha)``; ``c(0) = 0`` and ``c'(0) = 1``."""
    if not alpha > 0:
        raise ValueError(f"soft clamp alpha must be > 0, got {alpha!r}")
    return (2.0 * alpha / math.pi) * torch.atan(s / alpha)
