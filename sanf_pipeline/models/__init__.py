"""The detection methods, one ``nn.Module`` each (``base.AnomalyModel``), and their registry.

Every method is fitted on cached arrays, scores with one batched ``forward(cls, patch) -> (score, evidence map or
None)``, saves as safetensors + JSON and is a detector: eval, every sweep executor, `sanf score`, ``Detector`` and
the ONNX/TorchScript export all call these modules.

- ``flow``: ``FlowModel`` (normaliser + SANF flow; fitted by ``train.fit.fit_flow``), and a flow run's ``Combined``
  (flow NLL + patch-knn part, ``combined.py``);
- the baselines (``BASELINES``, extend with ``register_baseline``): ``knn``, ``knn-l2`` (``knn.py``),
  ``gaussian``, ``gaussian-whiten`` (``gaussian.py``), ``patch-knn`` (``patchknn.py``), ``patch-flow`` (the
  conditional flow over patch tokens, ``patchflow.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import SanfError
from .base import AnomalyModel, as_tensor, score_arrays, score_blocks
from .combined import PATCH_KINDS, RUN_SCORES, Combined, add_patch_score, resolve_score
from .flow import FlowModel, flow_uses_patch
from .gaussian import Gaussian
from .knn import KNN
from .patchflow import PatchFlow
from .patchknn import PatchKNN

BASELINES: dict[str, Callable[..., AnomalyModel]] = {
    "knn": lambda k=2: KNN(k=k, l2=False),
    "knn-l2": lambda k=2: KNN(k=k, l2=True),
    "gaussian": lambda: Gaussian(l2=False),
    "gaussian-whiten": lambda: Gaussian(l2=True),
    "patch-knn": PatchKNN,
    "patch-flow": PatchFlow,
}
# how a saved baseline's config (``model.config()``) is read back, by method name
_FROM_CONFIG: dict[str, Callable[[dict], AnomalyModel]] = {
    "knn": KNN.from_config, "knn-l2": KNN.from_config, "gaussian": Gaussian.from_config,
    "gaussian-whiten": Gaussian.from_config, "patch-knn": PatchKNN.from_config,
    "patch-flow": PatchFlow.from_config,
}
BASELINE_PREFIX = "baseline."


def register_baseline(name: str, factory: Callable[..., AnomalyModel],
                      from_config: Callable[[dict], AnomalyModel] | None = None) -> None:
    """Add a method: ``factory(**options)`` builds it unfitted, ``from_config(model.config())`` rebuilds a saved
    one (default: ``factory()``)."""
    BASELINES[name] = factory
    _FROM_CONFIG[name] = from_config or (lambda config: factory())


def create_baseline(name: str, **options) -> AnomalyModel:
    """A fresh, unfitted baseline; ``options`` go to its factory (``k`` for kNN, ``coreset``/``neighbourhood`` for
    patch-knn)."""
    if name not in BASELINES:
        raise SanfError(f"unknown baseline {name!r}; choose one of {', '.join(BASELINES)}")
    try:
        return BASELINES[name](**options)
    except TypeError:
        raise SanfError(f"baseline {name!r} takes no options {', '.join(options)}") from None


def needs_patch(method: str) -> bool:
    """Whether baseline ``method`` scores patch tokens (so its caller must read them from the cache)."""
    return bool(create_baseline(method).needs_patch)


def fit_score(method: str, train_cls, test_cls, train_patch=None, test_patch=None, *, device="cpu",
              **options):
    """Fit baseline ``method`` on normal training arrays and score test arrays (float64): the one-call Python API."""
    model = create_baseline(method, **options).fit(train_cls, train_patch, device=device)
    return score_arrays(model, test_cls, test_patch)["score"]


def baseline_tensors(model: AnomalyModel) -> dict[str, torch.Tensor]:
    """A fitted baseline's buffers as the ``baseline.*`` tensors of its run's model file."""
    return {BASELINE_PREFIX + k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def load_baseline(config: dict | None, tensors: dict[str, torch.Tensor]) -> AnomalyModel:
    """A saved baseline from its model file: ``config`` is ``model.config()`` (None: a file of sanf before the
    registry, kNN or Gaussian, recognised by its tensors)."""
    if not config:
        if f"{BASELINE_PREFIX}train" in tensors:  # kNN files kept k and l2 as tensors
            config = {"method": "knn", "k": int(tensors[f"{BASELINE_PREFIX}k"]),
                      "l2": bool(int(tensors[f"{BASELINE_PREFIX}l2"]))}
        elif f"{BASELINE_PREFIX}location" in tensors:
            config = {"method": "gaussian", "l2": False}
        else:
            raise SanfError("the baseline run's model file holds no known baseline; rerun `sanf baseline` with "
                            "--overwrite")
        renamed = {f"{BASELINE_PREFIX}train": f"{BASELINE_PREFIX}train_tokens"}
        tensors = {renamed.get(k, k): v for k, v in tensors.items()
                   if k not in (f"{BASELINE_PREFIX}k", f"{BASELINE_PREFIX}l2")}
    method = config.get("method")
    if method not in _FROM_CONFIG:
        raise SanfError(f"the baseline run's model file holds an unknown method {method!r}")
    return _FROM_CONFIG[method](config).load_buffers(tensors, BASELINE_PREFIX).eval()


__all__ = ["BASELINES", "KNN", "PATCH_KINDS", "RUN_SCORES", "AnomalyModel", "Combined", "FlowModel", "Gaussian",
           "PatchFlow", "PatchKNN", "add_patch_score", "as_tensor", "baseline_tensors", "create_baseline", "fit_score",
           "flow_uses_patch", "load_baseline", "needs_patch", "register_baseline", "resolve_score", "score_arrays",
           "score_blocks"]
