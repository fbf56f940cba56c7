"""Stage one: run a frozen backbone over a dataset once and write its tokens to a feature cache.

Images are decoded and preprocessed in DataLoader workers, the backbone runs batch by batch in the main
process, and finished shards go to a background writer thread, so the backbone does not wait on either
side. Batches never straddle shards, so an interrupted run resumed with the same command produces the
same bits. Several processes (torchrun ranks or ``num_shards``/``shard_index`` job arrays) share one
cache by owning disjoint shards; whoever finds every shard done seals it.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .cache import BackgroundShardWriter, CacheSpec, CacheWriter, SplitListing
from .cache.schema import DTYPES, FORMATS, shard_geometry
from .device import PRECISIONS, autocast, precision_dtype, resolve_device
from .errors import BadImageError, SanfError
from .progress import progress_bar
from .runs import package_versions

ON_ERROR = ("skip", "fail")


@dataclass
class ExtractConfig:
    backbone: str
    dataset: str
    cache: str
    data_root: str | None = None
    category: str | None = None
    limit_per_class: int | None = None
    splits: tuple[str, ...] = ("train", "test")
    weights: str | None = None
    weights_dir: str | None = None
    image_size: int | None = None
    layer: int | None = None
    pool: int = 1
    format: str | None = None
    dtype: str = "float16"
    precision: str = "auto"
    device: str = "auto"
    batch_size: int = 64
    num_workers: int | None = None
    shard_size: int | None = None
    on_error: str = "skip"
    overwrite: bool = False
    num_shards: int = 1
    shard_index: int = 0
    quiet: bool = False
    model_kwargs: dict | None = None  # timm create_model overrides (tiny test models)

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise SanfError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.format is not None and self.format not in FORMATS:
            raise SanfError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.precision not in PRECISIONS:
            raise SanfError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.on_error not in ON_ERROR:
            raise SanfError(f"--on-error must be skip or fail, not {self.on_error!r}")
        if self.batch_size < 1:
            raise SanfError("--batch-size must be at least 1")
        if self.pool < 1:
            raise SanfError("--pool must be at least 1")
        if not 0 <= self.shard_index < self.num_shards:
            raise SanfError(f"--shard-index must be in 0..{self.num_shards - 1}")


@dataclass
class ExtractResult:
    path: str
    images: int = 0
    seconds: float = 0.0
    sealed: bool = False
    skipped: list[dict] = field(default_factory=list)
    shards_written: int = 0

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0


def distributed_context() -> tuple[int, int] | None:
    """(rank, world) under torchrun, else None."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "RANK" in os.environ:
        return int(os.environ["RANK"]), world
    return None


class _ExtractionItems(torch.utils.data.Dataset):
    """Decoded, preprocessed images for DataLoader workers; a bad image becomes a flagged placeholder so
    batch composition (and so the other images' bits) never depends on which files were readable."""

    def __init__(self, dataset, preprocess, size: int):
        self.dataset = dataset
        self.preprocess = preprocess
        self.size = size

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        try:
            return self.preprocess(self.dataset.load(i)), ""
        except BadImageError as exc:
            reason = exc.reason
        except Exception as exc:  # any decoder failure on a user's file is a bad image, not a crash
            reason = f"{type(exc).__name__}: {exc}"
        return torch.zeros(3, self.size, self.size), reason or "unreadable"


def _collate(items):
    return torch.stack([x for x, _ in items]), [r for _, r in items]


def listing_digest(labels: np.ndarray, ids: list[str]) -> str:
    h = hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes())
    for s in ids:
        h.update(s.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:16]


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run stage one; returns what was done. Safe to call again after an interruption."""
    from .backbones import create_backbone
    from .data import create_dataset

    cfg.validate()
    dist = distributed_context()
    if dist is not None:
        cfg.shard_index, cfg.num_shards = dist
    device = resolve_device(cfg.device)
    amp = precision_dtype(cfg.precision, device)

    datasets = {s: create_dataset(cfg.dataset, cfg.data_root, s, category=cfg.category,
                                  limit_per_class=cfg.limit_per_class) for s in cfg.splits}
    class_names = datasets[cfg.splits[0]].class_names
    for split, ds in datasets.items():
        if len(ds) == 0:
            raise SanfError(f"split {split} of {cfg.dataset} at {cfg.data_root} has no images")
        if ds.class_names != class_names:
            raise SanfError(f"the splits of {cfg.dataset} disagree on class names")
    backbone = create_backbone(cfg.backbone, weights=cfg.weights, weights_dir=cfg.weights_dir,
                               image_size=cfg.image_size, layer=cfg.layer, pool=cfg.pool, device=str(device),
                               model_kwargs=cfg.model_kwargs)
    orders = {s: ds.order_by_label() for s, ds in datasets.items()}
    listings = {s: SplitListing(np.asarray(ds.labels)[orders[s]], [ds.sample_ids[i] for i in orders[s]])
                for s, ds in datasets.items()}

    itemsize = np.dtype(cfg.dtype).itemsize
    shard, chunk = shard_geometry(backbone.num_tokens, backbone.dim, itemsize, cfg.batch_size)
    if cfg.shard_size:
        shard = chunk = int(cfg.shard_size)
    prov = backbone.provenance()
    dataset_desc = {s: ds.describe() for s, ds in datasets.items()}
    settings = {
        "dataset": {"name": cfg.dataset, "category": cfg.category, "limit_per_class": cfg.limit_per_class,
                    "listing": {s: listing_digest(v.labels, v.sample_ids) for s, v in listings.items()}},
        "backbone": {**{k: prov.get(k) for k in ("arch", "tag", "model_kwargs", "image_size", "layer", "pool")},
                     "weights": prov["weights"]["sha256"] or prov["weights"]["source"]},
        "dtype": cfg.dtype,
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
        "batch_size": cfg.batch_size,
        "shard_size": shard,
    }
    meta = {
        "dataset": {"name": cfg.dataset, "root": str(cfg.data_root) if cfg.data_root else None,
                    "category": cfg.category, "limit_per_class": cfg.limit_per_class, "splits": dataset_desc},
        "backbone": prov,
        "grid": list(backbone.grid),
        "preprocessing": {k: prov.get(k) for k in ("image_size", "mean", "std", "interpolation", "resize")},
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
    }
    spec = CacheSpec(settings=settings, meta=meta, class_names=list(class_names), listings=listings,
                     dim=backbone.dim, num_tokens=backbone.num_tokens, dtype=cfg.dtype,
                     shard_size=shard, chunk_size=chunk)
    writer = CacheWriter(cfg.cache, spec, fmt=cfg.format, overwrite=cfg.overwrite,
                         num_shards_total=cfg.num_shards, shard_index=cfg.shard_index)
    result = ExtractResult(path=str(cfg.cache))
    jobs = writer.open()
    try:
        if jobs:
            _run_jobs(cfg, backbone, datasets, orders, jobs, writer, device, amp, result)
        if dist is not None:
            _barrier()
            if dist[0] == 0 and writer.complete():
                writer.seal()
        elif writer.complete():
            writer.seal()
        result.sealed = writer.complete()
    finally:
        writer.close()
    return result


def _barrier() -> None:
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("gloo")
    tdist.barrier()


def _run_jobs(cfg, backbone, datasets, orders, jobs, writer, device, amp, result) -> None:
    size = int(backbone.data_config["input_size"][-1])
    total = sum(j.stop - j.start for j in jobs)
    batches = []
    for job in jobs:
        for b in range(job.start, job.stop, cfg.batch_size):
            batches.append((job, b, min(job.stop, b + cfg.batch_size)))
    loaders = {}
    workers = _default_workers() if cfg.num_workers is None else cfg.num_workers
    for split, ds in datasets.items():
        items = _ExtractionItems(ds, backbone.preprocess, size)
        split_batches = [orders[split][b0:b1].tolist() for job, b0, b1 in batches if job.split == split]
        if split_batches:
            loaders[split] = torch.utils.data.DataLoader(
                items, batch_sampler=split_batches, num_workers=workers, collate_fn=_collate,
                pin_memory=device.type == "cuda", persistent_workers=False,
                prefetch_factor=4 if workers else None)
    bg = BackgroundShardWriter(writer)
    dtype = np.dtype(cfg.dtype)
    started = time.perf_counter()
    with progress_bar(cfg.quiet) as bar:
        task = bar.add_task(f"extract {cfg.backbone}", total=total, rate="")
        for split, loader in loaders.items():
            split_jobs = [j for j in jobs if j.split == split]
            job_iter = iter(split_jobs)
            job = next(job_iter)
            buf_cls = np.zeros((job.stop - job.start, backbone.dim), dtype)
            buf_patch = np.zeros((job.stop - job.start, backbone.num_tokens, backbone.dim), dtype)
            valid = np.ones(job.stop - job.start, bool)
            skipped: list[dict] = []
            fill = 0
            for x, reasons in loader:
                cls, patch = _forward(backbone, x, device, amp)
                n = len(reasons)
                buf_cls[fill : fill + n] = cls.astype(dtype)
                buf_patch[fill : fill + n] = patch.astype(dtype)
                for k, reason in enumerate(reasons):
                    if reason:
                        row = job.start + fill + k
                        ds_index = int(orders[split][row])
                        sample = datasets[split].sample_ids[ds_index]
                        if cfg.on_error == "fail":
                            raise SanfError(f"cannot read image {sample}: {reason} (--on-error skip would "
                                            "record it and go on)")
                        valid[fill + k] = False
                        buf_cls[fill + k] = 0
                        buf_patch[fill + k] = 0
                        skipped.append({"row": row, "sample_id": sample,
                                        "label": int(datasets[split].labels[ds_index]), "reason": reason})
                fill += n
                result.images += n
                elapsed = time.perf_counter() - started
                bar.update(task, advance=n, rate=f"{result.images / max(elapsed, 1e-9):.1f} img/s")
                if fill == job.stop - job.start:
                    bg.put(job, buf_cls, buf_patch, valid, skipped)
                    result.skipped += skipped
                    result.shards_written += 1
                    job = next(job_iter, None)
                    if job is None:
                        break
                    buf_cls = np.zeros((job.stop - job.start, backbone.dim), dtype)
                    buf_patch = np.zeros((job.stop - job.start, backbone.num_tokens, backbone.dim), dtype)
                    valid = np.ones(job.stop - job.start, bool)
                    skipped, fill = [], 0
        bg.finish()
    result.seconds = time.perf_counter() - started


def _forward(backbone, x: torch.Tensor, device: torch.device, amp: torch.dtype | None):
    x = x.to(device, non_blocking=True)
    with torch.inference_mode(), autocast(device, amp):
        cls, patch = backbone(x)
    return cls.float().cpu().numpy(), patch.float().cpu().numpy()


def default_cache_path(dataset: str, category: str | None = None) -> Path:
    return Path("cache") / (f"{dataset}-{category}" if category else dataset)
