"""The summary of a sweep from the files on disk (``plan.json`` + each run's ``metrics.json``; no scoring):
AUROC per class x setting (mean +- std over seeds), M-AUROC = mean over classes. The tables and the heatmap are
rendered by ``evaluate/report.py``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .plan import FLOW, HEATMAP_PNG, RUNS_DIR, SUMMARY_CSV, SUMMARY_JSON, SUMMARY_MD, RunSpec, is_finished, read_plan


# -------------------------------------------------------------------------------------------------- summary
def _mean(xs):
    return float(np.mean(xs)) if xs else None


def _std(xs):
    return float(np.std(xs, ddof=1)) if len(xs) >= 2 else None


def summarize(sweep_dir) -> dict:
    """The summary of a sweep from the files on disk (plan.json + each run's metrics.json); no scoring."""
    from ..cache.schema import read_json_file
    from ..store.run_folder import METRICS_FILE

    sweep_dir = Path(sweep_dir)
    plan = read_plan(sweep_dir)
    ident = plan.get("identity") or {}
    fp, score = ident.get("cache_fingerprint"), ident.get("score")
    specs = [RunSpec.from_dict(r) for r in plan["runs"]]
    classes = list(dict.fromkeys((s.class_index, s.class_name) for s in specs))
    settings = list(dict.fromkeys(s.setting for s in specs))
    methods = {s.setting: s.method for s in specs}
    rows = []
    for s in specs:
        run_dir = sweep_dir / RUNS_DIR / s.run_id
        row = {"run_id": s.run_id, "class_index": s.class_index, "class_name": s.class_name, "method": s.method,
               "setting": s.setting, "seed": s.seed, "status": "missing", "auroc": None, "aupr": None,
               "tpr_at_5_fpr": None, "n_train": None, "epochs_run": None, "best_epoch": None}
        if is_finished(run_dir, s, fp, score):
            m = read_json_file(run_dir / METRICS_FILE)
            row.update({k: m.get(k) for k in ("auroc", "aupr", "tpr_at_5_fpr", "n_train", "epochs_run",
                                              "best_epoch")})
            row["status"] = "finished"
        rows.append(row)
    cells: dict[str, dict[str, dict]] = {}
    for setting in settings:
        cells[setting] = {}
        for ci, cname in classes:
            mine = [r for r in rows if r["setting"] == setting and r["class_index"] == ci]
            done = [r for r in mine if r["status"] == "finished"]
            au = [r["auroc"] for r in done]
            cells[setting][cname] = {
                "auroc_mean": _mean(au), "auroc_std": _std(au), "n_runs": len(done), "n_planned": len(mine),
                "aurocs": au, "seeds": [r["seed"] for r in done],
                "aupr_mean": _mean([r["aupr"] for r in done]),
                "tpr_at_5_fpr_mean": _mean([r["tpr_at_5_fpr"] for r in done])}
    m_auroc = {}
    for setting in settings:
        per_class = [cells[setting][cn]["auroc_mean"] for _, cn in classes]
        complete = all(v is not None for v in per_class)
        # per seed: the mean over classes of that seed's runs (only seeds finished for every class)
        seeds = [r["seed"] for r in rows if r["setting"] == setting]
        per_seed = {}
        for seed in dict.fromkeys(seeds):
            vals = [r["auroc"] for r in rows if r["setting"] == setting and r["seed"] == seed
                    and r["status"] == "finished"]
            if len(vals) == len(classes):
                per_seed[str(seed)] = float(np.mean(vals))
        m_auroc[setting] = {"mean": _mean([v for v in per_class if v is not None]) if complete else None,
                            "std_over_seeds": _std(list(per_seed.values())) if methods[setting] == FLOW else None,
                            "per_seed": per_seed, "n_classes": sum(v is not None for v in per_class),
                            "complete": complete, "method": methods[setting]}
    n_done = sum(r["status"] == "finished" for r in rows)
    return {"format": "sanf-sweep-summary", "sweep": sweep_dir.name, "cache": (plan.get("cache") or {}).get("path"),
            "cache_fingerprint": fp, "score": score, "classes": [{"index": i, "name": n} for i, n in classes],
            "settings": settings, "grid": plan.get("grid"), "fixed": plan.get("fixed"), "seeds": plan.get("seeds"),
            "methods": plan.get("methods"), "n_runs": len(rows), "n_finished": n_done, "cells": cells,
            "m_auroc": m_auroc, "runs": rows,
            "notes": {"m_auroc": "mean over classes of the per-class AUROC (mean over seeds)",
                      "std": "sample standard deviation (ddof=1) over seeds; none with one seed or for baselines",
                      "auroc": "anomalies (test label != normal class) are the positive class"}}




def _refuse_foreign_summary(out: Path) -> None:
    """`sanf report --out`: replace summary files only where a summary.json of sanf's says they are sanf's."""
    from ..cache.schema import read_json_file
    from ..errors import SanfError

    names = (SUMMARY_CSV, SUMMARY_JSON, SUMMARY_MD, HEATMAP_PNG)
    taken = [n for n in names if (out / n).exists() or (out / n).is_symlink()]
    if not taken:
        return
    try:
        ours = read_json_file(out / SUMMARY_JSON).get("format") == "sanf-sweep-summary"
    except (SanfError, AttributeError):
        ours = False
    if not ours:
        raise SanfError(f"{out} holds {', '.join(taken[:3])}, which sanf did not write and would replace; sanf never "
                        f"overwrites files it did not make: choose another --out")


def write_summary(sweep_dir, out=None) -> dict:
    """(Re-)render summary.csv, summary.json, summary.md and heatmap.png from the run folders on disk, into
    ``out`` (default: the sweep folder)."""
    from ..errors import SanfError
    from ..store.atomic import write_json_atomic, write_text_atomic

    sweep_dir = Path(sweep_dir)
    from ..evaluate.report import plot_heatmap, summary_csv, summary_markdown

    summary = summarize(sweep_dir)
    out = Path(out) if out is not None else sweep_dir
    if out != sweep_dir:
        _refuse_foreign_summary(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SanfError(f"cannot create {out}: {exc.strerror or exc}; choose another --out") from None
    write_text_atomic(out / SUMMARY_CSV, summary_csv(summary))
    write_json_atomic(out / SUMMARY_JSON, summary)
    write_text_atomic(out / SUMMARY_MD, summary_markdown(summary, HEATMAP_PNG))
    plot_heatmap(out / HEATMAP_PNG, summary)
    return summary

