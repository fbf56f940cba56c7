"""Datasets by name: ``@register_dataset("name")`` on a reader class, ``create_dataset(name, ...)``."""

from __future__ import annotations

import os
from collections.abc import Callable

from ..errors import SanfError
from .base import ImageDataset, check_split

_REGISTRY: dict[str, type[ImageDataset]] = {}


def _key(name: str) -> str:
    return str(name).strip().lower().replace("_", "-")


def register_dataset(name: str) -> Callable[[type[ImageDataset]], type[ImageDataset]]:
    """Class decorator: make a reader available as ``create_dataset(name, ...)``."""
    key = _key(name)

    def deco(cls: type[ImageDataset]) -> type[ImageDataset]:
        if key in _REGISTRY and _REGISTRY[key] is not cls:
            raise ValueError(f"dataset name {key!r} is already registered by {_REGISTRY[key]!r}")
        cls.name = key
        _REGISTRY[key] = cls
        return cls

    return deco


def list_datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted(_REGISTRY)


def get_dataset_class(name: str) -> type[ImageDataset]:
    cls = _REGISTRY.get(_key(name))
    if cls is None:
        raise SanfError(f"unknown dataset {name!r}; choose one of: {', '.join(list_datasets())}")
    return cls


def create_dataset(
    name: str,
    root: str | os.PathLike | None,
    split: str,
    *,
    category: str | None = None,
    limit_per_class: int | None = None,
) -> ImageDataset:
    """One split of a dataset. ``name`` is case-insensitive and ``_`` equals ``-``."""
    cls = get_dataset_class(name)
    check_split(split)
    return cls(root, split, category=category, limit_per_class=limit_per_class)
