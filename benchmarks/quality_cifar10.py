"""CIFAR-10 one-vs-rest quality on real features: the flow's fusion modes against the baselines, per backbone.

Runs one `sanf sweep` per cache (all 10 classes as the normal class in turn, the grid below, kNN/kNN-L2/Gaussian
on the same class tokens) and writes the M-AUROC tables to a markdown file. The caches come from
(unzip ../shared/data/cifar10-jpg.zip to DATA first):

    sanf extract --backbone tf_efficientnet_lite0 --weights ../shared/weights/tf_efficientnet_lite0.in1k.safetensors \\
        --dataset folder --data-root DATA/cifar10 --image-size 224 --limit-per-class 1000 \\
        --cache cache/cifar10-effnet-lite0-224
    sanf extract --backbone vit_small_patch14_dinov2 \\
        --weights ../shared/weights/vit_small_patch14_dinov2.imgfocus.safetensors --dataset folder \\
        --data-root DATA/cifar10 --image-size 112 --layer 8 --limit-per-class 1000 \\
        --cache cache/cifar10-dinov2s-112-L8

`--limit-per-class 1000` keeps the first 1,000 training images per class and all 1,000 test images per class.

    python benchmarks/quality_cifar10.py --cache cache/cifar10-dinov2s-112-L8 --grid fusion=none,semantic \\
        --seeds 0 --markdown benchmarks/quality_cifar10.md
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", action="append", required=True, help="a CIFAR-10 cache (repeatable)")
    p.add_argument("--grid", action="append", default=None, help="flow grid, e.g. fusion=none,gap,learnable,semantic")
    p.add_argument("--methods", default="flow,knn,knn-l2,gaussian")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--out", type=Path, default=Path("sweeps"))
    p.add_argument("--markdown", type=Path)
    args = p.parse_args(argv)

    from sanf_pipeline.sweep import run_sweep

    grid = args.grid or ["fusion=none,gap,learnable,semantic"]
    sections = []
    for cache in args.cache:
        out = args.out / f"quality-{Path(cache).name}"
        t = time.perf_counter()
        result = run_sweep(cache, out, classes="all", grid=grid, methods=args.methods, seeds=args.seeds, plots=False)
        wall = time.perf_counter() - t
        md = (out / "summary.md").read_text()
        sections.append(f"## {Path(cache).name}\n\nSweep wall time {wall:.0f} s "
                        f"({len(result.computed)} runs computed now).\n\n{md}\n")
    cmd = "python benchmarks/quality_cifar10.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = f"# CIFAR-10 one-vs-rest quality\n\nCommand: `{cmd}`\n\n" + "\n".join(sections)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
