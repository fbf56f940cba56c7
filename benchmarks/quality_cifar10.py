"""CIFAR-10 one-vs-rest quality on real features (issue 5): the flow's fusion modes against the baselines, per
backbone, plus z2 scoring, half/full patch channels, patch-grid pooling and clamp ablations.

The experiments are the ``PLAN`` below; every run is resumable, so rerunning the script re-uses finished runs and
only rewrites the tables. Caches that do not exist are reported as missing. The caches come from (unzip
../shared/data/cifar10-jpg.zip to DATA first; ``--limit-per-class 1000`` keeps the first 1,000 training images
per class and all 1,000 test images per class):

    sanf extract --backbone vit_small_patch14_dinov2 \\
        --weights ../shared/weights/vit_small_patch14_dinov2.imgfocus.safetensors --dataset folder \\
        --data-root DATA/cifar10 --image-size 224 --layer 8 --limit-per-class 1000 \\
        --cache cache/cifar10-dinov2s-224-L8
    sanf extract --backbone tf_efficientnet_lite0 --weights ../shared/weights/tf_efficientnet_lite0.in1k.safetensors \\
        --dataset folder --data-root DATA/cifar10 --image-size 224 --limit-per-class 1000 \\
        --cache cache/cifar10-effnet-lite0-224
    # the block comparison at 112 px: --image-size 112 with --layer 8 and --layer -1

    python benchmarks/quality_cifar10.py --markdown benchmarks/quality_cifar10.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np

# name, cache, fixed flow settings, main grid, ablations (one key at a time, the default fusion); "flow": False runs
# the baselines only, "seeds" overrides --seeds
PLAN = [
    {"name": "DINOv2 ViT-S/14, block 8, 224 px", "cache": "cache/cifar10-dinov2s-224-L8",
     "fixed": {"token_pool": 2}, "grid": {"fusion": ["none", "gap", "learnable", "semantic"]},
     "ablations": {"spatial_channels": ["full"], "token_pool": [1, 4], "clamp": [3.0]}},
    {"name": "EfficientNet-Lite0 (ImageNet), 224 px", "cache": "cache/cifar10-effnet-lite0-224",
     "fixed": {}, "grid": {"fusion": ["none", "semantic"]}, "ablations": {}, "seeds": "0"},
    {"name": "DINOv2 ViT-S/14, block 8, 112 px (block comparison)", "cache": "cache/cifar10-dinov2s-112-L8",
     "fixed": {}, "grid": None, "ablations": {}, "flow": False},
    {"name": "DINOv2 ViT-S/14, last block, 112 px (block comparison)", "cache": "cache/cifar10-dinov2s-112-Llast",
     "fixed": {}, "grid": None, "ablations": {}, "flow": False},
]
BASELINES = "knn,knn-l2,gaussian"
OVERWRITE = False  # --overwrite: a changed PLAN replaces a sweep's plan (identical finished runs are kept)
PROTOCOL = """\
Protocol: `../shared/data/cifar10-jpg.zip` (a JPEG re-encoding of CIFAR-10), each class in turn normal; the flow and
the baselines train on the first 1,000 training images of the normal class (`--limit-per-class 1000`: the 5,000
would multiply the ViT's 224-px extraction, 39 min on 2 CPU cores, by three) and are tested on all 10,000 test
images, anomalies (the nine other classes) positive. Flow: the `sanf fit` defaults (4 coupling blocks, hidden 1024,
clamp 2, FFM `spatial_channels=half`, `l2+whiten` inputs, Adam lr 5e-5, batch 32) with the training length chosen by
early stopping on the NLL of a held-out 10% of the normal *training* images (patience 3, at most 30 epochs), never by
test AUROC; score NLL. Seeds 0, 1, 2 (EfficientNet rows and ablations: seed 0 only, for CPU time: a fused
EfficientNet run costs ~110 s a core) change the flow's initialisation, permutations, held-out slice and batch order;
cells are mean ± sample std over seeds. kNN (k=2, raw and L2-normalised class tokens) and the Gaussian (Ledoit-Wolf
covariance, Mahalanobis distance) use the same class tokens and are seed-free. All runs on a 2-core CPU."""


def _extraction_wall(cache: Path) -> str:
    meta = json.loads((cache / "sanf.json").read_text()) if (cache / "sanf.json").exists() else {}
    try:
        t0, t1 = (dt.datetime.strptime(meta[k], "%Y-%m-%dT%H:%M:%S%z") for k in ("created", "sealed_at"))
    except (KeyError, ValueError):
        return "unknown"
    return f"{(t1 - t0).total_seconds() / 60:.1f} min (created -> sealed, 2-core CPU)"


def _pm(values) -> str:
    if not values:
        return "missing"
    return f"{np.mean(values):.4f}" + (f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else "")


def _default_setting(summary: dict, fusion: str) -> str | None:
    for s in summary["settings"]:
        if s == f"flow fusion={fusion}":
            return s
    return None


def score_z2(sweep_dir: Path, cache: Path, setting: str, summary: dict) -> dict[str, float]:
    """M-AUROC per seed of the official code's score (mean z^2) for the finished runs of ``setting``.

    Per-run AUROCs are kept in ``<sweep>/z2_auroc.json`` keyed by run and model-file size and mtime, so a rerun
    of the script re-scores only new or refitted models.
    """
    from sklearn.metrics import roc_auc_score

    from sanf_pipeline.cache import open_cache
    from sanf_pipeline.jobs.flow import load_run
    from sanf_pipeline.models import score_arrays
    from sanf_pipeline.store.atomic import write_json_atomic
    from sanf_pipeline.store.run_folder import MODEL_FILE

    store = sweep_dir / "z2_auroc.json"
    known = json.loads(store.read_text()) if store.exists() else {}
    rows = [r for r in summary["runs"] if r["setting"] == setting and r["status"] == "finished"]
    test = None
    per_seed: dict[str, list[float]] = {}
    for row in rows:
        run_dir = sweep_dir / "runs" / row["run_id"]
        st = (run_dir / MODEL_FILE).stat()
        key = f"{st.st_size}:{st.st_mtime_ns}"
        if known.get(row["run_id"], {}).get("model") != key:
            if test is None:
                with open_cache(cache) as c:
                    test = c.split("test").read_all()
            cls, patch, labels, _ = test
            z2 = score_arrays(load_run(run_dir).model("z2"), cls, patch)["score"]
            known[row["run_id"]] = {"model": key, "auroc": float(roc_auc_score(labels != row["class_index"], z2))}
            write_json_atomic(store, known)
        per_seed.setdefault(str(row["seed"]), []).append(known[row["run_id"]]["auroc"])
    n_classes = len(summary["classes"])
    return {seed: float(np.mean(v)) for seed, v in per_seed.items() if len(v) == n_classes}


def _sweep_wall(out: Path) -> str:
    """Compute time of a sweep's finished runs from its log (the runs of all invocations, summed per worker)."""
    log = out / "sweep_log.jsonl"
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
    total = sum(r.get("seconds", 0.0) for r in recs)
    return f"{total / 60:.0f} worker-minutes of compute for {len(recs)} runs"


def _sweep(cache, out, *, report_only: bool, **kw):
    """run_sweep, or with ``report_only`` the summary of what is finished (missing runs show as 'missing')."""
    from types import SimpleNamespace

    from sanf_pipeline.sweep import run_sweep, write_summary

    if report_only:
        summary = write_summary(out) if (out / "plan.json").exists() else None
        if summary is None:
            return None
        return SimpleNamespace(summary=summary, specs=summary["runs"], computed=[])
    return run_sweep(cache, out, plots=False, overwrite=OVERWRITE, keep_models=True, **kw)  # z2 rescores the models


def run_main(entry: dict, seeds: str, out_root: Path, workers: int | None,
             report_only: bool = False) -> tuple[list[str], dict | None]:
    """The fusion modes x seeds and the baselines of one PLAN entry, and z2 beside NLL for the default flow."""
    from sanf_pipeline.train.config import FitConfig

    cache = Path(entry["cache"])
    head = f"## {entry['name']}\n\nCache `{cache}`"
    if not (cache / "sanf.json").exists():
        return [f"{head}: missing (build it with the commands in the script's docstring).", ""], None
    meta = json.loads((cache / "sanf.json").read_text())
    bb, size = meta.get("backbone") or {}, (meta.get("preprocessing") or {}).get("image_size", ["?"])
    lines = [f"{head}: {bb.get('arch')}, {size[0]} px, block "
             f"{bb.get('layer') if bb.get('layer') is not None else 'last'}, d {meta['dim']}, "
             f"{meta['num_tokens']} patch tokens ({'x'.join(map(str, meta.get('grid') or ['?']))}); extraction "
             f"{_extraction_wall(cache)}. Fixed flow settings: {json.dumps(entry['fixed']) or '{}'} "
             f"(everything else the `sanf fit` defaults).", ""]
    seeds = entry.get("seeds", seeds)
    out = out_root / f"quality-{cache.name}"
    t = time.perf_counter()
    with_flow = entry.get("flow", True)
    res = _sweep(cache, out, report_only=report_only, grid=entry["grid"],
                 methods=f"flow,{BASELINES}" if with_flow else BASELINES, seeds=seeds, fixed=entry["fixed"],
                 workers=workers)
    if res is None:
        return [*lines, "Not run yet.", ""], None
    wall = time.perf_counter() - t
    summary = res.summary
    lines += [f"### Fusion modes and baselines (seeds {seeds})" if with_flow else "### Baselines", "",
              f"Sweep `{out}`: {len(res.specs)} runs, " + (
                  f"{_sweep_wall(out)} (per-run times in its sweep_log.jsonl)." if report_only else
                  f"{len(res.computed)} computed in this invocation, {wall:.0f} s wall (2 workers x 1 thread)."), ""]
    md = (out / "summary.md").read_text()
    table = md[md.index("## AUROC per class and setting"):md.index("![AUROC heatmap]")]
    lines.append(table.replace("## ", "#### ").strip())
    lines.append("")

    if not with_flow:
        return lines, None
    default_fusion = FitConfig().fusion
    setting = _default_setting(summary, default_fusion) or summary["settings"][0]
    nll = summary["m_auroc"][setting]["per_seed"]
    z2 = score_z2(out, cache, setting, summary)
    lines += ["### Score: NLL vs the official code's mean z^2 (same models)", "",
              "| setting | NLL M-AUROC | z2 M-AUROC |", "|---|---|---|",
              f"| {setting} | {_pm(list(nll.values()))} | {_pm(list(z2.values()))} |", ""]

    return lines, {"nll": nll, "setting": setting, "seeds": seeds}


def run_ablations(entry: dict, default: dict, ablation_seeds: str, out_root: Path, workers: int | None,
                  report_only: bool = False) -> list[str]:
    """One sweep per ablated key, each value against the default flow on the same seeds."""
    from sanf_pipeline.train.config import FitConfig

    if not entry["ablations"] or default is None:
        return []
    cache = Path(entry["cache"])
    default_fusion = FitConfig().fusion
    nll, setting, seeds = default["nll"], default["setting"], default["seeds"]
    rows = [f"| default ({setting}) | {_pm(list(nll.values()))} | | seeds {seeds} |"]
    for key, values in entry["ablations"].items():
        a_out = out_root / f"quality-{cache.name}-{key}"
        t = time.perf_counter()
        a = _sweep(cache, a_out, report_only=report_only, grid={key: values}, methods="flow", seeds=ablation_seeds,
                   fixed={**{k: v for k, v in entry["fixed"].items() if k != key}, "fusion": default_fusion},
                   workers=workers)
        if a is None:
            rows.append(f"| {key}={values} | not run yet | | |")
            continue
        a_wall = time.perf_counter() - t
        for s in a.summary["settings"]:
            per_seed = a.summary["m_auroc"][s]["per_seed"]
            common = sorted(per_seed.keys() & nll.keys())
            delta = float(np.mean([per_seed[k] - nll[k] for k in common])) if common else None
            rows.append(f"| {s} | {_pm(list(per_seed.values()))} | "
                        f"{'' if delta is None else f'{delta:+.4f}'} | seeds {ablation_seeds}; "
                        + (f"{_sweep_wall(a_out)} |" if report_only else
                           f"{len(a.computed)} runs computed, {a_wall:.0f} s |"))
    return [f"### Ablations of the default flow (fusion={default_fusion})", "",
            "Δ: against the default's M-AUROC on the same seeds.", "",
            "| setting | M-AUROC | Δ | runs |", "|---|---|---|---|", *rows, ""]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", action="append", help="run only the PLAN entries whose cache path contains this")
    p.add_argument("--seeds", default="0,1,2", help="flow seeds of the fusion-mode rows")
    p.add_argument("--ablation-seeds", default="0,1,2", help="flow seeds of the ablation rows")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--out", type=Path, default=Path("sweeps"))
    p.add_argument("--markdown", type=Path)
    p.add_argument("--report-only", action="store_true", help="tables of what is finished; run nothing")
    p.add_argument("--overwrite", action="store_true", help="let a changed PLAN replace a sweep's plan")
    args = p.parse_args(argv)

    global OVERWRITE
    OVERWRITE = args.overwrite
    entries = [e for e in PLAN if not args.only or any(o in e["cache"] for o in args.only)]
    t = time.perf_counter()
    # all main tables first (the core), then the ablations
    mains = [run_main(e, args.seeds, args.out, args.workers, args.report_only) for e in entries]
    sections = ["\n".join(lines + run_ablations(e, default, args.ablation_seeds, args.out, args.workers,
                                                 args.report_only)) + "\n"
                for e, (lines, default) in zip(entries, mains, strict=True)]
    cmd = "python benchmarks/quality_cifar10.py " + " ".join(argv if argv is not None else sys.argv[1:])
    how = ("tables rendered from the finished runs; the same command without --report-only (and --overwrite) runs "
           "what is missing and re-uses the rest" if args.report_only else
           f"{time.perf_counter() - t:.0f} s in this invocation; finished runs are re-used")
    text = f"# CIFAR-10 one-vs-rest quality\n\nCommand: `{cmd}` ({how}).\n\n{PROTOCOL}\n\n" + "\n".join(sections)
    if args.markdown:
        args.markdown.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
