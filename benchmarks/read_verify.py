"""Cost of checking shard checksums on every cache read (sanf_pipeline/cache/reader.py) against a stage-two run.

Writes a synthetic float16 cache shaped like the demo's and the CIFAR-10 protocol's DINOv2 caches (d 384, 16 patch
tokens, 10 classes), then in one process, one torch thread:
  * reads what one `sanf fit` + `sanf eval` reads (one class's train block, the whole test split) from a freshly
    opened cache, with and without verification, alternating, `--repeats` times (median);
  * times one `fit_run` + `eval_run` of the default flow with a single epoch (a lower bound on a run, so the
    percentage printed is an upper bound) and reports the verification's extra seconds as a share of it.

    python benchmarks/read_verify.py --markdown benchmarks/read_verify.md
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sanf_pipeline.cache import open_cache
from sanf_pipeline.cache.synthetic import write_synthetic_cache


def read_like_a_run(cache: Path, verify: bool) -> float:
    t = time.perf_counter()
    c = open_cache(cache, verify=verify)
    c.split("train").read_class(3)
    c.split("test").read_all()
    c.close()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n-train", type=int, default=1000, help="train rows per class")
    ap.add_argument("--n-test", type=int, default=1000, help="test rows per class")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args()
    torch.set_num_threads(1)
    from sanf_pipeline.evaluate.metrics import eval_run
    from sanf_pipeline.train.config import FitConfig
    from sanf_pipeline.train.fit import fit_run

    with tempfile.TemporaryDirectory() as tmp:
        cache = write_synthetic_cache(Path(tmp) / "cache", n_classes=10, n_train=args.n_train, n_test=args.n_test,
                                      dim=384, num_tokens=16, dtype="float16")
        on, off = [], []
        for _ in range(args.repeats):
            off.append(read_like_a_run(cache, False))
            on.append(read_like_a_run(cache, True))
        t_off, t_on = statistics.median(off), statistics.median(on)
        c = open_cache(cache, verify=False)
        blocks = [c.split("train")._array(k)[...] for k in ("cls", "patch", "valid")] + \
            [c.split("test")._array(k)[...] for k in ("cls", "patch", "valid")]
        hashes = []
        for _ in range(args.repeats):  # the checking's own CPU work, free of the read's noise under load
            t = time.perf_counter()
            for b in blocks:
                hashlib.sha256(b.tobytes()).hexdigest()
            hashes.append(time.perf_counter() - t)
        t_hash, hashed_mb = statistics.median(hashes), sum(b.nbytes for b in blocks) / 2**20
        t = time.perf_counter()
        run = fit_run(cache, 3, FitConfig(early_stopping=False, epochs=1, device="cpu"), Path(tmp) / "run",
                      quiet=True)
        eval_run(run.run_dir, device="cpu", plots=False)
        t_run = time.perf_counter() - t
    mb = (args.n_train + 10 * args.n_test) * 17 * 384 * 2 / 2**20
    lines = [
        f"reads of one fit + eval ({args.n_train} train rows of one class + {10 * args.n_test} test rows, "
        f"{mb:.0f} MB float16, median of {args.repeats}): {t_off:.3f} s unchecked, {t_on:.3f} s checked "
        f"(ratio {t_on / t_off:.2f}x, +{t_on - t_off:.3f} s)",
        f"sha256 of every row array of both splits ({hashed_mb:.0f} MB, more than one run checks): {t_hash:.3f} s",
        f"one fit (1 epoch, default flow) + eval on the same cache: {t_run:.1f} s; checking adds "
        f"{100 * (t_on - t_off) / t_run:.1f}% of it by the read times, at most {100 * t_hash / t_run:.1f}% by the "
        f"hashing alone (upper bounds: real runs train several epochs)",
    ]
    print("\n".join(lines))
    if args.markdown:
        args.markdown.write_text(
            "# Cost of checking shard checksums on every read\n\n"
            "Command: `python benchmarks/read_verify.py --markdown benchmarks/read_verify.md` "
            "(2-core CPU shared with other jobs, one torch thread):\n\n"
            + "".join(f"    {line}\n" for line in lines)
            + "\nThe machine was shared with other jobs, so the read times are noisy (their difference can come out "
            "negative); the hashing line is the checking's own work. Every read that feeds fit, eval, baseline and "
            "sweep therefore checks checksums, with no option to turn it off in the CLI (`open_cache(path, "
            "verify=False)` exists for the Python API and for this measurement).\n")


if __name__ == "__main__":
    main()
