"""Reading a sealed cache: metadata, class blocks, whole splits, as float32 numpy arrays (or as stored).

Reads are contiguous slices (one class of one split is one block), which is what both Zarr and HDF5 are
fast at. Rows whose image was skipped at extraction (``valid == False``) are dropped on every read.

A split extracted from a dataset with ground-truth defect masks (mvtec's test split) also holds ``mask``
(n, h, w) uint8 coverage and ``mask_known`` (n,) bool, read with :meth:`SplitView.masks` (``extract/masks.py``).

Every read checks what it reads against the sha256 recorded when each shard was written (as HDFS and ZFS check
blocks on read): the shards a read overlaps are read whole, hashed once per open cache and compared, per array
(``shard_sha256_arrays``; caches sealed before per-array digests: the combined ``shard_sha256``, which needs all
three row arrays). A mismatch is one :class:`SanfError` naming the shard and `sanf cache verify`. The cost is in
``benchmarks/read_verify.md``.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np

from ..errors import SanfError
from .schema import FORMAT_NAME, FORMAT_VERSION, MAX_JSON_BYTES, decode_ids
from .stores import H5Store, ZarrStore, detect_format


class SplitView:
    """One split of a cache."""

    def __init__(self, cache: FeatureCache, name: str):
        self.cache = cache
        self.name = name

    def _array(self, name: str):
        return self.cache._group(self.name)[name]

    @cached_property
    def labels_all(self) -> np.ndarray:
        return np.asarray(self._array("label")[...], dtype=np.int64)

    @cached_property
    def valid(self) -> np.ndarray:
        return np.asarray(self._rows("valid", 0, self.n), dtype=bool)

    # -- reading with checksums
    def _rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of row array ``name`` as stored, after checking every shard they touch."""
        cache = self.cache
        plan = cache._digests(self.name)
        # with only the combined digest, `valid` is checked with the cls/patch rows of each shard a read touches:
        # checking it alone would mean reading every shard of the split
        if plan is None or stop <= start or (plan[0] == "combined" and name == "valid"):
            return self._array(name)[start:stop]
        size, n = cache._shard_size, self.n
        a, b = (start // size) * size, min(n, -(-stop // size) * size)
        todo = [i for i in range(a // size, -(-b // size)) if (self.name, i, name) not in cache._verified]
        if not todo:
            return self._array(name)[start:stop]
        try:
            block = self._array(name)[a:b]
        except (OSError, ValueError, RuntimeError) as exc:  # e.g. zarr's own index checksum of a damaged shard file
            raise self._damaged(todo[0], a, b, f"cannot be read ({type(exc).__name__})") from None
        for i in todo:
            r0, r1 = i * size, min(n, (i + 1) * size)
            self._check_shard(i, name, plan, {name: block[r0 - a : r1 - a]}, r0, r1)
        return block[start - a : stop - a]

    def _check_shard(self, i: int, name: str, plan, rows: dict[str, np.ndarray], r0: int, r1: int) -> None:
        from .writer import array_digests, shard_digest

        kind, digests = plan
        if i >= len(digests) or not digests[i]:
            raise self._damaged(i, r0, r1, "has no recorded checksum")
        if kind == "arrays":
            ok = array_digests(rows)[name] == digests[i].get(name)
        else:  # a cache sealed before per-array digests: the combined digest needs the shard's three row arrays
            full = {k: (rows[k] if k in rows else self._array(k)[r0:r1]) for k in ("cls", "patch", "valid")}
            ok = shard_digest(full) == digests[i]
        if not ok:
            raise self._damaged(i, r0, r1, "does not match its checksum" + (f" ({name})" if kind == "arrays" else ""))
        self.cache._verified.update({(self.name, i, name)} if kind == "arrays" else
                                    {(self.name, i, k) for k in ("cls", "patch", "valid")})

    def _damaged(self, i: int, r0: int, r1: int, what: str) -> SanfError:
        path = self.cache.path
        return SanfError(f"cache {path} is damaged: shard {i} of split {self.name} (rows {r0}:{r1}) {what}; run "
                         f"`sanf cache verify {path}` and re-extract it (rerun `sanf extract` with --overwrite)")

    # -- ground-truth masks (the test split of a cache extracted from a dataset with masks: extract/masks.py)
    @property
    def has_masks(self) -> bool:
        """Whether this split records ground-truth defect masks."""
        return self.cache._masks_meta().get("split") == self.name

    def masks(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """``(coverage uint8 (m, h, w), known bool (m,))`` of rows ``start:stop``, valid ones only (aligned with
        :meth:`read`): coverage 0..255 of each pixel at ``cache.mask_resolution`` (a pixel is defective when
        ``coverage >= 128``: ``meta["masks"]["rule"]``); ``known`` False where the image's mask is unknown (a
        defect image without a mask file; its coverage is all zeros). Checked against the recorded sha256 on the
        first read of an open cache (``verify``)."""
        if not self.has_masks:
            raise SanfError(f"cache {self.cache.path} records no ground-truth masks for split {self.name} (it was "
                            "extracted from a dataset without masks, e.g. not mvtec's test split); pixel-level "
                            "evaluation needs a cache extracted with masks")
        keep = self.valid[start:stop]
        coverage, known = self._mask_rows(start, stop)
        return coverage[keep], known[keep]

    def _mask_rows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        cache, key = self.cache, (self.name, -1, "mask")
        check = cache.verify and key not in cache._verified
        a, b = (0, self.n) if check else (start, stop)  # the digest covers the whole arrays
        try:
            coverage = np.asarray(self._array("mask")[a:b], dtype=np.uint8)
            known = np.asarray(self._array("mask_known")[a:b], dtype=bool)
        except (OSError, ValueError, RuntimeError, KeyError) as exc:  # a missing array, a damaged chunk file
            raise self._damaged_masks(f"cannot be read ({type(exc).__name__})") from None
        if cache.mask_resolution is None:
            raise self._damaged_masks("have no recorded resolution")
        h, w = cache.mask_resolution
        if coverage.shape[1:] != (h, w) or len(coverage) != len(known):
            raise self._damaged_masks(f"have shape {coverage.shape}, not (n, {h}, {w})")
        if check:
            from .writer import mask_digest

            recorded = (cache.meta.get("settings", {}).get("masks") or {}).get("sha256")
            if not recorded:
                raise self._damaged_masks("have no recorded checksum")
            if len(coverage) != self.n or mask_digest(coverage, known) != recorded:
                raise self._damaged_masks("do not match their checksum")
            cache._verified.add(key)
            return coverage[start:stop], known[start:stop]
        return coverage, known

    def _damaged_masks(self, what: str) -> SanfError:
        path = self.cache.path
        return SanfError(f"cache {path} is damaged: the ground-truth masks of split {self.name} {what}; run "
                         f"`sanf cache verify {path}` and re-extract it (rerun `sanf extract` with --overwrite)")

    @property
    def n(self) -> int:
        return len(self.labels_all)

    @property
    def n_valid(self) -> int:
        return int(self.valid.sum())

    @cached_property
    def class_offsets(self) -> np.ndarray:
        return np.asarray(self._array("class_offsets")[...], dtype=np.int64)

    @cached_property
    def sample_ids_all(self) -> list[str]:
        return decode_ids(self._array("sample_id_bytes")[...], self._array("sample_id_offsets")[...])

    @property
    def labels(self) -> np.ndarray:
        return self.labels_all[self.valid]

    @property
    def sample_ids(self) -> list[str]:
        return [s for s, ok in zip(self.sample_ids_all, self.valid, strict=True) if ok]

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.labels, minlength=len(self.cache.class_names))

    def read(self, start: int, stop: int, patch: bool = True,
             dtype=np.float32) -> tuple[np.ndarray, np.ndarray | None]:
        """Rows ``start:stop`` (valid ones only) as float32; ``dtype=None``: as stored (float16 by default: half
        the memory of a split held for many runs, converted exactly to float32 block by block where it is used)."""
        keep = self.valid[start:stop]
        cls = np.asarray(self._rows("cls", start, stop), dtype=dtype)[keep]
        tokens = None
        if patch:
            tokens = np.asarray(self._rows("patch", start, stop), dtype=dtype)[keep]
        return cls, tokens

    def class_range(self, c: int) -> tuple[int, int]:
        if not 0 <= c < len(self.cache.class_names):
            raise SanfError(f"class index {c} is out of range 0..{len(self.cache.class_names) - 1}")
        return int(self.class_offsets[c]), int(self.class_offsets[c + 1])

    def read_class(self, c: int, patch: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """One class's block: (cls (m, d), patch (m, T, d) or None), valid rows only."""
        return self.read(*self.class_range(c), patch=patch)

    def read_all(self, patch: bool = True, dtype=np.float32):
        """(cls, patch, labels, sample_ids) for the whole split, valid rows only (``dtype``: as ``read``)."""
        cls, tokens = self.read(0, self.n, patch=patch, dtype=dtype)
        return cls, tokens, self.labels, self.sample_ids


class FeatureCache:
    """A sealed feature cache (Zarr directory or HDF5 file) opened for reading."""

    def __init__(self, path, *, allow_unsealed: bool = False, verify: bool = True):
        self.path = Path(path)
        self.verify = verify  # check every read against the shard checksums (module docstring)
        self._verified: set[tuple[str, int, str]] = set()
        fmt = detect_format(self.path)
        if fmt is None:
            hint = "" if self.path.exists() else " (it does not exist)"
            raise SanfError(f"{self.path} is not a sanf feature cache{hint}; create one with `sanf extract`")
        self.format = fmt
        self._store = ZarrStore(self.path) if fmt == "zarr" else H5Store(self.path)
        if fmt == "hdf5" and not self.path.exists():
            if not allow_unsealed:
                raise SanfError(f"{self.path} is an incomplete cache (extraction did not finish); rerun the same "
                                "`sanf extract` command to complete it")
            self.meta = self._store.read_meta()
            self._h5 = None
        else:
            self.meta = self._store.read_meta()
        if self.meta.get("format") != FORMAT_NAME:
            raise SanfError(f"{self.path} is not a sanf feature cache (no sanf metadata)")
        if self.meta.get("format_version", 0) > FORMAT_VERSION:
            raise SanfError(f"{self.path} was written by a newer sanf (cache format "
                            f"{self.meta['format_version']}); upgrade sanf to read it")
        if not self.meta.get("sealed") and not allow_unsealed:
            raise SanfError(f"{self.path} is an incomplete cache (extraction did not finish); rerun the same "
                            "`sanf extract` command to complete it")
        self._root = None

    def _group(self, split: str):
        if split not in self.splits:
            raise SanfError(f"cache {self.path} has no split {split!r}; it has {', '.join(self.splits)}")
        if self._root is None:
            if self.format == "zarr":
                import zarr

                zarr_json = self.path / "zarr.json"
                if zarr_json.stat().st_size > MAX_JSON_BYTES:
                    raise SanfError(f"{zarr_json} is too large to be a sanf cache")
                self._root = zarr.open_group(store=str(self.path), mode="r")
            else:
                import h5py

                self._root = h5py.File(self.path, "r")
        return self._root[split]

    def close(self) -> None:
        if self.format == "hdf5" and self._root is not None:
            self._root.close()
        self._root = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __getstate__(self):  # picklable for worker processes: reopen lazily there
        state = self.__dict__.copy()
        state["_root"] = None
        for key in list(state):
            if key.startswith("_split_"):
                del state[key]
        return state

    @property
    def _shard_size(self) -> int:
        return int(self.meta["shard_size"])

    def _digests(self, split: str):
        """("arrays", per-array digests) or ("combined", digests) of a split's shards; None when not checking."""
        if not self.verify or not self.meta.get("sealed"):
            return None
        per_array = (self.meta.get("shard_sha256_arrays") or {}).get(split)
        if per_array and all(isinstance(d, dict) for d in per_array):
            return "arrays", per_array
        return "combined", (self.meta.get("shard_sha256") or {}).get(split, [])

    def _masks_meta(self) -> dict:
        masks = self.meta.get("masks")
        return masks if isinstance(masks, dict) else {}

    @property
    def mask_resolution(self) -> tuple[int, int] | None:
        """``(h, w)`` of the ground-truth masks the cache records (``eval_resolution`` of the input size), or None
        when it records none."""
        res = self._masks_meta().get("resolution")
        return None if res is None else (int(res[0]), int(res[1]))

    @property
    def fingerprint(self) -> str:
        return self.meta["fingerprint"]

    @property
    def class_names(self) -> list[str]:
        return list(self.meta["class_names"])

    @property
    def dim(self) -> int:
        return int(self.meta["dim"])

    @property
    def patch_dim(self) -> int:
        """The patch tokens' width (``dim`` unless they come from other layers than the class token)."""
        return int(self.meta.get("patch_dim") or self.meta["dim"])

    @property
    def num_tokens(self) -> int:
        return int(self.meta["num_tokens"])

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def backbone(self) -> dict:
        return self.meta.get("backbone", {})

    def split(self, name: str) -> SplitView:
        key = f"_split_{name}"
        if key not in self.__dict__:
            self._group(name)
            self.__dict__[key] = SplitView(self, name)
        return self.__dict__[key]

    def class_index(self, name_or_index) -> int:
        """Resolve a class given by name or index; the error lists the valid ones."""
        names = self.class_names
        text = str(name_or_index).strip()
        if text in names:
            return names.index(text)
        if text.lstrip("-").isdigit() and 0 <= int(text) < len(names):
            return int(text)
        listing = ", ".join(f"{i}={n}" for i, n in enumerate(names))
        raise SanfError(f"unknown class {text!r}; valid classes are {listing}")


def open_cache(path, *, allow_unsealed: bool = False, verify: bool = True) -> FeatureCache:
    return FeatureCache(path, allow_unsealed=allow_unsealed, verify=verify)
