"""Device choice and the mixed-precision policy, for every stage that runs a model (extract, fit, score).

- ``resolve_device("auto" | "cpu" | "cuda" | "cuda:N")``: ``auto`` is CUDA when available, else CPU; a CUDA device
  that is not there is a one-line ``SanfError`` (exit 2), never a torch traceback.
- ``precision_dtype(precision, device)``: ``auto`` = bfloat16 (float16 where bf16 is unsupported) on CUDA and
  full precision on CPU; ``fp32``/``bf16``/``fp16`` force one. ``sanf fit --no-amp`` is precision ``fp32``.
- ``autocast(device, dtype)``: ``torch.autocast`` for a dtype, a no-op for None.
- ``as_tensor(array, device)``: a cached block (float16/float32, possibly read-only shared memory) as a tensor there.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from .errors import SanfError

DEVICE_HELP = "auto, cpu, cuda, cuda:N."
PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
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


def precision_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device`` (None: full precision)."""
    if precision not in PRECISIONS:
        raise SanfError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def amp_dtype(device: torch.device, enabled: bool) -> torch.dtype | None:
    """The fit's policy: ``precision_dtype("auto")`` when mixed precision is enabled, else full precision."""
    return precision_dtype("auto" if enabled else "fp32", device)


def autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def as_tensor(a, device) -> torch.Tensor:
    """A cached block as a tensor on ``device``: float32 (float64 stays float64; float16 is widened exactly);
    read-only memory (a sweep's shared block, Ray's object store) is copied, never aliased."""
    a = np.asarray(a)
    if a.dtype not in (np.float32, np.float64):
        a = a.astype(np.float32)
    if not a.flags.writeable or not a.flags.c_contiguous:
        a = np.array(a)
    return torch.from_numpy(a).to(device)
