"""The default detector on a natural-image one-vs-rest protocol (CIFAR-10): each class in turn normal, the other nine
anomalous; the default (`sanf fit` defaults), its flow alone, its patch-knn part alone, every combination rule of
the two (``quality_industrial.py``'s ``run_seed``: the same code) and the class-token baselines, on the selection
and report halves of the test split (``bench_table.HALVES_RULE``).

    unzip ../shared/data/cifar10-jpg.zip -d DATA
    sanf extract --backbone tf_efficientnet_lite0 --weights ../shared/weights/tf_efficientnet_lite0.in1k.safetensors \\
        --dataset folder --data-root DATA/cifar10 --image-size 224 --limit-per-class 200 --cache CACHE
    python benchmarks/default_cifar10.py --cache CACHE --markdown benchmarks/default_cifar10.md

The cache is whatever the plain `sanf extract` wrote (the backbone's recipe). ``--limit-per-class`` keeps the first
N images of each class in both splits: 200 per class keeps the protocol within minutes on a CPU (the full 5,000 +
1,000 per class: benchmarks/quality_cifar10.md). Cells: the mean AUROC over the ten classes, per seed; mean
(min-max) over seeds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_table import HALVES_RULE, command_line, halves, upsert_section  # noqa: E402
from quality_industrial import CLASS_BASELINES, _fmt, auroc, run_seed  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", required=True, type=Path)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="run folders [default: benchmarks/.work/runs/<cache name>]")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    out = args.out or Path(__file__).resolve().parent / ".work" / "runs" / args.cache.name

    from sanf_pipeline.cache import open_cache
    from sanf_pipeline.models import create_baseline, score_arrays

    t0 = time.perf_counter()
    with open_cache(args.cache) as c:
        names = c.class_names
        test = c.split("test")
        test_cls, test_patch = test.read(0, test.n, patch=True)
        labels, ids, bb = test.labels, test.sample_ids, c.backbone
        train = {i: c.split("train").read_class(i, patch=True) for i in range(len(names))}
    half = halves(labels, ids)
    per: dict[str, dict[int | None, list[dict]]] = {}  # detector -> seed -> per-class AUROCs
    for ci, name in enumerate(names):
        y = (labels != ci).astype(int)
        tr_cls, tr_patch = train[ci]
        for seed in seeds:
            res = run_seed(args.cache, name, seed, tr_cls, tr_patch, test_cls, test_patch, out, device=args.device,
                           parts=())
            for det, s in res["scores"].items():
                per.setdefault(det, {}).setdefault(seed, []).append({h: auroc(y[r], s[r]) for h, r in half.items()})
        for method in CLASS_BASELINES:
            s = score_arrays(create_baseline(method).fit(tr_cls, None), test_cls)["score"]
            per.setdefault(f"baseline {method}", {}).setdefault(None, []).append(
                {h: auroc(y[r], s[r]) for h, r in half.items()})
        print(f"class {name} done ({time.perf_counter() - t0:.0f} s)", flush=True)
    title = f"CIFAR-10 one-vs-rest, {bb.get('arch')} ({bb.get('recipe') or 'layer ' + str(bb.get('layer'))})"
    lines = [f"## {title}", "", f"{time.strftime('%Y-%m-%d')}. Command: "
             f"`{command_line('default_cifar10.py', argv)}`", "",
             f"Cache `{args.cache.name}`: {len(train[0][0])} training images per class, {test.n} test images; halves: "
             f"{HALVES_RULE}. Cells: mean AUROC over the 10 classes; seeds {args.seeds}: mean (min-max).", "",
             "| detector | selection half | report half |", "|---|---|---|"]
    for det, by_seed in per.items():
        sel = [float(np.mean([v["selection"] for v in vals])) for vals in by_seed.values()]
        rep = [float(np.mean([v["report"] for v in vals])) for vals in by_seed.values()]
        lines.append(f"| {det} | {_fmt(sel)} | {_fmt(rep)} |")
    lines += ["", f"Total {time.perf_counter() - t0:.0f} s on 2 shared CPU cores.", ""]
    section = "\n".join(lines)
    print(section)
    if args.markdown:
        upsert_section(args.markdown, title, section, "# The default detector on CIFAR-10 one-vs-rest\n\n"
                       "Produced by `benchmarks/default_cifar10.py` (its docstring says what it runs).\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
