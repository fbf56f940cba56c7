"""Which feature caches a trained run can score: compatibility of feature spaces, not identity of files.

A run's features come from one backbone configuration. Any cache extracted with the same configuration holds
features in the same space, whatever images it holds, so ``sanf eval --cache`` accepts it. The settings that
define the space, compared in this order (the first that differs is named in the error):
architecture (and timm model overrides), weights sha256 (or their source when none is recorded, e.g. random
test weights), image size, layer, pooling, token grid, token width, token count. The storage dtype (float16 or
float32) may differ: it rounds features, it does not move them.
"""

from __future__ import annotations

from ..errors import SanfError


def feature_space(identity: dict) -> list[tuple[str, object]]:
    """The settings that define a cache's feature space, from a run's recorded cache identity or from
    ``runs.cache_identity(cache)`` (same keys)."""
    bb = identity.get("backbone") or {}
    weights = bb.get("weights") or {}
    sha = weights.get("sha256") if isinstance(weights, dict) else None
    source = weights.get("source") if isinstance(weights, dict) else None
    grid = identity.get("grid") or bb.get("grid")
    return [
        ("backbone architecture", bb.get("arch")),
        ("backbone model overrides", bb.get("model_kwargs") or {}),
        ("weights sha256", sha if sha else f"<no hash; source {source}>"),
        ("image size", _norm(bb.get("image_size"))),
        ("layer", bb.get("layer")),
        ("patch layer", bb.get("patch_layer")),
        ("pooling", bb.get("pool", 1)),
        ("token grid", _norm(grid)),
        ("token width", identity.get("dim")),
        ("patch token width", identity.get("patch_dim") or identity.get("dim")),
        ("token count", identity.get("num_tokens")),
    ]


def _norm(v):
    return list(v) if isinstance(v, (list, tuple)) else v


def first_difference(run_identity: dict, cache_identity: dict) -> tuple[str, object, object] | None:
    for (name, a), (_, b) in zip(feature_space(run_identity), feature_space(cache_identity), strict=True):
        if a != b:
            return name, a, b
    return None


def check_cache_compatible(run_identity: dict, cache, run_dir) -> None:
    """Refuse a cache whose features are not in the run's feature space, naming the first differing setting."""
    from ..store.run_folder import cache_identity

    diff = first_difference(run_identity, cache_identity(cache))
    if diff is not None:
        name, a, b = diff
        raise SanfError(f"cache {cache.path} is not compatible with run {run_dir}: {name} differs (run {a!r}, "
                        f"cache {b!r}); extract the images with the run's backbone settings (see `sanf cache info`)")


def normal_class_in(cache, run_config: dict, run_dir) -> int:
    """The index of the run's normal class in ``cache`` (by name; class order may differ between caches)."""
    name = run_config.get("normal_class_name")
    if name in cache.class_names:
        return cache.class_names.index(name)
    raise SanfError(f"cache {cache.path} has no class {name!r} (the normal class of run {run_dir}); its classes: "
                    f"{', '.join(map(str, cache.class_names[:20]))}")
