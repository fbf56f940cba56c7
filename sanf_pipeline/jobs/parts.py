"""A sweep's shared patch parts (``PatchParts``): flow runs that differ in flow settings only have bitwise-equal
patch-knn banks (``models.combined.patch_part_key``), so a bank is fitted and the test split scored against it once,
in memory and in ``<sweep>/parts`` for every worker process; ``attach_patch_part`` gives a fitted flow its part from
there."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch

from ..errors import SanfError
from ..models import (
    add_patch_score,
)
from ..models.combined import fit_patch_part, patch_part_key
from ..store.atomic import load_tensors, save_tensors_atomic
from ..train.config import FitConfig
from ..train.fit import FitResult
from .data import TrainData

PARTS_DIR = "parts"  # a sweep folder's shared patch parts (sweep/run.py removes each once its runs are done)


class PatchParts:
    """A sweep's fitted patch parts, by ``models.combined.patch_part_key``: a patch-knn bank, its held-out scores
    and, once computed, its test scores, so flow runs that differ in flow settings only fit and score one bank. In
    memory (the ``keep`` most recently used; banks are large) and, with ``root``, in ``root/<key>.safetensors`` so that
    every worker process of a sweep (and a resumed sweep) finds a part another one fitted; a worker fitting a part
    holds ``root/<key>.lock`` (flock: released by the kernel if the worker dies), so each is fitted once."""

    def __init__(self, root=None, keep: int = 2):
        self.root, self.keep, self.items = (Path(root) if root else None), int(keep), {}

    @staticmethod
    def key(cfg: FitConfig, fingerprint: str, class_index: int) -> str:
        import hashlib
        import json

        text = json.dumps(patch_part_key(cfg, fingerprint, class_index), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:20]

    def _remember(self, key: str, item: dict) -> dict:
        self.items.pop(key, None)
        self.items[key] = item  # most recently used last
        while len(self.items) > self.keep:
            self.items.pop(next(iter(self.items)))
        return item

    def _load(self, key: str) -> dict | None:
        from ..models import PatchKNN

        path = self.root / f"{key}.safetensors"
        if not path.is_file():
            return None
        try:
            tensors, meta = load_tensors(path)
            bank = PatchKNN.from_config(meta["bank"])
            bank.bank = tensors["bank"]
            test = tensors["test"].numpy() if "test" in tensors else None
            return {"bank": bank, "held_out": tensors["held_out"].numpy(), "test": test}
        except (SanfError, KeyError, TypeError):
            return None  # damaged (a kill mid-write leaves only a temporary file, so rare): fitted again

    def _save(self, key: str, item: dict) -> None:
        tensors = {"bank": item["bank"].bank, "held_out": torch.from_numpy(np.asarray(item["held_out"]))}
        if item.get("test") is not None:
            tensors["test"] = torch.from_numpy(np.asarray(item["test"]))
        self.root.mkdir(parents=True, exist_ok=True)
        save_tensors_atomic(self.root / f"{key}.safetensors", tensors, {"kind": "sanf-patch-part",
                                                                         "bank": item["bank"].config()})

    def fetch(self, key: str, fit) -> dict:
        """The part of ``key``: from memory, from ``root``, or ``fit()`` -> (bank, held-out scores), stored."""
        if key in self.items:
            return self._remember(key, self.items[key])
        if self.root is None:
            bank, held_out = fit()
            return self._remember(key, {"bank": bank.to("cpu"), "held_out": held_out, "test": None})
        with _flock(self.root / f"{key}.lock"):
            item = self._load(key)
            if item is None:
                bank, held_out = fit()
                item = {"bank": bank.to("cpu"), "held_out": held_out, "test": None}
                self._save(key, item)
        return self._remember(key, item)

    def test_scores(self, key: str) -> np.ndarray | None:
        item = self.items.get(key)
        return None if item is None else item.get("test")

    def add_test(self, key: str, scores: np.ndarray) -> None:
        """Record the part's test scores (computed by the first run that evaluated with it)."""
        item = self.items.get(key)
        if item is None or item.get("test") is not None:
            return
        item["test"] = np.asarray(scores, np.float64)
        if self.root is not None:
            with _flock(self.root / f"{key}.lock"):
                if (self.root / f"{key}.safetensors").is_file():
                    self._save(key, item)


def attach_patch_part(result: FitResult, cfg: FitConfig, train: TrainData, fingerprint: str,
                      parts: PatchParts | None = None, *, quiet: bool = True) -> str | None:
    """``models.add_patch_score``, with the sweep's part of the same key when ``parts`` is given (fitted there
    first if it is new). Returns the part's key (None without ``parts`` or when the run got no patch part)."""
    if parts is None:
        add_patch_score(result, cfg, train.cls, train.patch, quiet=quiet)
        return None
    key = parts.key(cfg, fingerprint, train.class_index)

    def shared(tr, va):
        item = parts.fetch(key, lambda: fit_patch_part(cfg, train.cls, train.patch, tr, va, quiet=quiet))
        return item["bank"], item["held_out"]

    add_patch_score(result, cfg, train.cls, train.patch, quiet=quiet, fit_part=shared)
    return key if result.patch_score is not None else None


@contextlib.contextmanager
def _flock(path: Path):
    """Hold an exclusive flock on ``path`` (released by the kernel if the process dies); without fcntl (not POSIX)
    no lock: at worst two workers fit the same part."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
