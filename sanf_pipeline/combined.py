"""The combined score of a flow run: the flow's NLL plus a patch-knn distance, each standardised on held-out normal
images, summed. This module owns the run's patch part (``PatchScore``), its fitting beside the flow
(``add_patch_score``), the combination rule and the run-level score kinds.

Why (benchmarks/quality_combined.md): the flow's class-token NLL is the better detector of semantic anomalies
(CIFAR-10 one-vs-rest), a patch-level memory bank (PatchCore's kNN) the better detector of local and logical
defects on inspection images, and the flow's fusion module does not learn the local detail from a few hundred
images (benchmarks/flow_industrial_probe.md). Summing the two standardised scores keeps most of the stronger
part's AUROC on each kind of data without knowing which kind a data set is; it loses where one part is nearly
uninformative (CIFAR-10 on EfficientNet-Lite0's last stage: patch part 0.67, sum 0.038 below the flow alone).

**The rule.** The patch-knn bank is fitted on exactly the flow's fitted rows (``FitConfig.held_out_split``); the
held-out normal slice is scored by both parts. With ``m_nll, s_nll`` and ``m_patch, s_patch`` the mean and
standard deviation of those held-out scores, ``combined = (nll - m_nll) / s_nll + (patch - m_patch) / s_patch``.
No test data and no anomalies are used. The calibrated threshold of the combined score is the split-conformal
order statistic of the held-out combined scores (``calibration.py``); since the same slice also gave the means
and deviations, that threshold's FPR bound is approximate (two numbers fitted on ``n`` images; README).

Score kinds of a run (``RUN_SCORES``): ``combined``, ``nll`` and ``z2`` (the flow alone), ``patch`` (the patch
part alone), and ``auto``: ``combined`` for a run with a patch part, else ``nll``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import SanfError
from .features import pool_square_grid
from .patchknn import PatchKNNScorer

RUN_SCORES = ("auto", "combined", "nll", "z2", "patch")
PATCH_KINDS = ("combined", "patch")
TENSOR_PREFIX = "patch_score."


def _mean_std(scores) -> tuple[float, float]:
    s = np.asarray(scores, np.float64)
    s = s[np.isfinite(s)]
    if len(s) < 2:
        raise SanfError("the combined score needs at least 2 finite held-out normal scores to standardise on")
    sd = float(np.std(s, ddof=1))
    return float(np.mean(s)), sd if sd > 0 else 1.0


@dataclass
class PatchScore:
    """The patch part of a run: a patch-knn memory bank (on the run's token grid after ``token_pool``) and the
    held-out means and deviations of both parts."""

    scorer: PatchKNNScorer
    token_pool: int
    nll_stats: tuple[float, float]
    patch_stats: tuple[float, float]

    @classmethod
    def fit(cls, cfg, train_patch: np.ndarray, tr: np.ndarray, va: np.ndarray, held_out_nll,
            quiet: bool = True) -> tuple[PatchScore, np.ndarray]:
        """Fit the bank on rows ``tr`` of ``train_patch``; returns the part and its scores of rows ``va``."""
        if train_patch is None or np.ndim(train_patch) != 3:
            raise SanfError("the patch score needs the patch tokens of the normal training images; the cache has "
                            "none (use --patch-score none)")
        scorer = PatchKNNScorer(cfg.patch_coreset, cfg.patch_neighbourhood, seed=cfg.seed, quiet=quiet)
        pooled = _pool(train_patch, cfg.token_pool)
        scorer.fit(None, pooled[tr])
        held_out = scorer.score(None, pooled[va])
        part = cls(scorer, int(cfg.token_pool), _mean_std(held_out_nll), _mean_std(held_out))
        return part, held_out

    def patch_scores(self, patch: np.ndarray) -> np.ndarray:
        return self.scorer.score(None, _pool(np.asarray(patch, np.float32), self.token_pool))

    def combine(self, nll, patch) -> np.ndarray:
        (mn, sn), (mp, sp) = self.nll_stats, self.patch_stats
        return (np.asarray(nll, np.float64) - mn) / sn + (np.asarray(patch, np.float64) - mp) / sp

    def config(self) -> dict:
        return {"method": "patch-knn", "token_pool": self.token_pool, "settings": self.scorer.settings(),
                "standardise": {"nll": list(self.nll_stats), "patch": list(self.patch_stats)},
                "rule": "combined = (nll - mean) / std + (patch - mean) / std, means and stds of the held-out "
                        "normal slice"}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"{TENSOR_PREFIX}bank": self.scorer.bank.detach().cpu().float().contiguous()}

    @classmethod
    def from_state(cls, config: dict, tensors: dict[str, torch.Tensor], device: str | None = None) -> PatchScore:
        try:
            s, st = config["settings"], config["standardise"]
            scorer = PatchKNNScorer(s["coreset"], s["neighbourhood"], proj_dim=s["proj_dim"], seed=s["coreset_seed"],
                                    device=device)
            scorer.bank = tensors[f"{TENSOR_PREFIX}bank"].float().to(scorer.device)
            scorer.n_train_patches = s.get("n_train_patches")
            return cls(scorer, int(config["token_pool"]), tuple(st["nll"]), tuple(st["patch"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise SanfError(f"the run's patch score is incomplete ({exc}); refit the run") from None


def _pool(patch: np.ndarray, k: int) -> np.ndarray:
    return pool_square_grid(patch, k) if k > 1 else patch


def add_patch_score(result, cfg, train_cls: np.ndarray, train_patch: np.ndarray | None, *,
                    quiet: bool = True) -> None:
    """Give a fitted flow's ``FitResult`` its patch part (``result.patch_score``) and extend its calibration with
    the ``patch`` and ``combined`` held-out scores, the threshold then on ``combined``. Nothing when
    ``cfg.patch_score`` is ``none`` or nothing was held out (too few rows: the run keeps the flow NLL alone)."""
    from .calibration import calibration_record

    result.patch_score = None
    cal = result.calibration
    if cfg.patch_score == "none" or not cal:
        return
    tr, va = cfg.held_out_split(len(train_cls))
    nll = np.asarray(cal["scores"]["nll"], np.float64)
    if len(va) < 2 or len(nll) != len(va):
        return
    part, held_out = PatchScore.fit(cfg, train_patch, tr, va, nll, quiet=quiet)
    result.patch_score = part
    scores = {**cal["scores"], "patch": held_out, "combined": part.combine(nll, held_out)}
    result.calibration = calibration_record(scores, fpr=cal["target_fpr"], slice_desc=cal["slice"],
                                            seed=cal.get("seed"), fraction=cal.get("fraction"), main="combined")


def resolve_score(score: str, config: dict, run_dir=None) -> str:
    """The score kind ``score`` means for a flow run with ``config`` (``auto``: its default)."""
    if score not in RUN_SCORES:
        raise SanfError(f"unknown score {score!r}; choose one of {', '.join(RUN_SCORES)}")
    has_patch = bool(config.get("patch_score"))
    if score == "auto":
        return "combined" if has_patch else "nll"
    if score in PATCH_KINDS and not has_patch:
        which = f"run {run_dir}" if run_dir is not None else "the run"
        raise SanfError(f"{which} has no patch score (fitted with --patch-score none, or too few images to hold any "
                        f"out); use --score nll or z2")
    return score
