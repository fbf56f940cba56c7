"""What every detection method is: an ``nn.Module`` holding its fitted state as buffers (``AnomalyModel``), and the
one loop that streams cached arrays through its ``forward`` (``score_arrays``, ``score_blocks``).

The contract (tests/test_models.py holds every registered method to it):

- ``fit(cls, patch, *, device, quiet)`` on the normal class's cached training arrays (numpy), returns ``self``;
- ``forward(cls, patch) -> (score (B,), evidence (B, H, W) or None)``: the image score (float64, higher = more
  anomalous) and the per-token evidence on the token grid (``None`` for a method without spatial support). The
  same call scores a cache split (eval, sweeps), a detector's backbone output (`sanf score`) and the exported
  ONNX/TorchScript graph;
- ``parts(cls, patch) -> dict`` of 1-D tensors: ``score`` and whatever else a method reports (the combined score's
  ``nll`` and ``patch``); ``forward`` is built on it;
- ``config()`` (JSON: the method name and everything needed to rebuild it) plus ``state_dict()`` buffers
  (safetensors), and ``from_config`` + ``load_buffers`` to read them back.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from ..device import as_tensor
from ..errors import SanfError


class AnomalyModel(nn.Module):
    name = ""  # the registry name
    needs_patch = False  # forward reads the patch tokens
    has_map = False  # forward returns per-token evidence
    batch_size = 256  # rows per forward when scoring arrays

    @property
    def description(self) -> str:
        return self.name

    def settings(self) -> dict:
        """What ``metrics.json`` reports of the fitted method."""
        return {}

    def config(self) -> dict:
        return {"method": self.name}

    @classmethod
    def from_config(cls, config: dict) -> AnomalyModel:
        return cls()

    def fit(self, cls: np.ndarray, patch: np.ndarray | None = None, *, device="cpu",
            quiet: bool = True) -> AnomalyModel:
        raise NotImplementedError

    def parts(self, cls: torch.Tensor, patch: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def forward(self, cls: torch.Tensor, patch: torch.Tensor | None = None):
        out = self.parts(cls, patch)
        return out["score"], out.get("map")

    def load_buffers(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> AnomalyModel:
        """Set every buffer named ``prefix + name`` in ``tensors`` (the counterpart of ``state_dict``)."""
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        for name, value in own.items():
            module, _, leaf = name.rpartition(".")
            target = self.get_submodule(module) if module else self
            if leaf in target._buffers:
                target._buffers[leaf] = value
            elif leaf not in dict(target.named_parameters(recurse=False)):
                raise SanfError(f"the model file holds an unknown tensor {prefix}{name}; it is damaged, refit")
        return self

    def device(self) -> torch.device:
        for t in self.state_dict().values():
            return t.device
        return torch.device("cpu")


@torch.no_grad()
def score_arrays(model: AnomalyModel, cls: np.ndarray, patch: np.ndarray | None = None, *,
                 batch_size: int | None = None, progress=None, maps: bool = False) -> dict[str, np.ndarray]:
    """The model's ``parts`` (float64 arrays) of in-memory rows, ``batch_size`` rows per forward, on the device the
    model is on. ``progress(n)`` after each batch. ``maps``: also ``map``, the per-token evidence ``(n, H, W)``
    float32 of a model that has one (small: a token grid per image)."""
    was_training = model.training
    model.eval()
    dev = model.device()
    rows = int(batch_size or model.batch_size)
    out: dict[str, list[np.ndarray]] = {}
    try:
        for s in range(0, len(cls), rows):
            c = as_tensor(cls[s:s + rows], dev)
            p = as_tensor(patch[s:s + rows], dev) if (patch is not None and model.needs_patch) else None
            for k, v in model.parts(c, p).items():
                if v.dim() == 1:
                    out.setdefault(k, []).append(v.double().cpu().numpy())
                elif maps and k == "map":
                    out.setdefault(k, []).append(v.float().cpu().numpy())
            if progress is not None:
                progress(len(c))
    finally:
        model.train(was_training)
    return {k: np.concatenate(v) for k, v in out.items()} if out else {"score": np.zeros(0)}


def score_blocks(model: AnomalyModel, blocks: Iterable[tuple[np.ndarray, np.ndarray | None]], *,
                 batch_size: int | None = None, progress=None, maps: bool = False) -> dict[str, np.ndarray]:
    """``score_arrays`` over row blocks read one at a time (a split streamed from its cache)."""
    parts: dict[str, list[np.ndarray]] = {}
    for cls, patch in blocks:
        if not len(cls):
            continue
        for k, v in score_arrays(model, cls, patch, batch_size=batch_size, progress=progress, maps=maps).items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()} if parts else {"score": np.zeros(0)}
