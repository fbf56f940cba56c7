"""The default detector against its parts and the baselines, through `sanf sweep` (issue 12).

For each cache given (``--cache NAME=PATH[:CLASS,CLASS]``; default: every class with training images), one sweep
with the flow at the `sanf fit` defaults (its score: ``combined``, the flow NLL plus the patch-knn part, each
standardised on held-out normal images) plus the class-token baselines (and ``patch-knn`` with ``--patch-knn``).
The flow runs' ``metrics.json`` also hold the AUROC of each part alone (``auroc_parts``: the flow NLL and the
patch part, from the same fitted run), so one sweep gives every column. Sweeps are resumable: rerunning the
command re-uses finished runs and only rewrites the table.

    python benchmarks/quality_combined.py --cache juice=/path/juice-dinov2s-224-L8 --seeds 0,1,2 \\
        --markdown benchmarks/quality_combined.md [--fixed token_pool=2] [--patch-knn]

Cells: mean over the cache's classes (flows: and seeds; ``±`` the std over seeds of the class mean when there are
several). "best baseline" is the best of the baseline columns measured on that cache.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from bench_table import command_line

from sanf_pipeline.sweep import run_sweep

BASELINES = ("gaussian", "knn", "knn-l2")


def _runs(sweep_dir: Path) -> list[dict]:
    out = []
    for m in sorted((sweep_dir / "runs").glob("*/metrics.json")):
        out.append(json.loads(m.read_text()))
    return out


def _cell(values_by_seed: dict[int, list[float]]) -> str:
    means = [float(np.mean(v)) for v in values_by_seed.values() if v]
    if not means:
        return "-"
    if len(means) == 1:
        return f"{means[0]:.4f}"
    return f"{np.mean(means):.4f} ± {np.std(means, ddof=1):.4f}"


def table_row(name: str, metrics: list[dict], baselines: tuple[str, ...]) -> dict:
    flows = [m for m in metrics if m.get("method") == "sanf-flow"]
    by_seed: dict[str, dict[int, list[float]]] = {"combined": {}, "nll": {}, "patch": {}}
    epochs = []
    for m in flows:
        seed = (m.get("fit") or {}).get("seed", 0)
        parts = m.get("auroc_parts") or {}
        by_seed["combined"].setdefault(seed, []).append(m["auroc"] if m.get("score") == "combined" else np.nan)
        by_seed["nll"].setdefault(seed, []).append(parts.get("nll", m["auroc"] if m.get("score") == "nll" else np.nan))
        by_seed["patch"].setdefault(seed, []).append(parts.get("patch", np.nan))
        epochs.append(m.get("best_epoch"))
    row = {"cache": name, "classes": len({m["normal_class"] for m in flows}),
           "default (combined)": _cell(by_seed["combined"]), "flow NLL part": _cell(by_seed["nll"]),
           "patch part": _cell(by_seed["patch"])}
    best = None
    for b in baselines:
        vals = [m["auroc"] for m in metrics if m.get("method") == b]
        row[b] = f"{np.mean(vals):.4f}" if vals else "-"
        if vals and (best is None or np.mean(vals) > best[1]):
            best = (b, float(np.mean(vals)))
    comb = [float(np.mean(v)) for v in by_seed["combined"].values() if v]
    row["best baseline"] = f"{best[0]} {best[1]:.4f}" if best else "-"
    row["default - best"] = f"{np.mean(comb) - best[1]:+.4f}" if best and comb else "-"
    row["best epochs (flows)"] = ",".join(str(e) for e in epochs[:10]) + (" ..." if len(epochs) > 10 else "")
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cache", action="append", required=True, help="NAME=PATH[:CLASS,CLASS]")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--fixed", action="append", default=[], help="KEY=VALUE flow setting for every flow run")
    ap.add_argument("--patch-knn", action="store_true", help="also the patch-knn baseline (all training rows)")
    ap.add_argument("--out", default="sweeps/quality-combined", help="sweeps go to OUT/NAME (git-ignored)")
    ap.add_argument("--workers", type=int)
    ap.add_argument("--markdown")
    ap.add_argument("--report-only", action="store_true", help="tables of finished runs; run nothing")
    ap.add_argument("--overwrite", action="store_true",
                    help="let a changed plan (e.g. more seeds) replace a sweep's plan; finished identical runs stay")
    args = ap.parse_args(argv)
    baselines = (*BASELINES, "patch-knn") if args.patch_knn else BASELINES
    rows, walls = [], {}
    for spec in args.cache:
        name, rest = spec.split("=", 1)
        path, _, classes = rest.partition(":")
        sweep_dir = Path(args.out) / name
        if not args.report_only:
            t0 = time.perf_counter()
            run_sweep(path, sweep_dir, classes=classes or "all", methods=("flow", *baselines), seeds=args.seeds,
                      fixed=args.fixed or None, workers=args.workers, plots=False, quiet=True,
                      overwrite=args.overwrite)
            walls[name] = time.perf_counter() - t0
        rows.append(table_row(name, _runs(sweep_dir), baselines))
        print(json.dumps(rows[-1]), flush=True)
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
             *("| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows)]
    print("\n".join(lines))
    if args.markdown:
        took = ", ".join(f"{k} {v / 60:.1f} min" for k, v in walls.items()) or "rendered from finished runs"
        with open(args.markdown, "a") as f:
            f.write(f"\n### {time.strftime('%Y-%m-%d')}: `{command_line('quality_combined.py', argv)}`\n\n"
                    + (f"Flow seeds {args.seeds}; fixed flow settings {args.fixed or 'none'}; wall ({took}).\n\n"
                       if not args.report_only else "Rendered from the finished runs in the sweeps (their seeds and "
                       "fixed settings as the commands that ran them gave).\n\n")
                    + "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
