"""Every setting of a flow fit (``FitConfig``), the one place that validates them, and the training-length rule.

``FitConfig.validate`` checks every field against the registries it names (``flow.FUSION_MODES``,
``flow.MAIN_INPUTS``, ``flow.SPATIAL_CHANNELS``, ``features.NORMALIZATIONS``), so a registered fusion or
normalisation is accepted by the API, `sanf fit` and `sanf sweep` alike; ``training_length`` turns the options a
user gave into fixed epochs or early stopping (`sanf fit` and `sanf sweep` both call it).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np

from .errors import SanfError
from .features import NORMALIZATIONS

EPOCH_SELECTION_FIXED = "fixed final epoch (no epoch selection), never test AUROC"
EPOCH_SELECTION_EARLY = "early stopping on held-out normal training NLL, never test AUROC"
# what a flow run adds to its NLL (combined.py): a patch-knn memory bank of the run's own training rows, or nothing
# (the paper's flow alone)
PATCH_SCORES = ("patch-knn", "none")

@dataclass
class FitConfig:
    """Every setting of a fit. Defaults: the paper (METHOD.md) unless a measurement says otherwise."""

    # the flow (flow.SANFlow)
    blocks: int = 4
    fusion: str = "semantic"
    clamp: float = 2.0
    hidden: int = 1024
    heads: int = 1
    spatial_channels: str = "half"
    main_input: str = "semantic"
    attn_dim: int | None = None
    # inputs (features.py): KxK average pooling of the cached patch grid, then normalisation
    token_pool: int = 1
    normalize: str = "l2+whiten"
    # optimiser: Adam as the paper's final setting; eps is PyTorch's default (the official code used 1e-4)
    lr: float = 5e-5
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-5
    batch_size: int = 32
    grad_clip: float | None = 1.0
    # training length: a fixed number of epochs, or early stopping on held-out normal training NLL
    early_stopping: bool = True
    epochs: int = 1
    val_fraction: float = 0.1
    patience: int = 3
    max_epochs: int = 30
    min_delta: float = 0.0
    # early stopping also scores the untrained flow ("epoch 0"; with l2+whiten the shrinkage Gaussian of the class
    # tokens) and keeps it when no trained epoch has a lower held-out NLL (benchmarks/flow_industrial_probe.md)
    keep_initial: bool = True
    # small training sets: an epoch is at least this many optimiser steps (the rows are cycled), so that held-out
    # NLL is checked after the flow could move; 1 = one pass over the rows (the paper's epoch)
    min_epoch_steps: int = 1
    # std of Gaussian noise added to the normalised main input during training (0 = none)
    noise: float = 0.0
    # reproducibility and hardware
    seed: int = 0
    device: str = "auto"
    amp: bool = True
    eval_batch_size: int = 256
    # seconds of training between epoch checkpoints (0 = after every epoch; checked when an epoch ends): a
    # checkpoint holds the model, Adam's two moments and the best epoch's state (627 MB for the default flow on
    # 1280-d tokens), and writing it after every few-second epoch of a small set made the fit 1.21-1.68x slower
    # (benchmarks/checkpoint_cost.md); a crash loses at most this much training plus one epoch, and the resumed fit
    # is bit-identical either way
    checkpoint_every: float = 60.0
    # the combined score (combined.py): the run also keeps a patch-knn memory bank of its training rows' patch
    # tokens, and its default score is the flow NLL plus the patch distance, each standardised on the held-out
    # normal slice ("none": the paper's flow NLL alone; benchmarks/quality_combined.md)
    patch_score: str = "patch-knn"
    patch_coreset: float = 0.1
    patch_neighbourhood: int = 3
    # the detector's default threshold: target false-positive rate on held-out normal images (calibration.py)
    fpr: float = 0.01

    # do not change the model; not compared on resume
    NOT_SETTINGS = ("device", "eval_batch_size", "fpr", "checkpoint_every")

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)

    @classmethod
    def from_dict(cls, data: dict) -> FitConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SanfError(f"unknown fit setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**data)

    def validate(self) -> FitConfig:
        from .flow import FUSION_MODES, MAIN_INPUTS, SPATIAL_CHANNELS

        def bad(name, value, want):
            raise SanfError(f"invalid {name}={value!r}: {want}")

        if self.fusion not in FUSION_MODES:
            bad("fusion", self.fusion, f"choose one of {', '.join(FUSION_MODES)}")
        if self.spatial_channels not in SPATIAL_CHANNELS:
            bad("spatial_channels", self.spatial_channels, f"choose one of {', '.join(SPATIAL_CHANNELS)}")
        if self.main_input not in MAIN_INPUTS:
            bad("main_input", self.main_input, f"choose one of {', '.join(MAIN_INPUTS)}")
        if self.patch_score not in PATCH_SCORES:
            bad("patch_score", self.patch_score, f"choose one of {', '.join(PATCH_SCORES)}")
        if not (isinstance(self.patch_coreset, (int, float)) and 0 < self.patch_coreset <= 1):
            bad("patch_coreset", self.patch_coreset, "must be in (0, 1]")
        if (isinstance(self.patch_neighbourhood, bool) or not isinstance(self.patch_neighbourhood, int)
                or self.patch_neighbourhood < 1 or self.patch_neighbourhood % 2 == 0):
            bad("patch_neighbourhood", self.patch_neighbourhood, "must be an odd positive integer (1, 3, 5, ...)")
        if self.normalize not in NORMALIZATIONS:
            bad("normalize", self.normalize, f"choose one of {', '.join(NORMALIZATIONS)}")
        for name in ("blocks", "hidden", "heads", "batch_size", "epochs", "patience", "max_epochs",
                     "eval_batch_size", "token_pool", "min_epoch_steps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                bad(name, v, "must be a positive integer")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            bad("seed", self.seed, "must be a non-negative integer")
        for name in ("clamp", "lr"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0 < v < math.inf):
                bad(name, v, "must be a finite number > 0")
        if not (0 <= self.noise < math.inf):
            bad("noise", self.noise, "must be a finite number >= 0")
        if not (0 <= self.weight_decay < math.inf) or not (0 < self.eps < 1) or self.min_delta < 0:
            bad("weight_decay/eps/min_delta", (self.weight_decay, self.eps, self.min_delta), "out of range")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            bad("betas", self.betas, "two numbers in [0, 1)")
        if self.grad_clip is not None and not (0 < self.grad_clip < math.inf):
            bad("grad_clip", self.grad_clip, "must be > 0 (or None for no clipping)")
        if not (0 < self.val_fraction < 1):
            bad("val_fraction", self.val_fraction, "must be between 0 and 1 (exclusive)")
        if isinstance(self.checkpoint_every, bool) or not (isinstance(self.checkpoint_every, (int, float))
                                                           and 0 <= self.checkpoint_every < math.inf):
            bad("checkpoint_every", self.checkpoint_every, "must be a finite number of seconds >= 0")
        if not (0 < self.fpr < 1):
            bad("fpr", self.fpr, "must be between 0 and 1 (exclusive)")
        return self

    @property
    def flow_needs_patch(self) -> bool:
        """The flow itself takes patch tokens (a fusion, or the spatial main input)."""
        return self.fusion != "none" or self.main_input == "spatial"

    @property
    def needs_patch(self) -> bool:
        """The run reads patch tokens: for the flow, or for its patch score."""
        return self.flow_needs_patch or self.patch_score != "none"

    def held_out_split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """(fitted rows, held-out rows) of ``n`` training rows, sorted: the seed's permutation, its first
        ``val_fraction`` held out (early stopping's slice; with a fixed length the same share, for calibration
        only, or none when fewer than 2 rows would remain). Raises when too few rows remain to fit."""
        n_val = max(1, int(round(self.val_fraction * n)))
        if not self.early_stopping and n - n_val < 2:
            n_val = 0
        if n - n_val < 2:
            raise SanfError(f"only {n} training sample(s) of the normal class ({n_val} held out); need at least "
                            f"{n_val + 2}: use --epochs N without early stopping or a class with more samples")
        order = np.random.default_rng(self.seed).permutation(n) if n_val else np.arange(n)
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    @property
    def total_epochs(self) -> int:
        return self.max_epochs if self.early_stopping else self.epochs

    @property
    def epoch_selection(self) -> str:
        return EPOCH_SELECTION_EARLY if self.early_stopping else EPOCH_SELECTION_FIXED

    def to_dict(self) -> dict:
        d = asdict(self)
        d["betas"] = list(self.betas)
        return d

    def settings(self) -> dict:
        """The settings that determine the result (compared when an unfinished run is resumed)."""
        d = self.to_dict()
        for k in self.NOT_SETTINGS:
            d.pop(k, None)
        if self.token_pool == 1:  # added later: runs fitted before token_pool existed keep their identity
            d.pop("token_pool")
        # added later: at the values that reproduce the behaviour before they existed, runs keep their identity
        for k, v in (("min_epoch_steps", 1), ("noise", 0.0), ("keep_initial", False), ("patch_score", "none")):
            if d[k] == v:
                d.pop(k)
        if self.patch_score == "none":
            d.pop("patch_coreset")
            d.pop("patch_neighbourhood")
        if not self.early_stopping:  # val_fraction stays: the same share is held out for calibration
            d.pop("keep_initial", None)
            for k in ("patience", "max_epochs", "min_delta"):
                d.pop(k)
        else:
            d.pop("epochs")
        return d

    def flow_kwargs(self, dim: int, patch_dim: int, num_tokens: int) -> dict:
        return dict(dim=dim, patch_dim=patch_dim, num_tokens=num_tokens, blocks=self.blocks, fusion=self.fusion,
                    clamp=float(self.clamp), hidden=self.hidden, heads=self.heads,
                    spatial_channels=self.spatial_channels, main_input=self.main_input, attn_dim=self.attn_dim,
                    seed=self.seed)


# ----------------------------------------------------------------------------------------- training length
EARLY_STOPPING_KEYS = ("val_fraction", "patience", "max_epochs", "min_delta")


def training_length(given: dict, varied: frozenset | set = frozenset()) -> dict:
    """The one rule for fixed epochs versus early stopping, for `sanf fit` and `sanf sweep` alike.

    ``given``: the fit settings the user set; ``varied``: keys a sweep grid varies (their values are not known
    here). ``epochs`` without ``early_stopping`` means a fixed length; ``epochs`` with ``early_stopping=true``,
    or an early-stopping key with a fixed length, is refused. Returns ``given`` with ``early_stopping`` set when
    the choice follows from it."""
    out = dict(given)
    keys = set(given) | set(varied)
    if "early_stopping" in varied:
        return out
    if "epochs" in keys and "early_stopping" not in out:
        out["early_stopping"] = False
    if "epochs" in keys and out.get("early_stopping") is True:
        raise SanfError("epochs (a fixed length) and early_stopping exclude each other; choose one")
    es_keys = [k for k in EARLY_STOPPING_KEYS if k in keys]
    if es_keys and out.get("early_stopping") is False:
        raise SanfError(f"{', '.join(es_keys)} belong(s) to early stopping; drop them with a fixed number of epochs")
    return out
