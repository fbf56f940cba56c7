"""patch-knn settings (issue 12): layer (one cache per layer choice), coreset fraction and neighbourhood, measured
on several caches together, so the defaults are chosen across data sets and backbones, never on one set.

    python benchmarks/patchknn_settings.py --fractions 0.01,0.1 --neighbourhoods 1,3 \\
        --cache "juice_bottle / DINOv2 block 8=cache/juice-dinov2s-224-L8" \\
        --cache "juice_bottle / EfficientNet stage 3=cache/juice-effl0-224-L3" ... \\
        --markdown benchmarks/patchknn_settings.md

Each cache's normal class is ``good`` (MVTec layout). The greedy coreset is built once per cache and
neighbourhood at the largest fraction: greedy selection is incremental, so the coreset of a smaller fraction is
a prefix of it (the same first centre and projection), exactly what ``models.PatchKNN`` would select.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch


def measure(cache: Path, fractions: list[float], neighbourhoods: list[int], normal: str = "good") -> dict:
    from sanf_pipeline.cache import open_cache
    from sanf_pipeline.evaluate.metrics import compute_metrics
    from sanf_pipeline.models.patchknn import (
        coreset_size,
        greedy_coreset,
        nearest_distances,
        neighbourhood_average,
    )

    with open_cache(cache) as c:
        ci = c.class_index(normal)
        _, train = c.split("train").read_class(ci)
        _, test, labels, _ = c.split("test").read_all()
        info = {"grid": c.backbone.get("grid"), "layer": c.backbone.get("layer"), "dim": c.dim}
    is_anomaly = labels != ci
    out = {"info": info, "cells": {}}
    for k in neighbourhoods:
        t = time.perf_counter()
        tr = neighbourhood_average(torch.from_numpy(train), k).reshape(-1, train.shape[2]).contiguous()
        te = neighbourhood_average(torch.from_numpy(test), k)
        order = greedy_coreset(tr, max(fractions))
        t_core = time.perf_counter() - t
        for f in fractions:
            t = time.perf_counter()
            bank = tr[order[:coreset_size(len(tr), f)]].contiguous()
            dist = nearest_distances(te.reshape(-1, te.shape[2]), bank).reshape(len(te), -1)
            scores = dist.amax(1).double().numpy()
            out["cells"][f"{f:g}/{k}"] = {"auroc": compute_metrics(is_anomaly, scores)["auroc"],
                                          "score_s": time.perf_counter() - t, "coreset_s": t_core,
                                          "bank": len(bank), "n_train_tokens": len(tr)}
            print(f"{cache.name} fraction {f:g} neighbourhood {k}: {out['cells'][f'{f:g}/{k}']}", flush=True)
    return out


def _sealed(path: Path, wait: bool) -> bool:
    from sanf_pipeline.cache import open_cache
    from sanf_pipeline.errors import SanfError

    if not wait:
        return True
    try:
        open_cache(path).close()
        return True
    except SanfError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", action="append", required=True, metavar="LABEL=PATH")
    p.add_argument("--fractions", default="0.01,0.1")
    p.add_argument("--neighbourhoods", default="1,3")
    p.add_argument("--wait", action="store_true", help="wait for caches that are still being extracted")
    p.add_argument("--json", type=Path, help="raw results; caches already measured there are re-used")
    p.add_argument("--markdown", type=Path)
    p.add_argument("--all-json", action="store_true", help="tabulate every cache in --json, not only --cache ones")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    fractions = [float(x) for x in args.fractions.split(",")]
    hoods = [int(x) for x in args.neighbourhoods.split(",")]
    done = json.loads(args.json.read_text()) if args.json and args.json.exists() else {}
    results = {}
    for item in args.cache:
        label, _, path = item.rpartition("=")
        old = done.get(label)
        if old and old.get("path", path) == path and all(f"{f:g}/{k}" in old["cells"] for f in fractions
                                                          for k in hoods):
            results[label] = old  # measured by an earlier invocation (--json): re-used
            continue
        while args.wait and not (Path(path) / "sanf.json").exists() or not _sealed(Path(path), args.wait):
            time.sleep(30)  # another process is still extracting it
        new = measure(Path(path), fractions, hoods)
        results[label] = {**new, "path": path, "cells": {**((old or {}).get("cells") or {}), **new["cells"]}}
        if args.json:
            args.json.write_text(json.dumps({**done, **results}, indent=1))
    results = {label: (results.get(label) or done.get(label)) for label in
               [item.rpartition("=")[0] for item in args.cache] + [k for k in done if k not in results]
               if args.all_json or label in results}
    cells_seen = {k for r in results.values() for k in r["cells"]}
    keys = sorted(cells_seen, key=lambda c: (int(c.split("/")[1]), float(c.split("/")[0])))
    lines = ["# patch-knn settings across data sets and backbones", "",
             "Command: `python benchmarks/patchknn_settings.py "
             + " ".join(f'"{a}"' if " " in a else a for a in (argv if argv is not None else sys.argv[1:])) + "`", "",
             "AUROC of patch-knn (normal class `good`, anomalies positive) per cache (rows) and coreset fraction / "
             "neighbourhood (columns; — = not measured); last row: the mean over the caches measured (their number "
             "in brackets). Times: seconds of coreset selection at the largest fraction (per neighbourhood), one "
             "thread of a shared 2-core CPU. The raw results (with scoring times) accumulate in the `--json` file "
             "over invocations; caches already there are re-used.", "",
             "| cache | layer | grid | " + " | ".join(keys) + " | coreset s (per neighbourhood) |",
             "|---|---|---|" + "---|" * len(keys) + "---|"]
    for label, r in results.items():
        cells = r["cells"]
        core = ", ".join(sorted({f"{c['coreset_s']:.0f}" for c in cells.values() if c.get("coreset_s") is not None}))
        lines.append(f"| {label} | {r['info']['layer']} | {'x'.join(map(str, r['info']['grid']))} | "
                     + " | ".join(f"{cells[k]['auroc']:.4f}" if k in cells else "—" for k in keys) + f" | {core} |")
    means = [[r["cells"][k]["auroc"] for r in results.values() if k in r["cells"]] for k in keys]
    lines.append("| **mean over the caches measured** | | | "
                 + " | ".join(f"**{np.mean(m):.4f}** ({len(m)})" for m in means) + " | |")
    text = "\n".join(lines) + "\n"
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
