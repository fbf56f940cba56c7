"""Writing a cache: create or resume, write whole shards from a background thread, seal when complete.

The writer knows the full sorted listing of every split before the first image is decoded, so every
shard's rows are fixed up front. A run that is killed loses at most the shards it had not finished; a
rerun with the same settings writes exactly those, and the result is bit-for-bit the same. A cache
whose settings differ from the requested ones is refused (or replaced with ``overwrite=True``).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SanfError
from .lock import OwnerLock, creation_lock
from .schema import (
    FORMAT_NAME,
    FORMAT_VERSION,
    class_offsets,
    diff_settings,
    encode_ids,
    fingerprint,
    num_shards,
)
from .stores import format_for_path, open_store

MASK_ARRAYS = ("mask", "mask_known")  # a split's optional ground-truth masks: index arrays, written at creation
MASK_CHUNK = 64  # masks per chunk of the ``mask`` array


@dataclass
class SplitListing:
    """One split's samples, already sorted by label; ``masks``: the split's ground-truth masks in that order,
    ``(coverage uint8 (n, h, w), known bool (n,))``, stored as the index arrays ``mask`` and ``mask_known`` when
    the cache is created (``extract/masks.py``), or None."""

    labels: np.ndarray
    sample_ids: list[str]
    masks: tuple[np.ndarray, np.ndarray] | None = None


@dataclass
class ShardJob:
    split: str
    shard: int
    start: int
    stop: int


@dataclass
class CacheSpec:
    """Everything that fixes a cache's layout and content."""

    settings: dict
    meta: dict  # provenance that does not change content (versions, timestamps, paths)
    class_names: list[str]
    listings: dict[str, SplitListing]
    dim: int
    num_tokens: int
    dtype: str
    shard_size: int
    chunk_size: int
    splits: list[str] = field(default_factory=list)
    patch_dim: int | None = None  # the patch tokens' width when they come from other layers than the class token

    def __post_init__(self):
        self.splits = list(self.listings)


def _layout(spec: CacheSpec) -> dict:
    out = {}
    for split, listing in spec.listings.items():
        n = len(listing.labels)
        s, c = spec.shard_size, spec.chunk_size
        ids, id_offsets = encode_ids(listing.sample_ids)
        out[split] = {
            "cls": {"shape": [n, spec.dim], "chunks": [c, spec.dim], "shards": [s, spec.dim], "dtype": spec.dtype},
            "patch": {
                "shape": [n, spec.num_tokens, spec.patch_dim or spec.dim],
                "chunks": [c, spec.num_tokens, spec.patch_dim or spec.dim],
                "shards": [s, spec.num_tokens, spec.patch_dim or spec.dim],
                "dtype": spec.dtype,
            },
            "valid": {"shape": [n], "chunks": [c], "shards": [s], "dtype": "bool"},
            "label": {"shape": [n], "chunks": [max(1, n)], "dtype": "int64"},
            "class_offsets": {"shape": [len(spec.class_names) + 1], "chunks": [len(spec.class_names) + 1],
                              "dtype": "int64"},
            "sample_id_bytes": {"shape": [len(ids)], "chunks": [max(1, len(ids))], "dtype": "uint8"},
            "sample_id_offsets": {"shape": [n + 1], "chunks": [n + 1], "dtype": "int64"},
        }
        if listing.masks is not None:
            _, h, w = listing.masks[0].shape
            # mostly zeros: compressed (zarr: zstd; hdf5: gzip), in chunks of 64 masks (at 256 px, 4 MB raw)
            out[split]["mask"] = {"shape": [n, h, w], "chunks": [max(1, min(n, MASK_CHUNK)), h, w],
                                  "dtype": "uint8", "compress": True}
            out[split]["mask_known"] = {"shape": [n], "chunks": [max(1, n)], "dtype": "bool"}
    return out


def _index(spec: CacheSpec) -> dict:
    out = {}
    for split, listing in spec.listings.items():
        ids, id_offsets = encode_ids(listing.sample_ids)
        out[split] = {
            "label": np.asarray(listing.labels, dtype=np.int64),
            "class_offsets": class_offsets(np.asarray(listing.labels), len(spec.class_names)),
            "sample_id_bytes": ids,
            "sample_id_offsets": id_offsets,
        }
        if listing.masks is not None:
            out[split]["mask"] = np.ascontiguousarray(listing.masks[0], dtype=np.uint8)
            out[split]["mask_known"] = np.ascontiguousarray(listing.masks[1], dtype=bool)
    return out


def shard_digest(rows: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for name in sorted(rows):
        h.update(name.encode())
        h.update(np.ascontiguousarray(rows[name]).tobytes())
    return h.hexdigest()


def mask_digest(masks: np.ndarray, known: np.ndarray) -> str:
    """sha256 (hex) of a split's mask bytes (uint8 (n, h, w), C order) followed by its known flags' bytes (bool
    (n,)): recorded in the settings (``settings["masks"]["sha256"]``) and checked by the reader's first mask read."""
    h = hashlib.sha256(np.ascontiguousarray(masks, dtype=np.uint8).tobytes())
    h.update(np.ascontiguousarray(known, dtype=bool).tobytes())
    return h.hexdigest()


def array_digests(rows: dict[str, np.ndarray]) -> dict[str, str]:
    """One sha256 per array of a shard, so a read of the class tokens alone can be checked without the patches."""
    return {name: hashlib.sha256(np.ascontiguousarray(v).tobytes()).hexdigest() for name, v in rows.items()}


def _os_error(exc: OSError, path: Path) -> SanfError:
    if exc.errno == errno.ENOSPC:
        return SanfError(f"disk full while writing {path}; free space and rerun the same command to resume")
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return SanfError(f"cannot write {path}: {exc.strerror}; choose a writable --cache location")
    return SanfError(f"writing {path} failed: {exc.strerror or exc}; rerun the same command to resume")


# settings that caches made before they were recorded-only kept in their fingerprinted settings: ignored when a
# rerun compares settings, so such a cache still resumes
RECORDED_ONLY = ("batch_size", "shard_size")


def check_cache_location(cache, data_root) -> None:
    """Refuse a cache path equal to, inside or containing the data root: a cache must never share a folder
    with the images it is made from (an --overwrite, or a folder dataset's listing, would touch them)."""
    if not data_root:
        return
    c, d = Path(cache).expanduser().resolve(), Path(data_root).expanduser().resolve()
    if c == d:
        raise SanfError(f"--cache {cache} is the data root itself; choose a --cache path outside --data-root")
    if d in c.parents:
        raise SanfError(f"--cache {cache} is inside the data root {data_root}; choose a --cache path outside "
                        "--data-root")
    if c in d.parents:
        raise SanfError(f"--cache {cache} contains the data root {data_root}; choose a --cache path that neither "
                        "holds nor lies inside --data-root")


class CacheWriter:
    """Create-or-resume a cache and write the shards one process owns."""

    def __init__(self, path, spec: CacheSpec, *, fmt: str | None = None, overwrite: bool = False,
                 num_shards_total: int = 1, shard_index: int = 0):
        self.path = Path(path)
        self.spec = spec
        self.fmt = format_for_path(self.path, fmt)
        self.store = open_store(self.path, self.fmt)
        self.overwrite = overwrite
        self.num_procs = num_shards_total
        self.proc_index = shard_index
        self.fingerprint = fingerprint(spec.settings)
        self.lock = OwnerLock(self.path, num_shards_total, shard_index)
        self.already_sealed = False
        self.background: BackgroundShardWriter | None = None  # set by the background writer feeding this one

    # -- opening
    def open(self) -> list[ShardJob]:
        """Create the cache or check it matches; claim this process's shards; return those left to write."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with creation_lock(self.path):
                self.lock.acquire()
                try:
                    self._create_or_check()
                except BaseException:
                    self.lock.release()
                    raise
        except OSError as exc:
            raise _os_error(exc, self.path) from None
        return self.pending()

    def _create_or_check(self) -> None:
        # --overwrite only ever replaces what sanf made (a store whose metadata names sanf's format) or an empty
        # folder; anything else at the path is the user's and is refused whatever the flags (docs/file-safety.md)
        meta = self._existing_meta()
        if meta is not None:
            old = {k: v for k, v in meta.get("settings", {}).items() if k not in RECORDED_ONLY}
            if old == self.spec.settings:
                self.already_sealed = bool(meta.get("sealed"))
                # a resume keeps the geometry the cache was made with, whatever batch or shard size is asked now
                self.spec.shard_size, self.spec.chunk_size = int(meta["shard_size"]), int(meta["chunk_size"])
                return
            if not self.overwrite:
                changed = "; ".join(diff_settings(old, self.spec.settings)[:4]) or "unknown settings"
                raise SanfError(
                    f"{self.path} holds a cache built with different settings ({changed}); use another --cache "
                    "path, or --overwrite to replace it"
                )
            self.store.remove()
        elif self._foreign_content():
            raise SanfError(f"{self.path} exists and is not a sanf cache (no sanf metadata), so sanf will not write "
                            "there or delete it, even with --overwrite; choose a new or empty --cache path")
        self.store.create(self._meta(sealed=False), _layout(self.spec), _index(self.spec))

    def _existing_meta(self) -> dict | None:
        """The metadata of a sanf cache at the path; None when there is none (or what is there is not sanf's)."""
        if not self.store.exists():
            return None
        try:
            meta = self.store.read_meta()
        except (SanfError, OSError, KeyError, ValueError):
            return None
        return meta if isinstance(meta, dict) and meta.get("format") == FORMAT_NAME else None

    def _foreign_content(self) -> bool:
        """Whether something that is not sanf's occupies the cache's place (an empty folder is fine)."""
        if self.path.is_dir():
            return any(self.path.iterdir())
        return self.path.exists() or self.path.is_symlink() or self.store.work_dir_foreign()

    def _meta(self, sealed: bool, extra: dict | None = None) -> dict:
        spec = self.spec
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "storage": self.fmt,
            "sealed": sealed,
            "fingerprint": self.fingerprint,
            "settings": spec.settings,
            "class_names": spec.class_names,
            "dim": spec.dim,
            **({"patch_dim": spec.patch_dim} if spec.patch_dim not in (None, spec.dim) else {}),
            "num_tokens": spec.num_tokens,
            "dtype": spec.dtype,
            "shard_size": spec.shard_size,
            "chunk_size": spec.chunk_size,
            "splits": {s: {"n": len(lst.labels), "shards": num_shards(len(lst.labels), spec.shard_size)}
                       for s, lst in spec.listings.items()},
            **spec.meta,
        }
        meta.update(extra or {})
        return meta

    # -- shards
    def all_jobs(self) -> list[ShardJob]:
        jobs = []
        for split, listing in self.spec.listings.items():
            n = len(listing.labels)
            for shard in range(num_shards(n, self.spec.shard_size)):
                start = shard * self.spec.shard_size
                jobs.append(ShardJob(split, shard, start, min(n, start + self.spec.shard_size)))
        return jobs

    def owned_jobs(self) -> list[ShardJob]:
        return [j for i, j in enumerate(self.all_jobs()) if i % self.num_procs == self.proc_index]

    def pending(self) -> list[ShardJob]:
        if self.already_sealed:
            return []
        done = {s: set(self.store.done_markers(s)) for s in self.spec.splits}
        return [j for j in self.owned_jobs() if j.shard not in done[j.split]]

    def write_shard(self, job: ShardJob, cls: np.ndarray, patch: np.ndarray, valid: np.ndarray,
                    skipped: list[dict]) -> None:
        rows = {"cls": cls, "patch": patch, "valid": valid}
        try:
            self.store.write_shard(job.split, job.shard, job.start, rows)
            self.store.mark_done(job.split, job.shard, {
                "start": job.start, "stop": job.stop, "sha256": shard_digest(rows), "skipped": skipped,
                "sha256_arrays": array_digests(rows),
                "n_valid": int(valid.sum()), "written": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "run": self.spec.meta.get("run", {}),  # the batch size etc. this shard was computed with
            })
        except OSError as exc:
            raise _os_error(exc, self.path) from None

    # -- sealing
    def is_sealed(self) -> bool:
        """Whether the cache on disk is sealed (by this process or another one)."""
        if not self.already_sealed and self.store.exists():
            self.already_sealed = bool(self.store.read_meta().get("sealed"))
        return self.already_sealed

    def complete(self) -> bool:
        if self.is_sealed():  # a sealed HDF5 cache has no shard markers left
            return True
        for split, listing in self.spec.listings.items():
            if len(self.store.done_markers(split)) < num_shards(len(listing.labels), self.spec.shard_size):
                return False
        return True

    def seal(self) -> dict:
        """Gather what every shard recorded and mark the cache complete; idempotent, and safe when several
        processes that all found the cache complete race to seal it (one seals, the others find it sealed)."""
        try:
            with creation_lock(self.path):
                meta = self.store.read_meta() if self.is_sealed() else self._seal()
                self.store.clean_up()  # what runs killed before, while or right after sealing left behind
                return meta
        except OSError as exc:
            raise _os_error(exc, self.path) from None

    def _seal(self) -> dict:
        skipped, digests, n_valid, per_array = [], {}, {}, {}
        for split in self.spec.splits:
            markers = self.store.done_markers(split)
            digests[split] = [markers[i]["sha256"] for i in sorted(markers)]
            per_array[split] = [markers[i].get("sha256_arrays") for i in sorted(markers)]
            n_valid[split] = sum(m["n_valid"] for m in markers.values())
            for i in sorted(markers):
                skipped += [{"split": split, **s} for s in markers[i]["skipped"]]
        self._refuse_empty_classes(skipped)
        meta = self._meta(sealed=True, extra={
            "skipped": skipped,
            "shard_sha256": digests,
            "shard_sha256_arrays": per_array,  # checked by every read (reader.py); shard_sha256 by `cache verify`
            "sealed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        })
        for split, count in n_valid.items():
            meta["splits"][split]["n_valid"] = count
        self.store.seal(meta)
        self.already_sealed = True
        return meta

    def _refuse_empty_classes(self, skipped: list[dict]) -> None:
        for split, listing in self.spec.listings.items():
            counts = np.bincount(listing.labels, minlength=len(self.spec.class_names))
            bad = np.zeros_like(counts)
            for s in skipped:
                if s["split"] == split:
                    bad[s["label"]] += 1
            empty = [self.spec.class_names[c] for c in np.flatnonzero((counts > 0) & (counts == bad))]
            if empty:
                raise SanfError(
                    f"no usable image in class {', '.join(empty)} of split {split}: every file of it was skipped "
                    "as unreadable (rerun with --on-error fail to see the first bad file)"
                )

    def drain(self) -> None:
        """After an interruption: let the background writer finish the whole shards it was given (their rows are
        complete), so that they are kept; a write error then is ignored (the shard simply is not done)."""
        if self.background is not None:
            with contextlib.suppress(Exception):
                self.background.finish()

    def close(self) -> None:
        self.lock.release()


class BackgroundShardWriter:
    """Writes finished shards on a thread so the backbone never waits for the disk."""

    def __init__(self, writer: CacheWriter, depth: int = 2):
        self.writer = writer
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._run, name="sanf-shard-writer", daemon=True)
        self.thread.start()
        writer.background = self

    def _run(self) -> None:
        while True:
            item = self.queue.get()
            if item is None:
                return
            if self.error is None:
                try:
                    self.writer.write_shard(*item)
                    self.written += 1
                except BaseException as exc:  # re-raised in the producer's thread
                    self.error = exc

    def put(self, *item) -> None:
        self.raise_if_failed()
        self.queue.put(item)

    def raise_if_failed(self) -> None:
        if self.error is not None:
            raise self.error

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.raise_if_failed()
