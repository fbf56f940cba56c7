"""Every setting of a flow fit (``FitConfig``), each declared once; the one place that validates them; the run
identity (``FitConfig.settings``, versioned); and the training-length rule.

Each field is declared with ``_setting``: its default, its help text, how the command line spells and types it, and
how it enters the run identity (``Setting``). `sanf fit`'s options are generated from these declarations
(``train.options.fit_options``) and `sanf sweep --set/--grid` values are converted by the same click types
(``train.options.fit_value_type``), so both accept the same settings; this module imports neither click nor torch nor
numpy at import time, so the CLI can build its options and check paths before the heavy imports.

``FitConfig.validate`` checks every field against the registries it names (``flow.FUSION_MODES``,
``flow.MAIN_INPUTS``, ``flow.SPATIAL_CHANNELS``, ``flow.normalizer.NORMALIZATIONS``), so a registered fusion or
normalisation is accepted by the API, `sanf fit` and `sanf sweep` alike; ``training_length`` turns the options a
user gave into fixed epochs or early stopping (`sanf fit` and `sanf sweep` both call it).

The run identity is a record of the settings that change the fitted model, hashed into a run's id. Its version
says which fields a record holds: version 1 (the record before versions existed) leaves a field out at its
``implied`` value, the value that reproduces the behaviour before the field existed, so that older runs kept their
ids; version 2 holds every setting that applies, plus ``identity_version``. ``FitConfig.from_settings`` reads a
record of either version and ``convert_settings`` rewrites it in another, so a run folder of an older sanf is
compared in today's terms (``current_run_settings``, applied where ``jobs`` reads a run) and keeps its run id. A
field added later needs no rule of its own: bump ``IDENTITY_VERSION`` and declare the field's ``implied`` value,
which a record that lacks the key then means.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ..errors import SanfError

if TYPE_CHECKING:
    import numpy as np

EPOCH_SELECTION_FIXED = "fixed final epoch (no epoch selection), never test AUROC"
EPOCH_SELECTION_EARLY = "early stopping on held-out normal training NLL, never test AUROC"
# what a flow run adds to its NLL (combined.py): a local part fitted on the run's own training rows (a patch-knn
# memory bank or the conditional patch flow), or nothing (the paper's flow alone); and how the two are combined
PATCH_SCORES = ("patch-knn", "patch-flow", "none")
COMBINE_RULES = ("sum", "max")

IDENTITY_KEY = "identity_version"
IDENTITY_VERSIONS = (1, 2)  # the record versions this sanf reads
# New runs still write version 1: the sweep's resume checks (sweep/plan.py ``is_finished``, sweep/run.py's plan
# comparison) and the epoch checkpoint's id (train.py) compare records as written, and tests of train.py and
# combined.py assert version 1's omissions; version 2 changes every run id, so it is switched on together with
# those comparisons converting through ``convert_settings``.
IDENTITY_VERSION = 1


class _Nothing:
    def __repr__(self):
        return "NOTHING"


NOTHING: Any = _Nothing()  # a field without an implied value: it has been recorded since version 1


@dataclass(frozen=True)
class Setting:
    """The declaration of one ``FitConfig`` field beside its default (``field(metadata={"sanf": Setting(...)})``)."""

    help: str
    flag: str = ""  # `sanf fit`'s spelling where it is not --<name with - for _>
    invert: bool = False  # the flag sets the field to False (--no-amp: amp=False)
    choices: tuple | str = ()  # the valid values, or the name of the cli_types loader of their registry
    # a range the command line checks while parsing, and shows; ``validate`` checks every field again
    min: float | None = None
    max: float | None = None
    min_open: bool = False
    metavar: str = ""
    # a training-length key: the command line passes it on only when given, for ``training_length`` to decide
    given_only: bool = False
    show_default: bool = True
    identity: bool = True  # False: it does not change the fitted model, so it is left out of the run identity
    applies: Callable[[FitConfig], bool] | None = None  # in the run identity only where it changes the result
    implied: Any = NOTHING  # the value that reproduces the behaviour before the field existed


def _setting(default, help: str, **spec) -> Any:
    return field(default=default, metadata={"sanf": Setting(help, **spec)})


def setting_of(f: Field) -> Setting:
    return f.metadata["sanf"]


def _early_stopping(cfg: FitConfig) -> bool:
    return cfg.early_stopping


def _fixed_length(cfg: FitConfig) -> bool:
    return not cfg.early_stopping


def _has_patch_part(cfg: FitConfig) -> bool:
    return cfg.patch_score != "none"


@dataclass
class FitConfig:
    """Every setting of a fit. Defaults: the paper (METHOD.md) unless a measurement says otherwise."""

    # the flow (flow.SANFlow)
    blocks: int = _setting(4, "Coupling layers (FLLs).")
    fusion: str = _setting("semantic", "Feature fusion module.", choices="_fusions")
    clamp: float = _setting(2.0, "Soft clamp alpha.")
    hidden: int = _setting(1024, "FFM MLP width.")
    heads: int = _setting(1, "Attention heads of the fusion.")
    spatial_channels: str = _setting("half", "Patch-token channels each FFM sees (half needs patch tokens as wide as "
                                             "the class token; otherwise full is used).",
                                     choices="_spatial_channels")
    main_input: str = _setting("semantic", "What the flow transforms (spatial: paper Table 4 ablation).",
                               choices="_main_inputs")
    attn_dim: int | None = _setting(None, "Attention width of the fusion [default: none, the width of the context "
                                          "tokens each FFM sees].")
    # inputs (flow/normalizer.py): KxK average pooling of the cached patch grid, then normalisation
    token_pool: int = _setting(1, "Average-pool the cached patch grid KxK before the fusion (K divides the grid "
                                  "side).", min=1, implied=1)
    normalize: str = _setting("l2+whiten", "Input normalisation (fit on normal train data).",
                              choices="_normalizations")
    # optimiser: Adam as the paper's final setting; eps is PyTorch's default (the official code used 1e-4)
    lr: float = _setting(5e-5, "Adam learning rate.")
    betas: tuple[float, float] = _setting((0.9, 0.999), "Adam's betas.", metavar="B1:B2")
    eps: float = _setting(1e-8, "Adam's epsilon (PyTorch's default; the official code used 1e-4).")
    weight_decay: float = _setting(1e-5, "Adam's weight decay.")
    batch_size: int = _setting(32, "Training batch size.")
    grad_clip: float | None = _setting(1.0, "Gradient-norm clip (0 or none: off).")
    # training length: a fixed number of epochs, or early stopping on held-out normal training NLL
    early_stopping: bool = _setting(True, "Early stopping on held-out normal training NLL (the default unless "
                                          "--epochs is given).", given_only=True)
    # without early stopping the same held-out share is kept out of training, for the threshold (held_out_split)
    epochs: int = _setting(1, "Train a fixed number of epochs (no early stopping) on 90% of the training rows; the "
                              "held-out 10% calibrate the detector's threshold and the combined score.",
                           given_only=True, show_default=False, applies=_fixed_length)
    val_fraction: float = _setting(0.1, "Early stopping: held-out share of the training rows.", given_only=True)
    patience: int = _setting(3, "Early stopping: epochs without improvement before stopping.", given_only=True,
                             applies=_early_stopping)
    max_epochs: int = _setting(30, "Early stopping: the most epochs.", given_only=True, applies=_early_stopping)
    min_delta: float = _setting(0.0, "Early stopping: how much the held-out NLL must drop to count as an "
                                     "improvement.", given_only=True, applies=_early_stopping)
    # early stopping also scores the untrained flow ("epoch 0"; with l2+whiten the shrinkage Gaussian of the class
    # tokens) and keeps it when no trained epoch has a lower held-out NLL (benchmarks/flow_industrial_probe.md)
    keep_initial: bool = _setting(True, "Early stopping: keep the untrained flow (epoch 0, the whitened Gaussian) "
                                        "when no epoch beats it on held-out NLL; --no-keep-initial is the "
                                        "paper-faithful rule (best trained epoch).",
                                  applies=_early_stopping, implied=False)
    # small training sets: an epoch is at least this many optimiser steps (the rows are cycled), so that held-out
    # NLL is checked after the flow could move; 1 = one pass over the rows (the paper's epoch)
    min_epoch_steps: int = _setting(1, "An epoch is at least this many optimiser steps (rows cycled): small sets "
                                       "then train longer between held-out checks.", min=1, implied=1)
    # std of Gaussian noise added to the normalised main input during training (0 = none)
    noise: float = _setting(0.0, "Std of Gaussian noise on the normalised main input during training (a "
                                 "regulariser).", min=0, implied=0.0)
    # reproducibility and hardware
    seed: int = _setting(0, "Random seed (initialisation, held-out split, batch order).")
    device: str = _setting("auto", "auto, cpu, cuda, cuda:N.", identity=False)
    amp: bool = _setting(True, "No mixed precision on GPU.", flag="--no-amp", invert=True)
    eval_batch_size: int = _setting(256, "Batch size of scoring (held-out NLL, calibration).", identity=False)
    # seconds of training between epoch checkpoints (0 = after every epoch; checked when an epoch ends): a
    # checkpoint holds the model, Adam's two moments and the best epoch's state (627 MB for the default flow on
    # 1280-d tokens), and writing it after every few-second epoch of a small set made the fit 1.21-1.68x slower
    # (benchmarks/checkpoint_cost.md); a crash loses at most this much training plus one epoch, and the resumed fit
    # is bit-identical either way
    checkpoint_every: float = _setting(60.0, "Checkpoint a completed epoch once this many seconds have passed since "
                                             "the last checkpoint (0: every epoch); a killed fit resumes from it "
                                             "with bit-identical results.", min=0, metavar="SECONDS",
                                       identity=False)
    # the combined score (combined.py): the run also keeps a patch-knn memory bank of its training rows' patch
    # tokens, and its default score is the flow NLL plus the patch distance, each standardised on the held-out
    # normal slice ("none": the paper's flow NLL alone; benchmarks/quality_combined.md)
    patch_score: str = _setting("patch-knn", "patch-knn: the run also keeps a patch-knn memory bank of its training "
                                             "rows and scores by default with the flow NLL plus the patch distance, "
                                             "each standardised on the held-out normal images (README, 'The "
                                             "combined score'); none: the paper's flow NLL alone.",
                                choices=PATCH_SCORES, implied="none")
    combine: str = _setting("sum", "How the standardised flow NLL and local score are combined: sum, or max (the "
                                   "more anomalous part decides).", choices=COMBINE_RULES, implied="sum",
                            applies=_has_patch_part)
    patch_coreset: float = _setting(0.1, "The patch part's coreset fraction (as sanf baseline --method patch-knn "
                                         "--coreset).", min=0, max=1, min_open=True, applies=_has_patch_part)
    patch_neighbourhood: int = _setting(3, "The patch part's KxK neighbourhood averaging (odd; 1 = off).", min=1,
                                        applies=_has_patch_part)
    # the detector's default threshold: target false-positive rate on held-out normal images (calibration.py)
    fpr: float = _setting(0.01, "Target false-positive rate of the detector's threshold, calibrated on held-out "
                                "normal images.", identity=False)

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        # "0: off", as `sanf fit --grad-clip 0` has always meant, for the API and `sanf sweep --set` alike
        if isinstance(self.grad_clip, (int, float)) and not isinstance(self.grad_clip, bool) and self.grad_clip == 0:
            self.grad_clip = None

    @classmethod
    def from_dict(cls, data: dict) -> FitConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SanfError(f"unknown fit setting(s) {', '.join(unknown)}; valid: {', '.join(sorted(names))}")
        return cls(**data)

    def validate(self) -> FitConfig:
        def bad(name, value, want):
            raise SanfError(f"invalid {name}={value!r}: {want}")

        if self.patch_score not in PATCH_SCORES:
            bad("patch_score", self.patch_score, f"choose one of {', '.join(PATCH_SCORES)}")
        if self.combine not in COMBINE_RULES:
            bad("combine", self.combine, f"choose one of {', '.join(COMBINE_RULES)}")
        if not (isinstance(self.patch_coreset, (int, float)) and 0 < self.patch_coreset <= 1):
            bad("patch_coreset", self.patch_coreset, "must be in (0, 1]")
        if (isinstance(self.patch_neighbourhood, bool) or not isinstance(self.patch_neighbourhood, int)
                or self.patch_neighbourhood < 1 or self.patch_neighbourhood % 2 == 0):
            bad("patch_neighbourhood", self.patch_neighbourhood, "must be an odd positive integer (1, 3, 5, ...)")
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
        # the registries last: they import torch, so a bad number fails before it loads
        from ..flow import FUSION_MODES, MAIN_INPUTS, SPATIAL_CHANNELS
        from ..flow.normalizer import NORMALIZATIONS

        if self.fusion not in FUSION_MODES:
            bad("fusion", self.fusion, f"choose one of {', '.join(FUSION_MODES)}")
        if self.spatial_channels not in SPATIAL_CHANNELS:
            bad("spatial_channels", self.spatial_channels, f"choose one of {', '.join(SPATIAL_CHANNELS)}")
        if self.main_input not in MAIN_INPUTS:
            bad("main_input", self.main_input, f"choose one of {', '.join(MAIN_INPUTS)}")
        if self.normalize not in NORMALIZATIONS:
            bad("normalize", self.normalize, f"choose one of {', '.join(NORMALIZATIONS)}")
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
        import numpy as np

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

    def settings(self, version: int | None = None) -> dict:
        """The run identity: the settings that determine the result (compared when a run is resumed or found
        finished; their hash with the cache and class is the run id), as identity ``version`` records them
        (default: ``IDENTITY_VERSION``, what new runs write)."""
        version = IDENTITY_VERSION if version is None else version
        if version not in IDENTITY_VERSIONS:
            raise SanfError(f"unknown run identity version {version!r}; this sanf knows {IDENTITY_VERSIONS}")
        d = self.to_dict()
        out = {}
        for f in fields(self):
            spec = setting_of(f)
            if not spec.identity or (spec.applies is not None and not spec.applies(self)):
                continue
            if version == 1 and spec.implied is not NOTHING and d[f.name] == spec.implied:
                continue
            out[f.name] = d[f.name]
        if version > 1:
            out[IDENTITY_KEY] = version
        return out

    @classmethod
    def from_settings(cls, record: dict) -> FitConfig:
        """The FitConfig a run identity record (``settings()`` of any version in ``IDENTITY_VERSIONS``) describes.
        A key the record lacks takes its ``implied`` value (version 1 left those out), else its default (a key
        that does not apply, or no identity setting). Raises SanfError for a record sanf would not have written."""
        if not isinstance(record, dict):
            raise SanfError(f"a run identity is a JSON object, not {type(record).__name__}")
        version = record.get(IDENTITY_KEY, 1)
        if version not in IDENTITY_VERSIONS:
            raise SanfError(f"run identity version {version!r} is not one this sanf reads ({IDENTITY_VERSIONS}); "
                            f"a newer sanf wrote it: upgrade sanf")
        values = {k: v for k, v in record.items() if k != IDENTITY_KEY}
        known = {f.name: setting_of(f) for f in fields(cls) if setting_of(f).identity}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SanfError(f"unknown run identity key(s) {', '.join(unknown)}")
        for name, spec in known.items():
            if name not in values and spec.implied is not NOTHING:
                values[name] = spec.implied
        try:
            cfg = cls(**values)
            again = cfg.settings(version)
        except (TypeError, ValueError) as exc:
            raise SanfError(f"unreadable run identity: {exc}") from None
        if again != record:  # hand-edited, or not sanf's: reading it in another version would guess
            raise SanfError("the run identity is not one sanf writes")
        return cfg

    def flow_kwargs(self, dim: int, patch_dim: int, num_tokens: int) -> dict:
        # "half" pairs class-token and patch channels, so it needs equal widths; the patch tokens of a cache of two
        # depths (extract --patch-layer, the CNN default) are narrower, and every FFM then sees them whole
        channels = "full" if self.spatial_channels == "half" and patch_dim != dim else self.spatial_channels
        return dict(dim=dim, patch_dim=patch_dim, num_tokens=num_tokens, blocks=self.blocks, fusion=self.fusion,
                    clamp=float(self.clamp), hidden=self.hidden, heads=self.heads,
                    spatial_channels=channels, main_input=self.main_input, attn_dim=self.attn_dim,
                    seed=self.seed)


def current_run_settings(settings):
    """A run's recorded identity (``config.json: settings``) with its fit record in the identity version new runs
    write (``convert_settings``), so that a folder an older sanf wrote compares equal to the same settings today;
    its ``run_id`` stays the recorded one. Anything else (a baseline's settings) is unchanged."""
    if isinstance(settings, dict) and isinstance(settings.get("fit"), dict):
        return {**settings, "fit": convert_settings(settings["fit"])}
    return settings


def convert_settings(record, version: int | None = None):
    """A run identity record as identity ``version`` (default: ``IDENTITY_VERSION``) records the same settings, so
    a run of an older sanf is compared in today's terms; a record sanf cannot read comes back unchanged (and then
    matches no run, as before)."""
    try:
        return FitConfig.from_settings(record).settings(version)
    except SanfError:
        return record


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
