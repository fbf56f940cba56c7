"""Quality on an inspection data set in MVTec layout (issue 12): the flow (fusion none / semantic, seeds, optional
flow-setting variants such as old vs new defaults) against every baseline (knn, knn-l2, gaussian on class tokens;
patch-knn on patch tokens), on one backbone. Runs on any MVTec-layout root:

    DATA/<category>/train/good/*.png             normal training images
    DATA/<category>/test/good/*.png              normal test images
    DATA/<category>/test/<defect>/*.png          anomalous test images (any number of defect folders)

    python benchmarks/quality_industrial.py --data-root DATA --category bottle \\
        --backbone vit_small_patch14_dinov2 --weights vit_small_patch14_dinov2.*.safetensors --layer 8 \\
        --markdown benchmarks/quality_industrial.md

It extracts the cache (skipped when a sealed cache with the same backbone, layer and image size is already at
``--cache``), runs the flow sweeps and the class-token baselines with ``sanf sweep`` (normal class ``good``; the
defect classes have no training images), runs ``patch-knn`` on ``--patch-cache`` (by default the same cache; give
``--patch-layer`` to extract a second cache of another layer for it, e.g. a mid-level CNN stage), and writes the
table. Every run is resumable: rerunning re-uses finished runs. ``--markdown FILE`` replaces this run's section
(keyed by its title) in FILE, so several data sets and backbones collect in one file.

Flow variants (the hook for comparing default sets): ``--variant NAME=KEY=V;KEY=V`` (repeatable) adds a flow
sweep with those fixed ``sanf fit`` settings (``sanf sweep --set``); ``--variant defaults=`` is the plain
``sanf fit`` defaults of the checkout it runs in (since issue 12 the combined score: flow NLL + patch part); with no
``--variant`` the script compares it with the flow alone, ``flow-only=patch_score=none``, and the paper's rule,
``paper=keep_initial=false;patch_score=none``. E.g.
``--variant "paper=lr=5e-5;hidden=1024" --variant defaults=``.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_table beside it, also when loaded by path
from bench_table import layer_tag, same_cache, upsert_section  # noqa: E402

NORMAL = "good"
CLASS_BASELINES = "knn,knn-l2,gaussian"


def ensure_cache(path: Path, args, layer, pool: int = 1) -> float:
    """Extract ``path`` unless an identical sealed cache is there; returns the seconds spent."""
    from sanf_pipeline.extract.backbones import parse_layers
    from sanf_pipeline.extract.job import ExtractConfig, extract

    if same_cache(path, args.backbone, layer, args.image_size, pool):
        return 0.0
    t = time.perf_counter()
    extract(ExtractConfig(backbone=args.backbone, dataset="mvtec", data_root=str(args.data_root),
                          category=args.category, cache=str(path), weights=args.weights, image_size=args.image_size,
                          layer=parse_layers(layer), pool=pool, device=args.device, batch_size=32,
                          num_workers=args.num_workers, quiet=args.quiet))
    return time.perf_counter() - t


# the current sanf fit defaults, and the paper-faithful training-length rule they replaced (best *trained* epoch)
# the default detector (flow + patch part, combined score), the flow alone, and the paper's rule (best trained epoch)
DEFAULT_VARIANTS = ["defaults=", "flow-only=patch_score=none", "paper=keep_initial=false;patch_score=none"]


def parse_variants(items) -> list[tuple[str, dict]]:
    from sanf_pipeline.sweep import parse_fixed

    out = []
    for item in items or DEFAULT_VARIANTS:
        name, _, rest = item.partition("=")
        if not name or not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise SystemExit(f"--variant needs NAME=KEY=V;KEY=V (NAME letters, digits, _.-), got {item!r}")
        out.append((name, parse_fixed([s for s in rest.split(";") if s.strip()])))
    return out


def _sweep(cache: Path, out: Path, args, **kw):
    from types import SimpleNamespace

    from sanf_pipeline.sweep import run_sweep, summarize

    if args.report_only:  # what is finished; unfinished runs show as missing
        return SimpleNamespace(summary=summarize(out)) if (out / "plan.json").exists() else None
    return run_sweep(cache, out, classes=NORMAL, plots=False, workers=args.workers, device=args.device,
                     quiet=args.quiet, overwrite=args.overwrite, **kw)


def _row_stats(summary: dict, setting: str) -> dict:
    rows = [r for r in summary["runs"] if r["setting"] == setting and r["status"] == "finished"]
    au = [r["auroc"] for r in rows]
    best = [r["best_epoch"] for r in rows if r.get("best_epoch") is not None]
    return {"aurocs": au, "seeds": [r["seed"] for r in rows], "best_epochs": best,
            "aupr": float(np.mean([r["aupr"] for r in rows])) if rows else None}


def _seconds(sweep_dir: Path) -> dict[str, float]:
    log = sweep_dir / "sweep_log.jsonl"
    out: dict[str, float] = {}
    if log.exists():
        for line in log.read_text().splitlines():
            if line.strip():
                r = json.loads(line)
                out[r.get("run_id", "")] = out.get(r.get("run_id", ""), 0.0) + float(r.get("seconds") or 0.0)
    return out


def run_patch_knn(cache: Path, out: Path, args) -> dict:
    """patch-knn (``baseline_run``) on ``cache``; a finished run with the same settings is re-used."""
    from sanf_pipeline.jobs.api import baseline_run
    from sanf_pipeline.models.patchknn import DEFAULT_CORESET, DEFAULT_NEIGHBOURHOOD

    options = {"coreset": args.coreset if args.coreset is not None else DEFAULT_CORESET,
               "neighbourhood": args.neighbourhood if args.neighbourhood is not None else DEFAULT_NEIGHBOURHOOD}
    mfile = out / "metrics.json"
    if mfile.exists():
        m = json.loads(mfile.read_text())
        if m.get("options") == options and m.get("cache_fingerprint") and not args.overwrite:
            return m
    if args.report_only:
        return {"options": options, "auroc": None}
    t = time.perf_counter()
    m = baseline_run(cache, NORMAL, "patch-knn", out, overwrite=True, plots=False, options=options).metrics
    m["seconds"] = time.perf_counter() - t
    mfile.write_text(json.dumps(m, indent=1, sort_keys=True))
    return m


def _pm(values) -> str:
    if not values:
        return "missing"
    return f"{np.mean(values):.4f}" + (f" ± {np.std(values, ddof=1):.4f}" if len(values) > 1 else "")


def _grid_desc(cache: Path) -> str:
    meta = json.loads((cache / "sanf.json").read_text())
    bb = meta.get("backbone") or {}
    layer = bb.get("layer")
    return (f"`{cache}` (layer {'last' if layer is None else layer}, d {meta['dim']}, "
            f"{'x'.join(map(str, meta.get('grid') or ['?']))} grid)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, required=True, help="folder holding <category>/{train,test}/...")
    p.add_argument("--category", required=True, help="the category folder under --data-root")
    p.add_argument("--backbone", required=True, help="timm model name or sanf alias")
    p.add_argument("--weights", help="weights file (default: $SANF_WEIGHTS_DIR, then timm)")
    p.add_argument("--layer", help="layer(s) of the main cache (flows, class-token baselines), e.g. 8 [default: last]")
    p.add_argument("--patch-layer", help="layer(s) of the patch-knn cache, e.g. 3 or 2,3 [default: --layer]")
    p.add_argument("--patch-pool", type=int, default=1, help="--pool of the patch-knn cache [default: 1]")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--cache", type=Path, help="main cache [default: cache/industrial/<category>-<backbone>-...]")
    p.add_argument("--patch-cache", type=Path, help="patch-knn cache [default: see --patch-layer]")
    p.add_argument("--out", type=Path, help="sweep folders [default: sweeps/industrial/<main cache name>]")
    p.add_argument("--fusions", default="none,semantic", help="flow fusion modes; the first gets --seeds")
    p.add_argument("--seeds", default="0,1,2", help="flow seeds of the first fusion mode")
    p.add_argument("--other-seeds", help="flow seeds of the other fusion modes [default: --seeds]")
    p.add_argument("--variant", action="append", metavar="NAME=KEY=V;KEY=V",
                   help="a flow-setting variant (repeatable; default: DEFAULT_VARIANTS)")
    p.add_argument("--no-flow", action="store_true", help="baselines only")
    p.add_argument("--coreset", type=float, help="patch-knn coreset fraction [default: patchknn.DEFAULT_CORESET]")
    p.add_argument("--neighbourhood", type=int, help="patch-knn neighbourhood [default: patchknn's]")
    p.add_argument("--workers", type=int)
    p.add_argument("--num-workers", type=int, default=1, help="DataLoader workers of the extraction")
    p.add_argument("--device", default="auto")
    p.add_argument("--title", help="section title [default: category, backbone, layers]")
    p.add_argument("--markdown", type=Path, help="replace (or add) this run's section in this file")
    p.add_argument("--overwrite", action="store_true", help="let a changed plan replace a sweep's plan")
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--report-only", action="store_true", help="tabulate what is finished; run nothing")
    args = p.parse_args(argv)
    if not (args.data_root / args.category / "train").is_dir():
        raise SystemExit(f"{args.data_root / args.category}/train is not a folder: expected MVTec layout")

    short = args.backbone.split("/")[-1]
    name = f"{args.category}-{short}-{args.image_size}-{layer_tag(args.layer)}"
    cache = args.cache or Path("cache/industrial") / name
    patch_layer = args.patch_layer if args.patch_layer is not None else args.layer
    same_patch = args.patch_cache is None and str(patch_layer) == str(args.layer) and args.patch_pool == 1
    patch_cache = args.patch_cache or (cache if same_patch else Path("cache/industrial") / (
        f"{args.category}-{short}-{args.image_size}-{layer_tag(patch_layer)}"
        + (f"-pool{args.patch_pool}" if args.patch_pool > 1 else "")))
    out = args.out or Path("sweeps/industrial") / name
    t0 = time.perf_counter()
    ext_s = 0.0 if args.report_only else ensure_cache(cache, args, args.layer)
    if patch_cache != cache and not args.report_only:
        ext_s += ensure_cache(patch_cache, args, patch_layer, args.patch_pool)

    rows: list[tuple[str, str, str, str]] = []  # setting, AUROC, best epochs, compute
    results: dict = {"flows": {}, "baselines": {}}
    fusions = [f.strip() for f in args.fusions.split(",") if f.strip()]
    variants = parse_variants(args.variant)
    if not args.no_flow:
        for vname, fixed in variants:
            for i, fusion in enumerate(fusions):
                seeds = args.seeds if i == 0 else (args.other_seeds or args.seeds)
                sdir = out / f"flow-{vname}-{fusion}"
                res = _sweep(cache, sdir, args, methods="flow", seeds=seeds, fixed={**fixed, "fusion": fusion})
                label = f"flow {vname} fusion={fusion}" + (f" ({';'.join(f'{k}={v}' for k, v in fixed.items())})"
                                                           if fixed else "")
                if res is None:
                    rows.append((label, "not run", "-", "-"))
                    continue
                setting = res.summary["settings"][0]
                st = _row_stats(res.summary, setting)
                secs = sum(_seconds(sdir).values())
                rows.append((label, _pm(st["aurocs"]), ",".join(map(str, st["best_epochs"])) or "-",
                             f"{secs / max(len(st['aurocs']), 1):.0f} s/run, seeds {seeds}"))
                results["flows"][label] = st
    bdir = out / "baselines"
    res = _sweep(cache, bdir, args, methods=CLASS_BASELINES, seeds="0")
    secs = _seconds(bdir)
    for method in CLASS_BASELINES.split(",") if res is not None else []:
        st = _row_stats(res.summary, method)
        rows.append((method, _pm(st["aurocs"]), "-", f"{sum(v for k, v in secs.items() if k.endswith(method)):.1f} s"))
        results["baselines"][method] = st["aurocs"][0] if st["aurocs"] else None
    pm = run_patch_knn(patch_cache, out / ("patch-knn" if patch_cache == cache else f"patch-knn-{patch_cache.name}"),
                       args)
    pk_label = f"patch-knn (coreset {pm['options']['coreset']:g}, {pm['options']['neighbourhood']}x" \
               f"{pm['options']['neighbourhood']} neighbourhood)"
    rows.append((pk_label, "not run" if pm["auroc"] is None else f"{pm['auroc']:.4f}", "-",
                 f"{pm.get('seconds', float('nan')):.0f} s"))
    results["baselines"]["patch-knn"] = pm["auroc"]
    results["patch_knn_settings"] = pm.get("settings")

    meta = json.loads((cache / "sanf.json").read_text())
    n_train = meta["dataset"]["splits"]["train"]["n"]
    n_test = meta["dataset"]["splits"]["test"]["n"]
    title = args.title or f"{args.category}, {args.backbone} {layer_tag(args.layer)}, {args.image_size} px"
    cmd = "python benchmarks/quality_industrial.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                               if a != "--report-only")
    best_base = max((v for v in results["baselines"].values() if v is not None), default=None)
    lines = [f"## {title}", "", f"Command: `{cmd}`", "",
             f"Data: `{args.data_root}/{args.category}`, {n_train} normal training images, {n_test} test images "
             f"(classes {', '.join(meta['class_names'])}; normal = `{NORMAL}`). Main cache {_grid_desc(cache)}; "
             f"patch-knn cache {_grid_desc(patch_cache)}. "
             + ("Table rendered with --report-only from the finished runs (rows 'not run' were not computed)."
                if args.report_only else f"Extraction in this invocation {ext_s:.0f} s; total "
                f"{time.perf_counter() - t0:.0f} s (finished runs re-used)."), "",
             "| method | AUROC (mean ± std over seeds) | best epoch per seed | compute |", "|---|---|---|---|",
             *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows], "",
             f"Best baseline: {best_base:.4f}." if best_base is not None else "", ""]
    section = "\n".join(lines)
    (out / "table.md").write_text(section)
    (out / "results.json").write_text(json.dumps({"title": title, "command": cmd, **results}, indent=1))
    if args.markdown:
        upsert_section(args.markdown, title, section, HEADER)
    print(section)
    return 0


HEADER = """# Quality on industrial inspection sets (MVTec layout)

Produced by `benchmarks/quality_industrial.py` (its docstring: data layout, options); one section per data set and
backbone, each with the exact command. Normal class `good`; AUROC with the anomalies positive. Flows: `sanf fit`
settings of the variant named in the row (`defaults` = the defaults of the commit that produced the section), training
length by early stopping on held-out *normal training* NLL; class-token baselines on the same cache; patch-knn on the
cache named in the section. All on a shared 2-core CPU.
"""


if __name__ == "__main__":
    raise SystemExit(main())
