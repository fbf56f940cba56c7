"""Stage-one throughput: bare backbone forward vs the full `sanf extract` pipeline, in one run.

Prints (and with --markdown appends to a file) the img/s of a bare forward on pre-made tensors, the img/s of
`sanf_pipeline.extract.extract` on real JPEGs (decode + preprocess in workers + forward + background
writes), their ratio, the cache's size on disk and the read throughput of one class block.

    python benchmarks/extract.py --backbone vit_small_patch14_dinov2 --image-size 112 --per-class 40

Random weights are the default: speed does not depend on trained values.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_table beside it, also when loaded by path
from bench_table import dated_section, print_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"


def unpack_cifar_slice(dest: Path, per_class: int) -> Path:
    """The first ``per_class`` JPEGs of each class and split from shared/data/cifar10-jpg.zip."""
    archive = SHARED / "data" / "cifar10-jpg.zip"
    if not archive.exists():
        sys.exit(f"{archive} is missing: the benchmark reads real JPEGs from it")
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) == 4 and parts[3].endswith(".jpg") and int(parts[3][:-4]) < per_class:
                zf.extract(name, dest)
    return dest / "cifar10"


def bare_forward(backbone, batch: int, size: int, device: torch.device, amp, iters: int) -> float:
    x = torch.randn(batch, 3, size, size, device=device)
    from sanf_pipeline.extract.job import _forward

    _forward(backbone, x, device, amp)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        _forward(backbone, x, device, amp)  # includes the copy back to host, as extraction does
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iters * batch / (time.perf_counter() - t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backbone", default="vit_small_patch14_dinov2")
    p.add_argument("--weights", default="random")
    p.add_argument("--image-size", type=int, default=112)
    p.add_argument("--pool", type=int, default=1)
    p.add_argument("--per-class", type=int, default=40, help="images per class and split (CIFAR-10 slice)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=None)
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="auto")
    p.add_argument("--format", default="zarr", choices=["zarr", "hdf5"])
    p.add_argument("--markdown", type=Path, help="append a result table to this file")
    args = p.parse_args(argv)

    from sanf_pipeline.cache import open_cache
    from sanf_pipeline.cache.inspect import disk_size
    from sanf_pipeline.device import precision_dtype as autocast_dtype
    from sanf_pipeline.device import resolve_device
    from sanf_pipeline.extract.backbones import create_backbone
    from sanf_pipeline.extract.job import ExtractConfig, extract

    device = resolve_device(args.device)
    amp = autocast_dtype(args.precision, device)
    work = Path(tempfile.mkdtemp(prefix="sanf-bench-"))
    try:
        root = unpack_cifar_slice(work / "data", args.per_class)
        n_images = 2 * 10 * args.per_class
        bb = create_backbone(args.backbone, weights=args.weights, image_size=args.image_size, pool=args.pool,
                             device=str(device))
        size = int(bb.data_config["input_size"][-1])
        iters = max(2, n_images // args.batch_size // 2)
        bare = bare_forward(bb, args.batch_size, size, device, amp, iters)
        del bb
        cache = work / ("cache.h5" if args.format == "hdf5" else "cache")
        cfg = ExtractConfig(backbone=args.backbone, dataset="folder", data_root=str(root), cache=str(cache),
                            weights=args.weights, image_size=args.image_size, pool=args.pool, format=args.format,
                            device=args.device, precision=args.precision, batch_size=args.batch_size,
                            num_workers=args.num_workers, quiet=True)
        t = time.perf_counter()
        result = extract(cfg)
        wall = time.perf_counter() - t
        full = result.images / result.seconds  # loop time: model load and listing are one-off costs
        size_mb = disk_size(cache) / 2**20
        c = open_cache(cache)
        view = c.split("train")
        t = time.perf_counter()
        cls, patch = view.read_class(0)
        read_s = time.perf_counter() - t
        block_mb = (cls.nbytes + patch.nbytes) / 2 / 2**20 if c.meta["dtype"] == "float16" else \
            (cls.nbytes + patch.nbytes) / 2**20
        rows = [
            ("device", f"{device} ({torch.get_num_threads()} threads)"),
            ("backbone", f"{args.backbone} @ {size}px, d={c.dim}, {c.num_tokens} patch tokens, "
                         f"batch {args.batch_size}"),
            ("images", f"{n_images} CIFAR-10 JPEGs"),
            ("bare forward", f"{bare:.1f} img/s"),
            ("sanf extract", f"{full:.1f} img/s (wall incl. model load {result.images / wall:.1f} img/s)"),
            ("ratio extract / bare", f"{full / bare:.2f}"),
            ("cache on disk", f"{size_mb:.1f} MiB ({args.format}, {c.meta['dtype']})"),
            ("read one class block", f"{len(cls)} samples, {block_mb:.1f} MiB in {read_s * 1000:.1f} ms = "
                                     f"{block_mb / read_s:.0f} MiB/s"),
        ]
        print_rows(rows)
        if args.markdown:
            with open(args.markdown, "a") as fh:
                fh.write("\n" + dated_section("extract.py", argv, rows, ("measure", "value")))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
