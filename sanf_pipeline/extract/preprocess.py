"""The preprocessing of `sanf extract` and of every detector (``Preprocess``): the whole image resized to the model's
input size (no crop), scaled and normalised as the backbone's data config says; picklable, so it runs in DataLoader
workers."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import SanfError

# --------------------------------------------------------------------------------------------------------
# preprocessing and pooling


class Preprocess:
    """uint8 ``(H, W, 3)`` RGB image -> normalised float tensor ``(3, S, S)``; picklable, deterministic.

    Resizes the whole image (no crop) to the model input size with PIL bicubic (the resampling timm's eval
    transform uses; small images such as CIFAR's 32x32 are upsampled), scales to [0, 1] and normalises
    with the model's mean/std. Grayscale ``(H, W)`` / ``(H, W, 1)`` inputs are repeated to RGB and an
    alpha channel is dropped.
    """

    _PIL_MODES = {"bicubic": 3, "bilinear": 2, "nearest": 0, "lanczos": 1, "box": 4, "hamming": 5}

    def __init__(self, size: tuple[int, int], mean, std, interpolation: str = "bicubic"):
        self.size = (int(size[0]), int(size[1]))  # (height, width)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if interpolation not in self._PIL_MODES:
            raise SanfError(f"unknown interpolation {interpolation!r}; one of {', '.join(self._PIL_MODES)}")
        self.interpolation = interpolation

    def __call__(self, img) -> torch.Tensor:
        return self.normalize(self.to_uint8(img))

    @property
    def device_resizable(self) -> bool:
        """Whether ``normalize`` can resize (torch has PIL's antialiased bicubic/bilinear kernels)."""
        return self.interpolation in ("bicubic", "bilinear")

    def to_uint8(self, img, *, keep_smaller: bool = False) -> torch.Tensor:
        """The image as uint8 ``(3, h, w)``, resized with PIL to the input size; with ``keep_smaller`` an image
        no larger than the input size is left as it is, for ``normalize`` to upsample on the device (a 32 px
        CIFAR image then travels as 3 KB instead of a 224 px float tensor of 600 KB)."""
        from PIL import Image

        if isinstance(img, Image.Image):
            img = np.asarray(img.convert("RGB"))
        arr = np.asarray(img)
        if arr.dtype != np.uint8:
            raise SanfError(f"preprocess expects a uint8 image, got {arr.dtype}")
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
            raise SanfError(f"preprocess expects an (H, W, 3) image, got shape {arr.shape}")
        if arr.shape[2] == 1:
            arr = np.repeat(arr, 3, axis=2)
        elif arr.shape[2] == 4:
            arr = arr[:, :, :3]
        h, w = self.size
        smaller = arr.shape[0] <= h and arr.shape[1] <= w
        if arr.shape[:2] != (h, w) and not (keep_smaller and smaller and self.device_resizable):
            pil = Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
            arr = np.asarray(pil.resize((w, h), resample=self._PIL_MODES[self.interpolation]))
        if not (arr.flags.writeable and arr.flags.c_contiguous):
            arr = np.array(arr, copy=True, order="C")
        return torch.from_numpy(arr).permute(2, 0, 1)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 ``(..., 3, h, w)`` on any device -> normalised float32 ``(..., 3, S, S)`` on that device.

        An image not at the input size is resampled here with torch's antialiased kernel (PIL's: bicubic
        ``a = -0.5``) and rounded to uint8 levels as PIL does, so it matches the PIL path within one level.
        """
        if tuple(x.shape[-2:]) != self.size:
            if not self.device_resizable:
                raise SanfError(f"{self.interpolation} resizing is only done with PIL (Preprocess.to_uint8)")
            lead = x.shape[:-3]
            y = x.reshape(-1, *x.shape[-3:]).float()
            # PIL resamples horizontally, rounds to uint8, then vertically: the same two passes here
            for size in ((y.shape[-2], self.size[1]), self.size):
                if tuple(y.shape[-2:]) != size:
                    y = F.interpolate(y, size=size, mode=self.interpolation, align_corners=False, antialias=True)
                    y = y.round_().clamp_(0, 255)
            x = y.reshape(*lead, 3, *self.size)
        x = x.float().div(255.0)
        mean, std = self._stats(x.device)
        return x.sub_(mean).div_(std).contiguous()

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # made once per device: a fresh torch.tensor(..., device="cuda") per batch is a pageable copy that waits
        # for the GPU's queue to drain, i.e. a host sync per batch
        cache = self.__dict__.setdefault("_device_stats", {})
        if device not in cache:
            cache[device] = (torch.tensor(self.mean, dtype=torch.float32).view(3, 1, 1).to(device),
                             torch.tensor(self.std, dtype=torch.float32).view(3, 1, 1).to(device))
        return cache[device]

    def __getstate__(self):  # DataLoader workers get the settings, never device tensors
        return {k: v for k, v in self.__dict__.items() if k != "_device_stats"}

    def __repr__(self) -> str:
        return (f"Preprocess(size={self.size}, mean={self.mean}, std={self.std}, "
                f"interpolation={self.interpolation!r})")
