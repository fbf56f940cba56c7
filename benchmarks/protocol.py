"""The whole CIFAR-10 one-vs-rest protocol on one device, timed stage by stage, in one run.

    python benchmarks/protocol.py --device cuda                 # ViT-L/16 224 px, all 60,000 images, 3 seeds
    python benchmarks/protocol.py --device cpu --tiny           # a tiny ViT on 300 images (the test runs this)

Stages: unpack the JPEGs of ``../shared/data/cifar10-jpg.zip`` (not part of the protocol's time), the bare
forward of the backbone on a device batch (the same model, batch and precision), ``sanf extract`` of train and
test (random weights: speed does not depend on them; ratio extract / bare), the sweep (each class normal in
turn: the flow with every seed plus the kNN and Gaussian baselines; flows per minute, stack size), the report
(summary tables), and optionally a grid of ``--grid-seeds`` seeds x 10 classes on the same cache. Prints a
markdown table (``--markdown FILE`` writes it with the command); peak GPU memory per stage on a GPU.

Unattended: no prompts, no downloads (``--weights random``, ``HF_HUB_OFFLINE=1``), everything it writes is under
``--out`` (default ``runs/protocol``, git-ignored) and removed at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench_table beside it, also when loaded by path
from bench_table import dated_section, print_rows  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ARCHIVE = ROOT.parent / "shared" / "data" / "cifar10-jpg.zip"

TINY = dict(backbone="vit_small_patch14_dinov2", image_size=56, batch_size=32, per_class=20, test_per_class=10,
            model_kwargs={"depth": 2, "embed_dim": 32, "num_heads": 2}, seeds="0",
            flow={"hidden": 16, "blocks": 2, "batch_size": 16, "lr": 2e-3, "max_epochs": 4})
FULL = dict(backbone="vit_large_patch16_224", image_size=224, batch_size=256, per_class=None, test_per_class=None,
            model_kwargs=None, seeds="0,1,2", flow={})


def unpack(dest: Path, per_class: int | None, test_per_class: int | None, archive: Path = ARCHIVE) -> Path:
    """The JPEGs (the first ``per_class`` training / ``test_per_class`` test images of each class, or all)."""
    if not archive.is_file():
        sys.exit(f"{archive} is missing: the protocol reads the CIFAR-10 JPEGs from it (--archive)")
    with zipfile.ZipFile(archive) as zf:
        for name in zf.namelist():
            parts = name.split("/")
            if len(parts) != 4 or not parts[3].endswith(".jpg"):
                continue
            limit = per_class if parts[1] == "train" else test_per_class
            if limit is None or int(parts[3][:-4]) < limit:
                zf.extract(name, dest)
    return dest / "cifar10"


def bare_forward(bb, batch: int, device, amp, iters: int) -> float:
    """img/s of the backbone alone on a batch already on the device (no decode, no copies, no writes)."""
    import torch

    size = bb.preprocess.size
    x = torch.randn(batch, 3, *size, device=device)

    def run():
        with torch.inference_mode(), torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            bb(x)

    run()  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iters * batch / (time.perf_counter() - t)


class Peak:
    """Peak GPU memory of a stage (None on CPU)."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            import torch

            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc):
        import torch

        self.gib = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None


def _gib(p: Peak) -> str:
    return "" if p.gib is None else f" ({p.gib:.1f} GiB peak GPU memory)"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--tiny", action="store_true", help="a tiny random ViT on 20 + 10 images per class")
    p.add_argument("--backbone", help="timm model [vit_large_patch16_224; tiny: a 2-block ViT]")
    p.add_argument("--image-size", type=int)
    p.add_argument("--batch-size", type=int, help="extraction batch [256; tiny 32]")
    p.add_argument("--per-class", type=int, help="training images per class [all 5,000; tiny 20]")
    p.add_argument("--test-per-class", type=int, help="test images per class [all 1,000; tiny 10]")
    p.add_argument("--seeds", help="flow seeds of the sweep [0,1,2; tiny 0]")
    p.add_argument("--precision", default="auto", help="extraction autocast: auto (bf16 on GPU), fp32, bf16, fp16")
    p.add_argument("--stack", default="auto", help="flows trained at once: auto (from free GPU memory) or N")
    p.add_argument("--workers", type=int, help="DataLoader workers of the extraction [cores - 1]")
    p.add_argument("--grid-seeds", type=int, default=0, help="also run a grid of N seeds x 10 classes (N=10: 100 runs)")
    p.add_argument("--set", dest="fixed", action="append", default=[], help="flow setting key=value (repeatable)")
    p.add_argument("--compile", action="store_true", help="torch.compile the backbone")
    p.add_argument("--archive", type=Path, default=ARCHIVE, help="the CIFAR-10 JPEG zip [../shared/data/...]")
    p.add_argument("--out", type=Path, default=ROOT / "runs" / "protocol")
    p.add_argument("--keep", action="store_true", help="keep the data, cache and sweeps under --out")
    p.add_argument("--markdown", type=Path, help="write the result table (with the command) to this file")
    args = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch

    from sanf_pipeline.device import precision_dtype, resolve_device
    from sanf_pipeline.extract.backbones import create_backbone
    from sanf_pipeline.extract.job import ExtractConfig, extract
    from sanf_pipeline.sweep import run_sweep, write_summary

    base = TINY if args.tiny else FULL
    backbone = args.backbone or base["backbone"]
    image_size = args.image_size or base["image_size"]
    batch = args.batch_size or base["batch_size"]
    per_class = args.per_class if args.per_class is not None else base["per_class"]
    test_per_class = args.test_per_class if args.test_per_class is not None else base["test_per_class"]
    seeds = args.seeds or base["seeds"]
    device = resolve_device(args.device)
    amp = precision_dtype(args.precision, device)
    fixed = [f"{k}={v}" for k, v in base["flow"].items()] + args.fixed
    out = args.out
    marker = out / ".sanf-protocol"  # the script only ever removes a folder it created itself
    if out.exists():
        if not marker.exists():
            sys.exit(f"{out} exists and was not made by this script; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    marker.touch()
    rows: list[tuple[str, str]] = []
    times: dict[str, float] = {}
    try:
        t = time.perf_counter()
        data = unpack(out / "data", per_class, test_per_class, args.archive)
        times["unpack"] = time.perf_counter() - t
        n_images = sum(1 for _ in data.rglob("*.jpg"))

        with Peak(device) as peak_bare:
            bb = create_backbone(backbone, weights="random", image_size=image_size, device=str(device),
                                 model_kwargs=base["model_kwargs"])
            bare = bare_forward(bb, batch, device, amp, iters=10 if args.tiny else 20)
            desc = f"{backbone} @ {image_size} px, d={bb.dim}, {bb.num_tokens} patch tokens, batch {batch}"
            del bb
        cache = out / "cache"
        cfg = ExtractConfig(backbone=backbone, dataset="folder", data_root=str(data), cache=str(cache),
                            weights="random", image_size=image_size, batch_size=batch, device=str(device),
                            precision=args.precision, num_workers=args.workers, quiet=True,
                            model_kwargs=base["model_kwargs"], compile=args.compile)
        with Peak(device) as peak_extract:
            t = time.perf_counter()
            ext = extract(cfg)
            times["extract"] = time.perf_counter() - t
        loop_rate = ext.images / ext.seconds

        sweep_kw = dict(classes="all", methods="flow,knn,gaussian", seeds=seeds, fixed=fixed, device=str(device),
                        plots=False, quiet=True, stack=args.stack)
        with Peak(device) as peak_sweep:
            t = time.perf_counter()
            sw = run_sweep(cache, out / "sweep", **sweep_kw)
            times["sweep"] = time.perf_counter() - t
        flows = sum(1 for s in sw.specs if s.is_flow)
        flow_s = sw.timings.get("flow_s", sw.timings["run_s"])
        t = time.perf_counter()
        summary = write_summary(out / "sweep")
        times["report"] = time.perf_counter() - t
        m = summary.get("m_auroc") or {}

        precision = str(amp).replace("torch.", "") if amp else "fp32"
        gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
        rows += [
            ("device", f"{device} ({gpu})"),
            ("backbone", f"{desc}, random weights, {precision}"),
            ("images", f"{n_images} CIFAR-10 JPEGs ({ext.images} extracted); unpacking {times['unpack']:.1f} s "
                       "(not counted)"),
            ("bare forward", f"{bare:.1f} img/s{_gib(peak_bare)}"),
            ("sanf extract", f"{loop_rate:.1f} img/s in the loop, {times['extract']:.1f} s wall incl. model build; "
                             f"writer waits {ext.writer_wait_s:.2f} s{_gib(peak_extract)}"),
            ("ratio extract / bare", f"{loop_rate / bare:.2f}"),
            ("sweep", f"{len(sw.specs)} runs ({flows} flows, seeds {seeds}, + knn, gaussian per class) in "
                      f"{times['sweep']:.1f} s; {flows / max(flow_s, 1e-9) * 60:.1f} flows/min; stack "
                      f"{sw.timings.get('stack_size', 1)}{_gib(peak_sweep)}"),
            ("report", f"{times['report']:.2f} s; M-AUROC " + ", ".join(
                f"{k} {v['mean']:.3f}" for k, v in m.items() if v.get("mean") is not None)),
            ("end to end (extract + sweep + report)", f"{times['extract'] + times['sweep'] + times['report']:.1f} s"),
        ]
        if args.grid_seeds:
            with Peak(device) as peak_grid:
                t = time.perf_counter()
                g = run_sweep(cache, out / "grid", **{**sweep_kw, "methods": "flow",
                                                      "seeds": ",".join(map(str, range(args.grid_seeds)))})
                times["grid"] = time.perf_counter() - t
            rows.append(("grid on one cache", f"{len(g.specs)} flow runs in {times['grid']:.1f} s; stack "
                                              f"{g.timings.get('stack_size', 1)}{_gib(peak_grid)}"))
        print_rows(rows)
        print(json.dumps({"times_s": times, "bare_img_s": bare, "extract_img_s": loop_rate}, default=str))
        if args.markdown:
            with open(args.markdown, "w") as fh:
                fh.write(dated_section("protocol.py", argv, rows, ("stage", "result")))
        return 0
    finally:
        if not args.keep and marker.exists():
            shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
