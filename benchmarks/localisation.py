"""Anomaly-map quality and cost: pixel AUROC, AUPRO@0.3 and the predicted regions of both pixel-threshold
rules (``image-max``, ``pixel``) for patch-knn and the default detector (``sanf fit`` defaults: flow + patch part,
the combined score), on the two halves of a test split with ground-truth masks, plus what the maps cost in
``sanf eval`` and ``sanf score``. Everything runs through the project's own CLI (``python -m sanf_pipeline`` as
subprocesses, each timed); the half metrics are computed in-process with the package's own functions
(``jobs.maps.localisation_metrics``, ``evaluate.metrics.compute_metrics``), never re-implemented.

Data layout (MVTec AD; one ``--category`` of one ``--data-root``):

    DATA/<category>/train/good/*.png                        normal training images
    DATA/<category>/test/good/*.png                         normal test images
    DATA/<category>/test/<defect>/*.png                     anomalous test images (any number of defect folders)
    DATA/<category>/ground_truth/<defect>/<stem>_mask.png   their masks (0 = normal, 255 = defect)

Steps, for one backbone (``--backbone``, ``--weights``, ``--layer``, ``--pool``, ``--image-size``):

1. ``sanf extract --dataset mvtec`` into ``--work/cache/<name>`` (skipped when a sealed cache with the same
   backbone, layer, pool and image size is there);
2. ``sanf baseline --method patch-knn`` (default patch-knn settings, maps on) into ``RUNS/patch-knn``;
3. ``sanf fit`` (all defaults) into ``RUNS/default``, then ``sanf eval`` with maps (into the run folder) and with
   ``--no-maps`` (into ``RUNS/default-nomaps``), alternated ``--repeats`` times: the eval wall-time ratio;
4. ``sanf score`` of every test image (the ``test/`` folder) with and without ``--maps DIR``, alternated
   ``--repeats`` times (same images, same default worker count): the score wall-time ratio.

Timed figures are whole-process wall seconds (start-up included); the repeated pairs report the minimum of each
command. Extraction, patch-knn and fit are timed once; a rerun re-uses finished steps and their recorded seconds
(``RUNS/timings.json``).

**The split rule.** Within each test class folder (``good`` and every defect type) the images are sorted by sample
id (the path relative to the data root); even positions (0, 2, 4, ...) form the *selection* half (where choices
such as the default pixel rule are made), odd positions the *report* half (numbers to quote). Each run's test
evidence is computed once in-process (``models.score_blocks`` with maps, on the run's own model) and each half is
evaluated separately with the run's pixel threshold: the rule's split-conformal threshold on the run's held-out
normal training maps (``held_out_map.*``) at the run's ``calibration.target_fpr``. On the whole test split the
in-process numbers are checked against the run's ``metrics.json["localisation"]`` (a mismatch is an error).

Run (the caches and runs go under ``--work``, default ``benchmarks/.work/localisation``):

    python benchmarks/localisation.py --data-root DATA --category juice_bottle \\
        --backbone vit_small_patch14_dinov2 --weights vit_small_patch14_dinov2.*.safetensors --layer 8 \\
        --image-size 224 --markdown benchmarks/localisation.md

``--markdown FILE`` replaces this run's section (keyed by its title) in FILE, or adds it; the file's preamble is
kept, so several data sets and backbones collect in one file. ``--report-only`` runs no command: it re-renders the
section from the finished runs and the recorded timings (the halves are recomputed in-process).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_table beside it, also when loaded by path
from bench_table import Runner, halves, layer_tag, same_cache, upsert_section  # noqa: E402

NORMAL = "good"
RULES = ("image-max", "pixel")
TOL = 1e-6  # in-process vs metrics.json on the whole test split (same code, same CPU: should be ~0)


def _load_timings(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _save_timings(path: Path, timings: dict) -> None:
    path.write_text(json.dumps(timings, indent=1, sort_keys=True))


def _halves(test) -> dict[str, np.ndarray]:
    return halves(test.labels, test.sample_ids)


def half_metrics(run_dir: Path, cache: Path) -> dict:
    """A run's image and pixel metrics on the whole test split and on each half (module docstring), in-process."""
    from sanf_pipeline.cache import open_cache
    from sanf_pipeline.detect.detector import load_model
    from sanf_pipeline.evaluate.metrics import compute_metrics
    from sanf_pipeline.jobs.data import TestData
    from sanf_pipeline.jobs.maps import localisation_metrics, make_head, pixel_threshold_of
    from sanf_pipeline.models import score_blocks

    model, config, kind, held_out = load_model(run_dir)
    normal = int(config["normal_class"])
    fpr = float((config.get("calibration") or {})["target_fpr"])
    with open_cache(cache) as c:
        test = TestData.from_cache(c, cache)
        scored = score_blocks(model, test.blocks(model.needs_patch), maps=True)
        masks = test.masks()
    if masks is None:
        raise SystemExit(f"{cache} records no ground-truth masks: extract it with --dataset mvtec from a layout "
                         f"with ground_truth/ folders")
    identity = test.identity or {}
    head = make_head(identity)
    threshold = pixel_threshold_of(held_out.get(kind), head, fpr)
    if threshold is None:
        raise SystemExit(f"run {run_dir} keeps no held-out normal maps for {kind}; refit it")
    scores, evidence = np.asarray(scored["score"]), scored["map"]
    labels = np.asarray(test.labels)
    names = identity.get("class_names") or []
    out = {"kind": kind, "target_fpr": fpr, "n_images": {}}
    for half, rows in {"all": np.arange(len(labels)), **_halves(test)}.items():
        loc = localisation_metrics(evidence[rows], head, (masks[0][rows], masks[1][rows]), labels[rows], normal,
                                   names, threshold)
        img = compute_metrics(labels[rows] != normal, scores[rows])
        out[half] = {"auroc": img["auroc"], "pixel_auroc": loc["pixel_auroc"], "aupro": loc["aupro"],
                     "n_normal": img["n_normal"], "n_anomalous": img["n_anomalous"],
                     "n_with_mask": int(loc["n_images"]), "n_regions": int(loc["n_regions"]),
                     "resolution": loc["resolution"], "pixel_threshold": loc["pixel_threshold"]["value"],
                     "regions": {r: loc["predicted_regions"][r] for r in RULES}}
    return out


def check_against_run(name: str, mine: dict, metrics: dict) -> float:
    """The largest difference between the in-process whole-split numbers and the run's metrics.json."""
    loc = metrics.get("localisation") or {}
    if "pixel_auroc" not in loc:
        raise SystemExit(f"{name}: metrics.json has no pixel metrics ({loc})")
    pairs = [(mine["auroc"], metrics["auroc"]), (mine["pixel_auroc"], loc["pixel_auroc"]),
             (mine["aupro"], loc["aupro"]), (mine["pixel_threshold"], loc["pixel_threshold"]["value"])]
    for r in RULES:
        for k in ("mean_iou", "mean_dice", "normal_images_with_region"):
            pairs.append((mine["regions"][r][k], loc["predicted_regions"][r][k]))
    worst = max(abs(a - b) for a, b in pairs)
    if not worst <= TOL:
        raise SystemExit(f"{name}: the in-process whole-split numbers differ from metrics.json by {worst:.3g} "
                         f"(pairs in-process / metrics.json: {pairs})")
    return worst


def _secs(x) -> str:
    return "re-used (not timed)" if x is None else f"{x:.0f}"


def _f(x, digits: int = 4) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _table(results: dict, half: str) -> list[str]:
    rows = ["| method | image AUROC | pixel AUROC | AUPRO@0.3 | IoU image-max | IoU pixel | normal with region "
            "image-max | normal with region pixel |", "|---|---|---|---|---|---|---|---|"]
    for label, key in (("patch-knn", "patch-knn"), ("default (combined score)", "default")):
        m = results[key][half]
        rq = m["regions"]
        rows.append(f"| {label} | {_f(m['auroc'])} | {_f(m['pixel_auroc'])} | {_f(m['aupro'])} | "
                    f"{_f(rq['image-max']['mean_iou'], 3)} | {_f(rq['pixel']['mean_iou'], 3)} | "
                    f"{_f(rq['image-max']['normal_images_with_region'], 3)} | "
                    f"{_f(rq['pixel']['normal_images_with_region'], 3)} |")
    return rows


def _verdict(results: dict) -> str:
    """Which pixel rule gives the better predicted regions on the selection half (mean IoU, then normal images)."""
    parts = []
    for key in ("patch-knn", "default"):
        rq = results[key]["selection"]["regions"]
        iou = {r: rq[r]["mean_iou"] for r in RULES}
        nwr = {r: rq[r]["normal_images_with_region"] for r in RULES}
        best = max(RULES, key=lambda r: (iou[r], -nwr[r]))
        parts.append(f"{key}: {best} (IoU {iou['image-max']:.3f} vs {iou['pixel']:.3f}, normal with region "
                     f"{nwr['image-max']:.3f} vs {nwr['pixel']:.3f}; image-max vs pixel)")
    return "Better pixel rule on the selection half (higher mean IoU): " + "; ".join(parts) + "."


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-root", type=Path, required=True, help="folder holding <category>/{train,test,ground_truth}")
    p.add_argument("--category", required=True, help="the category folder under --data-root")
    p.add_argument("--backbone", required=True, help="timm model name or sanf alias")
    p.add_argument("--weights", help="weights file (default: sanf's search order)")
    p.add_argument("--layer", help="layer(s) of the cache, e.g. 8 or 2,3 [default: the backbone's last]")
    p.add_argument("--pool", type=int, default=1, help="--pool of the cache [default: 1]")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--work", type=Path, default=Path("benchmarks/.work/localisation"),
                   help="caches, runs, logs [default: benchmarks/.work/localisation]")
    p.add_argument("--repeats", type=int, default=2, help="timed eval and score pairs (min reported) [default: 2]")
    p.add_argument("--title", help="section title [default: category, backbone, layer, pool, size]")
    p.add_argument("--markdown", type=Path, help="replace (or add) this run's section in this file")
    p.add_argument("--verbose", action="store_true", help="print each command")
    p.add_argument("--report-only", action="store_true",
                   help="run no command: re-render the section from the finished runs and recorded timings")
    args = p.parse_args(argv)
    cat_dir = args.data_root / args.category
    if not (cat_dir / "train").is_dir() or not (cat_dir / "test").is_dir():
        raise SystemExit(f"{cat_dir}/train and test/ are not folders: expected MVTec layout")
    if not (cat_dir / "ground_truth").is_dir():
        raise SystemExit(f"{cat_dir}/ground_truth is not a folder: pixel metrics need masks")

    short = args.backbone.split("/")[-1]
    name = f"{args.category}-{short}-{args.image_size}-{layer_tag(args.layer)}" + (
        f"-pool{args.pool}" if args.pool > 1 else "")
    cache = args.work / "cache" / name
    runs = args.work / "runs" / name
    runs.mkdir(parents=True, exist_ok=True)
    sanf = Runner(runs / "commands.log", args.verbose)
    tfile = runs / "timings.json"
    timings = _load_timings(tfile)
    t0 = time.perf_counter()

    if args.report_only:
        missing = [k for k in ("eval_maps", "eval_nomaps", "score_maps", "score_plain", "patch-knn", "fit")
                   if k not in timings]
        if missing or not same_cache(cache, args.backbone, args.layer, args.image_size, args.pool, masks=True):
            raise SystemExit(f"--report-only: nothing finished to report in {runs} (missing: "
                             f"{', '.join(missing) or 'the cache'}); run without it first")
    # 1. the cache
    elif not same_cache(cache, args.backbone, args.layer, args.image_size, args.pool, masks=True):
        ext = ["extract", "--dataset", "mvtec", "--category", args.category, "--data-root", args.data_root,
               "--backbone", args.backbone]
        ext += ["--weights", args.weights] if args.weights else []
        ext += ["--layer", args.layer] if args.layer not in (None, "") else []
        ext += ["--pool", args.pool] if args.pool != 1 else []
        ext += ["--image-size", args.image_size, "--cache", cache, "--quiet"]
        if cache.exists() and not same_cache(cache, args.backbone, args.layer, args.image_size, args.pool, masks=True):
            ext.append("--overwrite")
        timings["extract"] = sanf(*ext)
        _save_timings(tfile, timings)
    # 2. patch-knn (default settings, maps on)
    pk, run = runs / "patch-knn", runs / "default"
    if not args.report_only and not ((pk / "metrics.json").exists() and "patch-knn" in timings):
        timings["patch-knn"] = sanf("baseline", "--cache", cache, "--normal-class", NORMAL, "--method", "patch-knn",
                                    "--out", pk, "--quiet")
        _save_timings(tfile, timings)
    # 3. the default detector: fit, then eval with and without maps, alternated
    if not args.report_only and not ((run / "model.safetensors").exists() and "fit" in timings):
        timings["fit"] = sanf("fit", "--cache", cache, "--normal-class", NORMAL, "--out", run, "--quiet")
        _save_timings(tfile, timings)
    ev_maps, ev_plain = [], []
    for _ in range(0 if args.report_only else args.repeats):
        ev_maps.append(sanf("eval", "--run", run))
        ev_plain.append(sanf("eval", "--run", run, "--no-maps", "--out", runs / "default-nomaps"))
    # 4. sanf score of every test image, with and without --maps
    sc_maps, sc_plain = [], []
    csv_maps, csv_plain, maps_dir = runs / "score-maps.csv", runs / "score-plain.csv", runs / "score-maps"
    score = ["score", "--run", run, cat_dir / "test", "--quiet"] + (["--weights", args.weights] if args.weights else [])
    for _ in range(0 if args.report_only else args.repeats):
        for f in (csv_maps, csv_plain):
            f.unlink(missing_ok=True)
        shutil.rmtree(maps_dir, ignore_errors=True)
        sc_maps.append(sanf(*score, "--out", csv_maps, "--maps", maps_dir))
        sc_plain.append(sanf(*score, "--out", csv_plain))
    if args.report_only:
        ev_maps, ev_plain = timings["eval_maps"], timings["eval_nomaps"]
        sc_maps, sc_plain = timings["score_maps"], timings["score_plain"]
        n_map_files = timings.get("n_map_files", len(list(maps_dir.glob("**/*.map.npy"))))
    else:
        n_map_files = len(list(maps_dir.glob("**/*.map.npy")))
        timings.update({"eval_maps": ev_maps, "eval_nomaps": ev_plain, "score_maps": sc_maps,
                        "score_plain": sc_plain, "n_map_files": n_map_files})
        _save_timings(tfile, timings)

    # 5. the halves, in-process, checked against the runs' own metrics on the whole split
    results, worst = {}, {}
    for key, rdir in (("patch-knn", pk), ("default", run)):
        results[key] = half_metrics(rdir, cache)
        worst[key] = check_against_run(key, results[key]["all"], json.loads((rdir / "metrics.json").read_text()))
    nomaps = json.loads((runs / "default-nomaps" / "metrics.json").read_text())
    if nomaps.get("auroc") != json.loads((run / "metrics.json").read_text()).get("auroc"):
        print("warning: eval with and without maps give different image AUROCs", file=sys.stderr)

    # 6. the section
    meta = json.loads((cache / "sanf.json").read_text())
    n_train = meta["dataset"]["splits"]["train"]["n"]
    a = results["default"]
    title = args.title or (f"{args.category}, {short} {layer_tag(args.layer)}"
                           + (f" pool {args.pool}" if args.pool > 1 else "") + f", {args.image_size} px")
    cmd = "python benchmarks/localisation.py " + " ".join(a for a in (argv if argv is not None else sys.argv[1:])
                                                         if a != "--report-only")
    grid = "x".join(map(str, meta.get("grid") or ["?"]))
    counts = "; ".join(
        f"{h} half {a[h]['n_normal']} normal + {a[h]['n_anomalous']} anomalous ({a[h]['n_with_mask']} with a known "
        f"mask, {a[h]['n_regions']} defect regions)" for h in ("selection", "report"))
    res = a["all"]["resolution"]

    def ratio(x, y):
        return f"{min(x) / min(y):.2f}" if x and y else "n/a"

    def runs_s(x):
        return f"{min(x):.1f} ({', '.join(f'{v:.1f}' for v in x)})"

    cost = ["| step | wall s | ratio |", "|---|---|---|",
            f"| `sanf extract` (train + test) | {_secs(timings.get('extract'))} | |",
            f"| `sanf baseline --method patch-knn` (fit + eval with maps) | {timings['patch-knn']:.0f} | |",
            f"| `sanf fit` (defaults) | {timings['fit']:.0f} | |",
            f"| `sanf eval` with maps / `--no-maps` | {runs_s(ev_maps)} / {runs_s(ev_plain)} | "
            f"{ratio(ev_maps, ev_plain)} |",
            f"| `sanf score` of the {meta['dataset']['splits']['test']['n']} test images with `--maps` / without | "
            f"{runs_s(sc_maps)} / {runs_s(sc_plain)} | {ratio(sc_maps, sc_plain)} |"]
    n_empty = json.loads((run / "metrics.json").read_text())["localisation"].get("n_defect_masks_empty", 0)
    thr = ", ".join(f"{k} {results[k]['target_fpr']:g}" for k in results)
    lines = [f"## {title}", "", f"Command: `{cmd}`", "",
             f"Data: `{cat_dir}`, {n_train} normal training images; test classes {', '.join(meta['class_names'])} "
             f"(normal = `{NORMAL}`); {counts}. Cache `{grid}` token grid, d {meta['dim']}; maps and masks compared "
             f"at {res[0]}x{res[1]} px (the model's input size; {n_empty} defect image(s) with a mask empty at that "
             f"resolution, left out of IoU). Pixel thresholds from each run's held-out normal "
             f"training maps at its target FPR ({thr}); whole-split numbers recomputed in-process match each run's "
             f"metrics.json (largest difference {max(worst.values()):.1g}).", "",
             "**Selection half** (even positions; where the pixel rule is chosen):", "", *_table(results, "selection"),
             "", _verdict(results), "",
             "**Report half** (odd positions; the numbers to quote):", "", *_table(results, "report"), "",
             "IoU: mean over the half's defect images with a mask of the predicted region's (map > pixel threshold) "
             "IoU with the mask (an empty prediction scores 0); normal with region: share of the half's normal "
             "images with any predicted pixel. The patch flow of issue 20 does not exist yet, so it has no row.", "",
             f"Cost (whole test split, 2-core CPU shared with other jobs; eval and score: min of {len(ev_maps)} "
             f"alternated runs, each run in brackets; each is a whole process, start-up included; score with maps "
             f"wrote {n_map_files} raw maps and overlays at the images' own resolution):",
             "", *cost, "",
             f"Whole test split (metrics.json): patch-knn image AUROC {_f(results['patch-knn']['all']['auroc'])}, "
             f"pixel AUROC {_f(results['patch-knn']['all']['pixel_auroc'])}, AUPRO "
             f"{_f(results['patch-knn']['all']['aupro'])}; default {_f(a['all']['auroc'])}, "
             f"{_f(a['all']['pixel_auroc'])}, {_f(a['all']['aupro'])}. "
             + ("Section re-rendered with --report-only from the finished runs and the recorded timings."
                if args.report_only else f"Total time of this invocation {time.perf_counter() - t0:.0f} s."), ""]
    section = "\n".join(lines)
    (runs / "section.md").write_text(section)
    (runs / "results.json").write_text(json.dumps({"title": title, "command": cmd, "results": results,
                                                   "timings": timings}, indent=1, default=float))
    if args.markdown:
        upsert_section(args.markdown, title, section, HEADER)
    print(section)
    return 0


HEADER = """# Anomaly-map quality and cost (MVTec layout sets with masks)

Produced by `benchmarks/localisation.py` (its docstring: data layout, split rule, options); one section per data set
and backbone, each with the exact command. Normal class `good`. Rows: `sanf baseline --method patch-knn` (default
settings) and the default detector (`sanf fit` defaults: flow + patch part, the combined score). Every figure is from
one of two fixed halves of the test split (within each class folder, sorted by sample id: even positions =
*selection*, odd = *report*); the table says which. Pixel metrics at the model's input size (at most 256 px a side),
AUPRO up to FPR 0.3. All on a shared 2-core CPU.

Data (the commands' `--data-root`, unzipped from the project's shared folder, see `../shared/README.md`):
`unzip ../shared/data/loco-juice-bottle.zip -d benchmarks/.work/localisation/data` (MVTec LOCO AD `juice_bottle`,
partial: the official validation images as test/good; `--data-root benchmarks/.work/localisation/data`) and
`unzip ../shared/data/bsdata-ballscrew.zip -d benchmarks/.work/localisation/data` (BSData ball-screw pitting;
`--data-root benchmarks/.work/localisation/data/bsdata_ballscrew`).

Published context, **on MVTec AD (15 categories), not on these sets**: PatchCore (WRN-50) pixel AUROC 98.1, PRO 94.4;
CFlow-AD pixel AUROC 98.6, PRO 94.6. The sets here are harder in different ways (MVTec LOCO's logical anomalies are
mostly not local texture changes; BSData's pitting regions are small), so those numbers are context, not a target.
"""


if __name__ == "__main__":
    raise SystemExit(main())
