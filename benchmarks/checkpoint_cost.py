"""What the epoch checkpoint costs a fit: the default flow fitted on an inspection-set-sized training set with a
checkpoint after every epoch (``checkpoint_every=0``, the rule before this option), with the default interval
(60 s), and without a run folder (no checkpoint at all), in one run on the same data:

    python benchmarks/checkpoint_cost.py [--rows 335] [--epochs 4] [--threads 1] [--repeats 2]

Synthetic features of the two development caches' shapes (EfficientNet-Lite0 last stage: d 1280, 7x7 tokens;
DINOv2 ViT-S/14: d 384, 16x16 tokens); speed does not depend on the values. Prints seconds per fit, the slowdown of
each against no checkpoint (the fastest of ``--repeats`` interleaved fits, after a warm-up fit), the size of one
checkpoint and the bytes the fit wrote.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sanf_pipeline.store.run_folder import CHECKPOINT_FILE
from sanf_pipeline.train.config import FitConfig
from sanf_pipeline.train.fit import fit_flow

SHAPES = {"EfficientNet-Lite0 last stage (d 1280, 49 tokens)": (1280, 49),
          "DINOv2 ViT-S/14 block 8 (d 384, 256 tokens)": (384, 256)}


def _fit_seconds(cls, patch, cfg: FitConfig, run_dir: Path | None) -> tuple[float, int, int]:
    """Seconds of one fit; with ``run_dir`` also the checkpoint's size and the number of checkpoints written."""
    import sanf_pipeline.train.fit as train_mod

    saves = [0]
    real = train_mod._Checkpoint.save

    def counted(self, *args):
        saves[0] += 1
        return real(self, *args)

    train_mod._Checkpoint.save = counted
    if run_dir is not None:
        run_dir.mkdir(parents=True)
    try:
        t = time.perf_counter()
        fit_flow(cls, patch, cfg, run_dir=run_dir)
        seconds = time.perf_counter() - t
    finally:
        train_mod._Checkpoint.save = real
    ckpt = run_dir / CHECKPOINT_FILE if run_dir is not None else None
    size = ckpt.stat().st_size if ckpt is not None and ckpt.exists() else 0
    return seconds, size, saves[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=335, help="training images (juice_bottle has 335)")
    ap.add_argument("--epochs", type=int, default=4, help="fixed epochs per fit (the default runs stop after ~4)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (a sweep worker uses 1)")
    ap.add_argument("--repeats", type=int, default=2, help="fits of each kind (the fastest counts)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"{args.rows} training rows, {args.epochs} epochs, default flow (semantic fusion, hidden 1024), "
          f"{args.threads} torch thread(s), CPU")
    for name, (d, tokens) in SHAPES.items():
        cls = rng.standard_normal((args.rows, d)).astype(np.float32)
        patch = rng.standard_normal((args.rows, tokens, d)).astype(np.float32)
        base = dict(early_stopping=False, epochs=args.epochs, patch_score="none", device="cpu")
        _fit_seconds(cls, patch, FitConfig(**{**base, "epochs": 1}), None)  # warm-up: allocator, first-touch pages
        times: dict[str, list[float]] = {"none": [], "every": [], "default": []}
        for _ in range(args.repeats):  # interleaved; the fastest of each kind
            with tempfile.TemporaryDirectory() as tmp:
                times["none"].append(_fit_seconds(cls, patch, FitConfig(**base), None)[0])
                s, size, n_every = _fit_seconds(cls, patch, FitConfig(**base, checkpoint_every=0), Path(tmp, "a"))
                times["every"].append(s)
                s, _, n_dflt = _fit_seconds(cls, patch, FitConfig(**base), Path(tmp, "b"))
                times["default"].append(s)
        none_s, every_s, dflt_s = (min(times[k]) for k in ("none", "every", "default"))
        print(f"{name}: no run folder {none_s:.1f} s; checkpoint every epoch {every_s:.1f} s "
              f"({every_s / none_s:.2f}x, {n_every} x {size / 1e6:.0f} MB = {n_every * size / 1e9:.1f} GB written); "
              f"default interval 60 s {dflt_s:.1f} s ({dflt_s / none_s:.2f}x, {n_dflt} checkpoint(s)); "
              f"every epoch / default {every_s / dflt_s:.2f}x")


if __name__ == "__main__":
    main()
