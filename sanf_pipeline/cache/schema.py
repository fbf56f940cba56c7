"""The cache's on-disk schema: names, versions, shard geometry and the small JSON helpers both formats share.

A cache holds, per split (``train``, ``test``), the arrays ``cls`` (n, d), ``patch`` (n, T, d),
``valid`` (n,) bool, ``label`` (n,) int64, ``class_offsets`` (n_classes + 1,) int64 and the sample ids
as ``sample_id_bytes`` (utf-8, concatenated) + ``sample_id_offsets`` (n + 1,). Samples are sorted by
label, so one class of one split is the contiguous block ``class_offsets[c]:class_offsets[c + 1]``.
Rows are grouped into shards of ``shard_size`` samples; a shard is the unit of writing, resuming and
ownership between processes. The metadata (``meta``) is one JSON document.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import SanfError

FORMAT_NAME = "sanf-feature-cache"
FORMAT_VERSION = 1
FORMATS = ("zarr", "hdf5")
DTYPES = ("float16", "float32")
SPLITS = ("train", "test")
ROW_ARRAYS = ("cls", "patch", "valid")  # written shard by shard
INDEX_ARRAYS = ("label", "class_offsets", "sample_id_bytes", "sample_id_offsets")  # written at creation
META_FILE = "sanf.json"  # the zarr store's metadata document (hdf5 keeps it as the root attribute "sanf")
MAX_JSON_BYTES = 64 * 1024 * 1024  # caches may come from someone else: never parse unbounded JSON

TARGET_SHARD_BYTES = 64 * 1024 * 1024
TARGET_CHUNK_BYTES = 4 * 1024 * 1024
# a shard is the unit a killed or interrupted run keeps: 128 images take 4-15 s on 2 CPU cores at the 9-36 img/s
# the README reports, so Ctrl-C loses well under a minute of work; a GPU batch larger than this is one shard
MAX_SHARD_ROWS = 128


def shard_geometry(num_tokens: int, dim: int, itemsize: int, batch_size: int, *,
                   patch_dim: int | None = None) -> tuple[int, int]:
    """Rows per shard and per chunk: at most ``MAX_SHARD_ROWS`` samples and 64 MB (a writer holds one in RAM) a
    shard, chunks near 4 MB.

    A new cache's shard is a whole number of batches (at least one), so batch composition (and so every bit of
    the features) does not depend on where a run was interrupted; a chunk divides its shard, so a shard is
    written as a unit. A resumed cache keeps the geometry it was created with, whatever the batch size.
    """
    row_bytes = max(1, (num_tokens * (patch_dim or dim) + dim) * itemsize)
    batches = max(1, min(TARGET_SHARD_BYTES // (row_bytes * batch_size), MAX_SHARD_ROWS // batch_size))
    shard = int(batches * batch_size)
    chunk_cap = max(1, TARGET_CHUNK_BYTES // row_bytes)
    chunk = max(c for c in range(1, min(shard, chunk_cap) + 1) if shard % c == 0)
    return shard, int(chunk)


def num_shards(n: int, shard_size: int) -> int:
    return (n + shard_size - 1) // shard_size


def encode_ids(ids: list[str]) -> tuple[np.ndarray, np.ndarray]:
    encoded = [s.encode("utf-8") for s in ids]
    offsets = np.zeros(len(encoded) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum([len(b) for b in encoded], dtype=np.int64)
    data = np.frombuffer(b"".join(encoded), dtype=np.uint8).copy()
    return data, offsets


def decode_ids(data: np.ndarray, offsets: np.ndarray) -> list[str]:
    raw = np.asarray(data, dtype=np.uint8).tobytes()
    return [raw[offsets[i] : offsets[i + 1]].decode("utf-8", "replace") for i in range(len(offsets) - 1)]


def class_offsets(sorted_labels: np.ndarray, n_classes: int) -> np.ndarray:
    counts = np.bincount(sorted_labels, minlength=n_classes)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(settings: dict) -> str:
    """A short stable hash of the settings that determine a cache's content."""
    return hashlib.sha256(canonical_json(settings).encode()).hexdigest()[:16]


def loads_limited(text: str | bytes, what: str) -> Any:
    if len(text) > MAX_JSON_BYTES:
        raise SanfError(f"{what} is {len(text)} bytes, over the {MAX_JSON_BYTES}-byte limit; refusing to parse it")
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise SanfError(f"{what} is not valid JSON ({exc}); the file is damaged or not a sanf file") from None


def read_json_file(path: Path, what: str | None = None) -> Any:
    path = Path(path)
    what = what or str(path)
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise SanfError(f"{what} is {size} bytes, over the {MAX_JSON_BYTES}-byte limit; refusing to parse it")
        return loads_limited(path.read_bytes(), what)
    except OSError as exc:
        raise SanfError(f"cannot read {what}: {exc.strerror or exc}") from None


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON so that a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True, default=str)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def diff_settings(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable names of the settings that differ between two settings dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += diff_settings(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key} ({a!r} -> {b!r})")
    return out
