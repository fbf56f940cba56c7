"""The feature cache: schema, writer, reader, and the info/verify checks."""

from .reader import FeatureCache, SplitView, open_cache
from .schema import DTYPES, FORMATS
from .writer import BackgroundShardWriter, CacheSpec, CacheWriter, ShardJob, SplitListing

__all__ = [
    "DTYPES",
    "FORMATS",
    "BackgroundShardWriter",
    "CacheSpec",
    "CacheWriter",
    "FeatureCache",
    "ShardJob",
    "SplitListing",
    "SplitView",
    "open_cache",
]
