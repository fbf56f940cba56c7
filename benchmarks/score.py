"""`sanf score` throughput against the bare backbone forward, and onnxruntime against PyTorch (issue 11).

Builds a small run from the shared CIFAR-10 JPEGs (DINOv2 ViT-S/14 block 8, the default flow trained one epoch on
the normal class's first images: its weights do not change the cost), then measures on one device and batch size:

- bare: ``backbone(x)`` on preprocessed tensors already in memory (no decoding), images/s;
- score: ``Detector.score(paths)`` end to end, as ``sanf score`` runs it (decoding in DataLoader workers,
  preprocessing, backbone, normaliser, flow, percentiles), model loading excluded;
- torch / onnxruntime: ``DetectorModel(x)`` in PyTorch and the exported ONNX file in onnxruntime (CPU) on the
  same preprocessed batches.

Each measurement is the best of ``--rounds`` passes over the same images after one warm-up batch.

    python benchmarks/score.py --images 256 --image-size 112 --threads 1 --markdown benchmarks/score.md
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(REPO))


def unpack(dest: Path, n_test: int, n_train: int) -> Path:
    zpath = SHARED / "data" / "cifar10-jpg.zip"
    with zipfile.ZipFile(zpath) as zf:
        names = zf.namelist()
        train = [n for n in names if n.startswith("cifar10/train/airplane/")][:n_train]
        test = [n for n in names if n.startswith("cifar10/test/") and n.endswith(".jpg")]
        test = test[:: max(1, len(test) // n_test)][:n_test]
        for n in train + test:
            zf.extract(n, dest)
    return dest / "cifar10"


def best_rate(fn, n_images: int, rounds: int) -> float:
    best = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        best = max(best, n_images / (time.perf_counter() - t0))
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--image-size", type=int, default=112)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-workers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads for every measurement (default: torch's); on an overloaded machine 1 thread "
                         "avoids the waits of a multi-threaded op for a descheduled thread")
    ap.add_argument("--markdown", type=Path)
    args = ap.parse_args(argv)

    import numpy as np
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from sanf_pipeline import Detector
    from sanf_pipeline.data.folder import list_image_files
    from sanf_pipeline.data.images import decode_image
    from sanf_pipeline.detect.export import export_detector, run_onnx
    from sanf_pipeline.extract.job import ExtractConfig, extract
    from sanf_pipeline.jobs.api import fit_run
    from sanf_pipeline.train.config import FitConfig

    weights = SHARED / "weights" / "vit_small_patch14_dinov2.imgfocus.safetensors"
    tmp = Path(tempfile.mkdtemp(prefix="sanf-score-bench-"))
    try:
        data = unpack(tmp, args.images, 40)
        extract(ExtractConfig(backbone="vit_small_patch14_dinov2", dataset="folder", data_root=str(data),
                              cache=str(tmp / "cache"), weights=str(weights), image_size=args.image_size, layer=8,
                              splits=("train",), quiet=True))
        fit_run(tmp / "cache", "airplane", FitConfig(early_stopping=False, epochs=1, device=args.device),
                tmp / "run", quiet=True)
        t0 = time.perf_counter()
        det = Detector.load(tmp / "run", device=args.device, weights=str(weights))
        load_s = time.perf_counter() - t0
        files = [str(p) for p in list_image_files(data / "test")]
        n = len(files)
        x = torch.stack([det.preprocess(decode_image(f)) for f in files])
        batches = [x[i:i + args.batch_size].to(det.device) for i in range(0, n, args.batch_size)]
        bb = det.model.backbone

        def bare():
            with torch.inference_mode():
                for b in batches:
                    bb(b)
            if det.device.type == "cuda":
                torch.cuda.synchronize()

        def score():
            det.score(files, batch_size=args.batch_size, num_workers=args.num_workers)

        def torch_model():
            with torch.inference_mode():
                for b in batches:
                    det.model(b)

        bare()  # warm-up
        rates = {}
        for _ in range(args.rounds):  # interleaved, so a busy neighbour slows both alike
            rates["bare"] = max(rates.get("bare", 0), best_rate(bare, n, 1))
            rates["score"] = max(rates.get("score", 0), best_rate(score, n, 1))
        onnx_line = ""
        if args.device == "cpu":
            onnx_path = tmp / "m.onnx"
            export_detector(det, onnx_path, "onnx")
            xs = [b.cpu().numpy() for b in batches]
            run_onnx(onnx_path, xs[0])
            import onnxruntime as ort

            so = ort.SessionOptions()
            so.intra_op_num_threads = torch.get_num_threads()  # the same thread count as PyTorch
            so.inter_op_num_threads = 1
            sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])

            def onnx_model():
                for b in xs:
                    sess.run(None, {"images": b})

            for _ in range(args.rounds):
                rates["torch"] = max(rates.get("torch", 0), best_rate(torch_model, n, 1))
                rates["onnx"] = max(rates.get("onnx", 0), best_rate(onnx_model, n, 1))
            got = np.concatenate([sess.run(None, {"images": b})[0] for b in xs])
            with torch.inference_mode():
                want = np.concatenate([det.model(b).numpy() for b in batches])
            rel = float(np.max(np.abs(got - want) / np.abs(want)))
            onnx_line = (f"| onnxruntime / PyTorch (whole detector, preprocessed batches, same thread count) | "
                         f"{rates['onnx']:.1f} / {rates['torch']:.1f} img/s | **{rates['onnx'] / rates['torch']:.2f}** "
                         f"(max relative score difference {rel:.1e}) |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cmd = "python benchmarks/score.py " + " ".join(argv if argv is not None else sys.argv[1:])
    lines = [
        "# `sanf score` throughput (issue 11)", "",
        f"Command: `{cmd}`", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores (shared with other jobs), torch "
        f"{torch.__version__}, {torch.get_num_threads()} torch threads, device {args.device}; DINOv2 ViT-S/14 "
        f"block 8 at {args.image_size} px, default flow (semantic fusion, hidden 1024, 4 blocks), batch "
        f"{args.batch_size}, {n} CIFAR-10 test JPEGs, best of {args.rounds} rounds.", "",
        "| what | images/s | ratio |", "|---|---|---|",
        f"| `sanf score` (decode + preprocess + backbone + flow) / bare backbone forward on tensors | "
        f"{rates['score']:.1f} / {rates['bare']:.1f} | **{rates['score'] / rates['bare']:.2f}** "
        f"(goal >= 0.8 on CPU) |",
    ]
    if onnx_line:
        lines.append(onnx_line)
    lines += ["", f"Loading the detector (backbone weights + sha256 check + flow): {load_s:.1f} s, not counted."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        args.markdown.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
