"""The combined score of a flow run (``Combined``): the flow's class-token NLL and a local part's score (``patch-knn``
distance or ``patch-flow`` token NLL), each standardised on held-out normal images, then combined by a rule
(``COMBINE_RULES``: their sum, or the larger of the two). This module owns the run's local part (fitting it beside
the flow: ``add_patch_score``), the combination rules and the run-level score kinds.

Why (benchmarks/quality_combined.md): the flow's class-token NLL is the better detector of semantic anomalies
(CIFAR-10 one-vs-rest), a patch-level memory bank (PatchCore's kNN) the better detector of local and logical
defects on inspection images, and the flow's fusion module does not learn the local detail from a few hundred
images (benchmarks/flow_industrial_probe.md). Summing the two standardised scores keeps most of the stronger
part's AUROC on each kind of data without knowing which kind a data set is; it loses where one part is nearly
uninformative (CIFAR-10 on EfficientNet-Lite0's last stage: patch part 0.67, sum 0.038 below the flow alone).

**The rule.** The local part is fitted on exactly the flow's fitted rows (``FitConfig.held_out_split``); the
held-out normal slice is scored by both parts. With ``m_nll, s_nll`` and ``m_patch, s_patch`` the mean and standard
deviation of those held-out scores and ``a = (nll - m_nll) / s_nll``, ``b = (patch - m_patch) / s_patch``,
``combined = a + b`` (``sum``) or ``max(a, b)`` (``max``: an image is as anomalous as its more anomalous part, so a
nearly uninformative part cannot dilute the other; ``FitConfig.combine``, chosen in
benchmarks/quality_industrial.md). No test data and no anomalies are used. The standardisation needs at least
``MIN_HELD_OUT`` held-out normal images (a standard deviation from n images is off by about 1/sqrt(2(n-1)): 41% at
4, 16% at 20); with fewer the run keeps the flow alone and says so (``config.json: patch_score_skipped``). The
calibrated threshold of the combined score is the split-conformal order statistic of the held-out combined scores
(``evaluate/calibration.py``); since the same slice also gave the means and deviations (and, with early stopping,
picked the epoch), that threshold's FPR bound is approximate, not the conformal guarantee (README).

**The map.** The evidence map of ``combined`` is the patch part's token distances standardised like its image score,
``(d - m_patch) / s_patch``; the class-token NLL has no spatial support and does not enter it (it shifts every token
of an image alike, so it would change no ranking within an image).

Score kinds of a run (``RUN_SCORES``): ``combined``, ``nll`` and ``z2`` (the flow alone), ``patch`` (the patch
part alone), and ``auto``: ``combined`` for a run with a patch part, else ``nll``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import SanfError
from .base import AnomalyModel, score_arrays
from .flow import FlowModel
from .patchflow import PatchFlow
from .patchknn import PatchKNN

RUN_SCORES = ("auto", "combined", "nll", "z2", "patch")
PATCH_KINDS = ("combined", "patch")
COMBINE_RULES = ("sum", "max")
LOCAL_PARTS = ("patch-knn", "patch-flow")
TENSOR_PREFIX = "patch_score."
MIN_HELD_OUT = 4


def mean_std(scores) -> tuple[float, float]:
    s = np.asarray(scores, np.float64)
    s = s[np.isfinite(s)]
    if len(s) < MIN_HELD_OUT:
        raise SanfError(f"the combined score needs at least {MIN_HELD_OUT} finite held-out normal scores to "
                        f"standardise on, got {len(s)}")
    sd = float(np.std(s, ddof=1))
    return float(np.mean(s)), sd if sd > 0 else 1.0


class Combined(AnomalyModel):
    """A flow run with its local part (``PatchKNN`` or ``PatchFlow``): ``combined`` (the standardised NLL and local
    score combined by ``rule``, float64) or ``patch`` (the local score alone)."""

    name = "combined"
    needs_patch = True
    has_map = True
    batch_size = 64

    def __init__(self, flow: FlowModel, patch: AnomalyModel, nll_stats, patch_stats, *, score: str = "combined",
                 rule: str = "sum"):
        super().__init__()
        if score not in PATCH_KINDS:
            raise SanfError(f"a combined model scores combined or patch, not {score!r}")
        if rule not in COMBINE_RULES:
            raise SanfError(f"unknown combination rule {rule!r}; choose one of {', '.join(COMBINE_RULES)}")
        self.flow, self.patch, self.score_kind, self.rule = flow, patch, score, rule
        self.register_buffer("stats", torch.tensor([*nll_stats, *patch_stats], dtype=torch.float64))

    @property
    def description(self) -> str:
        from ..flow.score import SCORE_DESCRIPTIONS

        return SCORE_DESCRIPTIONS[self.score_kind]

    def part_config(self) -> dict:
        """``config.json: patch_score`` of the run."""
        m = [float(v) for v in self.stats]
        how = "+" if self.rule == "sum" else ","
        text = (f"combined = {'max(' if self.rule == 'max' else ''}(nll - mean) / std {how} (patch - mean) / std"
                f"{')' if self.rule == 'max' else ''}, means and stds of the held-out normal slice")
        out = {"method": self.patch.name, "token_pool": getattr(self.patch, "token_pool", 1),
               "settings": self.patch.settings(), "standardise": {"nll": m[:2], "patch": m[2:]},
               "combine": self.rule, "rule": text}
        if self.patch.name != "patch-knn":
            out["config"] = self.patch.config()
        return out

    def config(self) -> dict:
        return {"method": self.name, "score": self.score_kind, "patch_score": self.part_config()}

    def tensors(self) -> dict[str, torch.Tensor]:
        """The patch part's tensors in a run's model file (the flow's are saved with the flow)."""
        # patch-knn's only buffer is its float32 bank: "patch_score.bank", as runs have always stored it
        return {TENSOR_PREFIX + k: v.detach().cpu().contiguous() for k, v in self.patch.state_dict().items()}

    @classmethod
    def from_state(cls, flow: FlowModel, config: dict, tensors: dict[str, torch.Tensor], *,
                   score: str = "combined") -> Combined:
        try:
            s, st = config["settings"], config["standardise"]
            if config.get("method", "patch-knn") == "patch-knn":
                patch = PatchKNN(s["coreset"], s["neighbourhood"], proj_dim=s["proj_dim"], seed=s["coreset_seed"],
                                 token_pool=int(config["token_pool"]))
                patch.bank = tensors[f"{TENSOR_PREFIX}bank"].float()
                patch.n_train_patches = s.get("n_train_patches")
            elif config["method"] == "patch-flow":
                patch = PatchFlow.from_config(config["config"]).load_buffers(tensors, TENSOR_PREFIX).eval()
            else:
                raise SanfError(f"the run's local part is an unknown method {config['method']!r}; refit the run")
            return cls(flow.with_score("nll"), patch, tuple(st["nll"]), tuple(st["patch"]), score=score,
                       rule=config.get("combine", "sum"))
        except (KeyError, TypeError, ValueError) as exc:
            raise SanfError(f"the run's patch score is incomplete ({exc}); refit the run") from None

    def with_score(self, score: str) -> Combined:
        m = [float(v) for v in self.stats]
        out = Combined(self.flow, self.patch, m[:2], m[2:], score=score, rule=self.rule)
        return out.to(self.stats.device)

    def combine(self, nll: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        m = self.stats
        a = (nll.to(torch.float64) - m[0]) / m[1]
        b = (patch.to(torch.float64) - m[2]) / m[3]
        return a + b if self.rule == "sum" else torch.maximum(a, b)

    def parts(self, cls: torch.Tensor, patch: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        pp = self.patch.parts(cls, patch)
        if self.score_kind == "patch":
            return pp
        nll = self.flow.parts(cls, patch)["score"]
        return {"score": self.combine(nll, pp["score"]), "nll": nll, "patch": pp["score"],
                "map": self.standardise_map(pp["map"])}

    def standardise_map(self, distances: torch.Tensor) -> torch.Tensor:
        """The combined map of the patch part's token distances: standardised as the part's image score."""
        m = self.stats
        return (distances.to(torch.float64) - m[2]) / m[3]

    def held_out_maps(self, cls: np.ndarray, patch: np.ndarray) -> dict[str, np.ndarray]:
        """The evidence of both map kinds (``patch``, ``combined``) for held-out normal rows (float32 token grids),
        which a run keeps for its pixel threshold."""
        raw = score_arrays(self.with_score("patch"), cls, patch, maps=True)["map"]
        return {"patch": raw, "combined": self.standardise_map(torch.from_numpy(raw)).float().numpy()}


def add_patch_score(result, cfg, train_cls: np.ndarray, train_patch: np.ndarray | None, *,
                    quiet: bool = True, fit_part=None) -> None:
    """Give a fitted flow's ``FitResult`` its patch part (``result.patch_score``, a ``Combined``) and extend its
    calibration with the ``patch`` and ``combined`` held-out scores, the threshold then on ``combined``. Nothing when
    ``cfg.patch_score`` is ``none`` or too few rows were held out (``result.patch_score_skipped`` says why).
    ``fit_part(tr, va) -> (bank, held-out scores)``: where the bank comes from (default ``fit_patch_part``; a sweep
    passes its shared parts, fitted once per key)."""
    from ..evaluate.calibration import calibration_record

    result.patch_score = None
    result.patch_score_skipped = None
    result.held_out_maps = {}
    cal = result.calibration
    if cfg.patch_score == "none" or not cal:
        if cfg.patch_score != "none":
            result.patch_score_skipped = "no held-out normal images (too few training images)"
        return
    tr, va = cfg.held_out_split(len(train_cls))
    nll = np.asarray(cal["scores"]["nll"], np.float64)
    if len(va) < MIN_HELD_OUT or len(nll) != len(va):
        result.patch_score_skipped = (f"{len(va)} held-out normal images, fewer than the {MIN_HELD_OUT} the "
                                      f"standardisation needs: the flow alone")
        return
    if fit_part is None:
        part, held_out_patch = fit_patch_part(cfg, train_cls, train_patch, tr, va, quiet=quiet)
    else:
        part, held_out_patch = fit_part(tr, va)
    flow = FlowModel(result.normalizer, result.model)
    combined = Combined(flow, part.to("cpu"), mean_std(nll), mean_std(held_out_patch), rule=cfg.combine)
    result.patch_score = combined
    if train_patch is not None:
        result.held_out_maps = combined.held_out_maps(train_cls[va], train_patch[va])
    scores = {**cal["scores"], "patch": held_out_patch,
              "combined": combined.combine(torch.from_numpy(nll), torch.from_numpy(held_out_patch)).numpy()}
    result.calibration = calibration_record(scores, fpr=cal["target_fpr"], slice_desc=cal["slice"],
                                            seed=cal.get("seed"), fraction=cal.get("fraction"), main="combined")


def new_local_part(cfg) -> AnomalyModel:
    """The unfitted local part ``cfg.patch_score`` names."""
    if cfg.patch_score == "patch-flow":
        return PatchFlow(seed=int(cfg.seed))
    return PatchKNN(cfg.patch_coreset, cfg.patch_neighbourhood, seed=cfg.seed, token_pool=int(cfg.token_pool))


def fit_patch_part(cfg, train_cls, train_patch, tr: np.ndarray, va: np.ndarray, *, quiet: bool = True):
    """The local part of a flow run fitted on rows ``tr`` (patch-knn pools as the flow pools) and its scores of rows
    ``va``, on ``cfg.device``."""
    from ..device import resolve_device

    if train_patch is None or np.ndim(train_patch) != 3:
        raise SanfError("the patch score needs the patch tokens of the normal training images; the cache has "
                        "none (use --patch-score none)")
    dev = resolve_device(cfg.device)
    part = new_local_part(cfg)
    part.fit(train_cls[tr], train_patch[tr], device=dev, quiet=quiet)
    held_out = score_arrays(part, train_cls[va], train_patch[va])["score"]
    return part, held_out


def patch_part_key(cfg, fingerprint: str, class_index: int) -> dict:
    """Everything a flow run's patch part depends on: two runs with equal keys have bitwise-equal banks."""
    key = {"cache_fingerprint": fingerprint, "normal_class": int(class_index), "seed": int(cfg.seed),
           "val_fraction": float(cfg.val_fraction)}
    if cfg.patch_score == "patch-flow":
        return {**key, "method": "patch-flow"}
    return {**key, "token_pool": int(cfg.token_pool), "coreset": float(cfg.patch_coreset),
            "neighbourhood": int(cfg.patch_neighbourhood)}


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
