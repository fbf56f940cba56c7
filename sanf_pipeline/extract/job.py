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

from ..cache import BackgroundShardWriter, CacheSpec, CacheWriter, SplitListing
from ..cache.schema import DTYPES, FORMATS, shard_geometry
from ..cache.writer import check_cache_location, mask_digest
from ..data.images import load_or_reason
from ..device import PRECISIONS, autocast, precision_dtype, resolve_device
from ..errors import Interrupted, SanfError
from ..progress import progress_bar
from ..store.atomic import package_versions
from .masks import DEFECT_COVERAGE, RULE, load_masks

ON_ERROR = ("skip", "fail")
RESIZE_ON = ("auto", "cpu", "device")
PENDING_SHARD_BYTES = 1 << 30  # finished shards the writer thread may hold before the forward waits for it


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
    layer: int | tuple[int, ...] | None = None  # the class token's (and patches' without patch_layer)
    patch_layer: int | tuple[int, ...] | None = None  # the patch tokens' layer(s), several concatenated
    pool: int | None = None  # None: the recipe's without layer flags, else 1
    recipe: bool = True  # no layer flags: the backbone's recommended layers, pool and size (recipes.py)
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
    resize_on: str = "auto"  # where images smaller than the input size are upsampled: auto, cpu, device
    compile: bool = False  # torch.compile the backbone

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise SanfError(f"--dtype must be one of {', '.join(DTYPES)}, not {self.dtype!r}")
        if self.format is not None and self.format not in FORMATS:
            raise SanfError(f"--format must be one of {', '.join(FORMATS)}, not {self.format!r}")
        if self.precision not in PRECISIONS:
            raise SanfError(f"--precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.resize_on not in RESIZE_ON:
            raise SanfError(f"--resize-on must be one of {', '.join(RESIZE_ON)}, not {self.resize_on!r}")
        if self.on_error not in ON_ERROR:
            raise SanfError(f"--on-error must be skip or fail, not {self.on_error!r}")
        if self.batch_size < 1:
            raise SanfError("--batch-size must be at least 1")
        if self.pool is not None and self.pool < 1:
            raise SanfError("--pool must be at least 1")
        if self.image_size is not None and self.image_size < 1:
            raise SanfError(f"--image-size must be a positive number of pixels, got {self.image_size}")
        if not 0 <= self.shard_index < self.num_shards:
            raise SanfError(f"--shard-index must be in 0..{self.num_shards - 1}")


@dataclass
class ExtractResult:
    path: str
    images: int = 0
    seconds: float = 0.0
    writer_wait_s: float = 0.0  # time the forward loop waited for the shard writer (disk slower than the GPU)
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
    """Decoded uint8 images for DataLoader workers (resized there unless the device upsamples them); a bad image
    becomes a flagged placeholder so batch composition (and so the other images' bits) never depends on which
    files were readable."""

    def __init__(self, dataset, preprocess, keep_smaller: bool):
        self.dataset = dataset
        self.preprocess = preprocess
        self.keep_smaller = keep_smaller

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return load_or_reason(lambda: self.preprocess.to_uint8(self.dataset.load(i), keep_smaller=self.keep_smaller))


class _Collate:
    """uint8 batch ``(B, 3, h, w)``: images of one size stay as they are; a batch mixing sizes has its odd ones
    resized with PIL to the input size (in the worker). Placeholders are zeros of the batch's size."""

    def __init__(self, preprocess):
        self.preprocess = preprocess

    def __call__(self, items):
        reasons = [r for _, r in items]
        images = [x for x, _ in items if x is not None]
        shapes = {tuple(x.shape) for x in images}
        if len(shapes) > 1:
            images = [self.preprocess.to_uint8(x.permute(1, 2, 0).numpy()) for x in images]
            shapes = {tuple(images[0].shape)}
        shape = next(iter(shapes)) if shapes else (3, *self.preprocess.size)
        it = iter(images)
        batch = [next(it) if x is not None else torch.zeros(shape, dtype=torch.uint8) for x, _ in items]
        return torch.stack(batch), reasons


def listing_digest(labels: np.ndarray, ids: list[str]) -> str:
    h = hashlib.sha256(np.asarray(labels, dtype=np.int64).tobytes())
    for s in ids:
        h.update(s.encode("utf-8", "replace") + b"\0")
    return h.hexdigest()[:16]


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def extract(cfg: ExtractConfig) -> ExtractResult:
    """Run stage one; returns what was done. Safe to call again after an interruption."""
    from ..data import create_dataset
    from .backbones import create_backbone

    cfg.validate()
    check_cache_location(cfg.cache, cfg.data_root)
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
                               model_kwargs=cfg.model_kwargs, patch_layer=cfg.patch_layer, recipe=cfg.recipe)
    orders = {s: ds.order_by_label() for s, ds in datasets.items()}
    listings = {s: SplitListing(np.asarray(ds.labels)[orders[s]], [ds.sample_ids[i] for i in orders[s]])
                for s, ds in datasets.items()}

    itemsize = np.dtype(cfg.dtype).itemsize
    shard, chunk = shard_geometry(backbone.num_tokens, backbone.dim, itemsize, cfg.batch_size,
                                  patch_dim=backbone.patch_dim)
    if cfg.shard_size:
        shard = chunk = int(cfg.shard_size)
    prov = backbone.provenance()
    dataset_desc = {s: ds.describe() for s, ds in datasets.items()}
    settings = {
        "dataset": {"name": cfg.dataset, "category": cfg.category, "limit_per_class": cfg.limit_per_class,
                    "listing": {s: listing_digest(v.labels, v.sample_ids) for s, v in listings.items()}},
        "backbone": {**{k: prov.get(k) for k in ("arch", "tag", "model_kwargs", "image_size", "layer", "pool")},
                     **({"patch_layer": prov["patch_layer"]} if prov.get("patch_layer") is not None else {}),
                     "weights": prov["weights"]["sha256"] or prov["weights"]["source"]},
        "dtype": cfg.dtype,
        "precision": str(amp).replace("torch.", "") if amp else "fp32",
    }  # batch size, workers and shard size change no image's features: recorded below, not fingerprinted
    device_resize = backbone.preprocess.device_resizable and (
        cfg.resize_on == "device" or (cfg.resize_on == "auto" and device.type == "cuda"))
    if device_resize:  # within one uint8 level of PIL's resize, but not the same bits: a resume must not mix them
        settings["resize_on"] = "device"
    masks_meta = _attach_masks(cfg, datasets, orders, listings, prov["image_size"], settings)
    meta = {
        "dataset": {"name": cfg.dataset, "root": str(cfg.data_root) if cfg.data_root else None,
                    "category": cfg.category, "limit_per_class": cfg.limit_per_class, "splits": dataset_desc},
        "backbone": prov,
        "grid": list(backbone.grid),
        "preprocessing": {k: prov.get(k) for k in ("image_size", "mean", "std", "interpolation", "resize")},
        "versions": package_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "device": str(device),
        "run": {"batch_size": cfg.batch_size, "num_workers": cfg.num_workers, "shard_size_requested": cfg.shard_size},
    }
    if masks_meta is not None:
        meta["masks"] = masks_meta
    spec = CacheSpec(settings=settings, meta=meta, class_names=list(class_names), listings=listings,
                     dim=backbone.dim, num_tokens=backbone.num_tokens, dtype=cfg.dtype, patch_dim=backbone.patch_dim,
                     shard_size=shard, chunk_size=chunk)
    writer = CacheWriter(cfg.cache, spec, fmt=cfg.format, overwrite=cfg.overwrite,
                         num_shards_total=cfg.num_shards, shard_index=cfg.shard_index)
    result = ExtractResult(path=str(cfg.cache))
    jobs = writer.open()
    try:
        try:
            if jobs:
                _run_jobs(cfg, backbone, datasets, orders, jobs, writer, device, amp, result, device_resize)
        except KeyboardInterrupt:
            writer.drain()  # shards already handed to the background writer are whole: keep them
            raise Interrupted(kept_message(writer)) from None
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


MASK_SPLIT = "test"


def _attach_masks(cfg, datasets, orders, listings, image_size, settings) -> dict | None:
    """When the test split has ground-truth masks: decode them at ``eval_resolution(image_size)`` in the listing
    order, hand them to the writer (``listings["test"].masks``: stored when the cache is created), add
    ``settings["masks"]`` (the resolution and :func:`~sanf_pipeline.cache.writer.mask_digest` of the arrays, so a
    cache with other masks is another cache) and return ``meta["masks"]``. Without masks: None, and ``settings``
    is left as it was (the fingerprints of caches without masks do not change).

    Masks are decoded on every run, a resume too: the digest must be known before the writer compares settings,
    and the masks themselves are the only thing it can be taken from (a changed mask file is a changed cache); a
    few hundred masks take a second or two, next to minutes of extraction."""
    from ..maps.head import eval_resolution

    ds = datasets.get(MASK_SPLIT)
    if ds is None or not ds.has_masks():
        return None
    h, w = eval_resolution(tuple(image_size))
    order = orders[MASK_SPLIT]
    with progress_bar(cfg.quiet) as bar:
        task = bar.add_task(f"masks {h}x{w}", total=len(order), rate="")
        masks, known, refs = load_masks(ds, order, (h, w), progress=lambda k: bar.update(task, advance=k))
    listings[MASK_SPLIT].masks = (masks, known)
    settings["masks"] = {"resolution": [h, w], "sha256": mask_digest(masks, known)}
    defective = (masks >= DEFECT_COVERAGE).reshape(len(masks), -1).any(axis=1)
    return {"split": MASK_SPLIT, "resolution": [h, w], "rule": RULE, "refs": refs, "n_known": int(known.sum()),
            "n_with_defect": int((known & defective).sum())}


def kept_message(writer: CacheWriter) -> str:
    """What an interrupted extraction leaves: the images of the finished shards, exactly."""
    total = sum(len(v.labels) for v in writer.spec.listings.values())
    kept = 0
    for split in writer.spec.splits:
        kept += sum(int(m["stop"]) - int(m["start"]) for m in writer.store.done_markers(split).values())
    if kept == 0:
        return (f"nothing finished yet (a shard is {writer.spec.shard_size} images); rerun the same command to start "
                "again")
    return (f"{kept} of {total} images kept in {writer.path} (whole shards of {writer.spec.shard_size}); rerun the "
            "same command to extract the rest")


def _barrier() -> None:
    import torch.distributed as tdist

    if not tdist.is_initialized():
        tdist.init_process_group("gloo")
    tdist.barrier()


def _run_jobs(cfg, backbone, datasets, orders, jobs, writer, device, amp, result, device_resize=False) -> None:
    total = sum(j.stop - j.start for j in jobs)
    batches = []
    for job in jobs:
        for b in range(job.start, job.stop, cfg.batch_size):
            batches.append((job, b, min(job.stop, b + cfg.batch_size)))
    loaders = {}
    workers = _default_workers() if cfg.num_workers is None else cfg.num_workers
    for split, ds in datasets.items():
        items = _ExtractionItems(ds, backbone.preprocess, keep_smaller=device_resize)
        split_batches = [orders[split][b0:b1].tolist() for job, b0, b1 in batches if job.split == split]
        if split_batches:
            loaders[split] = torch.utils.data.DataLoader(
                items, batch_sampler=split_batches, num_workers=workers, collate_fn=_Collate(backbone.preprocess),
                pin_memory=device.type == "cuda", persistent_workers=False,
                prefetch_factor=4 if workers else None)
    dtype = np.dtype(cfg.dtype)
    shard_bytes = max(j.stop - j.start for j in jobs) * (backbone.num_tokens * backbone.patch_dim + backbone.dim) \
        * dtype.itemsize
    bg = BackgroundShardWriter(writer, depth=max(2, min(16, PENDING_SHARD_BYTES // max(1, shard_bytes))))
    forward = _Forward(backbone, device, amp, dtype, compile=cfg.compile)
    started = time.perf_counter()
    with progress_bar(cfg.quiet) as bar:
        task = bar.add_task(f"extract {cfg.backbone}", total=total, rate="")
        try:
            for split, loader in loaders.items():
                filler = _ShardFiller(cfg, backbone, datasets[split], orders[split],
                                      [j for j in jobs if j.split == split], dtype, bg, result)
                pending = None
                # one batch in flight: the next batch's forward is queued on the device before the previous batch's
                # tokens are copied into the shard buffer, so the device never waits for the host
                for x, reasons in loader:
                    launched = forward.launch(x)
                    if pending is not None:
                        filler.add(*forward.fetch(pending[0]), pending[1])
                    pending = (launched, reasons)
                    elapsed = time.perf_counter() - started
                    bar.update(task, advance=len(reasons),
                               rate=f"{(result.images + len(reasons)) / max(elapsed, 1e-9):.1f} img/s")
                if pending is not None:
                    filler.add(*forward.fetch(pending[0]), pending[1])
        except (RuntimeError, MemoryError) as exc:
            if not is_out_of_memory(exc):
                raise
            # a user's setting, not a bug: one line and how to go on, instead of torch's traceback (issue 22)
            writer.drain()  # shards already handed to the background writer are whole: keep them
            raise SanfError(out_of_memory_message(cfg, device, writer)) from None
        t = time.perf_counter()
        bg.finish()
        result.writer_wait_s += time.perf_counter() - t
    result.seconds = time.perf_counter() - started


def is_out_of_memory(exc: BaseException) -> bool:
    """torch's OutOfMemoryError (device memory), a MemoryError, or a RuntimeError saying it ran out of memory (the
    CPU allocator's "can't allocate memory", other backends' "out of memory")."""
    oom = getattr(torch, "OutOfMemoryError", None)
    if (oom is not None and isinstance(exc, oom)) or isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and ("out of memory" in text or "can't allocate memory" in text)


def out_of_memory_message(cfg, device, writer: CacheWriter) -> str:
    """The one line of an extraction that ran out of memory: what did not fit, what is kept, how to resume."""
    kept = sum(int(m["stop"]) - int(m["start"]) for split in writer.spec.splits
               for m in writer.store.done_markers(split).values())
    total = sum(len(v.labels) for v in writer.spec.listings.values())
    what = (f"the {kept} of {total} images in finished shards are kept" if kept else "no shard had finished yet")
    return (f"out of memory: a batch of {cfg.batch_size} images did not fit on {device}; rerun the same command with "
            f"a smaller --batch-size (e.g. {max(1, cfg.batch_size // 2)}) to resume ({what} in {writer.path})")


class _ShardFiller:
    """Collects the tokens of consecutive batches into the current shard's buffers; hands full shards to the
    background writer."""

    def __init__(self, cfg, backbone, dataset, order, jobs, dtype, bg, result):
        self.cfg, self.dataset, self.order, self.dtype, self.bg, self.result = cfg, dataset, order, dtype, bg, result
        self.dim, self.tokens, self.patch_dim = backbone.dim, backbone.num_tokens, backbone.patch_dim
        self.jobs = iter(jobs)
        self._next_job()

    def _next_job(self) -> None:
        self.job = next(self.jobs, None)
        if self.job is None:
            return
        n = self.job.stop - self.job.start
        self.cls = np.zeros((n, self.dim), self.dtype)
        self.patch = np.zeros((n, self.tokens, self.patch_dim), self.dtype)
        self.valid = np.ones(n, bool)
        self.skipped: list[dict] = []
        self.fill = 0

    def add(self, cls: np.ndarray, patch: np.ndarray, reasons: list[str]) -> None:
        job, fill, n = self.job, self.fill, len(reasons)
        self.cls[fill:fill + n] = cls
        self.patch[fill:fill + n] = patch
        for k, reason in enumerate(reasons):
            if reason:
                row = job.start + fill + k
                ds_index = int(self.order[row])
                sample = self.dataset.sample_ids[ds_index]
                if self.cfg.on_error == "fail":
                    raise SanfError(f"cannot read image {sample}: {reason} (--on-error skip would "
                                    "record it and go on)")
                self.valid[fill + k] = False
                self.cls[fill + k] = 0
                self.patch[fill + k] = 0
                self.skipped.append({"row": row, "sample_id": sample,
                                     "label": int(self.dataset.labels[ds_index]), "reason": reason})
        self.fill += n
        self.result.images += n
        if self.fill == job.stop - job.start:
            t = time.perf_counter()
            self.bg.put(job, self.cls, self.patch, self.valid, self.skipped)
            self.result.writer_wait_s += time.perf_counter() - t
            self.result.skipped += self.skipped
            self.result.shards_written += 1
            self._next_job()


class _Forward:
    """The backbone on uint8 batches: host-to-device copy (non-blocking from pinned memory), resize and
    normalisation on the device, autocast, and on a GPU an asynchronous copy of the tokens, already in the cache's
    dtype, into pinned host buffers (two, used in turn) that ``fetch`` waits for."""

    def __init__(self, backbone, device: torch.device, amp: torch.dtype | None, dtype: np.dtype, compile=False):
        self.backbone, self.device, self.amp, self.dtype = backbone, device, amp, dtype
        self.fn = torch.compile(backbone) if compile else backbone
        self.cuda = device.type == "cuda"
        self.torch_dtype = torch.from_numpy(np.zeros(0, dtype)).dtype
        self.host: dict = {}
        self.slot = 0

    def launch(self, x: torch.Tensor):
        x = x.to(self.device, non_blocking=True)
        with torch.inference_mode():
            x = self.backbone.preprocess.normalize(x)
            with autocast(self.device, self.amp):
                cls, patch = self.fn(x)
            if not self.cuda:
                return cls.float().numpy(), patch.float().numpy()
            self.slot ^= 1
            out = []
            for name, t in (("cls", cls), ("patch", patch)):
                key = (self.slot, name, tuple(t.shape))
                if key not in self.host:
                    self.host[key] = torch.empty(t.shape, dtype=self.torch_dtype, pin_memory=True)
                out.append(self.host[key].copy_(t.float().to(self.torch_dtype), non_blocking=True))
            event = torch.cuda.Event()
            event.record()
            return out[0], out[1], event

    def fetch(self, launched) -> tuple[np.ndarray, np.ndarray]:
        if not self.cuda:
            return launched
        cls, patch, event = launched
        event.synchronize()
        return cls.numpy(), patch.numpy()


def _forward(backbone, x: torch.Tensor, device: torch.device, amp: torch.dtype | None):
    """The bare forward of a normalised float batch with the copy back to the host (benchmarks/extract.py)."""
    x = x.to(device, non_blocking=True)
    with torch.inference_mode(), autocast(device, amp):
        cls, patch = backbone(x)
    return cls.float().cpu().numpy(), patch.float().cpu().numpy()


def default_cache_path(dataset: str, category: str | None = None) -> Path:
    return Path("cache") / (f"{dataset}-{category}" if category else dataset)
