"""Tables (markdown) and PNG plots from result files and metrics; no scoring here.

Plots use matplotlib's object API with the Agg canvas (no pyplot, no global backend switch), so they work
headless and from worker processes.

- ``plot_score_histograms(path, is_anomaly, scores, ...)``: normal vs anomalous score histograms (the paper's
  Figure 4), with the decision threshold as a vertical line.
- ``plot_roc(path, is_anomaly, scores, ...)``: the ROC curve with its AUROC, the 5% FPR line and the threshold's
  operating point.
- ``write_plots(out_dir, is_anomaly, scores, metrics)``: both, as ``score_hist.png`` and ``roc.png``.
- ``write_run_report(out_dir, metrics, train_log=None, plots=...)``: ``report.md`` of one run.
- ``markdown_table(rows, columns)``: a markdown table (used by sweeps for side-by-side comparisons).
- ``summary_csv``, ``summary_markdown``, ``plot_heatmap``: a sweep's tables and class x setting AUROC heatmap
  (from ``sweep.summary.summarize``).
"""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np

from ..store.atomic import write_text_atomic
from ..store.run_folder import HIST_PNG, REPORT_FILE, ROC_PNG


def _figure(width=6.0, height=4.0):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save_png(fig, path) -> Path:
    """Write a figure so that a reader never sees half a PNG."""
    import os

    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def plot_score_histograms(path, is_anomaly, scores, *, title: str = "", score_name: str = "score",
                          bins: int = 50, threshold: float | None = None) -> Path:
    """Normal vs anomalous score histograms (density), the paper's Figure 4; ``threshold``: a vertical line where
    the run's decision is (at the edge, with its value, when it lies outside the plotted range)."""
    y = np.asarray(is_anomaly, bool)
    s = np.asarray(scores, np.float64)
    fig = _figure()
    ax = fig.add_subplot(1, 1, 1)
    lo, hi = (float(np.percentile(s, 0.5)), float(np.percentile(s, 99.5))) if len(s) else (0.0, 1.0)
    if not hi > lo:
        lo, hi = lo - 0.5, hi + 0.5
    edges = np.linspace(lo, hi, bins + 1)
    clipped = np.clip(s, lo, hi)
    for mask, label, color in ((~y, "normal", "tab:blue"), (y, "anomalous", "tab:red")):
        if mask.any():
            ax.hist(clipped[mask], bins=edges, density=True, alpha=0.55, color=color,
                    label=f"{label} (n={int(mask.sum())})")
    if threshold is not None and math.isfinite(threshold):
        where = "" if lo <= threshold <= hi else (" (beyond the plotted range)")
        ax.axvline(min(max(threshold, lo), hi), color="black", linestyle="--", linewidth=1.2,
                   label=f"threshold {threshold:.4g}{where}")
    ax.set_xlabel(f"{score_name} (clipped to the 0.5-99.5 percentile range)")
    ax.set_ylabel("density")
    ax.set_title(title or "anomaly scores")
    ax.legend()
    return save_png(fig, path)


def plot_roc(path, is_anomaly, scores, *, title: str = "", auroc: float | None = None,
             operating_point: tuple[float, float] | None = None) -> Path:
    """The ROC curve; ``operating_point``: the (FPR, TPR) the threshold gives on these scores, marked on it."""
    from sklearn.metrics import roc_auc_score, roc_curve

    y = np.asarray(is_anomaly, bool)
    s = np.asarray(scores, np.float64)
    fpr, tpr, _ = roc_curve(y, s)
    auroc = float(roc_auc_score(y, s)) if auroc is None else auroc
    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(fpr, tpr, color="tab:red", label=f"AUROC {auroc:.4f}")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.axvline(0.05, color="grey", linestyle="--", linewidth=0.8, label="5% FPR")
    if operating_point is not None and None not in operating_point:
        ax.plot([operating_point[0]], [operating_point[1]], marker="o", color="black", linestyle="none",
                clip_on=False, zorder=5, label=f"threshold: FPR {operating_point[0]:.3f}, TPR {operating_point[1]:.3f}")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_xlabel("false positive rate (normal flagged)")
    ax.set_ylabel("true positive rate (anomalies caught)")
    ax.set_title(title or "ROC, anomalies positive")
    ax.legend(loc="lower right")
    return save_png(fig, path)


def _title(metrics: dict) -> str:
    return (f"{metrics.get('method', '?')} | normal class {metrics.get('normal_class_name', '?')} "
            f"({metrics.get('normal_class', '?')})")


def write_plots(out_dir, is_anomaly, scores, metrics: dict) -> dict[str, Path]:
    """``score_hist.png`` and ``roc.png``, both marking the threshold of ``metrics`` when there is one."""
    out_dir = Path(out_dir)
    title = _title(metrics)
    thr = metrics.get("threshold") or {}
    realised = thr.get("realised") or {}
    point = (realised["fpr"], realised["tpr"]) if "fpr" in realised and "tpr" in realised else None
    return {
        "hist": plot_score_histograms(out_dir / HIST_PNG, is_anomaly, scores, title=title,
                                      score_name=str(metrics.get("score", "score")), threshold=thr.get("value")),
        "roc": plot_roc(out_dir / ROC_PNG, is_anomaly, scores, title=title, auroc=metrics.get("auroc"),
                        operating_point=point),
    }


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.4g}"
    if v is None:
        return ""
    return str(v)


def markdown_table(rows: list[dict], columns: list[str] | None = None) -> str:
    if not rows:
        return ""
    columns = columns or list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        lines.append("| " + " | ".join(_fmt(r.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines) + "\n"


def run_report_markdown(metrics: dict, train_log: list[dict] | None = None, plots: dict | None = None) -> str:
    m = metrics
    out = [f"# {m.get('method', 'result')}: normal class {m.get('normal_class_name')} ({m.get('normal_class')})", ""]
    out.append(markdown_table([{"AUROC": m.get("auroc"), "AUPR": m.get("aupr"), "TPR@5%FPR": m.get("tpr_at_5_fpr"),
                                "n_test": m.get("n_test"), "n_anomalous": m.get("n_anomalous")}]))
    out += [f"- score: `{m.get('score')}`" + (f" ({m['score_description']})" if m.get("score_description") else ""),
            "- anomalies are the positive class; anomalous = test label differs from the normal class",
            f"- epoch selection: {m.get('epoch_selection')}"]
    n_val = m.get("n_val")
    if m.get("n_train") is not None and n_val:
        m = {**m, "n_train": f"{m['n_train']} ({m['n_train'] - n_val} fitted, {n_val} held out for early stopping)"}
    for key, label in (("best_epoch", "reported epoch"), ("epochs_run", "epochs trained"),
                       ("n_train", "training samples"), ("cache", "cache"), ("cache_fingerprint", "cache fingerprint"),
                       ("run", "run folder")):
        if m.get(key) is not None:
            out.append(f"- {label}: {m[key]}")
    if m.get("n_nonfinite_scores"):
        out.append(f"- **{m['n_nonfinite_scores']} non-finite score(s)**, counted as the most anomalous")
    out += threshold_lines(m)
    out += localisation_lines(m.get("localisation"), (plots or {}).get("maps"))
    settings = m.get("fit") or m.get("settings")
    if settings:
        out += ["", "## Settings", "", "```", *(f"{k}: {v}" for k, v in sorted(settings.items())), "```"]
    if train_log:
        out += ["", "## Training log", "",
                "train_loss and val_nll are the NLL per feature dimension (nats / d, so about 1); the `nll` score "
                "is the whole -log p(x) in nats, summed over the d dimensions, so about d times larger.", "",
                markdown_table(train_log, ["epoch", "train_loss", "val_nll", "samples_per_s", "seconds"])]
    if plots:
        out += ["", "## Plots", ""]
        if plots.get("hist"):
            out.append(f"![normal vs anomalous scores]({plots['hist']})")
        if plots.get("roc"):
            out.append(f"![ROC curve]({plots['roc']})")
    return "\n".join(out).rstrip() + "\n"


def threshold_lines(m: dict) -> list[str]:
    """The report's threshold section: the calibrated threshold and, for comparison, the test-selected one."""
    thr, best = m.get("threshold"), m.get("f1_optimal_threshold")
    if not thr and not best:
        return []
    rows = []
    if thr:
        r = thr["realised"]
        explicit = thr.get("explicit")
        rows.append({"threshold": "set with --threshold" if explicit else f"calibrated, target FPR "
                                                                          f"{thr['target_fpr']:g}",
                     "value": thr["value"], "FPR": r["fpr"], "TPR": r["tpr"], "precision": r["precision"],
                     "F1": r["f1"], "selected on": "the user" if explicit else
                     f"{thr['n_calibration']} held-out normal training images"})
    if best:
        rows.append({"threshold": "F1-optimal", "value": best["threshold"], "FPR": best["fpr"], "TPR": best["tpr"],
                     "precision": best["precision"], "F1": best["f1"],
                     "selected on": "**the test set** (comparison only)"})
    out = ["", "## Threshold (anomalous = score > value)", "", markdown_table(rows)]
    if thr and thr.get("explicit") and thr.get("held_out_fpr") is not None:
        out.append(f"- {100 * thr['held_out_fpr']:.3g}% of the {thr['n_calibration']} held-out normal training "
                   f"images score above this threshold")
    elif thr and thr.get("note"):
        out.append(f"- {thr['note']}")
    elif thr and not thr.get("guaranteed", True):  # metrics.json of an older sanf: no note recorded
        out.append(f"- {thr['n_calibration']} held-out images cannot guarantee FPR {thr['target_fpr']:g} (needs "
                   f">= {thr['min_n_for_target']}); the threshold is their largest score (FPR bound "
                   f"{thr['fpr_bound']:.3g})")
    return out


def localisation_lines(loc: dict | None, grid: str | None = None) -> list[str]:
    """The report's localisation section: pixel AUROC and AUPRO overall and per defect type, the pixel threshold and
    its predicted regions, the overlay grid."""
    if not loc:
        return []
    out = ["", "## Localisation (anomaly maps)", ""]
    if not loc.get("maps"):
        return out + [f"- no maps: {loc.get('reason')}"]
    if "pixel_auroc" in loc:
        rows = [{"defect type": "all", "pixel AUROC": loc["pixel_auroc"], f"AUPRO@{loc['max_fpr']:g}": loc["aupro"],
                 "images": loc["n_images"], "regions": loc["n_regions"]}]
        rows += [{"defect type": t, "pixel AUROC": v["pixel_auroc"], f"AUPRO@{loc['max_fpr']:g}": v["aupro"],
                  "images": v["n_images"], "regions": v["n_regions"]} for t, v in loc["per_defect"].items()]
        out += [markdown_table(rows), "",
                f"- {loc['resolution_rule']} (here {loc['resolution'][0]}x{loc['resolution'][1]}); blur sigma "
                f"{loc['sigma']:g} px at the {loc['input_size'][0]}x{loc['input_size'][1]} input; per defect type: "
                f"its images and every normal test image"]
        if loc.get("n_without_mask"):
            out.append(f"- {loc['n_without_mask']} anomalous test image(s) have no mask and are left out")
        if loc.get("n_defect_masks_empty"):
            out.append(f"- {loc['n_defect_masks_empty']} anomalous image(s) have a mask too small to cover half an "
                       f"evaluation pixel (no defective pixel at this resolution)")
    else:
        out.append(f"- no pixel metrics: {loc.get('pixel_metrics')}")
    thr = loc.get("pixel_threshold")
    if thr:
        out.append(f"- pixel threshold {thr['value']:.6g} (rule {thr['rule']}: {thr.get('rule_text', '')}; from "
                   f"{thr.get('n_images', thr['n_calibration'])} held-out normal images' maps)")
    if loc.get("predicted_regions"):
        out += ["", markdown_table([{"pixel rule": r, "threshold": q["threshold"], "mean IoU": q["mean_iou"],
                                     "mean Dice": q["mean_dice"], "normal images with a region":
                                         q["normal_images_with_region"]}
                                    for r, q in loc["predicted_regions"].items()])]
    if loc.get("pixel_threshold_missing"):
        out.append(f"- no pixel threshold: {loc['pixel_threshold_missing']}")
    if grid:
        out += ["", "Most anomalous, borderline and normal test images (colour: the map; white contour: the predicted "
                "region; magenta contour: the ground truth):", "", f"![anomaly maps]({grid})"]
    elif loc.get("overlays"):
        out.append(f"- no overlays: {loc['overlays']}")
    return out


def write_run_report(out_dir, metrics: dict, *, train_log: list[dict] | None = None,
                     plots: dict | None = None) -> Path:
    path = Path(out_dir) / REPORT_FILE
    write_text_atomic(path, run_report_markdown(metrics, train_log, plots))
    return path


# ------------------------------------------------------------------------------------------ sweep reports
CSV_DECIMALS = 6


def _pm(mean, std) -> str:
    if mean is None:
        return "missing"
    return f"{mean:.4f}" + (f" ± {std:.4f}" if std is not None else "")


def class_label(index: int, name: str) -> str:
    """``3 cat``; just ``3`` where the name is the index (digits, MNIST)."""
    return str(name) if str(name) == str(index) else f"{index} {name}"


def summary_csv(summary: dict) -> str:
    """``summary.csv`` of a sweep summary: one row per setting x class, then the setting's M-AUROC."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["setting", "method", "class_index", "class_name", "n_runs", "n_planned", "auroc_mean", "auroc_std",
                "aupr_mean", "tpr_at_5_fpr_mean", "aurocs_per_seed"])

    def f(v):  # 6 decimals: far finer than any AUROC difference a test split resolves, and no float noise
        return "" if v is None else repr(round(float(v), CSV_DECIMALS))

    for setting in summary["settings"]:
        for c in summary["classes"]:
            cell = summary["cells"][setting][c["name"]]
            w.writerow([setting, summary["m_auroc"][setting]["method"], c["index"], c["name"], cell["n_runs"],
                        cell["n_planned"], f(cell["auroc_mean"]), f(cell["auroc_std"]), f(cell["aupr_mean"]),
                        f(cell["tpr_at_5_fpr_mean"]), ";".join(f(a) for a in cell["aurocs"])])
        m = summary["m_auroc"][setting]
        w.writerow([setting, m["method"], "", "M-AUROC", m["n_classes"], len(summary["classes"]), f(m["mean"]),
                    f(m["std_over_seeds"]), "", "", ";".join(f(v) for v in m["per_seed"].values())])
    return buf.getvalue()


def summary_markdown(summary: dict, heatmap: str = "heatmap.png") -> str:
    """``summary.md`` of a sweep summary (``sweep.summary.summarize``)."""
    settings = summary["settings"]
    name = str(summary["sweep"])
    out = ["# Sweep summary" + ("" if name.lower() == "sweep" else f": {name}"), "",
           f"- cache: {summary['cache']} (fingerprint {summary['cache_fingerprint']})",
           f"- runs finished: {summary['n_finished']} of {summary['n_runs']}",
           f"- flow score: `{summary['score']}`; anomalies (test label != normal class) are the positive class",
           f"- methods: {', '.join(summary.get('methods') or [])}; seeds: "
           f"{', '.join(map(str, summary.get('seeds') or []))} (baselines are seed-independent: one run per class)",
           f"- grid: {json.dumps(summary.get('grid') or {})}; fixed settings: {json.dumps(summary.get('fixed') or {})}",
           "- cells: AUROC, mean ± sample std over seeds; M-AUROC: mean over classes", "",
           "## AUROC per class and setting", ""]
    rows = []
    for c in summary["classes"]:
        row = {"class": class_label(c["index"], c["name"])}
        for s in settings:
            cell = summary["cells"][s][c["name"]]
            row[s] = _pm(cell["auroc_mean"], cell["auroc_std"])
        rows.append(row)
    rows.append({"class": "**M-AUROC**", **{s: _pm(summary["m_auroc"][s]["mean"],
                                                    summary["m_auroc"][s]["std_over_seeds"]) for s in settings}})
    out.append(markdown_table(rows, ["class", *settings]))
    ranked = sorted(settings, key=lambda s: -(summary["m_auroc"][s]["mean"] if summary["m_auroc"][s]["mean"]
                                               is not None else -math.inf))
    out += ["## Settings by M-AUROC", "",
            markdown_table([{"rank": i + 1, "setting": s, "M-AUROC": summary["m_auroc"][s]["mean"],
                             "std over seeds": summary["m_auroc"][s]["std_over_seeds"],
                             "classes": summary["m_auroc"][s]["n_classes"]} for i, s in enumerate(ranked)],
                           ["rank", "setting", "M-AUROC", "std over seeds", "classes"]),
            f"![AUROC heatmap]({heatmap})", ""]
    missing = [r["run_id"] for r in summary["runs"] if r["status"] != "finished"]
    if missing:
        out += [f"**{len(missing)} run(s) not finished**: {', '.join(missing[:20])}"
                + (" ..." if len(missing) > 20 else ""), ""]
    return "\n".join(out)


def plot_heatmap(path, summary: dict) -> Path:
    """Class x setting AUROC (mean over seeds), the M-AUROC as the last row; written atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    settings = summary["settings"]
    names = [c["name"] for c in summary["classes"]]
    grid = np.full((len(names) + 1, len(settings)), np.nan)
    for j, s in enumerate(settings):
        for i, n in enumerate(names):
            v = summary["cells"][s][n]["auroc_mean"]
            grid[i, j] = np.nan if v is None else v
        m = summary["m_auroc"][s]["mean"]
        grid[-1, j] = np.nan if m is None else m
    fig = Figure(figsize=(max(4.0, 1.0 + 1.1 * len(settings)), max(3.0, 0.8 + 0.42 * (len(names) + 1))), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    finite = grid[np.isfinite(grid)]
    lo = float(finite.min()) if finite.size else 0.5
    hi = float(finite.max()) if finite.size else 1.0
    if not hi > lo:
        lo, hi = lo - 0.01, hi + 0.01
    im = ax.imshow(np.ma.masked_invalid(grid), cmap="viridis", vmin=lo, vmax=hi, aspect="auto")
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels([s.replace(" ", "\n") for s in settings], fontsize=8)
    ax.set_yticks(range(len(names) + 1))
    ax.set_yticklabels([*names, "M-AUROC"], fontsize=8)
    ax.axhline(len(names) - 0.5, color="white", linewidth=2)
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            v = grid[i, j]
            text = "—" if not np.isfinite(v) else f"{v:.3f}"
            dark = np.isfinite(v) and (v - lo) / (hi - lo) > 0.6
            ax.text(j, i, text, ha="center", va="center", fontsize=7, color="black" if dark else "white")
    name = str(summary["sweep"])
    ax.set_title("AUROC" + ("" if name.lower() == "sweep" else f", sweep {name}") + " (mean over seeds)", fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04)
    return save_png(fig, path)


