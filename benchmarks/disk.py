"""What runs cost on disk: the files of one `sanf fit` + `sanf eval` run and of a sweep run (no model) for the
default flow on the feature shapes of the project's backbones, measured by writing them.

    python benchmarks/disk.py --markdown benchmarks/disk.md

Each shape gets a synthetic cache (the cache's own size is d x (T + 1) x 2 bytes per image in float16, and is
reported from that formula and, where given with --cache, measured with `du`), a 1-epoch default fit (model size
does not depend on the number of epochs or of training images) and an evaluation on ``--n-test`` test rows
without plots and with them. File sizes are bytes on disk of the files themselves (``stat``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# (name, d, patch tokens T): the former demo (DINOv2 ViT-S/14, 56 px), DINOv2 ViT-S/14 224 px, EfficientNet-Lite0
SHAPES = (("DINOv2 ViT-S/14, 56 px (the former demo)", 384, 16), ("DINOv2 ViT-S/14, 224 px", 384, 256),
          ("EfficientNet-Lite0, 224 px", 1280, 49))


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def measure(name: str, d: int, t: int, n_test: int, root: Path) -> dict:
    from sanf_pipeline.cache.synthetic import write_synthetic_cache
    from sanf_pipeline.jobs.api import eval_run, fit_run
    from sanf_pipeline.train.config import FitConfig

    cache = write_synthetic_cache(root / f"c{d}-{t}", n_classes=2, n_train=40, n_test=n_test // 2, dim=d,
                                  num_tokens=t, dtype="float16")
    cfg = FitConfig(early_stopping=False, epochs=1, device="cpu")
    run = fit_run(cache, 0, cfg, root / f"r{d}-{t}", quiet=True)
    eval_run(run.run_dir, plots=True)
    files = {p.name: p.stat().st_size for p in sorted(run.run_dir.iterdir()) if p.is_file()}
    model = files.get("model.safetensors", 0)
    plots = sum(v for k, v in files.items() if k.endswith(".png"))
    return {"name": name, "d": d, "t": t, "files": files, "model": model, "plots": plots,
            "total": sum(files.values()), "cache_per_image": d * (t + 1) * 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-test", type=int, default=1000, help="test rows scored (scores.csv grows with them)")
    ap.add_argument("--cache", action="append", default=[], help="real caches to measure with du (repeatable)")
    ap.add_argument("--markdown", type=Path, help="write the tables here")
    args = ap.parse_args()
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [measure(n, d, t, args.n_test, Path(tmp)) for n, d, t in SHAPES]
    lines = ["# Disk: what runs cost", "", f"Command: `python benchmarks/disk.py --n-test {args.n_test}"
             + "".join(f" --cache {c}" for c in args.cache) + " --markdown benchmarks/disk.md`", "",
             f"A default flow run (`sanf fit` defaults, 1 epoch; {args.n_test} test rows scored; bytes of the files "
             "in the run folder). A sweep run without `--keep-models` keeps everything but `model.safetensors`.", "",
             "| features | d | T | model.safetensors | run without model (plots) | run with model | cache per image |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['d']} | {r['t']} | {_mb(r['model'])} | {_mb(r['total'] - r['model'])} "
                     f"({_mb(r['plots'])}) | {_mb(r['total'])} | {_mb(r['cache_per_image'])} |")
    lines += ["", "Files of the EfficientNet-Lite0 run:", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in rows[-1]["files"].items()]
    for c in args.cache:
        du = subprocess.run(["du", "-sb", c], capture_output=True, text=True).stdout.split()[0]
        lines += ["", f"`du -sb {c}`: {_mb(int(du))}"]
    lines += ["", f"Measured in {time.time() - t0:.0f} s on {os.cpu_count()} cores."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
