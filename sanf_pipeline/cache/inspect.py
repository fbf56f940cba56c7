"""`sanf cache info` and `sanf cache verify`: what a cache holds, and whether it is whole and finite."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SanfError
from .reader import FeatureCache
from .stores import PROGRESS_DIR
from .writer import mask_digest, shard_digest


def disk_size(path: Path) -> int:
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def cache_info(path) -> dict:
    """A JSON-able summary: layout, sizes, provenance."""
    cache = FeatureCache(path, allow_unsealed=True, verify=False)  # info describes, verify reports
    meta = cache.meta
    splits = {}
    for name, s in meta["splits"].items():
        entry = {"n": s["n"], "n_valid": s.get("n_valid"), "shards": s["shards"]}
        if meta.get("sealed"):
            view = cache.split(name)
            entry["per_class"] = {cache.class_names[c]: int(k) for c, k in enumerate(view.class_counts())}
        else:  # n_valid is counted when the cache is sealed; until then, what the finished shards hold
            markers = cache._store.done_markers(name).values()
            done = sum(int(m["stop"]) - int(m["start"]) for m in markers)
            entry.update(shards_done=len(markers), n_done=done,
                         n_valid_done=done - sum(len(m.get("skipped") or ()) for m in markers))
        splits[name] = entry
    return {
        "path": str(cache.path),
        "storage": cache.format,
        "sealed": bool(meta.get("sealed")),
        "fingerprint": meta.get("fingerprint"),
        "size_bytes": disk_size(cache.path),
        "dim": meta["dim"],
        "patch_dim": meta.get("patch_dim") or meta["dim"],
        "num_tokens": meta["num_tokens"],
        "dtype": meta["dtype"],
        "shard_size": meta["shard_size"],
        "class_names": meta["class_names"],
        "splits": splits,
        "dataset": meta.get("dataset"),
        "backbone": meta.get("backbone"),
        "versions": meta.get("versions"),
        "created": meta.get("created"),
        "skipped": len(meta.get("skipped", [])),
        "masks": mask_summary(meta),
    }


def split_line(name: str, s: dict) -> str:
    """The ``split`` line of `sanf cache info` for one split (``s``: an entry of :func:`cache_info`'s splits)."""
    if s.get("n_valid") is not None:
        valid = f"{s['n_valid']} valid"
    elif "n_done" in s:  # unsealed: the valid count is only known for the finished shards
        valid = f"{s['n_done']} extracted so far, {s['n_valid_done']} of them valid"
    else:
        valid = "valid count unknown"
    done = f", {s['shards_done']}/{s['shards']} shards done" if "shards_done" in s else ""
    return f"split      {name}: {s['n']} samples ({valid}), {s['shards']} shards{done}"


def mask_summary(meta: dict) -> dict | None:
    """What ground-truth masks a cache records (from its metadata): split, resolution, how many images have a
    known mask and how many of those show a defect at that resolution; None when it records none."""
    masks = meta.get("masks")
    if not isinstance(masks, dict) or masks.get("split") not in meta.get("splits", {}):
        return None
    return {"split": masks["split"], "resolution": list(masks.get("resolution") or []),
            "n": meta["splits"][masks["split"]]["n"], "n_known": masks.get("n_known"),
            "n_with_defect": masks.get("n_with_defect"), "rule": masks.get("rule")}


def mask_line(info: dict) -> str:
    """The ``masks`` line of `sanf cache info` (``info``: :func:`cache_info`'s summary)."""
    m = info.get("masks")
    if not m:
        return "masks      none (no ground-truth masks recorded)"
    h, w = m["resolution"]
    return (f"masks      {m['split']}: {m['n_known']} of {m['n']} images have a known mask ({m['n_with_defect']} "
            f"with defect pixels) at {h}x{w}")


@dataclass
class VerifyReport:
    path: str
    problems: list[str] = field(default_factory=list)
    rows_checked: int = 0

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(path, progress=None) -> VerifyReport:
    """Check sealing, markers, shard checksums, index consistency and that no stored value is NaN/Inf."""
    try:
        cache = FeatureCache(path, verify=False)  # checks every shard itself and reports, never raises
    except SanfError as exc:
        return VerifyReport(str(path), [str(exc)])
    report = VerifyReport(str(path))
    meta = cache.meta
    shard = int(meta["shard_size"])
    for name in cache.splits:
        view = cache.split(name)
        offsets = view.class_offsets
        if offsets[0] != 0 or offsets[-1] != view.n or np.any(np.diff(offsets) < 0):
            report.problems.append(f"{name}: class offsets are inconsistent with {view.n} rows")
        if np.any(np.diff(view.labels_all) < 0):
            report.problems.append(f"{name}: rows are not sorted by label")
        digests = meta.get("shard_sha256", {}).get(name, [])
        if len(digests) != meta["splits"][name]["shards"]:
            report.problems.append(f"{name}: {len(digests)} of {meta['splits'][name]['shards']} shards recorded")
        group = cache._group(name)
        for i, start in enumerate(range(0, view.n, shard)):
            stop = min(view.n, start + shard)
            try:
                rows = {k: np.asarray(group[k][start:stop]) for k in ("cls", "patch", "valid")}
            except Exception as exc:  # e.g. zarr's checksum of a damaged shard file: a problem, not a traceback
                report.problems.append(f"{name}: shard {i} (rows {start}:{stop}) cannot be read "
                                       f"({type(exc).__name__}: {exc})")
                continue
            if i < len(digests) and shard_digest(rows) != digests[i]:
                report.problems.append(f"{name}: shard {i} (rows {start}:{stop}) does not match its checksum")
            keep = rows["valid"]
            for k in ("cls", "patch"):
                bad = ~np.isfinite(rows[k][keep].astype(np.float32))
                if bad.any():
                    report.problems.append(f"{name}: {int(bad.sum())} NaN/Inf values in {k} rows {start}:{stop}")
            report.rows_checked += stop - start
            if progress:
                progress(stop - start)
    for name in cache.splits:
        if cache.split(name).has_masks:
            recorded = (meta.get("settings", {}).get("masks") or {}).get("sha256")
            try:
                group = cache._group(name)
                coverage, known = np.asarray(group["mask"][...]), np.asarray(group["mask_known"][...])
            except Exception as exc:  # a missing array, a damaged chunk file: a problem, not a traceback
                report.problems.append(f"{name}: the ground-truth masks cannot be read ({type(exc).__name__}: {exc})")
                continue
            if mask_digest(coverage, known) != recorded:
                report.problems.append(f"{name}: the ground-truth masks do not match their checksum")
    if cache.format == "zarr" and (cache.path / PROGRESS_DIR).exists():
        for name in cache.splits:
            if len(cache._store.done_markers(name)) != meta["splits"][name]["shards"]:
                report.problems.append(f"{name}: shard markers are missing")
    cache.close()
    return report
