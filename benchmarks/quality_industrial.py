"""Quality on an inspection data set in MVTec layout: sanf's default detector, its parts and every candidate rule
against the baselines, on the *selection* and *report* halves of the test split. Runs on any MVTec-layout root:

    DATA/<category>/train/good/*.png             normal training images
    DATA/<category>/test/good/*.png              normal test images
    DATA/<category>/test/<defect>/*.png          anomalous test images (any number of defect folders)

    python benchmarks/quality_industrial.py --data-root DATA --category bottle --backbone tf_efficientnet_lite0 \\
        --weights tf_efficientnet_lite0.in1k.safetensors --markdown benchmarks/quality_industrial.md

What it does, all with the checkout's own code and defaults:

1. extracts the cache as the plain `sanf extract --backbone B --dataset mvtec` does (the backbone's recipe: a
   semantic class token and local patch tokens in one pass; skipped when a sealed cache with those settings is at
   ``--cache``);
2. per seed (``--seeds``), fits the default detector exactly as `sanf fit` does (``FitConfig(seed=s)``: the
   class-token flow and its local part) and scores the test split: the **default** row;
3. fits the other local part (``patch-knn`` or ``patch-flow``, whichever the default is not) on the same rows, so
   every candidate combination is measured on the same flow: flow alone, local part alone, and each
   local part combined with the flow by each rule (``sum`` and ``max`` of the held-out-standardised scores, and
   Fisher's combination of the two split-conformal p-values, ``fisher``);
4. the baselines on the same cache (``knn``, ``knn-l2``, ``gaussian`` on class tokens; ``patch-knn`` on patch
   tokens), and ``patch-knn`` on ``--reference-cache`` when given (e.g. the CNN mid-level stages for a ViT cache);
5. with ``--fusion-ablation``, the patch flow without its class-token context (``condition=position``), seed 0;
6. the memory of each local part's model and its scoring time per image (one run, ratios).

Halves (``bench_table.HALVES_RULE``): within each class folder, test images sorted by sample id; even positions =
*selection* half (where defaults are chosen), odd = *report* half (the numbers to quote). Training length: early
stopping on held-out *normal* training images only. ``--markdown FILE`` replaces this run's section in FILE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_table beside it, also when loaded by path
from bench_table import HALVES_RULE, command_line, halves, upsert_section  # noqa: E402

NORMAL = "good"
CLASS_BASELINES = ("knn", "knn-l2", "gaussian")
RULES = ("sum", "max", "fisher")


def ensure_cache(args) -> float:
    """The plain `sanf extract` of the data set at ``args.cache`` (nothing when that cache is already there)."""
    from sanf_pipeline.cache import open_cache
    from sanf_pipeline.errors import SanfError
    from sanf_pipeline.extract.job import ExtractConfig, extract

    if (Path(args.cache) / "sanf.json").exists():
        try:
            with open_cache(args.cache) as c:
                bb = c.backbone
            if args.backbone in (bb.get("name"), bb.get("arch"), bb.get("alias")) and bb.get("recipe"):
                return 0.0
        except SanfError:
            pass
    t = time.perf_counter()
    extract(ExtractConfig(backbone=args.backbone, dataset="mvtec", data_root=str(args.data_root),
                          category=args.category, cache=str(args.cache), weights=args.weights,
                          image_size=args.image_size, device=args.device, batch_size=32, quiet=args.quiet,
                          overwrite=True))
    return time.perf_counter() - t


def auroc(y, s) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s))


def fisher(held_a, held_b, a, b) -> np.ndarray:
    """Fisher's combination of the split-conformal p-values of two scores (held-out normal scores as reference)."""
    def pval(held, x):
        held = np.sort(np.asarray(held, np.float64))
        return (1.0 + len(held) - np.searchsorted(held, x, side="left")) / (len(held) + 1.0)

    return -2.0 * (np.log(pval(held_a, a)) + np.log(pval(held_b, b)))


def combos(nll, held_nll, local, held_local) -> dict[str, np.ndarray]:
    """Each rule's combination of the flow NLL and a local score (test rows), standardised on the held-out rows."""
    from sanf_pipeline.models.combined import mean_std

    (m1, s1), (m2, s2) = mean_std(held_nll), mean_std(held_local)
    a, b = (nll - m1) / s1, (local - m2) / s2
    return {"sum": a + b, "max": np.maximum(a, b), "fisher": fisher(held_nll, held_local, nll, local)}


def timed_scores(model, cls, patch) -> tuple[np.ndarray, float]:
    from sanf_pipeline.models import score_arrays

    t = time.perf_counter()
    s = score_arrays(model, cls, patch)["score"]
    return s, (time.perf_counter() - t) / max(1, len(cls))


def model_bytes(model) -> int:
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values()))


def run_seed(cache, normal, seed: int, train_cls, train_patch, test_cls, test_patch, out: Path, *, device="cpu",
             parts=None) -> dict:
    """The default detector of one seed (`sanf fit` defaults), the other local parts named in ``parts`` (default:
    both) fitted on the same rows, and every combination of the flow with each local part."""
    from sanf_pipeline.jobs.api import fit_run
    from sanf_pipeline.jobs.flow import load_run
    from sanf_pipeline.models import score_arrays
    from sanf_pipeline.models.combined import LOCAL_PARTS, fit_patch_part
    from sanf_pipeline.train.config import FitConfig

    cfg = FitConfig(seed=seed, device=device)
    t = time.perf_counter()
    fit_run(cache, normal, cfg, out / f"{normal}-default-s{seed}", quiet=True)
    fit_s = time.perf_counter() - t
    run = load_run(out / f"{normal}-default-s{seed}", device=device)
    res = {"fit_s": fit_s, "best_epoch": (run.config.get("result") or {}).get("best_epoch")}
    tr, va = cfg.held_out_split(len(train_cls))
    combined = run.patch_score
    default_local = combined.patch.name if combined is not None else None
    if combined is None:  # the flow alone (too few held-out images)
        res["scores"] = {"default": score_arrays(run.flow_model, test_cls, test_patch)["score"]}
        return res
    scored = score_arrays(combined, test_cls, test_patch)
    res["scores"] = {"default": scored["score"], "flow": scored["nll"]}
    held_nll = np.asarray(run.config["calibration"]["scores"]["nll"], np.float64)
    for name in LOCAL_PARTS:
        t = time.perf_counter()
        if name != default_local and parts is not None and name not in parts:
            continue
        if name == default_local:
            part = combined.patch
            held = np.asarray(run.config["calibration"]["scores"]["patch"], np.float64)
            part_fit_s = None
        kept = out / f"{normal}-{name}-s{seed}.json"  # a part fitted here is kept, so a rerun reuses it
        if name != default_local and kept.exists():
            res.update(json.loads(kept.read_text()))
            local, held = np.asarray(res.pop("local")), np.asarray(res.pop("held"))
        else:
            if name == default_local:
                part = combined.patch
                held = np.asarray(run.config["calibration"]["scores"]["patch"], np.float64)
                part_fit_s = None
            else:
                part, held = fit_patch_part(dataclasses.replace(cfg, patch_score=name), train_cls, train_patch, tr,
                                            va)
                part_fit_s = time.perf_counter() - t
            local, per_image = timed_scores(part, test_cls, test_patch)
            facts = {f"{name} model bytes": model_bytes(part), f"{name} s/image": per_image,
                     f"{name} fit s": part_fit_s}
            if name == "patch-flow":
                facts["patch-flow settings"] = part.settings()
            res.update(facts)
            if name != default_local:
                kept.write_text(json.dumps({**facts, "local": local.tolist(), "held": np.asarray(held).tolist()}))
        res["scores"][name] = local
        for rule, s in combos(scored["nll"], held_nll, local, held).items():
            res["scores"][f"flow {rule} {name}"] = s
    res["default_local"] = default_local
    res["default_rule"] = combined.rule
    return res


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.4f}"
    return f"{np.mean(values):.4f} ({min(values):.4f}-{max(values):.4f})"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--data-root", required=True, type=Path)
    ap.add_argument("--category", required=True)
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--image-size", type=int, help="[default: the recipe's, as `sanf extract`]")
    ap.add_argument("--cache", type=Path, help="[default: benchmarks/.work/cache/<category>-<backbone>]")
    ap.add_argument("--reference-cache", type=Path, help="a second cache whose patch-knn is a baseline row")
    ap.add_argument("--reference-label", default="patch-knn, reference cache")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--other-part-seeds", default="0", help="seeds where the local part the default does not use is "
                    "also fitted (the patch flow costs minutes a fit on a CPU)")
    ap.add_argument("--fusion-ablation", action="store_true", help="also the patch flow without class-token context")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, help="run folders [default: benchmarks/.work/runs/<cache name>]")
    ap.add_argument("--markdown", type=Path)
    ap.add_argument("--json", type=Path, help="also write every number as JSON")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    here = Path(__file__).resolve().parent
    args.cache = args.cache or here / ".work" / "cache" / f"{args.category}-{args.backbone}"
    out = args.out or here / ".work" / "runs" / Path(args.cache).name
    seeds = [int(s) for s in args.seeds.split(",")]

    from sanf_pipeline.cache import open_cache
    from sanf_pipeline.models import create_baseline

    t0 = time.perf_counter()
    extract_s = ensure_cache(args)
    with open_cache(args.cache) as c:
        good = c.class_index(NORMAL)
        train_cls, train_patch = c.split("train").read_class(good, patch=True)
        test = c.split("test")
        test_cls, test_patch = test.read(0, test.n, patch=True)
        labels, ids, bb = test.labels, test.sample_ids, c.backbone
        grid, dim, patch_dim = c.meta.get("grid"), c.dim, c.patch_dim
    y = (labels != good).astype(int)
    half = halves(labels, ids)

    rows: dict[str, list[dict[str, float]]] = {}

    def add(name, scores, seed=None):
        rows.setdefault(name, []).append({"seed": seed, **{h: auroc(y[r], scores[r]) for h, r in half.items()}})

    per_seed = []
    other_seeds = {int(s) for s in args.other_part_seeds.split(",") if s.strip()}
    for seed in seeds:
        res = run_seed(args.cache, NORMAL, seed, train_cls, train_patch, test_cls, test_patch, out,
                       device=args.device, parts=None if seed in other_seeds else ())
        per_seed.append(res)
        for name, s in res["scores"].items():
            add(name, s, seed)
    extra = {}
    if args.fusion_ablation:
        from sanf_pipeline.models.patchflow import PatchFlow

        for cond in ("class+position", "position"):
            m = PatchFlow(condition=cond, seed=0).fit(train_cls, train_patch, device=args.device)
            s, _ = timed_scores(m, test_cls, test_patch)
            add(f"patch-flow alone, condition {cond} (seed 0)", s)
            extra[cond] = min(m.history)
    base_s = {}
    for method in (*CLASS_BASELINES, "patch-knn"):
        t = time.perf_counter()
        m = create_baseline(method).fit(train_cls, train_patch if method == "patch-knn" else None,
                                        device=args.device)
        add(f"baseline {method}", timed_scores(m, test_cls, test_patch if method == "patch-knn" else None)[0])
        base_s[method] = time.perf_counter() - t
    if args.reference_cache:
        with open_cache(args.reference_cache) as rc:
            g = rc.class_index(NORMAL)
            rcls, rpatch = rc.split("train").read_class(g, patch=True)
            rt = rc.split("test")
            if list(rt.sample_ids) != list(ids):
                raise SystemExit("the reference cache's test split lists other images")
            tcls, tpatch = rt.read(0, rt.n, patch=True)
        m = create_baseline("patch-knn").fit(rcls, rpatch, device=args.device)
        add(f"baseline {args.reference_label}", timed_scores(m, tcls, tpatch)[0])

    # the table
    default_local, default_rule = per_seed[0].get("default_local"), per_seed[0].get("default_rule")
    title = f"{args.category}, {bb.get('arch')} ({bb.get('recipe') or 'layer ' + str(bb.get('layer'))})"
    lines = [f"## {title}", "",
             f"{time.strftime('%Y-%m-%d')}. Command: `{command_line('quality_industrial.py', argv)}`", "",
             f"Cache: class token d={dim} (layer {bb.get('layer')}), patch tokens d={patch_dim} "
             f"(layer {bb.get('patch_layer', bb.get('layer'))}) on a {grid} grid, {bb.get('image_size')} px. "
             f"{len(train_cls)} normal training images; test {len(y)} images, selection half {len(half['selection'])} "
             f"({int(y[half['selection']].sum())} anomalous), report half {len(half['report'])} "
             f"({int(y[half['report']].sum())} anomalous). Default detector of this checkout: flow + {default_local}, "
             f"rule {default_rule}. Seeds {args.seeds}: mean (min-max).", "",
             "| detector | selection half AUROC | report half AUROC |", "|---|---|---|"]
    for name, vals in rows.items():
        some = [v["seed"] for v in vals if v["seed"] is not None]
        if some and len(some) < len(seeds):
            name = f"{name} (seed {','.join(map(str, some))})"
        lines.append(f"| {name} | {_fmt([v['selection'] for v in vals])} | {_fmt([v['report'] for v in vals])} |")
    r0 = per_seed[0]
    fit_time = np.mean([r["fit_s"] for r in per_seed])
    cost = [(f"default fit (flow + its local part) {fit_time:.0f} s per seed" if fit_time >= 1 else
             "default fit (flow + its local part): finished runs reused (not timed here)") + "; the "
            f"class-token flow's best epoch per seed {[r['best_epoch'] for r in per_seed]} (0 = the untrained flow, "
            f"the whitened Gaussian, kept by held-out NLL)"]
    for name in ("patch-knn", "patch-flow"):
        if f"{name} model bytes" in r0:
            fit_s = [r[f"{name} fit s"] for r in per_seed if r.get(f"{name} fit s") is not None]
            per_image = [r[f"{name} s/image"] for r in per_seed if f"{name} s/image" in r]
            cost.append(f"{name}: model {r0[f'{name} model bytes'] / 2**20:.2f} MiB, scoring "
                        f"{1e3 * np.mean(per_image):.1f} ms/image" + (f", fit {np.mean(fit_s):.0f} s" if fit_s else ""))
    if "patch-flow settings" in r0:
        st = r0["patch-flow settings"]
        best = [r["patch-flow settings"]["best_epoch"] for r in per_seed if "patch-flow settings" in r]
        cost.append(f"patch-flow: best epoch {best} of "
                    f"{st['epochs_run'] - 1} run, {st['parameters']} parameters, held-out token NLL "
                    f"{st['held_out_nll'][0]} -> {min(st['held_out_nll'])} nats (seed {seeds[0]})")
    if extra:
        cost.append("fusion ablation, best held-out token NLL (seed 0): with class token "
                    f"{extra['class+position']:.3f}, position only {extra['position']:.3f} nats")
    cost.append(f"extraction in this invocation {extract_s:.0f} s; total {time.perf_counter() - t0:.0f} s "
                f"(2 shared CPU cores)")
    lines += ["", *(f"- {c}" for c in cost), ""]
    section = "\n".join(lines)
    print(section)
    if args.markdown:
        upsert_section(args.markdown, title, section, HEADER)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cost": cost}, indent=1))
    return 0


HEADER = f"""# Quality on inspection sets (MVTec layout): the default detector and its candidates

Produced by `benchmarks/quality_industrial.py` (its docstring says what it runs); one section per data set and
backbone with the exact command. Normal class `good`; image AUROC with the anomalies positive. Halves: {HALVES_RULE}.
Every default is chosen on the selection half; quote the report half. Rows: `default` = `sanf fit` with the
checkout's defaults; `flow` = its class-token flow NLL alone; `patch-knn`/`patch-flow` = a local part alone, fitted
on the same rows; `flow R part` = the two combined by rule R (`sum`/`max` of the held-out-standardised scores,
`fisher` = Fisher's combination of their split-conformal p-values); `baseline ...` = `sanf baseline` methods fitted
on all training images.
"""


if __name__ == "__main__":
    raise SystemExit(main())
