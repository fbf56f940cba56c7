"""The conditional patch flow ``patch-flow`` (``PatchFlow``): a density of every patch token given its image's class
token and its grid position (``flow.patch.PatchFlowNet``), fitted on the patch tokens of the normal training images.
Map = every token's NLL on the token grid; image score = the mean of the ``top_k`` largest token NLLs (1: the
largest, as PatchCore's max).

Why a flow over patch tokens: a class-token flow sees one vector per image, and a few hundred images in 384-1280
dimensions are too few to learn a density from (it keeps its untrained start, the whitened Gaussian:
benchmarks/flow_industrial_probe.md). The patch tokens of the same images are ``T`` times more vectors (196
tokens x 300 images ~ 6e4), enough to learn on, and flows over mid-level patch features are strong localisers
(CFlow-AD, FastFlow). Unlike patch-knn it keeps no memory bank: its model is a fixed-size network.

Fitting (``fit``): inputs standardised per channel (``Normalizer("standardize")``: statistics of the training
tokens pooled over positions; the class token alike); a held-out slice of the normal training **images**
(``val_fraction``, seeded, at least ``MIN_HELD_OUT_IMAGES``) never trains; every epoch draws up to ``epoch_tokens``
random (image, position) pairs of the other images and steps Adam on mini-batches of ``batch_tokens`` tokens; after
each epoch the held-out images' mean token NLL is measured, and the weights of the best epoch are kept (early
stopping after ``patience`` epochs without a ``min_delta`` improvement, at most ``max_epochs``). No test image and
no anomaly is used. The held-out curve is kept in ``settings()["held_out_nll"]``.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch

from ..errors import SanfError
from ..flow.normalizer import Normalizer
from ..flow.patch import CONDITIONS, PatchFlowNet
from .base import AnomalyModel
from .patchknn import token_grid

MIN_HELD_OUT_IMAGES = 2
DEFAULTS = dict(blocks=8, hidden=128, cond_dim=64, clamp=2.0, condition="class+position", top_k=1, lr=1e-3,
                max_epochs=20, patience=3, min_delta=1e-3, val_fraction=0.1, batch_tokens=1024, epoch_tokens=65536,
                seed=0)
_NET_KEYS = ("blocks", "hidden", "cond_dim", "clamp", "condition")


class PatchFlow(AnomalyModel):
    """``patch-flow``: standardisation + ``PatchFlowNet``; score = mean of the ``top_k`` largest token NLLs."""

    name = "patch-flow"
    needs_patch = True
    has_map = True
    batch_size = 32

    def __init__(self, **options):
        super().__init__()
        unknown = set(options) - set(DEFAULTS)
        if unknown:
            raise TypeError(f"unknown patch-flow options {sorted(unknown)}")
        self.options = {**DEFAULTS, **options}
        o = self.options
        if o["condition"] not in CONDITIONS:
            raise SanfError(f"patch-flow condition must be one of {', '.join(CONDITIONS)}, got {o['condition']!r}")
        if int(o["top_k"]) < 1:
            raise SanfError(f"patch-flow top_k must be at least 1, got {o['top_k']}")
        if not 0.0 < float(o["val_fraction"]) < 1.0:
            raise SanfError(f"patch-flow val_fraction must be in (0, 1), got {o['val_fraction']}")
        self.normalizer: Normalizer | None = None
        self.net: PatchFlowNet | None = None
        self.history: list[float] = []
        self.best_epoch: int | None = None
        self.n_train_tokens: int | None = None

    @property
    def description(self) -> str:
        k = int(self.options["top_k"])
        which = "largest token NLL" if k == 1 else f"mean of the {k} largest token NLLs"
        cond = "class token and position" if self.options["condition"] == "class+position" else "position"
        return f"{which} under a conditional flow over the patch tokens (given the {cond})"

    def settings(self) -> dict:
        return {**{k: self.options[k] for k in (*_NET_KEYS, "top_k", "seed")},
                "best_epoch": self.best_epoch, "epochs_run": len(self.history),
                "held_out_nll": [round(v, 4) for v in self.history], "n_train_tokens": self.n_train_tokens,
                "parameters": None if self.net is None else sum(p.numel() for p in self.net.parameters())}

    def config(self) -> dict:
        return {"method": self.name, "options": dict(self.options),
                "net": None if self.net is None else self.net.config(),
                "normalizer": None if self.normalizer is None else self.normalizer.config(),
                "fit": {"best_epoch": self.best_epoch, "held_out_nll": list(self.history),
                        "n_train_tokens": self.n_train_tokens}}

    @classmethod
    def from_config(cls, config: dict) -> PatchFlow:
        model = cls(**config.get("options", {}))
        if config.get("net"):
            net = dict(config["net"])
            model.net = PatchFlowNet(net.pop("patch_dim"), net.pop("cls_dim"), tuple(net.pop("grid")), **net)
        if config.get("normalizer"):
            model.normalizer = Normalizer(config["normalizer"]["method"])
        fit = config.get("fit") or {}
        model.best_epoch, model.history = fit.get("best_epoch"), list(fit.get("held_out_nll") or [])
        model.n_train_tokens = fit.get("n_train_tokens")
        return model

    def load_buffers(self, tensors: dict[str, torch.Tensor], prefix: str = "") -> PatchFlow:
        own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if self.net is None or self.normalizer is None:
            raise SanfError("the patch-flow model file lacks its configuration; it is damaged, refit")
        for name in list(self.normalizer._buffers):
            if f"normalizer.{name}" in own:
                self.normalizer._buffers[name] = own.pop(f"normalizer.{name}")
        net = {k[4:]: v for k, v in own.items() if k.startswith("net.")}
        try:
            self.net.load_state_dict(net, strict=True)
        except RuntimeError as exc:
            raise SanfError(f"the patch-flow model file does not match its configuration "
                            f"({str(exc).splitlines()[0]}); it is damaged, refit") from None
        return self

    # -- scoring ------------------------------------------------------------------------------------------------
    def token_nll(self, cls: torch.Tensor, patch: torch.Tensor) -> torch.Tensor:
        """Every token's NLL in nats, ``(B, T)`` float32."""
        c, p = self.normalizer(cls, patch)
        return self.net.token_nll(p, c)

    def parts(self, cls: torch.Tensor, patch: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        if self.net is None:
            raise SanfError("patch-flow is not fitted")
        if patch is None or patch.dim() != 3:
            raise SanfError("patch-flow needs the test patch tokens; the cache has none")
        if patch.shape[2] != self.net.patch_dim or patch.shape[1] != self.net.num_tokens:
            raise SanfError(f"the patch tokens are {patch.shape[1]}x{patch.shape[2]}, the patch flow was fitted on "
                            f"{self.net.num_tokens}x{self.net.patch_dim}")
        nll = self.token_nll(cls, patch)
        k = min(int(self.options["top_k"]), nll.shape[1])
        score = nll.topk(k, dim=1).values.mean(dim=1) if k > 1 else nll.amax(dim=1)
        return {"score": score.double(), "map": nll.reshape(nll.shape[0], *self.net.grid)}

    # -- fitting ------------------------------------------------------------------------------------------------
    def held_out_split(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """Training and held-out image rows (seeded; the held-out slice is at least ``MIN_HELD_OUT_IMAGES``)."""
        if n < MIN_HELD_OUT_IMAGES + 1:
            raise SanfError(f"patch-flow needs at least {MIN_HELD_OUT_IMAGES + 1} normal training images "
                            f"(some are held out for early stopping), got {n}")
        n_val = max(MIN_HELD_OUT_IMAGES, int(round(float(self.options["val_fraction"]) * n)))
        order = np.random.default_rng(int(self.options["seed"])).permutation(n)
        return np.sort(order[n_val:]), np.sort(order[:n_val])

    def fit(self, cls, patch: np.ndarray | None = None, *, device="cpu", quiet: bool = True) -> PatchFlow:
        if patch is None or np.ndim(patch) != 3 or len(patch) == 0:
            raise SanfError("patch-flow needs the patch tokens of the normal training images; the cache has none")
        o = self.options
        n, t, d = patch.shape
        grid = token_grid(t)
        tr, va = self.held_out_split(n)
        self.normalizer = Normalizer.fit("standardize", np.asarray(cls)[tr], np.asarray(patch)[tr])
        dev = torch.device(device)
        c_all, p_all = (torch.from_numpy(a).to(dev) for a in self.normalizer.transform(np.asarray(cls), patch))
        torch.manual_seed(int(o["seed"]))  # the layers' initial weights
        self.net = PatchFlowNet(d, c_all.shape[1], grid, seed=int(o["seed"]),
                                **{k: o[k] for k in _NET_KEYS}).to(dev)
        opt = torch.optim.Adam(self.net.parameters(), lr=float(o["lr"]))
        gen = torch.Generator().manual_seed(int(o["seed"]))
        train_rows = torch.as_tensor(tr, device=dev)
        n_pairs = len(tr) * t
        per_epoch = min(n_pairs, int(o["epoch_tokens"]))
        self.n_train_tokens = int(n_pairs)
        self.history, self.best_epoch = [], 0
        best = self._held_out_nll(c_all, p_all, va)
        best_state, bad = copy.deepcopy(self.net.state_dict()), 0
        self.history.append(best)
        from ..progress import progress_bar

        with progress_bar(quiet, unit="epochs") as bar:
            task = bar.add_task("patch-flow fit", total=int(o["max_epochs"]), rate="")
            for epoch in range(1, int(o["max_epochs"]) + 1):
                self.net.train()
                pick = torch.randperm(n_pairs, generator=gen)[:per_epoch].to(dev)
                for s in range(0, per_epoch, int(o["batch_tokens"])):
                    idx = pick[s:s + int(o["batch_tokens"])]
                    img, pos = train_rows[idx // t], idx % t
                    loss = self.net.token_nll(p_all[img, pos], c_all[img], pos).mean() / d
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(self.net.parameters(), 10.0)
                    opt.step()
                val = self._held_out_nll(c_all, p_all, va)
                self.history.append(val)
                bar.update(task, advance=1, rate=f"held-out NLL {val:.2f}")
                if math.isfinite(val) and val < best - float(o["min_delta"]) * abs(best):
                    best, best_state, bad, self.best_epoch = val, copy.deepcopy(self.net.state_dict()), 0, epoch
                else:
                    bad += 1
                    if bad >= int(o["patience"]):
                        break
        self.net.load_state_dict(best_state)
        self.net.eval()
        return self

    @torch.no_grad()
    def _held_out_nll(self, c_all: torch.Tensor, p_all: torch.Tensor, rows: np.ndarray) -> float:
        """The held-out images' mean token NLL (nats per token)."""
        self.net.eval()
        total, count = 0.0, 0
        for s in range(0, len(rows), self.batch_size):
            r = torch.as_tensor(rows[s:s + self.batch_size], device=p_all.device)
            nll = self.net.token_nll(p_all[r], c_all[r])
            total += float(nll.double().sum())
            count += nll.numel()
        return total / max(count, 1)


__all__ = ["DEFAULTS", "PatchFlow"]
