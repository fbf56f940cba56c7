"""``FlowModel``: the SANF detector, the fitted input normaliser (``features.Normalizer``) followed by the flow
(``flow.SANFlow``) and its score (``nll``: -log p in nats, the paper's; ``z2``: mean z^2, the official code's).
Its state dict is a flow run's model file (``normalizer.*``, ``flow.*``). The class-token flow has no spatial
support: ``forward`` returns no evidence map. Fitting is ``train.fit.fit_flow`` (epochs, early stopping, checkpoints),
reached through ``fit``."""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SanfError
from ..flow.normalizer import Normalizer
from ..flow.score import SCORES, flow_score
from .base import AnomalyModel


def flow_uses_patch(flow_config: dict) -> bool:
    """Whether a flow of this configuration reads patch tokens (a fusion, or the spatial main input)."""
    return flow_config.get("fusion") != "none" or flow_config.get("main_input") == "spatial"


class FlowModel(AnomalyModel):
    name = "flow"

    def __init__(self, normalizer: Normalizer | None = None, flow: torch.nn.Module | None = None, *,
                 score: str = "nll"):
        super().__init__()
        if score not in SCORES:
            raise SanfError(f"unknown flow score {score!r}; choose one of {', '.join(SCORES)}")
        self.normalizer, self.flow, self.score_kind = normalizer, flow, score
        self.fit_result = None

    @property
    def needs_patch(self) -> bool:
        return self.flow is not None and flow_uses_patch(self.flow.config())

    @property
    def description(self) -> str:
        from ..flow.score import SCORE_DESCRIPTIONS

        return SCORE_DESCRIPTIONS[self.score_kind]

    def config(self) -> dict:
        return {"method": self.name, "score": self.score_kind, "flow": None if self.flow is None else
                self.flow.config(), "normalizer": None if self.normalizer is None else self.normalizer.config()}

    @classmethod
    def from_state(cls, flow_config: dict, normalizer_config: dict, tensors: dict[str, torch.Tensor], *,
                   score: str = "nll", where: str = "the model file") -> FlowModel:
        """Rebuild from a run's model file: ``flow.*`` and ``normalizer.*`` tensors and their JSON configs."""
        from ..flow import SANFlow

        if not isinstance(flow_config, dict):
            raise SanfError(f"{where} lacks the flow configuration; it is damaged, refit the run")
        try:
            flow = SANFlow(**flow_config)
            flow.load_state_dict({k[5:]: v for k, v in tensors.items() if k.startswith("flow.")}, strict=True)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise SanfError(f"{where} does not match its flow configuration ({str(exc).splitlines()[0]}); "
                            f"it is damaged, refit the run") from None
        return cls(Normalizer.from_state(normalizer_config or {}, tensors), flow.eval(), score=score)

    def with_score(self, score: str) -> FlowModel:
        """The same fitted flow scoring ``score`` (shares the modules)."""
        return FlowModel(self.normalizer, self.flow, score=score)

    def fit(self, cls: np.ndarray, patch: np.ndarray | None = None, *, device=None, quiet: bool = True, cfg=None,
            **fit_options) -> FlowModel:
        """``train.fit.fit_flow`` with ``cfg`` (a ``FitConfig``); the full ``FitResult`` is kept as ``fit_result``."""
        import dataclasses

        from ..train.config import FitConfig
        from ..train.fit import fit_flow

        cfg = cfg or FitConfig()
        if device is not None:  # the caller's config is left as it was
            cfg = dataclasses.replace(cfg, device=str(device))
        result = fit_flow(cls, patch if cfg.flow_needs_patch else None, cfg, quiet=quiet, **fit_options)
        self.normalizer, self.flow, self.fit_result = result.normalizer, result.model, result
        return self

    def parts(self, cls: torch.Tensor, patch: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        x, p = self.normalizer(cls, patch if self.needs_patch else None)
        z, logdet = self.flow(x, p)
        return {"score": flow_score(z, logdet, self.score_kind).double()}
